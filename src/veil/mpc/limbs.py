"""Exact ring (Z_2^64) matrix products and convolutions, native int64 or float64 over limbs.

Two exact ways to multiply int64 matrices modulo 2^64:

* ``"int64"``: torch's own int64 kernels, which wrap around modulo 2^64.
* ``"limbs"``: each operand is split into three unsigned limbs of 22, 21 and 21 bits
  (``x = x0 + x1 * 2^22 + x2 * 2^43`` mod 2^64); the six limb products whose weight is below
  2^64 (weights 2^0, 2^22, 2^43, 2^44) run as float64 BLAS calls. Every product of two limbs
  is below 2^44 and a sum of ``k`` of them below ``k * 2^44``, which is exact in float64
  while ``k <= 512``; longer inner dimensions are cut into chunks of 512. Each float64
  result is an exact integer, converted back to int64 and recombined with shifts, wrapping
  modulo 2^64.

Which is faster depends on the build: torch 2.13 on the x86 CPU this was written on runs a
256^3 int64 GEMM in 1.8 ms and a float64 one in 0.42 ms (one thread), but splitting into
limbs, six products and the recombination cost 4.9 ms (2.6 ms on two threads), so the native
kernel wins (``benchmarks/mpc.py`` prints both). :data:`BACKEND` picks the path (``"int64"``
by default); both are exact and tested against Python integers.

torch's int64 GEMM runs on one thread whatever ``torch.get_num_threads()`` says. When more
threads are allowed, :func:`matmul` cuts a large product into blocks of rows (of the batch,
for a batch of products) and runs them on that many threads at once, each writing its block
of the result in place (torch releases the GIL inside the kernel): 1.8 -> 1.1 ms on two
cores. The result is the same tensor, bit for bit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

#: "int64" (native wrapping int64 kernels) or "limbs" (float64 BLAS over 21/21/22-bit limbs).
BACKEND = "int64"

_SHIFTS = (0, 22, 43)
_CHUNK = 512


def set_backend(name: str) -> None:
    """Choose how ring matmuls and convolutions run: ``"int64"`` or ``"limbs"``."""
    global BACKEND
    if name not in ("int64", "limbs"):
        raise ValueError(f"backend must be 'int64' or 'limbs', got {name!r}")
    BACKEND = name


def split_limbs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three unsigned limbs of int64 ``x`` (bits 0-21, 22-42, 43-63) as float64."""
    x0 = (x & ((1 << 22) - 1)).to(torch.float64)
    x1 = ((x >> 22) & ((1 << 21) - 1)).to(torch.float64)
    x2 = ((x >> 43) & ((1 << 21) - 1)).to(torch.float64)
    return x0, x1, x2


def _limb_product(
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    a0, a1, a2 = split_limbs(a)
    b0, b1, b2 = split_limbs(b)
    # Limb weights 2^0, 2^22, 2^43: products of weight 2^0, 2^22, 2^43 and 2^44 remain; the
    # others (2^65 and up) vanish mod 2^64. Each product is exact in float64 (< 2^53); they
    # are combined in int64, wrapping.
    out = op(a0, b0).to(torch.int64)
    out += (op(a0, b1).to(torch.int64) + op(a1, b0).to(torch.int64)) << 22
    out += (op(a0, b2).to(torch.int64) + op(a2, b0).to(torch.int64)) << 43
    out += op(a1, b1).to(torch.int64) << 44
    return out


#: Products with fewer multiply-adds than this run on the calling thread alone.
PARALLEL_MIN_WORK = 1 << 21
_ROWS_PER_BLOCK = 32

_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, size, executor)


def _executor(size: int) -> ThreadPoolExecutor:
    """The process's pool for row blocks, made again after a fork or a thread-count change."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != size:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            _pool = (os.getpid(), size, ThreadPoolExecutor(size, "veil-ring-matmul"))
        return _pool[2]


def _threaded_matmul(a: torch.Tensor, b: torch.Tensor, threads: int) -> torch.Tensor:
    """``torch.matmul(a, b)`` (both at least 2-D) on ``threads`` threads, each writing its
    block of the result in place: blocks of rows when ``b`` is one matrix or there is a
    single product, else blocks of the batch. No block is copied or concatenated (a
    ``torch.cat`` of the blocks had cost as much as a fifth of a batched product)."""
    m, n = a.shape[-2], b.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = torch.empty((*batch, m, n), dtype=torch.int64)
    if b.dim() == 2 or out.numel() == m * n:  # one matrix product: cut its rows
        a2 = a.reshape(-1, a.shape[-1])
        b2 = b.reshape(b.shape[-2], n)
        o2 = out.view(-1, n)
        step = -(-a2.shape[0] // threads)
        tasks = [(a2[i : i + step], b2, o2[i : i + step]) for i in range(0, a2.shape[0], step)]
    else:  # a batch of products: cut the batch
        a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        o3 = out.view(-1, m, n)
        step = -(-o3.shape[0] // threads)
        tasks = [(a3[i : i + step], b3[i : i + step], o3[i : i + step])
                 for i in range(0, o3.shape[0], step)]
    pool = _executor(threads)
    futures = [pool.submit(_matmul_into, *task) for task in tasks[1:]]
    _matmul_into(*tasks[0])
    for f in futures:
        f.result()
    return out


def _matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    torch.matmul(a, b, out=out)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` modulo 2^64 for int64 tensors (torch.matmul broadcasting rules).

    On the int64 backend, a product of at least :data:`PARALLEL_MIN_WORK` multiply-adds is cut
    into row blocks run on ``torch.get_num_threads()`` threads (torch's int64 kernel itself
    uses one); the result is identical.
    """
    if a.device.type == "meta":
        return torch.matmul(a, b)
    if BACKEND == "limbs":
        return limb_matmul(a, b)
    threads = torch.get_num_threads()
    if (threads > 1 and a.dim() >= 2 and b.dim() >= 2 and a.device.type == "cpu"
            and a.numel() and b.numel()
            and max(a.numel() * b.shape[-1], b.numel() * a.shape[-2]) >= PARALLEL_MIN_WORK):
        # (the multiply-adds, without the batch's broadcasting: checked first, as every
        # ring product of a training step comes through here and most are small)
        rows = a.numel() // a.shape[-1] if b.dim() == 2 else a.shape[-2]
        threads = min(threads, max(rows // _ROWS_PER_BLOCK, _batch(a, b)))
        if threads > 1:
            return _threaded_matmul(a, b, threads)
    return torch.matmul(a, b)


def _batch(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many matrix products ``torch.matmul(a, b)`` makes (both at least 2-D)."""
    count = 1
    for s in torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]):
        count *= s
    return count


def limb_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` modulo 2^64 through float64 BLAS over limbs (exact)."""
    k = a.shape[-1]
    if k <= _CHUNK:
        return _limb_product(torch.matmul, a, b)
    out = None
    for start in range(0, k, _CHUNK):
        stop = min(k, start + _CHUNK)
        part = _limb_product(
            torch.matmul,
            a[..., start:stop],
            b[..., start:stop, :] if b.dim() > 1 else b[start:stop],
        )
        out = part if out is None else out + part
    return out  # type: ignore[return-value]


def conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """2-D convolution (no bias) modulo 2^64 for int64 tensors."""
    if BACKEND == "int64" or x.device.type == "meta":
        return F.conv2d(x, w, None, stride, padding, dilation, groups)
    return limb_conv2d(x, w, stride, padding, dilation, groups)


def limb_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """2-D convolution modulo 2^64 through float64 convolutions over limbs (exact).

    Exact while each output sums at most 512 products (``C_in / groups * kH * kW``).
    """
    terms = w.shape[1] * w.shape[2] * w.shape[3]
    if terms > _CHUNK:
        raise ValueError(
            f"limb convolution sums {terms} products per output, more than the exact limit of "
            f"{_CHUNK}; use the int64 backend"
        )

    def op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(a, b, None, stride, padding, dilation, groups)

    return _limb_product(op, x, w)


__all__ = [
    "BACKEND",
    "conv2d",
    "limb_conv2d",
    "limb_matmul",
    "matmul",
    "set_backend",
    "split_limbs",
]

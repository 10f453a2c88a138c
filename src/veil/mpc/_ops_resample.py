"""Resampling with public separable weights on FixedPrecisionTensors, forward and backward:
upsampling (``F.interpolate``, ``nn.Upsample``: nearest and nearest-exact, linear,
bilinear, bicubic, trilinear, with or without ``align_corners`` and antialiasing),
adaptive average pooling of any output size, and replication padding.

Each of these is separable and linear with public weights: along each spatial axis ``j``
the output is ``A_j`` (outputs x inputs, public) times the input. veil reads ``A_j`` off
torch's own kernel, run on a float64 basis (one-hot along axis ``j``, constant along the
others, which every one of these maps to the same constant), so the weights are exactly
torch's. Then:

1. forward: ``y = x x_1 A_1 x_2 A_2 ...`` (one product with a public matrix per axis);
2. backward: ``dx = dy x_1 A_1^T x_2 A_2^T ...``, the exact adjoint. (torch's own
   antialiased backward is not its forward's adjoint on inputs of a few pixels, a 4x2 to
   2x1 bilinear for one; veil's gradient is then the forward's true gradient.)

Both are local to the parties. Nearest modes and replication padding have 0/1 weights:
integer products, exact.
The others encode the weights with the value's fractional bits and truncate once per axis:
within one unit per axis plus ``2^-(f+1)`` times the sum of the input's magnitudes a weight
touches (16 bits: below 1e-4 for inputs up to 10 and bicubic's four taps).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc._ops_fixed import child_of, matmul
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor


def _frozen(v: Any) -> Any:
    """A hashable copy of an op argument (int lists as tuples)."""
    return tuple(int(i) for i in v) if isinstance(v, (list, tuple, torch.Size)) else v


def _hashable(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_frozen(a) for a in args)


#: Forward ops: whether their weights are 0/1 (exact integer products), and the number of
#: spatial dimensions given the arguments after the input.
_FORWARD: dict[Any, tuple[bool, Callable[[tuple[Any, ...]], int]]] = {
    **{op: (True, lambda extra: len(extra[0])) for op in (
        aten.upsample_nearest1d.default, aten.upsample_nearest2d.default,
        aten.upsample_nearest3d.default, aten._upsample_nearest_exact1d.default,
        aten._upsample_nearest_exact2d.default, aten._upsample_nearest_exact3d.default,
    )},
    **{op: (False, lambda extra: len(extra[0])) for op in (
        aten.upsample_linear1d.default, aten.upsample_bilinear2d.default,
        aten.upsample_trilinear3d.default, aten.upsample_bicubic2d.default,
        aten._upsample_bilinear2d_aa.default, aten._upsample_bicubic2d_aa.default,
        aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default,
    )},
    **{op: (True, lambda extra: len(extra[0]) // 2) for op in (
        aten.replication_pad1d.default, aten.replication_pad2d.default,
        aten.replication_pad3d.default,
    )},
}


#: Adaptive average pooling and its number of spatial dimensions (1-D runs as 2-D).
_ADAPTIVE = {aten._adaptive_avg_pool2d.default: 2, aten._adaptive_avg_pool3d.default: 3}


def _packet_backward(op: Any) -> Any:
    packet = getattr(aten, op.overloadpacket.__name__ + "_backward", None)
    return None if packet is None else packet.default


#: Backward ops -> their forward op. Upsampling's take ``(grad, output_size, input_size,
#: *rest)``; the others ``(grad, input, *rest)``.
_BACKWARD = {b: f for f in _FORWARD if (b := _packet_backward(f)) is not None}


@functools.lru_cache(maxsize=256)
def _axis_matrices(op: Any, spatial: tuple[int, ...],
                   extra: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
    """``A_j`` (outputs x inputs) for each spatial axis, from torch's kernel
    ``op(input, *extra)`` run on a float64 basis: one-hot along axis ``j``, and every other
    axis cut to one or two places mapped onto as many (see :func:`_one_axis`), which every
    one of these kernels passes through unchanged. The basis holds ``n_j`` to ``4 n_j``
    values, whatever the other axes' sizes."""
    d = len(spatial)
    out = []
    for j, n in enumerate(spatial):
        args, sizes = _one_axis(op, extra, j, d)
        shape = list(sizes)
        shape[j] = n
        onehot = torch.eye(n, dtype=torch.float64).view(n, 1, *[n if k == j else 1
                                                               for k in range(d)])
        result = op(onehot.expand(n, 1, *shape).contiguous(), *args)
        pick = [slice(None) if k == j else 0 for k in range(d)]
        out.append(result[(slice(None), 0, *pick)].t().contiguous())  # (outputs_j, n)
    return tuple(out)


def _one_axis(op: Any, extra: tuple[Any, ...], j: int,
              d: int) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """``op``'s arguments after the input for a basis whose axes other than ``j`` are cut
    short, and those axes' sizes: an axis whose output has one place keeps one (torch's
    antialiased kernels take another path for an output of one, so the cut copies it),
    any other two, mapped onto themselves (output size 2, no scale, no padding)."""
    names = [a.name for a in op._schema.arguments[1 : 1 + len(extra)]]
    scales = ["scales"] if d == 1 else ["scales_d", "scales_h", "scales_w"][3 - d :]
    sizes = [1] * d
    if "output_size" in names:
        out_size = extra[names.index("output_size")]
        sizes = [1 if o == 1 else 2 for o in out_size]
    args = []
    for name, value in zip(names, extra):
        if name == "output_size":
            value = tuple(v if k == j else sizes[k] for k, v in enumerate(value))
        elif name == "padding":  # pairs for the last axis first
            value = tuple(v if (d - 1 - i // 2) == j else 0 for i, v in enumerate(value))
        elif name in scales and scales.index(name) != j:
            value = None
        args.append(value)
    return tuple(args), tuple(sizes)


def _apply(x: FixedPrecisionTensor, mats: tuple[torch.Tensor, ...], exact: bool,
           transpose: bool) -> FixedPrecisionTensor:
    """``x`` times ``mats[j]`` (its transpose for the backward) along each of its last
    ``len(mats)`` axes."""
    d = len(mats)
    for j, a in enumerate(mats):
        axis = x.dim() - d + j
        m = a if transpose else a.t()  # right factor: inputs x outputs (forward)
        m = m.round().to(torch.int64) if exact else m  # float64: encoded at f bits
        moved = x.transpose(axis, -1) if axis != x.dim() - 1 else x
        y = matmul(moved, m)
        x = y.transpose(axis, -1) if axis != x.dim() - 1 else y
    return FPT(V.shape_op(child_of(x), "contiguous"), x.precision_bits, x.dtype)


@OPS.implements(*_FORWARD)
def _resample(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    extra = _hashable(tuple(args[1:]) + tuple(kwargs.values()))
    exact, dims = _FORWARD[func]
    spatial = tuple(x.shape[x.dim() - dims(extra):])
    return _apply(x, _axis_matrices(func, spatial, extra), exact, False)


@OPS.implements(*_BACKWARD)
def _resample_backward(func: Any, args: Any, kwargs: Any) -> Any:
    forward = _BACKWARD[func]
    grad, kw = args[0], tuple(kwargs.values())
    exact, dims = _FORWARD[forward]
    if forward in _ADAPTIVE:  # (grad, input): the output size is the gradient's
        x, d = args[1], _ADAPTIVE[forward]
        extra: tuple[Any, ...] = (tuple(grad.shape[grad.dim() - d:]),)
        spatial = tuple(x.shape[x.dim() - d:])
    elif isinstance(args[1], torch.Tensor):  # replication padding: (grad, input, padding)
        x, extra = args[1], _hashable(tuple(args[2:]) + kw)
        spatial = tuple(x.shape[x.dim() - dims(extra):])
    else:  # upsampling: (grad, output_size, input_size, *rest)
        extra = _hashable((args[1], *args[3:], *kw))
        spatial = tuple(args[2][2:])
    return _apply(grad, _axis_matrices(forward, spatial, extra), exact, True)


__all__: list[str] = []

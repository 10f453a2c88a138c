"""Audit veil.mpc against torch's own operator database (``op_db``, the OpInfo samples torch
tests itself with): every op, run on fixed-point (optionally secret-shared) tensors, must
either match float torch or raise. A mismatch is silent wrongness, the worst outcome.

Run (needs ``pip install expecttest``, which torch's test helpers import)::

    python tools/opinfo_audit.py            # forward, plaintext fixed point
    python tools/opinfo_audit.py --shared   # forward, shares among two simulated parties
    python tools/opinfo_audit.py --grad     # gradients too
    python tools/opinfo_audit.py --raises   # also list what raises, and why

It prints how many ops match, raise or mismatch, and each mismatch; the exit status is 1
when an op mismatches that is not in :data:`UNSPECIFIED` (random ops, uninitialised memory,
and tie orders torch leaves open). Sample inputs are clamped to [-4, 4]; approximations
outside their documented domains are reported as mismatches too, so read the rows.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

import veil
from veil.mpc import FixedPrecisionTensor

#: Ops whose results torch itself does not fix: random draws, uninitialised memory, and the
#: order of ties (topk and kthvalue pick among equal values as they like).
UNSPECIFIED = frozenset({
    "empty_like", "new_empty", "new_empty_strided", "nn.functional.dropout",
    "nn.functional.dropout2d", "nn.functional.dropout3d", "nn.functional.alpha_dropout",
    "nn.functional.feature_alpha_dropout", "nn.functional.multi_head_attention_forward",
    "kthvalue", "topk",
})
_SKIP_GRAD = ("dropout", "empty", "rand", "bernoulli", "normal", "uniform", "multinomial")


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def _tree(fn: Callable[[Any], Any], x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return type(x)(_tree(fn, v) for v in x)
    if isinstance(x, dict):
        return {k: _tree(fn, v) for k, v in x.items()}
    return fn(x)


def _leaves(x: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _tree(lambda v: out.append(v) if isinstance(v, torch.Tensor) and v.requires_grad else None, x)
    return out


def _clamped(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.layout == torch.strided:
        return v.detach().clamp(-4, 4).requires_grad_(v.requires_grad)
    return v


def _encoder(shared: bool) -> Callable[[Any], Any]:
    def encode(v: Any) -> Any:
        if not (isinstance(v, torch.Tensor) and v.dtype == torch.float32
                and v.layout == torch.strided and v.numel() < 5000):
            return v
        t = v.detach().fix_precision()
        if shared:
            t = t.share("p0", "p1", crypto_provider="dealer")
        return t.requires_grad_(v.requires_grad)

    return encode


def _decode(v: Any) -> Any:
    if isinstance(v, FixedPrecisionTensor):
        return (v.get() if v.is_shared else v).float_precision()
    return v


def _mismatch(got: Any, ref: torch.Tensor) -> str:
    """'' when ``got`` matches ``ref``, else what differs."""
    if type(got) is not torch.Tensor:
        return ""  # secret indices and the like
    if got.shape != ref.shape:
        return f"shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    if not ref.is_floating_point():
        return "" if torch.equal(got.to(ref.dtype), ref) else "integer or bool values differ"
    if ref.numel() == 0 or not torch.isfinite(ref).all():
        return ""
    err = float((got.double() - ref.double()).abs().max())
    bound = 1e-2 * (1 + float(ref.abs().max()))
    return "" if err <= bound else f"error {err:.3g} (largest |value| {float(ref.abs().max()):.3g})"


def _check_sample(op: Any, sample: Any, encode: Callable[[Any], Any], grad: bool) -> str:
    inp, args, kwargs = _clamped(sample.input), _tree(_clamped, sample.args), \
        _tree(_clamped, sample.kwargs)
    try:
        ref = op(inp, *args, **kwargs)
        refs = [r for r in (ref if isinstance(ref, (tuple, list)) else (ref,))
                if isinstance(r, torch.Tensor)]
        if grad:
            refs = [r for r in refs if r.requires_grad]
            if not refs:
                return ""
            plain_leaves = _leaves((inp, args, kwargs))
            ref_grads = torch.autograd.grad(sum(r.sum() for r in refs), plain_leaves,
                                            allow_unused=True)
    except Exception:
        return ""  # torch itself refuses this sample
    e_inp, e_args, e_kwargs = encode(inp), _tree(encode, args), _tree(encode, kwargs)
    got = op(e_inp, *e_args, **e_kwargs)
    gots = [g for g in (got if isinstance(got, (tuple, list)) else (got,))
            if isinstance(g, torch.Tensor)]
    if not grad:
        for g, r in zip(gots, refs):
            problem = _mismatch(_decode(g), r)
            if problem:
                return problem
        return ""
    gots = [g for g in gots if isinstance(g, FixedPrecisionTensor) and g.requires_grad]
    if len(gots) != len(refs):
        return ""
    total = gots[0].sum()
    for g in gots[1:]:
        total = total + g.sum()
    got_grads = torch.autograd.grad(total, _leaves((e_inp, e_args, e_kwargs)), allow_unused=True)
    for g, r in zip(got_grads, ref_grads):
        if g is not None and r is not None:
            problem = _mismatch(_decode(g), r)
            if problem:
                return "gradient " + problem
    return ""


def audit(shared: bool, grad: bool, per_op: int = 4, seconds: int = 10) -> dict[str, list[Any]]:
    """``{"match": [...], "raise": [...], "mismatch": [(name, variant, what), ...]}``."""
    from torch.testing._internal.common_methods_invocations import op_db

    encode = _encoder(shared)
    out: dict[str, list[Any]] = {"match": [], "raise": [], "mismatch": []}
    signal.signal(signal.SIGALRM, _alarm)
    for op in op_db:
        if torch.float32 not in op.supported_dtypes("cpu"):
            continue
        if grad and (not op.supports_autograd or any(k in op.name for k in _SKIP_GRAD)):
            continue
        try:
            samples = list(op.sample_inputs("cpu", torch.float32, requires_grad=grad))[:per_op]
        except Exception:  # an op whose samples torch cannot build here
            continue
        verdict, detail = "match", ""
        for sample in samples:
            x = sample.input
            if not isinstance(x, torch.Tensor) or x.layout != torch.strided \
                    or x.numel() == 0 or x.numel() > 2000:
                continue
            signal.alarm(seconds)
            try:
                problem = _check_sample(op, sample, encode, grad)
            except _Timeout:
                problem, verdict = "", "raise"
            except Exception as e:  # an error naming what is unsupported: fine
                problem = ""
                if verdict == "match":
                    verdict, detail = "raise", f"{type(e).__name__}: {str(e)[:100]}"
            finally:
                signal.alarm(0)
            if problem:
                verdict, detail = "mismatch", problem
                break
        out[verdict].append((op.name, op.variant_test_name, detail))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", action="store_true", help="secret-share the inputs")
    parser.add_argument("--grad", action="store_true", help="compare gradients too")
    parser.add_argument("--raises", action="store_true",
                        help="also list the ops that raise, with the start of their error")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    veil.mpc._methods.install()
    result = audit(args.shared, args.grad)
    print(f"match {len(result['match'])}, raise {len(result['raise'])}, "
          f"mismatch {len(result['mismatch'])}")
    if args.raises:
        for name, variant, what in result["raise"]:
            print(f"  raises: {name}{'.' + variant if variant else ''}: {what}")
    unexpected = 0
    for name, variant, what in result["mismatch"]:
        known = name in UNSPECIFIED
        unexpected += not known
        label = "unspecified by torch" if known else "MISMATCH"
        print(f"  {label}: {name}{'.' + variant if variant else ''}: {what}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())

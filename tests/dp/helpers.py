"""Per-example reference gradients, computed the slow obvious way."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from veil.dp import PerSampleGradients


def loop_grads(
    model: nn.Module, xs: tuple[Tensor, ...], loss_of: Callable[..., Tensor], batch_dim: int = 0
) -> dict[str, Tensor]:
    """Per-example gradients by running each example alone through a copy of ``model``."""
    ref = copy.deepcopy(model)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    batch = xs[0].shape[batch_dim]
    rows = []
    for i in range(batch):
        ref.zero_grad()
        sliced = tuple(x.narrow(batch_dim, i, 1) if x.dim() > batch_dim else x for x in xs)
        loss_of(ref, *sliced).backward()
        params = dict(ref.named_parameters())
        rows.append(
            {
                n: params[n].grad.clone()
                if params[n].grad is not None
                else torch.zeros_like(params[n])
                for n in names
            }
        )
    return {n: torch.stack([r[n] for r in rows]) for n in names}


def hooked_grads(
    model: nn.Module,
    xs: tuple[Tensor, ...],
    loss_of: Callable[..., Tensor],
    loss_reduction: str = "sum",
) -> tuple[dict[str, Tensor], Tensor, PerSampleGradients]:
    """veil's per-sample gradients and norms for one batch (hooks left on; caller removes)."""
    psg = PerSampleGradients(model, loss_reduction=loss_reduction)  # type: ignore[arg-type]
    loss_of(model, *xs).backward()
    return psg.grad_samples(), psg.norms(), psg


def assert_matches(
    model: nn.Module,
    xs: tuple[Tensor, ...],
    loss_of: Callable[..., Tensor],
    *,
    batch_dim: int = 0,
    atol: float = 1e-5,
    clip: float = 0.7,
) -> None:
    """Per-sample gradients, norms and the clipped sum agree with the per-example loop."""
    ref = loop_grads(model, xs, loss_of, batch_dim)
    got, norms, psg = hooked_grads(model, xs, loss_of)
    try:
        assert list(got) == list(ref)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=atol, rtol=1e-4, msg=name)
        batch = xs[0].shape[batch_dim]
        ref_norms = torch.sqrt(sum(g.reshape(batch, -1).square().sum(1) for g in ref.values()))
        torch.testing.assert_close(norms, ref_norms, atol=atol, rtol=1e-4)
        outs = [torch.zeros_like(p) for p in psg.params]
        psg.clipped_sum(clip, outs)
        factor = (clip / ref_norms).clamp(max=1.0)
        for out, name in zip(outs, psg.names):
            want = torch.tensordot(factor, ref[name], dims=1)
            torch.testing.assert_close(out, want, atol=atol, rtol=1e-4, msg=name)
    finally:
        psg.remove()


def projection_loss(out_shape_seed: int = 0) -> Callable[..., Tensor]:
    """A loss summing ``model(x) * r`` for a fixed random ``r`` (gradients of every kind)."""
    cache: dict[tuple[int, ...], Tensor] = {}

    def loss_of(model: nn.Module, x: Tensor) -> Tensor:
        out = model(x)
        if isinstance(out, tuple):
            out = out[0]
        key = tuple(out.shape[1:])
        if key not in cache:
            g = torch.Generator().manual_seed(out_shape_seed)
            cache[key] = torch.randn(key, generator=g)
        return (out * cache[key]).sum()

    return loss_of

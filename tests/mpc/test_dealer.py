"""The provider's material, row by row, against its definition (the dealer fills all the
rows of a request at once; each row must hold exactly what a protocol run expects)."""

from __future__ import annotations

import pytest
import torch

from veil.mpc import provider
from veil.mpc.encoding import wrap
from veil.mpc.provider import AND_LEVELS, beaver_layout, ring_product, sign_layout

from .helpers import dealer_values

CASES = [
    ("mul", (3, 4), (3, 4), ()),
    ("mul", (3, 4), (4,), ()),
    ("mul", (), (2, 5), ()),
    ("mul", (2, 1, 3), (4, 1), ()),
    ("matmul", (3, 4), (4, 2), ()),
    ("matmul", (4, 3), (4, 2), (True, False)),
    ("matmul", (3, 4), (2, 4), (False, True)),
    ("matmul", (4,), (4, 2), ()),
    ("matmul", (2, 3, 4), (4, 5), ()),
    ("conv2d", (1, 2, 5, 5), (3, 2, 3, 3), (1, 0, 1, 1)),
]


@pytest.mark.parametrize(("kind", "sx", "sy", "params"), CASES)
@pytest.mark.parametrize("trunc", [0, 16])
def test_every_row_is_a_beaver_triple(kind, sx, sy, params, trunc):
    lay = beaver_layout(kind, sx, sy, params, trunc)
    bundles = provider.deal_beaver(kind, sx, sy, params, trunc, 3, 4)
    for row in dealer_values(bundles, lay.arith_len):
        p = lay.unpack(row)
        assert torch.equal(p["c"], ring_product(kind, p["a"], p["b"], params))
        if trunc:
            assert torch.equal(p["r_hi"], (p["r"] >> trunc) & wrap((1 << (64 - trunc)) - 1))
            assert torch.equal(p["msb"], (p["r"] >> 63) & 1)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("numel", [1, 31, 33, 100, provider.FUSED_MAX + 1])
def test_every_row_is_comparison_material(numel, relu):
    lay = sign_layout(numel, relu)
    fuse = provider.fused(numel)
    assert fuse == (numel <= provider.FUSED_MAX)
    for row in dealer_values(provider.deal_sign(numel, relu, 2, 3), lay.arith_len):
        p = lay.unpack(row)
        r = p["r"]
        assert torch.equal(p["R"], (r >> 62) & 3) and torch.equal(p["msb"], (r >> 63) & 1)
        bits = ("ga", "gb", "gg") if fuse else ("rho_a",)
        for name in bits:
            assert set(p[name].tolist()) <= {0, 1}
        if fuse:
            assert torch.equal(p["gab"], p["ga"] * p["gb"])
            bits += ("gab",)
        if relu:
            for name in ("R", "msb", *bits):
                assert torch.equal(p[provider.alpha_name(name)], p["alpha"] * p[name])
        rp = p["rp"]
        assert torch.equal(rp[:numel], r & ((1 << 62) - 1)) and int((rp >> 62).abs().sum()) == 0
        assert torch.equal(p["m"], rp & (rp >> 1))
        for level in range(1, AND_LEVELS if fuse else AND_LEVELS + 1):
            assert torch.equal(p[f"c{level}"], p[f"b{level}"] & p[f"a{level}"])
        packed = (("ga", "la"), ("gb", "lb"), ("gg", "lg")) if fuse else (("rho_a", "rho_x"),)
        for src, dst in packed:
            lanes = torch.zeros(provider.packed_len(numel), dtype=torch.int64)
            lanes[:numel] = p[src]
            assert torch.equal(p[dst], provider.pack_bits(lanes))

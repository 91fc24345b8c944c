"""The matmul formulations agree, the plan picks among them, fused layers keep HF modules intact."""

import pytest
import torch
import torch.nn.functional as F

from workers.gemm import (
    PRODUCTS,
    Gemm,
    GemmPlan,
    onednn_available,
    pack,
    packable,
    packed_product,
    packed_threshold,
)
from workers.runner import _fuse

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def test_every_product_equals_linear():
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    for rows in (1, 2, 5):
        x = torch.randn(rows, 24)
        for name, product in PRODUCTS.items():
            if name == "pad_to_even" and rows % 2 == 0:
                continue
            out = product(x, w)
            assert out.shape == (rows, 40) and out.is_contiguous(), name
            torch.testing.assert_close(out, x @ w.t(), msg=name)


def test_plan_measures_once_per_shape_and_rows():
    plan = GemmPlan(tune=True, max_rows=4)
    a, b = torch.randn(16, 8), torch.randn(16, 8)
    with torch.inference_mode():
        first = plan.product(a, 2)
        assert plan.product(b, 2) is first  # same shape: shared choice
        assert first in PRODUCTS.values()
        assert plan.product(a, 5) is PRODUCTS["linear"]  # beyond max_rows
    assert len(plan._choice) == 1
    assert GemmPlan(tune=False).product(a, 2) is PRODUCTS["linear"]


def test_gemm_adds_bias_and_keeps_autograd():
    w, bias = torch.randn(6, 4), torch.randn(6)
    x = torch.randn(3, 4, requires_grad=True)
    out = Gemm(w, bias, GemmPlan(tune=True))(x)  # grad enabled: plain linear
    torch.testing.assert_close(out, x @ w.t() + bias)
    out.sum().backward()
    assert x.grad is not None


def test_fuse_keeps_module_weights_as_views():
    q, k = torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(8, 2, bias=True)
    before_q, before_k, before_kb = q.weight.detach().clone(), k.weight.detach().clone(), \
        k.bias.detach().clone()
    x = torch.randn(3, 8)
    fused = _fuse((q, k), GemmPlan(tune=False))
    assert fused.weight.shape == (8, 8)
    assert q.weight.data_ptr() == fused.weight.data_ptr()  # no copy kept
    torch.testing.assert_close(q.weight, before_q)
    torch.testing.assert_close(k.weight, before_k)
    out_q, out_k = fused(x).split([6, 2], dim=-1)
    torch.testing.assert_close(out_q, x @ before_q.t())
    torch.testing.assert_close(out_k, x @ before_k.t() + before_kb)
    torch.testing.assert_close(q(x), out_q)


@needs_onednn
def test_packed_product_equals_linear_with_bias():
    torch.manual_seed(0)
    w, bias = torch.randn(40, 24), torch.randn(40)
    packed = pack(w)
    for rows in (1, 3, 8, 17):
        x = torch.randn(rows, 24)
        torch.testing.assert_close(packed_product(x, packed, bias), x @ w.t() + bias)
        # a column slice (not contiguous) is accepted
        wide = torch.randn(rows, 48)
        torch.testing.assert_close(packed_product(wide[:, :24], packed), wide[:, :24] @ w.t())


@needs_onednn
def test_bfloat16_packs_where_onednn_has_kernels_for_it():
    """float32 always packs with oneDNN; bfloat16 where the CPU has oneDNN's bf16 kernels (AVX-512
    BW/VL/DQ or AVX-NE-CONVERT), and there the packed product is F.linear's, to bf16 rounding."""
    assert packable(torch.float32) and not packable(torch.float16)
    plan = GemmPlan(tune=True, max_rows=4)
    w = torch.randn(64, 32).bfloat16()
    gemm = Gemm(w, None, plan)
    plan.warm([gemm], range(1, 3))
    assert (gemm.packed is not None) == packable(torch.bfloat16)
    if gemm.packed is None:
        pytest.skip("no oneDNN bf16 kernels for this CPU: bf16 weights stay unpacked")
    with torch.inference_mode():
        plan.packed_from = 1
        for rows in (1, 2, 7, 16):
            x = torch.randn(rows, 32).bfloat16()
            torch.testing.assert_close(gemm(x).float(), F.linear(x, w).float(),
                                       rtol=2e-2, atol=2e-2)


@needs_onednn
def test_plan_packs_and_uses_packs_from_its_threshold_only(monkeypatch):
    plan = GemmPlan(tune=True, max_rows=8)
    w, bias = torch.randn(16, 8), torch.randn(16)
    gemm, other = Gemm(w, bias, plan), Gemm(torch.randn(16, 8).double(), None, plan)
    plan.warm([gemm, other], range(1, 3))
    assert gemm.packed is not None and other.packed is None  # float32 (and bf16), not float64
    assert plan.packed_bytes() == w.numel() * 4
    calls = []
    real = packed_product

    def spy(x, packed, b=None):
        calls.append(x.shape[0])
        return real(x, packed, b)

    monkeypatch.setattr("workers.gemm.packed_product", spy)
    with torch.inference_mode():
        plan.packed_from = 4
        for rows in (1, 3, 4, 9):
            x = torch.randn(rows, 8)
            torch.testing.assert_close(gemm(x), x @ w.t() + bias)
    assert calls == [4, 9]
    x = torch.randn(5, 8, requires_grad=True)
    out = gemm(x)  # autograd: the plain weight, never the pack
    out.sum().backward()
    assert calls == [4, 9] and x.grad is not None
    plan.drop_packed()
    assert gemm.packed is None and plan.packed_from is None and plan.packed_bytes() == 0
    assert not plan.allow_packed


def test_untuned_or_opted_out_plans_never_pack():
    for plan in (GemmPlan(tune=False), GemmPlan(tune=True, allow_packed=False)):
        gemm = Gemm(torch.randn(16, 8), None, plan)
        plan.warm([gemm], range(1, 3))
        assert gemm.packed is None and not plan.allow_packed and plan.packed_bytes() == 0


def test_packed_threshold_is_the_best_single_split():
    counts = (1, 2, 4, 8, 16, 64)
    # Packs win everywhere but lose narrowly at 64 (noise): kept from 1, not dropped.
    assert packed_threshold(counts, (1.6, 1.5, 1.4, 1.3, 1.2, 0.98)) == 1
    # Packs lose at few rows and win from 8: from 8.
    assert packed_threshold(counts, (0.9, 0.9, 0.95, 1.3, 1.4, 1.5)) == 8
    # A lone noisy win at 1 row does not switch packs on where they lose after it.
    assert packed_threshold(counts, (1.02, 0.9, 0.9, 1.3, 1.4, 1.5)) == 8
    # A loss in the middle that the wins above it outweigh is absorbed into the split.
    assert packed_threshold(counts, (0.8, 1.3, 0.97, 1.3, 1.4, 1.5)) == 2
    # Nowhere a gain: None (the caller drops the packs); unsorted counts are handled.
    assert packed_threshold(counts, (0.9, 0.95, 0.99, 0.9, 0.8, 0.7)) is None
    assert packed_threshold((16, 1, 4), (1.5, 0.8, 1.2)) == 4
    with pytest.raises(ValueError):
        packed_threshold(counts, (1.0,))

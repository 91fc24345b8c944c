"""Skinny matrix products for decoding: the fastest of equivalent formulations, chosen by timing.

Decoding multiplies a few rows (one token, a draft tree, mask rows) by each weight matrix. CPU
BLAS libraries take very different code paths for such products: on an AVX2 EPYC with MKL, the
49152-row output layer costs 8 ms for one row as ``x @ W.T`` but 4.7 ms for two rows as
``W @ x.T``, and 8 rows cost 2.3x one row as ``x @ W.T`` but 1.5x as ``W @ x.T``. ``Gemm`` times
each formulation once per (weight shape, row count) when the model loads and uses the fastest; all
give the same product up to float rounding. A formulation is timed over every weight of that shape
in turn, as a forward streams them from memory: timing one cache-resident matrix favours other
formulations than the ones that win in a real forward. On CUDA it is plain ``F.linear``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (x [M, in], W [out, in]) -> [M, out]
Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _weight_first(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w @ x.t()).t().contiguous()


def _pad_to_even(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``W @ x.T`` with a zero row appended (for odd row counts: even ones take faster paths)."""
    padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
    return (w @ padded.t())[:, : x.shape[0]].t().contiguous()


PRODUCTS: dict[str, Product] = {"linear": _linear, "weight_first": _weight_first,
                                "pad_to_even": _pad_to_even}


class GemmPlan:
    """Which product to use per (weight shape, rows); measured lazily, shared by equal shapes."""

    def __init__(self, tune: bool, max_rows: int = 64, repeats: int = 2):
        self.tune, self.max_rows, self.repeats = tune, max_rows, repeats
        self._choice: dict[tuple[tuple[int, int], int], Product] = {}
        self._same_shape: dict[tuple[int, int], list[torch.Tensor]] = {}

    def product(self, weight: torch.Tensor, rows: int) -> Product:
        if not self.tune or rows > self.max_rows or torch.is_grad_enabled():
            return _linear
        key = (tuple(weight.shape), rows)
        choice = self._choice.get(key)
        if choice is None:
            choice = self._choice[key] = self._fastest(weight, rows)
        return choice

    def _fastest(self, weight: torch.Tensor, rows: int) -> Product:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
        weights = self._same_shape.get(tuple(weight.shape), [weight])
        names = [n for n in PRODUCTS if rows % 2 or n != "pad_to_even"]
        best: dict[str, float] = dict.fromkeys(names, float("inf"))
        for _ in range(self.repeats):
            for name in names:
                started = time.perf_counter()
                for w in weights:
                    PRODUCTS[name](x, w)
                best[name] = min(best[name], time.perf_counter() - started)
        return PRODUCTS[min(best, key=best.get)]

    def warm(self, weights: list[torch.Tensor], rows: range) -> None:
        """Register ``weights`` (timed together by shape) and measure each shape for each row
        count now, not mid-request."""
        for w in weights:
            self._same_shape.setdefault(tuple(w.shape), []).append(w)
        with torch.inference_mode():
            for weight in {tuple(w.shape): w for w in weights}.values():
                for count in rows:
                    self.product(weight, count)


class Gemm:
    """``x [M, in] -> x @ W.T + b [M, out]`` through the plan's fastest product for M rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: GemmPlan):
        self.weight, self.bias, self.plan = weight, bias, plan

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.plan.product(self.weight, x.shape[0])(x, self.weight)
        return out if self.bias is None else out + self.bias

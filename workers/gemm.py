"""Skinny matrix products for decoding: the fastest of equivalent formulations, chosen by timing.

Decoding multiplies a few rows (one token, a draft tree, mask rows) by each weight matrix. CPU
BLAS libraries take very different code paths for such products: on an AVX2 EPYC with MKL, the
49152-row output layer costs 8 ms for one row as ``x @ W.T`` but 4.7 ms for two rows as
``W @ x.T``, and 8 rows cost 2.3x one row as ``x @ W.T`` but 1.5x as ``W @ x.T``.

Two families of formulations:

- **MKL, per row count**: the fastest of ``x @ W.T``, ``W @ x.T`` and ``W @ x.T`` padded to an
  even row count, timed per (weight shape, row count) when the model loads, over every weight of
  that shape in turn, as a forward streams them from memory (timing one cache-resident matrix
  favours other formulations than the ones that win in a real forward).
- **oneDNN, prepacked**: each float32 weight (and bfloat16 weight, where oneDNN has bf16 kernels
  for the CPU: AVX-512 BW/VL/DQ or AVX-NE-CONVERT) reordered once into oneDNN's blocked layout (a
  second copy of the weights on CPU) and multiplied by ``mkldnn._linear_pointwise``. In a whole
  float32 forward of the bundled model on the AVX2 EPYC it is about 10% slower than MKL at 1-4
  rows (both then stream the weights at close to the memory bandwidth) but 1.1-1.5x faster at
  8-16 rows, the size of a verify forward over a draft tree. For bfloat16 on an AVX-512 EPYC a
  packed product is 2-3x faster than ``F.linear`` at every row count from 1 to 16 (which
  reorders the weight on every call), with the same result.

From which row count the packed family is used is measured on whole forwards by the model runner
(``ModelRunner.tune_packed``), as timing products one by one misjudges it; the plan only holds the
answer. Under autograd (adapter training) and on CUDA every product is plain ``F.linear``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

# (x [M, in], W [out, in]) -> [M, out]
Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PACK_ROWS_HINT = 16  # the batch-size hint oneDNN's reorder takes (the figures above used 16)


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


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_reorder_linear_weight")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` reordered for ``packed_product`` (a copy in oneDNN's layout)."""
    with torch.inference_mode():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def packed_product(x: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
_packable: dict[torch.dtype, bool] = {}


def packable(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and multiplies CPU weights of ``dtype`` here: float32 wherever oneDNN
    is; bfloat16 only on CPUs it has bf16 kernels for, found out once by trying (elsewhere the
    reorder refuses)."""
    if dtype not in PACKABLE_DTYPES or not onednn_available():
        return False
    if dtype not in _packable:
        generator = torch.Generator().manual_seed(0)
        w = torch.randn(32, 64, generator=generator).to(dtype)
        x = torch.randn(3, 64, generator=generator).to(dtype)
        try:
            _packable[dtype] = torch.allclose(packed_product(x, pack(w)).float(),
                                              F.linear(x, w).float(), rtol=2e-2, atol=2e-2)
        except RuntimeError:
            _packable[dtype] = False
    return _packable[dtype]


def packed_threshold(counts: Sequence[int], speedups: Sequence[float]) -> int | None:
    """The row count from which packed weights should be used, given each count's measured
    speedup of packed over unpacked forwards (time unpacked / time packed): the split that
    maximises the summed log-speedup of the counts at or above it, or None where no split gains.

    A best single split rather than the smallest count from which packs won every time: one noisy
    loss at a large count must not throw away packs that win by 10-60% everywhere else, and one
    noisy win at a small count must not switch packs on for counts where they lose.
    """
    if len(counts) != len(speedups):
        raise ValueError("one speedup per row count")
    order = sorted(range(len(counts)), key=lambda i: counts[i])
    best, best_gain, gain = None, 0.0, 0.0
    for i in reversed(order):
        gain += math.log(speedups[i])
        if gain > best_gain:
            best, best_gain = counts[i], gain
    return best


def _kind(weight: torch.Tensor) -> tuple:
    """Weights of one kind share a measured choice."""
    return tuple(weight.shape), weight.dtype, weight.device.type


class GemmPlan:
    """Which product to use: the MKL formulation per (weight shape, row count), measured lazily or
    by ``warm`` and shared by equal kinds, and the row count from which packed weights are used."""

    def __init__(self, tune: bool, max_rows: int = 64, repeats: int = 2,
                 allow_packed: bool = True):
        self.tune, self.max_rows, self.repeats = tune, max_rows, repeats
        self.allow_packed = allow_packed and tune and onednn_available()
        self.packed_from: int | None = None  # products of this many rows or more use packs
        self._choice: dict[tuple[tuple, int], Product] = {}
        self._same_shape: dict[tuple, list[torch.Tensor]] = {}  # by _kind
        self._packed: list[Gemm] = []

    def product(self, weight: torch.Tensor, rows: int) -> Product:
        """The MKL formulation for ``rows`` rows of ``weight``'s shape."""
        if not self.tune or rows > self.max_rows or torch.is_grad_enabled():
            return _linear
        key = (_kind(weight), rows)
        choice = self._choice.get(key)
        if choice is None:
            choice = self._choice[key] = self._fastest(weight, rows)
        return choice

    def uses_packed(self, rows: int) -> bool:
        return self.packed_from is not None and rows >= self.packed_from

    def _fastest(self, weight: torch.Tensor, rows: int) -> Product:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
        weights = self._same_shape.get(_kind(weight), [weight])
        names = [n for n in PRODUCTS if rows % 2 or n != "pad_to_even"]
        best: dict[str, float] = dict.fromkeys(names, float("inf"))
        for _ in range(self.repeats):
            for name in names:
                started = time.perf_counter()
                for w in weights:
                    PRODUCTS[name](x, w)
                best[name] = min(best[name], time.perf_counter() - started)
        return PRODUCTS[min(best, key=best.get)]

    def warm(self, gemms: Iterable[Gemm], rows: range) -> None:
        """Register ``gemms`` (timed together by shape), measure the MKL choice of each shape for
        each row count now, not mid-request, and pack their weights if the plan may."""
        gemms = list(gemms)
        for g in gemms:
            self._same_shape.setdefault(_kind(g.weight), []).append(g.weight)
        with torch.inference_mode():
            for weight in {_kind(g.weight): g.weight for g in gemms}.values():
                for count in rows:
                    self.product(weight, count)
        for g in gemms:
            if (self.allow_packed and g.packed is None and g.weight.device.type == "cpu"
                    and packable(g.weight.dtype)):
                g.packed = pack(g.weight)
                self._packed.append(g)

    def packed_bytes(self) -> int:
        return sum(g.weight.numel() * g.weight.element_size() for g in self._packed)

    def drop_packed(self) -> None:
        """Free the packed copies (no row count gained from them)."""
        for g in self._packed:
            g.packed = None
        self._packed.clear()
        self.allow_packed = False
        self.packed_from = None


class Gemm:
    """``x [M, in] -> x @ W.T + b [M, out]`` through the plan's product for M rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: GemmPlan):
        self.weight, self.bias, self.plan = weight, bias, plan
        self.packed: torch.Tensor | None = None  # oneDNN copy of weight, set by plan.warm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if (self.packed is not None and self.plan.uses_packed(rows)
                and not torch.is_grad_enabled()):
            return packed_product(x, self.packed, self.bias)
        out = self.plan.product(self.weight, rows)(x, self.weight)
        return out if self.bias is None else out + self.bias

"""Model runner: one forward over a Hugging Face Llama-family model's own modules.

Every use (prefill, plain decode, draft passes with layers skipped, tree verification) goes through
``ModelRunner.forward(tokens, positions, attention, layers)`` against a preallocated,
position-addressed ``KVCache``. Rolling back after a rejection is moving ``KVCache.length``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from workers.gemm import Gemm, GemmPlan, packed_threshold

log = logging.getLogger(__name__)


@dataclass
class Attention:
    """Which cache slots each new token attends to.

    New tokens are written at slots ``start .. start+T-1``. Slots ``< prefix_len`` are visible to
    every new token. ``local`` (bool ``[T, start + T - prefix_len]``) says which of the remaining
    slots each new token sees; ``None`` means causal (each token sees every earlier slot and
    itself).
    """

    start: int
    prefix_len: int
    local: torch.Tensor | None = None  # [T, start + T - prefix_len] bool

    @staticmethod
    def causal(start: int) -> Attention:
        return Attention(start=start, prefix_len=start)

    def mask(self, num_new: int, device) -> torch.Tensor | None:
        end = self.start + num_new
        if self.local is None:
            if num_new == 1:
                return None
            mask = torch.ones(num_new, end, dtype=torch.bool, device=device)
            square = torch.ones(num_new, num_new, dtype=torch.bool, device=device)
            mask[:, self.start:] = square.tril()
            return mask
        mask = torch.ones(num_new, end, dtype=torch.bool, device=device)
        mask[:, self.prefix_len:] = self.local.to(device)
        return mask


class KVCache:
    """Per-layer key/value tensors ``[1, kv_heads, capacity, head_dim]``, addressed by slot."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (1, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0  # committed slots

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: slot {end} > capacity {self.capacity}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v

    def compact(self, src_slots: Sequence[int], dst_start: int) -> None:
        """Copy the listed slots, in order, down to ``dst_start..`` in every layer."""
        if not src_slots:
            return
        if list(src_slots) == list(range(dst_start, dst_start + len(src_slots))):
            return
        device = self.k[0].device
        src = torch.as_tensor(list(src_slots), dtype=torch.long, device=device)
        dst = slice(dst_start, dst_start + len(src_slots))
        for cache in (*self.k, *self.v):
            cache[:, :, dst] = cache.index_select(2, src)

    def truncate(self, length: int) -> None:
        self.length = length


class ModelRunner:
    """Runs the decoder layers of a loaded HF causal LM with our own attention and KV cache."""

    def __init__(self, hf_model: torch.nn.Module, packed_weights: bool = True):
        """``packed_weights``: on CPU, keep a oneDNN-packed copy of the weights (float32, or
        bfloat16 where oneDNN has bf16 kernels for the CPU) for the row counts it is measured
        faster at (see workers/gemm.py); False saves that memory."""
        self.hf = hf_model
        inner = hf_model.model
        self.config = hf_model.config
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = hf_model.lm_head
        self.rotary = inner.rotary_emb
        self.num_layers = len(self.layers)
        attn0 = self.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.num_heads = self.config.num_attention_heads
        self.kv_heads = self.config.num_key_value_heads
        self.scaling = attn0.scaling
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.vocab_size = self.lm_head.out_features
        self.all_layers = tuple(range(self.num_layers))
        self.gemm_plan = GemmPlan(tune=self.device.type == "cpu", allow_packed=packed_weights)
        self.matmuls = [_LayerMatmuls(layer, self.gemm_plan) for layer in self.layers]
        self._norms = [(fused_rms_norm(layer.input_layernorm),
                        fused_rms_norm(layer.post_attention_layernorm)) for layer in self.layers]
        self._final_norm = fused_rms_norm(self.norm)
        head = self.lm_head
        self._head = (Gemm(head.weight, head.bias, self.gemm_plan)
                      if type(head) is torch.nn.Linear and head.weight.is_floating_point()
                      else head)
        self._draft_heads: dict[int, Gemm] = {}  # views of the head's first rows, by size
        self.gemm_plan.warm([g for mm in self.matmuls for g in mm.gemms()], range(1, 17))
        if isinstance(self._head, Gemm):
            self.gemm_plan.warm([self._head], range(1, 9))
        self._cos = self._sin = None
        self._rope_len = 0
        self.num_forwards = 0  # model passes run (any rows, any layers): a step's cost in passes
        self.upcast_single_row = False  # one-row attention through float32: see tune_attention
        self.tune_attention()
        self.tune_packed()

    def tune_attention(self, context: int = 512, repeats: int = 20) -> None:
        """On CPU in bfloat16, whether one query row (a plain decoding step) attends faster
        through float32: on some CPUs bf16 attention over a single row takes a slow kernel (on an
        AMD EPYC with avx512_bf16, 190 us a layer against 55 us through float32 after 300
        tokens), on others it is the faster one (2.4-3.5x on an Intel Xeon with AMX, where the
        conversions cost more than the attention). Decided from timed calls on this machine."""
        if self.device.type != "cpu" or self.dtype != torch.bfloat16:
            return
        q = torch.randn(1, self.num_heads, 1, self.head_dim, dtype=self.dtype)
        k = torch.randn(1, self.kv_heads, context, self.head_dim, dtype=self.dtype)
        v = torch.randn_like(k)

        best = {False: float("inf"), True: float("inf")}
        with torch.inference_mode():
            for attempt in range(repeats + 1):  # the first round sets kernels up: untimed
                for upcast in best:
                    started = time.perf_counter()
                    self._attend(q, k, v, None, upcast)
                    if attempt:
                        best[upcast] = min(best[upcast], time.perf_counter() - started)
        self.upcast_single_row = best[True] < best[False]
        log.info("one-row attention over %d slots: bf16 %.0f us, through float32 %.0f us: %s",
                 context, best[False] * 1e6, best[True] * 1e6,
                 "float32" if self.upcast_single_row else "bf16")

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None, upcast: bool) -> torch.Tensor:
        """Attention of ``q`` over ``keys``/``values`` (through float32 when ``upcast``), in
        ``q``'s dtype: what ``hidden_states`` runs and ``tune_attention`` times."""
        dtype = q.dtype
        if upcast:
            q, keys, values = q.float(), keys.float(), values.float()
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True,
        ).to(dtype)

    def tune_packed(self, counts: Sequence[int] = (1, 2, 4, 6, 8, 12, 16, 64), repeats: int = 3,
                    layers: int = 10) -> None:
        """Decide from timed forwards after a short context from which row count on the plan's
        packed weights are used (``packed_threshold`` over each count's speedup); free the copies
        if no row count gains from them. The forwards run the first ``layers`` decoder layers and
        the output layer, the two families alternating, least time of ``repeats`` each."""
        plan = self.gemm_plan
        if not plan.packed_bytes():
            return
        context, run = 32, self.all_layers[:layers]
        cache = self.new_cache(context + max(counts))
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.vocab_size, (context + max(counts),), generator=generator)
        self.forward(cache, tokens[:context], torch.arange(context), Attention.causal(0), run,
                     logits_rows=slice(-1, None))

        def packed_speedup(count: int) -> float:
            new, positions = tokens[context:context + count], torch.arange(context,
                                                                           context + count)
            best = {None: float("inf"), 1: float("inf")}
            for attempt in range(repeats + 1):  # the first round sets kernels up: untimed
                for packed_from in best:
                    plan.packed_from = packed_from
                    started = time.perf_counter()
                    self.forward(cache, new, positions, Attention.causal(context), run)
                    if attempt:
                        best[packed_from] = min(best[packed_from],
                                                time.perf_counter() - started)
            return best[None] / best[1]

        speedups = [packed_speedup(count) for count in counts]
        plan.packed_from = packed_threshold(counts, speedups)
        measured = ", ".join(f"{c}: {s:.2f}x" for c, s in zip(counts, speedups))
        if plan.packed_from is None:
            plan.drop_packed()
            log.info("packed weights gained at no row count (%s): dropped", measured)
            return
        log.info("packed weights (%.0f MB) used from %d rows (speedups %s)",
                 plan.packed_bytes() / 2**20, plan.packed_from, measured)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.num_layers, self.kv_heads, self.head_dim, capacity, self.dtype,
                       self.device)

    def _rope(self, positions: torch.Tensor, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at ``positions``; ``needed``: the table's length they require."""
        if needed > self._rope_len:
            length = max(needed, 2 * self._rope_len, 1024)
            ids = torch.arange(length, device=self.device)[None]
            dummy = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = self.rotary(dummy, ids)
            self._cos, self._sin, self._rope_len = cos[0], sin[0], length
        return self._cos[positions], self._sin[positions]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                attention: Attention, layers: Sequence[int] | None = None,
                logits_rows: torch.Tensor | slice | None = None,
                draft: DraftRows | None = None, vocab: int = 0) -> torch.Tensor:
        """Run ``tokens`` ``[T]`` at ``positions`` ``[T]`` through ``layers`` (default: all).

        Writes K/V of the run layers at slots ``attention.start..`` and returns logits
        ``[T', V]`` in float32 for ``logits_rows`` (default: every row); see ``logits``.
        """
        hidden = self.hidden_states(cache, tokens, positions, attention, layers, draft)
        if logits_rows is not None:
            hidden = hidden[logits_rows]
        return self.logits(hidden, vocab)

    def logits(self, hidden: torch.Tensor, vocab: int = 0) -> torch.Tensor:
        """Float32 logits ``[T, V]`` for final hidden states ``[T, hidden]``: over the whole
        vocabulary, or (drafts) over token ids ``< vocab`` only when ``0 < vocab < V``."""
        head = self._head
        if 0 < vocab < self.vocab_size and isinstance(head, Gemm):
            head = self._draft_heads.get(vocab)
            if head is None:
                bias = None if self._head.bias is None else self._head.bias[:vocab]
                head = self._draft_heads[vocab] = Gemm(self._head.weight[:vocab], bias,
                                                       self.gemm_plan)
                self.gemm_plan.warm([head], range(1, 9))
        return head(self._final_norm(hidden)).float()

    def hidden_states(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                      attention: Attention, layers: Sequence[int] | None = None,
                      draft: DraftRows | None = None) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` (before the final norm); see ``forward``.

        With ``draft``, rows from ``draft.start`` on are draft rows: tokens equal to ``MASK_ID``
        take the adapter's mask embedding, and the adapter's low-rank deltas are added to the
        projections of those rows only, so every other row's output is exactly the base model's.
        """
        self.num_forwards += 1
        tokens = tokens.to(self.device)
        # Read before the move: int() of a tensor on a GPU waits for the device, every forward.
        rope_len = int(positions.max()) + 1
        positions = positions.to(self.device)
        num_new = tokens.shape[0]
        start = attention.start
        end = start + num_new
        mask = attention.mask(num_new, self.device)
        cos, sin = self._rope(positions, rope_len)
        cos, sin = cos[None, None], sin[None, None]
        hidden = self.embed(tokens.clamp(min=0))
        if draft is not None:
            hidden = draft.adapter.embed_masks(hidden, tokens)
        upcast = num_new == 1 and self.upcast_single_row  # see tune_attention
        qk_width = (self.num_heads + self.kv_heads) * self.head_dim
        for idx in (self.all_layers if layers is None else layers):
            layer, mm = self.layers[idx], self.matmuls[idx]
            x = self._norms[idx][0](hidden)
            qkv = _with_draft(draft, idx, mm.qkv_group, x, mm.qkv(x))
            # q and k side by side are rotated as one tensor of heads (one set of products for
            # both; the same arithmetic element by element).
            qk = qkv[:, :qk_width].view(1, num_new, self.num_heads + self.kv_heads,
                                        self.head_dim)
            qk = self._rotate(qk.transpose(1, 2), cos, sin)
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
            v = qkv[:, qk_width:].view(1, num_new, self.kv_heads, self.head_dim)
            v = v.transpose(1, 2)
            cache.write(idx, start, k, v)
            keys, values = cache.k[idx][:, :, :end], cache.v[idx][:, :, :end]
            out = self._attend(q, keys, values, mask, upcast)
            out = out.transpose(1, 2).reshape(num_new, -1)
            hidden = hidden + _with_draft(draft, idx, mm.o_group, out, mm.o(out))
            x = self._norms[idx][1](hidden)
            gate_up = _with_draft(draft, idx, mm.gate_up_group, x, mm.gate_up(x))
            gate, up = gate_up.split(mm.gate_up_group.sizes, dim=-1)
            inner = layer.mlp.act_fn(gate) * up
            hidden = hidden + _with_draft(draft, idx, mm.down_group, inner, mm.down(inner))
        return hidden


MASK_ID = -1  # token id of a mask row (S3D); embedded by the draft adapter


@dataclass
class DraftRows:
    """Rows ``start..`` of a forward are draft rows, shaped by ``adapter`` (see hidden_states)."""

    start: int
    adapter: DraftAdapter


@dataclass(frozen=True)
class Projections:
    """Projections of one input whose outputs a layer computes side by side in one product
    (``names``, with ``sizes`` output features each, in that order along the last dim)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]


class DraftAdapter(Protocol):
    def embed_masks(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...

    def adjust(self, layer: int, group: Projections, x: torch.Tensor, out: torch.Tensor,
               start: int) -> torch.Tensor:
        """``out`` (``group``'s projections of ``x``, side by side) with the adapter's deltas
        added to rows ``start..``; the rows before ``start`` untouched."""
        ...


def fused_rms_norm(module: torch.nn.Module):
    """``module`` as a callable; a ``LlamaRMSNorm`` as torch's fused RMS norm (one kernel for
    its six element-wise steps), with the same result bit for bit: the normalisation in float32,
    then the weight applied in the input's dtype. Other norms are returned as they are."""
    if type(module) is not LlamaRMSNorm:
        return module
    weight, eps = module.weight, module.variance_epsilon
    shape = (weight.shape[0],)

    def norm(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dtype == torch.float32:
            return F.rms_norm(hidden, shape, weight, eps)
        return weight * F.rms_norm(hidden.float(), shape, None, eps).to(hidden.dtype)

    return norm


def _with_draft(draft: DraftRows | None, layer: int, group: Projections, x: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
    """``out`` (``group``'s projections of ``x``) with the draft adapter's deltas on the draft
    rows, if the forward has any."""
    return out if draft is None else draft.adapter.adjust(layer, group, x, out, draft.start)


class _LayerMatmuls:
    """A decoder layer's projections: fused ``qkv`` and ``gate_up`` products over plain float
    linears (the HF modules' weights become views into the fused tensors, so nothing is copied),
    else each HF module called as is (quantized layers)."""

    def __init__(self, layer: torch.nn.Module, plan: GemmPlan):
        attn, mlp = layer.self_attn, layer.mlp
        self._qkv_modules = (attn.q_proj, attn.k_proj, attn.v_proj)
        self._gate_up_modules = (mlp.gate_proj, mlp.up_proj)
        self._fused = all(type(m) is torch.nn.Linear and m.weight.is_floating_point()
                          for m in (*self._qkv_modules, *self._gate_up_modules, attn.o_proj,
                                    mlp.down_proj))
        if self._fused:
            self._qkv = _fuse(self._qkv_modules, plan)
            self._gate_up = _fuse(self._gate_up_modules, plan)
            self.o = Gemm(attn.o_proj.weight, attn.o_proj.bias, plan)
            self.down = Gemm(mlp.down_proj.weight, mlp.down_proj.bias, plan)
        else:
            self.o, self.down = attn.o_proj, mlp.down_proj
        self.qkv_group = Projections(("q_proj", "k_proj", "v_proj"),
                                     tuple(m.out_features for m in self._qkv_modules))
        self.gate_up_group = Projections(("gate_proj", "up_proj"),
                                         tuple(m.out_features for m in self._gate_up_modules))
        self.o_group = Projections(("o_proj",), (attn.o_proj.out_features,))
        self.down_group = Projections(("down_proj",), (mlp.down_proj.out_features,))

    def gemms(self) -> list[Gemm]:
        if not self._fused:
            return []
        return [self._qkv, self._gate_up, self.o, self.down]

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v side by side (``qkv_group``)."""
        if self._fused:
            return self._qkv(x)
        return torch.cat([m(x) for m in self._qkv_modules], dim=-1)

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """gate and up side by side (``gate_up_group``)."""
        if self._fused:
            return self._gate_up(x)
        return torch.cat([m(x) for m in self._gate_up_modules], dim=-1)


def _fuse(modules: tuple[torch.nn.Linear, ...], plan: GemmPlan) -> Gemm:
    """One ``Gemm`` over the modules' stacked weights; the modules keep views into it."""
    weight = torch.cat([m.weight.detach() for m in modules])
    biases = [m.bias for m in modules]
    bias = None if all(b is None for b in biases) else torch.cat([
        b.detach() if b is not None else weight.new_zeros(m.out_features)
        for m, b in zip(modules, biases)])
    offset = 0
    for m in modules:
        rows = m.out_features
        m.weight = torch.nn.Parameter(weight[offset: offset + rows], requires_grad=False)
        if m.bias is not None:
            m.bias = torch.nn.Parameter(bias[offset: offset + rows], requires_grad=False)
        offset += rows
    return Gemm(weight, bias, plan)

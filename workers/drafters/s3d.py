"""S3D mask-token drafting (arXiv 2405.20314): one pass drafts several tokens at once.

A learned mask embedding and low-rank adapters, active only on draft rows, turn ``gamma`` mask
rows appended after a token into predictions of the tokens 2..gamma+1 after it (the token right
after it is the verifier's own bonus token). In the *fused* variant used here the mask rows ride
inside the verify forward: they are attached after the root and its chain of first children (the
likeliest path), then after the other nodes in tree order (with as many attach points as rows,
after every row); each group sees only its own path, and no real row sees a mask row, so the real
rows' outputs are exactly the base model's. If the accepted path
ends at a row with masks attached, the next step's draft tree comes from their per-position top-k
at no extra forward; the hybrid drafter merges n-gram continuations into the same tree, the
likeliest nodes of both kept (``merged_tree``), or with ``mask_fallback`` drafts from the masks
only on steps without n-gram continuations.

The *separate-pass* variant (``s3d_skip``, the paper's own) runs one forward of the model with the
arm's skip set over the root token and ``gamma`` mask rows after it: the root's row predicts the
next token and mask j the token j+1 after it, ``gamma + 1`` drafts from one cheap pass, whose
per-position top-k make the draft tree. Its adapter must have been trained for that skip set.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workers.arm import Arm
from workers.drafters.base import DraftContext, Drafter
from workers.drafters.ngram import draft_branches, trie_tree
from workers.drafters.skip import kept_layers, select_tree
from workers.runner import MASK_ID, Attention, DraftRows, ModelRunner, Projections
from workers.tree import DraftTree

ADAPTER_TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")
BUNDLED_ADAPTER = (Path(__file__).resolve().parent.parent / "data"
                   / "s3d-smollm2-135m-instruct.safetensors")


class AdapterMismatchError(ValueError):
    """The adapter was trained for another base model or configuration."""


class MaskAdapter(nn.Module):
    """Mask embedding ``[hidden]`` plus LoRA ``B @ A`` on chosen projections of chosen layers."""

    def __init__(self, runner: ModelRunner, gamma: int = 3, rank: int = 16,
                 layers: list[int] | None = None, targets: tuple[str, ...] = ADAPTER_TARGETS,
                 alpha: float = 32.0):
        super().__init__()
        self.gamma, self.rank, self.alpha = gamma, rank, alpha
        self.layers = list(range(runner.num_layers)) if layers is None else list(layers)
        self.targets = tuple(targets)
        self.scale = alpha / rank
        weight = runner.embed.weight
        self.mask_embed = nn.Parameter(weight.detach().float().mean(0).clone())
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        for layer in self.layers:
            block = runner.layers[layer]
            for name in self.targets:
                module = _find(block, name)
                key = f"{layer}_{name}"
                a = torch.empty(rank, module.in_features)
                nn.init.kaiming_uniform_(a, a=5 ** 0.5)
                self.lora_a[key] = nn.Parameter(a)
                self.lora_b[key] = nn.Parameter(torch.zeros(module.out_features, rank))
        self.metadata: dict = {}
        # A frozen adapter's factors per (layer, projection group, dtype), None where it has no
        # projection of the group: see adjust.
        self._inference_factors: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self.to(device=runner.device)

    # --- the runner's DraftAdapter protocol ------------------------------------------------

    def embed_masks(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        is_mask = (tokens == MASK_ID)[:, None]
        return torch.where(is_mask, self.mask_embed.to(hidden.dtype), hidden)

    def adjust(self, layer: int, group: Projections, x: torch.Tensor, out: torch.Tensor,
               start: int) -> torch.Tensor:
        """``out`` (``group``'s projections of ``x``, side by side) plus the low-rank deltas of
        the projections the adapter has, on rows ``start..``.

        While the adapter trains: out of place, in float32, so gradients reach it. A frozen
        adapter at inference adds ``(x A^T)(scale B^T)`` into those rows in place, one pair of
        small products for the whole group (the group's ``A`` stacked, its ``B`` block-diagonal
        with zero blocks for projections without an adapter): dispatch overhead, not arithmetic,
        is what mask rows cost here.
        """
        if self.mask_embed.requires_grad or torch.is_grad_enabled():
            return self._adjust_trainable(layer, group, x, out, start)
        # On CPU, bf16 products this small cost 2.3x float32 ones (36 against 16 us for 2 rows,
        # conversions included): there the delta is computed in float32.
        compute = (torch.float32 if out.dtype == torch.bfloat16 and out.device.type == "cpu"
                   else out.dtype)
        cache_key = (layer, group.names, compute)
        if cache_key not in self._inference_factors:
            self._inference_factors[cache_key] = self._group_factors(layer, group, compute)
        factors = self._inference_factors[cache_key]
        if factors is None:
            return out
        a_t, b_t = factors
        if compute == out.dtype:
            out[start:].addmm_(x[start:] @ a_t, b_t)
        else:
            out[start:] += (x[start:].to(compute) @ a_t @ b_t).to(out.dtype)
        return out

    def _group_factors(self, layer: int, group: Projections, compute: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A^T [in, r * n], scale * B^T [r * n, sum(sizes)])`` over the ``n`` projections of
        ``group`` the adapter has at ``layer``; None if it has none."""
        keys = [f"{layer}_{name}" for name in group.names]
        present = [i for i, key in enumerate(keys) if key in self.lora_a]
        if not present:
            return None
        a_t = torch.cat([self.lora_a[keys[i]] for i in present]).t()
        b_t = a_t.new_zeros(len(present) * self.rank, sum(group.sizes))
        offsets = [sum(group.sizes[:i]) for i in range(len(group.sizes))]
        for slot, i in enumerate(present):
            b_t[slot * self.rank:(slot + 1) * self.rank,
                offsets[i]:offsets[i] + group.sizes[i]] = self.lora_b[keys[i]].t() * self.scale
        return a_t.to(compute).contiguous(), b_t.to(compute).contiguous()

    def _adjust_trainable(self, layer: int, group: Projections, x: torch.Tensor,
                          out: torch.Tensor, start: int) -> torch.Tensor:
        deltas, touched = [], False
        rows = x[start:]
        for name, size in zip(group.names, group.sizes):
            key = f"{layer}_{name}"
            if key in self.lora_a:
                a, b = self.lora_a[key], self.lora_b[key]
                deltas.append(rows.to(a.dtype) @ a.t() @ b.t() * self.scale)
                touched = True
            else:
                deltas.append(rows.new_zeros(rows.shape[0], size, dtype=torch.float32))
        if not touched:
            return out
        delta = torch.cat(deltas, dim=-1).to(out.dtype)
        if start == 0:
            return out + delta
        return torch.cat([out[:start], out[start:] + delta])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._inference_factors.clear()
        return super().load_state_dict(state_dict, strict, assign)

    # --- persistence -----------------------------------------------------------------------

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | Path, metadata: dict) -> None:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {**metadata, "gamma": self.gamma, "rank": self.rank, "alpha": self.alpha,
                "layers": self.layers, "targets": list(self.targets)}
        save_file(tensors, str(path), metadata={"s3d": json.dumps(meta)})

    @staticmethod
    def read_metadata(path: str | Path) -> dict:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("s3d", "{}"))

    @classmethod
    def load(cls, path: str | Path, runner: ModelRunner, fingerprint: str) -> MaskAdapter:
        meta = cls.read_metadata(path)
        if meta.get("model_fingerprint") != fingerprint:
            raise AdapterMismatchError(
                f"adapter {path} was trained for model {meta.get('model_fingerprint')}, "
                f"not for this model ({fingerprint})")
        adapter = cls(runner, gamma=meta["gamma"], rank=meta["rank"], layers=meta["layers"],
                      targets=tuple(meta["targets"]), alpha=meta["alpha"])
        adapter.load_state_dict({k: v.to(runner.device) for k, v in load_file(str(path)).items()})
        adapter.metadata = meta
        adapter.requires_grad_(False)
        return adapter


def _find(block: nn.Module, name: str) -> nn.Module:
    for holder in (block.self_attn, block.mlp):
        if hasattr(holder, name):
            return getattr(holder, name)
    raise KeyError(name)


@dataclass
class MaskGroups:
    """Mask rows to append to a verify forward: ``gamma`` after each of ``attach_rows``."""

    attach_rows: list[int]
    gamma: int
    adapter: MaskAdapter


# The log of an n-gram draft token's chance to be accepted, for ranking n-gram branches beside
# the mask rows' own log-probs in a merged hybrid tree.
NGRAM_LOGP = math.log(0.5)
Candidates = tuple[list[int], list[int], list[float], list[int]]  # tokens, parents, scores, depths


def per_position_candidates(logp: torch.Tensor, top_k: int) -> Candidates:
    """Each node at depth d gets the top-k tokens of position d (``logp``: ``[depth, V]``
    log-probs) as children, the ``top_k`` best of each depth by cumulative log-prob expanded."""
    top = logp.topk(top_k, dim=-1)
    tokens, parents, scores, depths = [], [], [], []
    frontier = [(-1, 0.0)]
    for d in range(logp.shape[0]):
        nxt = []
        for parent, base in frontier:
            for lp, tok in zip(top.values[d].tolist(), top.indices[d].tolist()):
                tokens.append(tok)
                parents.append(parent)
                scores.append(base + lp)
                depths.append(d + 1)
                nxt.append((len(tokens) - 1, base + lp))
        nxt.sort(key=lambda n: -n[1])
        frontier = nxt[:top_k]
    return tokens, parents, scores, depths


def per_position_tree(logp: torch.Tensor, top_k: int, total: int) -> DraftTree:
    """A draft tree from per-position log-probs ``[depth, V]``: each node at depth d gets the
    top-k tokens of position d as children; the ``total`` best by cumulative log-prob are kept."""
    return select_tree(*per_position_candidates(logp, top_k), total)


def merged_tree(branches: list[list[int]], masks: Candidates, branch_logp: float,
                total: int) -> DraftTree:
    """N-gram ``branches`` and the mask rows' candidates in one tree of the ``total`` likeliest
    nodes: a branch's token at depth d scores ``d * branch_logp`` (the log of an n-gram draft's
    chance to be accepted, per token), a mask candidate its cumulative log-prob, a node both
    drafted the better of the two. Every prefix of a branch is a node of it, so a node never
    scores above its parent and the kept nodes form a tree."""
    tokens, parents, scores, depths = (list(x) for x in masks)
    index: dict[tuple[int, ...], int] = {}
    paths: list[tuple[int, ...]] = []
    for node, (tok, parent) in enumerate(zip(tokens, parents)):
        paths.append((paths[parent] if parent >= 0 else ()) + (tok,))
        index[paths[-1]] = node
    for branch in branches:
        parent, path = -1, ()
        for depth, tok in enumerate(branch, start=1):
            path += (tok,)
            node = index.get(path)
            if node is None:
                node = index[path] = len(tokens)
                tokens.append(tok)
                parents.append(parent)
                scores.append(depth * branch_logp)
                depths.append(depth)
            else:
                scores[node] = max(scores[node], depth * branch_logp)
            parent = node
    return select_tree(tokens, parents, scores, depths, total)


class S3DDrafter(Drafter):
    """Fused S3D drafting; with ``hybrid`` the n-gram drafter's branches join the same tree (or,
    with the arm's ``mask_fallback``, replace it, the masks riding only on steps without any)."""

    def __init__(self, arm: Arm, adapter: MaskAdapter, hybrid: bool):
        self.arm, self.adapter, self.hybrid = arm, adapter, hybrid
        # Mask j sees no later mask, so fewer masks than trained is the same drafter, shorter.
        self.gamma = min(arm.gamma, adapter.gamma)
        self.pending: torch.Tensor | None = None  # [gamma, V] log-probs for the next step
        self.masks_this_step = True

    def propose(self, ctx: DraftContext) -> DraftTree:
        arm = self.arm
        pending, self.pending = self.pending, None
        if ctx.max_depth < 1:  # the request's last token: no draft, and no masks for a next step
            self.masks_this_step = False
            return DraftTree.empty()
        branches = draft_branches(ctx, arm, max_branches=2) if self.hybrid else []
        self.masks_this_step = not (branches and arm.mask_fallback)
        if not self.masks_this_step:  # n-gram branches alone: the masks' drafts go unused
            return trie_tree(branches, arm.total_tokens)
        masks: Candidates = ([], [], [], [])
        if pending is not None:
            masks = per_position_candidates(pending[: arm.depth], arm.top_k)
        if branches:
            return merged_tree(branches, masks, NGRAM_LOGP, arm.total_tokens)
        return select_tree(*masks, arm.total_tokens)

    def mask_groups(self, tree: DraftTree) -> MaskGroups | None:
        if not self.masks_this_step:
            return None
        return MaskGroups(tree.attach_rows(self.arm.attach), self.gamma, self.adapter)

    def after_verify(self, groups: MaskGroups, mask_logits: torch.Tensor,
                     accepted_row: int) -> None:
        """``mask_logits``: ``[len(attach_rows) * gamma, V]`` of the verify forward's mask rows
        (computed in the verify's own output-layer product)."""
        if accepted_row not in groups.attach_rows:
            self.pending = None
            return
        g = groups.attach_rows.index(accepted_row)
        logits = mask_logits[g * groups.gamma:(g + 1) * groups.gamma]
        if 0 < self.arm.draft_vocab < logits.shape[-1]:
            logits = logits[:, :self.arm.draft_vocab]
        self.pending = logits.log_softmax(-1)


class S3DSkipDrafter(Drafter):
    """Separate-pass S3D: one skipped-model forward over ``[root, mask x gamma]`` drafts
    ``gamma + 1`` positions; the tree takes each position's top-k."""

    def __init__(self, arm: Arm, adapter: MaskAdapter, num_layers: int):
        trained_skip = sorted(adapter.metadata.get("skip_layers", []))
        if trained_skip != sorted(arm.skip_layers):
            raise AdapterMismatchError(
                f"arm {arm.name!r} skips layers {sorted(arm.skip_layers)} but its adapter was "
                f"trained with skip set {trained_skip}")
        self.arm, self.adapter = arm, adapter
        self.layers = kept_layers(num_layers, arm.skip_layers)
        self.gamma = min(arm.gamma, adapter.gamma, max(arm.depth - 1, 0))

    def propose(self, ctx: DraftContext) -> DraftTree:
        if ctx.max_depth < 1:  # the request's last token: a draft pass would be thrown away
            return DraftTree.empty()
        start = ctx.cache.length
        tokens = torch.tensor([ctx.tokens[-1]] + [MASK_ID] * self.gamma)
        logits = ctx.runner.forward(
            ctx.cache, tokens, torch.arange(start, start + 1 + self.gamma),
            Attention.causal(start), self.layers, draft=DraftRows(1, self.adapter),
            vocab=self.arm.draft_vocab)
        return per_position_tree(logits.log_softmax(-1), self.arm.top_k, self.arm.total_tokens)


def load_adapter(arm: Arm, runner: ModelRunner, fingerprint: str,
                 cache: dict[str, MaskAdapter]) -> MaskAdapter:
    path = arm.adapter or str(BUNDLED_ADAPTER)
    if path not in cache:
        cache[path] = MaskAdapter.load(path, runner, fingerprint)
    return cache[path]

"""The decode loop: draft -> verify -> accept -> commit cache -> record stats, one step at a time.

``Generation`` holds one request's state so a replica can interleave many requests step by step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.arm import ADAPTER_DRAFTERS, NONE_ARM, Arm, Profile
from workers.drafters import DraftContext, make_drafter
from workers.drafters.s3d import MaskAdapter, MaskGroups, load_adapter
from workers.model import BUNDLED_MODEL, LoadedModel, context_length, load_model
from workers.pool import TokenPool, resolve_pool
from workers.runner import MASK_ID, Attention, DraftRows, KVCache, ModelRunner
from workers.sampling import SamplingParams, greedy_accept, sample_accept, target_probs
from workers.stats import SpecDecodeStats
from workers.tree import DraftTree, tree_attention_mask

BUNDLED_PROFILE = Path(__file__).parent / "data" / "profile-smollm2-135m-instruct.json"
# Prompt tokens one step prefills: a long prompt takes several steps, so the replica's other
# streams keep decoding between them (a 1,536-token prompt stalled them 0.6 s in one step on a
# 2-core CPU; in 512-token chunks it took no longer in all, 0.2 s at a time).
PREFILL_CHUNK = 512

log = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """The prompt plus ``max_tokens`` does not fit the model's context."""


@dataclass
class Generation:
    """One request's decoding state. ``step()`` returns the tokens it committed."""

    runner: ModelRunner
    prompt: list[int]
    max_tokens: int
    arm: Arm = NONE_ARM
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    adapter_for: Callable[[Arm], MaskAdapter] | None = None
    pool: TokenPool | None = None  # earlier outputs: drafts for pool arms; a live pool gets ours
    prefill_chunk: int = PREFILL_CHUNK  # prompt tokens per step (0: the whole prompt at once)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("the prompt must hold at least one token")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        context = context_length(self.runner.config)
        if len(self.prompt) + self.max_tokens > context:
            raise PromptTooLongError(
                f"prompt ({len(self.prompt)} tokens) plus max_tokens ({self.max_tokens}) exceeds "
                f"the model's context of {context} tokens")
        if self.prefill_chunk < 0:
            raise ValueError("prefill_chunk must be 0 (no chunks) or positive")
        # Allocated by the first step, on the thread that decodes, not where the request is made.
        self.cache: KVCache | None = None
        self.prefilled = 0  # prompt tokens in the cache
        self.drafter = make_drafter(self.arm, self.runner.num_layers, self.adapter_for)
        self.generator = self.params.generator()
        self.tokens: list[int] = list(self.prompt)
        self.output: list[int] = []
        self.stats = SpecDecodeStats()
        self.finished = False
        self.finish_reason: str | None = None
        # A seeded sampled request drafts without the pool: which drafts are verified decides
        # how the seed's random numbers are used, and the pool changes with every request, so
        # the same seed would not give the same text twice. Greedy output never depends on it.
        # A frozen pool (the search's) never changes: with it the seed gives one text.
        seeded = not self.params.greedy and self.params.seed is not None
        live = self.pool is not None and self.pool.live
        self.draft_pool = None if seeded and live else self.pool

    def _choose(self, logits: torch.Tensor) -> int:
        if self.params.greedy:
            return int(logits.argmax())
        probs = target_probs(logits[None], self.params)[0].cpu()  # where the generator is
        return int(torch.multinomial(probs, 1, generator=self.generator))

    @torch.inference_mode()
    def prefill(self) -> list[int]:
        """Run the prompt's next ``prefill_chunk`` tokens (all of it with 0); the first token
        comes from its last row, after the last chunk (no tokens before)."""
        if self.cache is None:
            scratch = self.arm.max_draft_nodes + 2
            self.cache = self.runner.new_cache(len(self.prompt) + self.max_tokens + scratch)
        n, start = len(self.prompt), self.prefilled
        end = min(n, start + self.prefill_chunk) if self.prefill_chunk else n
        logits = self.runner.forward(self.cache, torch.tensor(self.prompt[start:end]),
                                     torch.arange(start, end), Attention.causal(start),
                                     logits_rows=slice(end - start - 1, end - start))
        self.cache.length = self.prefilled = end
        if end < n:
            return []
        committed = self._commit([self._choose(logits[-1])])
        self._pool_output()
        return committed

    @torch.inference_mode()
    def step(self) -> list[int]:
        if not self.output:
            return self.prefill()
        if self.finished:
            return []
        t0 = time.perf_counter()
        forwards = self.runner.num_forwards  # a replica runs one step at a time
        # A step commits its accepted drafts and one token more: drafts past what the request
        # has left would be verified for nothing.
        max_depth = self.max_tokens - len(self.output) - 1
        tree = self.drafter.propose(DraftContext(self.runner, self.cache, self.tokens,
                                                 self.draft_pool, max_depth)).pruned(max_depth)
        t1 = time.perf_counter()
        path, next_token = self._verify(tree)
        t2 = time.perf_counter()
        self.drafter.observe(tree, len(path))
        committed = self._commit([int(tree.tokens[i]) for i in path] + [next_token])
        # The statistics count what was output: a stop token inside the accepted path ends the
        # step there, as its last token (so committed tokens stay accepted drafts plus one per
        # step), and the drafts accepted after it are not output.
        reached = len(path) + bool(tree.children()[path[-1] + 1 if path else 0])
        self.stats.observe_step(len(tree), min(len(path), len(committed) - 1), t1 - t0,
                                t2 - t1, tree.depth, self.runner.num_forwards - forwards,
                                reached)
        self.stats.decode_time_s += time.perf_counter() - t0
        self._pool_output()  # after the timing: the pool's upkeep is not this arm's cost
        return committed

    def _verify(self, tree: DraftTree) -> tuple[list[int], int]:
        """One full forward over ``[root, *tree]`` (plus any fused S3D mask rows); accept a
        path; move its K/V into place."""
        start = self.cache.length
        n = len(tree) + 1
        tokens = torch.cat([torch.tensor(self.tokens[-1:]), tree.tokens])
        positions = start + torch.cat([torch.zeros(1, dtype=torch.long), tree.depths()])
        groups = self.drafter.mask_groups(tree)
        draft = None
        if groups is not None:
            tokens, positions, local = with_mask_rows(tokens, positions, tree, groups)
            attention = Attention(start, start, local)
            draft = DraftRows(n, groups.adapter)
        elif tree_is_chain(tree):
            attention = Attention.causal(start)
        else:
            attention = Attention(start, start, tree_attention_mask(tree.parents))
        hidden = self.runner.hidden_states(self.cache, tokens, positions, attention, draft=draft)
        # Mask rows go through the output layer in the same product as the principal rows: on a
        # CPU a few more rows cost next to nothing there, a second (draft-vocabulary) call does.
        masks = list(range(n, hidden.shape[0]))
        rows = RowLogits(self.runner, hidden, tree.principal_rows() + masks)
        if self.params.greedy:
            path, next_token = greedy_accept(lambda r: int(rows(r).argmax()), tree)
        else:
            path, next_token = sample_accept(
                lambda r: target_probs(rows(r)[None], self.params)[0], tree, self.generator)
        if groups is not None:
            self.drafter.after_verify(groups, torch.stack([rows(r) for r in masks]),
                                      path[-1] + 1 if path else 0)
        self.cache.compact([start + 1 + i for i in path], start + 1)
        self.cache.length = start + 1 + len(path)
        return path, next_token

    def _commit(self, new: list[int]) -> list[int]:
        room = self.max_tokens - len(self.output)
        new = new[:room]
        for i, tok in enumerate(new):
            if tok in self.stop_token_ids:
                new = new[: i + 1]
                self.finished, self.finish_reason = True, "stop"
                break
        self.output.extend(new)
        self.tokens.extend(new)
        self.stats.num_output_tokens = len(self.output)
        if not self.finished and len(self.output) >= self.max_tokens:
            self.finished, self.finish_reason = True, "length"
        return new

    def _pool_output(self) -> None:
        """A finished request's output joins a live pool."""
        if self.finished and self.pool is not None and self.pool.live:
            self.pool.add(self.output)

    def run(self) -> list[int]:
        while not self.finished:
            self.step()
        return self.output


class RowLogits:
    """Verify logits computed on demand: the output layer is a large share of a small model's
    forward, and acceptance only reads the rows along the path it walks. The principal path (the
    root and every first child) and any fused mask rows are computed up front in one batch; other
    rows when visited."""

    def __init__(self, runner: ModelRunner, hidden: torch.Tensor, first: list[int]):
        self.runner, self.hidden = runner, hidden
        self.rows = dict(zip(first, runner.logits(hidden[first])))

    def __call__(self, row: int) -> torch.Tensor:
        if row not in self.rows:
            self.rows[row] = self.runner.logits(self.hidden[row: row + 1])[0]
        return self.rows[row]


def with_mask_rows(tokens: torch.Tensor, positions: torch.Tensor, tree: DraftTree,
                   groups: MaskGroups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append ``gamma`` mask rows after each attach row. Mask ``j`` of a group sits at the attach
    row's position + j, sees the attach row's path and the earlier masks of its group; no verify
    row sees any mask row."""
    n, gamma = tokens.shape[0], groups.gamma
    extra = len(groups.attach_rows) * gamma
    base = tree_attention_mask(tree.parents)
    local = torch.zeros(n + extra, n + extra, dtype=torch.bool)
    local[:n, :n] = base
    mask_positions = []
    for g, row in enumerate(groups.attach_rows):
        first = n + g * gamma
        for j in range(gamma):
            local[first + j, :n] = base[row]
            local[first + j, first:first + j + 1] = True
            mask_positions.append(int(positions[row]) + 1 + j)
    tokens = torch.cat([tokens, torch.full((extra,), MASK_ID, dtype=torch.long)])
    positions = torch.cat([positions, torch.tensor(mask_positions, dtype=torch.long)])
    return tokens, positions, local


def tree_is_chain(tree: DraftTree) -> bool:
    return bool((tree.parents == torch.arange(-1, len(tree) - 1)).all())


def stop_token_ids(tokenizer, hf_model=None) -> frozenset[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(hf_model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    return frozenset(ids)


@dataclass
class Engine:
    """A loaded model, its runner and its profile of arms: what replicas and the CLI decode with."""

    loaded: LoadedModel
    runner: ModelRunner
    stops: frozenset[int]
    profile: Profile
    pool: TokenPool = field(default_factory=TokenPool)  # this replica's earlier outputs
    prefill_chunk: int = PREFILL_CHUNK  # prompt tokens per step (``Generation``)

    @classmethod
    def load(cls, model: str = BUNDLED_MODEL, dtype: str = "float32", device: str = "auto",
             quantization: str = "none", profile: str | None = None,
             packed_weights: bool = True, pool: str | None = None, pool_tokens: int = 1 << 18,
             pool_record: bool = True) -> Engine:
        """``pool``: the pool file (default: the bundled model's, ``"none"``: start empty);
        ``pool_record``: finished requests join the pool (up to ``pool_tokens``). A profile
        without arms that draft from a pool gets an empty one that takes no answers."""
        loaded = load_model(model, dtype=dtype, device=device, quantization=quantization)
        runner = ModelRunner(loaded.model, packed_weights)
        arm_profile = resolve_profile(profile, loaded.fingerprint, runner.num_layers)
        engine = cls(loaded, runner, stop_token_ids(loaded.tokenizer, loaded.model), arm_profile,
                     resolve_pool(pool, loaded.fingerprint, pool_tokens, pool_record,
                                  used=any(arm.pool for arm in arm_profile.arms)))
        engine.load_adapters()
        return engine

    def __post_init__(self) -> None:
        self._adapters: dict[str, MaskAdapter] = {}

    def load_adapters(self) -> None:
        """Load the profile's S3D adapters now: loaded by a replica's first request on their
        arm, they stalled its event loop (a request is built there) and every stream on it.
        One that fails to load is logged; requests on its arm fail as they would have."""
        for arm in self.profile.arms:
            if arm.drafter in ADAPTER_DRAFTERS:
                try:
                    self.adapter_for(arm)
                except (OSError, ValueError) as exc:  # AdapterMismatchError is a ValueError
                    log.warning("arm %s: its adapter did not load: %s", arm.name, exc)

    def adapter_for(self, arm: Arm) -> MaskAdapter:
        return load_adapter(arm, self.runner, self.loaded.fingerprint, self._adapters)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def arm(self, name: str | None) -> Arm:
        return self.profile.arm(name or self.profile.default_arm)

    def generation(self, prompt: list[int], max_tokens: int, arm: Arm | str | None = None,
                   params: SamplingParams | None = None, depth: int | None = None,
                   pool: TokenPool | None = None) -> Generation:
        """A request's decoding state; ``depth`` (the router's choice, at most the arm's own)
        caps its draft depth; ``pool`` replaces the engine's pool (the benchmark gives each
        method its own, the search a frozen copy)."""
        if not isinstance(arm, Arm):
            arm = self.arm(arm)
        if depth is not None and depth != arm.depth:
            if not 1 <= depth <= arm.depth:
                raise ValueError(f"depth {depth} is outside 1..{arm.depth} of arm {arm.name!r}")
            arm = arm.model_copy(update={"depth": depth})
        return Generation(self.runner, prompt, max_tokens, arm, params or SamplingParams(),
                          stop_token_ids=self.stops, adapter_for=self.adapter_for,
                          pool=self.pool if pool is None else pool,
                          prefill_chunk=self.prefill_chunk)


def resolve_profile(path: str | None, fingerprint: str, num_layers: int) -> Profile:
    """The given profile, else the bundled one when it fits the model, else a generic one."""
    if path:
        profile = Profile.load(path)
        if profile.model_fingerprint != fingerprint:
            raise ValueError(f"profile {path} was made for model {profile.model_fingerprint}, "
                             f"not for this model ({fingerprint})")
        return profile
    if BUNDLED_PROFILE.exists():
        profile = Profile.load(BUNDLED_PROFILE)
        if profile.model_fingerprint == fingerprint:
            return profile
    return generic_profile(fingerprint)


def generic_profile(fingerprint: str) -> Profile:
    """Arms that need no search: plain decoding and the n-gram drafter."""
    return Profile(model_fingerprint=fingerprint, default_arm="ngram_tree", arms=[
        NONE_ARM, Arm(name="ngram_tree", drafter="ngram_tree", depth=6, top_k=4, total_tokens=16)])

"""Arms: one decoding configuration (drafter, skip set, draft depth, tree budget) the router picks.

Pure pydantic, importable without torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DrafterKind = Literal["none", "skip_chain", "skip_tree", "ngram_tree", "s3d", "hybrid",
                      "s3d_skip"]


class Arm(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Unique name of the arm within a profile.")
    drafter: DrafterKind = Field(description="How drafts are made; `none` is plain decoding.")
    skip_layers: tuple[int, ...] = Field(
        default=(), description="Decoder layers the drafter skips (layer-skip drafters).")
    depth: int = Field(default=4, ge=1, le=32,
                       description="Maximum draft length (chain) or tree depth.")
    top_k: int = Field(default=1, ge=1, le=16, description="Children expanded per tree node.")
    total_tokens: int = Field(default=8, ge=1, le=128,
                              description="Draft-tree budget: nodes kept for verification.")
    draft_exit: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Chains: initial draft-exit threshold on the drafter's top-1 probability, "
                    "then adapted online to the acceptance rate. Trees: stop growing once the "
                    "likeliest path's cumulative draft probability is below it.")
    ngram_max: int = Field(default=4, ge=1, le=16, description="Longest n-gram matched (n-gram).")
    ngram_min: int = Field(default=1, ge=1, le=16, description="Shortest n-gram matched.")
    gamma: int = Field(default=3, ge=1, le=16,
                       description="S3D: mask rows per attach point (drafts tokens 2..gamma+1).")
    attach: int = Field(
        default=3, ge=1, le=16,
        description="S3D: verify rows that get masks: the root and its chain of first children, "
                    "then the other nodes in tree order. A step whose accepted path ends at a "
                    "row without masks leaves the next step without mask drafts.")
    mask_fallback: bool = Field(
        default=False,
        description="Hybrid: spend mask rows only on steps where the n-gram drafter finds no "
                    "continuation (those steps then draft the next one from the masks); steps "
                    "with n-gram branches verify them alone, at the n-gram arm's cost.")
    draft_vocab: int = Field(
        default=0, ge=0,
        description="Drafts choose among the first N token ids only (0: the whole vocabulary): "
                    "BPE ids follow merge order, so low ids are the frequent tokens, and a "
                    "draft pass's output layer shrinks to N rows (fused mask rows share the "
                    "verify's output-layer product and are cut after it). Verification is "
                    "untouched.")
    pool: bool = Field(
        default=False,
        description="N-gram drafting (`ngram_tree`, `hybrid`) also looks in the replica's pool "
                    "of earlier outputs (workers/pool.py) when the request's own text gives "
                    "fewer branches than the arm takes.")
    pool_min: int = Field(
        default=2, ge=1, le=16,
        description="Shortest n-gram looked up in the pool (a pool's short matches are weaker "
                    "than the request's own: a hybrid may leave those steps to its masks).")
    adapter: str | None = Field(default=None, description="S3D adapter file; default: the "
                                                          "bundled model's committed adapter.")

    @model_validator(mode="after")
    def _check(self) -> Arm:
        if self.drafter in ("skip_chain", "skip_tree") and not self.skip_layers:
            raise ValueError(f"arm {self.name!r}: drafter {self.drafter} needs skip_layers")
        if self.drafter in ("s3d", "hybrid") and self.skip_layers:
            raise ValueError(f"arm {self.name!r}: fused S3D mask rows run every layer; "
                             "skip_layers must be empty")
        if self.mask_fallback and self.drafter != "hybrid":
            raise ValueError(f"arm {self.name!r}: mask_fallback is a hybrid drafter setting")
        if self.pool and self.drafter not in ("ngram_tree", "hybrid"):
            raise ValueError(f"arm {self.name!r}: pool is an n-gram drafting setting")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"arm {self.name!r}: ngram_min > ngram_max")
        if 0 < self.draft_vocab < self.top_k:
            raise ValueError(f"arm {self.name!r}: draft_vocab {self.draft_vocab} is below top_k "
                             f"{self.top_k} (a node's children are its top-k draft tokens)")
        if len(set(self.skip_layers)) != len(self.skip_layers):
            raise ValueError(f"arm {self.name!r}: duplicate layers in skip_layers")
        return self

    @property
    def draft_depth(self) -> int | None:
        """The depth this arm drafts to; None for plain decoding."""
        return None if self.drafter == "none" else self.depth

    @property
    def drafts_s3d(self) -> bool:
        """Every step drafts with S3D's mask rows: the fused drafter, the separate pass, or a
        hybrid that merges its n-gram branches into the mask rows' tree. A hybrid with
        ``mask_fallback`` spends mask rows only on steps without n-gram branches (with a pool of
        earlier outputs, few), so it is mostly an n-gram drafter, not S3D."""
        return self.drafter in ("s3d", "s3d_skip") or (self.drafter == "hybrid"
                                                        and not self.mask_fallback)

    @property
    def max_draft_nodes(self) -> int:
        """Upper bound on the scratch KV slots one step may write past the committed length."""
        if self.drafter == "none":
            return 0
        expanded = 1 + self.top_k * self.depth
        masks = {"s3d": self.attach * self.gamma, "hybrid": self.attach * self.gamma,
                 "s3d_skip": self.gamma + 1}.get(self.drafter, 0)
        return max(self.total_tokens, self.depth) + expanded + masks + 1


NONE_ARM = Arm(name="none", drafter="none")
# Drafters that draft with an S3D adapter (mask embedding and draft-only low-rank deltas).
ADAPTER_DRAFTERS = ("s3d", "hybrid", "s3d_skip")


class Profile(BaseModel):
    """The arms for one base model, written by `s3d search`, read by the router and replicas."""

    model_config = ConfigDict(extra="forbid")

    model_fingerprint: str = Field(
        description="Fingerprint of the base model the arms were made for.")
    default_arm: str = Field(description="Arm used when the router has no statistics yet.")
    arms: list[Arm] = Field(description="Candidate arms, including `none`.")
    notes: dict = Field(default_factory=dict, description="How the profile was measured.")

    @model_validator(mode="after")
    def _check(self) -> Profile:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError("arm names in a profile must be unique")
        if self.default_arm not in names:
            raise ValueError(f"default_arm {self.default_arm!r} is not one of {names}")
        return self

    def measurement(self, dtype: str | None = None, temperature: str | None = None) -> dict:
        """The notes on how the arms' goodput was measured (figures, calibration classes,
        ``prior_weight``): those taken in ``dtype`` when the profile has them (``--remeasure``
        in another dtype adds them under ``notes.by_dtype``; rows cost differently by dtype, so
        the arms may rank differently), else the search's own. With ``temperature`` (a
        temperature bucket, ``router.policy.temperature_bucket``) those of sampled decoding in
        that bucket where the profile has them (``sampled_measurements``), else the greedy ones."""
        if temperature is not None:
            sampled = self.sampled_measurements(dtype).get(temperature)
            if sampled is not None:
                return sampled
        other = self.notes.get("by_dtype", {}).get(dtype) if dtype else None
        return other if other is not None else self.notes

    def sampled_measurements(self, dtype: str | None = None) -> dict[str, dict]:
        """Measurements of sampled decoding in ``dtype`` (default: the search's), by temperature
        bucket: ``--remeasure --temperature T`` keeps them under ``notes.by_temperature``, as
        drafts are accepted differently when the verifier samples (the router's prior for
        requests in that bucket)."""
        return self.notes.get("by_temperature", {}).get(dtype or self.notes.get("dtype"), {})

    def measured_goodput(self, dtype: str | None = None, temperature: str | None = None
                         ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """The measured tokens/s per arm (in ``dtype`` and ``temperature``, see
        ``measurement``): overall, and by prompt class (``code`` / ``chat`` / ``doc`` /
        ``prose``) as ``{class: {arm: tokens/s}}``."""
        measured = self.measurement(dtype, temperature).get("measured", {})
        overall = {arm: fig["tokens_per_s"] for arm, fig in measured.items()}
        by_class: dict[str, dict[str, float]] = {}
        for arm, fig in measured.items():
            for prompt_class, value in fig.get("by_class", {}).items():
                by_class.setdefault(prompt_class, {})[arm] = value
        return overall, by_class

    def measured_per_prompt(self, dtype: str | None = None, temperature: str | None = None
                            ) -> dict[str, dict[str, list[float]]]:
        """The tokens/s of every arm on each calibration prompt (in ``dtype`` and
        ``temperature``, see ``measurement``), by prompt class: ``{class: {arm: [tokens/s,
        ...]}}``, the prompts in the same order for every arm (empty for a profile measured
        before per-prompt figures were kept)."""
        notes = self.measurement(dtype, temperature)
        classes = notes.get("calibration_classes", [])
        out: dict[str, dict[str, list[float]]] = {}
        for arm, fig in notes.get("measured", {}).items():
            values = fig.get("per_prompt", [])
            if len(values) != len(classes):
                continue
            for prompt_class, value in zip(classes, values):
                out.setdefault(prompt_class, {}).setdefault(arm, []).append(value)
        return out

    def fastest(self, drafters: tuple[str, ...] | Callable[[Arm], bool],
                dtype: str | None = None) -> str | None:
        """The name of the arm with one of these drafter kinds (or for which ``drafters`` is
        true) that the profile measured fastest (in ``dtype``, see ``measurement``); the first
        such arm when none was measured, None when the profile has no such arm."""
        def chosen(arm: Arm) -> bool:
            return drafters(arm) if callable(drafters) else arm.drafter in drafters

        names = [a.name for a in self.arms if chosen(a)]
        overall, _ = self.measured_goodput(dtype)
        measured = [n for n in names if n in overall]
        if measured:
            return max(measured, key=overall.__getitem__)
        return names[0] if names else None

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    @staticmethod
    def load(path: str | Path) -> Profile:
        return Profile.model_validate(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        """Written whole or not at all: ``--remeasure p.json --out p.json`` replaces the profile
        it read, which a write cut short would lose."""
        from workers.files import write_text

        write_text(path, self.model_dump_json(indent=2) + "\n")

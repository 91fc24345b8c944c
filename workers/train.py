"""`s3d train`: fit the S3D mask embedding and draft-only adapters by self-distillation.

The base model's own greedy predictions are the targets: for a prefix ending at position t, mask
j (at position t + 1 + j) learns the base model's next-token choice at position t + 1 + j, i.e.
the token j + 2 after the prefix. At inference the tokens between are the base model's own
choices, so a target counts only where the text agrees with them (``consistent_targets``): on
real text about half of the first masks' targets and a quarter of the third's follow a token the
base model would not have chosen, and those are noise the masks can never see coming. Besides
offline text, the data holds the base model's own greedy continuations of chat, code and summary
requests (``workers.corpus``), where every target is consistent and the text is what the server
decodes. The base model is frozen and its prefix pass runs without gradients; only mask rows,
attending to the cached prefix, carry gradients.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from workers.corpus import (
    HELD_OUT_EVERY,
    ROLLOUT_KINDS,
    Sequence,
    TrainingDataError,
    chunk_tokens,
    corpus_texts,
    load_rollouts,
    rollouts_path,
    source_counts,
    split_held_out,
)
from workers.drafters.s3d import AdapterMismatchError, MaskAdapter
from workers.drafters.skip import kept_layers
from workers.engine import Engine
from workers.files import replacing, write_text
from workers.runner import MASK_ID, Attention, DraftRows


class CheckpointError(AdapterMismatchError):
    """A checkpoint that cannot be resumed: unreadable (a save cut short, a disk error) or
    missing part of its state. Refused like a checkpoint of another shape, naming the file and
    the way to start afresh."""


def consistent_targets(chunk: torch.Tensor, greedy: torch.Tensor, attach: torch.Tensor,
                       gamma: int) -> torch.Tensor:
    """``[K, gamma]`` bool: mask j after attach point t has a target the drafter can learn.

    Its target, the base model's choice at t + 1 + j, continues the text ``chunk[t+1..t+1+j]``,
    which the mask does not see; at inference those tokens are the base model's own choices, so
    the target is the base model's continuation only where ``chunk[t+1+i] == greedy[t+i]`` for
    every ``i <= j``. On ``greedy``'s device (the model's): ``chunk`` and ``attach`` are built on
    the CPU.
    """
    idx = (attach[:, None] + torch.arange(gamma)[None]).to(greedy.device)
    return (chunk.to(greedy.device)[idx + 1] == greedy[idx]).long().cumprod(-1).bool()


def consistent_agreement(logits: torch.Tensor, target: torch.Tensor,
                         valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position hits of the masks' top-1 on consistent targets, and how many there were."""
    hits = ((logits.argmax(-1) == target) & valid).float().sum(0)
    return hits, valid.float().sum(0)


def mask_forward(engine: Engine, adapter: MaskAdapter, chunk: list[int], attach: torch.Tensor,
                 layers: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix pass of the full model (no grad) then the mask rows (with grad) through ``layers``
    (default: all; a skip set's kept layers for the separate-pass variant); returns mask logits
    ``[K, gamma, V]`` and the base model's greedy predictions ``[L]`` for the chunk."""
    runner = engine.runner
    length, gamma, k = len(chunk), adapter.gamma, attach.shape[0]
    cache = runner.new_cache(length + k * gamma)
    with torch.no_grad():
        hidden = runner.hidden_states(cache, torch.tensor(chunk), torch.arange(length),
                                      Attention.causal(0))
        greedy = runner.logits(hidden).argmax(-1)
    local = torch.zeros(k * gamma, length + k * gamma, dtype=torch.bool)
    positions = []
    for g, t in enumerate(attach.tolist()):
        for j in range(gamma):
            row = g * gamma + j
            local[row, : t + 1] = True
            local[row, length + g * gamma: length + row + 1] = True
            positions.append(t + 1 + j)
    tokens = torch.full((k * gamma,), MASK_ID, dtype=torch.long)
    hidden = runner.hidden_states(cache, tokens, torch.tensor(positions),
                                  Attention(length, 0, local), layers, DraftRows(0, adapter))
    logits = runner.logits(hidden).view(k, gamma, -1)
    return logits, greedy


def targets_for(greedy: torch.Tensor, attach: torch.Tensor, gamma: int) -> torch.Tensor:
    """Mask j after attach point t learns the base's greedy choice at position t + 1 + j."""
    idx = attach[:, None] + 1 + torch.arange(gamma)[None]
    return greedy[idx.to(greedy.device)]


def evaluate(engine: Engine, adapter: MaskAdapter, sequences: list[Sequence],
             attach_per_chunk: int, layers: list[int] | None = None) -> list[float]:
    """Per-position top-1 agreement of the masks with the base model's own continuation on
    held-out sequences (consistent targets only, as at inference), counted on the CPU."""
    hits = torch.zeros(adapter.gamma)
    total = torch.zeros(adapter.gamma)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for seq in sequences:
            attach = sample_attach(len(seq.tokens), adapter.gamma, attach_per_chunk, gen,
                                   seq.first_attach)
            if not attach.numel():  # an answer too short for any attach point
                continue
            logits, greedy = mask_forward(engine, adapter, seq.tokens, attach, layers)
            target = targets_for(greedy, attach, adapter.gamma)
            valid = consistent_targets(torch.tensor(seq.tokens), greedy, attach, adapter.gamma)
            step_hits, step_total = consistent_agreement(logits, target, valid)
            hits += step_hits.cpu()
            total += step_total.cpu()
    return (hits / total.clamp(min=1)).tolist()


def sample_attach(length: int, gamma: int, k: int, gen: torch.Generator,
                  first: int = 8) -> torch.Tensor:
    """Up to ``k`` distinct attach points in ``[first, length - gamma - 2]``, sorted."""
    last = length - gamma - 2
    return torch.randperm(max(last - first + 1, 0), generator=gen)[:k].sort().values + first


def expected_accepted(acc: list[float]) -> float:
    """Expected accepted drafts of a chain whose position-j drafts agree with probability acc[j]
    (as if independent): sum over j of prod(acc[:j+1])."""
    out, run = 0.0, 1.0
    for a in acc:
        run *= a
        out += run
    return out


def _signature(sets: Mapping[str, list[Sequence]]) -> str:
    """A short digest of the held-out sets (entries measured on other sets are not comparable)."""
    data = {k: [s.tokens for s in v] for k, v in sorted(sets.items())}
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def learning_rate(peak: float, step: int, steps: int, run_step: int = 0, warmup: int = 0
                  ) -> float:
    """The rate at ``step`` of ``steps``: a cosine from ``peak`` down to a tenth of it, and over a
    run's first ``warmup`` steps (``run_step`` counts from the run's start) a linear rise to it,
    so a run that starts mid-schedule with a fresh optimizer (``--init``) does not take
    full-size steps before its moment estimates settle (the README's training notes: at a high
    rate the adapter lost agreement with or without it)."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(step / max(steps, 1), 1.0)))
    rate = peak * (0.1 + 0.9 * cosine)
    return rate * min(1.0, (run_step + 1) / warmup) if warmup > 0 else rate


def train(engine: Engine, out: Path, *, gamma: int = 3, rank: int = 16, steps: int = 1000,
          minutes: float | None = None, lr: float = 2e-3, chunk_len: int = 256,
          attach_per_chunk: int = 32, max_chars: int = 3_000_000, eval_chunks: int = 16,
          eval_every: int = 200, resume: bool = True, init: Path | None = None, seed: int = 0,
          skip_layers: tuple[int, ...] = (), rollouts: Mapping[str, int] | None = None,
          rollout_tokens: int = 64, rollout_share: float = 0.5, warmup: int = 0, log=print,
          progress: bool = True) -> dict:
    """Self-distil an adapter; with ``skip_layers`` the mask rows run the kept layers only
    (the separate-pass ``s3d_skip`` drafter), else every layer (fused S3D). ``rollouts`` maps a
    kind of ``ROLLOUT_KINDS`` to how many of the base model's continuations of that kind join
    the data; ``rollout_share`` of the steps train on them, the kinds in turn at random.
    Without a checkpoint to resume, ``init`` (an adapter file of the same shape, for this model)
    gives the starting weights, step count and history; the optimizer then starts afresh.
    ``warmup``: steps over which this run's learning rate rises from zero to the schedule's
    (``learning_rate``)."""
    if eval_chunks < 1:
        raise ValueError("eval_chunks must be at least 1: held-out text measures the adapter")
    torch.manual_seed(seed)
    runner = engine.runner
    for p in engine.loaded.model.parameters():
        p.requires_grad_(False)
    layers = kept_layers(runner.num_layers, tuple(skip_layers)) if skip_layers else None
    adapter = MaskAdapter(runner, gamma=gamma, rank=rank, layers=layers)
    # The state to continue from, checked before any data is prepared (rollouts take minutes).
    ckpt = out.with_suffix(".ckpt.pt")
    state = (resumable(ckpt, adapter, engine.loaded.fingerprint, runner)
             if resume and ckpt.exists() else None)
    if state is None and init is not None:
        state = warm_start(init, adapter, engine.loaded.fingerprint, runner)
    texts = corpus_texts(max_chars)
    train_sets, held_sets = {}, {}
    train_sets["text"], held_sets["text"] = split_held_out(
        [Sequence(c) for c in chunk_tokens(engine.tokenizer, texts, chunk_len)], eval_chunks)
    if not train_sets["text"]:  # refused before the rollouts and the model's passes
        found = ", ".join(f"{count} {source}" for source, count in source_counts().items())
        raise TrainingDataError(
            f"too little training text: {len(texts)} texts ({sum(map(len, texts))} characters, "
            f"max_chars {max_chars}; found {found}) make {len(held_sets['text'])} chunks of "
            f"{chunk_len} tokens, too few to hold one out and train on another: raise max_chars "
            "(--max-chars) or install more sources (Python's stdlib source, Debian package "
            "descriptions, python3-doc)")
    log(f"corpus: {len(texts)} texts, {len(train_sets['text'])} train / "
        f"{len(held_sets['text'])} held-out chunks of {chunk_len} tokens")
    for kind, count in (rollouts or {}).items():
        if kind not in ROLLOUT_KINDS:
            raise ValueError(f"unknown rollout kind {kind!r} (one of {', '.join(ROLLOUT_KINDS)})")
        if count > 0:
            train_sets[kind], held_sets[kind] = split_held_out(load_rollouts(
                engine, rollouts_path(out, kind), kind, count, rollout_tokens, log), eval_chunks)
    kinds = [k for k in train_sets if k != "text" and train_sets[k]]
    signature = _signature(held_sets)

    def held_out(step: int, model: MaskAdapter = adapter) -> dict:
        entry = {"step": step, "targets": "consistent", "held_out": signature}
        for kind, sequences in held_sets.items():
            if sequences:
                key = "accuracy" if kind == "text" else f"accuracy_{kind}"
                entry[key] = evaluate(engine, model, sequences, attach_per_chunk, layers)
        return entry

    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    step = 0
    history: list[dict] = []
    if state is None or not state["history"] or state["history"][0].get("targets") != "consistent":
        # The untrained adapter's figures, on the held-out sets and metric of this run.
        history.append(held_out(0))
        log(f"held-out per-position accuracy before training: {describe(history[0])}")
    if state is not None:
        adapter.load_state_dict(state["adapter"])
        if state["optimizer"] is not None:
            opt.load_state_dict(state["optimizer"])
        step = state["step"]
        for entry in state["history"]:
            if entry.get("targets") != "consistent" and "accuracy" in entry:
                # Measured against every target, consistent or not (earlier runs' metric).
                entry["accuracy_all_targets"] = entry.pop("accuracy")
        history += state["history"]
        log(f"resumed from {ckpt} at step {step}" if state["optimizer"] is not None else
            f"started from {init} at step {step} (the optimizer starts afresh)")
        if history[-1].get("held_out") != signature or history[-1].get("step") != step:
            # The data changed since the last entry, or the adapter was not measured at this
            # step (an --init file): the untrained and the resumed adapter on this run's sets
            # (the figures before and after training compare like with like).
            untrained = held_out(0, MaskAdapter(runner, gamma=gamma, rank=rank, layers=layers))
            history.append({**held_out(step), "resumed": True, "untrained": {
                k: v for k, v in untrained.items() if k.startswith("accuracy")}})
            log(f"step {step} on this run's held-out sets: {describe(history[-1])}; "
                f"untrained: {describe(untrained)}")
    # The untrained figures on this run's held-out sets.
    baseline = next(({"step": 0, **h["untrained"]} for h in reversed(history)
                     if h.get("held_out") == signature and "untrained" in h), history[0])
    gen = torch.Generator().manual_seed(seed + step)
    deadline = time.time() + minutes * 60 if minutes else math.inf
    bar = tqdm(total=steps, initial=step, disable=not progress, desc="s3d train")
    started = time.time()
    first_step = step
    trained_tokens = 0
    last_loss: float | None = None
    saved_step = step
    last_entry: dict | None = None  # the latest held-out figures of this run

    def train_step(seq, attach: torch.Tensor) -> float | None:
        """One optimiser step on ``seq``'s masks at ``attach``; its loss (None: no target)."""
        nonlocal trained_tokens
        logits, greedy = mask_forward(engine, adapter, seq.tokens, attach, layers)
        target = targets_for(greedy, attach, gamma)
        valid = consistent_targets(torch.tensor(seq.tokens), greedy, attach, gamma)
        if not valid.any():
            return None
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               target.reshape(-1), reduction="none")
        loss = (ce * valid.reshape(-1)).sum() / valid.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        trained_tokens += int(valid.sum())
        hits, total = consistent_agreement(logits, target, valid)
        acc = (hits / total.clamp(min=1)).tolist()
        value = loss.item()
        bar.set_postfix_str(f"loss {value:.3f} acc {fmt(acc)}")
        return value

    def checkpoint(at: int) -> None:
        """Held-out figures at step ``at`` into the history, and the checkpoint saved."""
        nonlocal saved_step, last_entry
        entry = last_entry = held_out(at)
        if last_loss is not None:
            entry["loss"] = round(last_loss, 4)
        history.append(entry)
        log(f"step {at}: held-out {describe(entry)}")
        with replacing(ckpt) as tmp:  # killed mid-save, the previous checkpoint stays
            torch.save({"adapter": adapter.state_dict(), "optimizer": opt.state_dict(),
                        "step": at, "history": history, "shape": adapter_shape(adapter),
                        "fingerprint": engine.loaded.fingerprint}, tmp)
        saved_step = at

    while step < steps and time.time() < deadline:
        kind = "text"
        if kinds and float(torch.rand((), generator=gen)) < rollout_share:
            kind = kinds[int(torch.randint(len(kinds), (1,), generator=gen))]
        pool = train_sets[kind]
        seq = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        attach = sample_attach(len(seq.tokens), gamma, attach_per_chunk, gen, seq.first_attach)
        for group in opt.param_groups:
            group["lr"] = learning_rate(lr, step, steps, step - first_step, warmup)
        step += 1
        bar.update()
        if attach.numel():  # a sequence too short for any attach point trains nothing
            loss = train_step(seq, attach)
            last_loss = last_loss if loss is None else loss
        if step % eval_every == 0 or step == steps:
            checkpoint(step)
    if step > saved_step:  # stopped by the deadline between evaluations: keep those steps
        checkpoint(step)
    bar.close()
    # The last step was evaluated by its checkpoint (the adapter unchanged since): not again.
    final = (last_entry if last_entry is not None and last_entry["step"] == step
             else held_out(step))
    data = ("stdlib source, Debian package descriptions, Python docs (if installed), the "
            f"benchmark's and calibration's sources left out; {len(train_sets['text'])} chunks")
    if kinds:
        data += (f"; the base model's greedy continuations ({rollout_tokens} tokens at most) of "
                 + ", ".join(f"{len(train_sets[k])} {k} requests" for k in kinds)
                 + f", {rollout_share:.0%} of the steps")
    accuracy = {k: v for k, v in final.items() if k.startswith("accuracy")}
    meta = {"model_fingerprint": engine.loaded.fingerprint, "model": engine.loaded.path,
            "skip_layers": sorted(skip_layers), "fused": not skip_layers, "steps": step,
            "chunk_len": chunk_len, "attach_per_chunk": attach_per_chunk, "lr": lr,
            **({"warmup": warmup} if warmup else {}),
            "data": f"{data}; every {HELD_OUT_EVERY}th held out",
            "targets": "the base model's own continuation (consistent targets only)",
            **{f"{k}_before": [round(a, 4) for a in baseline[k]] for k in accuracy
               if k in baseline},
            **{f"{k}_after": [round(a, 4) for a in v] for k, v in accuracy.items()},
            "expected_accepted_before": round(expected_accepted(baseline["accuracy"]), 4),
            "expected_accepted_after": round(expected_accepted(final["accuracy"]), 4),
            **{f"expected_accepted_{k.removeprefix('accuracy_')}_after":
               round(expected_accepted(v), 4) for k, v in accuracy.items() if k != "accuracy"},
            "parameters": adapter.num_parameters(),
            "parameter_fraction": round(adapter.num_parameters() / sum(
                p.numel() for p in engine.loaded.model.parameters()), 5),
            "train_tokens_per_s": round(trained_tokens / max(time.time() - started, 1e-6), 1)}
    with replacing(out) as tmp:
        adapter.save(tmp, meta)
    write_text(out.with_suffix(".json"), json.dumps({**meta, "history": history}, indent=2))
    log(f"wrote {out}: {describe(final)}")
    return meta


def adapter_shape(adapter: MaskAdapter) -> list:
    """What an adapter must share with another to continue its training: gamma (what its
    mask rows learned to predict), rank, alpha, layers and target projections."""
    return [adapter.gamma, adapter.rank, adapter.alpha, list(adapter.layers),
            list(adapter.targets)]


SHAPE_FIELDS = "gamma/rank/alpha/layers/targets"


def resumable(ckpt: Path, adapter: MaskAdapter, fingerprint: str, runner) -> dict:
    """The checkpoint's state, refused (``AdapterMismatchError``) when it was saved for another
    model or an adapter of another shape: resuming it would mix a run's settings, silently for
    gamma (the mask embedding's size does not depend on it). Checkpoints from before these
    were saved are checked by their weights' names and sizes. One that cannot be read is
    refused (``CheckpointError``) rather than failing in ``torch.load``'s own words."""
    retry = f"; train with --no-resume, or remove {ckpt}, to start afresh"
    try:
        state = torch.load(ckpt, map_location=runner.device, weights_only=False)
    except Exception as e:  # truncated, not a checkpoint at all, unreadable
        raise CheckpointError(f"checkpoint {ckpt} cannot be read ({type(e).__name__}: "
                              f"{e}){retry}") from e
    missing = sorted({"adapter", "optimizer", "step", "history"}
                     - (set(state) if isinstance(state, dict) else set()))
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} lacks {', '.join(missing)}{retry}")
    saved = state.get("fingerprint")
    if saved is not None and saved != fingerprint:
        raise AdapterMismatchError(
            f"checkpoint {ckpt} is for model {saved}, this one is {fingerprint}{retry}")
    shape = state.get("shape")
    if shape is not None and shape != adapter_shape(adapter):
        raise AdapterMismatchError(f"checkpoint {ckpt} has {SHAPE_FIELDS} {shape}, this run "
                                   f"{adapter_shape(adapter)}{retry}")
    ours = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state["adapter"].items()} != ours:
        raise AdapterMismatchError(f"checkpoint {ckpt} holds an adapter of another rank, "
                                   f"layers or targets than this run's{retry}")
    return state


def warm_start(path: Path, adapter: MaskAdapter, fingerprint: str, runner) -> dict:
    """A checkpoint-like state from an adapter file: its weights (it must be for this model and of
    ``adapter``'s shape), its step count and the history written beside it; no optimizer state."""
    start = MaskAdapter.load(path, runner, fingerprint)
    if adapter_shape(start) != adapter_shape(adapter):
        raise AdapterMismatchError(
            f"adapter {path} has {SHAPE_FIELDS} {adapter_shape(start)}, this run "
            f"{adapter_shape(adapter)}")
    beside = Path(path).with_suffix(".json")
    history = json.loads(beside.read_text()).get("history", []) if beside.exists() else []
    return {"adapter": start.state_dict(), "optimizer": None,
            "step": int(start.metadata.get("steps", 0)), "history": history}


def describe(entry: dict) -> str:
    """A history entry's per-position agreement and expected accepted drafts, set by set."""
    return ", ".join(f"{'text' if k == 'accuracy' else k.removeprefix('accuracy_')} {fmt(v)} "
                     f"(expected accepted {expected_accepted(v):.2f})"
                     for k, v in entry.items()
                     if k.startswith("accuracy") and k != "accuracy_all_targets")


def fmt(acc: list[float]) -> str:
    return "/".join(f"{a:.2f}" for a in acc)

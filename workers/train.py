"""`s3d train`: fit the S3D mask embedding and draft-only adapters by self-distillation.

The base model's own greedy predictions are the targets: for a prefix ending at position t, mask
j (at position t + 1 + j) learns the base model's next-token choice at position t + 1 + j, i.e.
the token j + 2 after the prefix. At inference the tokens between are the base model's own
choices, so a target counts only where the text agrees with them (``consistent_targets``): on
real text about half of the first masks' targets and a quarter of the third's follow a token the
base model would not have chosen, and those are noise the masks can never see coming. Besides
offline text, the data holds the base model's own greedy answers to chat requests
(``chat_rollouts``), where every target is consistent and the text is what chat traffic decodes.
The base model is frozen and its prefix pass runs without gradients; only mask rows, attending to
the cached prefix, carry gradients.
"""

from __future__ import annotations

import glob
import json
import math
import random
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from workers.drafters.s3d import MaskAdapter
from workers.drafters.skip import kept_layers
from workers.engine import Engine
from workers.prompts import as_id_list
from workers.runner import MASK_ID, Attention, DraftRows

HELD_OUT_EVERY = 10  # every 10th chunk is held out


def corpus_texts(max_chars: int = 3_000_000, sources: tuple[str, ...] = ("stdlib", "debian",
                                                                          "pydoc")) -> list[str]:
    """Offline real text: stdlib source, Debian package descriptions, Python docs if installed."""
    texts: list[str] = []
    if "stdlib" in sources:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
            if "test" in path.parts[-2:][0] or path.name.startswith("test"):
                continue
            texts.append(path.read_text(errors="ignore"))
    if "debian" in sources:
        try:
            out = subprocess.run(["dpkg-query", "-W", "-f=${Package}: ${Description}\n\n"],
                                 capture_output=True, text=True, timeout=60).stdout
            texts.extend(t for t in out.split("\n\n") if len(t) > 200)
        except (OSError, subprocess.SubprocessError):
            pass
    if "pydoc" in sources:
        for path in sorted(glob.glob("/usr/share/doc/python3*/html/_sources/**/*.txt",
                                     recursive=True)):
            texts.append(Path(path).read_text(errors="ignore"))
    random.Random(0).shuffle(texts)
    out, total = [], 0
    for t in texts:
        out.append(t)
        total += len(t)
        if total >= max_chars:
            break
    return out


# Chat requests for self-distillation rollouts, filled with installed Debian packages and standard
# library modules (the benchmark's chat questions are hand-written and not among them).
CHAT_TEMPLATES = (
    "What is the Debian package {pkg} used for?",
    "Explain in a few sentences what {pkg} does and who would install it.",
    "How do I get started with {pkg} on Linux? Give me the first steps.",
    "What does the Python module {mod} do? Show a short example.",
    "Write a small Python function that uses the {mod} module, and explain it.",
    "When should I use Python's {mod} module, and what are common mistakes with it?",
)


def chat_requests(count: int, seed: int = 0) -> list[list[dict]]:
    """``count`` single-turn chat requests from ``CHAT_TEMPLATES`` (fixed order for a seed)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Package}\n"], capture_output=True,
                             text=True, timeout=60).stdout
        packages = sorted({p for p in out.split() if p and not p.startswith("lib")})
    except (OSError, subprocess.SubprocessError):
        packages = []
    modules = sorted(m for m in sys.stdlib_module_names if not m.startswith("_"))
    questions = [t.format(pkg=name, mod=name) for t in CHAT_TEMPLATES
                 for name in (packages if "{pkg}" in t else modules)]
    random.Random(seed).shuffle(questions)
    return [[{"role": "user", "content": q}] for q in questions[:count]]


@dataclass
class Sequence:
    """A training sequence: token ids, and where mask attach points may start (a rollout's
    request is not the base model's text, so attach points sit in its answer)."""

    tokens: list[int]
    first_attach: int = 8


def chat_rollouts(engine: Engine, count: int, new_tokens: int = 64, batch: int = 32,
                  log=print) -> list[Sequence]:
    """The base model's greedy answers to ``count`` chat requests (batched, left-padded)."""
    tokenizer, model = engine.tokenizer, engine.loaded.model
    prompts = [as_id_list(tokenizer.apply_chat_template(m, add_generation_prompt=True,
                                                         tokenize=True))
               for m in chat_requests(count)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stops = engine.stops
    out: list[Sequence] = []
    bar = tqdm(total=len(prompts), desc="chat rollouts", disable=len(prompts) < batch)
    for b in range(0, len(order), batch):
        group = [prompts[i] for i in order[b:b + batch]]
        width = max(len(p) for p in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, p in enumerate(group):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            gen = model.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        for row, p in enumerate(group):
            answer = gen[row, width:].tolist()
            cut = next((i + 1 for i, t in enumerate(answer) if t in stops), len(answer))
            out.append(Sequence(p + answer[:cut], first_attach=len(p) - 1))
        bar.update(len(group))
    bar.close()
    log(f"chat rollouts: {len(out)} answers, {sum(len(s.tokens) for s in out)} tokens")
    return out


def chunk_tokens(tokenizer, texts: list[str], length: int) -> list[list[int]]:
    chunks = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for i in range(0, len(ids) - length + 1, length):
            chunks.append(ids[i:i + length])
    return chunks


@dataclass
class Batch:
    attach: torch.Tensor  # [K] attach positions in the chunk
    targets: torch.Tensor  # [K, gamma] base model's greedy tokens j+1 after each attach point


def consistent_targets(chunk: torch.Tensor, greedy: torch.Tensor, attach: torch.Tensor,
                       gamma: int) -> torch.Tensor:
    """``[K, gamma]`` bool: mask j after attach point t has a target the drafter can learn.

    Its target, the base model's choice at t + 1 + j, continues the text ``chunk[t+1..t+1+j]``,
    which the mask does not see; at inference those tokens are the base model's own choices, so
    the target is the base model's continuation only where ``chunk[t+1+i] == greedy[t+i]`` for
    every ``i <= j``.
    """
    idx = attach[:, None] + torch.arange(gamma)[None]
    return (chunk[idx + 1] == greedy[idx]).long().cumprod(-1).bool()


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
    return greedy[idx]


def evaluate(engine: Engine, adapter: MaskAdapter, sequences: list[Sequence],
             attach_per_chunk: int, layers: list[int] | None = None) -> list[float]:
    """Per-position top-1 agreement of the masks with the base model's own continuation on
    held-out sequences (consistent targets only, as at inference)."""
    hits = torch.zeros(adapter.gamma)
    total = torch.zeros(adapter.gamma)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for seq in sequences:
            attach = sample_attach(len(seq.tokens), adapter.gamma, attach_per_chunk, gen,
                                   seq.first_attach)
            logits, greedy = mask_forward(engine, adapter, seq.tokens, attach, layers)
            target = targets_for(greedy, attach, adapter.gamma)
            valid = consistent_targets(torch.tensor(seq.tokens), greedy, attach, adapter.gamma)
            step_hits, step_total = consistent_agreement(logits, target, valid)
            hits += step_hits
            total += step_total
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


def load_rollouts(engine: Engine, path: Path, count: int, new_tokens: int,
                  log=print) -> list[Sequence]:
    """``count`` chat rollouts, generated once and kept in ``path`` for resumed runs."""
    if count <= 0:
        return []
    key = {"model_fingerprint": engine.loaded.fingerprint, "count": count,
           "new_tokens": new_tokens}
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("key") == key:
            log(f"chat rollouts: {len(data['sequences'])} from {path}")
            return [Sequence(**s) for s in data["sequences"]]
    sequences = chat_rollouts(engine, count, new_tokens, log=log)
    path.write_text(json.dumps({"key": key, "sequences": [
        {"tokens": s.tokens, "first_attach": s.first_attach} for s in sequences]}))
    return sequences


def split_held_out(items: list, limit: int) -> tuple[list, list]:
    """Every ``HELD_OUT_EVERY``-th item held out (at most ``limit`` of them), the rest trained."""
    held = [x for i, x in enumerate(items) if i % HELD_OUT_EVERY == 0][:limit]
    return [x for i, x in enumerate(items) if i % HELD_OUT_EVERY != 0], held


def train(engine: Engine, out: Path, *, gamma: int = 3, rank: int = 16, steps: int = 1000,
          minutes: float | None = None, lr: float = 2e-3, chunk_len: int = 256,
          attach_per_chunk: int = 32, max_chars: int = 3_000_000, eval_chunks: int = 16,
          eval_every: int = 200, resume: bool = True, seed: int = 0,
          skip_layers: tuple[int, ...] = (), chat: int = 0, chat_tokens: int = 64,
          chat_share: float = 0.5, log=print, progress: bool = True) -> dict:
    """Self-distil an adapter; with ``skip_layers`` the mask rows run the kept layers only
    (the separate-pass ``s3d_skip`` drafter), else every layer (fused S3D). With ``chat``,
    that many chat rollouts join the data and ``chat_share`` of the steps train on them."""
    torch.manual_seed(seed)
    runner = engine.runner
    for p in engine.loaded.model.parameters():
        p.requires_grad_(False)
    texts = corpus_texts(max_chars)
    train_text, held_text = split_held_out(
        [Sequence(c) for c in chunk_tokens(engine.tokenizer, texts, chunk_len)], eval_chunks)
    log(f"corpus: {len(texts)} texts, {len(train_text)} train / {len(held_text)} held-out "
        f"chunks of {chunk_len} tokens")
    train_chat, held_chat = split_held_out(
        load_rollouts(engine, out.with_suffix(".rollouts.json"), chat, chat_tokens, log),
        eval_chunks)
    layers = kept_layers(runner.num_layers, tuple(skip_layers)) if skip_layers else None
    adapter = MaskAdapter(runner, gamma=gamma, rank=rank, layers=layers)

    def held_out() -> dict[str, list[float]]:
        acc = {"accuracy": evaluate(engine, adapter, held_text, attach_per_chunk, layers)}
        if held_chat:
            acc["accuracy_chat"] = evaluate(engine, adapter, held_chat, attach_per_chunk, layers)
        return acc

    def describe(acc: dict[str, list[float]]) -> str:
        return ", ".join(f"{'chat' if k.endswith('chat') else 'text'} {fmt(v)} (expected "
                         f"accepted {expected_accepted(v):.2f})" for k, v in acc.items()
                         if k in ("accuracy", "accuracy_chat"))

    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    ckpt = out.with_suffix(".ckpt.pt")
    step = 0
    history: list[dict] = []
    state = (torch.load(ckpt, map_location=runner.device, weights_only=False)
             if resume and ckpt.exists() else None)
    if state is None or state["history"][0].get("targets") != "consistent":
        # The untrained adapter's figures, on the held-out sets and metric of this run.
        history.append({"step": 0, "targets": "consistent", **held_out()})
        log(f"held-out per-position accuracy before training: {describe(history[0])}")
    if state is not None:
        adapter.load_state_dict(state["adapter"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        for entry in state["history"]:
            if entry.get("targets") != "consistent" and "accuracy" in entry:
                # Measured against every target, consistent or not (earlier runs' metric).
                entry["accuracy_all_targets"] = entry.pop("accuracy")
        history += state["history"]
        log(f"resumed from {ckpt} at step {step}")
    baseline = history[0]
    gen = torch.Generator().manual_seed(seed + step)
    deadline = time.time() + minutes * 60 if minutes else math.inf
    bar = tqdm(total=steps, initial=step, disable=not progress, desc="s3d train")
    started = time.time()
    trained_tokens = 0
    last_loss: float | None = None
    while step < steps and time.time() < deadline:
        use_chat = train_chat and float(torch.rand((), generator=gen)) < chat_share
        pool = train_chat if use_chat else train_text
        seq = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        attach = sample_attach(len(seq.tokens), gamma, attach_per_chunk, gen, seq.first_attach)
        cosine = 0.5 * (1 + math.cos(math.pi * min(step / max(steps, 1), 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * cosine)
        step += 1
        bar.update()
        if attach.numel() == 0:
            continue
        logits, greedy = mask_forward(engine, adapter, seq.tokens, attach, layers)
        target = targets_for(greedy, attach, gamma)
        valid = consistent_targets(torch.tensor(seq.tokens), greedy, attach, gamma)
        if valid.any():
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   target.reshape(-1), reduction="none")
            loss = (ce * valid.reshape(-1)).sum() / valid.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            opt.step()
            trained_tokens += int(valid.sum())
            last_loss = loss.item()
            hits, total = consistent_agreement(logits, target, valid)
            acc = (hits / total.clamp(min=1)).tolist()
            bar.set_postfix_str(f"loss {last_loss:.3f} acc {fmt(acc)}")
        if step % eval_every == 0 or step == steps:
            entry = {"step": step, "targets": "consistent", **held_out()}
            if last_loss is not None:
                entry["loss"] = round(last_loss, 4)
            history.append(entry)
            log(f"step {step}: held-out {describe(entry)}")
            torch.save({"adapter": adapter.state_dict(), "optimizer": opt.state_dict(),
                        "step": step, "history": history}, ckpt)
    bar.close()
    final = held_out()
    data = ("stdlib source, Debian package descriptions, Python docs (if installed); "
            f"{len(train_text)} chunks")
    if train_chat:
        data += (f"; the base model's greedy answers ({chat_tokens} tokens at most) to "
                 f"{len(train_chat)} chat requests, {chat_share:.0%} of the steps")
    meta = {"model_fingerprint": engine.loaded.fingerprint, "model": engine.loaded.path,
            "skip_layers": sorted(skip_layers), "fused": not skip_layers, "steps": step,
            "chunk_len": chunk_len, "attach_per_chunk": attach_per_chunk, "lr": lr,
            "data": f"{data}; every {HELD_OUT_EVERY}th held out",
            "targets": "the base model's own continuation (consistent targets only)",
            **{f"{k}_before": [round(a, 4) for a in baseline[k]] for k in final if k in baseline},
            **{f"{k}_after": [round(a, 4) for a in v] for k, v in final.items()},
            "expected_accepted_before": round(expected_accepted(baseline["accuracy"]), 4),
            "expected_accepted_after": round(expected_accepted(final["accuracy"]), 4),
            "parameters": adapter.num_parameters(),
            "parameter_fraction": round(adapter.num_parameters() / sum(
                p.numel() for p in engine.loaded.model.parameters()), 5),
            "train_tokens_per_s": round(trained_tokens / max(time.time() - started, 1e-6), 1)}
    if "accuracy_chat" in final:
        meta["expected_accepted_chat_after"] = round(expected_accepted(final["accuracy_chat"]), 4)
    adapter.save(out, meta)
    (out.with_suffix(".json")).write_text(json.dumps({**meta, "history": history}, indent=2))
    log(f"wrote {out}: {describe(final)}")
    return meta


def fmt(acc: list[float]) -> str:
    return "/".join(f"{a:.2f}" for a in acc)

"""`s3d train`: fit the S3D mask embedding and draft-only adapters by self-distillation.

The base model's own greedy predictions on offline text are the targets: for a real prefix ending
at position t, mask j (at position t + j) learns the base model's next-token choice at position
t + j, i.e. the token j + 1 after the prefix. The base model is frozen and its prefix pass runs
without gradients; only mask rows, attending to the cached prefix, carry gradients.
"""

from __future__ import annotations

import glob
import json
import math
import random
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from workers.drafters.s3d import MaskAdapter
from workers.drafters.skip import kept_layers
from workers.engine import Engine
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


def evaluate(engine: Engine, adapter: MaskAdapter, chunks: list[list[int]],
             attach_per_chunk: int, layers: list[int] | None = None) -> list[float]:
    """Per-position top-1 agreement of the masks with the base model on held-out chunks."""
    hits = torch.zeros(adapter.gamma)
    total = 0
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for chunk in chunks:
            attach = sample_attach(len(chunk), adapter.gamma, attach_per_chunk, gen)
            logits, greedy = mask_forward(engine, adapter, chunk, attach, layers)
            target = targets_for(greedy, attach, adapter.gamma)
            hits += (logits.argmax(-1) == target).float().sum(0)
            total += attach.shape[0]
    return (hits / max(total, 1)).tolist()


def sample_attach(length: int, gamma: int, k: int, gen: torch.Generator) -> torch.Tensor:
    last = length - gamma - 2
    return torch.randperm(last - 7, generator=gen)[:k].sort().values + 8


def expected_accepted(acc: list[float]) -> float:
    """Expected accepted drafts of a chain whose position-j drafts agree with probability acc[j]
    (as if independent): sum over j of prod(acc[:j+1])."""
    out, run = 0.0, 1.0
    for a in acc:
        run *= a
        out += run
    return out


def train(engine: Engine, out: Path, *, gamma: int = 3, rank: int = 16, steps: int = 1000,
          minutes: float | None = None, lr: float = 2e-3, chunk_len: int = 256,
          attach_per_chunk: int = 32, max_chars: int = 3_000_000, eval_chunks: int = 16,
          eval_every: int = 200, resume: bool = True, seed: int = 0,
          skip_layers: tuple[int, ...] = (), log=print, progress: bool = True) -> dict:
    """Self-distil an adapter; with ``skip_layers`` the mask rows run the kept layers only
    (the separate-pass ``s3d_skip`` drafter), else every layer (fused S3D)."""
    torch.manual_seed(seed)
    runner = engine.runner
    for p in engine.loaded.model.parameters():
        p.requires_grad_(False)
    texts = corpus_texts(max_chars)
    chunks = chunk_tokens(engine.tokenizer, texts, chunk_len)
    held = [c for i, c in enumerate(chunks) if i % HELD_OUT_EVERY == 0][:eval_chunks]
    train_chunks = [c for i, c in enumerate(chunks) if i % HELD_OUT_EVERY != 0]
    log(f"corpus: {len(texts)} texts, {len(train_chunks)} train / {len(held)} held-out chunks "
        f"of {chunk_len} tokens")
    layers = kept_layers(runner.num_layers, tuple(skip_layers)) if skip_layers else None
    adapter = MaskAdapter(runner, gamma=gamma, rank=rank, layers=layers)
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    ckpt = out.with_suffix(".ckpt.pt")
    step = 0
    history: list[dict] = []
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location=runner.device, weights_only=False)
        adapter.load_state_dict(state["adapter"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        log(f"resumed from {ckpt} at step {step}")
    baseline = history[0]["accuracy"] if history else evaluate(engine, adapter, held,
                                                               attach_per_chunk, layers)
    if not history:
        history.append({"step": 0, "accuracy": baseline})
        log(f"held-out per-position accuracy before training: {fmt(baseline)}")
    gen = torch.Generator().manual_seed(seed + step)
    deadline = time.time() + minutes * 60 if minutes else math.inf
    bar = tqdm(total=steps, initial=step, disable=not progress, desc="s3d train")
    started = time.time()
    trained_tokens = 0
    while step < steps and time.time() < deadline:
        chunk = train_chunks[int(torch.randint(len(train_chunks), (1,), generator=gen))]
        attach = sample_attach(len(chunk), gamma, attach_per_chunk, gen)
        cosine = 0.5 * (1 + math.cos(math.pi * min(step / max(steps, 1), 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * cosine)
        logits, greedy = mask_forward(engine, adapter, chunk, attach, layers)
        target = targets_for(greedy, attach, gamma)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        step += 1
        trained_tokens += target.numel()
        acc = (logits.argmax(-1) == target).float().mean(0).tolist()
        bar.set_postfix_str(f"loss {loss.item():.3f} acc {fmt(acc)}")
        bar.update()
        if step % eval_every == 0 or step == steps:
            held_acc = evaluate(engine, adapter, held, attach_per_chunk, layers)
            history.append({"step": step, "accuracy": held_acc, "loss": round(loss.item(), 4)})
            log(f"step {step}: held-out accuracy {fmt(held_acc)}, expected accepted "
                f"{expected_accepted(held_acc):.2f}")
            torch.save({"adapter": adapter.state_dict(), "optimizer": opt.state_dict(),
                        "step": step, "history": history}, ckpt)
    bar.close()
    final = evaluate(engine, adapter, held, attach_per_chunk, layers)
    meta = {"model_fingerprint": engine.loaded.fingerprint, "model": engine.loaded.path,
            "skip_layers": sorted(skip_layers), "fused": not skip_layers, "steps": step,
            "chunk_len": chunk_len, "attach_per_chunk": attach_per_chunk, "lr": lr,
            "data": "stdlib source, Debian package descriptions, Python docs (if installed); "
                    f"{len(train_chunks)} chunks, every {HELD_OUT_EVERY}th held out",
            "accuracy_before": [round(a, 4) for a in baseline],
            "accuracy_after": [round(a, 4) for a in final],
            "expected_accepted_before": round(expected_accepted(baseline), 4),
            "expected_accepted_after": round(expected_accepted(final), 4),
            "parameters": adapter.num_parameters(),
            "parameter_fraction": round(adapter.num_parameters() / sum(
                p.numel() for p in engine.loaded.model.parameters()), 5),
            "train_tokens_per_s": round(trained_tokens / max(time.time() - started, 1e-6), 1)}
    adapter.save(out, meta)
    (out.with_suffix(".json")).write_text(json.dumps({**meta, "history": history}, indent=2))
    log(f"wrote {out}: accuracy {fmt(baseline)} -> {fmt(final)}")
    return meta


def fmt(acc: list[float]) -> str:
    return "/".join(f"{a:.2f}" for a in acc)

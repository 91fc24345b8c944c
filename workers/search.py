"""`s3d search`: pick skip sets and arm parameters by measurement, and write a profile.

Stage 1 scores every candidate skip set (contiguous blocks of middle layers) by teacher-forced
agreement: how often the skipped model's top-1 is the full model's greedy token on calibration
text, and turns that into an expected speedup with measured forward costs (DESIGN.md's formula).
Stage 2 decodes the calibration prompts with the best few candidates as real arms, and with a few
n-gram and S3D (fused mask-token) settings, and keeps the arm of each drafter kind with the highest
measured goodput (tokens per second). Calibration text
is not the benchmark suite: stdlib modules and questions the suite does not use.
"""

from __future__ import annotations

import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.arm import NONE_ARM, Arm, Profile
from workers.drafters.s3d import BUNDLED_ADAPTER
from workers.engine import Engine
from workers.runner import Attention

CALIBRATION_MODULES = ("os.py", "argparse.py", "random.py", "pathlib.py", "tarfile.py")
CALIBRATION_QUESTIONS = (
    "How do I read a CSV file in Python and compute the average of one column?",
    "Explain the difference between a process and a thread.",
    "Give me three tips for writing clear commit messages.",
    "Summarize what a hash table is and why lookups are fast.",
)


def calibration_prompts(tokenizer, max_prompt_tokens: int = 200) -> list[list[int]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for name in CALIBRATION_MODULES:
        path = stdlib / name
        if not path.exists():
            continue
        text = path.read_text(errors="ignore")
        start = text.find("\ndef ", len(text) // 3)
        snippet = text[max(0, start - 600): start + 200]
        prompts.append(tokenizer(snippet)["input_ids"][-max_prompt_tokens:])
    for q in CALIBRATION_QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                            add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys")
                            else ids))
    return prompts


@dataclass
class Candidate:
    skip: tuple[int, ...]
    top1: float  # teacher-forced agreement of the skipped model's top-1
    top4: float
    est_speedup: float = 0.0


def candidate_skip_sets(num_layers: int, lengths=(2, 4, 6, 8, 10)) -> list[tuple[int, ...]]:
    """Contiguous blocks that keep the first and last two layers."""
    out = []
    for length in lengths:
        for start in range(2, num_layers - 2 - length + 1, 2):
            out.append(tuple(range(start, start + length)))
    return out


def _forward_time(engine: Engine, tokens: int, layers=None, repeats: int = 5) -> float:
    runner = engine.runner
    cache = runner.new_cache(400)
    runner.forward(cache, torch.arange(200) % 1000, torch.arange(200), Attention.causal(0))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.forward(cache, torch.arange(tokens), torch.arange(200, 200 + tokens),
                       Attention.causal(200), layers, logits_rows=slice(-1, None))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def teacher_forced(engine: Engine, sequences: list[tuple[list[int], int]],
                   skip: tuple[int, ...]) -> tuple[float, float]:
    """Top-1 / top-4 agreement of the skipped model with the full model's greedy tokens."""
    runner = engine.runner
    layers = [i for i in range(runner.num_layers) if i not in set(skip)]
    hit1 = hit4 = total = 0
    for seq, prompt_len in sequences:
        cache = runner.new_cache(len(seq) + 1)
        logits = runner.forward(cache, torch.tensor(seq), torch.arange(len(seq)),
                                Attention.causal(0), layers,
                                logits_rows=slice(prompt_len - 1, len(seq) - 1))
        target = torch.tensor(seq[prompt_len:])
        top4 = logits.topk(4, -1).indices
        hit1 += int((top4[:, 0] == target).sum())
        hit4 += int((top4 == target[:, None]).any(-1).sum())
        total += len(target)
    return hit1 / total, hit4 / total


def measure_goodput(engine: Engine, prompts: list[list[int]], arm: Arm, max_tokens: int) -> dict:
    tokens = 0
    seconds = 0.0
    accepted_len = []
    for ids in prompts:
        gen = engine.generation(ids, max_tokens, arm)
        t0 = time.perf_counter()
        gen.run()
        seconds += time.perf_counter() - t0
        tokens += len(gen.output)
        accepted_len.append(gen.stats.mean_acceptance_length)
    return {"tokens_per_s": tokens / seconds,
            "mean_accepted_length": sum(accepted_len) / len(accepted_len)}


def search(engine: Engine, max_tokens: int = 48, finalists: int = 3,
           adapter_path: str | None = None, lengths: tuple[int, ...] = (2, 4, 6, 8, 10),
           max_prompts: int | None = None, log=print) -> Profile:
    runner = engine.runner
    prompts = calibration_prompts(engine.tokenizer)[:max_prompts]
    sequences = []
    for ids in prompts:
        gen = engine.generation(ids, max_tokens, NONE_ARM)
        sequences.append((ids + gen.run(), len(ids)))
    full_1 = _forward_time(engine, 1)
    verify = {g: _forward_time(engine, g + 1) for g in (2, 4)}
    draft_s: dict[int, float] = {}  # a skipped pass's measured cost, by number of layers kept
    candidates = []
    for skip in candidate_skip_sets(runner.num_layers, lengths):
        top1, top4 = teacher_forced(engine, sequences, skip)
        kept = [i for i in range(runner.num_layers) if i not in skip]
        if len(kept) not in draft_s:
            draft_s[len(kept)] = _forward_time(engine, 1, kept)
        best = 0.0
        for gamma, verify_s in verify.items():
            expected = (1 - top1 ** (gamma + 1)) / (1 - top1) if top1 < 1 else gamma + 1
            best = max(best, expected * full_1 / (gamma * draft_s[len(kept)] + verify_s))
        candidates.append(Candidate(skip, top1, top4, best))
        log(f"skip {skip[0]}-{skip[-1]}: top1 {top1:.2f} top4 {top4:.2f} est {best:.2f}x")
    candidates.sort(key=lambda c: -c.est_speedup)
    arms: list[Arm] = [NONE_ARM]
    measured: dict[str, dict] = {"none": measure_goodput(engine, prompts, NONE_ARM, max_tokens)}
    kinds: dict[str, list[Arm]] = {
        "skip_chain": [Arm(name="skip_chain", drafter="skip_chain", skip_layers=c.skip, depth=d)
                       for c in candidates[:finalists] for d in (3, 5)],
        "skip_tree": [Arm(name="skip_tree", drafter="skip_tree", skip_layers=c.skip, **v)
                      for c in candidates[:finalists]
                      for v in (dict(depth=3, top_k=2, total_tokens=6),
                                dict(depth=4, top_k=3, total_tokens=10))],
        "ngram_tree": [Arm(name="ngram_tree", drafter="ngram_tree", depth=d, top_k=4,
                           total_tokens=t) for d, t in ((4, 8), (6, 16), (8, 24))],
    }
    adapter = Path(adapter_path) if adapter_path else BUNDLED_ADAPTER
    if adapter.exists():
        for kind in ("s3d", "hybrid"):
            kinds[kind] = [Arm(name=kind, drafter=kind, adapter=adapter_path, **v) for v in (
                dict(depth=3, top_k=1, total_tokens=3, attach=2),
                dict(depth=3, top_k=2, total_tokens=6, attach=3),
                dict(depth=6, top_k=2, total_tokens=10, attach=3))]
    for kind, variants in kinds.items():
        best_arm, best_fig = None, None
        for arm in variants:
            fig = measure_goodput(engine, prompts, arm, max_tokens)
            log(f"{kind} {arm.model_dump(exclude_defaults=True, exclude={'name', 'drafter'})}: "
                f"{fig['tokens_per_s']:.2f} tok/s, MAL {fig['mean_accepted_length']:.2f}")
            if best_fig is None or fig["tokens_per_s"] > best_fig["tokens_per_s"]:
                best_arm, best_fig = arm, fig
        arms.append(best_arm)
        measured[kind] = best_fig
    default = max(measured, key=lambda k: measured[k]["tokens_per_s"])
    return Profile(model_fingerprint=engine.loaded.fingerprint, default_arm=default, arms=arms,
                   notes={
                       "method": "teacher-forced agreement over contiguous skip blocks, then "
                                 "measured goodput of the best candidates on calibration prompts",
                       "dtype": str(runner.dtype).replace("torch.", ""),
                       "device": str(runner.device),
                       "max_tokens": max_tokens,
                       "candidates": [{"skip": list(c.skip), "top1": round(c.top1, 3),
                                       "top4": round(c.top4, 3),
                                       "est_speedup": round(c.est_speedup, 3)}
                                      for c in candidates[:10]],
                       "measured": {k: {kk: round(vv, 3) for kk, vv in v.items()}
                                    for k, v in measured.items()},
                   })

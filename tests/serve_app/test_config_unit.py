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

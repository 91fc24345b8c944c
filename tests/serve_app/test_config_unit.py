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

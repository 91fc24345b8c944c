"""Preparing the bundled model: once, whoever asks for it at the same time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.model

PREPARE = ("from workers.model import prepare_bundled_model; "
           "print(prepare_bundled_model(progress=print))")


def test_processes_preparing_the_bundled_model_at_once_take_turns(tmp_path):
    """An ingress and its decoder replicas on a cold cache prepare the model at the same time:
    they shared one temporary folder and renamed it away from each other. One prepares; the
    other waits for it and finds the folder ready."""
    env = {**os.environ, "S3D_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    out = tmp_path / "models" / "smollm2-135m-instruct"
    assert all(o.strip().endswith(str(out)) for o in outputs), outputs
    assert sum(o.count("Preparing the bundled model") for o in outputs) == 1, outputs
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    # Nothing left beside it but the lock.
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".lock"]

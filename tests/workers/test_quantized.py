"""bitsandbytes 8-bit weights run through the same runner and drafters unchanged."""

import pytest

from workers.arm import Arm
from workers.engine import Engine

pytestmark = pytest.mark.model


def test_8bit_weights_decode_through_the_runner(bundled):
    engine = Engine.load("bundled", dtype="bfloat16", device="cpu", quantization="8bit")
    layer = engine.runner.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear8bitLt"
    prompt = bundled.prompts[0]
    plain = engine.generation(prompt, 12, "none").run()
    assert len(plain) >= 1
    arm = Arm(name="ng", drafter="ngram_tree", depth=4, top_k=2, total_tokens=8)
    drafted = engine.generation(prompt, 12, arm)
    drafted.run()
    assert drafted.stats.num_spec_steps >= 1
    # Mixed-precision multi-row and single-row matmuls may round differently, so the check is
    # that the quantized model still writes the same opening token as its own plain decoding.
    assert drafted.output[0] == plain[0]

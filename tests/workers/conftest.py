"""Engine fixtures: the bundled model in float32, loaded once, and memoised vanilla outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from workers.arm import NONE_ARM, Arm
from workers.engine import Generation, stop_token_ids
from workers.model import LoadedModel, load_model
from workers.prompts import load_prompts
from workers.runner import ModelRunner
from workers.sampling import SamplingParams


@dataclass
class Bundled:
    loaded: LoadedModel
    runner: ModelRunner
    stops: frozenset[int]
    prompts: list[list[int]]
    _vanilla: dict = field(default_factory=dict)

    def generate(self, prompt: list[int], max_tokens: int, arm: Arm = NONE_ARM,
                 params: SamplingParams | None = None, adapter=None, pool=None) -> Generation:
        gen = Generation(self.runner, prompt, max_tokens, arm, params or SamplingParams(),
                         stop_token_ids=self.stops, adapter_for=lambda a: adapter, pool=pool)
        gen.run()
        return gen

    def accepted_if_identical(self, arm: Arm, prompts: int, max_tokens: int,
                              adapter=None, pool=None) -> int:
        """Greedy-decode the first ``prompts`` prompts with ``arm``; assert each output equals
        plain decoding; return the drafts accepted in all (to check drafting really happened)."""
        accepted = 0
        for index in range(prompts):
            gen = self.generate(self.prompts[index], max_tokens, arm, adapter=adapter, pool=pool)
            assert gen.output == self.vanilla(index, max_tokens), f"prompt {index}"
            accepted += gen.stats.num_accepted_tokens
        return accepted

    def vanilla(self, index: int, max_tokens: int) -> list[int]:
        key = (index, max_tokens)
        if key not in self._vanilla:
            self._vanilla[key] = self.generate(self.prompts[index], max_tokens).output
        return self._vanilla[key]


@pytest.fixture(scope="session")
def bundled() -> Bundled:
    torch.set_num_threads(2)
    loaded = load_model("bundled", dtype="float32", device="cpu")
    prompts = [p.to_token_ids(loaded.tokenizer) for p in load_prompts()]
    stops = stop_token_ids(loaded.tokenizer, loaded.model)
    return Bundled(loaded, ModelRunner(loaded.model), stops, prompts)


class Killed(BaseException):
    """The process killed in the middle of a write."""


def cut_short(monkeypatch, owner, name: str, target: int = 1) -> None:
    """``owner.name``, a writer whose ``target``-th argument is the file, writes part of a file
    there and is killed."""
    def write(*args, **kwargs):
        Path(args[target]).write_bytes(b"PK\x03\x04 cut short")
        raise Killed

    monkeypatch.setattr(owner, name, write)

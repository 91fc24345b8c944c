"""Drafters behind one interface; ``make_drafter`` builds the one an arm names."""

from __future__ import annotations

from collections.abc import Callable

from workers.arm import ADAPTER_DRAFTERS, Arm
from workers.drafters.base import DraftContext, Drafter, NoDrafter
from workers.drafters.ngram import NgramDrafter
from workers.drafters.s3d import MaskAdapter, S3DDrafter, S3DSkipDrafter
from workers.drafters.skip import SkipChainDrafter, SkipTreeDrafter


def make_drafter(arm: Arm, num_layers: int,
                 adapter_for: Callable[[Arm], MaskAdapter] | None = None) -> Drafter:
    if arm.drafter in ADAPTER_DRAFTERS:
        if adapter_for is None:
            raise ValueError(f"arm {arm.name!r} needs an S3D adapter and none can be loaded")
        if arm.drafter == "s3d_skip":
            return S3DSkipDrafter(arm, adapter_for(arm), num_layers)
        return S3DDrafter(arm, adapter_for(arm), hybrid=arm.drafter == "hybrid")
    if arm.drafter == "none":
        return NoDrafter()
    if arm.drafter == "skip_chain":
        return SkipChainDrafter(arm, num_layers)
    if arm.drafter == "skip_tree":
        return SkipTreeDrafter(arm, num_layers)
    if arm.drafter == "ngram_tree":
        return NgramDrafter(arm)
    raise ValueError(f"unknown drafter {arm.drafter!r}")


__all__ = ["DraftContext", "Drafter", "make_drafter"]

"""Model families behind the engine's one protocol (`DiffusionModel`, see `base.py`).

A family is one file here (its layer maths, config reader and checkpoint names) plus one entry in `FAMILIES`; the
loop, the session, the cache, the policies and the environment never name a family.
"""

from __future__ import annotations

from typing import Any

from cache_core.models.base import DiffusionModel, ModelFacts, PartialForwardTrace, check_trace_attention
from cache_core.models.llada import LLaDAModel, ModelConfig

# config.json `model_type` -> family. Our own checkpoints and LLaDA's say "llada"; a config without model_type is
# one of our checkpoints written before the key was recorded, which are LLaDA-layout.
FAMILIES: dict[str, type[DiffusionModel]] = {"llada": LLaDAModel}
DEFAULT_MODEL_TYPE = "llada"


def family_of(raw: dict[str, Any], source: str) -> type[DiffusionModel]:
    """The family class of a checkpoint's config.json."""
    from cache_core.checkpoint import CheckpointError

    model_type = raw.get("model_type", DEFAULT_MODEL_TYPE)
    key = str(model_type).lower()
    if key not in FAMILIES:
        raise CheckpointError(f"{source}: model_type={model_type!r} is not a supported family (supported: "
                              f"{sorted(FAMILIES)}); add one under cache_core/models/ (see its README section)")
    return FAMILIES[key]


__all__ = ["DEFAULT_MODEL_TYPE", "FAMILIES", "DiffusionModel", "LLaDAModel", "ModelConfig", "ModelFacts",
           "PartialForwardTrace", "check_trace_attention", "family_of"]

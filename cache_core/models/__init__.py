"""Model families behind the engine's one protocol (`DiffusionModel`, see `base.py`).

A family is one file here (its layer maths, config reader and checkpoint names) plus one entry in `FAMILIES`; the
loop, the session, the cache, the policies and the environment never name a family.
"""

from __future__ import annotations

from typing import Any

from cache_core.models.base import DiffusionModel, ModelFacts, PartialForwardTrace, check_trace_attention
from cache_core.models.dit import DiTConfig, DiTModel
from cache_core.models.dream import DreamModel
from cache_core.models.hf_layout import DecoderConfig
from cache_core.models.llada import LLaDAModel, ModelConfig
from cache_core.models.llada_moe import MOE_KEYS, LLaDAMoEModel, MoEConfig

# Family name -> class. `family_of` maps a config.json's model_type onto these.
FAMILIES: dict[str, type[DiffusionModel]] = {"llada": LLaDAModel, "dream": DreamModel, "llada_moe": LLaDAMoEModel,
                                             "dit": DiTModel}
# model_type spellings seen in released configs. A config without model_type is one of our checkpoints written before
# the key was recorded, which are LLaDA-layout.
MODEL_TYPES = {"llada": "llada", "dream": "dream", "llada_moe": "llada_moe", "lladamoe": "llada_moe", "dit": "dit"}
DEFAULT_MODEL_TYPE = "llada"


def family_of(raw: dict[str, Any], source: str) -> type[DiffusionModel]:
    """The family class of a checkpoint's config.json."""
    from cache_core.checkpoint import CheckpointError

    model_type = raw.get("model_type", DEFAULT_MODEL_TYPE)
    key = MODEL_TYPES.get(str(model_type).lower())
    if key is None:
        raise CheckpointError(f"{source}: model_type={model_type!r} is not a supported family (supported: "
                              f"{sorted(set(MODEL_TYPES))}); add one under cache_core/models/ (see the README)")
    if key == "llada" and any(k in raw for k in MOE_KEYS):
        key = "llada_moe"  # LLaDA-MoE's released config says model_type "llada" and carries the MoE keys
    return FAMILIES[key]


__all__ = ["DEFAULT_MODEL_TYPE", "FAMILIES", "DecoderConfig", "DiTConfig", "DiTModel", "DiffusionModel", "DreamModel",
           "LLaDAMoEModel", "LLaDAModel", "MoEConfig", "ModelConfig", "ModelFacts", "PartialForwardTrace",
           "check_trace_attention", "family_of"]

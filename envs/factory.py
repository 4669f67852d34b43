"""One way to build an environment for any model family: `make_env` returns the text env (`BlockReuseEnv`) or the
image env (`ImageReuseEnv`) by what it is given, so the jobs (collect, RL's vector envs, the Ray workers) never name
a family. Both envs have the same observation layout, action codec and info keys (`env.schema` says which feature
schema the observation is)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from envs.config import EnvConfig


def image_settings(settings: dict[str, Any]) -> bool:
    """Whether keyword settings describe an image env: image-only keys, or a model_path holding a DiT."""
    from envs.image_env import ImageEnvConfig

    image_only = set(ImageEnvConfig.__dataclass_fields__) - set(EnvConfig.__dataclass_fields__)
    if image_only & set(settings):
        return True
    path = settings.get("model_path")
    if path is None:
        return False
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    from cache_core.checkpoint import read_json
    from cache_core.models import family_of

    return family_of(read_json(config, "model config"), str(config)).modality == "image"


def make_env(config: Any = None, model: Any = None, **settings: Any) -> Any:
    """The env of a config (`EnvConfig` / `ImageEnvConfig`), of a model object (its `modality`), or of keyword
    settings (image keys or a DiT model_path make an image env)."""
    from envs.block_reuse_env import BlockReuseEnv
    from envs.image_env import ImageEnvConfig, ImageReuseEnv

    if config is not None:
        image = isinstance(config, ImageEnvConfig)
    elif model is not None:
        image = model.modality == "image"
    else:
        image = image_settings(settings)
    cls = ImageReuseEnv if image else BlockReuseEnv
    if model is not None:
        return cls(model, config=config, **settings) if config is not None else cls(model, **settings)
    return cls(config=config) if config is not None else cls(**settings)

"""Save and load model checkpoints: one loader for every family, our own checkpoints and local real-model directories.

A checkpoint directory holds `config.json` and `model.safetensors` (or shards listed in `model.safetensors.index.json`),
plus an optional `tokenizer.json` and a `blockreuse` entry in the config. The config's `model_type` picks the family
(`cache_core.models.FAMILIES`); the family reads its config keys and names its weights. Our own format *is* the LLaDA
layout, so the built-in model loads exactly like a real LLaDA checkpoint and a LLaDA directory needs no conversion.
Weights are read with safetensors only: no pickle is ever loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cache_core.models import DiffusionModel, family_of
from cache_core.validate import read_json_object

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is; the message names the problem and the fix."""


def read_json(path: Path, what: str) -> dict[str, Any]:
    return read_json_object(path, what, CheckpointError, "the file is corrupt")


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / INDEX_FILE
    try:
        if index.exists():
            weight_map = read_json(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                path = (directory / str(shard)).resolve()
                if path.parent != directory.resolve():  # a shard path may not leave the checkpoint directory
                    raise CheckpointError(f"{index}: shard {shard!r} lies outside {directory}; refusing to read it")
                tensors.update(load_file(path))
            return tensors
        if (directory / WEIGHTS_FILE).exists():
            return load_file(directory / WEIGHTS_FILE)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{directory}: cannot read weights ({err}); the file is corrupt or truncated") from err
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE} found")


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a checkpoint directory (our own or a local real-model directory) into an eval-mode model."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; is this a checkpoint directory?")
    raw = read_json(config_path, "model config")
    family = family_of(raw, str(config_path))
    cfg = family.config_from_dict(raw, str(config_path))
    with torch.device("meta"):
        model = family(cfg)
    expected = {name: t.shape for name, t in model.checkpoint_tensors().items()}
    tensors = _read_weights(directory)
    for name in model.optional_checkpoint_names():
        tensors.pop(name, None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not match config.json (missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); check {family.layer_count_key} and "
            f"that the weights use {family.weight_names_hint}"
        )
    for name, shape in expected.items():
        tensor = tensors[name]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{directory}: {name} holds {bad} NaN/inf values; the checkpoint is corrupt (a "
                                  "diverged training run or a damaged file): re-download or re-train it")
        if tensor.shape != shape:
            raise CheckpointError(
                f"{directory}: {name} has shape {tuple(tensors[name].shape)} but config.json implies {tuple(shape)}; "
                f"the config does not describe these weights (check {family.shape_keys})"
            )
    state = {k: v.to(dtype) for k, v in model.checkpoint_state(tensors).items()}
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()


def save_checkpoint(model: DiffusionModel, directory: str | Path, tokenizer: Any | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json) in the model family's layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = {"model_type": model.family, **model.config_dict()}
    raw["blockreuse"] = {"format_version": FORMAT_VERSION, **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.checkpoint_tensors().items()}
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def load_tokenizer(directory: str | Path):
    """The tokenizer saved beside a checkpoint (built-in models only; LLaDA's tokenizer is not bundled)."""
    from cache_core.tokenizer import Tokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").exists():
        raise CheckpointError(f"{directory}: no tokenizer.json (only the built-in checkpoints ship one)")
    return Tokenizer.load(directory)


def read_extra(directory: str | Path) -> dict[str, Any]:
    """The `blockreuse` entry of a checkpoint's config (task settings, training metrics), or {}."""
    return read_json(Path(directory) / CONFIG_FILE, "model config").get("blockreuse", {})

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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

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


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards of its index (confined to the directory) or the one file."""
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = []
        for shard in sorted(set(map(str, weight_map.values()))):
            path = (directory / shard).resolve()
            if path.parent != directory.resolve():  # a shard path may not leave the checkpoint directory
                raise CheckpointError(f"{index}: shard {shard!r} lies outside {directory}; refusing to read it")
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {shard!r} is missing from {directory}; the download is "
                                      "incomplete")
            files.append(path)
        return files
    if (directory / WEIGHTS_FILE).exists():
        return [directory / WEIGHTS_FILE]
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE} found")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA (what the released models run in), fp32 elsewhere (CPU bf16 matmuls are slow and inexact)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(directory: str | Path, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a checkpoint directory (our own or a local real-model directory) into an eval-mode model.

    The family comes from config.json. The model is built on the meta device and each tensor is read from its shard,
    converted to `dtype` (default: bf16 on CUDA, fp32 on CPU), moved to `device` and assigned, one shard open at a
    time: the weights are never held twice (on the CPU a tensor already in `dtype` stays a view of the file).
    """
    directory = Path(directory)
    device = torch.device(device)
    dtype = default_dtype(device) if dtype is None else dtype
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; is this a checkpoint directory?")
    raw = read_json(config_path, "model config")
    family = family_of(raw, str(config_path))
    cfg = family.config_from_dict(raw, str(config_path))
    with torch.device("meta"):
        model = family(cfg)
    expected = {name: t.shape for name, t in model.checkpoint_tensors().items()}
    optional = model.optional_checkpoint_names()
    tensors: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for path in _weight_files(directory):
        try:
            with safe_open(path, framework="pt") as shard:
                for name in shard.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name in optional:
                        continue
                    if name not in expected:
                        unexpected.append(name)
                        continue
                    tensors[name] = _checked(directory, name, shard.get_tensor(name), expected[name], family,
                                             dtype, device)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: cannot read weights ({err}); the file is corrupt or truncated") from err
    missing = sorted(set(expected) - set(tensors))
    if missing or unexpected:
        unexpected.sort()
        raise CheckpointError(
            f"{directory}: weights do not match config.json (missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); check {family.layer_count_key} and "
            f"that the weights use {family.weight_names_hint} (an unexpected bias means a setting this family does "
            "not implement)"
        )
    model.load_state_dict(model.checkpoint_state(tensors), assign=True)
    return model.eval()


def _checked(directory: Path, name: str, tensor: torch.Tensor, shape: torch.Size, family: type[DiffusionModel],
             dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if tensor.shape != shape:
        raise CheckpointError(
            f"{directory}: {name} has shape {tuple(tensor.shape)} but config.json implies {tuple(shape)}; "
            f"the config does not describe these weights (check {family.shape_keys})"
        )
    if tensor.is_floating_point():
        finite = bool(torch.isfinite(tensor).all())
        if not finite:
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{directory}: {name} holds {bad} NaN/inf values; the checkpoint is corrupt (a "
                                  "diverged training run or a damaged file): re-download or re-train it")
        tensor = tensor.to(device=device, dtype=dtype)
    return tensor


def save_checkpoint(model: DiffusionModel, directory: str | Path, tokenizer: Any | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json) in the model family's layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = {"model_type": model.model_type or model.family, **model.config_dict()}
    raw["blockreuse"] = {"format_version": FORMAT_VERSION, **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.checkpoint_tensors().items()}
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def load_tokenizer(directory: str | Path):
    """The Hugging Face tokenizer of a checkpoint or model directory, with the model's mask / EOS / pad ids; refused
    when its vocabulary reaches past the model's embedding."""
    from cache_core.tokenizer import Tokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").exists():
        raise CheckpointError(f"{directory}: no tokenizer.json; a model directory needs its Hugging Face "
                              "tokenizer.json (the built-in checkpoints ship one)")
    try:
        tokenizer = Tokenizer.load(directory)
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(str(err)) from err
    config_path = directory / CONFIG_FILE
    if config_path.exists():
        raw = read_json(config_path, "model config")
        cfg = family_of(raw, str(config_path)).config_from_dict(raw, str(config_path))
        try:
            tokenizer.check_model(cfg.vocab_size, str(config_path))
        except ValueError as err:
            raise CheckpointError(str(err)) from err
    return tokenizer


def read_extra(directory: str | Path) -> dict[str, Any]:
    """The `blockreuse` entry of a checkpoint's config (task settings, training metrics), or {}."""
    return read_json(Path(directory) / CONFIG_FILE, "model config").get("blockreuse", {})

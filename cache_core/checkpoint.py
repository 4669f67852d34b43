"""Save and load model checkpoints: one loader for our own checkpoints and local LLaDA directories.

Our format *is* the LLaDA layout (`config.json` + `model.safetensors` with `model.transformer.*` names), plus an
optional `tokenizer.json` and a `blockreuse` entry in the config. So the built-in model loads exactly like a real
LLaDA checkpoint, and a LLaDA directory (possibly sharded, with `model.safetensors.index.json`) needs no conversion.
Weights are read with safetensors only: no pickle is ever loaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cache_core.model import LLaDAModel, ModelConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHT_PREFIX = "model."
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# LLaDA config keys that do not change the maths we implement (bookkeeping, training-only settings).
_IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "torch_dtype", "transformers_version", "use_cache", "init_device",
    "init_fn", "init_std", "init_cutoff_factor", "eos_token_id", "pad_token_id", "bos_token_id", "mlp_ratio",
    "attention_dropout", "residual_dropout", "embedding_dropout", "precision", "flash_attention", "rope_full_precision",
    "blockreuse", "alibi_bias_max", "block_group_size", "attention_layer_norm_with_affine", "layer_norm_with_affine",
    "bias_for_layer_norm", "multi_query_attention", "new_embedding_init_range", "emb_init_std",
}
# Keys whose value must be the one we implement; anything else is a different architecture.
_REQUIRED_VALUES = {
    "activation_type": {"silu", "swiglu"},
    "alibi": {False},
    "rope": {True},
    "include_bias": {False},
    "include_qkv_bias": {False, None},
    "layer_norm_type": {"rms"},  # OLMo/LLaDA "default" and "low_precision" are LayerNorm (mean-centred)
    "scale_logits": {False, None},  # True multiplies the logits by 1/sqrt(d_model)
    "input_emb_norm": {False, None},  # True multiplies the embeddings by sqrt(d_model)
    "block_type": {"llama"},
    "attention_layer_norm": {False},
    "clip_qkv": {None},
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is; the message names the problem and the fix."""


def config_from_dict(raw: dict[str, Any], source: str = "config") -> ModelConfig:
    """Build a ModelConfig from LLaDA-style config keys; refuse settings of another architecture."""
    for key, allowed in _REQUIRED_VALUES.items():
        if key in raw and raw[key] not in allowed:
            raise CheckpointError(
                f"{source}: {key}={raw[key]!r} is not supported (supported: {sorted(map(str, allowed))}); "
                "this loader implements LLaDA's architecture only"
            )
    known = ModelConfig.field_names()
    unknown = set(raw) - known - _IGNORED_KEYS - set(_REQUIRED_VALUES)
    if unknown:
        # A key we do not know may change the architecture: say so rather than ignore it silently.
        log.warning("%s: ignoring unknown config keys %s", source, sorted(unknown))
    missing = {"vocab_size", "mask_token_id"} - set(raw)
    if missing:
        raise CheckpointError(f"{source}: missing required keys {sorted(missing)}")
    try:
        return ModelConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from err


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / INDEX_FILE
    try:
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(load_file(directory / shard))
            return tensors
        if (directory / WEIGHTS_FILE).exists():
            return load_file(directory / WEIGHTS_FILE)
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{directory}: cannot read weights ({err}); the file is corrupt or truncated") from err
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE} found")


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LLaDAModel:
    """Load our own checkpoint or a local LLaDA checkpoint directory into an eval-mode LLaDAModel."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; is this a checkpoint directory?")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: invalid JSON ({err})") from err
    cfg = config_from_dict(raw, str(config_path))
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    expected = {WEIGHT_PREFIX + k: v.shape for k, v in model.state_dict().items()}
    tensors = _read_weights(directory)
    if cfg.weight_tying:
        tensors.pop(WEIGHT_PREFIX + "transformer.ff_out.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not match config.json (missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); check n_layers and that the "
            "weights use LLaDA names (model.transformer.blocks.{i}.q_proj.weight, ...)"
        )
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise CheckpointError(
                f"{directory}: {name} has shape {tuple(tensors[name].shape)} but config.json implies {tuple(shape)}; "
                "the config does not describe these weights (check d_model, n_heads, n_kv_heads, mlp_hidden_size, "
                "embedding_size)"
            )
    state = {k[len(WEIGHT_PREFIX):]: v.to(dtype) for k, v in tensors.items()}
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()


def save_checkpoint(model: LLaDAModel, directory: str | Path, tokenizer: Any | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json) in the LLaDA layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = model.config.to_dict()
    raw["blockreuse"] = {"format_version": FORMAT_VERSION, **(extra or {})}
    state = {WEIGHT_PREFIX + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
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
    return json.loads((Path(directory) / CONFIG_FILE).read_text()).get("blockreuse", {})

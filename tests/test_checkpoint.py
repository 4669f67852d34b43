"""Loading LLaDA-format checkpoint directories (sharded and not) and our own format; every refusal names the problem."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, llada_config, random_state, reference_logits, tiny_config, tiny_model, write_llada_dir
from safetensors.torch import save_file

from cache_core import CheckpointError, load_model, save_checkpoint
from cache_core.checkpoint import read_extra

BLOCK_PARTS = ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch):
    """Loading must never unpickle: any call to torch.load or pickle.load(s) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint loader used pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def ids_batch(seed: int = 0, shape=(2, 13)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def llada_state(cfg, seed: int, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """LLaDA ships bf16 weights; the reference reads the very same (rounded) tensors."""
    return {k: v.to(dtype) for k, v in random_state(cfg, seed).items()}


def check_logits(model, state: dict[str, torch.Tensor], cfg_raw: dict, prefix: str = "") -> None:
    ids = ids_batch()
    with torch.no_grad():
        logits = model(ids)
    torch.testing.assert_close(logits.double(), reference_logits(state, cfg_raw, ids, prefix=prefix),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# LLaDA directories
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_sharded_llada_directory_loads_and_matches_reference(tmp_path: Path, n_kv_heads: int) -> None:
    cfg = tiny_config(n_kv_heads=n_kv_heads)
    assert cfg.embedding_size > cfg.vocab_size  # padded embedding, like LLaDA
    tensors = write_llada_dir(tmp_path, cfg, llada_state(cfg, 11), n_shards=3)
    # the directory looks like LLaDA's
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert "model.transformer.blocks.1.up_proj.weight" in index["weight_map"]
    assert all((tmp_path / f"model-0000{i}-of-00003.safetensors").exists() for i in (1, 2, 3))
    assert not (tmp_path / "model.safetensors").exists()
    for i in range(cfg.n_layers):
        for part in BLOCK_PARTS:
            assert f"model.transformer.blocks.{i}.{part}.weight" in tensors
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "llada" and raw["block_type"] == "llama" and raw["alibi"] is False

    model = load_model(tmp_path)
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.n_kv_heads == n_kv_heads
    assert model.config.embedding_size == cfg.embedding_size and model.config.vocab_size == cfg.vocab_size
    assert model.config.mask_token_id == cfg.mask_token_id
    for name, t in tensors.items():
        torch.testing.assert_close(model.state_dict()[name[len("model."):]], t.float(), atol=0, rtol=0)
    check_logits(model, tensors, raw, prefix="model.")


def test_unsharded_llada_directory(tmp_path: Path) -> None:
    cfg = tiny_config(n_kv_heads=1, n_layers=3, rope_theta=500000.0)
    tensors = write_llada_dir(tmp_path, cfg, llada_state(cfg, 12, torch.float32), n_shards=1)
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path)
    assert model.config.n_layers == 3 and model.config.rope_theta == 500000.0
    check_logits(model, tensors, llada_config(cfg), prefix="model.")


def test_load_in_bfloat16(tmp_path: Path) -> None:
    cfg = tiny_config()
    write_llada_dir(tmp_path, cfg, llada_state(cfg, 13), n_shards=2)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(ids_batch()).dtype == torch.float32


def test_weight_tied_llada_directory(tmp_path: Path) -> None:
    cfg = tiny_config(weight_tying=True)
    state = random_state(cfg, 14)
    tensors = write_llada_dir(tmp_path, cfg, state, n_shards=2)
    model = load_model(tmp_path)
    assert model.config.weight_tying
    check_logits(model, tensors, llada_config(cfg), prefix="model.")


def test_llada_bookkeeping_keys_load_without_unknown_key_warning(tmp_path: Path, caplog) -> None:
    """LLaDA-8B's own config.json has `alibi_bias_max` and `block_group_size`; neither changes the maths, yet the
    loader warns that it ignores 'unknown config keys' (a warning meant for keys that may change the architecture).
    ENGINE BUG (minor): add both to checkpoint._IGNORED_KEYS."""
    cfg = tiny_config()
    write_llada_dir(tmp_path, cfg, llada_state(cfg, 15), n_shards=2)
    with caplog.at_level(logging.WARNING, logger="cache_core.checkpoint"):
        load_model(tmp_path)
    assert not [r for r in caplog.records if "unknown config keys" in r.getMessage()], caplog.text


def test_really_unknown_key_is_warned_about(tmp_path: Path, caplog) -> None:
    cfg = tiny_config()
    write_llada_dir(tmp_path, cfg, llada_state(cfg, 15), n_shards=1, config=llada_config(cfg, sliding_window=64))
    with caplog.at_level(logging.WARNING, logger="cache_core.checkpoint"):
        load_model(tmp_path)
    assert "sliding_window" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Our own format
# ---------------------------------------------------------------------------------------------------------------
def test_own_format_round_trip(tmp_path: Path) -> None:
    model = tiny_model(21, n_kv_heads=2)
    out = save_checkpoint(model, tmp_path / "ckpt", extra={"task": "copy", "metric": 0.5})
    assert out == tmp_path / "ckpt"
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    raw = json.loads((out / "config.json").read_text())
    assert raw["blockreuse"]["format_version"] == 1
    assert read_extra(out) == {"format_version": 1, "task": "copy", "metric": 0.5}
    loaded = load_model(out)
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = ids_batch(3)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_own_format_is_llada_named(tmp_path: Path) -> None:
    model = tiny_model(22)
    save_checkpoint(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.transformer.blocks.0.q_proj.weight" in names
    assert "model.transformer.ff_out.weight" in names
    assert all(n.startswith("model.transformer.") for n in names)


# ---------------------------------------------------------------------------------------------------------------
# Errors: each names the problem
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def llada_dir(tmp_path: Path) -> Path:
    cfg = tiny_config(n_kv_heads=2)
    write_llada_dir(tmp_path, cfg, llada_state(cfg, 31), n_shards=2)
    return tmp_path


def edit_config(directory: Path, **changes) -> None:
    raw = json.loads((directory / "config.json").read_text())
    raw.update(changes)
    (directory / "config.json").write_text(json.dumps(raw))


def rewrite_unsharded(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    for f in directory.glob("model*.safetensors*"):
        f.unlink()
    save_file(tensors, directory / "model.safetensors")


def test_config_shape_mismatch(llada_dir: Path) -> None:
    edit_config(llada_dir, d_model=64)
    with pytest.raises(CheckpointError, match=r"has shape \([\d, ]+\) but config.json implies \([\d, ]+\).*d_model"):
        load_model(llada_dir)


def test_n_kv_heads_mismatch(llada_dir: Path) -> None:
    edit_config(llada_dir, n_kv_heads=4)
    with pytest.raises(CheckpointError, match=r"[kv]_proj.weight has shape \(16, 32\).*n_kv_heads"):
        load_model(llada_dir)


def test_mlp_hidden_size_mismatch(llada_dir: Path) -> None:
    edit_config(llada_dir, mlp_hidden_size=64)
    with pytest.raises(CheckpointError, match=r"ff_proj.weight has shape.*mlp_hidden_size"):
        load_model(llada_dir)


def test_n_layers_mismatch_names_missing_blocks(llada_dir: Path) -> None:
    edit_config(llada_dir, n_layers=3)
    with pytest.raises(CheckpointError, match=r"missing \[.*model.transformer.blocks.2.*n_layers"):
        load_model(llada_dir)


def test_missing_key(tmp_path: Path) -> None:
    cfg = tiny_config()
    state = random_state(cfg, 32)
    del state["transformer.blocks.1.up_proj.weight"]
    write_llada_dir(tmp_path, cfg, state, n_shards=2)
    with pytest.raises(CheckpointError, match=r"missing \['model.transformer.blocks.1.up_proj.weight'\]"):
        load_model(tmp_path)


def test_missing_head(tmp_path: Path) -> None:
    cfg = tiny_config()
    state = random_state(cfg, 32)
    del state["transformer.ff_out.weight"]
    write_llada_dir(tmp_path, cfg, state, n_shards=1)
    with pytest.raises(CheckpointError, match=r"missing \['model.transformer.ff_out.weight'\]"):
        load_model(tmp_path)


def test_unexpected_key(tmp_path: Path) -> None:
    cfg = tiny_config()
    state = random_state(cfg, 33)
    state["transformer.blocks.0.q_proj.bias"] = torch.zeros(cfg.d_model)
    write_llada_dir(tmp_path, cfg, state, n_shards=2)
    with pytest.raises(CheckpointError, match=r"unexpected \['model.transformer.blocks.0.q_proj.bias'\]"):
        load_model(tmp_path)


def test_unprefixed_names_are_refused(tmp_path: Path) -> None:
    """Weights without LLaDA's `model.` prefix are all unexpected and the message says what names to use."""
    cfg = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(llada_config(cfg)))
    save_file({k: v.contiguous() for k, v in random_state(cfg, 34).items()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"LLaDA names \(model.transformer.blocks"):
        load_model(tmp_path)


def test_truncated_shard(llada_dir: Path) -> None:
    shard = llada_dir / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(llada_dir)


def test_garbage_safetensors_file(tmp_path: Path) -> None:
    cfg = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(llada_config(cfg)))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path)


def test_missing_shard(llada_dir: Path) -> None:
    (llada_dir / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors. is missing.*incomplete"):
        load_model(llada_dir)


def test_index_without_weight_map(llada_dir: Path) -> None:
    (llada_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_model(llada_dir)


def test_missing_config(llada_dir: Path) -> None:
    (llada_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(llada_dir)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "does-not-exist")


def test_invalid_json(llada_dir: Path) -> None:
    (llada_dir / "config.json").write_text('{"d_model": 32,')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(llada_dir)


def test_missing_required_config_key(llada_dir: Path) -> None:
    raw = json.loads((llada_dir / "config.json").read_text())
    del raw["mask_token_id"]
    (llada_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"missing required keys \['mask_token_id'\]"):
        load_model(llada_dir)


def test_invalid_config_values(llada_dir: Path) -> None:
    edit_config(llada_dir, n_heads=3)
    with pytest.raises(CheckpointError, match="d_model=32 is not a multiple of n_heads=3"):
        load_model(llada_dir)


def test_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(llada_config(tiny_config())))
    with pytest.raises(CheckpointError, match=r"no model.safetensors or model.safetensors.index.json"):
        load_model(tmp_path)


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    """A pytorch_model.bin alone (a pickle) is never opened; the message says which files are needed."""
    (tmp_path / "config.json").write_text(json.dumps(llada_config(tiny_config())))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 this would be a pickle")
    with pytest.raises(CheckpointError, match=r"no model.safetensors or model.safetensors.index.json"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("alibi", True),
        ("include_bias", True),
        ("include_qkv_bias", True),
        ("rope", False),
        ("block_type", "sequential"),
        ("activation_type", "gelu"),
        ("layer_norm_type", "gemma_rms"),
        ("attention_layer_norm", True),
        ("clip_qkv", 8.0),
    ],
)
def test_unsupported_architecture_values(llada_dir: Path, key: str, value) -> None:
    edit_config(llada_dir, **{key: value})
    with pytest.raises(CheckpointError, match=f"{key}={value!r} is not supported"):
        load_model(llada_dir)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        # LLaDA/OLMo multiply the logits by 1/sqrt(d_model) when scale_logits is true
        ("scale_logits", True),
        # ... and the embeddings by sqrt(d_model) when input_emb_norm is true
        ("input_emb_norm", True),
        # ... and layer_norm_type "default" is LayerNorm (mean-centred), not RMSNorm
        ("layer_norm_type", "default"),
    ],
)
def test_settings_that_change_the_maths_are_refused(llada_dir: Path, key: str, value) -> None:
    """ENGINE BUG: these LLaDA settings change the forward, but the loader ignores them (`scale_logits`,
    `input_emb_norm` sit in _IGNORED_KEYS; `layer_norm_type` accepts "default") and silently loads a model whose
    logits differ from the checkpoint's."""
    edit_config(llada_dir, **{key: value})
    with pytest.raises(CheckpointError, match=key):
        load_model(llada_dir)

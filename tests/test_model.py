"""LLaDAModel.forward against an independent implementation of LLaDA's maths (helpers.reference_logits)."""

from __future__ import annotations

import pytest
import torch
from helpers import EMBEDDING, MASK_ID, VOCAB, model_state, reference_logits, tiny_config, tiny_model

from cache_core.models import LLaDAModel, ModelConfig

ATOL = 1e-5
RTOL = 1e-5


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_matches_independent_llada(seed: int, n_kv_heads: int) -> None:
    model = tiny_model(seed, n_kv_heads=n_kv_heads)
    assert model.config.n_kv_heads == n_kv_heads
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(seed))
    ids[0, 5] = MASK_ID
    with torch.no_grad():
        logits = model(ids)
    assert logits.dtype == torch.float32
    assert logits.shape == (3, 17, VOCAB)  # padded embedding rows are never real tokens
    assert_logits_close(logits, reference_logits(model_state(model), model.config, ids))


def test_forward_three_layers_wider_model_and_other_theta() -> None:
    model = tiny_model(5, n_kv_heads=2, d_model=64, n_layers=3, n_heads=8, mlp_hidden_size=96, rope_theta=500000.0)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(ids)
    assert_logits_close(logits, reference_logits(model_state(model), model.config, ids))


def test_forward_weight_tying_uses_embedding_as_head() -> None:
    model = tiny_model(2, weight_tying=True)
    assert "transformer.ff_out.weight" not in model.state_dict()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids)
    assert_logits_close(logits, reference_logits(model_state(model), model.config, ids))


def test_forward_explicit_positions() -> None:
    model = tiny_model(3, n_kv_heads=2)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    positions = torch.stack([torch.arange(12) + 7, torch.arange(12).flip(0)])
    with torch.no_grad():
        logits = model(ids, positions=positions)
        default = model(ids)
    assert_logits_close(logits, reference_logits(model_state(model), model.config, ids, positions=positions))
    assert not torch.allclose(logits, default, atol=1e-3), "positions must change the result (RoPE)"


def test_rope_is_relative() -> None:
    """Bidirectional attention with RoPE depends only on relative positions: a constant shift changes nothing."""
    model = tiny_model(4)
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = model(ids, positions=torch.arange(10)[None])
        b = model(ids, positions=torch.arange(10)[None] + 13)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_padded_batch_matches_each_row_alone(n_kv_heads: int) -> None:
    """Left padding hidden by key_mask with positions starting at 0 at the first real token: each row's real
    positions get the logits of that row computed alone, whatever the padding ids are."""
    model = tiny_model(7, n_kv_heads=n_kv_heads)
    state = model_state(model)
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, VOCAB, (n,), generator=g) for n in (11, 4, 8)]
    N = 11
    ids = torch.randint(0, VOCAB, (3, N), generator=g)  # random padding ids
    key_mask = torch.zeros(3, N, dtype=torch.bool)
    positions = torch.zeros(3, N, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, N - len(r):] = r
        key_mask[b, N - len(r):] = True
        positions[b, N - len(r):] = torch.arange(len(r))
    with torch.no_grad():
        logits = model(ids, key_mask=key_mask, positions=positions)
        other_padding = ids.clone()
        other_padding[~key_mask] = (other_padding[~key_mask] + 1) % VOCAB
        logits2 = model(other_padding, key_mask=key_mask, positions=positions)
    assert torch.isfinite(logits).all()
    for b, r in enumerate(rows):
        alone = reference_logits(state, model.config, r[None])
        assert_logits_close(logits[b, N - len(r):], alone[0])
        # and the batched reference agrees on the real positions too
        batched = reference_logits(state, model.config, ids[b:b + 1], key_mask[b:b + 1], positions[b:b + 1])
        assert_logits_close(logits[b, N - len(r):], batched[0, N - len(r):])
    torch.testing.assert_close(logits[key_mask], logits2[key_mask], atol=1e-6, rtol=0)


def test_return_kv_shapes_and_values() -> None:
    model = tiny_model(8, n_kv_heads=2)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        logits, keys, values = model(ids, return_kv=True)
        plain = model(ids)
    cfg = model.config
    assert len(keys) == len(values) == cfg.n_layers
    for k, v in zip(keys, values):
        assert k.shape == v.shape == (2, cfg.n_kv_heads, 6, cfg.head_dim)
    torch.testing.assert_close(logits, plain)
    # layer-0 values are v_proj(attn_norm(embedding)) (no rotary on values)
    state = model_state(model)
    x = state["transformer.wte.weight"][ids]
    norm_w = state["transformer.blocks.0.attn_norm.weight"]
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * norm_w
    v0 = (h @ state["transformer.blocks.0.v_proj.weight"].T).view(2, 6, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    torch.testing.assert_close(values[0], v0, atol=1e-5, rtol=1e-5)


def test_bf16_model_returns_fp32_logits_close_to_reference() -> None:
    model = tiny_model(9)
    state = model_state(model)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits = model.to(torch.bfloat16)(ids)
    assert logits.dtype == torch.float32
    ref = reference_logits(state, model.config, ids)
    assert (logits.double() - ref).abs().max() < 0.25 * ref.abs().max()
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.7


def test_forward_input_errors() -> None:
    model = tiny_model(0, max_sequence_length=16)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's max_sequence_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly the maximum is fine


# ---------------------------------------------------------------------------------------------------------------
# ModelConfig
# ---------------------------------------------------------------------------------------------------------------
def test_config_defaults_and_derived_sizes() -> None:
    cfg = ModelConfig(vocab_size=40, mask_token_id=39, d_model=32, n_heads=4)
    assert cfg.n_kv_heads == 4 and cfg.embedding_size == 40
    assert cfg.head_dim == 8 and cfg.d_kv == 32
    cfg = tiny_config(n_kv_heads=1)
    assert cfg.d_kv == 8 and cfg.embedding_size == EMBEDDING
    assert ModelConfig(**cfg.to_dict()) == cfg
    assert {"vocab_size", "mask_token_id", "d_model", "n_kv_heads", "embedding_size"} <= ModelConfig.field_names()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(d_model=30, n_heads=4), "d_model=30 is not a multiple of n_heads=4"),
        (dict(n_heads=4, n_kv_heads=3), "n_heads=4 is not a multiple of n_kv_heads=3"),
        (dict(d_model=12, n_heads=4), "head dim 3 must be even"),
        (dict(embedding_size=30), "embedding_size=30 < vocab_size=40"),
        (dict(mask_token_id=48), "mask_token_id=48 outside the embedding"),
        (dict(mask_token_id=-1), "mask_token_id=-1 outside the embedding"),
        (dict(n_layers=0), "n_layers must be positive"),
        (dict(mlp_hidden_size=-4), "mlp_hidden_size must be positive"),
        (dict(max_sequence_length=0), "max_sequence_length must be positive"),
        (dict(d_model=-32), "d_model must be positive"),
    ],
)
def test_config_validation_errors(overrides: dict, message: str) -> None:
    kw = dict(vocab_size=40, mask_token_id=39, embedding_size=48, d_model=32, n_heads=4)
    kw.update(overrides)
    with pytest.raises(ValueError, match="invalid ModelConfig: .*" + message):
        ModelConfig(**kw)


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as err:
        ModelConfig(vocab_size=40, mask_token_id=50, d_model=30, n_heads=4, n_layers=0)
    text = str(err.value)
    assert "d_model=30" in text and "mask_token_id=50" in text and "n_layers must be positive" in text


@pytest.mark.parametrize(
    ("overrides", "name"),
    [(dict(n_heads=0), "n_heads"), (dict(n_kv_heads=0), "n_kv_heads"), (dict(n_kv_heads=-2), "n_kv_heads")],
)
def test_config_rejects_non_positive_head_counts_with_value_error(overrides: dict, name: str) -> None:
    """ENGINE BUG: n_heads=0 / n_kv_heads=0 raise ZeroDivisionError (`d_model % n_heads` runs before the positivity
    check) and n_kv_heads=-2 is accepted (4 % -2 == 0) and only fails later inside nn.Linear."""
    kw = dict(vocab_size=40, mask_token_id=39, d_model=32, n_heads=4)
    kw.update(overrides)
    with pytest.raises(ValueError, match=f"invalid ModelConfig: .*{name}"):
        ModelConfig(**kw)


def test_model_builds_every_llada_module_name() -> None:
    model = LLaDAModel(tiny_config(n_kv_heads=2))
    names = set(model.state_dict())
    for i in range(2):
        for part in ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
            assert f"transformer.blocks.{i}.{part}.weight" in names
    assert {"transformer.wte.weight", "transformer.ln_f.weight", "transformer.ff_out.weight"} <= names
    sd = model.state_dict()
    assert sd["transformer.blocks.0.k_proj.weight"].shape == (16, 32)
    assert sd["transformer.wte.weight"].shape == (EMBEDDING, 32)
    assert sd["transformer.ff_out.weight"].shape == (EMBEDDING, 32)
    assert not any(n.endswith("bias") for n in names)

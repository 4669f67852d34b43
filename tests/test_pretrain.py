import json

import pytest
import torch
from helpers import compose_cfg

from cache_core.bench.pretrain import (
    answer_targets,
    collate,
    diffusion_loss,
    left_pad,
    noise_mask,
    run,
)
from cache_core.bench.tasks import GEN_LENGTH, Example, TaskSuite
from cache_core.checkpoint import load_model, load_tokenizer
from cache_core.models import LLaDAModel, ModelConfig
from cache_core.tokenizer import Tokenizer

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "mlp_hidden_size": 64}


def test_left_pad_positions_start_at_first_real_token():
    ids, key_mask, positions = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert key_mask.tolist() == [[True, True, True], [False, False, True]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1], []], pad_id=0)


def test_collate_layout():
    tok = Tokenizer()
    exs = [Example("t", "abcd", "xy"), Example("t", "ab", "z")]
    batch = collate(exs, tok)
    assert batch["input_ids"].shape == (2, 4 + GEN_LENGTH)
    assert tok.decode(batch["targets"][0].tolist()) == "xy"
    assert batch["targets"][1, 1:].eq(tok.eos_token_id).all()  # answer then EOS filling
    assert batch["positions"][1, 2:4].tolist() == [0, 1]
    assert batch["positions"][1, 4].item() == 2  # generation continues the prompt's positions
    assert batch["key_mask"][1, :2].tolist() == [False, False]
    with pytest.raises(ValueError, match="no room for EOS"):
        answer_targets([3] * GEN_LENGTH, tok.eos_token_id)


def test_diffusion_loss_masks_only_the_generation_region():
    tok = Tokenizer()
    model = LLaDAModel(ModelConfig(vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id, **TINY))
    batch = collate(TaskSuite().split("train", 3), tok)
    seen = []
    original = model.forward

    def spy(ids, **kw):
        seen.append(ids.clone())
        return original(ids, **kw)

    model.forward = spy
    loss = diffusion_loss(model, batch, tok.mask_token_id, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0
    noisy = seen[0]
    G = batch["targets"].shape[1]
    assert torch.equal(noisy[:, :-G], batch["input_ids"][:, :-G])  # the prompt stays visible
    assert (noisy[:, -G:] == tok.mask_token_id).any()
    loss.backward()
    assert model.transformer["wte"].weight.grad is not None


def test_noise_mask_semi_autoregressive_rows():
    g = torch.Generator().manual_seed(0)
    t = torch.full((400, 1), 0.5)
    iid = noise_mask(t, 64, semi_ar_fraction=0.0, generator=g)
    assert 0.45 < iid.float().mean() < 0.55
    lengths = torch.randint(17, 40, (400,), generator=g)
    semi = noise_mask(t, 64, semi_ar_fraction=1.0, answer_lengths=lengths, generator=g)
    cuts = semi.float().argmax(1)  # first masked position
    for row, cut, n in zip(semi, cuts.tolist(), lengths.tolist()):
        assert not row[:cut].any() and row[cut:].all()  # a clean prefix, then a fully masked suffix
        assert cut <= n  # cut inside the answer (or right after it), not deep in the EOS filling
    assert len(set(cuts.tolist())) > 20  # cut points spread over the answer
    mixed = noise_mask(t, 64, semi_ar_fraction=0.5, answer_lengths=lengths, generator=g)
    is_suffix = torch.stack([r[int(r.float().argmax()):].all() & ~r[:int(r.float().argmax())].any() for r in mixed])
    assert 0.4 < is_suffix.float().mean() < 0.65  # about half the rows (+ rare i.i.d. rows of that shape)


def test_model_group_fills_tokenizer_ids(tmp_path):
    tok = Tokenizer()
    cfg = compose_cfg(tmp_path, *[f"model.{k}={v}" for k, v in TINY.items()]).model.to_model_config(tok)
    assert (cfg.vocab_size, cfg.mask_token_id, cfg.d_model) == (tok.vocab_size, tok.mask_token_id, 32)
    with pytest.raises(ValueError, match="model.vocab_size=10 / model.mask_token_id=1 do not fit the tokenizer"):
        compose_cfg(tmp_path, "model.vocab_size=10", "model.mask_token_id=1").model.to_model_config(tok)


def test_pretrain_smoke_run_writes_loadable_checkpoint(tmp_path):
    cfg = compose_cfg(tmp_path, *[f"model.{k}={v}" for k, v in TINY.items()],
                      "pretrain.steps=4", "pretrain.batch_size=4", "pretrain.warmup_steps=2", "pretrain.eval_every=2",
                      "pretrain.eval_examples=3", "pretrain.test_examples=3", "pretrain.eval_steps=4",
                      "pretrain.log_every=1", f"pretrain.output_dir={tmp_path}", "pretrain.name=tiny",
                      "pretrain.max_minutes=5")
    result = run(cfg)
    out = tmp_path / "tiny"
    assert result["steps"] == 4
    assert set(result["test_exact_match"]) == {"repeat", "succ", "runsum", "all", "char_accuracy"}
    assert [h["step"] for h in result["history"]] == [2, 4]
    model = load_model(out)
    assert model.config.d_model == 32 and model.config.n_kv_heads == 1
    assert load_tokenizer(out).vocab == Tokenizer().vocab
    extra = json.loads((out / "config.json").read_text())["blockreuse"]
    assert extra["task"]["tasks"] == ["repeat", "succ", "runsum"]
    assert extra["steps"] == 4
    assert result["checkpoint_bytes"] < 20e6


def test_pretraining_checks_decode_through_the_one_loop(monkeypatch):
    """The pretraining evaluation has no decode loop of its own: it calls the engine's generate()."""
    import cache_core.bench.pretrain as pretrain

    calls = []
    real = pretrain.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "generate", spy)
    tok = Tokenizer()
    torch.manual_seed(0)
    model = LLaDAModel(ModelConfig(vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id, **TINY)).eval()
    metrics = pretrain.evaluate(model, tok, TaskSuite().split("test", 3), steps=8, batch_size=2)
    assert len(calls) == 2 and all(c["steps"] == 8 and c["gen_length"] == GEN_LENGTH for c in calls)
    assert set(metrics) == {"repeat", "succ", "runsum", "all", "char_accuracy"}
    assert not hasattr(pretrain, "decode_no_cache")

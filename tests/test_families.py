"""Dream and LLaDA-MoE: tiny random directories in the released formats load, match independent implementations,
and run through the one loop with every policy and the environment (LLaDA's own checks are in test_model.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from families import CODE_MARKER, write_family_dir, write_shards
from helpers import random_prompts, reference_generate, tiny_model

from cache_core import generate, load_model, load_tokenizer
from cache_core.cache import RefreshPlan
from cache_core.checkpoint import CheckpointError, save_checkpoint
from cache_core.models import DreamModel, LLaDAMoEModel
from cache_core.registry import policy_registry
from cache_core.session import DecodingSession

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("dream", "llada_moe")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for i, family in enumerate(FAMILIES):
        dirs[family] = root / family
        write_family_dir(dirs[family], family, seed=i)
    return dirs


def _ragged_batch(vocab: int, mask_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids with random padding, key mask and positions counted from each row's first real token."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (3, 13), generator=g)
    ids[ids == mask_id] = 0
    ids[:, -4:] = mask_id
    key_mask = torch.ones(3, 13, dtype=torch.bool)
    key_mask[1, :3] = False
    key_mask[2, :6] = False
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    return ids, key_mask, positions


# --- independent references -------------------------------------------------------------------------------------
def test_dream_matches_transformers_qwen2_after_the_shift(family_dirs) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    raw = json.loads((family_dirs["dream"] / "config.json").read_text())
    model = load_model(family_dirs["dream"])
    assert isinstance(model, DreamModel)
    qcfg = Qwen2Config(**{k: raw[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                               "rope_theta", "max_position_embeddings", "tie_word_embeddings")})
    qcfg._attn_implementation = "eager"
    reference = Qwen2ForCausalLM(qcfg).eval()
    reference.load_state_dict(model.state_dict(), strict=True)  # the same names: Dream *is* the Qwen2 layout
    for layer in reference.model.layers:
        layer.self_attn.is_causal = False  # Dream attends bidirectionally
    ids, key_mask, positions = _ragged_batch(raw["vocab_size"], raw["mask_token_id"])
    # eager attention adds the mask to the scores: 0 where a key is attended, the dtype's minimum where it is padding
    allowed = key_mask[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
    full_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask={"full_attention": full_mask}, position_ids=positions).logits
        expected = torch.cat([expected[:, :1], expected[:, :-1]], dim=1)  # Dream's generation shifts right by one
        ours = model(ids, key_mask, positions)
    real = key_mask
    assert torch.allclose(ours[real], expected[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours[:, 1:], ours[:, :-1])  # the shift is visible: neighbours differ


def _dense_moe_reference(raw: dict, state: dict[str, torch.Tensor], ids: torch.Tensor, key_mask: torch.Tensor,
                         positions: torch.Tensor) -> torch.Tensor:
    """LLaDA-MoE's maths written out densely: every expert runs on every token, weighted by a top-k mask."""
    d, H = raw["hidden_size"], raw["num_attention_heads"]
    Hkv = raw.get("num_key_value_heads") or H
    hd = d // H
    rot = int(hd * raw.get("partial_rotary_factor", 1))
    eps = raw["rms_norm_eps"]
    E, k = raw["num_experts"], raw["num_experts_per_tok"]
    freq = raw["moe_layer_freq"]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rope(t):  # (B, N, heads, hd); rotate-half on the first `rot` channels
        inv = 1.0 / raw["rope_theta"] ** (torch.arange(0, rot, 2).double() / rot)
        ang = positions.double()[..., None] * inv
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, :, None], torch.cat([ang.sin()] * 2, -1)[:, :, None]
        a, rest = t[..., :rot].double(), t[..., rot:]
        half = rot // 2
        rotated = torch.cat([-a[..., half:], a[..., :half]], -1)
        return torch.cat([(a * cos + rotated * sin).float(), rest], -1)

    def swiglu(h, prefix):
        return (F.silu(h @ state[prefix + "gate_proj.weight"].T) * (h @ state[prefix + "up_proj.weight"].T)
                ) @ state[prefix + "down_proj.weight"].T

    x = state["model.embed_tokens.weight"][ids]
    B, N, _ = x.shape
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, state[p + "input_layernorm.weight"])
        q = (h @ state[p + "self_attn.q_proj.weight"].T).view(B, N, H, hd)
        kk = (h @ state[p + "self_attn.k_proj.weight"].T).view(B, N, Hkv, hd)
        v = (h @ state[p + "self_attn.v_proj.weight"].T).view(B, N, Hkv, hd)
        if raw.get("qk_layernorm"):
            q, kk = rms(q, state[p + "self_attn.q_norm.weight"]), rms(kk, state[p + "self_attn.k_norm.weight"])
        q, kk = rope(q), rope(kk)
        kk, v = kk.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        scores = torch.einsum("bnhd,bmhd->bhnm", q, kk) / math.sqrt(hd)
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        att = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v).reshape(B, N, d)
        x = x + att @ state[p + "self_attn.o_proj.weight"].T
        h = rms(x, state[p + "post_attention_layernorm.weight"])
        if freq[i]:
            logits = h @ state[p + "mlp.gate.weight"].T
            scores = logits.softmax(-1) if raw["moe_router_score_function"] == "softmax" else logits.sigmoid()
            top = scores.topk(k, -1).indices
            weight = torch.zeros_like(scores).scatter(-1, top, scores.gather(-1, top))
            if raw.get("norm_topk_prob"):
                weight = weight / weight.sum(-1, keepdim=True)
            weight = weight * raw["routed_scaling_factor"]
            out = sum(weight[..., e:e + 1] * swiglu(h, p + f"mlp.experts.{e}.") for e in range(E))
            if raw.get("shared_expert_intermediate_size"):
                out = out + swiglu(h, p + "mlp.shared_expert.")
        else:
            out = swiglu(h, p + "mlp.")
        x = x + out
    x = rms(x, state["model.norm.weight"])
    return x @ state["lm_head.weight"].T


MOE_VARIANTS = {
    "as_released": {},
    "dense_first_gqa_partial_rope_shared_sigmoid": dict(
        moe_layer_freq=[0, 1, 1], num_key_value_heads=2, partial_rotary_factor=0.5,
        shared_expert_intermediate_size=24, moe_router_score_function="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, qk_layernorm=False),
}


@pytest.mark.parametrize("variant", sorted(MOE_VARIANTS))
def test_llada_moe_matches_a_dense_recomputation(tmp_path, variant) -> None:
    raw = write_family_dir(tmp_path, "llada_moe", seed=5, **MOE_VARIANTS[variant])
    model = load_model(tmp_path)
    assert isinstance(model, LLaDAMoEModel)
    ids, key_mask, positions = _ragged_batch(raw["vocab_size"], raw["mask_token_id"])
    with torch.no_grad():
        ours = model(ids, key_mask, positions)
    expected = _dense_moe_reference(raw, dict(model.state_dict()), ids, key_mask, positions)
    assert torch.allclose(ours[key_mask], expected[key_mask], atol=1e-5, rtol=1e-5)


def test_moe_flops_count_the_experts_that_ran(family_dirs) -> None:
    """Accounting says router + k experts per computed position; hooks count the rows every expert really ran."""
    model = load_model(family_dirs["llada_moe"])
    cfg = model.config
    rows = {"n": 0}

    def count(module, inputs, output):
        rows["n"] += inputs[0].shape[0]

    hooks = [e.register_forward_hook(count) for layer in model.model.layers for e in layer.mlp.experts]
    ids = torch.randint(0, 100, (1, 24))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    assert rows["n"] == 24 * cfg.num_experts_per_tok * cfg.num_hidden_layers
    d, f = cfg.hidden_size, cfg.expert_intermediate_size
    expert_flops = 2 * 3 * d * f * rows["n"]  # what ran, counted by the hooks
    router = 2 * d * cfg.num_experts * 24 * cfg.num_hidden_layers
    attention_part = sum(DreamModel.layer_flops(model, 24.0, 24.0, layer) - model.mlp_flops(24.0, layer)
                         for layer in range(cfg.num_hidden_layers))
    assert sum(model.layer_flops(24.0, 24.0, layer) for layer in range(cfg.num_hidden_layers)) == pytest.approx(
        attention_part + expert_flops + router)


# --- the one loop ------------------------------------------------------------------------------------------------
def _family_model(family: str, family_dirs) -> torch.nn.Module:
    return tiny_model(0, n_kv_heads=2) if family == "llada" else load_model(family_dirs[family])


@pytest.mark.parametrize("family", ("llada", *FAMILIES))
@pytest.mark.parametrize("threshold", (None, 0.3))
def test_always_refresh_equals_the_plain_forward(family, threshold, family_dirs) -> None:
    model = _family_model(family, family_dirs)
    prompts = random_prompts([5, 9, 3], seed=11, vocab=min(model.facts.vocab_size, 64))
    prompts = [[t if t != model.facts.mask_token_id else 0 for t in p] for p in prompts]
    steps = None if threshold is not None else 8
    expected, _ = reference_generate(model, prompts, gen_length=16, block_length=8, steps=steps, threshold=threshold)
    result = generate(model, prompts, gen_length=16, block_length=8, steps=steps, threshold=threshold, policy="full")
    assert torch.equal(result.tokens, expected)
    assert result.stats.flop_fraction == pytest.approx(1.0)


def test_dream_partial_forward_computes_the_position_before_the_block(family_dirs) -> None:
    """With a fresh cache, refreshing only what the session requires gives the full forward's block logits; the
    required set holds the position before the block (its output predicts the block's first token)."""
    model = load_model(family_dirs["dream"])
    session = DecodingSession(model, [[5, 6, 7, 8, 9, 10]], gen_length=16, block_length=8, steps=16)
    session.step(RefreshPlan.refresh_all(1, session.n_blocks))  # commit some tokens
    required = session.required_positions()
    s = session.decoding_block * session.block_length
    everything = torch.zeros_like(session.canvas)
    everything[~session.cache.key_mask] = session.n_layers
    with torch.no_grad():  # refresh every position on the current canvas: the cache is now exact
        model.forward_partial(session.canvas, session.cache, everything, session.block_positions())
    assert bool(required[0, s - 1]) and int(required.sum()) == session.block_length + 1
    with torch.no_grad():
        full = model(session.canvas, session.cache.key_mask, session.cache.positions)
        start = session.cache.start_layers(RefreshPlan.reuse_all(1, session.n_blocks, session.n_layers), required)
        logits, trace = model.forward_partial(session.canvas, session.cache, start, session.block_positions())
    assert torch.allclose(logits, full[:, s:s + session.block_length], atol=1e-5)
    assert int(trace.active_counts[0, 0]) == session.block_length + 1
    start[0, s - 1] = session.n_layers  # a cache that skipped it would predict the first position from itself
    with pytest.raises(ValueError, match="logit_sources"):
        model.forward_partial(session.canvas, session.cache, start, session.block_positions())
    llada = tiny_model(0)
    plain = DecodingSession(llada, [[5, 6, 7]], gen_length=16, block_length=8, steps=16)
    assert int(plain.required_positions().sum()) == 8  # no shift: only the block


def _policy_specs() -> list[tuple[str, dict]]:
    knobs = {"periodic": {"refresh_interval": 2}}
    specs = [(name, knobs.get(name, {})) for name in sorted(policy_registry("text"))]
    specs += [(str(REPO / "checkpoints" / "policies" / f"{name}.onnx"), {}) for name in ("predictor", "rl_agent")]
    return specs


@pytest.mark.parametrize("family", FAMILIES)
def test_every_policy_runs_on_every_family(family, family_dirs) -> None:
    model, tok = load_model(family_dirs[family]), load_tokenizer(family_dirs[family])
    prompts = [tok.encode("repeat abcde"), tok.apply_chat_template([{"role": "user", "content": "succ f"}])]
    for name, knobs in _policy_specs():
        result = generate(model, prompts, gen_length=16, block_length=8, steps=16, policy=name, **knobs)
        assert result.tokens.shape == (2, 16), name
        assert bool((result.tokens != model.facts.mask_token_id).all()), name
        assert 0.0 < result.stats.flop_fraction <= 1.0 + 1e-9, name
        if name.endswith("never"):
            assert result.stats.flop_fraction < 0.9


@pytest.mark.parametrize("family", FAMILIES)
def test_environment_passes_the_checkers_on_every_family(family, family_dirs) -> None:
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    from envs.block_reuse_env import BlockReuseEnv

    model, tok = load_model(family_dirs[family]), load_tokenizer(family_dirs[family])
    pairs = [(tok.encode(p), tok.encode(a)) for p, a in (("repeat ab", "abab"), ("succ c", "cdef"))]
    env = BlockReuseEnv(model, pairs, eos_id=tok.eos_token_id, gen_length=16, block_length=8, steps=8,
                        max_prompt_length=16, budget=[0.3, 0.9])
    check_env(env, skip_render_check=True)
    sb3_check_env(env)
    obs, _ = env.reset(seed=0)
    done, total = False, 0.0
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        total += reward
        done = terminated or truncated
    assert math.isfinite(total) and 0.0 < info["flop_fraction"] <= 1.0 + 1e-9


# --- loading and saving ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_dtype_and_round_trip(family, family_dirs, tmp_path) -> None:
    model = load_model(family_dirs[family])
    assert model.dtype == torch.float32  # the CPU default
    half = load_model(family_dirs[family], dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in half.parameters())
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        full, low = model(ids), half(ids)
    assert (full.softmax(-1) - low.softmax(-1)).abs().max() < 0.05  # bf16 runs the same maths, coarser
    save_checkpoint(model, tmp_path / "copy", tokenizer=load_tokenizer(family_dirs[family]))
    again = load_model(tmp_path / "copy")
    assert type(again) is type(model)
    with torch.no_grad():
        # Not bit-equal: a tensor mapped from a file has that file's alignment, which can change a GEMM's summation
        # order in the last ulp; the values and every prediction are the same.
        reloaded = again(ids)
    diff = (reloaded - full).abs()
    assert float(diff.max()) < 1e-5 and torch.equal(reloaded.argmax(-1), full.argmax(-1)), float(diff.max())
    assert load_tokenizer(tmp_path / "copy").encode("repeat x") == load_tokenizer(family_dirs[family]).encode(
        "repeat x")


MEMORY_SCRIPT = r"""
import json, sys, torch
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from cache_core import load_model
load_model(sys.argv[2])  # one-time costs (torch's lazy initialisation) are not the weights' memory
before = status("VmRSS")
model = load_model(sys.argv[1], dtype=torch.float32)
peak = status("VmHWM")
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "peak": peak, "weights": weights}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
@pytest.mark.parametrize("file_dtype", ("float32", "bfloat16"))
def test_loading_never_holds_two_copies_of_the_weights(tmp_path, file_dtype) -> None:
    """Peak RSS of a fresh process loading a ~130 MB model stays under 1.3x the weight bytes (fp32 in memory)."""
    raw = write_family_dir(tmp_path, "dream", tokenizer=False, n_shards=1, hidden_size=512, intermediate_size=1536,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, vocab_size=8192)
    cls = DreamModel
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in cls(cls.config_from_dict(raw, "t")).checkpoint_tensors().items()}
    dtype = getattr(torch, file_dtype)
    for f in tmp_path.glob("model*.safetensors*"):
        f.unlink()
    tensors = {k: (torch.randn(s) * 0.02).to(dtype) for k, s in shapes.items()}
    write_shards(tmp_path, tensors, n_shards=1 if file_dtype == "float32" else 4)
    del tensors
    warm_up = REPO / "checkpoints" / "builtin"
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(warm_up)], capture_output=True,
                         text=True, check=True, cwd=REPO)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["weights"] > 120e6
    assert figures["peak"] - figures["before"] < 1.3 * figures["weights"], figures


# --- tokenizers --------------------------------------------------------------------------------------------------
def test_hugging_face_tokenizer_with_the_models_ids_and_chat_template(family_dirs) -> None:
    from tokenizers import Tokenizer as Backend

    for family, (mask, end) in {"dream": ("<|mask|>", "<|im_end|>"), "llada_moe": ("<|mdm_mask|>", "<|eot_id|>")
                                }.items():
        directory = family_dirs[family]
        tok = load_tokenizer(directory)
        raw = json.loads((directory / "config.json").read_text())
        backend = Backend.from_file(str(directory / "tokenizer.json"))
        assert tok.mask_token_id == raw["mask_token_id"] == backend.token_to_id(mask)
        assert tok.eos_token_id == raw["eos_token_id"]
        text = "repeat abcde: abcdeabcde"
        assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
        # Generation ends at EOS or end-of-turn: what follows never counts.
        for stop in (raw["eos_token_id"], backend.token_to_id(end)):
            assert tok.decode(tok.encode("abc") + [stop] + tok.encode("zzz")) == "abc"
        chat = tok.apply_chat_template([{"role": "user", "content": "succ f"}])
        rendered = backend.decode(chat, skip_special_tokens=False)
        assert "succ f" in rendered and rendered.index("user") < rendered.index("succ f")
        assert not (directory / CODE_MARKER).exists()  # the tokenizer class named in tokenizer_config never ran


def test_builtin_model_has_no_chat_template() -> None:
    tok = load_tokenizer(REPO / "checkpoints" / "builtin")
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template.*base model"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


# --- bad input ---------------------------------------------------------------------------------------------------
def _edit(directory: Path, **changes) -> None:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            raw.pop(key)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("family,changes,message", [
    ("dream", dict(model_type="gpt2"), r"model_type='gpt2' is not a supported family"),
    ("dream", dict(num_key_value_heads=...), r"missing required keys \['num_key_value_heads'\]"),
    ("dream", dict(use_sliding_window=True), r"use_sliding_window=True is not supported"),
    ("dream", dict(rope_scaling={"type": "yarn", "factor": 4.0}), r"rope_scaling=.*yarn.* is not supported"),
    ("dream", dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    ("llada_moe", dict(attention_bias=True), r"attention_bias=True is not supported"),
    ("llada_moe", dict(router_num_group=8), r"router_num_group=8 is not supported"),
    ("llada_moe", dict(moe_router_enable_expert_bias=True), r"moe_router_enable_expert_bias=True"),
    ("llada_moe", dict(num_experts_per_tok=9), r"num_experts_per_tok=9 must lie in \[1, num_experts=6\]"),
    ("llada_moe", dict(expert_intermediate_size=...), r"missing required keys \['expert_intermediate_size'\]"),
    ("llada_moe", dict(moe_layer_freq=[1, 0]), r"moe_layer_freq must be 3 entries"),
])
def test_bad_configs_are_named(tmp_path, family, changes, message) -> None:
    write_family_dir(tmp_path, family, tokenizer=False)
    _edit(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


def test_unexpected_bias_and_foreign_tokenizer_and_escaping_shard(tmp_path, family_dirs) -> None:
    # A bias where this family has none (an o_proj bias) is another architecture.
    d = tmp_path / "bias"
    write_family_dir(d, "dream", tokenizer=False, n_shards=1)
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model-00001-of-00001.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    save_file(tensors, d / "model-00001-of-00001.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected \['model.layers.0.self_attn.o_proj.bias'\].*bias"):
        load_model(d)
    # A tokenizer with more tokens than the model predicts belongs to another model.
    small = tmp_path / "small"
    write_family_dir(small, "dream", vocab_size=100)
    with pytest.raises(CheckpointError, match=r"has 320 tokens but the model .* predicts only 100"):
        load_tokenizer(small)
    # A shard listed outside the directory is never read.
    esc = tmp_path / "escape"
    write_family_dir(esc, "llada_moe", tokenizer=False)
    index = json.loads((esc / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    (esc / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lies outside"):
        load_model(esc)


def test_evaluate_runs_on_a_real_format_model_directory(family_dirs, tmp_path) -> None:
    """`python train.py mode=evaluate paths.model=<a Dream directory>`: the same table, on that model and its
    Hugging Face tokenizer (a random model answers nothing right; the point is that every policy runs)."""
    from helpers import compose_cfg

    from policies.evaluate import run

    cfg = compose_cfg(tmp_path, f"paths.model={family_dirs['dream']}", "generation.gen_length=16",
                      "generation.block_length=8", "generation.steps=16", "evaluate.n_examples=2",
                      "evaluate.batch_sizes=[2]", "evaluate.thresholds=[0.5]", "evaluate.budgets=[0.3]",
                      "evaluate.progress=false")
    result = run(cfg)
    out = Path(cfg.evaluate.output_dir)
    assert (out / "evaluate.json").is_file() and (out / "evaluate_pareto.png").is_file()
    rows = json.loads((out / "evaluate.json").read_text())["rows"]
    names = {r["policy"] for r in rows}
    assert {"full", "dual_cache(refresh_interval=None)"} <= names and any(n.startswith("predictor") for n in names)
    assert result is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_path(family, family_dirs) -> None:
    """On CUDA the loader defaults to bf16 and the loop runs there: always-refresh equals the plain forward in the
    same dtype, and a cached policy runs."""
    model = load_model(family_dirs[family], device="cuda")
    assert model.dtype == torch.bfloat16 and model.device.type == "cuda"
    prompts = random_prompts([5, 9, 3], seed=11, vocab=64)
    prompts = [[t if t != model.facts.mask_token_id else 0 for t in p] for p in prompts]
    expected, _ = reference_generate(model, prompts, gen_length=16, block_length=8, steps=8)
    result = generate(model, prompts, gen_length=16, block_length=8, steps=8, policy="full")
    assert torch.equal(result.tokens.cpu(), expected.cpu())
    cached = generate(model, prompts, gen_length=16, block_length=8, steps=8, policy="dual_cache")
    assert cached.stats.flop_fraction < 1.0

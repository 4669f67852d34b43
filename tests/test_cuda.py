"""The CUDA path: every policy (heuristics, oracle, the shipped learned predictor) decodes on a GPU exactly as on the
CPU, and pretraining runs on a GPU. Skipped where no GPU is present (CI); run on a GPU machine with
`python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import random_prompts, tiny_model

from cache_core import generate, policy_registry
from cache_core.learned import load_policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GEN, BLOCK, STEPS = 16, 8, 16
PREDICTOR = Path(__file__).resolve().parents[1] / "checkpoints" / "policies" / "predictor.json"


@pytest.fixture(scope="module")
def models():
    cpu = tiny_model(5, n_kv_heads=2)
    return cpu, tiny_model(5, n_kv_heads=2).cuda()


@pytest.mark.parametrize("name", sorted(policy_registry("text")))
def test_policy_decodes_on_cuda_like_on_cpu(models, name: str) -> None:
    cpu, gpu = models
    prompts = random_prompts([6, 13, 2], 5)
    ref = generate(cpu, prompts, GEN, BLOCK, STEPS, policy=name)
    out = generate(gpu, prompts, GEN, BLOCK, STEPS, policy=name)
    assert out.tokens.device.type == "cuda"
    assert out.stats.flop_fraction == pytest.approx(ref.stats.flop_fraction)
    if name == "dllm_cache":
        # Its per-layer pick (the rho share of positions least similar to their cached values) ranks float
        # similarities, and near-ties rank differently across devices: same compute, a few different tokens.
        assert (out.tokens.cpu() == ref.tokens).float().mean() >= 0.75
    else:
        assert torch.equal(out.tokens.cpu(), ref.tokens)


def test_learned_policy_on_cuda(models) -> None:
    cpu, gpu = models
    prompts = random_prompts([6, 13, 2], 7)
    ref = generate(cpu, prompts, GEN, BLOCK, STEPS, policy=load_policy(PREDICTOR))
    out = generate(gpu, prompts, GEN, BLOCK, STEPS, policy=load_policy(PREDICTOR))
    assert torch.equal(out.tokens.cpu(), ref.tokens)
    assert out.stats.flop_fraction == pytest.approx(ref.stats.flop_fraction)


def test_pretrain_on_gpu(tmp_path) -> None:
    from helpers import compose_cfg
    from test_pretrain import TINY

    from cache_core.bench.pretrain import run
    from cache_core.checkpoint import load_model

    cfg = compose_cfg(tmp_path, *[f"model.{k}={v}" for k, v in TINY.items()],
                      "pretrain.accelerator=gpu", "pretrain.steps=4", "pretrain.batch_size=4",
                      "pretrain.warmup_steps=2", "pretrain.eval_every=2", "pretrain.eval_examples=3",
                      "pretrain.test_examples=3",
                      "pretrain.eval_steps=4", f"pretrain.output_dir={tmp_path}", "pretrain.name=tiny",
                      "pretrain.max_minutes=5")
    result = run(cfg)
    assert result["steps"] == 4
    loaded = load_model(tmp_path / "tiny")  # written from GPU tensors, loads on the CPU
    assert loaded.device.type == "cpu"


def test_runtime_parts_on_cuda_match_the_cpu(models) -> None:
    """Memory manager with host offload and side-stream prefetch, the monitor and cache blocks on a GPU: the tokens the
    CPU path decodes (the prefetch copies run on their own stream and are waited for before the layer reads them)."""
    cpu, gpu = models
    prompts = random_prompts([8, 8, 8], 4)
    from cache_core.memory import MemoryConfig
    from cache_core.session import DecodingSession

    probe = DecodingSession(cpu, prompts, GEN, BLOCK, STEPS, memory=MemoryConfig())
    budget = probe.cache.store.minimum_bytes() + 2 * probe.cache.store.page_native_bytes
    memory = {"budget_bytes": budget, "offload": True, "low_precision": "native"}
    kw = dict(policy="dual_cache", cache_block_size=4, monitor={"sample_rate": 0.5})
    ref = generate(cpu, prompts, GEN, BLOCK, STEPS, memory=memory, **kw)
    for prefetch in (False, True):
        out = generate(gpu, prompts, GEN, BLOCK, STEPS, memory={**memory, "prefetch": prefetch}, **kw)
        assert torch.equal(out.tokens.cpu(), ref.tokens)
        assert max(s.cache_bytes for s in out.stats.steps) <= budget


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_dit_block_cache_on_cuda_matches_the_cpu():
    from cache_core.image import ddim_reference, sample_images
    from cache_core.image.session import initial_noise
    from cache_core.models.dit import DiTConfig, DiTModel

    torch.manual_seed(0)
    cpu = DiTModel(DiTConfig(d_model=32, n_layers=3, n_heads=2))
    cpu.reset_parameters()
    for p in cpu.parameters():
        p.data.normal_(0, 0.1)
    gpu = DiTModel(DiTConfig(d_model=32, n_layers=3, n_heads=2)).cuda()
    gpu.load_state_dict(cpu.state_dict())
    noise = initial_noise(cpu, 3, 1)
    for policy, knobs in (("full", {}), ("fora", {"interval": 2}), ("toca", {"ratio": 0.5})):
        ref = sample_images(cpu.eval(), [1, 2, 3], 8, policy=policy, noise=noise, **knobs)
        out = sample_images(gpu.eval(), [1, 2, 3], 8, policy=policy, noise=noise.cuda(), **knobs)
        assert out.images.device.type == "cuda"
        torch.testing.assert_close(out.images.cpu(), ref.images, rtol=1e-3, atol=1e-3)
        assert out.stats.flop_fraction == pytest.approx(ref.stats.flop_fraction)
    full = sample_images(gpu, [1, 2, 3], 8, policy="full", noise=noise.cuda())
    assert torch.equal(full.images, ddim_reference(gpu, [1, 2, 3], 8, noise.cuda()).clamp(-1, 1))

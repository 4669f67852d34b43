"""The environment benchmark: its measurements on a tiny model (fast) and the full mode (slow: starts workers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose_cfg
from hydra.errors import ConfigCompositionException

from envs import benchmark
from envs.block_reuse_env import BlockReuseEnv
from envs.testing import save_tiny_checkpoint, tiny_env_kwargs


def test_single_env_rate_and_overhead():
    env = BlockReuseEnv(**tiny_env_kwargs())
    single = benchmark.single_env_rate(env, steps=20)
    assert single["steps"] == 20 and single["steps_per_s"] > 0 and 0 < single["shadow_share"] < 1
    over = benchmark.overhead(env, "dual_cache", {})
    assert over["prompts"] == len(env.prompts) and over["steps"] == len(env.prompts) * env.steps
    assert over["tokens_match_generate"] == f"{len(env.prompts)}/{len(env.prompts)}"  # one code path
    assert over["overhead_ratio"] > over["overhead_ratio_without_shadow"] > 0
    assert "overhead ratio" in benchmark.format_table({
        "model": "tiny", "max_blocks": env.max_blocks, "n_layers": env.n_layers, "steps": env.steps,
        "action_mode": "binary", "torch_threads": 1, "single_env": single, "overhead": over,
        "vec_env": {"n_envs": 2, "steps_per_s": 1.0, "startup_s": 1.0}})


def test_unknown_or_bad_setting_is_refused(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(tmp_path, "env_benchmark.n_env=2")
    assert "n_env" in str(err.value) + str(err.value.__cause__)
    with pytest.raises(ValueError, match=r"env_benchmark.n_envs=0 must be >= 1"):
        compose_cfg(tmp_path, "env_benchmark.n_envs=0")


@pytest.mark.slow
def test_full_benchmark_mode(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    cfg = compose_cfg(tmp_path, f"paths.model={ckpt}", "generation.gen_length=32", "generation.steps=4",
                      "env_benchmark.single_steps=8", "env_benchmark.vec_steps=4", "env_benchmark.n_prompts=2",
                      f"env_benchmark.output={tmp_path / 'b.json'}")
    result = benchmark.run(cfg)
    saved = json.loads(Path(tmp_path / "b.json").read_text())
    assert saved["vec_env"]["n_envs"] == 2 and result["overhead"]["tokens_match_generate"] == "2/2"

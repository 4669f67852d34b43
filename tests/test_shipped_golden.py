"""The shipped checkpoint and policies give the same tokens and FLOPs as before the house refactor.

`tests/data/shipped_golden.json` was recorded with the engine as it stood before the refactor (commit c4d5c90):
12 test-split prompts of the built-in suite in one batch (prompts of different lengths) and the first alone, for
every heuristic, the oracle (binary and depth), and both shipped learned policies at their default and a given
budget, with LLaDA's linear schedule and with threshold decoding; plus three environment episodes (a heuristic's
actions through `policy_action`, Elastic-Cache's, and fixed random actions) with their rewards and observations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache_core import generate, load_model, load_tokenizer
from cache_core.bench.tasks import TaskSuite
from cache_core.features import TEXT_SCHEMA_V1
from cache_core.registry import make_policy
from envs.block_reuse_env import BlockReuseEnv

REPO = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((Path(__file__).parent / "data" / "shipped_golden.json").read_text())
POLICIES = REPO / "checkpoints" / "policies"
CASES = {  # label -> (policy, knobs, budget, threshold)
    "full": ("full", {}, None, None),
    "never": ("never", {}, None, None),
    "prefix_cache4": ("prefix_cache", {"refresh_interval": 4}, None, None),
    "dual_cache": ("dual_cache", {}, None, None),
    "dllm_cache4": ("dllm_cache", {"response_interval": 4}, None, None),
    "elastic_cache0.9": ("elastic_cache", {"gamma": 0.9}, None, None),
    "confidence0.9": ("confidence", {"min_confidence": 0.9}, None, None),
    "dkv_cache4": ("dkv_cache", {"refresh_interval": 4}, None, None),
    "oracle0.1": ("oracle", {"epsilon": 0.1}, None, None),
    "oracle_depth0.1": ("oracle", {"epsilon": 0.1, "depth": True}, None, None),
    "predictor_default": (str(POLICIES / "predictor.onnx"), {}, None, None),
    "predictor_b0.15": (str(POLICIES / "predictor.onnx"), {}, 0.15, None),
    "rl_agent_default": (str(POLICIES / "rl_agent.onnx"), {}, None, None),
    "rl_agent_b0.2": (str(POLICIES / "rl_agent.onnx"), {}, 0.2, None),
    "predictor_threshold0.9": (str(POLICIES / "predictor.onnx"), {}, None, 0.9),
    "dual_cache_threshold0.9": ("dual_cache", {}, None, 0.9),
}


@pytest.fixture(scope="module")
def builtin():
    model, tok = load_model(REPO / "checkpoints" / "builtin"), load_tokenizer(REPO / "checkpoints" / "builtin")
    examples = TaskSuite(["repeat", "succ", "runsum"], seed=0).split(GOLDEN["split"], GOLDEN["n_prompts"])
    return model, tok, [tok.encode(e.prompt) for e in examples]


def test_every_case_was_recorded():
    assert set(CASES) == set(GOLDEN["cases"])


@pytest.mark.parametrize("label", list(CASES))
def test_generation_matches_the_recorded_tokens_and_flops(builtin, label):
    model, _, prompts = builtin
    policy, knobs, budget, threshold = CASES[label]
    want = GOLDEN["cases"][label]
    steps = None if threshold else 64
    batch = generate(model, prompts, 64, 16, steps, threshold=threshold, policy=policy, budget=budget, **knobs)
    assert batch.tokens.tolist() == want["tokens"]
    assert len(batch.stats.steps) == want["steps"]
    assert batch.stats.flops == pytest.approx(want["flops"], rel=1e-12)
    assert batch.stats.full_flops == pytest.approx(want["full_flops"], rel=1e-12)
    alone = generate(model, prompts[:1], 64, 16, steps, threshold=threshold, policy=policy, budget=budget, **knobs)
    assert alone.tokens.tolist() == want["batch1_tokens"]
    assert alone.stats.flops == pytest.approx(want["batch1_flops"], rel=1e-12)


def test_env_episodes_match_the_recorded_ones(builtin):
    model, tok, _ = builtin
    env = BlockReuseEnv(model=model, tokenizer=tok, split="test", n_prompts=4, max_prompt_length=160, w_agree=0.0)
    for i, want in enumerate(GOLDEN["env_episodes"]):
        env.reset(seed=i, options={"prompt_index": i})
        rng = np.random.default_rng(i)
        policy = None if want["policy"] == "random" else make_policy(want["policy"])
        if policy is not None:
            policy.reset(1)
        rewards, obs_sum, done = [], 0.0, False
        while not done:
            action = env.policy_action(policy) if policy else (rng.random(env.max_blocks) < 0.3).astype(np.int8)
            obs, reward, done, _, info = env.step(action)
            rewards.append(reward)
            # The recorded sums are over the v1 columns (the v2 setting columns came later, appended after them).
            v1_global = obs["global"][: TEXT_SCHEMA_V1.n_global]
            obs_sum += float(obs["blocks"].astype(np.float64).sum() + v1_global.astype(np.float64).sum())
        assert info["generated"].tolist() == want["generated"], want["policy"]
        assert info["episode_flops"] == pytest.approx(want["episode_flops"], rel=1e-12)
        assert rewards == pytest.approx(want["rewards"], rel=1e-9, abs=1e-12)
        assert obs_sum == pytest.approx(want["obs_sum"], rel=1e-9)

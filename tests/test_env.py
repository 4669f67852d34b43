"""BlockReuseEnv: API checkers, determinism, vector envs, random episodes, oracle labels, bad configs."""

from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import compose_cfg

import envs  # noqa: F401  (registers the id)
from cache_core.actions import oracle_start_layer
from cache_core.features import N_BLOCK_FEATURES, N_GLOBAL_FEATURES, TEXT_SCHEMA
from cache_core.generate import generate
from cache_core.oracle import OraclePolicy
from cache_core.policy import StepContext
from cache_core.registry import make_policy
from envs.block_reuse_env import ENV_ID, BlockReuseEnv, labels_to_action
from envs.testing import EOS_ID, random_pairs, save_tiny_checkpoint, tiny_env_kwargs, tiny_model

REPO = Path(__file__).resolve().parents[1]


def run_episode(env, seed=0, actions=None, options=None):
    """Play one episode; actions: None = seeded random, or a callable(env) -> action."""
    obs, info = env.reset(seed=seed, options=options)
    env.action_space.seed(seed)
    trace = [(obs, info)]
    done, steps = False, 0
    while not done:
        action = env.action_space.sample() if actions is None else actions(env)
        obs, reward, terminated, truncated, info = env.step(action)
        trace.append((obs, reward, terminated, truncated, info))
        done = terminated or truncated
        steps += 1
        assert steps <= 1000, "episode did not terminate"
    return trace


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b or (a != a and b != b)


# --- construction, spaces, checkers ---------------------------------------------------------------------------

def test_gym_make_spaces():
    env = gym.make(ENV_ID, **tiny_env_kwargs())
    base = env.unwrapped
    assert base.max_blocks == (16 + 16) // 4
    space = env.observation_space
    assert space["blocks"].shape == (8, N_BLOCK_FEATURES) and space["blocks"].dtype == np.float32
    assert isinstance(space["block_mask"], gym.spaces.MultiBinary) and space["block_mask"].n == 8
    assert space["global"].shape == (N_GLOBAL_FEATURES,)
    assert isinstance(env.action_space, gym.spaces.MultiBinary)
    depth = gym.make(ENV_ID, **tiny_env_kwargs(action_mode="depth"))
    assert isinstance(depth.action_space, gym.spaces.MultiDiscrete)
    assert (depth.action_space.nvec == base.n_layers + 1).all()


@pytest.mark.parametrize("mode", ["binary", "depth"])
def test_gymnasium_and_sb3_checkers(mode):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = BlockReuseEnv(**tiny_env_kwargs(action_mode=mode, budget=[0.3, 0.9]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # advisory warnings (render fps, 2-D Box shape) are not failures
        check_env(env, skip_render_check=True)
        sb3_check_env(env)
        check_env(gym.make(ENV_ID, **tiny_env_kwargs(action_mode=mode)).unwrapped)


def test_observation_is_the_session_features():
    env = BlockReuseEnv(**tiny_env_kwargs(budget=0.5))
    obs, info = env.reset(seed=3)
    for _ in range(3):
        s = env.session
        f = s.features(0.5)  # the one feature computation, called again on the same state
        off = env.max_blocks - s.n_blocks
        assert info.get("n_blocks", s.n_blocks) == s.n_blocks
        np.testing.assert_array_equal(obs["block_mask"], np.r_[np.zeros(off), np.ones(s.n_blocks)].astype(np.int8))
        np.testing.assert_allclose(obs["blocks"][off:], f.blocks[0].numpy(), atol=1e-6)
        assert not obs["blocks"][:off].any(), "padded rows must be zero"
        np.testing.assert_allclose(obs["global"], f.global_[0].numpy(), atol=1e-6)
        assert obs["global"][TEXT_SCHEMA.global_index("budget")] == pytest.approx(0.5)  # budget column
        obs, _, _, _, info = env.step(env.action_space.sample())


def test_render_ansi_and_step_after_end():
    env = BlockReuseEnv(**tiny_env_kwargs(render_mode="ansi"))
    trace = run_episode(env)
    assert isinstance(env.render(), str)
    assert trace[-1][2] is True
    with pytest.raises(RuntimeError, match="reset"):
        env.step(env.action_space.sample())


# --- determinism ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["binary", "depth"])
def test_same_seed_same_trajectory(mode):
    kwargs = tiny_env_kwargs(action_mode=mode, budget=[0.2, 1.0], w_budget=1.0)
    a, b = BlockReuseEnv(**kwargs), BlockReuseEnv(**tiny_env_kwargs(action_mode=mode, budget=[0.2, 1.0], w_budget=1.0))
    for seed in (0, 7):
        assert_same(run_episode(a, seed), run_episode(b, seed))
        assert_same(run_episode(a, seed), run_episode(a, seed))  # the same instance, reseeded
    # Another seed picks another prompt/budget somewhere among a few tries.
    firsts = {BlockReuseEnv.reset(a, seed=s)[1]["prompt_index"] for s in range(6)}
    assert len(firsts) > 1


@pytest.mark.parametrize("temperature,remasking", [(0.0, "random"), (1.0, "low_confidence")])
def test_session_randomness_is_seeded(temperature, remasking):
    # Random remasking and Gumbel sampling draw from the session's generator, seeded from the env's rng at reset.
    a = BlockReuseEnv(**tiny_env_kwargs(temperature=temperature, remasking=remasking))
    b = BlockReuseEnv(**tiny_env_kwargs(temperature=temperature, remasking=remasking))
    assert_same(run_episode(a, 11), run_episode(b, 11))
    mask_id = a.model.config.mask_token_id
    outputs = [run_episode(a, s)[-1][4]["generated"] for s in range(4)]
    assert all((o != mask_id).all() for o in outputs)
    assert any(not np.array_equal(o, outputs[0]) for o in outputs[1:])


# --- episodes ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["binary", "depth"])
def test_random_episodes_terminate_without_nan(mode):
    env = BlockReuseEnv(**tiny_env_kwargs(action_mode=mode, budget=[0.1, 1.0], prompts=random_pairs(8, seed=5)))
    n_episodes = 0
    for seed in range(6):
        trace = run_episode(env, seed)
        n_episodes += 1
        steps = trace[1:]
        assert len(steps) == env.steps  # fixed schedule: one step per denoising step
        assert steps[-1][2] is True and not any(t[2] for t in steps[:-1])
        for obs, reward, _, truncated, info in steps:
            assert truncated is False
            assert np.isfinite(reward)
            for value in obs.values():
                assert np.isfinite(value).all()
            assert env.observation_space.contains(obs)
            assert 0 < info["flop_fraction"] <= 1 + 1e-9
            assert np.isfinite(info["kl"]) and info["kl"] >= 0 and info["flip"] in (0.0, 1.0)
            drift = info["oracle_drift"]
            assert drift.shape == (env.max_blocks, env.n_layers) and np.isfinite(drift).all()
            assert (drift >= 0).all() and (drift <= env.drift_cap).all()
            off = env.max_blocks - env.session.n_blocks
            assert not drift[:off].any(), "padded rows of the labels must be zero"
        final = steps[-1][4]
        assert {"exact_match", "agreement", "agree_exact", "generated"} <= final.keys()
        assert final["generated"].shape == (env.gen_length,)
    assert n_episodes == 6


def test_threshold_decoding_episodes_terminate():
    env = BlockReuseEnv(**tiny_env_kwargs(steps=None, threshold=0.5))
    for seed in range(3):
        trace = run_episode(env, seed)
        assert 1 <= len(trace) - 1 <= env.gen_length
        assert (trace[-1][4]["generated"] != env.model.config.mask_token_id).all()


def test_full_refresh_is_the_reference():
    """Refreshing everything reproduces the no-cache run: KL 0, no flips, FLOP fraction 1, agreement 1."""
    env = BlockReuseEnv(**tiny_env_kwargs())
    trace = run_episode(env, 1, actions=lambda e: np.ones(e.max_blocks, np.int8))
    for _, _, _, _, info in trace[1:]:
        assert info["kl"] < 1e-4 and info["flip"] == 0.0
        assert info["flop_fraction"] == pytest.approx(1.0)
    final = trace[-1][4]
    assert final["agreement"] == 1.0 and final["agree_exact"] == 1.0
    item = env.prompts[trace[0][1]["prompt_index"]]
    ref = generate(env.model, [list(item.prompt_ids)], env.gen_length, env.block_length, env.steps, policy="full")
    np.testing.assert_array_equal(final["generated"], ref.tokens[0].numpy())


def test_reuse_is_cheaper_and_reward_adds_up():
    kwargs = tiny_env_kwargs(w_flops=1.0, w_kl=0.0, w_flip=0.0, w_exact=0.0, w_agree=0.0)
    env = BlockReuseEnv(**kwargs)
    trace = run_episode(env, 2, actions=lambda e: np.zeros(e.max_blocks, np.int8))
    fractions = [t[4]["flop_fraction"] for t in trace[1:]]
    assert fractions[0] == pytest.approx(1.0)  # nothing is cached at the first step
    assert max(fractions[1:]) < 1.0
    for _, reward, _, _, info in trace[1:]:
        assert reward == pytest.approx(-info["flop_fraction"])


def test_budget_penalty_and_sampling():
    env = BlockReuseEnv(**tiny_env_kwargs(budget=0.3, w_flops=0.0, w_kl=0.0, w_flip=0.0, w_exact=0.0, w_agree=0.0,
                                          w_budget=2.0))
    trace = run_episode(env, 0, actions=lambda e: np.ones(e.max_blocks, np.int8))
    final = trace[-1][4]
    assert final["budget"] == 0.3 and final["budget_excess"] == pytest.approx(0.7)
    assert trace[-1][1] == pytest.approx(-2.0 * 0.7)
    ranged = BlockReuseEnv(**tiny_env_kwargs(budget=[0.2, 0.6]))
    budgets = {ranged.reset(seed=s)[1]["budget"] for s in range(5)}
    assert len(budgets) == 5 and all(0.2 <= b <= 0.6 for b in budgets)
    obs, info = ranged.reset(seed=0, options={"budget": 0.25})
    assert obs["global"][TEXT_SCHEMA.global_index("budget")] == pytest.approx(0.25)


# --- actions, plans, policies -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["binary", "depth"])
def test_action_plan_round_trip_and_padding_ignored(mode):
    env = BlockReuseEnv(**tiny_env_kwargs(action_mode=mode))
    env.reset(seed=0, options={"prompt_index": 2})  # a short prompt (4 tokens): padded rows
    off = env.max_blocks - env.session.n_blocks
    assert off > 0
    env.action_space.seed(0)
    for _ in range(5):
        a = env.action_space.sample()
        back = env.plan_to_action(env.action_to_plan(a))
        np.testing.assert_array_equal(back[off:], a[off:])
        assert not back[:off].any()
    L = env.n_layers
    if mode == "depth":
        plan = env.action_to_plan(np.full(env.max_blocks, L))
        assert (plan.start_layer == 0).all()
        assert (env.action_to_plan(np.zeros(env.max_blocks, np.int64)).start_layer == L).all()
    # Padded-row actions change nothing.
    def padded_noise(e):
        a = np.zeros(e.max_blocks, e.action_space.dtype)
        a[: e.max_blocks - e.session.n_blocks] = 1
        return a

    quiet = run_episode(env, 4, actions=lambda e: np.zeros(e.max_blocks, e.action_space.dtype),
                        options={"prompt_index": 2})
    noisy = run_episode(env, 4, actions=padded_noise, options={"prompt_index": 2})
    assert_same(quiet, noisy)
    with pytest.raises(ValueError, match="shape"):
        env.reset(seed=0)
        env.step(np.zeros(env.max_blocks + 1, np.int8))


@pytest.mark.parametrize("mode", ["binary", "depth"])
def test_oracle_policy_equals_labels(mode):
    """OraclePolicy's plan in a state == that state's oracle labels thresholded at epsilon (binary: some layer's drift
    > epsilon; depth: cache_core.actions.oracle_actions), with the labels that info['oracle_drift'] reports."""
    eps = 0.05
    env = BlockReuseEnv(**tiny_env_kwargs(action_mode=mode, model=tiny_model(n_layers=4)))  # 4 layers: real depths
    oracle = OraclePolicy(epsilon=eps, depth=mode == "depth")
    env.reset(seed=0)
    oracle.reset(1)
    L = env.n_layers
    done, checked, depths = False, 0, set()
    while not done:
        off = env.max_blocks - env.session.n_blocks
        labels = env.oracle_labels()
        plan = oracle.plan(None, StepContext.of(env.session)).start_layer[0].numpy()
        over = labels[off:] > eps
        if mode == "binary":
            np.testing.assert_array_equal(plan == 0, over.any(-1))
            np.testing.assert_array_equal(plan[~over.any(-1)], L)
        else:
            expected = oracle_start_layer(torch.from_numpy(labels[off:])[None], eps)[0].numpy()
            np.testing.assert_array_equal(plan, expected)
            depths.update(plan.tolist())
        action = env.policy_action(oracle)
        np.testing.assert_array_equal(action, env.oracle_action(eps))
        np.testing.assert_array_equal(action, labels_to_action(labels, eps, mode))
        _, _, done, _, info = env.step(action)
        np.testing.assert_array_equal(info["oracle_drift"], labels)  # the step reports the same labels
        checked += 1
    assert checked == env.steps
    if mode == "depth":
        assert len(depths - {0, env.n_layers}) > 0, "some partial-depth refreshes"


def test_labels_to_action_batched():
    labels = np.zeros((3, 5, 4), np.float32)
    labels[0, 1, 2] = 0.5  # first drifting layer 2 -> start at layer 1 -> depth action 3
    labels[1, 2, 0] = 1e3  # never computed -> start 0 -> depth 4 (all layers)
    depth = labels_to_action(labels, 0.1, "depth")
    assert depth.shape == (3, 5) and depth[0, 1] == 3 and depth[1, 2] == 4 and depth.sum() == 7
    binary = labels_to_action(labels, 0.1, "binary")
    assert binary.sum() == 2 and binary[0, 1] == 1 and binary[1, 2] == 1


@pytest.mark.parametrize("name,knobs", [("dual_cache", {}), ("prefix_cache", {"refresh_interval": 2}),
                                        ("never", {}), ("confidence", {"min_confidence": 0.5})])
def test_policy_through_env_matches_generate(name, knobs):
    """A block-level policy played through the env produces generate()'s tokens and FLOPs: one code path."""
    env = BlockReuseEnv(**tiny_env_kwargs())
    for index in range(3):
        policy = make_policy(name, **knobs)
        policy.reset(1)
        trace = run_episode(env, 0, actions=lambda e, p=policy: e.policy_action(p), options={"prompt_index": index})
        final = trace[-1][4]
        item = env.prompts[index]
        ref = generate(env.model, [list(item.prompt_ids)], env.gen_length, env.block_length, env.steps,
                       policy=make_policy(name, **knobs))
        np.testing.assert_array_equal(final["generated"], ref.tokens[0].numpy())
        assert final["episode_flops"] == pytest.approx(ref.stats.flops)


def test_stateful_and_token_level_policies_run():
    env = BlockReuseEnv(**tiny_env_kwargs(action_mode="depth"))
    for name in ("elastic_cache", "dllm_cache", "dkv_cache", "oracle"):
        policy = make_policy(name)
        policy.reset(1)
        trace = run_episode(env, 0, actions=lambda e, p=policy: e.policy_action(p))
        assert trace[-1][2] is True


# --- bad configuration --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    ({"action_mode": "tokens"}, "action_mode"),
    ({"budget": 0.0}, r"\(0, 1\]"),
    ({"budget": 1.5}, r"\(0, 1\]"),
    ({"budget": [0.8, 0.2]}, "low > high"),
    ({"budget": [0.1, 0.2, 0.3]}, "two values"),
    ({"block_length": 5}, "env.block_length=5 must divide env.gen_length=16"),
    ({"max_prompt_length": 18}, "multiple of block_length"),
    ({"max_prompt_length": 8}, "max_prompt_length"),
    ({"prompts": []}, "empty"),
    ({"prompts": [([], [3])]}, "at least one token"),
    ({"shadow": False}, "env.w_kl and env.w_flip must be 0"),
    ({"w_kl": float("nan")}, "env.w_kl=nan must be finite"),
    ({"n_prompts": "3"}, "env.n_prompts='3' must be an integer"),
    ({"num_threads": 1}, r"unknown env settings \['num_threads'\]"),
    ({"steps": 3}, "multiple"),
    ({"prompts": [[3, 4, 5]]}, "w_exact"),
    ({"gen_length": 200, "max_prompt_length": 16, "block_length": 8, "steps": 25}, "max_sequence_length|multiple"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        BlockReuseEnv(**tiny_env_kwargs(**overrides))


def test_no_shadow_mode_and_prompts_without_answers():
    env = BlockReuseEnv(**tiny_env_kwargs(shadow=False, w_kl=0.0, w_flip=0.0, w_exact=0.0,
                                          prompts=[[3, 4, 5], [6, 7, 8, 9, 10]]))
    trace = run_episode(env, 0)
    assert "oracle_drift" not in trace[1][4] and "exact_match" not in trace[-1][4]
    assert "agreement" in trace[-1][4]


# --- task suite and Hydra -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_env_from_the_composed_config(tmp_path, tiny_checkpoint):
    """The env group of the real YAML, typed (envs.config.EnvConfig), builds the env the jobs use."""
    from dataclasses import replace

    cfg = compose_cfg(tmp_path, f"paths.model={tiny_checkpoint}", "env.n_prompts=3", "generation.gen_length=32",
                      "generation.steps=4", "env.action_mode=depth")
    env = BlockReuseEnv(config=cfg.env)
    assert env.prompts.split == "train" and len(env.prompts) == 3 and env.config.model_path == str(tiny_checkpoint)
    assert env.max_blocks == (cfg.env.max_prompt_length + 32) // cfg.generation.block_length
    trace = run_episode(env, 0)
    final = trace[-1][4]
    assert final["exact_match"] in (0.0, 1.0) and len(trace) == 5
    test_env = BlockReuseEnv(config=replace(cfg.env, split="test", n_prompts=2))
    assert test_env.prompts.split == "test"
    assert test_env.prompts[0].prompt_ids != env.prompts[0].prompt_ids
    with pytest.raises(ValueError, match="either config= or keyword settings"):
        BlockReuseEnv(config=cfg.env, n_prompts=2)


def test_gym_make_from_checkpoint_path(tiny_checkpoint):
    env = gym.make(ENV_ID, model_path=str(tiny_checkpoint), split="validation", n_prompts=2, gen_length=32, steps=4)
    obs, _ = env.reset(seed=0)
    assert obs["block_mask"].sum() >= 8  # task prompts are 100+ tokens: 8+ prompt blocks of 16
    with pytest.raises(ValueError, match="env.n_prompts=0 must be >= 1"):
        BlockReuseEnv(model_path=str(tiny_checkpoint), n_prompts=0)
    with pytest.raises(ValueError, match="pretrain"):
        BlockReuseEnv(model_path=str(tiny_checkpoint.parent / "missing"))


def test_gym_make_with_the_id_alone_runs_the_builtin_model():
    env = gym.make(ENV_ID)
    obs, info = env.reset(seed=0)
    assert env.unwrapped.config.model_path.endswith("checkpoints/builtin") and info["task"] in ("repeat", "succ",
                                                                                               "runsum")
    assert env.observation_space.contains(obs)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert np.isfinite(reward) and info["oracle_drift"].shape == (env.unwrapped.max_blocks, 4)


@pytest.mark.parametrize("action_mode, bad", [
    ("binary", 2), ("binary", -1), ("binary", float("nan")), ("binary", 0.5), ("depth", 3), ("depth", -1),
])
def test_actions_outside_the_space_are_refused(action_mode, bad):
    env = BlockReuseEnv(**tiny_env_kwargs(action_mode=action_mode))
    env.reset(seed=0)
    action = np.zeros(env.max_blocks, dtype=np.float64 if isinstance(bad, float) else np.int64)
    action[-1] = bad
    assert not env.action_space.contains(action.astype(env.action_space.dtype)) or isinstance(bad, float)
    with pytest.raises(ValueError, match=f"{action_mode} actions must"):
        env.step(action)
    with pytest.raises(ValueError, match="action has shape"):
        env.step(np.zeros(env.max_blocks + 1, dtype=np.int64))
    assert env.session.step_index == 0  # nothing ran
    env.step(np.ones(env.max_blocks, dtype=np.int64))  # a valid action still works


# --- vector envs -------------------------------------------------------------------------------------------------

def test_sb3_subproc_vec_env():
    from envs.vector import make_sb3_vec_env

    venv = make_sb3_vec_env(tiny_env_kwargs(), n_envs=2, subproc=True, seed=0)
    try:
        obs = venv.reset()
        assert obs["blocks"].shape == (2, 8, N_BLOCK_FEATURES)
        venv.action_space.seed(0)
        ends = 0
        for _ in range(2 * 8 + 1):
            obs, rewards, dones, infos = venv.step(np.stack([venv.action_space.sample() for _ in range(2)]))
            assert np.isfinite(rewards).all() and all("oracle_drift" in i for i in infos)
            ends += int(dones.sum())
            for done, info in zip(dones, infos):
                assert done == ("terminal_observation" in info)
        assert ends == 4  # two full episodes per env (8 steps each), auto-reset
        assert obs["block_mask"].any(1).all()
    finally:
        venv.close()


@pytest.mark.parametrize("maker", ["gym.make_vec", "make_gym_vec_env"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_gym_make_vec(mode, maker):
    from envs.vector import make_gym_vec_env

    if maker == "gym.make_vec":
        vec = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode=mode, **tiny_env_kwargs())
    else:
        vec = make_gym_vec_env(tiny_env_kwargs(), 2, mode)
    try:
        obs, _ = vec.reset(seed=0)
        assert obs["blocks"].shape == (2, 8, N_BLOCK_FEATURES)
        vec.action_space.seed(0)
        for _ in range(10):
            obs, rewards, terminated, truncated, infos = vec.step(vec.action_space.sample())
            assert np.isfinite(rewards).all()
        assert infos["oracle_drift"].shape == (2, 8, 2)
    finally:
        vec.close()


def test_explicit_pairs_exact_match():
    model = tiny_model()
    env = BlockReuseEnv(model, [([5, 6, 7], [9, 9]), ([5, 6], [8])], eos_id=EOS_ID, gen_length=8, block_length=4,
                        steps=4)
    assert env.prompts.exact_match(0, [9, 9, EOS_ID, 3]) and not env.prompts.exact_match(0, [9, 9, 3])
    assert env.max_blocks == 1 + 2

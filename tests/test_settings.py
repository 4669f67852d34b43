"""One policy for every decoding setting: the setting columns of the text schema (v2), v1 policies on v2 features, the
environment's per-episode settings, and the budget a learned policy holds as a FLOP fraction (`budget_refresh`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_core import generate, load_model, load_tokenizer
from cache_core.bench.tasks import LONG_TASKS, TaskSuite, encode_prompt
from cache_core.features import SETTING_COLUMNS, TEXT_SCHEMA, TEXT_SCHEMA_V1, projectable, schema_by_id
from cache_core.learned import LearnedPolicy, budget_refresh
from cache_core.policy import StepContext
from cache_core.session import DecodingSession
from envs.block_reuse_env import BlockReuseEnv
from envs.config import EnvConfig
from policies.evaluate import BudgetedPolicy

BUILTIN = "checkpoints/builtin"
PREDICTOR = "checkpoints/policies/predictor.onnx"


@pytest.fixture(scope="module")
def builtin():
    model, tok = load_model(BUILTIN), load_tokenizer(BUILTIN)
    prompts = [encode_prompt(tok, e) for e in TaskSuite().split("test", 4)]
    return model, tok, prompts


def test_v2_is_v1_plus_the_setting_columns():
    assert TEXT_SCHEMA.version == 2 and TEXT_SCHEMA_V1.version == 1
    assert TEXT_SCHEMA.block_names == TEXT_SCHEMA_V1.block_names
    assert TEXT_SCHEMA.global_names == TEXT_SCHEMA_V1.global_names + tuple(c.name for c in SETTING_COLUMNS)
    assert schema_by_id(TEXT_SCHEMA_V1.id) is TEXT_SCHEMA_V1  # files recording v1 still resolve
    assert projectable(TEXT_SCHEMA, TEXT_SCHEMA_V1) and not projectable(TEXT_SCHEMA_V1, TEXT_SCHEMA)


@pytest.mark.parametrize("setting, want", [
    (dict(block_length=16, steps=64), dict(block_share=0.25, block_size=0.25, commit_rate=1 / 16, threshold=0.0)),
    (dict(block_length=8, steps=32), dict(block_share=0.125, block_size=0.125, commit_rate=2 / 8, threshold=0.0)),
    (dict(block_length=32, steps=None, threshold=0.9), dict(block_share=0.5, block_size=0.5, threshold=0.9)),
])
def test_setting_columns_describe_the_decoding_setting(builtin, setting, want):
    model, _, prompts = builtin
    session = DecodingSession(model, prompts, 64, **setting)
    first = session.features()
    assert float(first.global_[0, TEXT_SCHEMA.global_index("commit_rate")]) == 0.0  # nothing committed yet
    session.step(session_plan_full(session))
    f = session.features()
    for name, value in want.items():
        assert f.global_[:, TEXT_SCHEMA.global_index(name)].tolist() == pytest.approx([value] * len(prompts))
    share = f.global_[:, TEXT_SCHEMA.global_index("generation_share")]
    assert share.tolist() == pytest.approx([64 / session.canvas.shape[1]] * len(prompts))
    if setting.get("threshold"):  # parallel decoding: the rate is what the step committed (at least one token)
        rate = f.global_[:, TEXT_SCHEMA.global_index("commit_rate")]
        assert bool((rate >= 1 / setting["block_length"] - 1e-6).all())


def session_plan_full(session):
    from cache_core.cache import RefreshPlan

    return RefreshPlan.refresh_all(session.batch_size, session.n_blocks)


def test_a_v1_policy_reads_its_columns_out_of_v2_features(builtin):
    model, _, prompts = builtin
    policy = LearnedPolicy(PREDICTOR)
    assert policy.schema.id == TEXT_SCHEMA_V1.id  # the shipped short predictor predates v2
    session = DecodingSession(model, prompts, 64, 16, 64)
    session.step(session_plan_full(session))
    features = session.features(0.3)
    projected = features.project(TEXT_SCHEMA_V1)
    assert projected.global_.shape[1] == TEXT_SCHEMA_V1.n_global
    assert torch.equal(projected.global_, features.global_[:, : TEXT_SCHEMA_V1.n_global])
    ctx = StepContext.of(session, 0.3)
    assert torch.equal(policy.plan(features, ctx).start_layer, policy.plan(projected, ctx).start_layer)


def test_enforced_budget_holds_the_flop_fraction_in_every_setting(builtin):
    """The shipped predictor with budget_control='enforce' spends its budget within 0.03 in three settings, where its
    own budget feature alone is off by up to ~0.3 under threshold decoding."""
    model, _, prompts = builtin
    for setting in (dict(block_length=16, steps=64), dict(block_length=8, steps=64),
                    dict(block_length=16, steps=None, threshold=0.9)):
        for budget in (0.25, 0.4):
            policy = BudgetedPolicy(LearnedPolicy(PREDICTOR, budget_control="enforce"), budget)
            spent = generate(model, prompts, 64, policy=policy, **setting).stats.flop_fraction
            assert abs(spent - budget) <= 0.03, (setting, budget, spent)


def test_budget_refresh_takes_the_best_scored_blocks_that_fit(builtin):
    model, _, prompts = builtin
    session = DecodingSession(model, prompts[:1], 64, 16, 64)
    session.step(session_plan_full(session))  # step 0: everything computed once, compute_spent = 1
    for _ in range(5):
        ctx = StepContext.of(session, 0.5)
        features = session.features(0.5)
        score = torch.arange(ctx.n_blocks, dtype=torch.float32)[None].flip(1)  # earlier blocks score higher
        refresh = budget_refresh(score, features, ctx)
        forced = features.column("is_decoding") > 0.5
        assert bool(refresh[forced].all())
        chosen = (refresh & ~forced)[0].nonzero().flatten().tolist()
        # a prefix of the ranking (blocks 0, 1, ... that are not forced)
        order = [b for b in range(ctx.n_blocks) if not bool(forced[0, b])]
        assert chosen == order[: len(chosen)]
        session.step(session_plan_from(refresh, ctx.n_layers))
    # Over the steps the spend follows the budget: within a block or two of it.
    assert abs(session.stats.flop_fraction - 0.5) < 0.2


def session_plan_from(refresh, n_layers):
    from cache_core.cache import RefreshPlan

    return RefreshPlan.from_refresh_mask(refresh, n_layers)


def test_feature_control_keeps_the_files_behaviour(builtin):
    """Files without budget_control read the budget only as a feature (their recorded behaviour is unchanged)."""
    policy = LearnedPolicy(PREDICTOR)
    assert policy.budget_control == "feature"
    with pytest.raises(ValueError, match="budget_control"):
        LearnedPolicy(PREDICTOR, budget_control="sometimes")


def test_env_draws_a_decoding_setting_per_episode(builtin):
    model, tok, _ = builtin
    settings = [{"block_length": 8}, {"block_length": 32, "steps": 32}, {"threshold": 0.9}]
    env = BlockReuseEnv(model=model, tokenizer=tok, split="train", n_prompts=4, decode_settings=settings)
    assert env.max_blocks == (env.max_prompt_length + 64) // 8  # sized for the smallest block
    assert env.max_prompt_length % 32 == 0
    seen = set()
    for seed in range(8):
        obs, info = env.reset(seed=seed)
        assert env.observation_space.contains(obs)
        seen.add(info["setting"])
        want = env.settings[info["setting"]]
        assert (env.block_length, env.steps, env.threshold) == (want["block_length"], want["steps"],
                                                                want["threshold"])
        assert int(obs["block_mask"].sum()) == env.session.n_blocks
    assert seen == {0, 1, 2}
    assert env.settings[2]["steps"] is None  # a threshold entry drops the step count
    # The same seed gives the same episode setting; an explicit index wins.
    assert env.reset(seed=3)[1]["setting"] == env.reset(seed=3)[1]["setting"]
    assert env.reset(seed=3, options={"setting": 1})[1]["setting"] == 1
    with pytest.raises(ValueError, match="setting=7"):
        env.reset(options={"setting": 7})
    # An episode under threshold decoding runs to the end with its own reference answer.
    env.reset(seed=0, options={"setting": 2, "prompt_index": 0})
    done = False
    while not done:
        _, _, done, _, info = env.step(np.ones(env.max_blocks, np.int8))
    assert info["agree_exact"] in (0.0, 1.0)


@pytest.mark.parametrize("bad, match", [
    ({"decode_settings": {"block_length": 8}}, "non-empty list"),
    ({"decode_settings": [{"block": 8}]}, "overrides some of"),
    ({"decode_settings": [{"block_length": 48}]}, r"decode_settings\[0\]"),
])
def test_bad_settings_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        EnvConfig(**bad)


def test_long_tasks_write_long_answers_that_depend_on_the_line_before():
    suite = TaskSuite(list(LONG_TASKS))
    for example in suite.split("test", 6):
        lines = example.answer.split("\n")
        assert len(example.answer) >= 200 and len(lines) >= 12
        first = example.prompt.rstrip("\n").split("\n")[-1]
        if example.task == "motif":
            assert all(line == first for line in lines)
        elif example.task == "shift":
            assert lines[1] == "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in lines[0])
        else:
            padded = lines[0] + "0"
            assert lines[1] == "".join(str(int(padded[i]) ^ int(padded[i + 1])) for i in range(len(lines[0])))
    # Splits stay disjoint and a training stream long enough for pretraining never runs out.
    test = {e.prompt for e in suite.split("test", 60)}
    assert not test & {e.prompt for e in suite.split("train", 600)}

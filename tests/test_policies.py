"""Every registered policy through generate(): accounting, knob sweeps, the oracle, the FLOP formula, errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import MASK_ID, random_prompts, tiny_model

from cache_core import DecodingSession, OraclePolicy, ReusePolicy, generate, make_policy, policy_registry
from cache_core.accounting import full_step_flops, step_flops
from cache_core.policy import decide

GEN, BLOCK, STEPS = 16, 8, 16
LENGTHS = {1: [6], 3: [6, 13, 2]}
EXPECTED_POLICIES = {"full", "never", "prefix_cache", "dual_cache", "dllm_cache", "elastic_cache", "confidence",
                     "dkv_cache", "oracle"}


@pytest.fixture(scope="module")
def model():
    return tiny_model(5, n_kv_heads=2)


@pytest.fixture(scope="module")
def runs(model):
    """generate() with every policy (default knobs) at batch 1 and 3."""
    out = {}
    for batch, lengths in LENGTHS.items():
        prompts = random_prompts(lengths, 5)
        for name in policy_registry("text"):
            out[name, batch] = generate(model, prompts, GEN, BLOCK, STEPS, policy=name)
    return out


def test_registry_contents() -> None:
    registry = policy_registry()
    assert EXPECTED_POLICIES <= set(registry)
    for name, cls in registry.items():
        assert issubclass(cls, ReusePolicy) and cls.name == name
        if cls.knob is not None:
            assert len(cls.knob_sweep) >= 2, name


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", sorted(EXPECTED_POLICIES))
def test_policy_accounting(runs, model, name: str, batch: int) -> None:
    result = runs[name, batch]
    stats = result.stats
    assert result.tokens.shape == (batch, GEN)
    assert not bool((result.tokens == MASK_ID).any())
    assert result.policy["policy"] == name
    assert 0.0 < stats.flop_fraction <= 1.0
    assert len(stats.steps) == STEPS
    n_keys = torch.tensor([n + GEN for n in LENGTHS[batch]])
    for i, rec in enumerate(stats.steps):
        assert rec.step == i
        assert rec.decoding_block == i // (STEPS // (GEN // BLOCK))
        assert rec.flops > 0 and rec.full_flops > 0
        assert rec.full_flops == full_step_flops(model, n_keys, BLOCK)
        assert rec.positions_x_layers > 0
        assert rec.positions_x_layers <= model.config.n_layers * int(n_keys.sum())
        assert rec.cache_bytes > 0
        assert rec.wall_s > 0
        assert rec.committed == batch  # 8 tokens per block over 8 steps: one per row per step
    assert sum(r.committed for r in stats.steps) == batch * GEN
    summary = stats.summary()
    assert summary["steps"] == STEPS and summary["flop_fraction"] == stats.flop_fraction
    assert summary["peak_cache_bytes"] == max(r.cache_bytes for r in stats.steps)
    assert stats.to_dict()["steps"][0]["step"] == 0


@pytest.mark.parametrize("batch", [1, 3])
def test_full_is_exactly_one_and_never_is_cheapest(runs, batch: int) -> None:
    fractions = {name: runs[name, batch].stats.flop_fraction for name in EXPECTED_POLICIES}
    assert fractions["full"] == 1.0
    assert all(r.flops == r.full_flops for r in runs["full", batch].stats.steps)
    for name, fraction in fractions.items():
        assert fractions["never"] <= fraction, (name, fraction, fractions["never"])
    assert fractions["never"] < 1.0


@pytest.mark.parametrize("batch", [1, 3])
def test_never_computes_only_the_decoding_block_after_the_first_step(runs, model, batch: int) -> None:
    steps = runs["never", batch].stats.steps
    L = model.config.n_layers
    assert steps[0].positions_x_layers == L * sum(n + GEN for n in LENGTHS[batch])
    assert all(r.positions_x_layers == L * BLOCK * batch for r in steps[1:])


@pytest.mark.parametrize("batch", [1, 3])
def test_cache_policies_compute_what_they_claim(runs, model, batch: int) -> None:
    """prefix: block start = full, then decoding block + masked suffix; dual: block start = full, then the block."""
    L = model.config.n_layers
    n_valid = sum(n + GEN for n in LENGTHS[batch])
    spb = STEPS // (GEN // BLOCK)
    for name in ("prefix_cache", "dual_cache"):
        for rec in runs[name, batch].stats.steps:
            if rec.step % spb == 0:
                expected = L * n_valid
            elif name == "dual_cache":
                expected = L * BLOCK * batch
            else:
                expected = L * (GEN - rec.decoding_block * BLOCK) * batch
            assert rec.positions_x_layers == expected, (name, rec.step)


# Knob sweeps (conservative -> aggressive): FLOP fraction must not increase where the plans are nested whatever the
# tokens are (interval refreshes: the refresh steps of a longer interval are a subset of a shorter one's).
MONOTONE_KNOBS = ["prefix_cache", "dual_cache", "dllm_cache", "dkv_cache"]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", MONOTONE_KNOBS)
def test_knob_sweep_is_monotone(model, name: str, batch: int) -> None:
    cls = policy_registry()[name]
    prompts = random_prompts(LENGTHS[batch], 6)
    fractions = [generate(model, prompts, GEN, BLOCK, STEPS, policy=make_policy(name, **{cls.knob: v})
                          ).stats.flop_fraction for v in cls.knob_sweep]
    assert all(a >= b for a, b in zip(fractions, fractions[1:])), (cls.knob_sweep, fractions)
    assert fractions[0] > fractions[-1], (cls.knob_sweep, fractions)  # the knob does something
    assert fractions[0] < 1.0


def test_interval_one_is_no_cache(model) -> None:
    prompts = random_prompts([4, 9], 7)
    full = generate(model, prompts, GEN, BLOCK, STEPS, policy="full")
    for name, knob in (("prefix_cache", "refresh_interval"), ("dual_cache", "refresh_interval"),
                       ("dkv_cache", "refresh_interval")):
        r = generate(model, prompts, GEN, BLOCK, STEPS, policy=make_policy(name, **{knob: 1}))
        assert r.stats.flop_fraction == 1.0, name
        assert torch.equal(r.tokens, full.tokens), name


def test_oracle_epsilon_zero_equals_full(model) -> None:
    for lengths in ([6], [6, 13, 2]):
        prompts = random_prompts(lengths, 8)
        full = generate(model, prompts, GEN, BLOCK, STEPS, policy="full")
        oracle = generate(model, prompts, GEN, BLOCK, STEPS, policy="oracle", epsilon=0.0)
        assert torch.equal(oracle.tokens, full.tokens)
        assert oracle.policy == {"policy": "oracle", "epsilon": 0.0}


def test_oracle_large_epsilon_reuses(model) -> None:
    prompts = random_prompts([6, 13], 8)
    never = generate(model, prompts, GEN, BLOCK, STEPS, policy="never")
    lazy = generate(model, prompts, GEN, BLOCK, STEPS, policy=OraclePolicy(epsilon=1e9))
    assert lazy.stats.flop_fraction == never.stats.flop_fraction
    assert torch.equal(lazy.tokens, never.tokens)
    depth = generate(model, prompts, GEN, BLOCK, STEPS, policy=OraclePolicy(epsilon=0.1, depth=True))
    assert 0.0 < depth.stats.flop_fraction <= 1.0


def test_dual_cache_step_flops_by_hand() -> None:
    """One dual-cache step (not the block's first): only the 4 decoding positions run, in every layer, against every
    valid key; the LM head reads the decoding block. Counted from the formula in accounting.py by hand."""
    d, d_kv, f, L, V = 32, 16, 48, 2, 40
    model = tiny_model(9, n_kv_heads=2)  # d_model 32, 4 heads of 8, 2 KV heads -> d_kv 16, MLP 48, 2 layers
    cfg = model.config
    assert (cfg.d_model, cfg.d_kv, cfg.mlp_hidden_size, cfg.n_layers, cfg.vocab_size) == (d, d_kv, f, L, V)
    lengths, gen, block = [5, 2], 8, 4
    result = generate(model, random_prompts(lengths, 9), gen, block, 4, policy="dual_cache")
    rec = result.stats.steps[1]  # second step of the first block: the cached step
    n_keys = [5 + 8, 2 + 8]  # valid keys per row
    n = block  # positions run per row and layer

    def per_layer(n_q: int, n_k: int) -> int:
        return 2 * n_q * d * (d + 2 * d_kv) + 2 * n_q * d * d + 2 * n_q * 3 * d * f + 4 * n_q * n_k * d

    head = 2 * (block * len(lengths)) * d * V
    expected = L * sum(per_layer(n, k) for k in n_keys) + head
    expected_full = L * sum(per_layer(k, k) for k in n_keys) + head
    assert rec.flops == expected
    assert rec.full_flops == expected_full
    assert rec.positions_x_layers == L * n * len(lengths)
    # and the numbers themselves, written out once
    assert per_layer(4, 13) == 4 * (2 * 32 * 64 + 2 * 32 * 32 + 6 * 32 * 48 + 4 * 13 * 32)
    # first step of the block refreshed everything: it costs what a full recompute costs
    assert result.stats.steps[0].flops == result.stats.steps[0].full_flops
    # the helpers agree with the hand count
    assert step_flops(model, torch.tensor([[4, 4]] * L), torch.tensor(n_keys), block) == expected
    assert model.layer_flops(4, 13) == per_layer(4, 13)
    assert model.head_flops(8) == head


def test_dllm_cache_counts_its_probe(model) -> None:
    """dLLM-Cache's value probe is compute that is not in any layer's positions: it must show in the FLOPs."""
    prompts = random_prompts([6], 10)
    r = generate(model, prompts, GEN, BLOCK, STEPS, policy=make_policy("dllm_cache", response_interval=4, rho=0.0))
    probe = generate(model, prompts, GEN, BLOCK, STEPS, policy=make_policy("dllm_cache", response_interval=4, rho=0.25))
    # with rho = 0 no probe runs: every layer runs the same positions and the FLOPs are the layers' only
    for s in r.stats.steps:
        assert s.positions_x_layers % model.config.n_layers == 0
        assert s.flops == step_flops(model, _counts(model, s), torch.tensor([6 + GEN]), BLOCK)
    # with rho > 0 the off-interval steps pay the value probe and the rho fraction on top
    assert probe.stats.flops > r.stats.flops
    assert all(p.flops == q.flops for p, q in zip(probe.stats.steps, r.stats.steps) if p.step % 4 == 0)


def _counts(model, rec) -> torch.Tensor:
    per_layer = rec.positions_x_layers // model.config.n_layers
    return torch.tensor([[per_layer]] * model.config.n_layers)


def test_the_budget_reaches_a_budget_conditioned_policy(model) -> None:
    """generate(budget=b) sets the features' `budget` column for a policy that reads it (and is refused for one that
    would ignore it: test_robustness.py)."""
    from cache_core import ReusePolicy
    from cache_core.cache import RefreshPlan
    from cache_core.features import GLOBAL_FEATURE_NAMES

    class Reads(ReusePolicy):
        budget_conditioned = True
        seen: list[float] = []

        def plan(self, features, ctx):
            self.seen.append(float(features.global_[0, GLOBAL_FEATURE_NAMES.index("budget")]))
            return RefreshPlan.refresh_all(ctx.batch_size, ctx.n_blocks)

    policy = Reads()
    r = generate(model, random_prompts([5, 7], 11), GEN, BLOCK, STEPS, policy=policy, budget=0.5)
    assert r.stats.flop_fraction == 1.0 and set(policy.seen) == {0.5} and len(policy.seen) == STEPS


def test_describe_reports_knob() -> None:
    assert make_policy("dual_cache", refresh_interval=4).describe() == {"policy": "dual_cache", "refresh_interval": 4}
    assert make_policy("full").describe() == {"policy": "full"}
    assert make_policy(None).name == "full"
    p = make_policy("never")
    assert make_policy(p) is p


@pytest.mark.parametrize("name", sorted(n for n, c in policy_registry("text").items() if c.knob is not None))
def test_every_knob_can_be_set_through_generate(model, name: str) -> None:
    """generate(policy=name, **{knob: value}) must reach the policy (benchmarks sweep knob_sweep this way).
    ENGINE BUG: the `confidence` policy's knob is called `threshold`, the name of generate()'s own Fast-dLLM argument,
    so generate(policy="confidence", threshold=0.5, steps=...) never reaches the policy: it switches on parallel
    decoding instead (and with steps given it is refused)."""
    cls = policy_registry()[name]
    value = cls.knob_sweep[-1]
    result = generate(model, random_prompts([5], 12), GEN, BLOCK, STEPS, policy=name, **{cls.knob: value})
    assert result.policy == {"policy": name, cls.knob: value}
    assert len(result.stats.steps) == STEPS


def test_elastic_cache_first_cached_step_is_the_same_in_every_block(model) -> None:
    """ENGINE BUG: ElasticCache compares the most-attended key's attention "from the decoding queries at the last two
    steps". At step_in_block 1 of the first block there is no such pair and it refreshes everything; at step_in_block
    1 of every later block it compares the previous block's queries (step before last) with the new block's queries
    (last step): two different query sets, so the drift decision there is meaningless. With gamma = 0 (never drift)
    the first block refreshes at step 1 and later blocks reuse everything. Either way, the first cached step must be
    treated alike in every block (fix: also forget the history when a block starts)."""
    session = DecodingSession(model, random_prompts([6, 9], 13), 24, 8, 24)
    policy = make_policy("elastic_cache", gamma=0.0)
    policy.reset(session.batch_size)
    first_cached = []
    while not session.done:
        plan, ctx = decide(policy, session)
        if ctx.step_in_block == 0:
            assert bool((plan.start_layer == 0).all())  # a new block starts with a full refresh
        if ctx.step_in_block == 1:
            first_cached.append(plan.start_layer.tolist())
        policy.on_step_end(ctx, session.step(plan))
    assert len(first_cached) == 3
    assert first_cached[1] == first_cached[0] and first_cached[2] == first_cached[0], first_cached


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
def test_unknown_policy_name(model) -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'fast_cache'; choose one of \[.*'dual_cache'"):
        make_policy("fast_cache")
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        generate(model, [[1, 2]], 4, 4, 4, policy="nope")


@pytest.mark.parametrize(
    ("name", "knobs", "message"),
    [
        ("dual_cache", dict(refresh_interval=0), "refresh_interval must be >= 1 or None, got 0"),
        ("prefix_cache", dict(refresh_interval=-3), "refresh_interval must be >= 1 or None, got -3"),
        ("dkv_cache", dict(refresh_interval=0), "refresh_interval must be >= 1, got 0"),
        ("dllm_cache", dict(response_interval=0), "dllm_cache intervals must be >= 1"),
        ("dllm_cache", dict(prompt_interval=0), "dllm_cache intervals must be >= 1"),
        ("dllm_cache", dict(rho=1.5), "dllm_cache rho must lie in"),
        ("elastic_cache", dict(gamma=1.5), "elastic_cache gamma must lie in"),
        ("confidence", {policy_registry()["confidence"].knob: -0.1}, r"must lie in \[0, 1\]"),
        ("confidence", dict(signal="logits"), "signal must be 'confidence' or 'entropy'"),
        ("oracle", dict(epsilon=-1.0), "oracle epsilon must be >= 0"),
        ("full", dict(refresh_interval=2), r"bad knobs \{'refresh_interval': 2\} for policy 'full'"),
        ("dual_cache", dict(gamma=0.5), r"bad knobs \{'gamma': 0.5\} for policy 'dual_cache'"),
        ("dual_cache", dict(refresh_interval="often"), "bad knobs"),
    ],
)
def test_bad_knob_values(name: str, knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_policy(name, **knobs)


def test_bad_knob_through_generate(model) -> None:
    with pytest.raises(ValueError, match="refresh_interval must be >= 1"):
        generate(model, [[1, 2]], 4, 4, 4, policy="dual_cache", refresh_interval=0)


def test_knobs_for_a_built_policy_are_refused() -> None:
    with pytest.raises(ValueError, match="knobs were given for an already built policy"):
        make_policy(make_policy("dual_cache"), refresh_interval=2)


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5])
def test_bad_budget(model, budget: float) -> None:
    with pytest.raises(ValueError, match=f"budget={budget} must lie in"):
        generate(model, [[1, 2]], 4, 4, 4, budget=budget)


def test_flop_fraction_of_no_steps_is_nan() -> None:
    from cache_core.accounting import GenerationStats

    assert math.isnan(GenerationStats().flop_fraction)
    assert GenerationStats().peak_cache_bytes == 0

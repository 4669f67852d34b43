"""The cache invariant: always refreshing reproduces plain no-cache LLaDA generation, token for token; plans are
enforced; batching never changes a row's result."""

from __future__ import annotations

import pytest
import torch
from helpers import MASK_ID, VOCAB, random_prompts, reference_generate, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_core import DecodingSession, RefreshPlan, generate, policy_registry

LOGIT_ATOL = 2e-5
LOGIT_RTOL = 1e-5


@st.composite
def generation_cases(draw):
    seed = draw(st.integers(0, 10_000))
    n_kv_heads = draw(st.sampled_from([1, 2, 4]))
    batch = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, 11), min_size=batch, max_size=batch))
    block_length = draw(st.sampled_from([1, 2, 3, 4, 8]))
    n_blocks = draw(st.integers(1, 3))
    gen_length = block_length * n_blocks
    if draw(st.booleans()):
        threshold = draw(st.floats(0.2, 1.0))
        steps = None
    else:
        threshold = None
        steps = n_blocks * draw(st.integers(1, block_length))
    return seed, n_kv_heads, lengths, gen_length, block_length, steps, threshold


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generation_cases())
def test_full_refresh_equals_no_cache_llada(case) -> None:
    seed, n_kv_heads, lengths, gen_length, block_length, steps, threshold = case
    model = tiny_model(seed, n_kv_heads=n_kv_heads)
    prompts = random_prompts(lengths, seed)
    ref_tokens, ref_logits = reference_generate(model, prompts, gen_length, block_length, steps, threshold)
    assert not bool((ref_tokens == MASK_ID).any())

    # 1. generate() with the `full` policy: token for token
    result = generate(model, prompts, gen_length, block_length, steps, threshold=threshold, policy="full")
    assert torch.equal(result.tokens, ref_tokens)
    assert len(result.stats.steps) == len(ref_logits)
    assert result.stats.flop_fraction == 1.0

    # 2. the session step by step under refresh_all: decoding-block logits equal at every step
    session = DecodingSession(model, prompts, gen_length, block_length, steps, threshold=threshold)
    B = len(prompts)
    for step, expected in enumerate(ref_logits):
        assert not session.done
        out = session.step(RefreshPlan.refresh_all(B, session.n_blocks))
        assert out.logits.shape == (B, block_length, VOCAB)
        torch.testing.assert_close(out.logits, expected, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, msg=f"step {step}")
        # every valid position was computed from layer 0, padding never
        assert torch.equal(out.start_layer == 0, session.cache.key_mask)
    assert session.done
    assert torch.equal(session.generated, ref_tokens)


def test_reference_loop_sanity() -> None:
    """The reference loop itself: schedule sums to block_length, prompts and padding untouched, no masks left."""
    model = tiny_model(0)
    prompts = random_prompts([3, 7], 0)
    tokens, logits = reference_generate(model, prompts, 8, 4, 6)
    assert tokens.shape == (2, 8) and len(logits) == 6
    assert not bool((tokens == MASK_ID).any())
    tokens_t, logits_t = reference_generate(model, prompts, 8, 4, None, threshold=1.0)
    assert len(logits_t) == 8  # threshold 1.0 commits exactly one token per step (top one)


def test_padding_ids_never_matter() -> None:
    model = tiny_model(3)
    prompts = random_prompts([2, 9, 5], 3)
    a, _ = reference_generate(model, prompts, 8, 4, 4, pad_seed=1)
    b, _ = reference_generate(model, prompts, 8, 4, 4, pad_seed=2)
    assert torch.equal(a, b)
    s1 = DecodingSession(model, prompts, 8, 4, 4, pad_id=0)
    s2 = DecodingSession(model, prompts, 8, 4, 4, pad_id=7)
    while not s1.done:
        r1 = s1.step(RefreshPlan.refresh_all(3, s1.n_blocks))
        r2 = s2.step(RefreshPlan.refresh_all(3, s2.n_blocks))
        torch.testing.assert_close(r1.logits, r2.logits, atol=1e-6, rtol=0)
    assert torch.equal(s1.generated, a)


def test_sampling_with_temperature_is_seeded() -> None:
    model = tiny_model(4)
    prompts = random_prompts([4, 6], 4)
    for remasking in ("low_confidence", "random"):
        a = generate(model, prompts, 8, 4, 4, temperature=0.8, seed=3, remasking=remasking).tokens
        b = generate(model, prompts, 8, 4, 4, temperature=0.8, seed=3, remasking=remasking).tokens
        assert torch.equal(a, b)
        assert not bool((a == MASK_ID).any())


# ---------------------------------------------------------------------------------------------------------------
# Batching must not change results
# ---------------------------------------------------------------------------------------------------------------
BATCH_LENGTHS = [3, 10, 6]


@pytest.mark.parametrize("policy", sorted(policy_registry("text")))
def test_batch_equals_rows_alone(policy: str) -> None:
    model = tiny_model(11, n_kv_heads=2)
    prompts = random_prompts(BATCH_LENGTHS, 11)
    kw = dict(gen_length=12, block_length=4, steps=6, policy=policy)
    batched = generate(model, prompts, **kw).tokens
    for b, p in enumerate(prompts):
        alone = generate(model, [p], **kw).tokens
        assert torch.equal(batched[b], alone[0]), f"{policy}: row {b} differs when batched"


@pytest.mark.parametrize("policy", ["dual_cache", "prefix_cache", "full"])
def test_batch_equals_rows_alone_with_threshold(policy: str) -> None:
    """Fast-dLLM users saw batch > 1 break the dual cache; here rows finish blocks at different steps."""
    model = tiny_model(12)
    prompts = random_prompts(BATCH_LENGTHS, 12)
    kw = dict(gen_length=12, block_length=4, steps=None, threshold=0.6, policy=policy)
    batched = generate(model, prompts, **kw).tokens
    for b, p in enumerate(prompts):
        assert torch.equal(batched[b], generate(model, [p], **kw).tokens[0]), f"{policy}: row {b}"


def test_dual_cache_batch_logits_equal_rows_alone() -> None:
    """Stronger than tokens: the decoding-block logits of every step under dual_cache match row by row."""
    model = tiny_model(13, n_kv_heads=1)
    prompts = random_prompts([2, 9], 13)
    from cache_core import make_policy, run_step

    def run(ps):
        policy = make_policy("dual_cache")
        s = DecodingSession(model, ps, 8, 4, 8, trace_attention=False)
        out = []
        while not s.done:
            out.append(run_step(policy, s).logits)
        return out

    batched = run(prompts)
    for b, p in enumerate(prompts):
        for step, (lb, la) in enumerate(zip(batched, run([p]))):
            torch.testing.assert_close(lb[b], la[0], atol=1e-5, rtol=1e-5, msg=f"row {b} step {step}")


# ---------------------------------------------------------------------------------------------------------------
# RefreshPlan enforcement
# ---------------------------------------------------------------------------------------------------------------
def make_session(seed: int = 20, lengths=(3, 7), gen_length: int = 8, block_length: int = 4, steps: int = 8,
                 n_layers: int = 3) -> DecodingSession:
    model = tiny_model(seed, n_kv_heads=2, n_layers=n_layers)
    return DecodingSession(model, random_prompts(list(lengths), seed), gen_length, block_length, steps)


def test_plan_enforcement_required_and_never_computed_positions() -> None:
    s = make_session()
    B, L, N = 2, 3, s.canvas.shape[1]
    assert s.prompt_region == 8 and N == 16 and s.n_blocks == 4
    valid = s.cache.key_mask
    assert valid.sum(1).tolist() == [3 + 8, 7 + 8]
    dec = torch.zeros(B, N, dtype=torch.bool)
    dec[:, 8:12] = True

    # first step, plan asks to reuse everything: never-computed valid positions are computed anyway, padding never
    r = s.step(RefreshPlan.reuse_all(B, s.n_blocks, L))
    assert torch.equal(r.start_layer, torch.where(valid, 0, L))
    assert r.trace.active_counts.tolist() == [[11, 15]] * L
    for layer in range(L):
        assert torch.equal(s.cache.computed[layer], valid)  # padding is never computed
    assert r.record.committed == 2  # 1 token per row (8 steps for 8 tokens)

    # second step, reuse everything: only the decoding block is computed
    r = s.step(RefreshPlan.reuse_all(B, s.n_blocks, L))
    assert torch.equal(r.start_layer, torch.where(dec, 0, L))
    assert r.trace.active_counts.tolist() == [[4, 4]] * L

    # asking to refresh everything (padding blocks included) still never computes padding
    r = s.step(RefreshPlan.refresh_all(B, s.n_blocks))
    assert torch.equal(r.start_layer, torch.where(valid, 0, L))
    for layer in range(L):
        assert not bool(s.cache.computed[layer][~valid].any())

    # single positions via refresh_positions: the requested valid position is computed, padding refused
    extra = torch.zeros(B, N, dtype=torch.bool)
    extra[:, 6] = True  # row 0: prompt token, row 1: prompt token
    extra[:, 0] = True  # row 0: padding, row 1: padding
    r = s.step(RefreshPlan(torch.full((B, s.n_blocks), L), refresh_positions=extra))
    expected = torch.where(dec | (extra & valid), 0, L)
    assert torch.equal(r.start_layer, expected)
    assert r.trace.active_counts.tolist() == [[5, 5]] * L


def test_plan_validation_errors() -> None:
    s = make_session()
    with pytest.raises(ValueError, match=r"start_layer has shape \(2, 3\), expected \(batch=2, blocks=4\)"):
        s.step(RefreshPlan(torch.zeros(2, 3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"start_layer values must lie in \[0, n_layers=3\]"):
        s.step(RefreshPlan(torch.full((2, 4), 4)))
    with pytest.raises(ValueError, match=r"start_layer values must lie"):
        s.step(RefreshPlan(torch.full((2, 4), -1)))
    with pytest.raises(ValueError, match=r"refresh_positions must have shape \(2, 16\)"):
        s.step(RefreshPlan(torch.zeros(2, 4, dtype=torch.long), refresh_positions=torch.zeros(2, 15, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"adaptive must be"):
        s.step(RefreshPlan(torch.zeros(2, 4, dtype=torch.long), adaptive=(torch.zeros(2, 16, dtype=torch.bool), 1.5)))
    assert s.step_index == 0  # nothing ran


def test_depth_plan_recomputes_only_deep_layers() -> None:
    L = 3
    for k in range(L + 1):
        s = make_session(n_layers=L)
        B, N = 2, s.canvas.shape[1]
        valid = s.cache.key_mask
        s.step(RefreshPlan.refresh_all(B, s.n_blocks))
        keys_before = [t.clone() for t in s.cache.keys]
        values_before = [t.clone() for t in s.cache.values]
        dec = torch.zeros(B, N, dtype=torch.bool)
        dec[:, 8:12] = True
        r = s.step(RefreshPlan(torch.full((B, s.n_blocks), k)))
        assert torch.equal(r.start_layer, torch.where(dec, 0, torch.where(valid, k, L)))
        n_valid = valid.sum(1).tolist()
        for layer in range(L):
            assert r.trace.active_counts[layer].tolist() == (n_valid if layer >= k else [4, 4]), (k, layer)
        assert r.record.positions_x_layers == sum(n_valid) * (L - k) + 8 * k
        other = valid & ~dec
        for layer in range(L):
            same_k = torch.equal(s.cache.keys[layer][:, :, other[0]][0], keys_before[layer][:, :, other[0]][0])
            if layer < k:  # reused layers: cached K/V untouched bit for bit
                for b in range(B):
                    assert torch.equal(s.cache.keys[layer][b][:, other[b]], keys_before[layer][b][:, other[b]])
                    assert torch.equal(s.cache.values[layer][b][:, other[b]], values_before[layer][b][:, other[b]])
            elif layer > k:  # layers above the first recomputed one see the new tokens through attention
                assert not same_k, (k, layer)


def test_depth_plan_extremes_equal_binary_plans() -> None:
    """start_layer 0 everywhere == refresh_all and start_layer n_layers == reuse_all."""
    L = 2
    pairs = [(lambda B, nb: RefreshPlan(torch.zeros(B, nb, dtype=torch.long)), RefreshPlan.refresh_all),
             (lambda B, nb: RefreshPlan(torch.full((B, nb), L)), lambda B, nb: RefreshPlan.reuse_all(B, nb, L))]
    for make_a, make_b in pairs:
        s1, s2 = make_session(n_layers=L), make_session(n_layers=L)
        while not s1.done:
            r1 = s1.step(make_a(2, s1.n_blocks))
            r2 = s2.step(make_b(2, s2.n_blocks))
            assert torch.equal(r1.start_layer, r2.start_layer)
            torch.testing.assert_close(r1.logits, r2.logits, atol=0, rtol=0)
        assert torch.equal(s1.generated, s2.generated)


def test_refresh_all_session_is_deterministic_and_completes() -> None:
    s = make_session(steps=4)
    steps = 0
    while not s.done:
        r = s.step(RefreshPlan.refresh_all(2, s.n_blocks))
        assert r.committed.sum().item() == 2 * 2  # 4 tokens per block over 2 steps: 2 per step per row
        steps += 1
    assert steps == 4
    assert not bool((s.generated == MASK_ID).any())
    with pytest.raises(RuntimeError, match="generation is complete"):
        s.step(RefreshPlan.refresh_all(2, s.n_blocks))


def test_committed_tokens_are_never_remasked_or_changed() -> None:
    s = make_session(steps=8)
    from cache_core import make_policy, run_step

    policy = make_policy("dual_cache")
    previous = s.generated.clone()
    while not s.done:
        r = run_step(policy, s)
        now = s.generated
        was = previous != MASK_ID
        assert torch.equal(now[was], previous[was])
        assert torch.equal((previous == MASK_ID) & (now != MASK_ID), r.committed[:, s.prompt_region:])
        previous = now.clone()


@pytest.mark.parametrize("policy", ["oracle", "elastic_cache", "dllm_cache"])
def test_packed_rows_compute_what_padded_rows_do(policy: str, monkeypatch) -> None:
    """Rows that refresh different numbers of positions are packed for the per-position layers (`rowwise` in
    models/base.py); the logits and caches are those of the padded computation."""
    import cache_core.models.base as base
    import cache_core.models.llada as llada
    from cache_core import make_policy, run_step

    model = tiny_model(14, n_kv_heads=2)
    prompts = random_prompts([3, 10, 6, 1], 14)
    packed_calls = []
    rowwise = llada.rowwise

    def spy(fn, inputs, real):
        packed_calls.append(real is not None)
        return rowwise(fn, inputs, real)

    def run(pack_below: float):
        monkeypatch.setattr(base, "PACK_BELOW", pack_below)
        monkeypatch.setattr(llada, "rowwise", spy)
        pol = make_policy(policy)
        s = DecodingSession(model, prompts, 12, 4, 6)
        pol.reset(s.batch_size)
        logits = []
        while not s.done:
            logits.append(run_step(pol, s).logits)
        return logits, s.canvas, [k.clone() for k in s.cache.keys], [v.clone() for v in s.cache.values]

    padded = run(0.0)
    assert not any(packed_calls)
    packed = run(1.01)
    assert any(packed_calls), "no step packed its rows: the test does not reach the packed path"
    for a, b in zip(padded[0], packed[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(padded[1], packed[1])
    for a, b in zip(padded[2] + padded[3], packed[2] + packed[3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_last_layer_trace_is_the_full_trace_last_layer() -> None:
    """generate() traces only the last layer's attention for feature-reading policies: same features, less work."""
    from cache_core.policy import StepContext

    model = tiny_model(15, n_layers=3)
    prompts = random_prompts([4, 7], 15)
    sessions = {t: DecodingSession(model, prompts, 8, 4, 4, trace_attention=t) for t in (True, "last")}
    plan = RefreshPlan.refresh_all(2, sessions[True].cache.n_blocks)
    for _ in range(2):
        traces = {t: s.step(plan).trace.attention_to_keys for t, s in sessions.items()}
        assert traces[True].shape[0] == 3 and traces["last"].shape[0] == 1
        torch.testing.assert_close(traces["last"][0], traces[True][-1])
        torch.testing.assert_close(sessions["last"].features().blocks, sessions[True].features().blocks)
    assert StepContext.of(sessions["last"]).n_layers == 3
    with pytest.raises(ValueError, match="trace_attention='first'"):
        DecodingSession(model, prompts, 8, 4, 4, trace_attention="first")

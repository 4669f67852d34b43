"""dLLM-Cache as the reference runs it: on a cached step every response position runs through all layers from its
current token, its fresh value is compared with the cached one at every layer, floor(rho * n) positions per layer and
row are recomputed, and the others carry their cached residual update (see DLLMCache, DiffusionModel.forward_partial).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from families import write_family_dir
from helpers import random_prompts, tiny_model

from cache_core import generate, load_model, load_tokenizer
from cache_core.bench.tasks import TaskSuite, encode_prompt
from cache_core.cache import RefreshPlan
from cache_core.heuristics import DLLMCache
from cache_core.memory import MemoryConfig
from cache_core.policy import StepContext, decide, run_step
from cache_core.session import DecodingSession

BUILTIN = Path(__file__).resolve().parents[1] / "checkpoints" / "builtin"
GEN, BLOCK, STEPS = 64, 16, 64


@pytest.fixture(scope="module")
def builtin():
    return load_model(BUILTIN), load_tokenizer(BUILTIN)


def suite_prompts(tokenizer, n: int) -> list[list[int]]:
    return [encode_prompt(tokenizer, e) for e in TaskSuite().split("test", n)]


def residual_session(model, prompts, gen: int = GEN, block: int = BLOCK, steps: int = STEPS, **kw) -> DecodingSession:
    session = DecodingSession(model, prompts, gen, block, steps, trace_attention=False, **kw)
    session.cache.enable_residual_updates()
    return session


def carried_positions(session: DecodingSession, plan: RefreshPlan) -> torch.Tensor:
    """(B, N) the positions a cached step carries: its candidates the cache does not refresh from layer 0."""
    start = session.cache.start_layers(plan, session.required_positions())
    return plan.adaptive[0] & (start > 0)


def test_layer_zero_sees_the_tokens_committed_since_the_last_refresh(builtin) -> None:
    """At layer 0 a carried token's fresh value is its current token's: a token committed since its value at layer 0
    was last computed is less similar than 1 (and is among the least similar, so recomputed), an unchanged one exactly
    as similar as its cached value; deeper layers see the drift those tokens cause."""
    model, tok = builtin
    policy = DLLMCache(response_interval=5, prompt_interval=50, rho=0.25)
    session = residual_session(model, suite_prompts(tok, 4))
    policy.reset(session.batch_size)
    layer0_tokens = session.canvas.clone()  # the token each position's cached layer-0 value was computed from
    checked = 0
    while not session.done:
        plan, _ = decide(policy, session)
        canvas, values_before = session.canvas.clone(), session.cache.values[0].clone()
        if plan.adaptive is None:
            result = session.step(plan)
        else:
            carried = carried_positions(session, plan)
            changed = carried & (canvas != layer0_tokens)
            result = session.step(plan)
            similarity = result.trace.adaptive_similarity
            assert bool(torch.isnan(similarity[:, ~carried.cpu()]).all())
            assert not bool(torch.isnan(similarity[:, carried.cpu()]).any())
            unchanged = (carried & ~changed).cpu()
            torch.testing.assert_close(similarity[0][unchanged], torch.ones(int(unchanged.sum())), atol=1e-5, rtol=0)
            if bool(changed.any()):
                checked += int(changed.sum())
                assert bool((similarity[0][changed.cpu()] < 0.999).all())
                # the least similar are recomputed: a changed token's cached value at layer 0 is now its token's
                rows, pos = changed.nonzero(as_tuple=True)
                with torch.no_grad():
                    fresh = model.value_probe(0, model.embed(canvas[rows, pos]))
                torch.testing.assert_close(session.cache.values[0][rows, :, pos].flatten(1), fresh)
                assert not torch.allclose(values_before[rows, :, pos].flatten(1), fresh)
                assert bool((similarity[1:][:, carried.cpu()] < 1 - 1e-4).any()), "no drift below layer 0"
        value_changed = (session.cache.values[0] != values_before).any(-1).any(1)  # (B, N)
        recomputed = (result.start_layer == 0) | value_changed
        layer0_tokens = torch.where(recomputed, canvas, layer0_tokens)
    assert checked > 0, "no cached step saw a token committed since its last refresh"


def test_each_layer_adds_floor_rho_of_its_candidates_per_row(builtin) -> None:
    model, tok = builtin
    prompts = suite_prompts(tok, 3)
    prompts[1] = prompts[1][:5]  # ragged: left padding in the batch
    for rho in (0.3, 0.01):
        policy = DLLMCache(response_interval=4, rho=rho)
        session = residual_session(model, prompts)
        policy.reset(session.batch_size)
        cached_steps = 0
        while not session.done:
            plan, _ = decide(policy, session)
            if plan.adaptive is None:
                session.step(plan)
                continue
            cached_steps += 1
            n = carried_positions(session, plan).sum(1).cpu()
            base = (session.cache.start_layers(plan, session.required_positions()) == 0).sum(1).cpu()
            trace = session.step(plan).trace
            expected = torch.tensor([int(rho * int(c)) for c in n])  # floor, as the reference's int(rho * n)
            for layer in range(model.facts.n_layers):
                assert torch.equal(trace.adaptive_counts[layer], expected), (rho, layer)
                assert torch.equal(trace.active_counts[layer], base + expected)
        assert cached_steps > 0
        if rho == 0.01:
            assert int(expected.sum()) == 0  # floor gives 0: nothing is added (ceil would add one per row)


def _drive(model, prompts, policy: DLLMCache, **kw) -> tuple[list[torch.Tensor], torch.Tensor]:
    session = DecodingSession(model, prompts, kw.pop("gen", GEN), kw.pop("block", BLOCK), kw.pop("steps", STEPS),
                              trace_attention=False)
    policy.reset(session.batch_size)
    logits = []
    while not session.done:
        logits.append(run_step(policy, session).logits)
    return logits, session.generated


def test_rho_one_is_a_full_recompute_of_the_response(builtin) -> None:
    """rho = 1 recomputes every carried position in every layer: the response refreshed at every step."""
    model, tok = builtin
    prompts = suite_prompts(tok, 3)
    every, tokens = _drive(model, prompts, DLLMCache(response_interval=4, rho=1.0))
    ref, ref_tokens = _drive(model, prompts, DLLMCache(response_interval=1, rho=0.0))
    assert torch.equal(tokens, ref_tokens)
    for a, b in zip(every, ref):
        assert torch.equal(a, b)


def test_rho_zero_is_the_plain_interval_cache(builtin) -> None:
    """With nothing picked, the carried positions flow without touching the cached K/V the step attends to: the
    logits are the plain interval cache's, bit for bit."""
    model, tok = builtin
    prompts = suite_prompts(tok, 2)
    policy = DLLMCache(response_interval=4, rho=0.25)
    carried, plain = residual_session(model, prompts), DecodingSession(model, prompts, GEN, BLOCK, STEPS,
                                                                       trace_attention=False)
    policy.reset(2)
    while not carried.done:
        plan = policy.plan(None, StepContext.of(carried))
        adaptive = None if plan.adaptive is None else (plan.adaptive[0], 0.0)
        a = carried.step(RefreshPlan(plan.start_layer, adaptive=adaptive))
        b = plain.step(RefreshPlan(plan.start_layer))
        assert torch.equal(a.logits, b.logits)
        if adaptive is not None:
            assert int(a.trace.adaptive_counts.sum()) == 0
    assert torch.equal(carried.generated, plain.generated)


def test_a_carried_position_adds_its_cached_update_to_its_fresh_input() -> None:
    """Unit level, rho = 0 (nothing recomputed): a carried position enters layer 0 with its current token's embedding
    and layer l + 1 with its layer-l input plus the update cached at its last computation; its similarity at layer l
    is that of the value projected from this input with the cached value."""
    model = tiny_model(3, n_kv_heads=2, n_layers=3)
    session = residual_session(model, random_prompts([5, 9], 3), gen=12, block=4, steps=12)
    cache, L = session.cache, model.facts.n_layers
    session.step(RefreshPlan.refresh_all(2, session.n_blocks))  # everything computed: inputs, K/V, updates
    session.canvas[:, -4:] = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14]])  # the suffix changes
    updates = [u.clone() for u in cache.updates]
    values = [v.clone() for v in cache.values]
    keys = [k.clone() for k in cache.keys]
    response = torch.zeros_like(cache.key_mask)
    response[:, session.prompt_region:] = True
    plan = RefreshPlan.reuse_all(2, session.n_blocks, L)
    plan.adaptive = (response, 0.0)
    carried = carried_positions(session, plan)
    trace = session.step(plan).trace
    rows, pos = carried.nonzero(as_tuple=True)
    with torch.no_grad():
        x = model.embed(session.canvas)
        for layer in range(L):
            if layer:
                torch.testing.assert_close(cache.hidden[layer][carried], x[carried], atol=0, rtol=0)
            cos = F.cosine_similarity(model.value_probe(layer, x).float(), values[layer].transpose(1, 2).flatten(2),
                                      dim=-1)
            torch.testing.assert_close(trace.adaptive_similarity[layer][carried], cos[carried], atol=1e-6, rtol=0)
            assert torch.equal(cache.keys[layer][rows, :, pos], keys[layer][rows, :, pos])  # K/V are not touched
            assert torch.equal(cache.values[layer][rows, :, pos], values[layer][rows, :, pos])
            x = x + updates[layer]
    assert int(trace.adaptive_counts.sum()) == 0
    assert bool(((cos[carried] - 1).abs() > 1e-4).any()), "the changed suffix must show at the last layer"


def test_the_residual_updates_are_counted_and_exact_when_kept_late(builtin) -> None:
    """The session keeps residual updates from the first adaptive plan on, derived from the cached layer inputs: the
    same updates and logits as a cache that kept them from the start; their bytes are counted."""
    model, tok = builtin
    prompts = suite_prompts(tok, 2)
    policy = DLLMCache(response_interval=4)
    early, late = residual_session(model, prompts), DecodingSession(model, prompts, GEN, BLOCK, STEPS,
                                                                    trace_attention=False)
    policy.reset(2)
    while not early.done:
        plan = policy.plan(None, StepContext.of(early))
        assert torch.equal(early.step(plan).logits, late.step(plan).logits)
        if late.step_index == 1:
            assert late.cache.updates is None  # a refresh step: nothing kept yet
        else:
            for a, b in zip(early.cache.updates[:-1], late.cache.updates[:-1]):
                assert torch.equal(a, b)
    assert torch.equal(early.generated, late.generated)
    full = generate(model, prompts, GEN, BLOCK, STEPS, policy="full")
    dllm = generate(model, prompts, GEN, BLOCK, STEPS, policy=DLLMCache())
    f = model.facts
    kv, hidden = 2 * f.n_kv_heads * f.head_dim, f.hidden_size
    assert dllm.stats.steps[0].cache_bytes == full.stats.peak_cache_bytes  # step 0 refreshes: no updates yet
    assert dllm.stats.peak_cache_bytes * (kv + hidden) == full.stats.peak_cache_bytes * (kv + 2 * hidden)
    paged = DecodingSession(model, prompts, GEN, BLOCK, STEPS, memory=MemoryConfig())
    before = paged.cache.store.page_native_bytes
    paged.cache.enable_residual_updates()
    assert paged.cache.store.page_native_bytes * (kv + hidden) == before * (kv + 2 * hidden)
    # a forward with an adaptive plan on a cache without updates is refused
    bare = DecodingSession(model, prompts, GEN, BLOCK, STEPS)
    bare.step(RefreshPlan.refresh_all(2, bare.n_blocks))
    plan = policy.plan(None, StepContext.of(bare))
    start = bare.cache.start_layers(plan, bare.required_positions())
    with pytest.raises(ValueError, match="residual updates"), torch.no_grad():
        model.forward_partial(bare.canvas, bare.cache, start, bare.block_positions(), adaptive=plan.adaptive)


def test_paged_updates_kept_late_equal_the_dense_ones(builtin) -> None:
    model, tok = builtin
    prompts = suite_prompts(tok, 2)
    dense = generate(model, prompts, GEN, BLOCK, STEPS, policy=DLLMCache(response_interval=4))
    paged = generate(model, prompts, GEN, BLOCK, STEPS, policy=DLLMCache(response_interval=4), memory={})
    assert torch.equal(dense.tokens, paged.tokens)
    small = generate(model, prompts, GEN, BLOCK, STEPS, policy=DLLMCache(response_interval=4),
                     memory={"preset": "memory"})
    assert small.stats.peak_cache_bytes < dense.stats.peak_cache_bytes
    assert (small.tokens == dense.tokens).float().mean() > 0.9


def test_batched_left_padded_rows_decode_as_alone(builtin) -> None:
    """The pick is per row: a row of a left-padded batch decodes what it decodes alone."""
    model, tok = builtin
    prompts = suite_prompts(tok, 3)
    prompts[0] = prompts[0][:7]
    batch = generate(model, prompts, GEN, BLOCK, STEPS, policy=DLLMCache(response_interval=8))
    assert bool((batch.tokens != model.facts.mask_token_id).all())
    assert batch.stats.flop_fraction < 0.5
    for b, prompt in enumerate(prompts):
        alone = generate(model, [prompt], GEN, BLOCK, STEPS, policy=DLLMCache(response_interval=8))
        assert torch.equal(alone.tokens[0], batch.tokens[b]), b


@pytest.mark.parametrize("family", ("dream", "llada_moe"))
def test_other_families_rho_one_is_the_response_refresh(family, tmp_path) -> None:
    write_family_dir(tmp_path / family, family, tokenizer=False)
    model = load_model(tmp_path / family)
    prompts = random_prompts([5, 9], seed=4, vocab=min(model.facts.vocab_size, 64))
    prompts = [[t if t != model.facts.mask_token_id else 0 for t in p] for p in prompts]
    kw = dict(gen=16, block=8, steps=16)
    every, tokens = _drive(model, prompts, DLLMCache(response_interval=4, rho=1.0), **dict(kw))
    ref, ref_tokens = _drive(model, prompts, DLLMCache(response_interval=1, rho=0.0), **dict(kw))
    assert torch.equal(tokens, ref_tokens)
    for a, b in zip(every, ref):
        assert torch.equal(a, b)
    out = generate(model, prompts, 16, 8, 16, policy=DLLMCache(response_interval=4))
    assert bool((out.tokens != model.facts.mask_token_id).all())
    assert out.stats.flop_fraction < 1.0

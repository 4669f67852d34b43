"""The cache runtime: cache partitions (fixed sizes, dynamic), the quality monitor, the memory manager (precision
tiers, budget, eviction, offload and prefetch) and block-size tuning. Tiny random models; the built-in model only
where a shipped policy must run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import random_prompts, tiny_model

from cache_core.features import BLOCK_COLUMNS, GLOBAL_COLUMNS
from cache_core.generate import generate
from cache_core.memory import MemoryConfig, _Page
from cache_core.monitor import QualityMonitor
from cache_core.partition import BlockPartition, DynamicPartitioner, PartitionError, check_cache_block_size
from cache_core.policy import run_step
from cache_core.registry import make_policy
from cache_core.session import DecodingSession

ROOT = Path(__file__).resolve().parents[1]
GEN = dict(gen_length=16, block_length=4, steps=8)


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([5, 9, 3], 11)


def gen(model, prompts, policy="never", **kw):
    return generate(model, prompts, policy=policy, **{**GEN, **kw})


# --- partitions ------------------------------------------------------------------------------------------------
def test_partition_reductions_match_a_plain_loop():
    part = BlockPartition([3, 1, 4, 4])
    values = torch.arange(24, dtype=torch.float32).view(2, 12)
    weights = (torch.arange(24).view(2, 12) % 3 != 0).float()
    for b in range(part.n_blocks):
        s = part.slice(b)
        assert torch.equal(part.sum(values)[:, b], values[:, s].sum(1))
        w = weights[:, s].sum(1)
        want = torch.where(w > 0, (values[:, s] * weights[:, s]).sum(1) / w.clamp(min=1e-9), torch.zeros(2))
        assert torch.allclose(part.mean(values, weights)[:, b], want)
    assert part.expand(torch.tensor([[1, 2, 3, 4]])).tolist() == [[1, 1, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4]]
    uniform = BlockPartition.uniform(12, 4)
    assert torch.equal(uniform.sum(values), values.view(2, 3, 4).sum(-1))  # the reshape path, bit for bit


def test_fixed_partitions_cut_from_the_generation_start():
    assert BlockPartition.fixed(8, 16, 4, 2).sizes_list == [2] * 12
    assert BlockPartition.fixed(8, 12, 4, 8).sizes_list == [8, 8, 4]  # prompt | gen 8 + last 4 (a whole block)
    assert BlockPartition.fixed(12, 8, 4, 8).sizes_list == [4, 8, 8]  # the short block sits on the padding side
    BlockPartition.fixed(12, 8, 4, 8).check_nested(4, 12)


@pytest.mark.parametrize("sizes, message", [([6, 6, 4], "would split decoding block"),
                                            ([4, 8, 4], "crosses the prompt/generation boundary")])
def test_a_partition_that_splits_a_decoding_block_is_refused(sizes, message):
    with pytest.raises(PartitionError, match=message):
        BlockPartition(sizes).check_nested(4, 8)


def test_a_cache_block_size_that_splits_decoding_blocks_is_refused(model, prompts):
    with pytest.raises(PartitionError, match="cache_block_size=3 would split a decoding block"):
        gen(model, prompts, cache_block_size=3)
    with pytest.raises(PartitionError, match="exclusive"):
        gen(model, prompts, cache_block_size=2, dynamic_blocks=True)
    with pytest.raises(PartitionError, match="granule"):
        gen(model, prompts, dynamic_blocks={"granule": 3})
    with pytest.raises(PartitionError, match="unknown keys"):
        gen(model, prompts, dynamic_blocks={"grain": 2})
    with pytest.raises(PartitionError, match="positive whole number"):
        check_cache_block_size(0, 4)


@pytest.mark.parametrize("policy", ["full", "never", "dual_cache"])
def test_the_cache_block_size_does_not_change_policies_that_ignore_it(model, prompts, policy):
    # full recomputes everything and never/dual_cache only what the step needs: the partition cannot matter.
    base = gen(model, prompts, policy)
    for size in (1, 2, 4, 8, 16):
        other = gen(model, prompts, policy, cache_block_size=size)
        assert torch.equal(other.tokens, base.tokens), size
        assert other.stats.flops == pytest.approx(base.stats.flops, rel=1e-12)


def test_finer_cache_blocks_refresh_fewer_positions(model, prompts):
    # A block-level rule over smaller blocks refreshes a subset of what it refreshes over whole decoding blocks.
    coarse = gen(model, prompts, "confidence", min_confidence=0.5)
    fine = gen(model, prompts, "confidence", min_confidence=0.5, cache_block_size=1)
    assert fine.stats.flops < coarse.stats.flops


def features_in_range(session: DecodingSession) -> None:
    f = session.features(0.5)
    assert f.blocks.shape[1] == session.n_blocks
    for i, col in enumerate(BLOCK_COLUMNS):
        assert float(f.blocks[..., i].min()) >= col.low and float(f.blocks[..., i].max()) <= col.high, col.name
    for i, col in enumerate(GLOBAL_COLUMNS):
        assert float(f.global_[:, i].min()) >= col.low and float(f.global_[:, i].max()) <= col.high, col.name
    assert f.column("is_decoding").sum(1).min() >= 1  # some block always holds the decoding block


def test_dynamic_partition_merges_stable_blocks_stays_nested_and_keeps_features_normalised(model, prompts):
    session = DecodingSession(model, prompts, 16, 4, 8, dynamic_blocks=DynamicPartitioner(granule=2, max_size=8,
                                                                                          merge_below=1.0,
                                                                                          split_above=1.0))
    policy = make_policy("confidence", min_confidence=0.5)
    policy.reset(session.batch_size)
    seen = set()
    while not session.done:
        features_in_range(session)
        part = session.cache.partition
        part.check_nested(4, session.prompt_region)
        seen.add(tuple(part.sizes_list))
        run_step(policy, session)
    assert len(seen) > 1  # the partition followed the content
    assert any(max(s) > 4 for s in seen)  # committed blocks merged beyond a decoding block


def test_a_diverging_block_is_not_merged():
    dyn = DynamicPartitioner(granule=2, max_size=16, merge_below=0.1, split_above=0.1)
    stable = torch.ones(1, 16, dtype=torch.bool)
    diverging = torch.zeros(1, 16, dtype=torch.bool)
    assert dyn.partition(stable, diverging, 8, 4).sizes_list == [8, 8]
    diverging[0, 5] = True  # one position of the second decoding block drifted
    assert dyn.partition(stable, diverging, 8, 4).sizes_list == [4, 2, 2, 8]


def test_the_shipped_predictor_runs_on_other_partitions():
    from cache_core.bench.benchmark import load_model_and_tokenizer

    builtin, tok = load_model_and_tokenizer(ROOT / "checkpoints" / "builtin")
    prompt = [tok.encode("repeat: ab ->")]
    path = str(ROOT / "checkpoints" / "policies" / "predictor.onnx")
    for kw in ({}, {"cache_block_size": 8}, {"cache_block_size": 32}, {"dynamic_blocks": {"granule": 8}}):
        out = generate(builtin, prompt, 64, 16, 64, policy=path, **kw)
        assert 0 < out.stats.flop_fraction < 1, kw


# --- quality monitor -------------------------------------------------------------------------------------------
def test_a_silent_monitor_changes_no_token_and_counts_its_shadow_forwards(model, prompts):
    base = gen(model, prompts, "never")
    quiet = QualityMonitor(sample_rate=0.5, kl_threshold=1e9, max_flips=10**6)
    checked = gen(model, prompts, "never", monitor=quiet)
    assert torch.equal(checked.tokens, base.tokens)
    sampled = [s for s in checked.stats.steps if s.monitor_rows]
    assert len(sampled) == len(checked.stats.steps) // 2
    assert all(s.monitor_alarms == 0 for s in checked.stats.steps)
    per_step = {s.step: s.full_flops for s in checked.stats.steps}
    assert sum(s.monitor_flops for s in sampled) == pytest.approx(sum(per_step[s.step] for s in sampled))
    assert checked.stats.flops == pytest.approx(base.stats.flops + sum(s.monitor_flops for s in sampled))
    off = gen(model, prompts, "never", monitor=QualityMonitor(enabled=False))
    assert torch.equal(off.tokens, base.tokens) and off.stats.flops == base.stats.flops


def test_a_monitor_on_every_step_recovers_the_no_cache_tokens(model, prompts):
    full = gen(model, prompts, "full")
    never = gen(model, prompts, "never")
    assert not torch.equal(never.tokens, full.tokens)  # the aggressive cache does lose tokens here
    strict = QualityMonitor(sample_rate=1.0, kl_threshold=0.0, max_flips=0, drift_threshold=0.0)
    repaired = gen(model, prompts, "never", monitor=strict)
    assert torch.equal(repaired.tokens, full.tokens)
    assert sum(s.monitor_alarms for s in repaired.stats.steps) > 0


def test_monitor_alarms_raise_the_budget_of_their_rows(model, prompts):
    session = DecodingSession(model, prompts, 16, 4, 8, monitor=QualityMonitor(sample_rate=1.0, kl_threshold=0.0,
                                                                              budget_boost=0.25))
    policy = make_policy("never")
    policy.reset(session.batch_size)
    run_step(policy, session)
    run_step(policy, session)
    alarms = sum(s.monitor_alarms for s in session.stats.steps)
    assert alarms > 0
    assert float(session.budget_boost.sum()) == pytest.approx(0.25 * alarms)
    features = session.features(0.5)
    budget = features.global_[:, features.schema.global_index("budget")]
    assert torch.allclose(budget, (0.5 + session.budget_boost).clamp(max=1.0))


def test_monitor_rows_subset(model, prompts):
    out = gen(model, prompts, "never", monitor=QualityMonitor(sample_rate=1.0, row_rate=0.34))
    assert {s.monitor_rows for s in out.stats.steps} == {1}


@pytest.mark.parametrize("bad, message", [({"sample_rate": 0.0}, "sample_rate"), ({"sample_rate": 1.5}, "sample_rate"),
                                          ({"row_rate": -1}, "row_rate"), ({"max_flips": -1}, "max_flips"),
                                          ({"rate": 0.5}, "unknown keys")])
def test_bad_monitor_arguments_are_refused_by_name(model, prompts, bad, message):
    with pytest.raises(ValueError, match=message):
        gen(model, prompts, "never", monitor=bad)


# --- memory manager --------------------------------------------------------------------------------------------
def test_native_pages_change_nothing(model, prompts):
    for policy in ("never", "dual_cache", "dllm_cache", "elastic_cache"):
        dense = gen(model, prompts, policy)
        paged = gen(model, prompts, policy, memory={"preset": "speed"})
        assert torch.equal(paged.tokens, dense.tokens), policy
        assert paged.stats.flops == pytest.approx(dense.stats.flops, rel=1e-12), policy


@pytest.mark.parametrize("precision, tol", [("bf16", 2 ** -8), ("fp8", 2 ** -3), ("int8", 1 / 127)])
def test_page_precisions_round_trip_within_their_resolution(precision, tol):
    x = torch.randn(2, 3, 4, 8)
    page = _Page(x, precision, torch.float32)
    back = page.dense(torch.float32)
    scale = x.abs().amax(dim=(2, 3), keepdim=True) if precision != "bf16" else x.abs()
    assert bool(((back - x).abs() <= tol * scale + 1e-7).all())
    assert page.nbytes() < x.numel() * 4


@pytest.mark.parametrize("memory", [{"budget_bytes": 1}, {"budget_bytes": 10**9, "preset": "memory"},
                                    {"stable_precision": "fp8"}])
def test_the_memory_budget_is_never_exceeded(model, prompts, memory):
    probe = DecodingSession(model, prompts, 16, 4, 8, memory=MemoryConfig())
    minimum = probe.cache.store.minimum_bytes()
    dense = sum(t.numel() * t.element_size() for layer in range(model.facts.n_layers) for t in (
        torch.empty(3, 4, probe.canvas.shape[1], 8), torch.empty(3, 4, probe.canvas.shape[1], 8),
        torch.empty(3, probe.canvas.shape[1], 32)))
    budget = memory.get("budget_bytes", 10**9)
    budgets = [minimum, (minimum + dense) // 2] if budget == 1 else [budget]
    for b in budgets:
        cfg = {**memory, "budget_bytes": b}
        out = gen(model, prompts, "dual_cache", memory=cfg)
        assert max(s.cache_bytes for s in out.stats.steps) <= b
        assert out.tokens.shape == (3, 16)


def test_a_budget_below_the_decoding_block_is_refused(model, prompts):
    with pytest.raises(ValueError, match="budget_bytes=100 is smaller than the decoding block needs"):
        gen(model, prompts, memory={"budget_bytes": 100})


@pytest.mark.parametrize("bad, message", [({"stable_precision": "int4"}, "not a known precision"),
                                          ({"low_precision": "fp4"}, "not a known precision"),
                                          ({"preset": "tiny"}, "preset"), ({"prefetch": True}, "needs offload"),
                                          ({"size": 3}, "unknown keys")])
def test_bad_memory_arguments_are_refused_by_name(model, prompts, bad, message):
    with pytest.raises(ValueError, match=message):
        gen(model, prompts, memory=bad)


def test_low_precision_pages_shrink_the_store(model, prompts):
    native = gen(model, prompts, "dual_cache", memory={"preset": "speed"}).stats.peak_cache_bytes
    small = gen(model, prompts, "dual_cache", memory={"preset": "memory"}).stats.peak_cache_bytes
    assert small < native


def test_evicted_and_recomputed_blocks_equal_fresh_ones(model, prompts):
    # Evict every suffix block beyond the decoding one (window 0); when the decoding block moves on, the next one is
    # readmitted and recomputed from its tokens. Under `full` every held position is recomputed against the held
    # keys, so the cache must equal a plain forward of the same canvas over the same keys.
    session = DecodingSession(model, prompts, 16, 4, 8, memory=MemoryConfig(evict_far=True, window=0))
    policy = make_policy("full")
    policy.reset(session.batch_size)
    store = session.cache.store
    readmitted = 0
    while not session.done:
        before = list(store.tier)
        canvas, attended = session.canvas.clone(), session.cache.attention_mask.clone()
        run_step(policy, session)
        came_back = [p for p, t in enumerate(before) if t == "evicted" and not store.padding[p]]
        _, keys, values = model(canvas, attended, session.cache.positions, return_kv=True)
        for layer in range(model.facts.n_layers):
            session.cache.open_layer(layer)
            held = attended[:, None, :, None]
            for mine, fresh in ((session.cache.keys[layer], keys[layer]), (session.cache.values[layer], values[layer])):
                assert torch.allclose(mine * held, fresh * held, atol=1e-5)
            session.cache.close_layer(layer, None)
        readmitted += len(came_back)
    assert store.recomputed_pages > 0


@pytest.mark.parametrize("policy", ["dual_cache", "confidence"])
def test_prefetch_on_equals_prefetch_off_token_for_token(model, policy):
    # Equal prompts of two blocks: with room for 5 of the 6 blocks, the block farthest from the decoding one is
    # evicted; once the decoding block passes the middle that is the first prompt block, which goes to the host.
    prompts = random_prompts([8, 8, 8], 4)
    probe = DecodingSession(model, prompts, 16, 4, 8, memory=MemoryConfig())
    budget = probe.cache.store.minimum_bytes() + 4 * probe.cache.store.page_native_bytes
    base = {"budget_bytes": budget, "offload": True, "low_precision": "native"}  # no demotion: the budget evicts
    off = gen(model, prompts, policy, memory=base)
    on = gen(model, prompts, policy, memory={**base, "prefetch": True})
    assert torch.equal(on.tokens, off.tokens)
    assert on.stats.flops == off.stats.flops
    assert max(s.host_cache_bytes for s in on.stats.steps) > 0  # a computed block did go to the host
    assert max(s.cache_bytes for s in on.stats.steps) <= budget


def test_an_offloaded_block_comes_back_unchanged(model, prompts):
    session = DecodingSession(model, prompts, 16, 4, 8, memory=MemoryConfig(offload=True))
    run_step(make_policy("full"), session)
    store = session.cache.store
    before = [[kind[1].dense(torch.float32).clone() for kind in layer] for layer in store.pages]
    store.drop(1)
    assert store.offloaded[1] and store.host_bytes() > 0
    assert store.bring_back([1]) == []  # nothing to recompute: it was copied back
    after = [[kind[1].dense(torch.float32) for kind in layer] for layer in store.pages]
    assert all(torch.equal(a, b) for la, lb in zip(before, after) for a, b in zip(la, lb))
    assert store.host_bytes() == 0 and store.copied_back_pages == 1


def test_the_memory_manager_works_on_another_family(tmp_path):
    from families import write_family_dir

    from cache_core.checkpoint import load_model

    write_family_dir(tmp_path / "dream", "dream")
    dream = load_model(tmp_path / "dream")
    ps = random_prompts([4, 6], 5, vocab=50)
    dense = generate(dream, ps, 8, 4, 4, policy="dual_cache")
    paged = generate(dream, ps, 8, 4, 4, policy="dual_cache", memory={"preset": "speed"}, cache_block_size=2,
                     monitor={"sample_rate": 0.5, "kl_threshold": 1e9, "max_flips": 10**6})
    assert torch.equal(paged.tokens, dense.tokens)


# --- block-size tuning -----------------------------------------------------------------------------------------
def test_tuning_candidates_skip_what_does_not_fit():
    from cache_core.bench.tuning import candidates

    fit, skipped = candidates([8, 16, 5], [4, 8, 24], gen_length=64, steps=64)
    assert (8, 4) in fit and (8, 24) in fit and (16, 8) in fit
    assert (16, 24) not in fit and not any(bl == 5 for bl, _ in fit)
    assert any("block_length=5" in s for s in skipped) and any("cache_block_size=24" in s for s in skipped)


def test_tune_mode_reports_the_cheapest_feasible_setting(tmp_path):
    from cache_core.bench.benchmark import load_model_and_tokenizer
    from cache_core.bench.tasks import TaskSuite
    from cache_core.bench.tuning import report, tune

    builtin, tok = load_model_and_tokenizer(ROOT / "checkpoints" / "builtin")
    examples = TaskSuite().split("validation", 2)
    g = dict(gen_length=64, block_length=16, steps=64, threshold=None, temperature=0.0, remasking="low_confidence")
    result = tune(builtin, tok, examples, "confidence", g, [16], [8, 16], max_em_loss=1.0, progress=False)
    assert len(result["candidates"]) == 2 and all(c["feasible"] for c in result["candidates"])
    assert result["best"]["flop_fraction"] == min(c["flop_fraction"] for c in result["candidates"])
    out = report(result, tmp_path)
    assert Path(out["plot"]).stat().st_size > 0 and "best:" in Path(out["table"]).read_text()


def test_the_readme_snippets_run():
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    first, runtime = blocks[0], next(b for b in blocks if "monitor=" in b)
    namespace: dict = {}
    cwd = Path.cwd()
    try:
        import os

        os.chdir(ROOT)  # the snippets use paths relative to the clone
        exec(first.replace("print(", "(lambda *a: None)("), namespace)
        exec(runtime, namespace)
    finally:
        os.chdir(cwd)


def test_the_runtime_study_writes_its_table_and_plot(tmp_path):
    from cache_core.bench import runtime_study as study
    from cache_core.bench.benchmark import load_model_and_tokenizer
    from cache_core.bench.tasks import TaskSuite

    builtin, tok = load_model_and_tokenizer(ROOT / "checkpoints" / "builtin")
    examples = TaskSuite().split("test", 2)
    settings = [("never", "no monitor", study.BASE, {}),
                ("never", "monitor 0.5", study.BASE, {"monitor": {"sample_rate": 0.5, "kl_threshold": 0.0}})]
    points = study._points("monitor", builtin, tok, examples, settings)
    assert [p.policy for p in points] == ["full", "never", "never"]
    assert points[0].flop_fraction == 1.0 and points[2].extra["monitor_flop_fraction"] > 0
    text = study.write(points, "monitor", tmp_path, {"n_examples": 2})
    assert "recovered" in text and (tmp_path / "monitor.png").stat().st_size > 0
    written = json.loads((tmp_path / "monitor.json").read_text())["points"]
    assert "recovered" in written[2]["extra"]  # the JSON carries the table's recovered share

"""The batched feature computation (one stacked reduction for the source columns, per-block columns kept in the
session's memo) gives the very float32 values of the straightforward one: every column computed on its own, as the
text schema did before (`_reference_features` below is that code, column for column), on sessions of several kinds:
a left-padded batch, cache blocks smaller and larger than the decoding block (uneven ones too), a dynamic partition,
threshold decoding, a budget and the quality monitor's boosts. The learned policy's decisions stay those of the plain
path as well."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache_core.features import TEXT_SCHEMA, StepFeatures, compute_features
from cache_core.learned import load_policy
from cache_core.partition import BlockPartition, DynamicPartitioner
from cache_core.policy import StepContext, decide, run_step
from cache_core.registry import make_policy
from cache_core.session import DecodingSession
from policies.evaluate import BudgetedPolicy
from tests.helpers import random_prompts, tiny_model

PREDICTOR = Path(__file__).resolve().parents[1] / "checkpoints" / "policies" / "predictor.onnx"


def _reference_features(session: DecodingSession, budget: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The text schema's columns, each on its own (the computation before it was batched)."""
    s = session
    B, N = s.canvas.shape
    part, nb = s.cache.partition, s.cache.n_blocks
    valid = s.cache.key_mask.float()
    blocks = torch.arange(nb, device=s.canvas.device)

    def mean(values):
        return part.mean(values, valid)

    def per_block(values):
        return values.float().expand(B, nb)

    def constant(value):
        return torch.full((B,), value, device=s.canvas.device)

    def relative_position():
        d = s.decoding_block
        if part.uniform_size is not None:
            return per_block((blocks - d).float() / nb)
        starts = part.starts.to(blocks.device)
        return per_block((starts - starts[d]).float() / N)

    def is_decoding():
        first, end = s.decoding_blocks
        return per_block((blocks >= first) & (blocks < end))

    def attention_mass(previous=False):
        return part.sum(s.previous_attention_mass if previous else s.attention_mass)

    block = {
        "relative_position": relative_position,
        "is_prompt": lambda: per_block(blocks < s.prompt_blocks),
        "is_decoding": is_decoding,
        "masked_fraction": lambda: mean((s.canvas == s.mask_id).float()),
        "changed_since_refresh": lambda: mean((s.canvas != s.tokens_at_refresh).float()),
        "steps_since_refresh": lambda: mean(((s.step_index - s.last_refresh_step).float().clamp(min=0)
                                             / s.block_length).clamp(max=1.0)),
        "confidence": lambda: mean(s.confidence),
        "entropy": lambda: mean(s.entropy.clamp(0, 1)),
        "attention_mass": lambda: attention_mass().clamp(0, 1),
        "attention_shift": lambda: (attention_mass() - attention_mass(previous=True)).abs().clamp(0, 1),
        "refresh_drift": lambda: mean(s.refresh_drift.clamp(0, 1)),
        "valid_fraction": lambda: part.fraction(valid),
    }
    global_ = {
        "progress": lambda: 1.0 - (s.canvas[:, s.prompt_region:] == s.mask_id).float().mean(1),
        "decoding_block_fraction": lambda: constant(s.generation_block / s.n_generation_blocks),
        "step_in_block": lambda: constant(min(s.step_in_block / s.block_length, 1.0)),
        "compute_spent": lambda: constant(min(s.stats.flop_fraction if s.stats.steps else 1.0, 1.0)),
        "budget": lambda: s.effective_budget(budget),
        "block_share": lambda: constant(s.block_length / s.gen_length),
        "block_size": lambda: constant(min(s.block_length / 64.0, 1.0)),
        "generation_share": lambda: constant(s.gen_length / N),
        "commit_rate": lambda: s.last_commit_rate.clamp(0, 1),
        "threshold": lambda: constant(float(s.threshold or 0.0)),
    }
    assert tuple(block) == TEXT_SCHEMA.block_names and tuple(global_) == TEXT_SCHEMA.global_names
    return (torch.stack([f() for f in block.values()], -1).float(),
            torch.stack([f() for f in global_.values()], -1).float())


def _same(features, reference, where: str) -> None:
    blocks, global_ = reference
    assert features.blocks.dtype == torch.float32 and features.global_.dtype == torch.float32
    for got, want, names in ((features.blocks, blocks, TEXT_SCHEMA.block_names),
                             (features.global_, global_, TEXT_SCHEMA.global_names)):
        assert got.shape == want.shape, where
        for i, name in enumerate(names):  # bit for bit (NaN nowhere: equal_nan would hide a broken column)
            assert torch.equal(got[..., i], want[..., i]), (where, name, got[..., i], want[..., i])


CASES = {  # label -> DecodingSession keywords, the policy, the budget
    "linear": (dict(gen_length=16, block_length=4, steps=8), "dual_cache", None),
    "elastic": (dict(gen_length=16, block_length=4, steps=16), "elastic_cache", 0.5),
    "threshold": (dict(gen_length=16, block_length=8, steps=None, threshold=0.3), "dllm_cache", None),
    "small_cache_blocks": (dict(gen_length=16, block_length=8, steps=8, cache_block_size=2), "confidence", 0.4),
    "large_cache_blocks": (dict(gen_length=24, block_length=4, steps=12, cache_block_size=8), "dkv_cache", None),
    "dynamic": (dict(gen_length=16, block_length=4, steps=8, dynamic_blocks=DynamicPartitioner(
        granule=2, max_size=8, merge_below=1.0, split_above=1.0)), "confidence", None),
    "monitor": (dict(gen_length=16, block_length=4, steps=8), "never", 0.3),
}


@pytest.mark.parametrize("label", list(CASES))
def test_batched_features_equal_the_per_column_reference(label: str) -> None:
    kwargs, policy, budget = CASES[label]
    if label == "monitor":
        from cache_core.monitor import QualityMonitor

        kwargs = {**kwargs, "monitor": QualityMonitor(sample_rate=0.5, kl_threshold=0.0, budget_boost=0.2)}
    model = tiny_model(7, n_kv_heads=2)
    session = DecodingSession(model, random_prompts([3, 11, 6], 5), seed=0, **kwargs)
    if kwargs.get("cache_block_size") == 8:  # the prompt region (12) is cut from its end: uneven blocks
        assert session.cache.partition.uniform_size is None
    seen = set()
    rule = make_policy(policy)
    rule.reset(session.batch_size)
    while not session.done:
        seen.add(tuple(session.cache.partition.sizes_list))
        _same(compute_features(session, budget), _reference_features(session, budget), f"{label}: {seen}")
        run_step(rule, session, budget)
    if session.cache.partition.uniform_size is not None:  # (uneven partitions: relative_position has no
        # decoding block to measure from once the generation is complete, in the reference as well)
        _same(compute_features(session, budget), _reference_features(session, budget), f"{label}: done")
    if label == "dynamic":
        assert len(seen) > 1  # the memo followed the re-cut partitions


@pytest.mark.parametrize("B, threshold", [(1, None), (4, None), (4, 0.9)])
def test_the_shipped_predictor_sees_and_decides_as_on_the_reference(B: int, threshold: float | None) -> None:
    from cache_core.bench.benchmark import load_model_and_tokenizer

    root = Path(__file__).resolve().parents[1]
    model, _ = load_model_and_tokenizer(root / "checkpoints" / "builtin")
    prompts = random_prompts([5, 17, 9, 12][:B], B, vocab=60)
    steps = None if threshold is not None else 32
    session = DecodingSession(model, prompts, 32, 16, steps, threshold=threshold, trace_attention="last")
    policy = BudgetedPolicy(load_policy(PREDICTOR), 0.3)
    policy.reset(B)
    n = 0
    while not session.done:
        features = compute_features(session)
        reference = _reference_features(session, None)
        _same(features, reference, f"step {n}")
        ctx = StepContext.of(session)
        plan = policy.plan(features, ctx)
        want = policy.plan(StepFeatures(*reference), ctx)
        assert torch.equal(plan.start_layer, want.start_layer), n
        got, _ = decide(policy, session)
        assert torch.equal(got.start_layer, plan.start_layer), n
        run_step(policy, session)
        n += 1
    assert n > 1


def test_stacked_partition_sums_equal_one_sum_per_tensor() -> None:
    """What the batching rests on: summing a (k, B, N) stack over its last dimension gives each (B, N) tensor's own
    partition sum bit for bit, for even and uneven partitions."""
    gen = torch.Generator().manual_seed(0)
    for sizes in ([16] * 6, [8] * 12, [3, 16, 16, 32, 5], [64, 32]):
        part = BlockPartition(sizes)
        for B in (1, 3, 16):
            xs = [torch.rand(B, part.length, generator=gen) * 10.0 ** float(e) for e in range(-3, 3)]
            stacked = part.sum(torch.stack(xs), dim=-1)
            for i, x in enumerate(xs):
                assert torch.equal(stacked[i], part.sum(x)), (sizes, B, i)


def test_the_memo_follows_a_new_partition_and_block() -> None:
    model = tiny_model(3)
    session = DecodingSession(model, random_prompts([4, 7], 1), gen_length=8, block_length=4, steps=4)
    first = compute_features(session)
    session.cache.set_partition(BlockPartition([2] * (session.canvas.shape[1] // 2)))  # re-cut by hand
    _same(compute_features(session), _reference_features(session, None), "re-cut")
    assert compute_features(session).blocks.shape[1] != first.blocks.shape[1]
    assert np.isfinite(compute_features(session).policy_input().numpy()).all()

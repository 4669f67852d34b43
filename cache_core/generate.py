"""The one generate loop. The cache policy is a parameter; there is no second copy of this loop per cache mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cache_core.accounting import GenerationStats
from cache_core.memory import MemoryConfig, as_memory
from cache_core.models.base import DiffusionModel
from cache_core.monitor import QualityMonitor, as_monitor
from cache_core.partition import DynamicPartitioner, as_partitioner
from cache_core.policy import ReusePolicy, run_step
from cache_core.registry import make_policy
from cache_core.session import DecodingSession


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, gen_length) generated token ids
    stats: GenerationStats
    policy: dict[str, Any]


def generate(model: DiffusionModel, prompts: list[list[int]] | list[torch.Tensor], gen_length: int,
             block_length: int, steps: int | None, threshold: float | None = None, temperature: float = 0.0,
             policy: str | ReusePolicy | None = None, remasking: str = "low_confidence", seed: int | None = None,
             budget: float | None = None, cache_block_size: int | None = None,
             dynamic_blocks: DynamicPartitioner | dict | None = None, monitor: QualityMonitor | dict | None = None,
             memory: MemoryConfig | dict | None = None, **policy_knobs: Any) -> GenerationResult:
    """Generate `gen_length` tokens after each prompt (LLaDA semantics, optional Fast-dLLM threshold decoding).

    prompts: token-id lists, lengths may differ (left-padded). steps: total denoising steps, a multiple of the number
    of blocks (None with `threshold`). policy: a `ReusePolicy`, a registry name (`full`, `dual_cache`, ...) with its
    knobs as keyword arguments, or a path to an exported learned policy. budget: the compute budget handed to
    budget-conditioned learned policies (a FLOP fraction in (0, 1]).

    Cache runtime (each off by default; see README "Cache runtime"): cache_block_size: cache blocks of another size
    than the decoding block (a divisor or a multiple of block_length); dynamic_blocks: a `DynamicPartitioner` (or its
    fields as a dict) that merges stable blocks and splits diverging ones at every decoding block; monitor: a
    `QualityMonitor` (or its fields) that checks sampled steps against a full forward and repairs drifting blocks;
    memory: a `MemoryConfig` (or its fields): a byte budget, low-precision storage of stable blocks, eviction and
    host offload with prefetch.
    """
    policy = make_policy(policy, **policy_knobs)
    if "text" not in policy.modalities:
        raise ValueError(f"policy {policy.describe()['policy']!r} is an image-cache rule (for DiT models, "
                         "cache_core.image.sample_images) and does not run on a diffusion LM's KV cache")
    if budget is None:  # a budget-conditioned policy runs at the budget its manifest names, not at budget 1
        budget = policy.default_budget
    if budget is not None and not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget} must lie in (0, 1]")
    if budget is not None and not policy.budget_conditioned:
        raise ValueError(f"budget={budget} was given, but policy {policy.describe()['policy']!r} is not "
                         "budget-conditioned and would ignore it; drop budget= (or use a budget-conditioned policy)")
    # Attention traces cost a softmax per traced layer: all layers for attention-reading rules (Elastic-Cache),
    # only the last for the feature schema's attention columns, none otherwise.
    trace = True if policy.uses_attention else "last" if policy.uses_features else False
    session = DecodingSession(
        model, prompts, gen_length, block_length, steps, threshold=threshold, temperature=temperature,
        remasking=remasking, seed=seed, trace_attention=trace, cache_block_size=cache_block_size,
        dynamic_blocks=as_partitioner(dynamic_blocks), monitor=as_monitor(monitor), memory=as_memory(memory),
    )
    policy.reset(session.batch_size)
    while not session.done:
        run_step(policy, session, budget)
    return GenerationResult(tokens=session.generated.clone(), stats=session.stats, policy=policy.describe())

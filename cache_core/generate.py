"""The one generate loop. The cache policy is a parameter; there is no second copy of this loop per cache mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cache_core.accounting import GenerationStats
from cache_core.models.base import DiffusionModel
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
             budget: float | None = None, **policy_knobs: Any) -> GenerationResult:
    """Generate `gen_length` tokens after each prompt (LLaDA semantics, optional Fast-dLLM threshold decoding).

    prompts: token-id lists, lengths may differ (left-padded). steps: total denoising steps, a multiple of the number
    of blocks (None with `threshold`). policy: a `ReusePolicy`, a registry name (`full`, `dual_cache`, ...) with its
    knobs as keyword arguments, or a path to an exported learned policy. budget: the compute budget handed to
    budget-conditioned learned policies (a FLOP fraction in (0, 1]).
    """
    policy = make_policy(policy, **policy_knobs)
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
        remasking=remasking, seed=seed, trace_attention=trace,
    )
    policy.reset(session.batch_size)
    while not session.done:
        run_step(policy, session, budget)
    return GenerationResult(tokens=session.generated.clone(), stats=session.stats, policy=policy.describe())

"""The environment's reward: compute saved against divergence from full recompute, and the episode's outcome.

Per step: - w_flops * step FLOP fraction - w_kl * KL(full || cached) - w_flip * 1[flip]; the KL is the decoding
block's, averaged over the positions still masked before the step, against `session.shadow_forward()` on the same
canvas taken before the step; a flip is a token committed this step that differs from the full recompute's greedy
prediction. At the last step: + w_exact * exact match + w_agree * token agreement with the no-cache answer
- w_budget * max(0, episode FLOP fraction - budget).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cache_core.session import DecodingSession, ShadowForward, StepResult
from envs.config import RewardWeights
from envs.prompts import PromptSet


def divergence(shadow: ShadowForward, logits: torch.Tensor, committed: torch.Tensor, tokens: torch.Tensor,
               masked_before: torch.Tensor) -> tuple[float, int]:
    """KL(full || cached) averaged over the block's masked positions, and the number of committed tokens that differ
    from the full recompute's greedy prediction. All tensors are the decoding block's, (B, block_length, ...)."""
    full = shadow.logits.float().log_softmax(-1)
    cached = logits.float().log_softmax(-1)
    kl = (full.exp() * (full - cached)).sum(-1).clamp(min=0)  # (B, block_length)
    weight = masked_before.float()
    mean_kl = float((kl * weight).sum() / weight.sum().clamp(min=1))
    flips = int((committed & (tokens != shadow.logits.argmax(-1))).sum())
    return mean_kl, flips


class Reward:
    """The reward terms of one environment, from its weights."""

    def __init__(self, weights: RewardWeights):
        self.weights = weights

    @property
    def tracks_agreement(self) -> bool:
        return self.weights.w_agree != 0.0

    def step(self, session: DecodingSession, result: StepResult, shadow: ShadowForward | None,
             positions: torch.Tensor, masked_before: torch.Tensor, info: dict[str, Any]) -> float:
        """The per-step terms; writes flop_fraction (and kl, flip, flip_count with a shadow) into info. positions:
        the decoding block's positions at this step (taken before it: the session has moved on since)."""
        w, record = self.weights, result.record
        fraction = record.flops / record.full_flops
        info["flop_fraction"] = float(fraction)
        reward = -w.w_flops * fraction
        if shadow is not None:
            kl, flips = divergence(shadow, result.logits, result.committed.gather(1, positions),
                                   session.canvas.gather(1, positions), masked_before)
            flip = float(flips > 0)
            reward -= w.w_kl * kl + w.w_flip * flip
            info.update(kl=kl, flip=flip, flip_count=flips)
        return reward

    def final(self, session: DecodingSession, prompts: PromptSet, index: int, budget: float | None,
              reference: Callable[[int], torch.Tensor], info: dict[str, Any]) -> float:
        """The end-of-episode terms; writes exact_match, agreement, agree_exact, budget_excess into info."""
        w = self.weights
        generated = session.generated[0].detach().cpu()
        bonus = 0.0
        if prompts.has_answers:
            em = float(prompts.exact_match(index, generated.tolist()))
            info["exact_match"] = em
            bonus += w.w_exact * em
        if self.tracks_agreement:
            ref = reference(index)
            info["agreement"] = float((generated == ref).float().mean())
            info["agree_exact"] = float(bool((generated == ref).all()))
            bonus += w.w_agree * info["agreement"]
        if budget is not None and w.w_budget:
            over = max(0.0, session.stats.flop_fraction - budget)
            info["budget_excess"] = over
            bonus -= w.w_budget * over
        return bonus

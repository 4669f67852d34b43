"""Compute and memory accounting, counted from what actually ran.

A model family states the FLOPs of one of its layers for n recomputed positions attending to N keys
(`DiffusionModel.layer_flops`) and of its output head (`head_flops`); for LLaDA, with width d, key/value width d_kv,
SwiGLU width f:
    projections 2·n·d·(d + 2·d_kv)  (q, k, v)  +  2·n·d·d  (attention output)  +  2·n·3·d·f  (SwiGLU MLP)
    attention   4·n·N·d             (scores and weighted sum)
(an MoE layer counts its router and the experts each position was routed to), plus the LM head, 2·n_out·d·vocab,
for the positions whose logits the step reads. A full recompute of the same step
runs every valid position in every layer; the fraction reported is spent / full on the same steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from cache_core.models.base import DiffusionModel


def step_flops(model: DiffusionModel, active_counts: torch.Tensor, n_keys: torch.Tensor, n_out: int) -> float:
    """FLOPs of a partial forward: active_counts (n_layers, B) positions run per layer, n_keys (B,) valid keys."""
    counts, keys = active_counts.double(), n_keys.double().cpu()
    spent = sum(float(model.layer_flops(counts[layer], keys, layer).sum()) for layer in range(counts.shape[0]))
    return spent + model.head_flops(n_out * active_counts.shape[1])


def full_step_flops(model: DiffusionModel, n_keys: torch.Tensor, n_out: int) -> float:
    """FLOPs a full recompute of the same canvas would spend: every valid position in every layer."""
    n = n_keys.double().cpu()
    spent = sum(float(model.layer_flops(n, n, layer).sum()) for layer in range(model.facts.n_layers))
    return spent + model.head_flops(n_out * n.numel())


@dataclass
class StepRecord:
    step: int
    decoding_block: int
    flops: float
    full_flops: float
    positions_x_layers: int  # sum over layers and rows of recomputed positions
    cache_bytes: int
    wall_s: float
    committed: int  # tokens committed this step, all rows together
    host_cache_bytes: int = 0  # blocks the memory manager offloaded to host memory
    monitor_flops: float = 0.0  # the quality monitor's shadow forward (included in flops)
    monitor_rows: int = 0  # rows the monitor checked at this step
    monitor_alarms: int = 0  # rows it repaired
    # The policy's side of the step, timed by `cache_core.policy.run_step` (0 for steps driven otherwise, e.g. the
    # environment's): `decide` (block-start hook, feature computation, `plan`) and the `on_step_end` hook. wall_s
    # times `session.step` only, so policy_s + wall_s is the whole step.
    policy_s: float = 0.0


@dataclass
class GenerationStats:
    steps: list[StepRecord] = field(default_factory=list)

    def record(self, step: StepRecord) -> None:
        self.steps.append(step)

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.steps)

    @property
    def full_flops(self) -> float:
        return sum(s.full_flops for s in self.steps)

    @property
    def flop_fraction(self) -> float:
        """FLOPs spent / FLOPs a full recompute of the same steps would spend."""
        full = self.full_flops  # (summed once: the compute_spent feature reads this at every step)
        return self.flops / full if full else float("nan")

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.steps)

    @property
    def step_seconds(self) -> float:
        """Seconds in `session.step` (the forward, commit and bookkeeping), all steps."""
        return self.wall_s

    @property
    def policy_seconds(self) -> float:
        """Seconds the policy took to decide (features + plan) and in its end-of-step hook, all steps."""
        return sum(s.policy_s for s in self.steps)

    @property
    def policy_share(self) -> float:
        """policy seconds / (policy seconds + step seconds): the decision's share of the step time."""
        total = self.policy_seconds + self.step_seconds
        return self.policy_seconds / total if total > 0 else float("nan")

    @property
    def peak_cache_bytes(self) -> int:
        return max((s.cache_bytes for s in self.steps), default=0)

    def summary(self) -> dict[str, float]:
        return {
            "steps": len(self.steps),
            "flops": self.flops,
            "full_flops": self.full_flops,
            "flop_fraction": self.flop_fraction,
            "positions_x_layers": sum(s.positions_x_layers for s in self.steps),
            "peak_cache_bytes": self.peak_cache_bytes,
            "peak_host_cache_bytes": max((s.host_cache_bytes for s in self.steps), default=0),
            "monitor_flops": sum(s.monitor_flops for s in self.steps),
            "monitor_checks": sum(s.monitor_rows for s in self.steps),
            "monitor_alarms": sum(s.monitor_alarms for s in self.steps),
            "wall_s": self.wall_s,
            "policy_s": self.policy_seconds,
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "steps": [asdict(s) for s in self.steps]}

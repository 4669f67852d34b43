"""Quality monitor: a sampled shadow full forward that catches a cache going wrong and repairs it.

A reuse policy meets inputs it was not trained for; a fixed rule meets a task its knob was not tuned on. The monitor
checks the cache against the truth on a sampled subset of steps (and rows): after the step's partial forward it runs
one full forward of the same canvas, then per row

- KL(fresh || cached) of the decoding block's predictions, averaged over its masked positions, and
- flips: commits this step makes differently from the fresh forward: another token at a position both commit, or
  another position (the commit rule ranks confidences, so a small drift can reorder them).

When either passes its threshold (an *alarm*) the row is repaired at once with what the shadow forward already
computed: the step commits from the fresh logits, and the blocks whose cached K/V drifted from the fresh ones by more
than `drift_threshold` (relative L2, any layer) get the fresh keys, values and layer inputs written into the cache;
and for a budget-conditioned policy the row's budget is raised by `budget_boost` for the rest of the generation.
The shadow forward's FLOPs are counted in the step's accounting (`StepRecord.monitor_flops`); the repair costs none.
Its keys and values are held only while the check runs (transient memory, outside a memory manager's budget).

Off by default; `generate(..., monitor=QualityMonitor(...))` or `monitor={...}` (or `generation.monitor` in Hydra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cache_core import validate as v
from cache_core.accounting import full_step_flops

if TYPE_CHECKING:
    from cache_core.session import DecodingSession


@dataclass
class QualityMonitor:
    """sample_rate: share of steps checked (in (0, 1]; steps are taken on a fixed stride, so a run is reproducible);
    row_rate: share of the batch rows checked at a checked step (in (0, 1], drawn with `seed`);
    kl_threshold / max_flips: an alarm when the mean KL exceeds kl_threshold or more than max_flips committed tokens
    flip; drift_threshold: the relative K/V drift above which an alarmed row's block is repaired;
    budget_boost: added to an alarmed row's budget (budget-conditioned policies) for the rest of the generation."""

    sample_rate: float = 0.25
    row_rate: float = 1.0
    kl_threshold: float = 0.05
    max_flips: int = 0
    drift_threshold: float = 0.05
    budget_boost: float = 0.1
    seed: int = 0
    enabled: bool = True  # False: off (the Hydra config's default, `generation.monitor.enabled=true` switches it on)

    def __post_init__(self) -> None:
        v.flag("monitor enabled", self.enabled)
        for name in ("sample_rate", "row_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"monitor {name}={value!r} must lie in (0, 1] (the share of steps/rows checked; "
                                 "to switch the monitor off pass monitor=None)")
        v.number("monitor kl_threshold", self.kl_threshold, low=0.0)
        v.number("monitor max_flips", self.max_flips, integer=True, low=0)
        v.number("monitor drift_threshold", self.drift_threshold, low=0.0)
        v.number("monitor budget_boost", self.budget_boost, low=0.0, high=1.0)
        v.number("monitor seed", self.seed, integer=True)
        self._generator = torch.Generator().manual_seed(int(self.seed))

    def reset(self) -> None:
        self._generator = torch.Generator().manual_seed(int(self.seed))

    def due(self, step: int) -> bool:
        """Whether step `step` is checked: a fixed stride of 1 / sample_rate steps (the last step of each stride)."""
        return math.floor((step + 1) * self.sample_rate + 1e-9) > math.floor(step * self.sample_rate + 1e-9)

    def rows(self, batch_size: int) -> torch.Tensor:
        """The rows checked at a checked step (at least one)."""
        if self.row_rate >= 1.0:
            return torch.arange(batch_size)
        k = max(1, round(self.row_rate * batch_size))
        return torch.randperm(batch_size, generator=self._generator)[:k].sort().values

    def check(self, session: DecodingSession, logits: torch.Tensor, positions: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, MonitorReport]:
        """Check the step's logits (B, block_length, vocab) against a full forward; repair alarmed rows.

        Returns the logits to commit from, the (B, N) positions whose cache entries were repaired, and a report."""
        model, cache = session.model, session.cache
        rows = self.rows(session.batch_size).to(session.canvas.device)
        with torch.inference_mode():
            fresh_all, keys, values, hidden = model(session.canvas[rows], cache.key_mask[rows], cache.positions[rows],
                                                    return_kv=True, return_hidden=True)
        n_keys = cache.key_mask[rows].sum(1)
        flops = full_step_flops(model, n_keys, session.block_length)
        pos = positions[rows]
        fresh = fresh_all.gather(1, pos[..., None].expand(-1, -1, fresh_all.shape[-1]))
        cached = logits[rows]
        masked = session.canvas[rows].gather(1, pos) == session.mask_id
        log_p, log_q = fresh.float().log_softmax(-1), cached.float().log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (r, block_length)
        kl = (kl * masked).sum(1) / masked.sum(1).clamp(min=1)
        # A flip is a commit this step makes differently from the fresh forward: another token at a position both
        # commit, or another position (the commit rule ranks confidences, so a small drift can reorder them).
        committing, fresh_commit = _would_commit(session, cached, masked), _would_commit(session, fresh, masked)
        other_token = committing & (_choice(fresh, session.mask_id) != _choice(cached, session.mask_id))
        flips = (other_token | (committing ^ fresh_commit)).sum(1)
        alarm = (kl > self.kl_threshold) | (flips > self.max_flips)
        repaired = torch.zeros_like(session.canvas, dtype=torch.bool)
        out = logits
        if bool(alarm.any()):
            out = logits.clone()
            alarmed = rows[alarm]
            out[alarmed] = fresh[alarm].to(out.dtype)
            drift = cache.drift_from(keys, values, rows).amax(-1)  # (r, n_blocks), the worst layer
            blocks = (drift > self.drift_threshold) & alarm[:, None]
            where = cache.partition.expand(blocks) & cache.resident[rows]
            repaired[rows] = where
            if bool(where.any()):
                for layer in range(len(keys)):
                    cache.open_layer(layer)
                    for i, b in enumerate(rows.tolist()):
                        p = where[i]
                        cache.keys[layer][b, :, p] = keys[layer][i][:, p].to(cache.keys[layer].dtype)
                        cache.values[layer][b, :, p] = values[layer][i][:, p].to(cache.values[layer].dtype)
                        cache.hidden[layer][b, p] = hidden[layer][i][p].to(cache.hidden[layer].dtype)
                        cache.computed[layer][b, p] = True
                    cache.close_layer(layer, repaired.nonzero()[:, 1])
            session.budget_boost[alarmed] += self.budget_boost
        report = MonitorReport(rows=int(rows.numel()), alarms=int(alarm.sum()), flops=flops,
                               kl=float(kl.max()), flips=int(flips.sum()), repaired_positions=int(repaired.sum()))
        return out, repaired, report


@dataclass
class MonitorReport:
    rows: int  # rows checked
    alarms: int  # rows that raised an alarm
    flops: float  # FLOPs of the shadow forward
    kl: float  # largest per-row mean KL
    flips: int  # committed-token flips over the checked rows
    repaired_positions: int  # positions x rows whose cache entries were replaced by fresh ones


def _choice(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    if mask_id < logits.shape[-1]:
        logits = logits.clone()
        logits[..., mask_id] = float("-inf")
    return logits.argmax(-1)


def _would_commit(session: DecodingSession, logits: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """The positions the session's commit rule picks from these logits (greedy confidence: the noise-free view)."""
    conf = logits.float().softmax(-1).gather(-1, _choice(logits, session.mask_id)[..., None]).squeeze(-1)
    return session.transfer_mask(conf, masked)


def as_monitor(value: QualityMonitor | dict | bool | None) -> QualityMonitor | None:
    """generate()'s monitor argument (see `validate.runtime_part`)."""
    return v.runtime_part(QualityMonitor, value, "monitor")

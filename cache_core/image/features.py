"""The image family's feature schema (`IMAGE_SCHEMA`, id "dit-v1:..."): per cache block (a band of patch tokens) and
global step columns, computed from a `DenoisingSession`'s state before the step runs.

Where the text schema reads masks and confidences, this one reads the sampler: the timestep and noise level instead
of the masked fraction, and TeaCache's signal (the relative L1 change of the timestep-modulated input of layer 0)
per block since its last refresh and globally since the last step. Every column is normalised into the range it
declares. The environment's observation and a learned image policy's input are these tensors; a policy file records
the schema id and is refused by a session of another family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cache_core.features import Column, FeatureSchema, StepFeatures, register_schema

if TYPE_CHECKING:
    from cache_core.image.session import DenoisingSession

SCHEMA_VERSION = 1


class _View:
    def __init__(self, session: DenoisingSession, budget: float | None):
        self.s, self.budget = session, budget
        self.B = session.batch_size
        self.partition = session.cache.partition
        self.nb = session.n_blocks

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, n_blocks) block means."""
        return self.partition.fraction(values.float())

    def constant(self, value: float) -> torch.Tensor:
        return torch.full((self.B,), float(value), device=self.s.device)

    def position(self) -> torch.Tensor:
        blocks = torch.arange(self.nb, device=self.s.device).float() / max(1, self.nb - 1)
        return blocks.expand(self.B, -1)

    def steps_since(self) -> torch.Tensor:
        age = (self.s.step_index - self.s.last_refresh_step).float()  # (B, N, L), never computed: step + 1
        return self.mean((age.mean(-1) / self.s.n_steps).clamp(0, 1))


BLOCK_COLUMNS: tuple[Column, ...] = (
    Column("position", "block index / (number of blocks - 1): where the band of patch tokens lies in the image",
           0.0, 1.0, lambda v: v.position()),
    Column("is_forced", "1 if some of the block's entries were never computed (the first step), so it runs whatever "
           "the plan", 0.0, 1.0, lambda v: v.mean(v.s.never_computed().any(-1).float())),
    Column("steps_since_refresh", "steps since each (token, layer) entry was last computed, mean over the block's "
           "tokens and layers / number of steps, clipped at 1", 0.0, 1.0, lambda v: v.steps_since()),
    Column("reused_last_step", "fraction of the block's (token, layer) entries reused at the last step", 0.0, 1.0,
           lambda v: v.mean(v.s.reused_last_step.float().mean(-1))),
    Column("input_change", "relative L1 change of the block's layer-0 modulated input since its layer 0 was last "
           "computed (TeaCache's signal, per block), clipped at 1", 0.0, 1.0, lambda v: v.s.block_input_change()),
    Column("update_drift", "1 - cos(old, new) of the block's residual updates at its last recompute (mean over the "
           "layers that ran)", 0.0, 1.0, lambda v: v.mean(v.s.update_drift.clamp(0, 1))),
    Column("attention_mass", "share of the last layer's attention (mean over the queries that ran) on the block, last "
           "step", 0.0, 1.0, lambda v: v.partition.sum(v.s.attention_mass).clamp(0, 1)),
    Column("attention_shift", "|change| of attention_mass between the last two steps", 0.0, 1.0,
           lambda v: (v.partition.sum(v.s.attention_mass) - v.partition.sum(v.s.previous_attention_mass))
           .abs().clamp(0, 1)),
    Column("valid_fraction", "fraction of the block's tokens that are image (always 1: images have no padding)",
           0.0, 1.0, lambda v: v.mean(torch.ones(v.B, v.s.cache.n_tokens, device=v.s.device))),
)
GLOBAL_COLUMNS: tuple[Column, ...] = (
    Column("progress", "denoising steps taken / number of steps", 0.0, 1.0,
           lambda v: v.constant(v.s.step_index / v.s.n_steps)),
    Column("timestep", "the step's diffusion timestep / train_timesteps (1 = pure noise)", 0.0, 1.0,
           lambda v: v.constant(v.s.timestep_fraction)),
    Column("noise_level", "sqrt(1 - alpha_bar_t): the share of noise in the step's input", 0.0, 1.0,
           lambda v: v.constant(v.s.noise_level)),
    Column("global_input_change", "relative L1 change of the layer-0 modulated input since the last step (TeaCache's "
           "per-step signal), clipped at 1", 0.0, 1.0, lambda v: v.s.global_input_change().clamp(0, 1)),
    Column("compute_spent", "FLOPs spent so far / FLOPs of the uncached sampler so far (1 before the first step)",
           0.0, 1.0, lambda v: v.constant(min(v.s.stats.flop_fraction if v.s.stats.steps else 1.0, 1.0))),
    Column("budget", "the compute budget as a FLOP fraction (1 when not budget-conditioned)", 0.0, 1.0,
           lambda v: v.constant(1.0 if v.budget is None else float(v.budget))),
)

IMAGE_SCHEMA = register_schema(FeatureSchema(
    family="image", version=SCHEMA_VERSION, block_columns=BLOCK_COLUMNS, global_columns=GLOBAL_COLUMNS,
    forced="is_forced", valid="valid_fraction", budget="budget", attention="attention_mass", relative=None,
    id_prefix="dit-"))


def compute_features(session: DenoisingSession, budget: float | None = None) -> StepFeatures:
    view = _View(session, budget)
    blocks = torch.stack([c.compute(view) for c in BLOCK_COLUMNS], dim=-1)
    global_ = torch.stack([c.compute(view) for c in GLOBAL_COLUMNS], dim=-1)
    return StepFeatures(blocks.float(), global_.float(), schema=IMAGE_SCHEMA)

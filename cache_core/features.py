"""The one feature schema: per-block stability features plus global step features, versioned.

Computed once per step, here and nowhere else, from the decoding session's state. The environment's observation
and a learned policy's input are these very tensors; a policy file records `SCHEMA_ID` and is refused under another.
Every column is normalised into the range it declares, so one network serves canvases of any length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cache_core.session import DecodingSession

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Column:
    name: str
    meaning: str
    low: float
    high: float


BLOCK_COLUMNS: tuple[Column, ...] = (
    Column("relative_position", "(block - decoding block) / number of blocks", -1.0, 1.0),
    Column("is_prompt", "1 if the block belongs to the prompt", 0.0, 1.0),
    Column("is_decoding", "1 if the block is the one being decoded (always recomputed)", 0.0, 1.0),
    Column("masked_fraction", "fraction of the block's positions still masked", 0.0, 1.0),
    Column("changed_since_refresh", "fraction of the block's tokens changed since it was last recomputed", 0.0, 1.0),
    Column("steps_since_refresh", "steps since the block was last recomputed / block length, clipped at 1", 0.0, 1.0),
    Column("confidence", "mean of the latest top-1 probability seen at the block's positions (prompt = 1)", 0.0, 1.0),
    Column("entropy", "mean of the latest predictive entropy / log(vocab) at the block's positions", 0.0, 1.0),
    Column("attention_mass", "share of the decoding queries' last-layer attention on the block, last step", 0.0, 1.0),
    Column("attention_shift", "|change| of attention_mass between the last two steps", 0.0, 1.0),
    Column("refresh_drift", "1 - cos(old, new) of the block's values at its last recompute (all layers)", 0.0, 1.0),
    Column("valid_fraction", "fraction of the block's positions that are not padding", 0.0, 1.0),
)
GLOBAL_COLUMNS: tuple[Column, ...] = (
    Column("progress", "fraction of the generation region already committed", 0.0, 1.0),
    Column("decoding_block_fraction", "decoding block index / number of decoding blocks", 0.0, 1.0),
    Column("step_in_block", "steps taken in the current decoding block / block length, clipped at 1", 0.0, 1.0),
    Column("compute_spent", "FLOPs spent so far / FLOPs of full recompute so far (1 before the first step)", 0.0, 1.0),
    Column("budget", "the compute budget as a FLOP fraction (1 when not budget-conditioned)", 0.0, 1.0),
)
BLOCK_FEATURE_NAMES = tuple(c.name for c in BLOCK_COLUMNS)
GLOBAL_FEATURE_NAMES = tuple(c.name for c in GLOBAL_COLUMNS)
N_BLOCK_FEATURES = len(BLOCK_COLUMNS)
N_GLOBAL_FEATURES = len(GLOBAL_COLUMNS)
SCHEMA_ID = f"v{SCHEMA_VERSION}:" + ",".join(BLOCK_FEATURE_NAMES) + "|" + ",".join(GLOBAL_FEATURE_NAMES)


@dataclass
class StepFeatures:
    """blocks: (B, n_blocks, N_BLOCK_FEATURES); global_: (B, N_GLOBAL_FEATURES)."""

    blocks: torch.Tensor
    global_: torch.Tensor

    def column(self, name: str) -> torch.Tensor:
        """One block column by name: (B, n_blocks)."""
        return self.blocks[..., BLOCK_FEATURE_NAMES.index(name)]

    def policy_input(self) -> torch.Tensor:
        """Block features with the global features broadcast to every block: (B, n_blocks, F_block + F_global)."""
        return policy_input(self.blocks, self.global_)


def policy_input(blocks: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
    """(B, n_blocks, F_block), (B, F_global) -> (B, n_blocks, F_block + F_global): what a learned policy reads (the
    environment's observation and the training rows are assembled by this function too)."""
    return torch.cat([blocks, global_[:, None, :].expand(-1, blocks.shape[1], -1)], dim=-1)


def schema_table() -> str:
    """The schema as a Markdown table (README and `python -m cache_core.features`)."""
    header = ["| kind | name | range | meaning |", "|---|---|---|---|"]
    lines = [f"Feature schema `{SCHEMA_ID.split(':')[0]}`", "", *header]
    for kind, cols in (("block", BLOCK_COLUMNS), ("global", GLOBAL_COLUMNS)):
        lines += [f"| {kind} | {c.name} | [{c.low:g}, {c.high:g}] | {c.meaning} |" for c in cols]
    return "\n".join(lines)


def _block_mean(values: torch.Tensor, weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """Weighted mean of a (B, N) tensor over each block's positions: (B, n_blocks); 0 where the weight is 0."""
    B, N = values.shape
    v = (values * weight).view(B, N // block_size, block_size).sum(-1)
    w = weight.view(B, N // block_size, block_size).sum(-1)
    return torch.where(w > 0, v / w.clamp(min=1e-9), torch.zeros_like(v))


def compute_features(session: DecodingSession, budget: float | None = None) -> StepFeatures:
    """The step's features from the session's state before the step runs."""
    s = session
    cache = s.cache
    B, N = s.canvas.shape
    bs, nb = cache.block_size, cache.n_blocks
    valid = cache.key_mask.float()
    blocks = torch.arange(nb, device=s.canvas.device)
    gen_start_block = s.prompt_region // bs

    relative = ((blocks - s.decoding_block).float() / nb).expand(B, nb)
    is_prompt = (blocks < gen_start_block).float().expand(B, nb)
    is_decoding = (blocks == s.decoding_block).float().expand(B, nb)
    masked = _block_mean((s.canvas == s.mask_id).float(), valid, bs)
    changed = _block_mean((s.canvas != s.tokens_at_refresh).float(), valid, bs)
    since = (s.step_index - s.last_refresh_step).float().clamp(min=0) / s.block_length
    since = _block_mean(since.clamp(max=1.0), valid, bs)
    confidence = _block_mean(s.confidence, valid, bs)
    entropy = _block_mean(s.entropy.clamp(0, 1), valid, bs)
    mass = s.attention_mass.view(B, nb, bs).sum(-1)
    shift = (mass - s.previous_attention_mass.view(B, nb, bs).sum(-1)).abs()
    drift = _block_mean(s.refresh_drift.clamp(0, 1), valid, bs)
    valid_fraction = valid.view(B, nb, bs).mean(-1)
    block_features = torch.stack(
        [relative, is_prompt, is_decoding, masked, changed, since, confidence, entropy, mass.clamp(0, 1),
         shift.clamp(0, 1), drift, valid_fraction], dim=-1,
    )

    gen_masked = (s.canvas[:, s.prompt_region:] == s.mask_id).float().mean(1)
    spent = s.stats.flop_fraction if s.stats.steps else 1.0
    device = s.canvas.device
    global_features = torch.stack(
        [
            1.0 - gen_masked,
            torch.full((B,), s.generation_block / s.n_generation_blocks, device=device),
            torch.full((B,), min(s.step_in_block / s.block_length, 1.0), device=device),
            torch.full((B,), min(spent, 1.0), device=device),
            torch.full((B,), 1.0 if budget is None else float(budget), device=device),
        ],
        dim=-1,
    )
    return StepFeatures(block_features.float(), global_features.float())


if __name__ == "__main__":
    print(schema_table())

"""The one feature schema: per-block stability features plus global step features, versioned.

Computed once per step, here and nowhere else, from the decoding session's state: each column is one entry of
BLOCK_COLUMNS / GLOBAL_COLUMNS (name, meaning, range and its computation), and the schema id is derived from them.
The environment's observation and a learned policy's input are these very tensors; a policy file records
`SCHEMA_ID` and is refused under another. Every column is normalised into the range it declares, so one network
serves canvases of any length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cache_core.session import DecodingSession

SCHEMA_VERSION = 1


class _View:
    """The session's state as the columns read it: (B, N) tensors and per-block means over valid positions."""

    def __init__(self, session: DecodingSession, budget: float | None):
        self.s, self.budget = session, budget
        cache = session.cache
        self.B, self.N = session.canvas.shape
        self.partition, self.nb = cache.partition, cache.n_blocks
        self.valid = cache.key_mask.float()
        self.blocks = torch.arange(self.nb, device=session.canvas.device)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of a (B, N) tensor over each block's valid positions: (B, n_blocks); 0 where a block has none."""
        return self.partition.mean(values, self.valid)

    def relative_position(self) -> torch.Tensor:
        d = self.s.decoding_block
        if self.partition.uniform_size is not None:  # (b - d) / nb: the same value, kept bit for bit
            return self.per_block((self.blocks - d).float() / self.nb)
        starts = self.partition.starts.to(self.blocks.device)
        return self.per_block((starts - starts[d]).float() / self.N)

    def is_decoding(self) -> torch.Tensor:
        first, end = self.s.decoding_blocks
        return self.per_block((self.blocks >= first) & (self.blocks < end))

    def per_block(self, values: torch.Tensor) -> torch.Tensor:
        """(n_blocks,) -> (B, n_blocks)."""
        return values.float().expand(self.B, self.nb)

    def constant(self, value: float) -> torch.Tensor:
        """The same global value for every row: (B,)."""
        return torch.full((self.B,), value, device=self.s.canvas.device)

    def attention_mass(self, previous: bool = False) -> torch.Tensor:
        mass = self.s.previous_attention_mass if previous else self.s.attention_mass
        return self.partition.sum(mass)


@dataclass(frozen=True)
class Column:
    """One feature: its name, meaning, declared range, and how it is computed from the session's state (block
    columns give (B, n_blocks), global ones (B,)). A new feature is one entry in BLOCK_COLUMNS or GLOBAL_COLUMNS."""

    name: str
    meaning: str
    low: float
    high: float
    compute: Callable[[_View], torch.Tensor] = field(repr=False, compare=False)


BLOCK_COLUMNS: tuple[Column, ...] = (
    Column("relative_position", "(block start - decoding block start) / canvas length (= (block - decoding block) / "
           "number of blocks for equal blocks)", -1.0, 1.0, lambda v: v.relative_position()),
    Column("is_prompt", "1 if the block belongs to the prompt", 0.0, 1.0,
           lambda v: v.per_block(v.blocks < v.s.prompt_blocks)),
    Column("is_decoding", "1 if the block is (or overlaps) the one being decoded (always recomputed)", 0.0, 1.0,
           lambda v: v.is_decoding()),
    Column("masked_fraction", "fraction of the block's positions still masked", 0.0, 1.0,
           lambda v: v.mean((v.s.canvas == v.s.mask_id).float())),
    Column("changed_since_refresh", "fraction of the block's tokens changed since it was last recomputed", 0.0, 1.0,
           lambda v: v.mean((v.s.canvas != v.s.tokens_at_refresh).float())),
    Column("steps_since_refresh", "steps since the block was last recomputed / block length, clipped at 1", 0.0, 1.0,
           lambda v: v.mean(((v.s.step_index - v.s.last_refresh_step).float().clamp(min=0) / v.s.block_length)
                            .clamp(max=1.0))),
    Column("confidence", "mean of the latest top-1 probability seen at the block's positions (prompt = 1)", 0.0, 1.0,
           lambda v: v.mean(v.s.confidence)),
    Column("entropy", "mean of the latest predictive entropy / log(vocab) at the block's positions", 0.0, 1.0,
           lambda v: v.mean(v.s.entropy.clamp(0, 1))),
    Column("attention_mass", "share of the decoding queries' last-layer attention on the block, last step", 0.0, 1.0,
           lambda v: v.attention_mass().clamp(0, 1)),
    Column("attention_shift", "|change| of attention_mass between the last two steps", 0.0, 1.0,
           lambda v: (v.attention_mass() - v.attention_mass(previous=True)).abs().clamp(0, 1)),
    Column("refresh_drift", "1 - cos(old, new) of the block's values at its last recompute (all layers)", 0.0, 1.0,
           lambda v: v.mean(v.s.refresh_drift.clamp(0, 1))),
    Column("valid_fraction", "fraction of the block's positions that are not padding", 0.0, 1.0,
           lambda v: v.partition.fraction(v.valid)),
)
GLOBAL_COLUMNS: tuple[Column, ...] = (
    Column("progress", "fraction of the generation region already committed", 0.0, 1.0,
           lambda v: 1.0 - (v.s.canvas[:, v.s.prompt_region:] == v.s.mask_id).float().mean(1)),
    Column("decoding_block_fraction", "decoding block index / number of decoding blocks", 0.0, 1.0,
           lambda v: v.constant(v.s.generation_block / v.s.n_generation_blocks)),
    Column("step_in_block", "steps taken in the current decoding block / block length, clipped at 1", 0.0, 1.0,
           lambda v: v.constant(min(v.s.step_in_block / v.s.block_length, 1.0))),
    Column("compute_spent", "FLOPs spent so far / FLOPs of full recompute so far (1 before the first step)", 0.0, 1.0,
           lambda v: v.constant(min(v.s.stats.flop_fraction if v.s.stats.steps else 1.0, 1.0))),
    Column("budget", "the compute budget as a FLOP fraction (1 when not budget-conditioned; raised by the quality "
           "monitor's alarms)", 0.0, 1.0,
           lambda v: v.s.effective_budget(v.budget)),
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
    """The schema as a Markdown table (README and `python -m cache_core`)."""
    header = ["| kind | name | range | meaning |", "|---|---|---|---|"]
    lines = [f"Feature schema `{SCHEMA_ID.split(':')[0]}`", "", *header]
    for kind, cols in (("block", BLOCK_COLUMNS), ("global", GLOBAL_COLUMNS)):
        lines += [f"| {kind} | {c.name} | [{c.low:g}, {c.high:g}] | {c.meaning} |" for c in cols]
    return "\n".join(lines)


def compute_features(session: DecodingSession, budget: float | None = None) -> StepFeatures:
    """The step's features from the session's state before the step runs: every column of the schema, in order."""
    view = _View(session, budget)
    block_features = torch.stack([c.compute(view) for c in BLOCK_COLUMNS], dim=-1)
    global_features = torch.stack([c.compute(view) for c in GLOBAL_COLUMNS], dim=-1)
    return StepFeatures(block_features.float(), global_features.float())

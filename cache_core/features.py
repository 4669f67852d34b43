"""Feature schemas: per-block stability features plus global step features, versioned, one schema per model family.

A `FeatureSchema` is an ordered list of block and global columns (name, meaning, declared range) plus the role columns
the learning pipeline reads (the always-recomputed block, real vs padding blocks, the budget, attention mass); its id
is derived from the columns. Schemas are registered by id (`register_schema`, `schema_by_id`): shards, policy files
and checkpoints record the id, and readers look the schema up from it. The text family's schema, `TEXT_SCHEMA`, is
computed once per step, here and nowhere else, from the decoding session's state: each column is one entry of
BLOCK_COLUMNS / GLOBAL_COLUMNS (name, meaning, range and its computation). Another family (e.g. `cache_core.image`)
defines and registers its own schema when its package is imported, and its sessions compute its features.

The environment's observation and a learned policy's input are these very tensors; a policy file records its schema
id and is refused under another. Every column is normalised into the range it declares, so one network serves
canvases of any length. The module constants (SCHEMA_ID, N_BLOCK_FEATURES, BLOCK_FEATURE_NAMES, ...) are the text
schema's, kept for existing imports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cache_core.session import DecodingSession

SCHEMA_VERSION = 2  # v2 = v1 + the decoding-setting columns (SETTING_COLUMNS); v1 files still load (see `project`)


REDUCTIONS = ("mean", "sum")  # a source column's reduction over each block's positions (see `Column`)
PER = ("step", "block")  # how often a column changes (see `Column`)


class _View:
    """The session's state as the columns read it: (B, N) tensors, per-block reductions, and what compute_features
    keeps across the session's steps (`session.feature_memo`): the valid positions and their per-block weights while
    the cache partition stays, and the `per="block"` columns while the decoding block stays."""

    def __init__(self, session: DecodingSession, budget: float | None):
        self.s, self.budget = session, budget
        cache = session.cache
        self.B, self.N = session.canvas.shape
        self.partition, self.nb = cache.partition, cache.n_blocks
        memo = session.feature_memo
        if memo.get("partition") is not self.partition:  # the first step, or a dynamic partition re-cut the cache
            memo.clear()
            valid = cache.key_mask.float()
            weight = self.partition.sum(valid)
            empty = ~(weight > 0)  # blocks of padding only (None: there are none)
            memo.update(partition=self.partition, valid=valid, weight=weight.clamp(min=1e-9),
                        empty=empty if bool(empty.any()) else None,
                        blocks=torch.arange(self.nb, device=session.canvas.device))
        if memo.get("block") != session.generation_block:
            memo.update(block=session.generation_block, per_block={})
        self.memo = memo
        self.valid, self.blocks = memo["valid"], memo["blocks"]

    def columns(self, columns: tuple[Column, ...]) -> list[torch.Tensor]:
        """Each column's values ((B, n_blocks) or (B,)), in order: the source columns' reductions in one batch, the
        `per="block"` columns computed once per decoding block, the others by their `compute`."""
        reduced = self.reduce([c for c in columns if c.source is not None])
        kept = self.memo["per_block"]
        out = []
        for c in columns:
            if c.source is not None:
                out.append(reduced[c.name])
            elif c.per == "block":
                if c.name not in kept:
                    kept[c.name] = c.compute(self)
                out.append(kept[c.name])
            else:
                out.append(c.compute(self))
        return out

    def reduce(self, columns: list[Column]) -> dict[str, torch.Tensor]:
        """The source columns' values, name -> (B, n_blocks). The sources are stacked into one (k, B, N) tensor and
        summed per block at once: the same sums, bit for bit, as one `partition.mean` / `partition.sum` per source
        (a sum over the last dimension does not depend on what is stacked beside it). A source read twice (the same
        tensor, the same reduction) is reduced once."""
        if not columns:
            return {}
        rows: dict[tuple[int, bool], tuple[int, torch.Tensor]] = {}  # (id(source), mean) -> its row, the source
        means: list[torch.Tensor] = []
        plain: list[torch.Tensor] = []
        wanted = []
        for c in columns:
            mean = c.reduce == "mean"
            sources = c.source(self)
            keys = []
            for t in sources if isinstance(sources, tuple) else (sources,):
                key = (id(t), mean)
                if key not in rows:  # (the row holds t, so that its id is not reused meanwhile)
                    group = means if mean else plain
                    rows[key] = (len(group), t)
                    group.append(t)
                keys.append(key)
            wanted.append((c, keys))
        # The dtypes the reductions give (values * valid for a mean): one stack when they agree (the stack converts
        # bool sources as the product would), one reduction per source otherwise.
        dtypes = {torch.promote_types(t.dtype, self.valid.dtype) for t in means} | {t.dtype for t in plain}
        if len(dtypes) == 1:
            stacked = torch.stack(means + plain)
            (stacked[:len(means)] if plain else stacked).mul_(self.valid)
            total = self.partition.sum(stacked, dim=-1)  # (k, B, n_blocks)
            reduced = {True: self.divide(total[:len(means)]).unbind(0) if means else (),
                       False: total[len(means):].unbind(0) if plain else ()}
        else:
            reduced = {True: [self.mean(t) for t in means], False: [self.partition.sum(t) for t in plain]}
        out = {}
        for c, keys in wanted:
            parts = [reduced[key[1]][rows[key][0]] for key in keys]
            out[c.name] = c.then(*parts) if c.then is not None else parts[0]
        return out

    def divide(self, sums: torch.Tensor) -> torch.Tensor:
        """Per-block sums of (values x valid) -> the means over the valid positions; 0 where a block has none (as
        `partition.mean`)."""
        means = sums / self.memo["weight"]
        return means if self.memo["empty"] is None else means.masked_fill_(self.memo["empty"], 0.0)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of a (B, N) tensor over each block's valid positions: (B, n_blocks); 0 where a block has none."""
        return self.divide(self.partition.sum(values * self.valid))

    @cached_property
    def masked(self) -> torch.Tensor:
        """(B, N) True where the canvas still holds the mask."""
        return self.s.canvas == self.s.mask_id

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


@dataclass(frozen=True)
class Column:
    """One feature: its name, meaning, declared range, and how it is computed from the session's state (block
    columns give (B, n_blocks), global ones (B,)). A new feature is one entry in BLOCK_COLUMNS or GLOBAL_COLUMNS.

    Either `compute` (the view -> the column), or, for a block column that reduces per-position values over each
    block, `source` (the view -> a (B, N) tensor, or a tuple of them) with `reduce` ("mean": over the block's valid
    positions, as `partition.mean`; "sum": over all its positions, as `partition.sum`) and `then` (the reduced
    tensors -> the column; none: the one reduction itself); all source columns are reduced together, in one batch, at
    every step. per (compute columns): "step" (computed at every step) or "block" (depends only on the decoding
    setting, the cache partition and the decoding block: computed once per decoding block and reused)."""

    name: str
    meaning: str
    low: float
    high: float
    compute: Callable[[Any], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    source: Callable[[Any], torch.Tensor | tuple[torch.Tensor, ...]] | None = field(default=None, repr=False,
                                                                                   compare=False)
    reduce: str = field(default="mean", compare=False)
    then: Callable[..., torch.Tensor] | None = field(default=None, repr=False, compare=False)
    per: str = field(default="step", compare=False)

    def __post_init__(self) -> None:
        if (self.compute is None) == (self.source is None):
            raise ValueError(f"column {self.name!r}: give either compute or source, not both or neither")
        if self.reduce not in REDUCTIONS or self.per not in PER:
            raise ValueError(f"column {self.name!r}: reduce must be one of {REDUCTIONS} and per one of {PER}")


BLOCK_COLUMNS: tuple[Column, ...] = (
    Column("relative_position", "(block start - decoding block start) / canvas length (= (block - decoding block) / "
           "number of blocks for equal blocks)", -1.0, 1.0, lambda v: v.relative_position(), per="block"),
    Column("is_prompt", "1 if the block belongs to the prompt", 0.0, 1.0,
           lambda v: v.per_block(v.blocks < v.s.prompt_blocks), per="block"),
    Column("is_decoding", "1 if the block is (or overlaps) the one being decoded (always recomputed)", 0.0, 1.0,
           lambda v: v.is_decoding(), per="block"),
    Column("masked_fraction", "fraction of the block's positions still masked", 0.0, 1.0,
           source=lambda v: v.masked),
    Column("changed_since_refresh", "fraction of the block's tokens changed since it was last recomputed", 0.0, 1.0,
           source=lambda v: v.s.canvas != v.s.tokens_at_refresh),
    Column("steps_since_refresh", "steps since the block was last recomputed / block length, clipped at 1", 0.0, 1.0,
           source=lambda v: (v.s.step_index - v.s.last_refresh_step).clamp(0, v.s.block_length).float()
           / v.s.block_length),
    Column("confidence", "mean of the latest top-1 probability seen at the block's positions (prompt = 1)", 0.0, 1.0,
           source=lambda v: v.s.confidence),
    Column("entropy", "mean of the latest predictive entropy / log(vocab) at the block's positions", 0.0, 1.0,
           source=lambda v: v.s.entropy.clamp(0, 1)),
    Column("attention_mass", "share of the decoding queries' last-layer attention on the block, last step", 0.0, 1.0,
           source=lambda v: v.s.attention_mass, reduce="sum", then=lambda mass: mass.clamp(0, 1)),
    Column("attention_shift", "|change| of attention_mass between the last two steps", 0.0, 1.0,
           source=lambda v: (v.s.attention_mass, v.s.previous_attention_mass), reduce="sum",
           then=lambda mass, previous: (mass - previous).abs().clamp(0, 1)),
    Column("refresh_drift", "1 - cos(old, new) of the block's values at its last recompute (all layers)", 0.0, 1.0,
           source=lambda v: v.s.refresh_drift.clamp(0, 1)),
    Column("valid_fraction", "fraction of the block's positions that are not padding", 0.0, 1.0,
           lambda v: v.partition.fraction(v.valid), per="block"),
)
GLOBAL_COLUMNS: tuple[Column, ...] = (
    Column("progress", "fraction of the generation region already committed", 0.0, 1.0,
           lambda v: 1.0 - v.masked[:, v.s.prompt_region:].float().mean(1)),
    Column("decoding_block_fraction", "decoding block index / number of decoding blocks", 0.0, 1.0,
           lambda v: v.constant(v.s.generation_block / v.s.n_generation_blocks), per="block"),
    Column("step_in_block", "steps taken in the current decoding block / block length, clipped at 1", 0.0, 1.0,
           lambda v: v.constant(min(v.s.step_in_block / v.s.block_length, 1.0))),
    Column("compute_spent", "FLOPs spent so far / FLOPs of full recompute so far (1 before the first step)", 0.0, 1.0,
           lambda v: v.constant(min(v.s.stats.flop_fraction if v.s.stats.steps else 1.0, 1.0))),
    Column("budget", "the compute budget as a FLOP fraction (1 when not budget-conditioned; raised by the quality "
           "monitor's alarms)", 0.0, 1.0,
           lambda v: v.s.effective_budget(v.budget)),
)
# What a policy needs to know of the decoding setting, so one policy serves block lengths, step counts, linear and
# threshold decoding and canvas lengths (v2). Each is normalised so that settings never seen in training still land
# inside the declared range.
SETTING_COLUMNS: tuple[Column, ...] = (
    Column("block_share", "decoding block length / generated length (1 / number of decoding blocks)", 0.0, 1.0,
           lambda v: v.constant(v.s.block_length / v.s.gen_length), per="block"),
    Column("block_size", "decoding block length / 64, clipped at 1", 0.0, 1.0,
           lambda v: v.constant(min(v.s.block_length / 64.0, 1.0)), per="block"),
    Column("generation_share", "generated length / canvas length (prompt region + generated length)", 0.0, 1.0,
           lambda v: v.constant(v.s.gen_length / v.N), per="block"),
    Column("commit_rate", "tokens the row committed at the last step / block length (1/steps per block under the "
           "linear schedule; 0 before the first step)", 0.0, 1.0,
           lambda v: v.s.last_commit_rate.clamp(0, 1)),
    Column("threshold", "the confidence threshold of parallel decoding (0 = LLaDA's linear schedule)", 0.0, 1.0,
           lambda v: v.constant(float(v.s.threshold or 0.0)), per="block"),
)

@dataclass(frozen=True)
class FeatureSchema:
    """One model family's feature schema: the policy input is `block_columns` per block, then `global_columns`
    broadcast to every block. Role columns (by name): `forced` (block; 1 where the cache recomputes the block whatever
    the plan, so it carries no loss and no action), `valid` (block; > 0 on real, non-padding blocks), `budget`
    (global; the compute budget a budget-conditioned policy reads), `attention` (block; attention mass, for label
    weighting; None when the family has none), `relative` (block; the block's relative position, None if none).
    `id` is `<id_prefix>v<version>:<block names>|<global names>`: the text schema's prefix is empty, so its id is the
    SCHEMA_ID that shipped files record; other families take a prefix (e.g. "dit-")."""

    family: str
    version: int
    block_columns: tuple[Column, ...]
    global_columns: tuple[Column, ...]
    forced: str
    valid: str
    budget: str
    attention: str | None = None
    relative: str | None = None
    id_prefix: str = ""

    def __post_init__(self) -> None:
        for kind, names in (("block", self.block_names), ("global", self.global_names)):
            if not names or len(set(names)) != len(names):
                raise ValueError(f"feature schema {self.family!r}: its {kind} columns must be non-empty and distinct, "
                                 f"got {list(names)}")
        roles = {"forced": self.forced, "valid": self.valid, "attention": self.attention, "relative": self.relative}
        for role, name in roles.items():
            if name is not None and name not in self.block_names:
                raise ValueError(f"feature schema {self.family!r}: {role}={name!r} is not one of its block columns "
                                 f"{list(self.block_names)}")
        if self.budget not in self.global_names:
            raise ValueError(f"feature schema {self.family!r}: budget={self.budget!r} is not one of its global "
                             f"columns {list(self.global_names)}")

    @cached_property
    def id(self) -> str:  # cached: LearnedPolicy compares it at every step
        return (f"{self.id_prefix}v{self.version}:" + ",".join(self.block_names) + "|"
                + ",".join(self.global_names))

    # Names are cached: policies and the budget rule look columns up at every step.
    @cached_property
    def block_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.block_columns)

    @cached_property
    def global_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.global_columns)

    @cached_property
    def names(self) -> tuple[str, ...]:
        """The policy input's columns: block columns, then global columns."""
        return (*self.block_names, *self.global_names)

    @cached_property
    def columns(self) -> tuple[Column, ...]:
        """The policy input's columns as Column entries (names, declared ranges), in input order."""
        return (*self.block_columns, *self.global_columns)

    @property
    def n_block(self) -> int:
        return len(self.block_columns)

    @property
    def n_global(self) -> int:
        return len(self.global_columns)

    @property
    def n_features(self) -> int:
        """Width of the policy input: n_block + n_global."""
        return self.n_block + self.n_global

    def _index(self, names: tuple[str, ...], name: str, kind: str) -> int:
        if name not in names:
            raise ValueError(f"{name!r} is not a {kind} column of feature schema {self.id!r}; its {kind} columns: "
                             f"{list(names)}")
        return names.index(name)

    def block_index(self, name: str) -> int:
        """Index of a block column in `StepFeatures.blocks` (and in the policy input)."""
        return self._index(self.block_names, name, "block")

    def global_index(self, name: str) -> int:
        """Index of a global column in `StepFeatures.global_`."""
        return self._index(self.global_names, name, "global")

    def input_index(self, name: str) -> int:
        """Index of a column in the policy input (block columns, then global columns)."""
        return self._index(self.names, name, "policy-input")

    def table(self) -> str:
        """The schema as a Markdown table (README and `python -m cache_core`)."""
        header = ["| kind | name | range | meaning |", "|---|---|---|---|"]
        lines = [f"Feature schema `{self.id.split(':')[0]}`", "", *header]
        for kind, cols in (("block", self.block_columns), ("global", self.global_columns)):
            lines += [f"| {kind} | {c.name} | [{c.low:g}, {c.high:g}] | {c.meaning} |" for c in cols]
        return "\n".join(lines)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Columns hold lambdas, which pickle cannot carry: a registered schema travels to Ray / subprocess workers as
        # its id and is looked up there (the worker imports the family's package as this process did).
        if SCHEMAS.get(self.id) == self:
            return schema_by_id, (self.id,)
        return super().__reduce_ex__(protocol)


SCHEMAS: dict[str, FeatureSchema] = {}  # id -> schema: every schema shards, policies and checkpoints may record


def register_schema(schema: FeatureSchema) -> FeatureSchema:
    """Make `schema` known to every reader (shards, policy files, checkpoints) by its id; returns it. A family's
    package registers its schema when imported. Registering an equal schema again is a no-op."""
    existing = SCHEMAS.get(schema.id)
    if existing is not None and existing != schema:
        raise ValueError(f"feature schema {schema.id!r} is already registered with other column meanings or ranges; "
                         "a changed schema needs a new version (FeatureSchema.version)")
    SCHEMAS[schema.id] = schema
    return schema


def schema_by_id(schema_id: Any) -> FeatureSchema:
    """The registered schema of this id; a ValueError naming the id and the known ones otherwise."""
    if isinstance(schema_id, str) and schema_id in SCHEMAS:
        return SCHEMAS[schema_id]
    raise ValueError(f"unknown feature schema {schema_id!r}; known schemas: {sorted(SCHEMAS)} (a model family's "
                     "schema is registered when its package is imported, e.g. `import cache_core.image`)")


TEXT_SCHEMA = register_schema(FeatureSchema(
    family="text", version=SCHEMA_VERSION, block_columns=BLOCK_COLUMNS,
    global_columns=GLOBAL_COLUMNS + SETTING_COLUMNS, forced="is_decoding", valid="valid_fraction", budget="budget",
    attention="attention_mass", relative="relative_position",
))
# v1 (no setting columns): the schema of the policies and shards made before v2. It stays registered, so those
# files load, and a v1 policy reads its columns out of v2 features (`StepFeatures.project`).
TEXT_SCHEMA_V1 = register_schema(FeatureSchema(
    family="text", version=1, block_columns=BLOCK_COLUMNS, global_columns=GLOBAL_COLUMNS,
    forced="is_decoding", valid="valid_fraction", budget="budget", attention="attention_mass",
    relative="relative_position",
))
# The text schema's values, for existing imports (code that knows its data's schema reads that schema instead).
BLOCK_FEATURE_NAMES = TEXT_SCHEMA.block_names
GLOBAL_FEATURE_NAMES = TEXT_SCHEMA.global_names
N_BLOCK_FEATURES = TEXT_SCHEMA.n_block
N_GLOBAL_FEATURES = TEXT_SCHEMA.n_global
SCHEMA_ID = TEXT_SCHEMA.id


@dataclass
class StepFeatures:
    """blocks: (B, n_blocks, schema.n_block); global_: (B, schema.n_global); schema: the columns' meaning (the text
    schema unless a family's session says otherwise)."""

    blocks: torch.Tensor
    global_: torch.Tensor
    schema: FeatureSchema = TEXT_SCHEMA

    def column(self, name: str) -> torch.Tensor:
        """One block column by name: (B, n_blocks)."""
        return self.blocks[..., self.schema.block_index(name)]

    def policy_input(self) -> torch.Tensor:
        """Block features with the global features broadcast to every block: (B, n_blocks, F_block + F_global)."""
        return policy_input(self.blocks, self.global_)

    def project(self, schema: FeatureSchema) -> StepFeatures:
        """These features in an older schema of the same family whose columns they all carry (a v1 policy on v2
        features): the columns by name. A ValueError naming what is missing otherwise."""
        if schema.id == self.schema.id:
            return self
        if not projectable(self.schema, schema):
            raise ValueError(f"features of schema {self.schema.id!r} cannot serve schema {schema.id!r}: other family "
                             "or columns it lacks")
        key = (self.schema.id, schema.id)
        index = _PROJECTIONS.get(key) if _registered(self.schema, schema) else None
        if index is None:
            index = (torch.tensor([self.schema.block_index(n) for n in schema.block_names]),
                     torch.tensor([self.schema.global_index(n) for n in schema.global_names]))
            if _registered(self.schema, schema):
                _PROJECTIONS[key] = index
        blocks = self.blocks.index_select(-1, index[0].to(self.blocks.device))
        global_ = self.global_.index_select(-1, index[1].to(self.global_.device))
        return StepFeatures(blocks, global_, schema)


# Per pair of registered schemas (the ids name them), kept as they are asked at every step: whether one projects to
# the other, and the projection's column indices (block, global).
_PROJECTABLE: dict[tuple[str, str], bool] = {}
_PROJECTIONS: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _registered(*schemas: FeatureSchema) -> bool:
    return all(SCHEMAS.get(s.id) is s for s in schemas)


def projectable(source: FeatureSchema, target: FeatureSchema) -> bool:
    """Whether features of `source` carry every column of `target` with the same meaning and range (same family)."""
    key = (source.id, target.id)
    known = _PROJECTABLE.get(key) if _registered(source, target) else None
    if known is not None:
        return known
    have = {c.name: c for c in source.columns}
    ok = source.family == target.family and all(c.name in have and have[c.name] == c for c in target.columns)
    if _registered(source, target):
        _PROJECTABLE[key] = ok
    return ok


def policy_input(blocks: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
    """(B, n_blocks, F_block), (B, F_global) -> (B, n_blocks, F_block + F_global): what a learned policy reads (the
    environment's observation and the training rows are assembled by this function too)."""
    return torch.cat([blocks, global_[:, None, :].expand(-1, blocks.shape[1], -1)], dim=-1)


def schema_table() -> str:
    """The text schema as a Markdown table (README and `python -m cache_core`)."""
    return TEXT_SCHEMA.table()


def compute_features(session: DecodingSession, budget: float | None = None) -> StepFeatures:
    """The step's text-schema features from the session's state before the step runs: every column, in order."""
    view = _View(session, budget)
    block_features = torch.stack(view.columns(TEXT_SCHEMA.block_columns), dim=-1)
    global_features = torch.stack(view.columns(TEXT_SCHEMA.global_columns), dim=-1)
    return StepFeatures(block_features.float(), global_features.float(), TEXT_SCHEMA)

"""The `ReusePolicy` interface, the hindsight oracle, and the registry that builds any policy by name.

A policy maps a step's features (and a small context) to a `RefreshPlan`. Heuristics, the oracle and loaded learned
policies all implement it, and `generate()` never asks which one it holds. A policy declares what it reads
(`uses_features`, `uses_attention`) so the session skips work nobody reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from cache_core.cache import RefreshPlan
from cache_core.features import StepFeatures
from cache_core.model import PartialForwardTrace

if TYPE_CHECKING:
    from cache_core.session import DecodingSession, ShadowForward


@dataclass
class StepContext:
    """What a policy may know about the step besides the features."""

    batch_size: int
    n_blocks: int
    n_layers: int
    block_length: int
    step: int
    step_in_block: int
    decoding_block: int  # cache-block index being decoded
    prompt_blocks: int  # blocks [0, prompt_blocks) hold the prompt
    last_trace: PartialForwardTrace | None
    session: DecodingSession
    budget: float | None = None

    @classmethod
    def of(cls, session: DecodingSession, budget: float | None = None) -> StepContext:
        return cls(
            batch_size=session.batch_size, n_blocks=session.n_blocks, n_layers=session.n_layers,
            block_length=session.block_length, step=session.step_index, step_in_block=session.step_in_block,
            decoding_block=session.decoding_block, prompt_blocks=session.prompt_region // session.block_length,
            last_trace=session.last_trace, session=session, budget=budget,
        )

    def shadow(self) -> ShadowForward:
        """Hindsight: a full recompute of the canvas and the cache's drift from it. Costs a full forward."""
        return self.session.shadow_forward()

    def block_mask(self, lo: int, hi: int | None = None) -> torch.Tensor:
        """(B, n_blocks) True for blocks in [lo, hi)."""
        blocks = torch.arange(self.n_blocks)
        keep = (blocks >= lo) & (blocks < (self.n_blocks if hi is None else hi))
        return keep.expand(self.batch_size, -1)


class ReusePolicy:
    """Maps a step's features to a refresh plan. Subclasses implement `plan`; stateful ones also `reset`."""

    name: ClassVar[str] = "policy"
    uses_features: ClassVar[bool] = True
    uses_attention: ClassVar[bool] = False
    knob: ClassVar[str | None] = None  # the parameter that moves the policy from conservative to aggressive
    knob_sweep: ClassVar[tuple] = ()  # conservative -> aggressive values for the benchmark
    # The compute budget generate() uses when given none (budget-conditioned learned policies; None: no budget).
    default_budget: float | None = None

    def reset(self, batch_size: int) -> None:
        """Called at the start of every generation."""

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, **({self.knob: getattr(self, self.knob)} if self.knob else {})}


class OraclePolicy(ReusePolicy):
    """Hindsight upper bound: refresh exactly the blocks (in depth mode: from the first layer) whose cached K/V have
    drifted from a full recompute by more than epsilon (relative L2, max of keys and values).

    It pays a full shadow forward per step to know this, which its accounting does not count: it is the bound that
    learned policies are compared with, not a deployable cache.
    """

    name = "oracle"
    uses_features = False
    knob = "epsilon"
    knob_sweep = (0.01, 0.03, 0.1, 0.3)

    def __init__(self, epsilon: float = 0.05, depth: bool = False):
        if epsilon < 0:
            raise ValueError(f"oracle epsilon must be >= 0, got {epsilon}")
        self.epsilon = epsilon
        self.depth = depth

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        start = oracle_start_layer(ctx.shadow().drift, self.epsilon)
        if not self.depth:
            start = torch.where(start < ctx.n_layers, 0, ctx.n_layers)
        return RefreshPlan(start)


def oracle_start_layer(drift: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The oracle's decision from hindsight drift (B, n_blocks, n_layers): the start layer per block (B, n_blocks).

    n_layers (reuse) where no layer drifts more than epsilon. To refresh K/V at layer l the block must recompute
    layer l - 1, whose output is layer l's input; K/V at layer 0 change only with the token, which a start at
    layer 0 re-embeds. The supervised labels and the environment's depth labels use this same function.
    """
    n_layers = drift.shape[-1]
    over = drift > epsilon
    first = (over.float().argmax(-1) - 1).clamp(min=0)
    return torch.where(over.any(-1), first, n_layers).long()


def policy_registry() -> dict[str, type[ReusePolicy]]:
    from cache_core import heuristics

    classes = [OraclePolicy, *heuristics.HEURISTICS]
    return {c.name: c for c in classes}


def make_policy(name: str | ReusePolicy | None, **knobs: Any) -> ReusePolicy:
    """Build a policy by registry name (`full`, `dual_cache`, ...) or a path to an exported learned policy."""
    if isinstance(name, ReusePolicy):
        if knobs:
            raise ValueError("knobs were given for an already built policy; pass a name instead")
        return name
    if name is None:
        name = "full"
    registry = policy_registry()
    if name in registry:
        try:
            return registry[name](**knobs)
        except TypeError as err:
            raise ValueError(f"bad knobs {knobs} for policy {name!r}: {err}") from err
    if str(name).endswith(".onnx") or str(name).endswith(".json"):
        from cache_core.learned import load_policy

        return load_policy(name, **knobs)
    raise ValueError(f"unknown policy {name!r}; choose one of {sorted(registry)} or a path to an exported policy")

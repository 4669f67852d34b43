"""The `ReusePolicy` interface, the context a policy sees, and the one way a policy is driven through a step.

A policy maps a step's features (and a small context) to a `RefreshPlan`. Heuristics, the oracle and loaded learned
policies all implement it, and `generate()` never asks which one it holds. A policy declares what it reads
(`uses_features`, `uses_attention`) so the session skips work nobody reads, and may keep state through hooks (as
d2Cache's cache base does): `reset` at the start of a generation, `on_block_start` at the first step of every
decoding block, `on_step_end` after every step with what the step computed. `decide` plans a step (block-start hook
included); `run_step` = decide, step, `on_step_end`, the loop body of `generate()`; the environment calls `decide` for
a policy asked for an action and that policy's `on_step_end` after the step. Whoever starts a generation calls
`reset` (generate(), the collector).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from cache_core.cache import RefreshPlan
from cache_core.features import StepFeatures
from cache_core.partition import BlockPartition

if TYPE_CHECKING:
    from cache_core.session import DecodingSession, ShadowForward, StepResult


@dataclass
class StepContext:
    """What a policy may know about the step besides the features. Tensors are the session's own (read-only)."""

    batch_size: int
    n_blocks: int
    n_layers: int
    block_length: int
    step: int
    step_in_block: int
    decoding_block: int  # cache-block index being decoded
    prompt_blocks: int  # blocks [0, prompt_blocks) hold the prompt
    canvas: torch.Tensor  # (B, N) token ids, mask_id where not yet committed
    tokens_at_refresh: torch.Tensor  # (B, N) the tokens each position's cached K/V were computed from
    key_mask: torch.Tensor  # (B, N) False on left padding
    mask_id: int
    budget: float | None = None
    partition: BlockPartition | None = None  # the cache blocks (None: one per decoding block of block_length)
    shadow_forward: Callable[[], ShadowForward] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, session: DecodingSession, budget: float | None = None) -> StepContext:
        return cls(
            batch_size=session.batch_size, n_blocks=session.n_blocks, n_layers=session.n_layers,
            block_length=session.block_length, step=session.step_index, step_in_block=session.step_in_block,
            decoding_block=session.decoding_block, prompt_blocks=session.prompt_blocks,
            canvas=session.canvas, tokens_at_refresh=session.tokens_at_refresh, key_mask=session.cache.key_mask,
            mask_id=session.mask_id, budget=budget, partition=session.cache.partition,
            shadow_forward=session.shadow_forward,
        )

    @property
    def block_start(self) -> bool:
        """The first step of a decoding block."""
        return self.step_in_block == 0

    @property
    def device(self) -> torch.device:
        return self.canvas.device

    def shadow(self) -> ShadowForward:
        """Hindsight: a full recompute of the canvas and the cache's drift from it. Costs a full forward."""
        if self.shadow_forward is None:
            raise RuntimeError("this context has no session to run a shadow forward on")
        return self.shadow_forward()

    def expand(self, per_block: torch.Tensor) -> torch.Tensor:
        """(B, n_blocks) -> (B, N): each block's value at each of its positions."""
        if self.partition is None:
            return per_block.repeat_interleave(self.block_length, dim=1)
        return self.partition.to(per_block.device).expand(per_block)

    def block_mask(self, lo: int, hi: int | None = None) -> torch.Tensor:
        """(B, n_blocks) True for blocks in [lo, hi)."""
        blocks = torch.arange(self.n_blocks)
        keep = (blocks >= lo) & (blocks < (self.n_blocks if hi is None else hi))
        return keep.expand(self.batch_size, -1)


class ReusePolicy:
    """Maps a step's features to a refresh plan. Subclasses implement `plan`; stateful ones use the hooks."""

    name: ClassVar[str] = "policy"
    uses_features: ClassVar[bool] = True
    uses_attention: ClassVar[bool] = False
    # A new decoding block starts with a full refresh (Fast-dLLM, Elastic-Cache): `decide` answers that step itself.
    refresh_at_block_start: ClassVar[bool] = False
    knob: ClassVar[str | None] = None  # the parameter that moves the policy from conservative to aggressive
    knob_sweep: ClassVar[tuple] = ()  # conservative -> aggressive values for the benchmark
    # Whether the policy reads the `budget` feature (budget-conditioned learned policies); generate() refuses a budget
    # for any other. default_budget: the budget generate() uses when given none.
    budget_conditioned: bool = False
    default_budget: float | None = None
    # The model families' caches the rule runs on: "text" (masked-diffusion LMs, `generate`) and/or "image" (DiT,
    # `cache_core.image.sample_images`). Rules that only read the plan interface (full, never, the oracle, learned
    # policies of the matching schema) run on both.
    modalities: tuple[str, ...] = ("text",)

    def reset(self, batch_size: int) -> None:
        """Called at the start of every generation."""

    def on_block_start(self, ctx: StepContext) -> None:
        """Called at the first step of every decoding block, before that step is planned."""

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        raise NotImplementedError

    def on_step_end(self, ctx: StepContext, result: StepResult) -> None:
        """Called after every step with what it computed (its trace, commits and accounting)."""

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, **({self.knob: getattr(self, self.knob)} if self.knob else {})}


def decide(policy: ReusePolicy, session: DecodingSession, budget: float | None = None,
           features: StepFeatures | None = None) -> tuple[RefreshPlan, StepContext]:
    """The plan `policy` makes for the session's next step (block-start hook included), with the context it saw.
    features: this step's features when the caller already has them (the environment's observation)."""
    ctx = StepContext.of(session, budget)
    if ctx.block_start:
        policy.on_block_start(ctx)
        if policy.refresh_at_block_start:
            return RefreshPlan.refresh_all(ctx.batch_size, ctx.n_blocks), ctx
    if policy.uses_features and features is None:
        features = session.features(budget)
    return policy.plan(features if policy.uses_features else None, ctx), ctx


def run_step(policy: ReusePolicy, session: DecodingSession, budget: float | None = None) -> StepResult:
    """One denoising step of `session` under `policy`: decide, step, tell the policy what ran.

    Times the policy's side (`decide`: block-start hook, features, `plan`; and `on_step_end`) into the step's
    record (`StepRecord.policy_s`, next to `wall_s`, which `session.step` times). On CUDA the device is synchronised
    at each clock reading, so work queued by one side is not billed to the other (the step's queued tail is added to
    its wall_s); elsewhere nothing is synchronised."""
    cuda = session.canvas.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    plan, ctx = decide(policy, session, budget)
    sync()
    policy_s = time.perf_counter() - t0
    result = session.step(plan)
    if cuda:  # session.step read its clock without waiting for the device: add what it left queued
        t1 = time.perf_counter()
        sync()
        result.record.wall_s += time.perf_counter() - t1
    t2 = time.perf_counter()
    policy.on_step_end(ctx, result)
    sync()
    result.record.policy_s = policy_s + time.perf_counter() - t2
    return result

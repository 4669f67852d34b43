"""The one image sampling loop, and the context an image policy sees. The cache policy is a parameter.

`sample_images(model, labels, steps, policy=...)` drives a `DenoisingSession` with any `ReusePolicy` that runs on
images (`ReusePolicy.modalities`): the image heuristics (`cache_core.image.heuristics`), `full`, `never`, the oracle
and exported learned policies trained on the image schema. The environment drives the same session with an agent's
actions, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cache_core.accounting import GenerationStats
from cache_core.cache import RefreshPlan
from cache_core.features import StepFeatures
from cache_core.image.session import DenoisingSession, ImageShadow, ImageStepResult
from cache_core.partition import BlockPartition
from cache_core.policy import ReusePolicy


@dataclass
class ImageStepContext:
    """What an image policy may know about the step besides the features (tensors are the session's own)."""

    batch_size: int
    n_blocks: int
    n_layers: int
    block_length: int  # tokens per cache block
    step: int
    n_steps: int
    timestep: int
    budget: float | None
    partition: BlockPartition
    session: DenoisingSession = field(repr=False)
    shadow_forward: Callable[[], ImageShadow] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, session: DenoisingSession, budget: float | None = None) -> ImageStepContext:
        return cls(batch_size=session.batch_size, n_blocks=session.n_blocks, n_layers=session.n_layers,
                   block_length=session.cache.block_size, step=session.step_index, n_steps=session.n_steps,
                   timestep=session.timestep, budget=budget, partition=session.cache.partition, session=session,
                   shadow_forward=session.shadow_forward)

    @property
    def step_in_block(self) -> int:  # the whole image is one "decoding block": hooks that read it see the step
        return self.step

    @property
    def key_mask(self) -> torch.Tensor:
        """(B, N) True: every patch token is real (an image has no padding); the budget control reads block sizes
        from it as it does from a text canvas's."""
        return torch.ones(self.batch_size, self.n_blocks * self.block_length, dtype=torch.bool)

    @property
    def block_start(self) -> bool:
        return self.step == 0

    @property
    def device(self) -> torch.device:
        return self.session.device

    def shadow(self) -> ImageShadow:
        if self.shadow_forward is None:
            raise RuntimeError("this context has no session to run a shadow forward on")
        return self.shadow_forward()

    def expand(self, per_block: torch.Tensor) -> torch.Tensor:
        return self.partition.to(per_block.device).expand(per_block)


def check_image_policy(policy: ReusePolicy) -> ReusePolicy:
    if "image" not in policy.modalities:
        raise ValueError(f"policy {policy.describe()['policy']!r} is a text-cache rule and does not run on images; "
                         "image policies: python -m cache_core lists them (fora, toca, teacache, deepcache, l2c, full, "
                         "never, oracle, or an exported policy trained on the image schema)")
    return policy


def decide(policy: ReusePolicy, session: DenoisingSession, budget: float | None = None,
           features: StepFeatures | None = None) -> tuple[RefreshPlan, ImageStepContext]:
    ctx = ImageStepContext.of(session, budget)
    if ctx.block_start:
        policy.on_block_start(ctx)
    if policy.uses_features and features is None:
        features = session.features(budget)
    return policy.plan(features if policy.uses_features else None, ctx), ctx


def run_step(policy: ReusePolicy, session: DenoisingSession, budget: float | None = None) -> ImageStepResult:
    plan, ctx = decide(policy, session, budget)
    result = session.step(plan)
    policy.on_step_end(ctx, result)
    return result


@dataclass
class ImageSampleResult:
    images: torch.Tensor  # (B, C, H, W) in [-1, 1]
    stats: GenerationStats
    policy: dict[str, Any]


def sample_images(model: Any, labels: Any, steps: int = 25, policy: str | ReusePolicy | None = None,
                  block_size: int = 8, seed: int | None = 0, noise: torch.Tensor | None = None,
                  budget: float | None = None, **policy_knobs: Any) -> ImageSampleResult:
    """Sample one image per class label with DDIM under a cache policy.

    labels: class ids (n_classes = unconditional); steps: DDIM steps; policy: a registry name with its knob as a
    keyword (`policy="fora", interval=3`), a `ReusePolicy`, or the path of an exported policy trained on the image
    schema; block_size: patch tokens per cache block; seed / noise: the initial noise (noise wins).
    """
    from cache_core.registry import make_policy

    policy = check_image_policy(make_policy(policy, **policy_knobs))
    if budget is None:
        budget = policy.default_budget
    if budget is not None and not policy.budget_conditioned:
        raise ValueError(f"budget={budget} was given, but policy {policy.describe()['policy']!r} is not "
                         "budget-conditioned and would ignore it")
    session = DenoisingSession(model, labels, steps, block_size=block_size, seed=seed, noise=noise,
                               trace_attention=True)
    policy.reset(session.batch_size)
    while not session.done:
        run_step(policy, session, budget)
    return ImageSampleResult(images=session.images, stats=session.stats, policy=policy.describe())

"""Hand-set reuse rules from the literature, each a small `ReusePolicy` with one knob.

Every plan here is a request: the cache always adds the decoding block and never-computed positions. A new heuristic
is one class here (or in any module imported before use) decorated with `@register_policy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cache_core.cache import RefreshPlan
from cache_core.features import StepFeatures
from cache_core.policy import ReusePolicy, StepContext
from cache_core.registry import register_policy

if TYPE_CHECKING:
    from cache_core.session import StepResult


@register_policy
class FullRecompute(ReusePolicy):
    """No cache: every block recomputed in every layer at every step (the reference)."""

    name = "full"
    uses_features = False
    modalities = ("text", "image")

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        return RefreshPlan.refresh_all(ctx.batch_size, ctx.n_blocks)


@register_policy
class NeverRefresh(ReusePolicy):
    """The most aggressive cache: only the positions being decoded are computed; everything else keeps the K/V of
    its first computation."""

    name = "never"
    uses_features = False
    modalities = ("text", "image")

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        return RefreshPlan.reuse_all(ctx.batch_size, ctx.n_blocks, ctx.n_layers)


@register_policy
class FastDLLMCache(ReusePolicy):
    """Fast-dLLM (Wu et al. 2025) block-wise approximate KV cache.

    At the first step of every decoding block one full forward refreshes every position in every layer. Later steps:
    `prefix` mode recomputes the decoding block and the whole suffix (prefix K/V reused); `dual` mode recomputes
    only the decoding block (prefix and suffix reused). Knob `refresh_interval`: also refresh fully every that many
    steps inside a block (1 = always = no cache, conservative; None = only at block starts, Fast-dLLM's setting).
    """

    name = "prefix_cache"
    mode = "prefix"
    uses_features = False
    refresh_at_block_start = True
    knob = "refresh_interval"
    knob_sweep = (2, 4, 8, None)

    def __init__(self, refresh_interval: int | None = None):
        if refresh_interval is not None and refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1 or None, got {refresh_interval}")
        self.refresh_interval = refresh_interval

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        if self.refresh_interval is not None and ctx.step_in_block % self.refresh_interval == 0:
            return RefreshPlan.refresh_all(ctx.batch_size, ctx.n_blocks)
        if self.mode == "prefix":
            return RefreshPlan.from_refresh_mask(ctx.block_mask(ctx.decoding_block), ctx.n_layers)
        return RefreshPlan.reuse_all(ctx.batch_size, ctx.n_blocks, ctx.n_layers)


@register_policy
class FastDLLMDualCache(FastDLLMCache):
    __doc__ = FastDLLMCache.__doc__
    name = "dual_cache"
    mode = "dual"


@register_policy
class DLLMCache(ReusePolicy):
    """dLLM-Cache (Liu et al. 2025): interval refresh with value-similarity partial updates.

    The prompt is refreshed every `prompt_interval` (K_p) steps and the response (every generation position) every
    `response_interval` (K_r) steps. On the steps in between, as in the reference code, every response position runs
    through all layers from the embedding of its current token: at each layer its value is projected from its fresh
    input and compared with the cached value by cosine similarity, and per batch row the floor(rho * n) least similar
    of the n response positions get attention and MLP recomputed in that layer (K/V and cached update written); the
    others go on with their fresh input plus their cached residual update of that layer. So tokens committed since
    their last refresh reach layer 0 with their new embedding, and drift propagates to deeper layers. The rule is
    carried out by `DiffusionModel.forward_partial` (`RefreshPlan.adaptive`); the value probe's FLOPs are counted,
    the carried additions are not (one addition per position and layer). Knob: K_r (larger = more aggressive).

    Where it differs from the reference code, and why:
    - the decoding block is always recomputed from layer 0 (the engine's invariant: its logits must be fresh), so it
      is not among the candidates and n counts the other response positions; the reference ranks it with the rest;
    - the cache keeps one residual update per layer and position (layer output minus input, attention and MLP
      together) where the reference keeps the attention and MLP outputs apart: both are always reused or recomputed
      together, so for LLaDA's pre-norm layer (x + attn, then + mlp) the sum is the same update;
    - grouped-KV models (fewer KV heads than heads: the built-in model, Dream, LLaDA-MoE) are supported, the values
      compared being the KV heads' values; the reference hooks assume as many KV heads as heads;
    - the residual updates are kept only once a cached step needs them (the session enables them at the first
      adaptive plan, from the layer inputs already cached: exact); under a memory manager they are paged and
      quantised like the layer inputs.
    """

    name = "dllm_cache"
    uses_features = False
    knob = "response_interval"
    knob_sweep = (2, 4, 8, 16)

    def __init__(self, response_interval: int = 4, prompt_interval: int = 50, rho: float = 0.25):
        if response_interval < 1 or prompt_interval < 1:
            raise ValueError("dllm_cache intervals must be >= 1")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"dllm_cache rho must lie in [0, 1], got {rho}")
        self.response_interval, self.prompt_interval, self.rho = response_interval, prompt_interval, rho

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        L = ctx.n_layers
        prompt = ctx.block_mask(0, ctx.prompt_blocks)
        response = ~prompt
        refresh = torch.zeros_like(prompt)
        if ctx.step % self.prompt_interval == 0:
            refresh |= prompt
        if ctx.step % self.response_interval == 0:
            refresh |= response
        plan = RefreshPlan.from_refresh_mask(refresh, L)
        if not bool(refresh[:, ctx.prompt_blocks:].all()) and self.rho > 0:
            candidates = ctx.expand(response) & ctx.key_mask.cpu()
            plan.adaptive = (candidates.to(ctx.device), self.rho)
        return plan


@register_policy
class ElasticCache(ReusePolicy):
    """Elastic-Cache (Nguyen-Tri et al. 2025): attention-drift test on the most-attended token, depth-aware refresh.

    Per layer, take the key that received the most attention from the decoding queries at the step before last,
    and the vector of attention it receives from those queries at the last two steps; when their cosine similarity
    drops below `gamma` at some layer l, refresh every block in the layers deeper than l and reuse the shallow ones
    (drift grows with depth). A new decoding block starts with a full refresh. Knob: gamma (higher = refresh more
    often = conservative). The test uses the two previous steps, so it acts one step after the drift appears.
    """

    name = "elastic_cache"
    uses_features = False
    uses_attention = True
    refresh_at_block_start = True
    knob = "gamma"
    knob_sweep = (0.99, 0.95, 0.9, 0.8, 0.5)

    def __init__(self, gamma: float = 0.9):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"elastic_cache gamma must lie in [0, 1], got {gamma}")
        self.gamma = gamma
        self._attention: list[torch.Tensor] = []  # the block's last two steps' attention traces, oldest first

    def reset(self, batch_size: int) -> None:
        self._attention = []

    def on_block_start(self, ctx: StepContext) -> None:
        self._attention = []  # the decoding queries change with the block: the last block's attention is no reference

    def on_step_end(self, ctx: StepContext, result: StepResult) -> None:
        self._attention = [*self._attention, result.trace.attention_to_keys][-2:]  # (L, B, n_out, N) each

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        B, L = ctx.batch_size, ctx.n_layers
        if len(self._attention) < 2:
            return RefreshPlan.refresh_all(B, ctx.n_blocks)
        previous, current = self._attention
        most = previous.mean(2).argmax(-1)  # (L, B) most-attended key per layer at the step before last
        index = most[:, :, None, None].expand(-1, -1, current.shape[2], 1)
        now, before = current.gather(3, index).squeeze(-1), previous.gather(3, index).squeeze(-1)  # (L, B, n_out)
        similarity = F.cosine_similarity(now, before, dim=-1)  # (L, B)
        drifted = similarity < self.gamma
        # Start at the first drifting layer l: it is recomputed from its cached input, so its own K/V stay and the
        # K/V of every deeper layer are refreshed, as Elastic-Cache prescribes.
        first = torch.where(drifted.any(0), drifted.float().argmax(0), L)
        return RefreshPlan(first[:, None].expand(B, ctx.n_blocks).clone().long())


@register_policy
class ConfidenceRefresh(ReusePolicy):
    """Entropy/confidence threshold: refresh the blocks the model is unsure about.

    A block is refreshed when the mean confidence of the model's latest predictions at its positions is below
    `min_confidence` (signal `confidence`) or the mean normalised entropy above 1 - min_confidence (signal
    `entropy`); the prompt (confidence 1) is never refreshed. Knob: min_confidence (higher = refresh more =
    conservative).
    """

    name = "confidence"
    knob = "min_confidence"  # not "threshold": generate() has its own threshold argument
    knob_sweep = (0.99, 0.95, 0.9, 0.8, 0.6)

    def __init__(self, min_confidence: float = 0.9, signal: str = "confidence"):
        if signal not in ("confidence", "entropy"):
            raise ValueError(f"confidence policy signal must be 'confidence' or 'entropy', got {signal!r}")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"confidence min_confidence must lie in [0, 1], got {min_confidence}")
        self.min_confidence, self.signal = min_confidence, signal

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        if self.signal == "confidence":
            refresh = features.column("confidence") < self.min_confidence
        else:
            refresh = features.column("entropy") > 1.0 - self.min_confidence
        return RefreshPlan.from_refresh_mask(refresh.cpu(), ctx.n_layers)


@register_policy
class DelayedKVCache(ReusePolicy):
    """dKV-Cache (Ma et al. 2025), delayed variant: a token's K/V is cached only one step after it is decoded, masked
    tokens are always recomputed, and everything is refreshed every `refresh_interval` steps. Knob: the interval."""

    name = "dkv_cache"
    uses_features = False
    knob = "refresh_interval"
    knob_sweep = (2, 4, 8, 16)

    def __init__(self, refresh_interval: int = 4):
        if refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1, got {refresh_interval}")
        self.refresh_interval = refresh_interval

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        B, nb, L = ctx.batch_size, ctx.n_blocks, ctx.n_layers
        if ctx.step % self.refresh_interval == 0:
            return RefreshPlan.refresh_all(B, nb)
        # Decoded at the previous step = committed since its last computation at layer 0.
        just_decoded = (ctx.canvas != ctx.tokens_at_refresh) & (ctx.tokens_at_refresh == ctx.mask_id)
        masked = ctx.canvas == ctx.mask_id
        return RefreshPlan(torch.full((B, nb), L, dtype=torch.long), refresh_positions=just_decoded | masked)


"""The block KV cache and the refresh plan a policy hands it each step.

The canvas (left-padded prompt + generation region) is cut into cache blocks of `block_size` positions; the prompt
is left-padded to a multiple of the block size so that every block is whole and the generation region starts on a
block boundary. Per layer the cache keeps keys, values and the layer's *input* hidden states: the inputs are what a
refresh from layer k > 0 needs (Elastic-Cache style depth refresh), since the layers below k are not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cache_core.models.base import ModelFacts


@dataclass
class RefreshPlan:
    """What to recompute this step.

    start_layer: (B, n_blocks) ints; a block recomputes layers start_layer..n_layers-1 from its cached input to
        layer start_layer, and reuses its cached K/V in the layers below. So its K/V change from layer start_layer + 1
        on (at layer 0 too when start_layer = 0, which re-embeds the tokens). 0 = refresh the whole block,
        n_layers = reuse it everywhere.
    refresh_positions: optional (B, N) bool, single positions to refresh in every layer (token-level policies such as
        dKV-Cache).
    adaptive: optional (candidates (B, N) bool, rho): dLLM-Cache's per-layer value-similarity refresh of the rho
        fraction least similar candidates.
    The cache adds the positions the step must compute whatever the plan says (see BlockKVCache.start_layers).
    """

    start_layer: torch.Tensor
    refresh_positions: torch.Tensor | None = None
    adaptive: tuple[torch.Tensor, float] | None = None

    @classmethod
    def refresh_all(cls, batch_size: int, n_blocks: int) -> RefreshPlan:
        return cls(torch.zeros(batch_size, n_blocks, dtype=torch.long))

    @classmethod
    def reuse_all(cls, batch_size: int, n_blocks: int, n_layers: int) -> RefreshPlan:
        return cls(torch.full((batch_size, n_blocks), n_layers, dtype=torch.long))

    @classmethod
    def from_refresh_mask(cls, refresh: torch.Tensor, n_layers: int) -> RefreshPlan:
        """Binary plan: True = refresh the block in every layer, False = reuse it."""
        return cls(torch.where(refresh.bool(), 0, n_layers).long())

    def validate(self, batch_size: int, n_blocks: int, n_layers: int, canvas_length: int) -> None:
        if tuple(self.start_layer.shape) != (batch_size, n_blocks):
            raise ValueError(
                f"RefreshPlan.start_layer has shape {tuple(self.start_layer.shape)}, expected "
                f"(batch={batch_size}, blocks={n_blocks})"
            )
        if self.start_layer.min() < 0 or self.start_layer.max() > n_layers:
            raise ValueError(f"RefreshPlan.start_layer values must lie in [0, n_layers={n_layers}]")
        if self.refresh_positions is not None and tuple(self.refresh_positions.shape) != (batch_size, canvas_length):
            raise ValueError(f"RefreshPlan.refresh_positions must have shape ({batch_size}, {canvas_length})")
        if self.adaptive is not None:
            candidates, rho = self.adaptive
            if tuple(candidates.shape) != (batch_size, canvas_length) or not 0.0 <= rho <= 1.0:
                raise ValueError("RefreshPlan.adaptive must be (candidates of shape (B, N), rho in [0, 1])")


class BlockKVCache:
    """Per-layer keys, values and layer inputs for every canvas position, updated in place by partial forwards."""

    def __init__(self, facts: ModelFacts, key_mask: torch.Tensor, positions: torch.Tensor, block_size: int,
                 dtype: torch.dtype = torch.float32):
        B, N = key_mask.shape
        if N % block_size:
            raise ValueError(f"canvas length {N} is not a multiple of the cache block size {block_size}")
        device = key_mask.device
        self.facts = facts
        self.block_size = block_size
        self.n_blocks = N // block_size
        self.key_mask = key_mask  # (B, N) False on left padding: never attended to, never computed
        self.positions = positions  # (B, N) rotary positions, 0 at each row's first real token
        L = facts.n_layers
        kv_shape = (B, facts.n_kv_heads, N, facts.head_dim)
        self.keys = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(L)]
        self.values = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(L)]
        self.hidden = [torch.zeros(B, N, facts.hidden_size, dtype=dtype, device=device) for _ in range(L)]
        self.computed = [torch.zeros(B, N, dtype=torch.bool, device=device) for _ in range(L)]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.key_mask.shape)

    def start_layers(self, plan: RefreshPlan, required: torch.Tensor) -> torch.Tensor:
        """Per-position start layer (B, N) for a plan, with the positions the step must compute added.

        Enforced whatever the plan says: `required` positions (those whose logits the step needs) and positions never
        computed in some layer start at layer 0; padding is never computed.
        """
        B, N = self.shape
        L = self.facts.n_layers
        plan.validate(B, self.n_blocks, L, N)
        start = plan.start_layer.to(required.device).repeat_interleave(self.block_size, dim=1)
        if plan.refresh_positions is not None:
            start = torch.where(plan.refresh_positions.to(required.device), 0, start)
        incomplete = torch.stack(self.computed).logical_not().any(0)
        start = torch.where(required | incomplete, 0, start)
        return torch.where(self.key_mask, start, L)

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (keys, values and layer inputs)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, *self.hidden))

    def block_slice(self, block: int) -> slice:
        return slice(block * self.block_size, (block + 1) * self.block_size)

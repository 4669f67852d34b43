"""The image family's block cache: per layer and patch token, keys, values and the layer's residual update.

Cache blocks are groups of `block_size` consecutive patch tokens in raster order (with 2x2 patches on 16x16 images
and 8 tokens per block, a block is a band of two patch rows). A refresh plan says per block from which layer to
recompute (`RefreshPlan.start_layer`: layers >= start), or, for step-level routers, per block and layer
(`RefreshPlan.layer_mask`). Whatever the plan says, a (token, layer) entry that has never been computed is computed:
there is nothing to reuse.
"""

from __future__ import annotations

import torch

from cache_core.cache import RefreshPlan
from cache_core.models.dit import DiTModel
from cache_core.partition import BlockPartition


class ImageBlockCache:
    def __init__(self, model: DiTModel, batch_size: int, block_size: int):
        cfg = model.config
        N, L = cfg.n_tokens, cfg.n_layers
        if not isinstance(block_size, int) or block_size < 1 or N % block_size:
            raise ValueError(f"block_size={block_size!r} must be a positive divisor of the {N} patch tokens "
                             f"(e.g. {', '.join(str(s) for s in range(1, N + 1) if N % s == 0)})")
        device, dtype = model.device, model.dtype
        self.partition = BlockPartition.uniform(N, block_size, device)
        self.n_layers, self.n_tokens = L, N
        head_dim = cfg.d_model // cfg.n_heads
        self.keys = [torch.zeros(batch_size, cfg.n_heads, N, head_dim, device=device, dtype=dtype) for _ in range(L)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.updates = [torch.zeros(batch_size, N, cfg.d_model, device=device, dtype=dtype) for _ in range(L)]
        self.computed = [torch.zeros(batch_size, N, dtype=torch.bool, device=device) for _ in range(L)]

    @property
    def n_blocks(self) -> int:
        return self.partition.n_blocks

    @property
    def block_size(self) -> int:
        return int(self.partition.uniform_size)

    def recompute_mask(self, plan: RefreshPlan) -> torch.Tensor:
        """(B, N, n_layers) bool: what the step computes under `plan`, never-computed entries added."""
        B = self.computed[0].shape[0]
        if plan.layer_mask is not None:
            if tuple(plan.layer_mask.shape) != (B, self.n_blocks, self.n_layers):
                raise ValueError(f"RefreshPlan.layer_mask has shape {tuple(plan.layer_mask.shape)}, expected "
                                 f"(batch={B}, blocks={self.n_blocks}, layers={self.n_layers})")
            per_block = plan.layer_mask.bool()
        else:
            plan.validate(B, self.n_blocks, self.n_layers, self.n_tokens)
            layers = torch.arange(self.n_layers, device=plan.start_layer.device)
            per_block = layers[None, None, :] >= plan.start_layer[..., None]
        if plan.refresh_positions is not None:
            raise ValueError("RefreshPlan.refresh_positions (token-level plans) is a text-cache option; an image "
                             "plan speaks of blocks (start_layer or layer_mask)")
        mask = self.partition.expand(per_block.to(self.computed[0].device))
        never = ~torch.stack(self.computed, dim=-1)
        return mask | never

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, *self.updates]
        return sum(t.numel() * t.element_size() for t in tensors)

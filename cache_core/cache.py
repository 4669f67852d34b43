"""The block KV cache and the refresh plan a policy hands it each step.

The canvas (left-padded prompt + generation region) is cut into cache blocks by a `BlockPartition` (by default one
cache block per decoding block; see `cache_core.partition` for other sizes and the dynamic partition); the prompt is
left-padded to a multiple of the decoding block so that the generation region starts on a block boundary. Per layer
the cache keeps keys, values and the layer's *input* hidden states: the inputs are what a refresh from layer k > 0
needs (Elastic-Cache style depth refresh), since the layers below k are not run. With a memory manager
(`cache_core.memory`) they live in a paged store at per-block precisions and a layer is materialised only while it
runs (`open_layer` / `close_layer`). For dLLM-Cache the cache also keeps, per layer and position, the layer's residual
update (its output minus its input: attention and MLP together), which a position carried through a layer without
recomputing adds to its fresh input (`enable_residual_updates`, from the first adaptive plan on; no other policy pays
for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cache_core.models.base import ModelFacts
from cache_core.partition import BlockPartition

if TYPE_CHECKING:
    from cache_core.memory import MemoryConfig


@dataclass
class RefreshPlan:
    """What to recompute this step.

    start_layer: (B, n_blocks) ints; a block recomputes layers start_layer..n_layers-1 from its cached input to
        layer start_layer, and reuses its cached K/V in the layers below. So its K/V change from layer start_layer + 1
        on (at layer 0 too when start_layer = 0, which re-embeds the tokens). 0 = refresh the whole block,
        n_layers = reuse it everywhere.
    refresh_positions: optional (B, N) bool, single positions to refresh in every layer (token-level policies such as
        dKV-Cache).
    adaptive: optional (candidates (B, N) bool, rho): dLLM-Cache's per-layer rule: the candidates run through every
        layer from their current tokens, and at each layer the floor(rho * n) whose fresh values are least similar to
        the cached ones are recomputed there (see `DiffusionModel.forward_partial`); needs the cache's residual
        updates (`BlockKVCache.enable_residual_updates`).
    layer_mask: optional (B, n_blocks, n_layers) bool, True = recompute the block in that layer; replaces
        start_layer's "layers >= start" where a rule is per layer (the image caches' step-level routers:
        Learning-to-Cache, DeepCache). Only the image cache reads it; the text cache refuses it.
    The cache adds the positions the step must compute whatever the plan says (see BlockKVCache.start_layers).
    """

    start_layer: torch.Tensor
    refresh_positions: torch.Tensor | None = None
    adaptive: tuple[torch.Tensor, float] | None = None
    layer_mask: torch.Tensor | None = None

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
        if self.layer_mask is not None:
            raise ValueError("RefreshPlan.layer_mask (per-layer plans) is an image-cache option; a text plan says "
                             "per block from which layer to recompute (start_layer)")
        if self.adaptive is not None:
            candidates, rho = self.adaptive
            if tuple(candidates.shape) != (batch_size, canvas_length) or not 0.0 <= rho <= 1.0:
                raise ValueError("RefreshPlan.adaptive must be (candidates of shape (B, N), rho in [0, 1])")


class BlockKVCache:
    """Per-layer keys, values and layer inputs for every canvas position, updated in place by partial forwards; with
    `enable_residual_updates`, per-layer residual updates too (`updates`, None without)."""

    def __init__(self, facts: ModelFacts, key_mask: torch.Tensor, positions: torch.Tensor,
                 partition: BlockPartition | int, dtype: torch.dtype = torch.float32,
                 memory: MemoryConfig | None = None, page_size: int | None = None):
        B, N = key_mask.shape
        device = key_mask.device
        if isinstance(partition, int):
            partition = BlockPartition.uniform(N, partition, device)
        if partition.length != N:
            raise ValueError(f"the cache partition covers {partition.length} positions, the canvas has {N}")
        self.facts = facts
        self.partition = partition.to(device)
        self.key_mask = key_mask  # (B, N) False on left padding: never attended to, never computed
        self.positions = positions  # (B, N) rotary positions, 0 at each row's first real token
        L = facts.n_layers
        self.computed = [torch.zeros(B, N, dtype=torch.bool, device=device) for _ in range(L)]
        self.resident = key_mask.clone()  # (B, N) positions whose K/V are held (all real ones without a memory budget)
        # With a memory manager the per-layer tensors exist only while a layer is open (see cache_core.memory).
        self.store = None
        self.updates: list[torch.Tensor | None] | None = None  # per-layer (B, N, hidden) residual updates, if kept
        self._pending_hidden: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if memory is not None:
            from cache_core.memory import PagedStore

            self.store = PagedStore(self, memory, page_size or partition.uniform_size or N, dtype)
            self._check_budget()
            self.keys: list[torch.Tensor | None] = [None] * L
            self.values: list[torch.Tensor | None] = [None] * L
            self.hidden: list[torch.Tensor | None] = [None] * L
            return
        kv_shape = (B, facts.n_kv_heads, N, facts.head_dim)
        self.keys = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(L)]
        self.values = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(L)]
        self.hidden = [torch.zeros(B, N, facts.hidden_size, dtype=dtype, device=device) for _ in range(L)]

    def _check_budget(self) -> None:
        budget, minimum = self.store.cfg.budget_bytes, self.store.minimum_bytes()
        if budget is not None and budget < minimum:
            raise ValueError(
                f"memory budget_bytes={budget} is smaller than the decoding block needs: {minimum} bytes (the "
                f"one-layer workspace, {self.store.workspace_bytes}, plus the decoding block at native precision); "
                "raise budget_bytes or lower the batch size"
            )

    def enable_residual_updates(self) -> None:
        """Keep each layer's residual update per position from now on (dLLM-Cache's carried positions add it; see
        `DiffusionModel.forward_partial`). The session calls it at the first adaptive plan. Idempotent.

        Until then every forward wrote a computed position's layer-l output as its input to layer l + 1, so the
        update of layer l < n_layers - 1 is hidden[l + 1] - hidden[l], bit for bit what the forward would have
        stored; the last layer's starts at zero (a carried position's last-layer output feeds nothing: only the
        decoding block gives logits, and it is always recomputed)."""
        if self.updates is not None:
            return
        L = self.facts.n_layers
        if self.store is not None:
            self.store.add_updates()
            self._check_budget()
            self.updates = [None] * L
            return
        self.updates = [nxt - h for h, nxt in zip(self.hidden, self.hidden[1:])] + [torch.zeros_like(self.hidden[-1])]

    @property
    def n_blocks(self) -> int:
        return self.partition.n_blocks

    @property
    def block_size(self) -> int | None:
        """The cache block size when every block has one (None for a dynamic partition)."""
        return self.partition.uniform_size

    def set_partition(self, partition: BlockPartition) -> None:
        """Re-cut the cache into other blocks (the stored per-position state is unchanged)."""
        if partition.length != self.shape[1]:
            raise ValueError(f"the cache partition covers {partition.length} positions, the canvas has {self.shape[1]}")
        self.partition = partition.to(self.key_mask.device)

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
        start = self.partition.expand(plan.start_layer.to(required.device))
        if plan.refresh_positions is not None:
            start = torch.where(plan.refresh_positions.to(required.device), 0, start)
        incomplete = torch.stack(self.computed).logical_not().any(0)
        start = torch.where(required | incomplete, 0, start)
        if self.store is not None and bool((required & ~self.resident & self.key_mask).any()):
            raise RuntimeError("the memory manager evicted a position the step must compute")
        return torch.where(self.resident, start, L)  # padding and evicted positions are never computed

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, N) keys attended to: real positions whose K/V are held (evicted blocks drop out, as in DPad)."""
        return self.resident if self.store is not None else self.key_mask

    # --- layer access: a no-op for the dense cache, (de)quantisation for the paged store ----------------------------
    def open_layer(self, layer: int) -> None:
        """Make keys[layer], values[layer], hidden[layer] (and updates[layer]) dense tensors (and apply pending input
        writes)."""
        if self.store is None:
            return
        if self.keys[layer] is None:
            dense = self.store.materialise(layer)
            self.keys[layer], self.values[layer], self.hidden[layer] = dense[:3]
            if self.updates is not None:
                self.updates[layer] = dense[3]
        pending = self._pending_hidden.pop(layer, None)
        if pending is not None:
            rows, idx, x = pending
            self.hidden[layer][rows, idx] = x

    def close_layer(self, layer: int, written: torch.Tensor | None) -> None:
        """Store the pages of `layer` holding `written` positions (None: nothing written) and free the workspace."""
        if self.store is None:
            return
        if written is not None:
            dense = [self.keys[layer], self.values[layer], self.hidden[layer]]
            if self.updates is not None:
                dense.append(self.updates[layer])
            self.store.write_back(layer, dense, self.store.dirty_pages(written))
        self.keys[layer] = self.values[layer] = self.hidden[layer] = None
        if self.updates is not None:
            self.updates[layer] = None

    def set_hidden(self, layer: int, rows: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> None:
        """Write layer inputs at (rows, idx); for a closed layer of the paged store, when the layer opens."""
        if self.store is not None and self.keys[layer] is None:
            self._pending_hidden[layer] = (rows, idx, x)
            return
        self.hidden[layer][rows, idx] = x

    def plan_memory(self, decoding_start: int, block_length: int, canvas: torch.Tensor, mask_id: int) -> None:
        """The memory manager's decision for the next step: tiers, evictions and readmissions (see memory.py)."""
        store = self.store
        if store is None:
            return
        P = store.page_size
        masked = ((canvas == mask_id) & self.key_mask).view(canvas.shape[0], store.n_pages, P).any(-1).any(0)
        dropped, readmitted = store.plan(decoding_start // P, [not bool(m) for m in masked])
        for p in dropped:
            store.drop(p)
            if not store.offloaded[p]:
                for computed in self.computed:
                    computed[:, p * P:(p + 1) * P] = False
        store.bring_back(readmitted)
        resident = torch.tensor([t != "evicted" for t in store.tier], device=self.key_mask.device)
        self.resident = resident.repeat_interleave(P)[None, :] & self.key_mask

    def drift_from(self, keys: list[torch.Tensor], values: list[torch.Tensor], rows: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """(r, n_blocks, n_layers) relative L2 drift of the cached K/V (max of keys and values) from fresh per-layer
        `keys`/`values` (r, heads, N, hd) of the batch rows `rows` (all rows by default), over valid positions."""
        rows = slice(None) if rows is None else rows
        mask, per_layer = self.key_mask[rows], []
        for layer in range(len(keys)):
            self.open_layer(layer)
            per_layer.append(torch.maximum(_block_drift(self.keys[layer][rows], keys[layer], mask, self.partition),
                                           _block_drift(self.values[layer][rows], values[layer], mask, self.partition)))
            self.close_layer(layer, None)
        return torch.stack(per_layer, dim=-1)

    def host_bytes(self) -> int:
        """Bytes of blocks offloaded to host memory by the memory manager (0 without one)."""
        return self.store.host_bytes() if self.store is not None else 0

    def nbytes(self) -> int:
        """Bytes the cache holds: its tensors (keys, values, layer inputs and any residual updates); with a memory
        manager, the paged store plus the one-layer workspace a forward materialises."""
        if self.store is not None:
            return self.store.device_bytes()
        tensors = (*self.keys, *self.values, *self.hidden, *(self.updates or ()))
        return sum(t.numel() * t.element_size() for t in tensors)

    def block_slice(self, block: int) -> slice:
        return self.partition.slice(block)


def _block_drift(cached: torch.Tensor, fresh: torch.Tensor, key_mask: torch.Tensor, partition: BlockPartition
                 ) -> torch.Tensor:
    """||cached - fresh|| / ||fresh|| per block over valid positions: (B, n_blocks). Inputs (B, heads, N, hd)."""
    valid = key_mask[:, None, :, None].float()
    diff = partition.sum(((cached.float() - fresh.float()) * valid).pow(2).sum((1, 3)))
    ref = partition.sum((fresh.float() * valid).pow(2).sum((1, 3)))
    return (diff / ref.clamp(min=1e-12)).sqrt()

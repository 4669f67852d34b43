"""Memory manager: the block KV cache under a byte budget, with selective storage, eviction and host offload.

Without it the cache keeps keys, values and layer inputs of every position in every layer at the model's dtype. With
it the cache is a *paged store*: one page per decoding block (block_length positions), each page held at a
precision of its own:

    native  the model's dtype                    fp32: 4 bytes per number (bf16 on CUDA: 2)
    bf16    bfloat16                             2 bytes
    fp8     float8_e4m3fn, one scale per page and row (and head)   1 byte + scales
    int8    int8, absmax scale per page and row (and head)         1 byte + scales
    evicted not stored: dropped from attention (as DPad drops distant suffix blocks), recomputed from its tokens
            when it comes back into the window; with `offload`, kept in host memory instead and copied back.

A forward reads one layer at a time: the layer's pages are dequantised into one dense workspace (keys, values and
inputs of that layer only, and its residual updates when the cache keeps them for dLLM-Cache), the layer runs, and
the pages it wrote are quantised back. Peak cache memory is the store plus that one-layer workspace, and both are
counted (`StepRecord.cache_bytes`). Pages whose positions were not written keep their stored bytes untouched (no
re-quantisation drift).

Before every step the manager assigns each page a tier: the decoding block and `window` blocks after it stay
native; committed (stable) pages take `stable_precision`; with `evict_far`, suffix pages beyond the window (still
all masked) are evicted. If the store would exceed `budget_bytes`, pages are demoted farthest first
(native -> bf16 -> low_precision), then evicted (the pages holding least text first, then the farthest, suffix
first). The decoding block is never evicted, so a budget is refused up front when it cannot hold the workspace and
the decoding block at native precision.

Presets: `speed` keeps everything native unless the budget forces otherwise (no accuracy cost without a budget);
`memory` stores stable pages in int8 even without a budget.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cache_core import validate as v

if TYPE_CHECKING:
    from cache_core.cache import BlockKVCache

PRECISIONS = ("native", "bf16", "fp8", "int8")
EVICTED = "evicted"
PRESETS: dict[str, dict[str, Any]] = {
    "speed": {"stable_precision": "native"},
    "memory": {"stable_precision": "int8"},
}
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0


@dataclass
class MemoryConfig:
    """budget_bytes: the most bytes the cache may hold at any step (store + one-layer workspace); None: no limit.
    preset: "speed" or "memory" (see the module docstring); stable_precision overrides the preset's precision of
    committed pages; low_precision: the lowest precision the budget may demote to; window: blocks after the decoding
    block kept resident and native; offload: evicted pages go to host memory and are copied back instead of
    recomputed; prefetch: copy offloaded pages back one step ahead, on a side CUDA stream (synchronous on CPU);
    evict_far: drop suffix blocks beyond the window from attention even under budget (DPad's rule; the built-in
    model needs its suffix, see the README's measurements)."""

    budget_bytes: int | None = None
    preset: str = "speed"
    stable_precision: str | None = None
    low_precision: str = "int8"
    window: int = 1
    offload: bool = False
    prefetch: bool = False
    evict_far: bool = False
    enabled: bool = True  # False: the plain dense cache (the Hydra config's default)

    def __post_init__(self) -> None:
        v.flag("memory enabled", self.enabled)
        v.number("memory budget_bytes", self.budget_bytes, integer=True, low=1, optional=True)
        if self.preset not in PRESETS:
            raise ValueError(f"memory preset={self.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        for name in ("stable_precision", "low_precision"):
            value = getattr(self, name)
            if value is not None and value not in PRECISIONS:
                raise ValueError(f"memory {name}={value!r} is not a known precision; choose one of {PRECISIONS}")
        v.number("memory window", self.window, integer=True, low=0)
        v.flag("memory offload", self.offload)
        v.flag("memory prefetch", self.prefetch)
        v.flag("memory evict_far", self.evict_far)
        if self.prefetch and not self.offload:
            raise ValueError("memory prefetch=True needs offload=True: only offloaded pages are copied back")

    @property
    def stable(self) -> str:
        return self.stable_precision or PRESETS[self.preset]["stable_precision"]


def as_memory(value: MemoryConfig | dict | bool | None) -> MemoryConfig | None:
    """generate()'s memory argument (see `validate.runtime_part`)."""
    return v.runtime_part(MemoryConfig, value, "memory")


def _rank(precision: str) -> int:
    return PRECISIONS.index(precision)


class _Page:
    """One tensor's page (B, [heads,] P, dim) at one precision: data and, for fp8/int8, a scale per row (and head)."""

    __slots__ = ("data", "scale", "precision")

    def __init__(self, dense: torch.Tensor, precision: str, native: torch.dtype):
        self.precision = precision
        self.scale = None
        if precision == "native":
            self.data = dense.to(native).clone()
        elif precision == "bf16":
            self.data = dense.to(torch.bfloat16)
        else:
            reduce = tuple(range(dense.dim() - 2, dense.dim()))  # per row (and head): over positions and features
            absmax = dense.float().abs().amax(dim=reduce, keepdim=True).clamp(min=1e-12)
            if precision == "int8":
                self.scale = absmax / 127.0
                self.data = (dense.float() / self.scale).round().clamp(-127, 127).to(torch.int8)
            else:
                self.scale = absmax / _FP8_MAX
                self.data = (dense.float() / self.scale).to(_FP8)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scale is None:
            return self.data.to(dtype)
        return (self.data.float() * self.scale).to(dtype)

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (self.scale.numel() * self.scale.element_size() if self.scale is not None else 0)

    def to(self, device: torch.device, non_blocking: bool = False) -> None:
        pin = device.type == "cpu" and self.data.device.type == "cuda"
        self.data = self.data.to(device, non_blocking=non_blocking)
        if pin:
            self.data = self.data.pin_memory()
        if self.scale is not None:
            self.scale = self.scale.to(device, non_blocking=non_blocking)


class PagedStore:
    """The cache's keys, values and layer inputs as pages at per-page precisions (see the module docstring)."""

    def __init__(self, cache: BlockKVCache, cfg: MemoryConfig, page_size: int, dtype: torch.dtype):
        B, N = cache.shape
        if N % page_size:
            raise ValueError(f"canvas length {N} is not a multiple of the memory page size {page_size}")
        self.cfg, self.page_size, self.dtype = cfg, page_size, dtype
        self.n_pages = N // page_size
        self.device = cache.key_mask.device
        self.host = torch.device("cpu")
        f = cache.facts
        self.kv_shape = (B, f.n_kv_heads, N, f.head_dim)
        self.hidden_shape = (B, N, f.hidden_size)
        self.n_layers = f.n_layers
        # pages[layer][kind][page]: kind 0 keys, 1 values, 2 inputs, 3 residual updates (only once `add_updates`);
        # None = not stored (evicted or never computed)
        self.pages: list[list[list[_Page | None]]] = [[[None] * self.n_pages for _ in range(3)]
                                                       for _ in range(f.n_layers)]
        self._sizes()
        self.tier = [EVICTED] * self.n_pages  # what each page is (to be) stored as
        self.offloaded = [False] * self.n_pages  # page held in host memory
        real = cache.key_mask.view(B, self.n_pages, page_size).sum(-1).sum(0)
        self.real_positions = real.tolist()  # real (non-padding) positions per page, all rows together
        self.padding = [not r for r in self.real_positions]  # pages with no real position in any row: nothing to store
        for p in range(self.n_pages):
            if not self.padding[p]:
                self.tier[p] = "native"
        self._stream = torch.cuda.Stream() if cfg.prefetch and self.device.type == "cuda" else None
        self._pending: list[int] = []  # pages being copied back on the side stream
        self.peak_bytes = 0
        self.copied_back_pages = 0
        self.recomputed_pages = 0

    @property
    def n_kinds(self) -> int:
        """Tensors stored per layer: keys, values, inputs (3), and the residual updates (4) once `add_updates`."""
        return len(self.pages[0])

    def add_updates(self) -> None:
        """Also store each layer's residual updates (hidden-sized, like the inputs), for dLLM-Cache. The stored ones
        start as the difference of the layer's stored output and input (see `BlockKVCache.enable_residual_updates`),
        at the inputs' precision and where they are (device or host); the last layer's start at zero."""
        if self.n_kinds > 3:
            return
        for layer, nxt in zip(self.pages, [*self.pages[1:], None]):
            updates = []
            for p, page in enumerate(layer[2]):
                out = nxt[2][p] if nxt is not None else None
                if page is None:
                    updates.append(None)
                    continue
                x = page.dense(self.dtype)
                update = out.dense(self.dtype) - x if out is not None else torch.zeros_like(x)
                updates.append(_Page(update, page.precision, self.dtype))
            layer.append(updates)
        self._sizes()

    def _sizes(self) -> None:
        B, N, hidden = self.hidden_shape
        element = torch.empty((), dtype=self.dtype).element_size()
        kv_numbers = self.kv_shape[0] * self.kv_shape[1] * N * self.kv_shape[3]
        self.workspace_bytes = element * (2 * kv_numbers + (self.n_kinds - 2) * B * N * hidden)  # one layer, dense
        self.page_native_bytes = self.page_bytes("native")

    # --- bytes -----------------------------------------------------------------------------------------------------
    def store_bytes(self, host: bool = False) -> int:
        total = 0
        for p in range(self.n_pages):
            if self.offloaded[p] != host:
                continue
            total += sum(page.nbytes() for layer in self.pages for kind in layer if (page := kind[p]) is not None)
        return total

    def device_bytes(self) -> int:
        """Bytes counted against the budget: the store outside host offload + the one-layer workspace."""
        return self.store_bytes() + self.workspace_bytes

    def host_bytes(self) -> int:
        """Bytes of offloaded pages (host memory; on a CPU device the same memory, so offload saves nothing there:
        it runs so that the CUDA code path is tested)."""
        return self.store_bytes(host=True)

    def page_bytes(self, precision: str) -> int:
        """Exact bytes of one page (all layers, keys, values, inputs and any updates) at `precision`, scales
        included."""
        if precision == EVICTED:
            return 0
        B, H, _, D = self.kv_shape
        P, hidden = self.page_size, self.hidden_shape[-1]
        per_position = self.n_kinds - 2  # hidden-sized tensors: the inputs (and the residual updates)
        numbers = 2 * B * H * P * D + per_position * B * P * hidden
        if precision == "native":
            per_layer = numbers * torch.empty((), dtype=self.dtype).element_size()
        elif precision == "bf16":
            per_layer = numbers * 2
        else:  # one fp32 scale per row and head (per row for the inputs and updates)
            per_layer = numbers + 4 * (2 * B * H + per_position * B)
        return per_layer * self.n_layers

    def minimum_bytes(self) -> int:
        return self.workspace_bytes + self.page_native_bytes

    # --- layers ----------------------------------------------------------------------------------------------------
    def materialise(self, layer: int) -> list[torch.Tensor]:
        """Dense keys, values, inputs (and residual updates) of `layer` (zeros where nothing is stored)."""
        self._wait()
        shapes = [self.kv_shape, self.kv_shape] + [self.hidden_shape] * (self.n_kinds - 2)
        dense = [torch.zeros(shape, dtype=self.dtype, device=self.device) for shape in shapes]
        P = self.page_size
        for p in range(self.n_pages):
            s = slice(p * P, (p + 1) * P)
            for kind, tensor in enumerate(dense):
                page = self.pages[layer][kind][p]
                if page is not None:
                    tensor[..., s, :] = page.dense(self.dtype)
        return dense

    def write_back(self, layer: int, dense: list[torch.Tensor], dirty: list[int]) -> None:
        """Store the pages of `layer` whose positions were written, at their tier (dense: as `materialise` gives)."""
        P = self.page_size
        for p in dirty:
            tier = self.tier[p]
            if tier == EVICTED:
                continue
            s = slice(p * P, (p + 1) * P)
            for kind, tensor in enumerate(dense):
                self.pages[layer][kind][p] = _Page(tensor[..., s, :], tier, self.dtype)

    def dirty_pages(self, positions: torch.Tensor) -> list[int]:
        return sorted(set((positions // self.page_size).flatten().tolist()))

    # --- the manager's decision before a step ----------------------------------------------------------------------
    def plan(self, decoding_page: int, settled: list[bool]) -> tuple[list[int], list[int]]:
        """Assign each page its tier for the next step under the budget. settled[p]: the page holds no masked
        position (committed text or prompt). Returns (pages to drop, pages readmitted: to recompute or copy back)."""
        cfg = self.cfg
        want = []
        for p in range(self.n_pages):
            if self.padding[p]:
                want.append(EVICTED)
            elif decoding_page <= p <= decoding_page + cfg.window:
                want.append("native")
            elif p > decoding_page + cfg.window and cfg.evict_far and not settled[p]:
                want.append(EVICTED)
            else:
                want.append(cfg.stable if settled[p] else "native")
        if cfg.budget_bytes is not None:
            want = self._fit(want, decoding_page)
        dropped, readmitted = [], []
        for p in range(self.n_pages):
            old, new = self.tier[p], want[p]
            stored = self.pages[0][0][p] is not None
            if new == EVICTED and old != EVICTED:
                dropped.append(p)
            elif old == EVICTED and new != EVICTED:
                readmitted.append(p)
            elif new != EVICTED and stored and not self.offloaded[p] and _rank(new) > _rank(self._stored(p)):
                self._demote(p, new)  # lower precision only; a page regains precision when it is recomputed
            self.tier[p] = new
        return dropped, readmitted

    def _stored(self, p: int) -> str:
        page = self.pages[0][0][p]
        return page.precision if page is not None else self.tier[p]

    def _fit(self, want: list[str], decoding_page: int) -> list[str]:
        budget = self.cfg.budget_bytes - self.workspace_bytes
        low = _rank(self.cfg.low_precision)

        def total() -> int:
            return sum(self.page_bytes(t) for t in want)

        order = sorted((p for p in range(self.n_pages) if p != decoding_page and want[p] != EVICTED),
                       key=lambda p: -abs(p - decoding_page))
        # Demote farthest first: to bf16, then straight to low_precision (measured on the built-in benchmark, fp8 e4m3
        # with per-page scales loses more exact match than int8, so the ladder does not pass through it).
        ladder = list(dict.fromkeys(t for t in ("bf16", self.cfg.low_precision) if 0 < _rank(t) <= low))
        for target in ladder:
            for p in order:
                if total() <= budget:
                    return want
                if _rank(want[p]) < _rank(target):
                    want[p] = target
        # Then evict: the pages that hold the least text first (left-padded prompt pages of a mixed-length batch), and
        # among equals the farthest, suffix before prefix (DPad drops distant suffix blocks).
        evict = sorted(order, key=lambda p: (self.real_positions[p], -abs(p - decoding_page), p < decoding_page))
        for p in evict:
            if total() <= budget:
                return want
            want[p] = EVICTED
        return want

    def _demote(self, p: int, precision: str) -> None:
        for layer in self.pages:
            for kind in layer:
                page = kind[p]
                if page is not None:
                    kind[p] = _Page(page.dense(self.dtype), precision, self.dtype)

    def drop(self, p: int) -> None:
        if self.cfg.offload and self.pages[0][0][p] is not None:
            for layer in self.pages:
                for page in layer:
                    if page[p] is not None:
                        page[p].to(self.host)
            self.offloaded[p] = True
            return
        for layer in self.pages:
            for kind in layer:
                kind[p] = None

    def bring_back(self, pages: list[int]) -> list[int]:
        """Readmit offloaded pages (a copy back, asynchronous with prefetch on CUDA); returns the pages that have
        nothing stored and must be recomputed."""
        recompute = []
        for p in pages:
            if not self.offloaded[p]:
                recompute.append(p)
                continue
            stream = self._stream
            main = torch.cuda.current_stream() if stream is not None else None
            context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with context:
                for layer in self.pages:
                    for page in layer:
                        if page[p] is not None:
                            page[p].to(self.device, non_blocking=stream is not None)
                            if main is not None:  # allocated on the side stream, read on the main one
                                page[p].data.record_stream(main)
                                if page[p].scale is not None:
                                    page[p].scale.record_stream(main)
            self.offloaded[p] = False
            self.copied_back_pages += 1
            if stream is not None:
                self._pending.append(p)
        self.recomputed_pages += len(recompute)
        return recompute

    def _wait(self) -> None:
        if self._pending and self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)
            self._pending = []


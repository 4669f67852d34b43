"""How the canvas is cut into cache blocks: the unit a refresh plan, the features and the memory manager speak of.

By default a cache block is a decoding block (`BlockPartition.uniform(N, block_length)`). A cache block may also be
smaller than the decoding block (a divisor of it: finer reuse decisions), larger (a multiple: fewer, coarser
decisions), or follow the content (`DynamicPartitioner`: adjacent stable blocks merged, a block whose positions
diverge split back). One rule keeps every partition meaningful: a cache block lies inside one decoding block or is a
union of whole decoding blocks, and the prompt/generation boundary is a block boundary. A partition that would split
a decoding block across two cache blocks that reach outside it is refused (`check_nested`).

Per-block reductions of (B, N) tensors live here (`sum`, `mean`, `any`, `expand`): with a uniform partition they are
the reshape-and-sum the engine always used (bit for bit), with any other one a segment sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cache_core import validate as v


class PartitionError(ValueError):
    """A cache partition or cache block size that does not fit the decoding blocks; the message names the fix."""


class BlockPartition:
    """Contiguous cache blocks covering positions [0, N): `sizes[i]` positions each, in order."""

    def __init__(self, sizes: Sequence[int], device: torch.device | str = "cpu"):
        sizes = [int(s) for s in sizes]
        if not sizes or min(sizes) < 1:
            raise PartitionError(f"cache block sizes must be positive, got {sizes}")
        self.sizes_list = sizes
        self.n_blocks = len(sizes)
        self.length = sum(sizes)
        self.device = torch.device(device)
        self.sizes = torch.tensor(sizes, dtype=torch.long, device=self.device)
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes
        self.starts_list = self.starts.tolist()
        self.block_of = torch.repeat_interleave(torch.arange(self.n_blocks, device=self.device), self.sizes)
        self.uniform_size = sizes[0] if len(set(sizes)) == 1 else None

    @classmethod
    def uniform(cls, length: int, size: int, device: torch.device | str = "cpu") -> BlockPartition:
        if length % size:
            raise PartitionError(f"canvas length {length} is not a multiple of the cache block size {size}")
        return cls([size] * (length // size), device)

    @classmethod
    def fixed(cls, prompt_region: int, gen_length: int, block_length: int, cache_block_size: int,
              device: torch.device | str = "cpu") -> BlockPartition:
        """Cache blocks of `cache_block_size`: a divisor or a multiple of the decoding block. The generation region is
        cut from its start (a last, shorter block holds whole decoding blocks), the prompt from its end, towards the
        left padding (a first, shorter block holds the padding side)."""
        check_cache_block_size(cache_block_size, block_length)
        if cache_block_size == block_length:
            return cls.uniform(prompt_region + gen_length, block_length, device)
        gen = _cut(gen_length, cache_block_size)
        prompt = _cut(prompt_region, cache_block_size)[::-1]
        return cls(prompt + gen, device)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockPartition) and self.sizes_list == other.sizes_list

    def __repr__(self) -> str:
        return f"BlockPartition({self.sizes_list})"

    def to(self, device: torch.device | str) -> BlockPartition:
        return self if torch.device(device) == self.device else BlockPartition(self.sizes_list, device)

    def slice(self, block: int) -> slice:
        start = self.starts_list[block]
        return slice(start, start + self.sizes_list[block])

    # --- reductions over blocks ----------------------------------------------------------------------------------
    def sum(self, values: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """(B, N, ...) -> (B, n_blocks, ...) sums over each block's positions; the positions on `dim` (1 by default;
        -1: (..., N) -> (..., n_blocks), e.g. several (B, N) tensors stacked in front, each summed as it would be
        alone)."""
        dim = dim % values.dim()
        lead, rest = values.shape[:dim], values.shape[dim + 1:]
        if self.uniform_size is not None:
            return values.reshape(*lead, self.n_blocks, self.uniform_size, *rest).sum(dim + 1)
        out = values.new_zeros(*lead, self.n_blocks, *rest)
        return out.index_add_(dim, self.block_of.to(values.device), values)

    def mean(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted mean of (B, N) values per block: (B, n_blocks); 0 where a block has no weight."""
        v, w = self.sum(values * weights), self.sum(weights)
        return torch.where(w > 0, v / w.clamp(min=1e-9), torch.zeros_like(v))

    def fraction(self, values: torch.Tensor) -> torch.Tensor:
        """Plain mean of (B, N) values per block (every position counts): (B, n_blocks)."""
        if self.uniform_size is not None:
            return values.reshape(values.shape[0], self.n_blocks, self.uniform_size).mean(-1)
        return self.sum(values) / self.sizes.to(values.device).to(values.dtype)

    def any(self, values: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) bool -> (B, n_blocks, ...) True where any position of the block is."""
        return self.sum(values.long()) > 0

    def expand(self, per_block: torch.Tensor) -> torch.Tensor:
        """(B, n_blocks, ...) -> (B, N, ...) each block's value at each of its positions."""
        if self.uniform_size is not None:
            return per_block.repeat_interleave(self.uniform_size, dim=1)
        return per_block.repeat_interleave(self.sizes.to(per_block.device), dim=1)

    # --- validity ------------------------------------------------------------------------------------------------
    def check_nested(self, block_length: int, prompt_region: int, where: str = "cache partition") -> None:
        """Refuse a partition in which a cache block crosses a decoding-block boundary without covering the decoding
        blocks on both sides whole, or crosses the prompt/generation boundary."""
        for start, size in zip(self.starts_list, self.sizes_list):
            end = start + size
            inside = start // block_length == (end - 1) // block_length
            whole = start % block_length == 0 and end % block_length == 0
            if not (inside or whole):
                raise PartitionError(
                    f"{where}: cache block [{start}, {end}) would split decoding block "
                    f"{(end - 1) // block_length if not inside else start // block_length} (block_length="
                    f"{block_length}): a cache block must lie inside one decoding block or cover whole ones"
                )
            if start < prompt_region < end:
                raise PartitionError(f"{where}: cache block [{start}, {end}) crosses the prompt/generation boundary at "
                                     f"{prompt_region}; make {prompt_region} a block boundary")


def _cut(length: int, size: int) -> list[int]:
    full, rest = divmod(length, size)
    return [size] * full + ([rest] if rest else [])


def check_cache_block_size(cache_block_size: int, block_length: int) -> None:
    if not isinstance(cache_block_size, int) or isinstance(cache_block_size, bool) or cache_block_size < 1:
        raise PartitionError(f"cache_block_size={cache_block_size!r} must be a positive whole number")
    if block_length % cache_block_size and cache_block_size % block_length:
        raise PartitionError(
            f"cache_block_size={cache_block_size} would split a decoding block (block_length={block_length}): use a "
            f"divisor of {block_length} or a multiple of it"
        )


@dataclass
class DynamicPartitioner:
    """A content-dependent partition, re-cut at the start of every decoding block (so a plan's block count only
    changes when the decoding block does).

    The canvas is first cut into granules of `granule` positions (a divisor of block_length; default the decoding
    block). A granule is *stable* when it holds no masked position and its positions' drift at their last recompute
    (the `refresh_drift` the session tracks, 1 - cos of old and new values) is at most `merge_below`. Runs of adjacent
    stable granules are merged into blocks of up to `max_size` positions, never across the prompt/generation
    boundary and only where the merged block stays nested in the decoding blocks (see `check_nested`). A block whose
    positions diverge (any position's drift above `split_above`, or masked and committed positions mixed) is never
    merged: it stays at granule size, i.e. a merged block is split back as soon as it stops being stable.
    """

    granule: int | None = None
    max_size: int = 64
    merge_below: float = 0.02
    split_above: float = 0.05
    enabled: bool = True  # False: the fixed partition (the Hydra config's default)

    def check(self, block_length: int) -> None:
        granule = self.granule or block_length
        if not isinstance(granule, int) or isinstance(granule, bool) or granule < 1 or block_length % granule:
            raise PartitionError(f"dynamic partition granule={self.granule!r} must be a positive divisor of "
                                 f"block_length={block_length}")
        if granule > block_length:
            raise PartitionError(f"dynamic partition granule={granule} must not exceed block_length={block_length}")
        if not isinstance(self.max_size, int) or self.max_size < granule:
            raise PartitionError(f"dynamic partition max_size={self.max_size!r} must be a whole number >= the "
                                 f"granule ({granule})")
        if not 0.0 <= self.merge_below <= self.split_above:
            raise PartitionError(f"dynamic partition needs 0 <= merge_below ({self.merge_below}) <= split_above "
                                 f"({self.split_above})")

    def partition(self, stable_positions: torch.Tensor, diverging_positions: torch.Tensor, prompt_region: int,
                  block_length: int) -> BlockPartition:
        """The partition for the next decoding block. stable_positions / diverging_positions: (B, N) bool; a granule
        must be stable (and not diverging) in every batch row to merge (one partition serves the batch).

        Two levels keep it nested: inside a decoding block, runs of stable granules merge; decoding blocks that are
        stable whole merge with stable neighbours into runs of up to `max_size` (never across the prompt boundary)."""
        granule = self.granule or block_length
        N = stable_positions.shape[1]
        base = BlockPartition.uniform(N, granule, stable_positions.device)
        stable = (base.fraction(stable_positions.float()).eq(1.0) & ~base.any(diverging_positions)).all(0).tolist()
        per_block = block_length // granule
        sizes: list[int] = []
        run = 0  # positions of the open run of whole stable decoding blocks
        for d in range(N // block_length):
            flags = stable[d * per_block:(d + 1) * per_block]
            boundary = d * block_length == prompt_region
            if all(flags) and block_length <= self.max_size:
                if run and not boundary and run + block_length <= self.max_size:
                    run += block_length
                else:
                    if run:
                        sizes.append(run)
                    run = block_length
                continue
            if run:
                sizes.append(run)
                run = 0
            inner = 0  # stable granules inside this decoding block merge with each other
            for ok in flags:
                if ok and inner + granule <= self.max_size:
                    inner += granule
                elif ok:
                    sizes.append(inner)
                    inner = granule
                else:
                    if inner:
                        sizes.append(inner)
                        inner = 0
                    sizes.append(granule)
            if inner:
                sizes.append(inner)
        if run:
            sizes.append(run)
        partition = BlockPartition(sizes, stable_positions.device)
        partition.check_nested(block_length, prompt_region, "dynamic partition")
        return partition


def as_partitioner(value: DynamicPartitioner | dict | bool | None) -> DynamicPartitioner | None:
    """generate()'s dynamic_blocks argument (see `validate.runtime_part`)."""
    return v.runtime_part(DynamicPartitioner, value, "dynamic_blocks", PartitionError)

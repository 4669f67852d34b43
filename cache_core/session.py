"""One generation, step by step: the loop body shared by `generate()` and the environment.

A `DecodingSession` holds the canvas, the block KV cache and the bookkeeping the features read. Its `step(plan)`
runs one denoising step (partial forward under the plan, then LLaDA's commit rule) and records the accounting.
`generate()` drives it with a policy; the environment drives it with an agent's actions. Neither has its own copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cache_core.accounting import GenerationStats, StepRecord, full_step_flops, step_flops
from cache_core.cache import BlockKVCache, RefreshPlan
from cache_core.features import StepFeatures, compute_features
from cache_core.memory import MemoryConfig
from cache_core.models.base import DiffusionModel, PartialForwardTrace, check_trace_attention
from cache_core.monitor import QualityMonitor
from cache_core.partition import BlockPartition, DynamicPartitioner, PartitionError

REMASKING = ("low_confidence", "random")


@dataclass
class StepResult:
    record: StepRecord
    committed: torch.Tensor  # (B, N) bool, positions committed this step
    logits: torch.Tensor  # (B, block_length, vocab) logits of the decoding block
    start_layer: torch.Tensor  # (B, N) the enforced per-position start layers
    trace: PartialForwardTrace


@dataclass
class ShadowForward:
    """A full recompute of the current canvas next to the cache: the oracle's and the reward's reference."""

    logits: torch.Tensor  # (B, block_length, vocab) at the decoding block
    drift: torch.Tensor  # (B, n_blocks, n_layers) relative K/V drift of the cache from fresh K/V (inf: never computed)


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """LLaDA's sampling trick: exp(logits) / (-log u)^T in float64 (float32 Gumbel noise hurts quality)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator).to(logits.device)
    return logits.exp() / (-torch.log(noise)) ** temperature


def transfer_schedule(mask_count: int, steps: int) -> list[int]:
    """LLaDA's linear schedule: mask_count tokens spread evenly over steps, the remainder to the first steps."""
    base, remainder = divmod(mask_count, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


class DecodingSession:
    def __init__(self, model: DiffusionModel, prompts: list[list[int]] | list[torch.Tensor], gen_length: int,
                 block_length: int, steps: int | None, threshold: float | None = None, temperature: float = 0.0,
                 remasking: str = "low_confidence", pad_id: int | None = None, seed: int | None = None,
                 trace_attention: bool | str = True, cache_block_size: int | None = None,
                 dynamic_blocks: DynamicPartitioner | None = None, monitor: QualityMonitor | None = None,
                 memory: MemoryConfig | None = None):
        facts = model.facts
        validate_generation_args(prompts, gen_length, block_length, steps, threshold, temperature, remasking)
        self.model = model
        self.mask_id = facts.mask_token_id
        self.gen_length, self.block_length = gen_length, block_length
        self.threshold, self.temperature, self.remasking = threshold, temperature, remasking
        check_trace_attention(trace_attention)  # here, so a bad value fails before the first step
        self.trace_attention = trace_attention
        self.n_generation_blocks = gen_length // block_length
        self.steps_per_block = None if steps is None else steps // self.n_generation_blocks
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        device = model.device

        lengths = [len(p) for p in prompts]
        # Left-pad every prompt to one length that is a multiple of the block size: blocks stay whole and the
        # generation region starts on a block boundary in every row.
        self.prompt_region = -(-max(lengths) // block_length) * block_length
        N = self.prompt_region + gen_length
        if N > facts.max_sequence_length:
            raise ValueError(
                f"prompt ({max(lengths)} tokens, padded to {self.prompt_region}) + gen_length ({gen_length}) = {N} "
                f"exceeds the model's max_sequence_length={facts.max_sequence_length}: shorten the prompt or gen_length"
            )
        B = len(prompts)
        pad = facts.mask_token_id if pad_id is None else pad_id  # padding is masked out of attention; any id works
        canvas = torch.full((B, N), pad, dtype=torch.long)
        key_mask = torch.zeros(B, N, dtype=torch.bool)
        for b, prompt in enumerate(prompts):
            start = self.prompt_region - lengths[b]
            canvas[b, start:self.prompt_region] = torch.as_tensor(prompt, dtype=torch.long)
            key_mask[b, start:] = True
        canvas[:, self.prompt_region:] = self.mask_id
        # Prompt ids must be real tokens (or the mask, for infilling); generation positions hold the mask.
        bad = ((canvas < 0) | (canvas >= facts.vocab_size)) & (canvas != self.mask_id) & key_mask
        bad[:, self.prompt_region:] = False
        if bool(bad.any()):
            row = int(bad.any(1).nonzero()[0])
            raise ValueError(f"prompt {row} holds token ids outside the model's vocabulary [0, {facts.vocab_size}): "
                             "was it encoded with this model's tokenizer?")
        positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
        self.canvas = canvas.to(device)
        if dynamic_blocks is not None and cache_block_size is not None:
            raise PartitionError("cache_block_size and dynamic_blocks are exclusive: a dynamic partition sets its own "
                                 "sizes (its granule is DynamicPartitioner.granule)")
        if dynamic_blocks is not None:
            dynamic_blocks.check(block_length)
        self.dynamic_blocks = dynamic_blocks
        size = (dynamic_blocks.granule or block_length) if dynamic_blocks is not None else cache_block_size
        partition = BlockPartition.fixed(self.prompt_region, gen_length, block_length, size or block_length, device)
        self.cache = BlockKVCache(facts, key_mask.to(device), positions.to(device), partition, dtype=model.dtype,
                                  memory=memory, page_size=block_length)

        # Bookkeeping the features read; every tensor is (B, N).
        self.step_index = 0
        self.step_in_block = 0
        self.generation_block = 0
        self.last_refresh_step = torch.full((B, N), -1, dtype=torch.long, device=device)
        self.tokens_at_refresh = self.canvas.clone()
        prompt_positions = torch.zeros(B, N, dtype=torch.bool, device=device)
        prompt_positions[:, : self.prompt_region] = True
        self.confidence = prompt_positions.float()  # the prompt is certain; unseen positions have no confidence yet
        self.entropy = torch.zeros(B, N, device=device)
        self.attention_mass = torch.zeros(B, N, device=device)
        self.previous_attention_mass = torch.zeros(B, N, device=device)
        self.refresh_drift = torch.zeros(B, N, device=device)
        self.last_commit_rate = torch.zeros(B, device=device)  # tokens committed per row at the last step / block
        self.stats = GenerationStats()
        self.monitor = monitor
        if monitor is not None:
            monitor.reset()
        self.budget_boost = torch.zeros(B, device=device)  # raised per row by the quality monitor's alarms
        self._schedule = self._block_schedule()
        self._shadow: ShadowForward | None = None
        self.feature_memo: dict = {}  # compute_features' state across steps (see cache_core.features._View)
        self._plan_memory()

    def _plan_memory(self) -> None:
        """The memory manager's tiers for the next step, decided as soon as the step before it ends (so that a
        prefetch of offloaded pages overlaps the policy's planning)."""
        if self.cache.store is not None and not self.done:
            self.cache.plan_memory(self.decoding_start, self.block_length, self.canvas, self.mask_id)

    # ----------------------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.canvas.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.cache.n_blocks

    @property
    def n_layers(self) -> int:
        return self.model.facts.n_layers

    @property
    def decoding_start(self) -> int:
        """Canvas position of the first token of the decoding block."""
        return self.prompt_region + self.generation_block * self.block_length

    @property
    def decoding_block(self) -> int:
        """Index of the (first) cache block holding the decoding block (the decoding block itself by default)."""
        if self.decoding_start >= self.canvas.shape[1]:  # generation complete: one past the last block
            return self.n_blocks
        return int(self.cache.partition.block_of[self.decoding_start])

    @property
    def decoding_blocks(self) -> tuple[int, int]:
        """Cache blocks [first, last + 1) that overlap the decoding block."""
        if self.done:
            return self.n_blocks, self.n_blocks
        last = self.decoding_start + self.block_length - 1
        return self.decoding_block, int(self.cache.partition.block_of[last]) + 1

    @property
    def prompt_blocks(self) -> int:
        """Cache blocks [0, prompt_blocks) hold the prompt."""
        return int(self.cache.partition.block_of[self.prompt_region]) if self.prompt_region < self.canvas.shape[1] \
            else self.n_blocks

    @property
    def done(self) -> bool:
        return self.generation_block >= self.n_generation_blocks

    @property
    def generated(self) -> torch.Tensor:
        """(B, gen_length) the generation region (mask ids where not yet committed)."""
        return self.canvas[:, self.prompt_region:]

    def block_positions(self) -> torch.Tensor:
        """(B, block_length) positions of the decoding block."""
        s = self.decoding_start
        return torch.arange(s, s + self.block_length, device=self.canvas.device).expand(self.batch_size, -1)

    def required_positions(self) -> torch.Tensor:
        """The decoding block and the positions its logits come from (a shifted-logit family adds the one before)."""
        required = torch.zeros_like(self.canvas, dtype=torch.bool)
        required[:, self.decoding_start:self.decoding_start + self.block_length] = True
        required.scatter_(1, self.model.logit_sources(self.block_positions()), True)
        return required

    def effective_budget(self, budget: float | None) -> torch.Tensor:
        """(B,) the budget each row runs at: the one asked for plus the monitor's boosts, at most 1 (1 with none)."""
        if budget is None:
            return torch.ones(self.batch_size, device=self.canvas.device)
        return (float(budget) + self.budget_boost).clamp(max=1.0)

    def features(self, budget: float | None = None) -> StepFeatures:
        return compute_features(self, budget)

    def shadow_forward(self) -> ShadowForward:
        """Full recompute of the current canvas (cached per step): fresh logits and the cache's hindsight drift."""
        if self._shadow is None:
            with torch.inference_mode():
                logits, keys, values = self.model(self.canvas, self.cache.key_mask, self.cache.positions,
                                                  return_kv=True)
            drift = self.cache.drift_from(keys, values)
            never = ~torch.stack(self.cache.computed, -1) & self.cache.key_mask[..., None]  # (B, N, L)
            drift = torch.where(self.cache.partition.any(never), float("inf"), drift)
            pos = self.block_positions()
            block_logits = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
            self._shadow = ShadowForward(block_logits, drift)
        return self._shadow

    # ----------------------------------------------------------------------------------------------------------
    def _block_schedule(self) -> list[int] | None:
        if self.steps_per_block is None:
            return None
        return transfer_schedule(self.block_length, self.steps_per_block)

    def step(self, plan: RefreshPlan) -> StepResult:
        """Run one denoising step of the current decoding block under `plan`."""
        if self.done:
            raise RuntimeError("the generation is complete; start a new session")
        t0 = time.perf_counter()
        if plan.adaptive is not None and self.cache.updates is None:
            self.cache.enable_residual_updates()  # dLLM-Cache's first cached step: keep per-layer residual updates
            self._plan_memory()  # a paged store grew by them: its tiers are planned again under the budget
        required = self.required_positions()
        start = self.cache.start_layers(plan, required)
        positions = self.block_positions()
        with torch.inference_mode():
            logits, trace = self.model.forward_partial(self.canvas, self.cache, start, positions,
                                                       trace_attention=self.trace_attention, adaptive=plan.adaptive)
        report = None
        if self.monitor is not None and self.monitor.due(self.step_index):
            logits, repaired, report = self.monitor.check(self, logits, positions)
            start = torch.where(repaired, 0, start)  # repaired entries are fresh: the bookkeeping treats them so
        canvas_before = self.canvas.clone()
        committed = self._commit(logits, positions)
        self.last_commit_rate = committed.sum(1).float() / self.block_length
        self._update_bookkeeping(start, trace, logits, positions, canvas_before)
        wall = time.perf_counter() - t0

        n_keys = self.cache.attention_mask.sum(1)  # evicted blocks are not attended to
        record = StepRecord(
            step=self.step_index,
            decoding_block=self.generation_block,
            flops=step_flops(self.model, trace.active_counts, n_keys, self.block_length) + trace.extra_flops
            + (report.flops if report else 0.0),
            full_flops=full_step_flops(self.model, self.cache.key_mask.sum(1), self.block_length),
            positions_x_layers=int(trace.active_counts.sum()),
            cache_bytes=self.cache.nbytes(),
            host_cache_bytes=self.cache.host_bytes(),
            wall_s=wall,
            committed=int(committed.sum()),
            monitor_flops=report.flops if report else 0.0,
            monitor_rows=report.rows if report else 0,
            monitor_alarms=report.alarms if report else 0,
        )
        self.stats.record(record)
        self._shadow = None
        self._advance()
        self._plan_memory()
        return StepResult(record, committed, logits, start, trace)

    def _commit(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """LLaDA's low-confidence remasking, or Fast-dLLM's threshold rule: commit masked tokens of the block."""
        block_tokens = self.canvas.gather(1, positions)
        masked = block_tokens == self.mask_id
        choice = logits
        if self.mask_id < logits.shape[-1]:
            # The mask token is never a prediction: committing it would leave the position masked for good (the block
            # would never complete). Confidence still reads the model's own softmax, as LLaDA does.
            choice = logits.clone()
            choice[..., self.mask_id] = float("-inf")
        x0 = add_gumbel_noise(choice, self.temperature, self.generator).argmax(-1)
        if self.remasking == "low_confidence":
            probs = logits.float().softmax(-1)
            conf = probs.gather(-1, x0[..., None]).squeeze(-1)
        else:
            conf = torch.rand(x0.shape, generator=self.generator).to(x0.device)
        transfer = self.transfer_mask(conf, masked)
        new_tokens = torch.where(transfer, x0, block_tokens)
        self.canvas.scatter_(1, positions, new_tokens)
        committed = torch.zeros_like(self.canvas, dtype=torch.bool)
        committed.scatter_(1, positions, transfer)
        return committed

    def transfer_mask(self, conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Which masked positions of the block this step commits, given their confidence (B, block_length): LLaDA's
        schedule (the k most confident) or Fast-dLLM's threshold (all above it, at least the most confident one)."""
        conf = torch.where(masked, conf, torch.tensor(float("-inf"), device=conf.device))
        transfer = torch.zeros_like(masked)
        if self.threshold is None:
            k = self._schedule[self.step_in_block]
            for b in range(conf.shape[0]):
                n = min(k, int(masked[b].sum()))
                if n > 0:
                    transfer[b, conf[b].topk(n).indices] = True
        else:
            transfer = masked & (conf >= self.threshold)
            top = conf.argmax(-1)
            has_mask = masked.any(-1)
            transfer[torch.arange(conf.shape[0])[has_mask], top[has_mask]] = True  # at least one per step
        return transfer

    def _update_bookkeeping(self, start: torch.Tensor, trace: PartialForwardTrace, logits: torch.Tensor,
                            positions: torch.Tensor, canvas_before: torch.Tensor) -> None:
        refreshed = start == 0
        self.last_refresh_step = torch.where(refreshed, self.step_index, self.last_refresh_step)
        # The canvas before this step's commits is what the refreshed K/V were computed from.
        self.tokens_at_refresh = torch.where(refreshed, canvas_before, self.tokens_at_refresh)
        probs = logits.float().softmax(-1)
        block_conf = probs.max(-1).values
        log_vocab = torch.log(torch.tensor(float(probs.shape[-1])))
        block_entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1) / log_vocab
        # Committed positions keep the confidence they were committed with.
        open_ = (canvas_before.gather(1, positions) == self.mask_id).float()
        self.confidence.scatter_(1, positions, open_ * block_conf + (1 - open_) * self.confidence.gather(1, positions))
        self.entropy.scatter_(1, positions, open_ * block_entropy + (1 - open_) * self.entropy.gather(1, positions))
        if trace.attention_to_keys is not None:
            self.previous_attention_mass = self.attention_mass
            self.attention_mass = trace.attention_to_keys[-1].mean(1).to(self.canvas.device)  # traces live on the CPU
        if trace.value_drift is not None:
            seen = ~torch.isnan(trace.value_drift)
            self.refresh_drift = torch.where(seen, trace.value_drift, self.refresh_drift)

    def _advance(self) -> None:
        self.step_index += 1
        self.step_in_block += 1
        start = self.decoding_start
        block_done = not bool((self.canvas[:, start:start + self.block_length] == self.mask_id).any())
        if block_done:
            self.generation_block += 1
            self.step_in_block = 0
            if self.dynamic_blocks is not None and not self.done:
                self._repartition()

    def _repartition(self) -> None:
        """Re-cut the cache for the next decoding block (DynamicPartitioner)."""
        dyn = self.dynamic_blocks
        committed = (self.canvas != self.mask_id) | ~self.cache.key_mask
        stable = committed & (self.refresh_drift <= dyn.merge_below)
        diverging = self.refresh_drift > dyn.split_above
        self.cache.set_partition(dyn.partition(stable, diverging, self.prompt_region, self.block_length))


def validate_generation_args(prompts, gen_length: int, block_length: int, steps: int | None,
                             threshold: float | None, temperature: float, remasking: str) -> None:
    if isinstance(prompts, (str, bytes)) or (len(prompts) and isinstance(prompts[0], (str, bytes))):
        raise TypeError("prompts are token ids, not text: encode them first, e.g. [tok.encode(text)] with the "
                        "model's tokenizer (cache_core.load_tokenizer)")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt (a list of token ids)")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if gen_length <= 0 or block_length <= 0:
        raise ValueError(f"gen_length ({gen_length}) and block_length ({block_length}) must be positive")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} is not a multiple of block_length={block_length}")
    n_blocks = gen_length // block_length
    if threshold is None:
        if steps is None:
            raise ValueError("steps is required unless a confidence threshold sets the pace (threshold=...)")
        if steps <= 0 or steps % n_blocks:
            raise ValueError(
                f"steps={steps} must be a positive multiple of the number of blocks ({n_blocks} = gen_length / "
                "block_length) so that every block gets the same number of steps"
            )
        if steps // n_blocks > block_length:
            raise ValueError(f"steps={steps} gives more steps per block than tokens per block ({block_length})")
    else:
        if steps is not None:
            raise ValueError(
                "steps and threshold are exclusive: with a threshold each block is decoded until complete "
                "(Fast-dLLM's parallel decoding); pass steps=None"
            )
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must lie in (0, 1]")
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature={temperature} must be >= 0")
    if remasking not in REMASKING:
        raise ValueError(f"unknown remasking {remasking!r}; choose one of {REMASKING}")

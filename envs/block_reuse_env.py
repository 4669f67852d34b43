"""`BlockReuseEnv`: a Gymnasium environment in which an agent decides, at every denoising step, which KV-cache blocks
of a masked-diffusion LM to recompute.

One episode = one generation of one prompt; one env step = one denoising step. The environment drives
`cache_core.session.DecodingSession`, the loop body `generate()` runs, so the observation *is* the feature tensor a
deployed policy reads (`session.features(budget)`) and the step *is* the partial forward inference runs.

Observation (`spaces.Dict`, fixed shapes):
    blocks      (max_blocks, N_BLOCK_FEATURES) float32   `StepFeatures.blocks` of the session, padded rows zero
    block_mask  (max_blocks,) int8 (MultiBinary)         1 for the episode's real blocks, 0 for padding
    global      (N_GLOBAL_FEATURES,) float32             `StepFeatures.global_` (progress, decoding block, step in
                                                         block, compute spent so far, budget)
    max_blocks = (max_prompt_length + gen_length) / block_length. Blocks are *left*-padded, like the session
    left-pads prompts: the episode's blocks occupy the last rows, so generation block i is always row
    max_blocks - gen_length / block_length + i whatever the prompt length.

Action:
    action_mode=binary: MultiBinary(max_blocks), 1 = refresh the block in every layer, 0 = reuse its cached K/V.
    action_mode=depth:  MultiDiscrete([n_layers + 1] * max_blocks), 0 = reuse, j = RefreshPlan start layer
                        n_layers - j (recompute layers n_layers - j .. n_layers - 1), n_layers = refresh all.
    Actions on padded rows are ignored. The cache always computes the decoding block and never-computed positions
    whatever the action says, so no action can make a step invalid.

Reward of a step (weights are constructor arguments):
    - w_flops * (step FLOPs / FLOPs of a full recompute of the step)
    - w_kl    * KL(full || cached) of the decoding block's predictions, mean over the positions still masked before
                the step; the reference is `session.shadow_forward()` on the same canvas, taken before the step
    - w_flip  * 1[some token committed this step differs from the full recompute's greedy prediction there]
    at the last step additionally
    + w_exact * exact match of the answer (task rule; needs answers)
    + w_agree * token agreement of the generation region with the no-cache answer (`generate(policy="full")`, once
                per prompt, cached)
    - w_budget * max(0, episode FLOP fraction - budget)   (only when a budget is set)

info of a step: flops, full_flops, flop_fraction (of the step), episode_flop_fraction, kl, flip, flip_count,
committed, budget, prompt_index, and `oracle_drift` (max_blocks, n_layers) float32: the relative drift of the cached
K/V from freshly computed K/V *in the state the action was taken in* (`shadow_forward().drift`; never-computed = inf
replaced by `drift_cap`, padded rows 0). These are the supervised labels of the observation the action was chosen
on; `OraclePolicy(epsilon)`'s action in that state is `labels_to_action(labels, epsilon, action_mode)` (both go
through `cache_core.policy.oracle_start_layer`: binary refreshes the blocks with some layer's drift > epsilon). The
last step adds exact_match (when answers exist), agreement, agree_exact, generated (the gen_length token ids),
episode_flops, episode_full_flops and, with a budget, budget_excess.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from cache_core.cache import RefreshPlan
from cache_core.features import BLOCK_COLUMNS, GLOBAL_COLUMNS, N_BLOCK_FEATURES, StepFeatures
from cache_core.model import LLaDAModel
from cache_core.policy import ReusePolicy, StepContext, oracle_start_layer
from cache_core.session import DecodingSession, ShadowForward, validate_generation_args
from envs.prompts import PromptSet, TaskSuitePromptSet, TokenPromptSet

ENV_ID = "blockreuse/BlockReuse-v0"
ACTION_MODES = ("binary", "depth")
PROMPT_ORDERS = ("random", "cycle")


class BlockReuseEnv(gym.Env):
    """Per-block KV-cache reuse decisions of a masked-diffusion LM, one denoising step per env step."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        model: LLaDAModel | None = None,
        prompts: PromptSet | Sequence[Any] | None = None,
        *,
        model_path: str | None = None,
        tokenizer: Any | None = None,
        split: str = "train",
        n_prompts: int = 64,
        tasks: Sequence[str] | None = None,
        task_seed: int = 0,
        eos_id: int | None = None,
        gen_length: int = 64,
        block_length: int = 16,
        steps: int | None = 64,
        threshold: float | None = None,
        temperature: float = 0.0,
        remasking: str = "low_confidence",
        max_prompt_length: int | None = None,
        action_mode: str = "binary",
        budget: float | Sequence[float] | None = None,
        w_flops: float = 0.02,
        w_kl: float = 0.5,
        w_flip: float = 0.5,
        w_exact: float = 1.0,
        w_agree: float = 1.0,
        w_budget: float = 2.0,
        shadow: bool = True,
        drift_cap: float = 1e3,
        prompt_order: str = "random",
        num_threads: int | None = None,
        device: str = "cpu",
        render_mode: str | None = None,
    ):
        super().__init__()
        if action_mode not in ACTION_MODES:
            raise ValueError(f"unknown action_mode {action_mode!r}; use one of {list(ACTION_MODES)}")
        if prompt_order not in PROMPT_ORDERS:
            raise ValueError(f"unknown prompt_order {prompt_order!r}; use one of {list(PROMPT_ORDERS)}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}; use one of {self.metadata['render_modes']}")
        self.budget_range = _parse_budget(budget)
        if not shadow and (w_kl or w_flip):
            raise ValueError("shadow=False removes the full-recompute reference, so w_kl and w_flip must be 0 "
                             "(or set shadow=True)")
        if drift_cap <= 0:
            raise ValueError(f"drift_cap must be positive, got {drift_cap}")
        if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
            raise ValueError(f"block_length={block_length} must divide gen_length={gen_length}: pick a block length "
                             f"that is a divisor of gen_length (e.g. {_divisor_hint(gen_length, block_length)})")
        if num_threads:
            torch.set_num_threads(int(num_threads))

        # --- model and prompts ---------------------------------------------------------------------------------
        if model is None:
            if model_path is None:
                raise ValueError("pass a model (LLaDAModel) or model_path (a checkpoint directory)")
            model, tokenizer = _load(model_path, device, tokenizer)
        self.model = model.eval()
        if prompts is None:
            if tokenizer is None:
                raise ValueError("no prompts given and no tokenizer to encode the task suite: pass prompts="
                                 "[(prompt_ids, answer_ids), ...] or a model_path whose checkpoint has tokenizer.json")
            prompts = TaskSuitePromptSet(tokenizer, split=split, n=n_prompts, tasks=tasks, seed=task_seed)
        elif not isinstance(prompts, PromptSet):
            if eos_id is None and tokenizer is not None:
                eos_id = tokenizer.eos_token_id
            prompts = TokenPromptSet(list(prompts), eos_id=eos_id, split=split)
        if len(prompts) == 0:
            raise ValueError(f"the prompt set is empty (split={split!r}, n_prompts={n_prompts}): pass n_prompts >= 1 "
                             "or a non-empty list of (prompt_ids, answer_ids) pairs")
        if w_exact and not prompts.has_answers:
            raise ValueError("w_exact != 0 needs answers: pass (prompt_ids, answer_ids) pairs or set w_exact=0")
        self.prompts = prompts

        # --- decoding settings and shapes ---------------------------------------------------------------------
        validate_generation_args([[0]], gen_length, block_length, steps, threshold, temperature, remasking)
        self.gen_length, self.block_length, self.steps = int(gen_length), int(block_length), steps
        self.threshold, self.temperature, self.remasking = threshold, float(temperature), remasking
        longest = prompts.max_prompt_length
        if max_prompt_length is None:
            max_prompt_length = -(-longest // block_length) * block_length
        if longest > max_prompt_length:
            raise ValueError(f"a prompt has {longest} tokens > max_prompt_length={max_prompt_length}: raise "
                             f"max_prompt_length to at least {-(-longest // block_length) * block_length}")
        if (max_prompt_length + gen_length) % block_length:
            fix = -(-max_prompt_length // block_length) * block_length
            raise ValueError(f"block_length={block_length} does not divide the canvas max_prompt_length + gen_length "
                             f"= {max_prompt_length} + {gen_length}: set max_prompt_length to a multiple of "
                             f"block_length (e.g. {fix})")
        canvas = max_prompt_length + gen_length
        cfg = self.model.config
        if canvas > cfg.max_sequence_length:
            raise ValueError(f"max_prompt_length + gen_length = {canvas} exceeds the model's max_sequence_length="
                             f"{cfg.max_sequence_length}: shorten max_prompt_length or gen_length")
        self.max_prompt_length = int(max_prompt_length)
        self.max_blocks = canvas // block_length
        self.n_layers = cfg.n_layers
        self.action_mode = action_mode

        self.weights = {"w_flops": float(w_flops), "w_kl": float(w_kl), "w_flip": float(w_flip),
                        "w_exact": float(w_exact), "w_agree": float(w_agree), "w_budget": float(w_budget)}
        self.use_shadow = bool(shadow)
        self.drift_cap = float(drift_cap)
        self.prompt_order = prompt_order
        self.render_mode = render_mode

        # --- spaces --------------------------------------------------------------------------------------------
        block_low = np.array([c.low for c in BLOCK_COLUMNS], np.float32)
        block_high = np.array([c.high for c in BLOCK_COLUMNS], np.float32)
        self._block_low = np.broadcast_to(block_low, (self.max_blocks, N_BLOCK_FEATURES)).copy()
        self._block_high = np.broadcast_to(block_high, (self.max_blocks, N_BLOCK_FEATURES)).copy()
        self._global_low = np.array([c.low for c in GLOBAL_COLUMNS], np.float32)
        self._global_high = np.array([c.high for c in GLOBAL_COLUMNS], np.float32)
        self.observation_space = spaces.Dict({
            "blocks": spaces.Box(self._block_low, self._block_high, dtype=np.float32),
            "block_mask": spaces.MultiBinary(self.max_blocks),
            "global": spaces.Box(self._global_low, self._global_high, dtype=np.float32),
        })
        if action_mode == "binary":
            self.action_space = spaces.MultiBinary(self.max_blocks)
        else:
            self.action_space = spaces.MultiDiscrete(np.full(self.max_blocks, self.n_layers + 1, dtype=np.int64))

        # --- episode state --------------------------------------------------------------------------------------
        self.session: DecodingSession | None = None
        self.features_: StepFeatures | None = None  # the features behind the last observation
        self.budget: float | None = None
        self.prompt_index = -1
        self._offset = 0
        self._cursor = 0
        self._shadow_step = -1
        self._reference: dict[int, torch.Tensor] = {}  # prompt index -> no-cache answer
        self.timings = _zero_timings()

    # ----------------------------------------------------------------------------------------------------------
    @property
    def track_agreement(self) -> bool:
        return self.weights["w_agree"] != 0.0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        t0 = time.perf_counter()
        options = dict(options or {})
        if seed is not None:
            self._cursor = 0
        if options.get("prompt_index") is not None:
            index = int(options["prompt_index"])
            if not 0 <= index < len(self.prompts):
                raise ValueError(f"prompt_index={index} outside [0, {len(self.prompts)})")
        elif self.prompt_order == "cycle":
            index = self._cursor % len(self.prompts)
            self._cursor += 1
        else:
            index = int(self.np_random.integers(len(self.prompts)))
        if options.get("budget") is not None:
            self.budget = _parse_budget(options["budget"])[0]
        elif self.budget_range is None:
            self.budget = None
        else:
            lo, hi = self.budget_range
            self.budget = lo if lo == hi else float(self.np_random.uniform(lo, hi))
        session_seed = int(self.np_random.integers(2**31 - 1))

        self.prompt_index = index
        item = self.prompts[index]
        self.session = DecodingSession(
            self.model, [list(item.prompt_ids)], self.gen_length, self.block_length, self.steps,
            threshold=self.threshold, temperature=self.temperature, remasking=self.remasking, seed=session_seed,
            trace_attention=True,
        )
        self._offset = self.max_blocks - self.session.n_blocks
        self._shadow_step = -1
        self.timings["reset_s"] += time.perf_counter() - t0
        obs = self._observe()
        info = {"prompt_index": index, "budget": self._budget_value(), "n_blocks": self.session.n_blocks,
                "task": item.task}
        return obs, info

    def step(self, action):
        s = self.session
        if s is None or s.done:
            raise RuntimeError("the episode is over (or was never started): call reset() first")
        t0 = time.perf_counter()
        plan = self.action_to_plan(action)
        shadow = self._shadow() if self.use_shadow else None
        positions = s.block_positions()
        masked_before = s.canvas.gather(1, positions) == s.mask_id

        t1 = time.perf_counter()
        result = s.step(plan)
        self.timings["session_step_s"] += time.perf_counter() - t1

        record = result.record
        fraction = record.flops / record.full_flops
        w = self.weights
        reward = -w["w_flops"] * fraction
        info: dict[str, Any] = {
            "prompt_index": self.prompt_index, "step": record.step, "decoding_block": record.decoding_block,
            "flops": float(record.flops), "full_flops": float(record.full_flops), "flop_fraction": float(fraction),
            "episode_flop_fraction": float(s.stats.flop_fraction), "committed": int(record.committed),
            "budget": self._budget_value(),
        }
        if shadow is not None:
            kl, flips = self._divergence(shadow, result.logits, result.committed.gather(1, positions),
                                         s.canvas.gather(1, positions), masked_before)
            flip = float(flips > 0)
            reward -= w["w_kl"] * kl + w["w_flip"] * flip
            info.update(kl=kl, flip=flip, flip_count=flips, oracle_drift=self._labels(shadow.drift))

        terminated = s.done
        if terminated:
            reward += self._final_terms(info)
        obs = self._observe()
        self.timings["env_step_s"] += time.perf_counter() - t0
        self.timings["steps"] += 1
        return obs, float(reward), terminated, False, info

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self.session is None:
            return None
        s = self.session
        generated = s.generated[0].tolist()
        shown = "".join("_" if t == s.mask_id else "#" for t in generated)
        spent = s.stats.flop_fraction if s.stats.steps else 1.0
        return f"step {s.step_index} block {s.generation_block}/{s.n_generation_blocks} flops {spent:.3f} {shown}"

    def close(self) -> None:
        self.session = None
        self.features_ = None

    # --- the bridge between actions, plans and policies ---------------------------------------------------------
    def action_to_plan(self, action: Any) -> RefreshPlan:
        """The refresh plan of an action (padded rows dropped)."""
        a = np.asarray(action.cpu() if isinstance(action, torch.Tensor) else action)
        if a.shape != (self.max_blocks,):
            raise ValueError(f"action has shape {a.shape}, expected ({self.max_blocks},) (one entry per block row)")
        real = torch.as_tensor(a[self._offset:].astype(np.int64))
        L = self.n_layers
        if self.action_mode == "binary":
            start = torch.where(real != 0, 0, L)
        else:
            start = L - real.clamp(0, L)
        return RefreshPlan(start[None, :].long())

    def plan_to_action(self, plan: RefreshPlan) -> np.ndarray:
        """The action closest to a policy's plan: per block, the shallowest start layer the plan asks for (single
        refreshed positions count for their block); binary mode refreshes a block the plan touches in any layer.
        dLLM-Cache's adaptive per-token refresh has no block-level counterpart and is dropped."""
        s = self.session
        start = plan.start_layer[0].to(torch.long).cpu().clone()
        if plan.refresh_positions is not None:
            touched = plan.refresh_positions[0].cpu().view(s.n_blocks, self.block_length).any(-1)
            start = torch.where(touched, 0, start)
        L = self.n_layers
        real = (start < L).long() if self.action_mode == "binary" else (L - start.clamp(0, L))
        action = np.zeros(self.max_blocks, dtype=self.action_space.dtype)
        action[self._offset:] = real.numpy().astype(action.dtype)
        return action

    def policy_context(self) -> StepContext:
        return StepContext.of(self.session, self.budget)

    def policy_action(self, policy: ReusePolicy) -> np.ndarray:
        """What a `ReusePolicy` would do in the current state, as an action (call policy.reset(1) per episode)."""
        features = self.features_ if policy.uses_features else None
        return self.plan_to_action(policy.plan(features, self.policy_context()))

    def oracle_labels(self) -> np.ndarray:
        """(max_blocks, n_layers) oracle drift of the current state (one shadow forward, cached for the step)."""
        return self._labels(self._shadow().drift)

    def oracle_action(self, epsilon: float) -> np.ndarray:
        """The action `OraclePolicy(epsilon, depth=action_mode == 'depth')` takes in the current state."""
        return labels_to_action(self.oracle_labels(), epsilon, self.action_mode, self.action_space.dtype)

    def reset_timings(self) -> None:
        self.timings = _zero_timings()

    # --- internals ------------------------------------------------------------------------------------------------
    def _budget_value(self) -> float:
        return 1.0 if self.budget is None else float(self.budget)

    def _observe(self) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        f = self.session.features(self.budget)
        self.features_ = f
        blocks = np.zeros((self.max_blocks, N_BLOCK_FEATURES), np.float32)
        blocks[self._offset:] = f.blocks[0].detach().cpu().numpy()
        np.clip(blocks, self._block_low, self._block_high, out=blocks)  # float rounding only: columns are in range
        mask = np.zeros(self.max_blocks, np.int8)
        mask[self._offset:] = 1
        glob = np.clip(f.global_[0].detach().cpu().numpy().astype(np.float32), self._global_low, self._global_high)
        self.timings["features_s"] += time.perf_counter() - t0
        return {"blocks": blocks, "block_mask": mask, "global": glob}

    def _shadow(self) -> ShadowForward:
        # session.shadow_forward() is cached for the step: time only the first call of a step.
        t0 = time.perf_counter()
        shadow = self.session.shadow_forward()
        if self._shadow_step != self.session.step_index:
            self._shadow_step = self.session.step_index
            self.timings["shadow_s"] += time.perf_counter() - t0
        return shadow

    def _labels(self, drift: torch.Tensor) -> np.ndarray:
        labels = np.zeros((self.max_blocks, self.n_layers), np.float32)
        d = torch.nan_to_num(drift[0].float(), nan=self.drift_cap, posinf=self.drift_cap).clamp(0, self.drift_cap)
        labels[self._offset:] = d.cpu().numpy()
        return labels

    @staticmethod
    def _divergence(shadow: ShadowForward, logits: torch.Tensor, committed: torch.Tensor, tokens: torch.Tensor,
                    masked_before: torch.Tensor) -> tuple[float, int]:
        """KL(full || cached) averaged over the block's masked positions, and the number of committed tokens that
        differ from the full recompute's greedy prediction."""
        full = shadow.logits.float().log_softmax(-1)
        cached = logits.float().log_softmax(-1)
        kl = (full.exp() * (full - cached)).sum(-1).clamp(min=0)  # (B, block_length)
        weight = masked_before.float()
        mean_kl = float((kl * weight).sum() / weight.sum().clamp(min=1))
        flips = int((committed & (tokens != shadow.logits.argmax(-1))).sum())
        return mean_kl, flips

    def _final_terms(self, info: dict[str, Any]) -> float:
        s, w = self.session, self.weights
        generated = s.generated[0].detach().cpu()
        info["generated"] = generated.numpy().astype(np.int64)
        info["episode_flops"] = float(s.stats.flops)
        info["episode_full_flops"] = float(s.stats.full_flops)
        bonus = 0.0
        if self.prompts.has_answers:
            em = float(self.prompts.exact_match(self.prompt_index, generated.tolist()))
            info["exact_match"] = em
            bonus += w["w_exact"] * em
        if self.track_agreement:
            reference = self.reference_answer(self.prompt_index)
            info["agreement"] = float((generated == reference).float().mean())
            info["agree_exact"] = float(bool((generated == reference).all()))
            bonus += w["w_agree"] * info["agreement"]
        if self.budget is not None and w["w_budget"]:
            over = max(0.0, s.stats.flop_fraction - self.budget)
            info["budget_excess"] = over
            bonus -= w["w_budget"] * over
        return bonus

    def reference_answer(self, index: int) -> torch.Tensor:
        """The no-cache answer of prompt `index` (gen_length ids), computed once with generate(policy='full')."""
        if index not in self._reference:
            from cache_core.generate import generate

            t0 = time.perf_counter()
            item = self.prompts[index]
            result = generate(self.model, [list(item.prompt_ids)], self.gen_length, self.block_length, self.steps,
                              threshold=self.threshold, temperature=self.temperature, policy="full",
                              remasking=self.remasking, seed=0)
            self._reference[index] = result.tokens[0].detach().cpu()
            self.timings["reference_s"] += time.perf_counter() - t0
        return self._reference[index]

    def describe(self) -> dict[str, Any]:
        """Settings that define the environment's data (written into shard manifests)."""
        return {
            "gen_length": self.gen_length, "block_length": self.block_length, "steps": self.steps,
            "threshold": self.threshold, "temperature": self.temperature, "remasking": self.remasking,
            "max_prompt_length": self.max_prompt_length, "max_blocks": self.max_blocks, "n_layers": self.n_layers,
            "action_mode": self.action_mode, "budget": None if self.budget_range is None else list(self.budget_range),
            "drift_cap": self.drift_cap, "prompts": self.prompts.describe(), **self.weights,
        }


def labels_to_action(oracle_drift: np.ndarray | torch.Tensor, epsilon: float, action_mode: str = "binary",
                     dtype: Any = np.int64) -> np.ndarray:
    """Oracle drift labels (..., max_blocks, n_layers) -> the oracle's action (..., max_blocks) at `epsilon`.

    The decision is `cache_core.policy.oracle_start_layer`, the function OraclePolicy itself uses: binary refreshes a
    block when some layer drifts more than epsilon; depth starts one layer below the first drifting layer (that
    layer's input must be recomputed). Padded rows (labels 0) come out as 0 = reuse.
    """
    if action_mode not in ACTION_MODES:
        raise ValueError(f"unknown action_mode {action_mode!r}; use one of {list(ACTION_MODES)}")
    drift = torch.as_tensor(np.asarray(oracle_drift, dtype=np.float32))
    L = drift.shape[-1]
    start = oracle_start_layer(drift.reshape(-1, *drift.shape[-2:]), epsilon).reshape(drift.shape[:-1])
    action = (start < L).long() if action_mode == "binary" else L - start
    return action.numpy().astype(dtype)


def _zero_timings() -> dict[str, float]:
    return {"reset_s": 0.0, "env_step_s": 0.0, "session_step_s": 0.0, "shadow_s": 0.0, "features_s": 0.0,
            "reference_s": 0.0, "steps": 0}


def _parse_budget(budget: Any) -> tuple[float, float] | None:
    """None, a fixed FLOP-fraction budget, or a [low, high] range sampled per episode; each value in (0, 1]."""
    if budget is None:
        return None
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        lo = hi = float(budget)
    else:
        try:
            values = [float(b) for b in budget]
        except TypeError as err:
            raise ValueError(f"budget must be null, a number in (0, 1] or a [low, high] range, got {budget!r}") from err
        if len(values) != 2:
            raise ValueError(f"a budget range needs exactly two values [low, high], got {budget!r}")
        lo, hi = values
        if lo > hi:
            raise ValueError(f"budget range [{lo}, {hi}] has low > high: write it as [low, high]")
    for value in (lo, hi):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"budget {value} must lie in (0, 1] (a FLOP fraction of full recompute)")
    return lo, hi


def _divisor_hint(gen_length: int, block_length: int) -> int:
    if gen_length <= 0:
        return block_length
    divisors = [d for d in range(1, gen_length + 1) if gen_length % d == 0]
    return min(divisors, key=lambda d: (abs(d - block_length), d))


def _load(model_path: str, device: str, tokenizer: Any | None) -> tuple[LLaDAModel, Any]:
    from cache_core.checkpoint import CheckpointError, load_model, load_tokenizer

    try:
        model = load_model(model_path, device=device)
    except CheckpointError as err:
        raise CheckpointError(f"{err} (the built-in model is trained with `python train.py mode=pretrain`)") from err
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(model_path)
        except CheckpointError:
            tokenizer = None
    return model, tokenizer


def register() -> None:
    """Register ENV_ID with Gymnasium (idempotent). Runs on import of this module, hence of the `envs` package."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="envs.block_reuse_env:BlockReuseEnv")


register()

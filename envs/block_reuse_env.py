"""`BlockReuseEnv`: a Gymnasium environment in which an agent decides, at every denoising step, which KV-cache blocks
of a masked-diffusion LM to recompute.

One episode = one generation of one prompt; one env step = one denoising step. The environment drives
`cache_core.session.DecodingSession`, the loop body `generate()` runs, so the observation *is* the feature tensor a
deployed policy reads (`session.features(budget)`) and the step *is* the partial forward inference runs. The env is
three parts: its settings (`envs.config.EnvConfig`, every value checked there), its reward (`envs.reward`) and this
class (spaces, episodes, the action codec `cache_core.actions` between actions and refresh plans).

    gym.make("blockreuse/BlockReuse-v0")                       # the built-in model, task-suite train prompts
    gym.make("blockreuse/BlockReuse-v0", model_path=DIR, action_mode="depth", budget=[0.1, 0.6])

Observation (`spaces.Dict`, fixed shapes):
    blocks      (max_blocks, n_block) float32            `StepFeatures.blocks` of the session, padded rows zero
    block_mask  (max_blocks,) int8 (MultiBinary)         1 for the episode's real blocks, 0 for padding
    global      (n_global,) float32                      `StepFeatures.global_` (progress, decoding block, step in
                                                         block, compute spent so far, budget)
    n_block, n_global and the columns' bounds are those of the env's feature schema, `env.schema` (TEXT_SCHEMA here;
    an env of another model family sets its own), which collection records in the shards' manifest.
    max_blocks = (max_prompt_length + gen_length) / block_length. Blocks are *left*-padded, like the session
    left-pads prompts: the episode's blocks occupy the last rows, so generation block i is always row
    max_blocks - gen_length / block_length + i whatever the prompt length.

Action (`cache_core.actions`):
    action_mode=binary: MultiBinary(max_blocks), 1 = refresh the block in every layer, 0 = reuse its cached K/V.
    action_mode=depth:  MultiDiscrete([n_layers + 1] * max_blocks), 0 = reuse, j = recompute the top j layers
                        (RefreshPlan start layer n_layers - j), n_layers = refresh all.
    An action outside the space (a wrong shape, 2 in binary mode, -1, NaN) is refused with a ValueError. Actions on
    padded rows do nothing. The cache always computes the decoding block and never-computed positions whatever the
    action says, so no action can make a step invalid.

Reward: see `envs.reward` (weights: `EnvConfig.reward`, the w_* settings).

info of a step: flops, full_flops, flop_fraction (of the step), episode_flop_fraction, kl, flip, flip_count,
committed, budget, prompt_index, and `oracle_drift` (max_blocks, n_layers) float32: the relative drift of the cached
K/V from freshly computed K/V *in the state the action was taken in* (`shadow_forward().drift`; never-computed = inf
replaced by `drift_cap`, padded rows 0). These are the supervised labels of the observation the action was chosen
on; `OraclePolicy(epsilon)`'s action in that state is `labels_to_action(labels, epsilon, action_mode)` (both go
through `cache_core.actions.oracle_actions`). The last step adds exact_match (when answers exist), agreement,
agree_exact, generated (the gen_length token ids), episode_flops, episode_full_flops and, with a budget,
budget_excess.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from cache_core import actions as codec
from cache_core.cache import RefreshPlan
from cache_core.features import TEXT_SCHEMA, FeatureSchema, StepFeatures
from cache_core.models import DiffusionModel
from cache_core.policy import ReusePolicy, StepContext, decide
from cache_core.session import DecodingSession, ShadowForward
from envs.config import EnvConfig, parse_budget
from envs.prompts import PromptSet, TaskSuitePromptSet, TokenPromptSet
from envs.reward import Reward

ENV_ID = "blockreuse/BlockReuse-v0"
ACTION_MODES = codec.ACTION_MODES


class ReuseEnvBase(gym.Env):
    """What the text and the image env share: spaces from the feature schema, the episode's prompt and budget, the
    hook of the policy that proposed an action, the oracle's labels and action, the timings. A subclass sets
    `schema`, `_decide` (its family's `decide`), `max_blocks`, `n_layers`, `action_mode`, `prompts`, `prompt_order`
    and `budget_range` (and `_offset`, the padded rows before the episode's blocks), implements `plan_to_action`,
    `_shadow` and `_labels`, and builds its session in `reset`."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def _build_spaces(self) -> None:
        schema = self.schema
        block_low = np.array([c.low for c in schema.block_columns], np.float32)
        block_high = np.array([c.high for c in schema.block_columns], np.float32)
        self._block_low = np.broadcast_to(block_low, (self.max_blocks, schema.n_block)).copy()
        self._block_high = np.broadcast_to(block_high, (self.max_blocks, schema.n_block)).copy()
        self._global_low = np.array([c.low for c in schema.global_columns], np.float32)
        self._global_high = np.array([c.high for c in schema.global_columns], np.float32)
        self.observation_space = spaces.Dict({
            "blocks": spaces.Box(self._block_low, self._block_high, dtype=np.float32),
            "block_mask": spaces.MultiBinary(self.max_blocks),
            "global": spaces.Box(self._global_low, self._global_high, dtype=np.float32),
        })
        if self.action_mode == "binary":
            self.action_space = spaces.MultiBinary(self.max_blocks)
        else:
            n = codec.n_actions(self.action_mode, self.n_layers)
            self.action_space = spaces.MultiDiscrete(np.full(self.max_blocks, n, dtype=np.int64))

    def action_to_plan(self, action: Any) -> RefreshPlan:
        """The refresh plan of an action (padded rows dropped); an action outside the space is refused."""
        shape = np.shape(action.detach().cpu() if isinstance(action, torch.Tensor) else action)
        if shape != (self.max_blocks,):
            raise ValueError(f"action has shape {shape}, expected ({self.max_blocks},) (one entry per block row)")
        a = codec.check_actions(action, self.action_mode, self.n_layers)
        real = torch.as_tensor(a[self._offset:])
        return codec.plan_from_actions(real[None, :], self.action_mode, self.n_layers)

    def close(self) -> None:
        self.session = None
        self.features_ = None

    def policy_action(self, policy: ReusePolicy) -> np.ndarray:
        """What a `ReusePolicy` would do in the current state, as an action. The policy is driven as `generate()`
        drives it (its block-start hook first; call policy.reset(1) per episode) and its `on_step_end` hook runs
        after the next `step`, whichever action that step takes."""
        plan, ctx = self._decide(policy, self.session, self.budget, features=self.features_)
        self._consulted = (policy, ctx)
        return self.plan_to_action(plan)

    def oracle_labels(self) -> np.ndarray:
        """(max_blocks, n_layers) oracle drift of the current state (one shadow forward, cached for the step)."""
        return self._labels(self._shadow().drift)

    def oracle_action(self, epsilon: float) -> np.ndarray:
        """The action `OraclePolicy(epsilon, depth=action_mode == 'depth')` takes in the current state."""
        return labels_to_action(self.oracle_labels(), epsilon, self.action_mode, self.action_space.dtype)

    def _start_episode(self, seed: int | None, options: dict[str, Any]) -> int:
        """The episode's prompt index (options' prompt_index, the cycle, or a seeded draw); sets self.budget (options'
        budget, or a draw from budget_range) and self.prompt_index."""
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
            self.budget = parse_budget(options["budget"], "reset option budget")[0]
        elif self.budget_range is None:
            self.budget = None
        else:
            lo, hi = self.budget_range
            self.budget = lo if lo == hi else float(self.np_random.uniform(lo, hi))
        self.prompt_index = index
        self._consulted = None
        return index

    def _tell_consulted(self, result: Any) -> None:
        """The policy that proposed this step's action (`policy_action`) sees what ran: its on_step_end hook."""
        if self._consulted is not None:
            policy, ctx = self._consulted
            self._consulted = None
            policy.on_step_end(ctx, result)

    def _budget_value(self) -> float:
        return 1.0 if self.budget is None else float(self.budget)

    def reset_timings(self) -> None:
        self.timings = _zero_timings()


class BlockReuseEnv(ReuseEnvBase):
    """Per-block KV-cache reuse decisions of a masked-diffusion LM, one denoising step per env step.

    model: a loaded `DiffusionModel` (else `model_path` is loaded); prompts: a `PromptSet` or (prompt_ids,
    answer_ids) pairs (else the task suite's `split`); tokenizer: encodes the task suite (else the checkpoint's);
    config: an `EnvConfig`, or its fields as keyword settings (the reward weights as w_* keys).
    """

    schema: FeatureSchema = TEXT_SCHEMA  # the observation's columns; a subclass for another model family overrides it
    _decide = staticmethod(decide)  # how a policy is asked for a plan on this family's session

    def __init__(self, model: DiffusionModel | None = None, prompts: PromptSet | Sequence[Any] | None = None, *,
                 tokenizer: Any | None = None, config: EnvConfig | None = None, render_mode: str | None = None,
                 **settings: Any):
        super().__init__()
        if config is not None and settings:
            raise ValueError(f"pass either config= or keyword settings, not both (got {sorted(settings)})")
        self.config = cfg = config if config is not None else EnvConfig.from_settings(**settings)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}; use one of {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.model, tokenizer = _model_and_tokenizer(model, tokenizer, cfg)
        self.prompts = _prompt_set(prompts, tokenizer, cfg)
        self.reward_fn = Reward(cfg.reward)

        # Decoding settings, read by callers as env attributes (they are the config's).
        self.gen_length, self.block_length, self.steps = cfg.gen_length, cfg.block_length, cfg.steps
        self.threshold, self.temperature, self.remasking = cfg.threshold, float(cfg.temperature), cfg.remasking
        self.action_mode, self.budget_range, self.drift_cap = cfg.action_mode, cfg.budget_range, float(cfg.drift_cap)
        self.use_shadow, self.prompt_order = cfg.shadow, cfg.prompt_order
        self.n_layers = self.model.facts.n_layers
        self.settings = cfg.setting_list
        self.setting_index = 0
        self.max_prompt_length = _max_prompt_length(self.prompts, cfg, self.model.facts.max_sequence_length)
        # Sized for every setting: the smallest decoding block over the largest canvas.
        self.max_blocks = max((self.max_prompt_length + s["gen_length"]) // s["block_length"] for s in self.settings)
        self._build_spaces()

        self.session: DecodingSession | None = None
        self.features_: StepFeatures | None = None  # the features behind the last observation
        self.budget: float | None = None
        self.prompt_index = -1
        self._offset = 0
        self._cursor = 0
        self._shadow_step = -1
        self._consulted: tuple[ReusePolicy, StepContext] | None = None  # the policy asked for this step's action
        self._reference: dict[tuple[int, int], torch.Tensor] = {}  # (prompt, setting) -> no-cache answer
        self.timings = _zero_timings()

    # ----------------------------------------------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, float]:
        return self.config.reward.as_dict()

    @property
    def track_agreement(self) -> bool:
        return self.reward_fn.tracks_agreement

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        t0 = time.perf_counter()
        options = dict(options or {})
        index = self._start_episode(seed, options)
        self._use_setting(options.get("setting"))
        session_seed = int(self.np_random.integers(2**31 - 1))

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
                "task": item.task, "setting": self.setting_index}
        return obs, info

    def _use_setting(self, requested: Any) -> None:
        """The episode's decoding setting: options' `setting` index, else a seeded draw when there are several."""
        if requested is not None:
            index = int(requested)
            if not 0 <= index < len(self.settings):
                raise ValueError(f"setting={index} outside [0, {len(self.settings)}) (env.decode_settings has "
                                 f"{len(self.settings)} entries)")
        else:
            index = int(self.np_random.integers(len(self.settings))) if len(self.settings) > 1 else 0
        self.setting_index = index
        s = self.settings[index]
        self.gen_length, self.block_length, self.steps, self.threshold = (
            s["gen_length"], s["block_length"], s["steps"], s["threshold"])

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
        self._tell_consulted(result)

        record = result.record
        info: dict[str, Any] = {
            "prompt_index": self.prompt_index, "step": record.step, "decoding_block": record.decoding_block,
            "flops": float(record.flops), "full_flops": float(record.full_flops),
            "episode_flop_fraction": float(s.stats.flop_fraction), "committed": int(record.committed),
            "budget": self._budget_value(),
        }
        reward = self.reward_fn.step(s, result, shadow, positions, masked_before, info)
        if shadow is not None:
            info["oracle_drift"] = self._labels(shadow.drift)

        terminated = s.done
        if terminated:
            generated = s.generated[0].detach().cpu()
            info.update(generated=generated.numpy().astype(np.int64), episode_flops=float(s.stats.flops),
                        episode_full_flops=float(s.stats.full_flops))
            reward += self.reward_fn.final(s, self.prompts, self.prompt_index, self.budget, self.reference_answer,
                                           info)
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

    # --- the bridge between actions, plans and policies (cache_core.actions) ----------------------------------------
    def plan_to_action(self, plan: RefreshPlan) -> np.ndarray:
        """The action closest to a policy's plan (`cache_core.actions.actions_from_plan`), padded rows 0."""
        real = codec.actions_from_plan(plan, self.block_length, self.action_mode, self.n_layers)[0]
        action = np.zeros(self.max_blocks, dtype=self.action_space.dtype)
        action[self._offset:] = real.numpy().astype(action.dtype)
        return action

    def policy_context(self) -> StepContext:
        return StepContext.of(self.session, self.budget)

    def reference_answer(self, index: int) -> torch.Tensor:
        """The no-cache answer of prompt `index` (gen_length ids), computed once with generate(policy='full')."""
        key = (index, self.setting_index)
        if key not in self._reference:
            from cache_core.generate import generate

            t0 = time.perf_counter()
            item = self.prompts[index]
            result = generate(self.model, [list(item.prompt_ids)], self.gen_length, self.block_length, self.steps,
                              threshold=self.threshold, temperature=self.temperature, policy="full",
                              remasking=self.remasking, seed=0)
            self._reference[key] = result.tokens[0].detach().cpu()
            self.timings["reference_s"] += time.perf_counter() - t0
        return self._reference[key]

    def describe(self) -> dict[str, Any]:
        """Settings that define the environment's data (written into shard manifests)."""
        return {
            "gen_length": self.gen_length, "block_length": self.block_length, "steps": self.steps,
            "threshold": self.threshold, "temperature": self.temperature, "remasking": self.remasking,
            "max_prompt_length": self.max_prompt_length, "max_blocks": self.max_blocks, "n_layers": self.n_layers,
            "action_mode": self.action_mode, "budget": None if self.budget_range is None else list(self.budget_range),
            "drift_cap": self.drift_cap, "prompts": self.prompts.describe(), **self.weights,
            **({"settings": self.settings} if len(self.settings) > 1 else {}),
        }

    # --- internals ------------------------------------------------------------------------------------------------
    def _observe(self) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        f = self.session.features(self.budget)
        self.features_ = f
        blocks = np.zeros((self.max_blocks, self.schema.n_block), np.float32)
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


def labels_to_action(oracle_drift: np.ndarray | torch.Tensor, epsilon: float, action_mode: str = "binary",
                     dtype: Any = np.int64) -> np.ndarray:
    """Oracle drift labels (..., max_blocks, n_layers) -> the oracle's action (..., max_blocks) at `epsilon`
    (`cache_core.actions.oracle_actions`, what OraclePolicy decides). Padded rows (labels 0) come out as 0 = reuse."""
    codec.check_action_mode(action_mode)
    drift = torch.as_tensor(np.asarray(oracle_drift, dtype=np.float32))
    return codec.oracle_actions(drift, epsilon, action_mode).numpy().astype(dtype)


def _zero_timings() -> dict[str, float]:
    return {"reset_s": 0.0, "env_step_s": 0.0, "session_step_s": 0.0, "shadow_s": 0.0, "features_s": 0.0,
            "reference_s": 0.0, "steps": 0}


def _model_and_tokenizer(model: DiffusionModel | None, tokenizer: Any, cfg: EnvConfig) -> tuple[DiffusionModel, Any]:
    if model is not None:
        return model.eval(), tokenizer
    if cfg.model_path is None:
        raise ValueError("pass a model (a DiffusionModel) or model_path (a checkpoint directory)")
    from cache_core.checkpoint import CheckpointError, load_model, load_tokenizer

    try:
        model = load_model(cfg.model_path, device=cfg.device)
    except CheckpointError as err:
        raise CheckpointError(f"{err} (the built-in model is trained with `python train.py mode=pretrain`)") from err
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(cfg.model_path)
        except CheckpointError:
            tokenizer = None
    return model.eval(), tokenizer


def _prompt_set(prompts: PromptSet | Sequence[Any] | None, tokenizer: Any, cfg: EnvConfig) -> PromptSet:
    if prompts is None:
        if tokenizer is None:
            raise ValueError("no prompts given and no tokenizer to encode the task suite: pass prompts="
                             "[(prompt_ids, answer_ids), ...] or a model_path whose checkpoint has tokenizer.json")
        prompts = TaskSuitePromptSet(tokenizer, split=cfg.split, n=cfg.n_prompts, tasks=cfg.tasks, seed=cfg.task_seed,
                                     task_file=cfg.task_file)
    elif not isinstance(prompts, PromptSet):
        eos_id = cfg.eos_id if cfg.eos_id is not None or tokenizer is None else tokenizer.eos_token_id
        prompts = TokenPromptSet(list(prompts), eos_id=eos_id, split=cfg.split)
    if len(prompts) == 0:
        raise ValueError(f"the prompt set is empty (env.split={cfg.split!r}, env.n_prompts={cfg.n_prompts}): pass "
                         "n_prompts >= 1 or a non-empty list of (prompt_ids, answer_ids) pairs")
    if cfg.reward.w_exact and not prompts.has_answers:
        raise ValueError("env.w_exact != 0 needs answers: pass (prompt_ids, answer_ids) pairs or set w_exact=0")
    return prompts


def _max_prompt_length(prompts: PromptSet, cfg: EnvConfig, max_sequence_length: int) -> int:
    """The padded prompt length that fixes the observation's block count, checked against the prompts and model."""
    # Every setting's block must divide the padded prompt: round up to their least common multiple.
    longest, bl = prompts.max_prompt_length, math.lcm(*(s["block_length"] for s in cfg.setting_list))
    need = -(-longest // bl) * bl
    max_prompt_length = need if cfg.max_prompt_length is None else cfg.max_prompt_length
    if longest > max_prompt_length:
        raise ValueError(f"a prompt has {longest} tokens > env.max_prompt_length={max_prompt_length}: raise "
                         f"max_prompt_length to at least {need}")
    if (max_prompt_length + cfg.gen_length) % cfg.block_length or max_prompt_length % bl:
        raise ValueError(f"env.block_length={cfg.block_length} (and every env.decode_settings block length) must "
                         "divide "
                         f"env.max_prompt_length={max_prompt_length}: set it to a multiple of block_length (e.g. "
                         f"{-(-max_prompt_length // bl) * bl})")
    canvas = max_prompt_length + max(s["gen_length"] for s in cfg.setting_list)
    if canvas > max_sequence_length:
        raise ValueError(f"max_prompt_length + gen_length = {canvas} exceeds the model's max_sequence_length="
                         f"{max_sequence_length}: shorten env.max_prompt_length or env.gen_length")
    return int(max_prompt_length)


def register() -> None:
    """Register ENV_ID with Gymnasium (idempotent). Runs on import of this module, hence of the `envs` package."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="envs.block_reuse_env:BlockReuseEnv")


register()

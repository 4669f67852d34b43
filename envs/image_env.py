"""`ImageReuseEnv`: the Gymnasium environment of the image family: per-block reuse decisions of a DiT's block cache,
one denoising step per env step, one image per episode (registered as `blockreuse/ImageReuse-v0`).

It has the text env's shape and contract (`envs.block_reuse_env`), so collection, supervised training, RL and
evaluation run on it unchanged: the observation is the session's `StepFeatures` under the image schema
(`cache_core.image.features.IMAGE_SCHEMA`, `env.schema`), the action goes through the one codec
(`cache_core.actions`), the step is `DenoisingSession.step`, the session `sample_images` drives.

    blocks (n_blocks, IMAGE_SCHEMA.n_block) float32, block_mask (n_blocks,) int8 (all 1: images have no padding),
    global (IMAGE_SCHEMA.n_global,) float32
    action: binary MultiBinary(n_blocks) (1 = recompute the band of tokens in every layer, 0 = add its cached
    updates) | depth MultiDiscrete([n_layers + 1] * n_blocks) (j = recompute the top j layers).

An episode's "prompt" is a (class label, noise seed) item of a fixed set (`ImagePromptSet`: classes round robin, seeds
from `task_seed`, the split named in the seed so that train and test noise never coincide). Reward per step:
- w_flops * FLOP fraction - w_error * ||eps_cached - eps_full|| / ||eps_full|| (against a full forward of the same
x_t); at the end + w_psnr * min(PSNR against the uncached sample from the same noise, 40 dB) / 40
- w_budget * max(0, episode FLOP fraction - budget). info has the text env's keys: flops, full_flops,
flop_fraction, episode_flop_fraction, `kl` (here: the relative eps error, the image's divergence), `flip` (0: no
tokens are committed), budget, prompt_index and `oracle_drift` (n_blocks, n_layers): relative L2 distance of each
block's cached residual update from the fresh one in the state the action was taken in; the last step adds psnr,
agreement (= 1 - relative image error against the uncached sample, in [0, 1]) and episode_flops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from cache_core import actions as codec
from cache_core import validate as v
from cache_core.cache import RefreshPlan
from cache_core.features import StepFeatures
from cache_core.image.features import IMAGE_SCHEMA
from cache_core.image.metrics import psnr
from cache_core.image.sample import decide, sample_images
from cache_core.image.session import DenoisingSession, ImageShadow, initial_noise, relative_error
from cache_core.policy import ReusePolicy
from envs.block_reuse_env import ReuseEnvBase, _zero_timings
from envs.config import parse_budget

IMAGE_ENV_ID = "blockreuse/ImageReuse-v0"
IMAGE_SPLITS = ("train", "validation", "test")


@dataclass
class ImageEnvConfig:
    """What one image episode is. Every field is a keyword setting of `ImageReuseEnv` and a key of `env=dit`."""

    model_path: str | None = None  # a DiT checkpoint directory (default: the built-in one)
    split: str = "train"  # names the noise stream: train, validation and test episodes never share noise
    n_prompts: int = 64  # (label, seed) items: classes round robin
    task_seed: int = 0
    prompt_order: str = "random"
    steps: int = 25  # DDIM steps
    block_length: int = 8  # patch tokens per cache block
    action_mode: str = "binary"
    budget: Any = None
    w_flops: float = 0.04  # ~1/steps: a whole episode of full compute costs ~1
    w_error: float = 2.0
    w_psnr: float = 1.0
    w_budget: float = 2.0
    shadow: bool = True
    drift_cap: float = 1e3
    device: str = "cpu"

    def __post_init__(self) -> None:
        p = "env."
        v.text(p + "model_path", self.model_path, optional=True)
        v.choice(p + "split", self.split, IMAGE_SPLITS)
        v.choice(p + "action_mode", self.action_mode, codec.ACTION_MODES)
        v.choice(p + "prompt_order", self.prompt_order, ("random", "cycle"))
        v.number(p + "n_prompts", self.n_prompts, integer=True, low=1)
        v.number(p + "task_seed", self.task_seed, integer=True)
        v.number(p + "steps", self.steps, integer=True, low=1)
        v.number(p + "block_length", self.block_length, integer=True, low=1)
        v.number(p + "drift_cap", self.drift_cap, low=0.0, open_low=True)
        v.flag(p + "shadow", self.shadow)
        for key in ("w_flops", "w_error", "w_psnr", "w_budget"):
            v.number(p + key, getattr(self, key))
        self.budget_range = parse_budget(self.budget, "env.budget")
        if not self.shadow and self.w_error:
            raise ValueError("env.w_error needs the shadow forward (env.shadow=true), or set env.w_error=0")

    @classmethod
    def from_settings(cls, **settings: Any) -> ImageEnvConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown image env settings {unknown}; known: {sorted(known)}")
        return cls(**settings)

    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ImageItem:
    label: int
    seed: int
    task: str


class ImagePromptSet:
    """n (class label, noise seed) items of a split: labels round robin over the classes, seeds from (split, seed)."""

    has_answers = False

    def __init__(self, n: int, n_classes: int, split: str = "train", seed: int = 0):
        self.split = split
        stream = np.random.SeedSequence([seed, IMAGE_SPLITS.index(split) if split in IMAGE_SPLITS else 99])
        seeds = stream.generate_state(n, dtype=np.uint32)
        self.items = [ImageItem(i % n_classes, int(s), f"class {i % n_classes}") for i, s in enumerate(seeds)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ImageItem:
        return self.items[index]

    def describe(self) -> dict[str, Any]:
        return {"source": "ImagePromptSet", "split": self.split, "size": len(self)}


class ImageReuseEnv(ReuseEnvBase):
    """Per-block reuse decisions of a DiT's block cache, one DDIM step per env step (see the module docstring)."""

    schema = IMAGE_SCHEMA
    _decide = staticmethod(decide)

    def __init__(self, model: Any = None, *, config: ImageEnvConfig | None = None, render_mode: str | None = None,
                 **settings: Any):
        super().__init__()
        if config is not None and settings:
            raise ValueError(f"pass either config= or keyword settings, not both (got {sorted(settings)})")
        self.config = cfg = config if config is not None else ImageEnvConfig.from_settings(**settings)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}; use one of {self.metadata['render_modes']}")
        self.render_mode = render_mode
        if model is None:
            from cache_core.bench import REPO_ROOT
            from cache_core.checkpoint import load_model

            model = load_model(cfg.model_path or REPO_ROOT / "checkpoints" / "dit", device=cfg.device)
        if model.modality != "image":
            raise ValueError(f"{type(model).__name__} is not an image diffusion model; use BlockReuseEnv for text")
        self.model = model.eval()
        self.prompts = ImagePromptSet(cfg.n_prompts, model.config.n_classes, cfg.split, cfg.task_seed)
        self.steps, self.block_length, self.action_mode = cfg.steps, cfg.block_length, cfg.action_mode
        self.budget_range, self.drift_cap, self.use_shadow = cfg.budget_range, float(cfg.drift_cap), cfg.shadow
        self.prompt_order = cfg.prompt_order
        self.n_layers = model.config.n_layers
        n_tokens = model.config.n_tokens
        if n_tokens % cfg.block_length:
            raise ValueError(f"env.block_length={cfg.block_length} must divide the DiT's {n_tokens} patch tokens")
        self.max_blocks = n_tokens // cfg.block_length
        self._build_spaces()
        self.session: DenoisingSession | None = None
        self.features_: StepFeatures | None = None
        self.budget: float | None = None
        self.prompt_index = -1
        self._cursor = 0
        self._offset = 0  # images have no padded block rows
        self._consulted: tuple[ReusePolicy, Any] | None = None
        self._reference: dict[int, torch.Tensor] = {}
        self.timings = _zero_timings()

    # ----------------------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        t0 = time.perf_counter()
        index = self._start_episode(seed, dict(options or {}))
        item = self.prompts[index]
        self.session = DenoisingSession(self.model, [item.label], self.steps, block_size=self.block_length,
                                        seed=item.seed)
        self.timings["reset_s"] += time.perf_counter() - t0
        info = {"prompt_index": index, "budget": self._budget_value(), "n_blocks": self.max_blocks, "task": item.task}
        return self._observe(), info

    def step(self, action):
        s = self.session
        if s is None or s.done:
            raise RuntimeError("the episode is over (or was never started): call reset() first")
        t0 = time.perf_counter()
        plan = self.action_to_plan(action)
        shadow = self._shadow() if self.use_shadow else None
        labels = None if shadow is None else self._labels(shadow.drift)
        t1 = time.perf_counter()
        result = s.step(plan)
        self.timings["session_step_s"] += time.perf_counter() - t1
        self._tell_consulted(result)
        record, w = result.record, self.config
        fraction = record.flops / record.full_flops
        info: dict[str, Any] = {
            "prompt_index": self.prompt_index, "step": record.step, "flops": float(record.flops),
            "full_flops": float(record.full_flops), "flop_fraction": float(fraction),
            "episode_flop_fraction": float(s.stats.flop_fraction), "budget": self._budget_value(), "flip": 0.0,
        }
        reward = -w.w_flops * fraction
        if shadow is not None:
            error = float(relative_error(result.eps, shadow.eps)[0])
            info["kl"] = error
            reward -= w.w_error * error
            info["oracle_drift"] = labels
        terminated = s.done
        if terminated:
            reference = self.reference_image(self.prompt_index)
            value = float(psnr(s.images, reference[None])[0])
            info.update(psnr=value, agreement=float(1 - relative_error(s.images, reference[None]).clamp(max=1)[0]),
                        episode_flops=float(s.stats.flops), episode_full_flops=float(s.stats.full_flops))
            reward += w.w_psnr * min(value, 40.0) / 40.0
            if self.budget is not None and w.w_budget:
                over = max(0.0, s.stats.flop_fraction - self.budget)
                info["budget_excess"] = over
                reward -= w.w_budget * over
        obs = self._observe()
        self.timings["env_step_s"] += time.perf_counter() - t0
        self.timings["steps"] += 1
        return obs, float(reward), terminated, False, info

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self.session is None:
            return None
        s = self.session
        spent = s.stats.flop_fraction if s.stats.steps else 1.0
        return f"step {s.step_index}/{s.n_steps} t={s.timestep} flops {spent:.3f}"

    # --- the bridge between actions, plans and policies ------------------------------------------------------------
    def plan_to_action(self, plan: RefreshPlan) -> np.ndarray:
        """The action closest to a policy's plan: a per-layer plan (layer_mask) becomes, per block, the recompute of
        the top layers from the shallowest one it runs (depth) or a refresh if it runs any layer (binary)."""
        if plan.layer_mask is not None:
            mask = plan.layer_mask.bool().cpu()
            layers = torch.arange(self.n_layers)
            start = torch.where(mask, layers, self.n_layers).min(-1).values
            plan = RefreshPlan(start.long())
        real = codec.actions_from_start(plan.start_layer.cpu(), self.action_mode, self.n_layers)[0]
        return real.numpy().astype(self.action_space.dtype)

    def reference_image(self, index: int) -> torch.Tensor:
        """The uncached sample of item `index` (C, H, W), computed once."""
        if index not in self._reference:
            t0 = time.perf_counter()
            item = self.prompts[index]
            result = sample_images(self.model, [item.label], self.steps, policy="full", block_size=self.block_length,
                                   seed=item.seed)
            self._reference[index] = result.images[0].detach().cpu()
            self.timings["reference_s"] += time.perf_counter() - t0
        return self._reference[index]

    def evaluate_exported(self, path: str, budgets: list[float | None], batch_size: int,
                          references: Any = None) -> dict[str, Any]:
        """The RL evaluation of an exported policy on every item of this env (`policies.rl_callbacks.
        evaluate_exported`'s image side): per budget, exact_match = NaN (images have no answers), agreement = mean
        min(PSNR against the uncached sample, 40 dB) / 40, flop_fraction."""
        labels = [it.label for it in self.prompts.items]
        noise = torch.cat([initial_noise(self.model, 1, it.seed) for it in self.prompts.items])

        def run_all(policy: Any, budget: float | None) -> tuple[torch.Tensor, float]:
            images, flops, full = [], 0.0, 0.0
            for i in range(0, len(labels), batch_size):
                result = sample_images(self.model, labels[i:i + batch_size], self.steps, policy=policy,
                                       block_size=self.block_length, noise=noise[i:i + batch_size], budget=budget)
                images.append(result.images)
                flops += result.stats.flops
                full += result.stats.full_flops
            return torch.cat(images), flops / full

        if references is None:
            references, _ = run_all("full", None)
        rows = []
        for budget in budgets:
            images, fraction = run_all(str(path), budget)
            score = float((psnr(images, references).clamp(max=40.0) / 40.0).mean())
            rows.append({"budget": budget, "exact_match": float("nan"), "agreement": score, "flop_fraction": fraction})
        return {"budgets": rows, "references": references}

    def describe(self) -> dict[str, Any]:
        return {"family": "image", "steps": self.steps, "block_length": self.block_length, "n_layers": self.n_layers,
                "max_blocks": self.max_blocks, "action_mode": self.action_mode,
                "budget": None if self.budget_range is None else list(self.budget_range), "drift_cap": self.drift_cap,
                "prompts": self.prompts.describe(),
                **{k: getattr(self.config, k) for k in ("w_flops", "w_error", "w_psnr", "w_budget")}}

    # --- internals ------------------------------------------------------------------------------------------------
    def _observe(self) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        f = self.session.features(self.budget)
        self.features_ = f
        blocks = np.clip(f.blocks[0].detach().cpu().numpy().astype(np.float32), self._block_low, self._block_high)
        glob = np.clip(f.global_[0].detach().cpu().numpy().astype(np.float32), self._global_low, self._global_high)
        self.timings["features_s"] += time.perf_counter() - t0
        return {"blocks": blocks, "block_mask": np.ones(self.max_blocks, np.int8), "global": glob}

    def _shadow(self) -> ImageShadow:
        t0 = time.perf_counter()
        shadow = self.session.shadow_forward()
        self.timings["shadow_s"] += time.perf_counter() - t0
        return shadow

    def _labels(self, drift: torch.Tensor) -> np.ndarray:
        d = torch.nan_to_num(drift[0].float(), nan=self.drift_cap, posinf=self.drift_cap).clamp(0, self.drift_cap)
        return d.cpu().numpy().astype(np.float32)


def register() -> None:
    if IMAGE_ENV_ID not in gym.registry:
        gym.register(id=IMAGE_ENV_ID, entry_point="envs.image_env:ImageReuseEnv")


register()

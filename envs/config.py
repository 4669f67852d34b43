"""Typed settings of the environment and of the envs jobs, each value checked in one place.

- `EnvConfig`: what an episode is. `BlockReuseEnv(**settings)`, `gym.make(ENV_ID, **settings)` and Hydra's `env`
  group all end here, so a wrong value is refused with its key whichever way the env was built. Its defaults are the
  env's own (a Gymnasium env must work from its id alone: `gym.make(ENV_ID)` runs the built-in model); the `env`
  config group sets what a job takes from other groups and the project's training prompts, and leaves the rest to
  these defaults (the one exception to "defaults in YAML only").
- `CollectConfig` (`collect` group) and `EnvBenchmarkConfig` (`env_benchmark` group): their defaults are in YAML
  only (`conf/<group>/default.yaml`); these classes type and check them (registered with Hydra's ConfigStore by
  `policies.config.register_configs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING

from cache_core import validate as v
from cache_core.actions import ACTION_MODES
from cache_core.bench import BUILTIN_MODEL
from cache_core.bench.tasks import BUILTIN_TASKS, SPLITS
from cache_core.registry import check_policy_name
from cache_core.session import validate_generation_args

PROMPT_ORDERS = ("random", "cycle")
SETTING_KEYS = ("gen_length", "block_length", "steps", "threshold")  # what env.decode_settings entries may override
BACKENDS = ("local", "ray")
RANDOM_SCOPES = ("step", "episode")


def apply_setting(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A decoding setting with `override` applied; a threshold entry decodes by confidence, so it drops the base's step
    count unless it names one (env.decode_settings, evaluate.settings)."""
    setting = {**base, **override}
    if override.get("threshold") is not None and "steps" not in override:
        setting["steps"] = None
    return setting


def parse_budget(budget: Any, key: str = "budget") -> tuple[float, float] | None:
    """None, a fixed FLOP-fraction budget, or a [low, high] range sampled per episode; each value in (0, 1]."""
    if budget is None:
        return None
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        lo = hi = float(budget)
    else:
        try:
            values = [float(b) for b in budget]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{key} must be null, a number in (0, 1] or a [low, high] range, got {budget!r}") from err
        if len(values) != 2:
            raise ValueError(f"{key}: a budget range needs exactly two values [low, high], got {budget!r}")
        lo, hi = values
        if lo > hi:
            raise ValueError(f"{key} range [{lo}, {hi}] has low > high: write it as [low, high]")
    for value in (lo, hi):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{key}: budget {value} must lie in (0, 1] (a FLOP fraction of full recompute)")
    return lo, hi


@dataclass(frozen=True)
class RewardWeights:
    """Reward = - w_flops * step FLOP fraction - w_kl * KL(full || cached) - w_flip * 1[committed token != full's]
    and, at the end, + w_exact * exact match + w_agree * agreement with the no-cache answer
    - w_budget * max(0, episode FLOP fraction - budget)."""

    w_flops: float
    w_kl: float
    w_flip: float
    w_exact: float
    w_agree: float
    w_budget: float

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


REWARD_KEYS = tuple(f.name for f in fields(RewardWeights))


@dataclass
class EnvConfig:
    """What one episode is: the model, where prompts come from, how it decodes, what an action means, the reward.
    Every field is a keyword setting of `BlockReuseEnv` / `gym.make(ENV_ID, ...)` and a key of the `env` group."""

    model_path: str | None = str(BUILTIN_MODEL)  # checkpoint directory; ignored when a model object is passed
    split: str = "train"  # task-suite split of the prompts
    n_prompts: int = 64  # first n examples of the split
    tasks: list[str] = field(default_factory=lambda: list(BUILTIN_TASKS))  # task-suite tasks
    task_seed: int = 0
    task_file: dict[str, Any] | None = None  # the task group's settings when prompts come from a file (task=file)
    prompt_order: str = "random"  # random: drawn per reset from the env's seeded rng | cycle: in order
    gen_length: int = 64
    block_length: int = 16
    steps: int | None = 64
    threshold: float | None = None
    temperature: float = 0.0
    remasking: str = "low_confidence"
    max_prompt_length: int | None = None  # fixes the observation: max_blocks = (this + gen_length) / block_length
    action_mode: str = "binary"  # binary: MultiBinary (1 = refresh) | depth: MultiDiscrete, j = recompute top j layers
    budget: Any = None  # None | a FLOP fraction in (0, 1] | [low, high] sampled per episode (observation `budget`)
    # Decoding settings drawn per episode (one policy for every setting): a list of overrides of gen_length /
    # block_length / steps / threshold, e.g. [{block_length: 8}, {steps: null, threshold: 0.9}]; null = the one setting
    # above. The observation is sized for the smallest block length and the largest canvas.
    decode_settings: list[dict[str, Any]] | None = None
    # Reward weights (envs.reward): per step - w_flops * FLOP fraction - w_kl * KL - w_flip * flip; at the end
    # + w_exact * exact match + w_agree * agreement with no-cache - w_budget * budget overshoot.
    w_flops: float = 0.02  # ~1/steps: a whole episode of full recompute costs ~1.3 (64 steps)
    w_kl: float = 0.5
    w_flip: float = 0.5
    w_exact: float = 1.0
    w_agree: float = 1.0
    w_budget: float = 2.0
    shadow: bool = True  # full recompute next to the cache every step: KL/flip reward and oracle labels
    drift_cap: float = 1e3  # oracle_drift value of never-computed blocks (inf)
    device: str = "cpu"
    eos_id: int | None = None  # for (prompt_ids, answer_ids) prompts: generated ids are cut at EOS before matching

    def __post_init__(self) -> None:
        p = "env."
        v.text(p + "model_path", self.model_path, optional=True)
        v.text(p + "split", self.split)
        v.choice(p + "action_mode", self.action_mode, ACTION_MODES)
        v.choice(p + "prompt_order", self.prompt_order, PROMPT_ORDERS)
        v.number(p + "n_prompts", self.n_prompts, integer=True, low=1)
        v.number(p + "task_seed", self.task_seed, integer=True)
        v.number(p + "gen_length", self.gen_length, integer=True, low=1)
        v.number(p + "block_length", self.block_length, integer=True, low=1)
        v.number(p + "steps", self.steps, integer=True, low=1, optional=True)
        v.number(p + "threshold", self.threshold, optional=True)
        v.number(p + "temperature", self.temperature, low=0.0)
        v.number(p + "max_prompt_length", self.max_prompt_length, integer=True, low=1, optional=True)
        v.number(p + "drift_cap", self.drift_cap, low=0.0, open_low=True)
        v.number(p + "eos_id", self.eos_id, integer=True, low=0, optional=True)
        v.flag(p + "shadow", self.shadow)
        for key in REWARD_KEYS:
            v.number(p + key, getattr(self, key))
        if isinstance(self.tasks, str) or not self.tasks or not all(isinstance(t, str) for t in self.tasks):
            raise ValueError(f"env.tasks={self.tasks!r} must be a non-empty list of task names")
        if self.gen_length % self.block_length:
            divisors = [d for d in range(1, self.gen_length + 1) if self.gen_length % d == 0]
            hint = min(divisors, key=lambda d: (abs(d - self.block_length), d))
            raise ValueError(f"env.block_length={self.block_length} must divide env.gen_length={self.gen_length}: "
                             f"pick a divisor of gen_length (e.g. {hint})")
        try:
            validate_generation_args([[0]], self.gen_length, self.block_length, self.steps, self.threshold,
                                     self.temperature, self.remasking)
        except ValueError as err:
            raise ValueError(f"env: {err}") from None
        self.budget_range = parse_budget(self.budget, "env.budget")
        self.setting_list = self._settings()
        if not self.shadow and (self.w_kl or self.w_flip):
            raise ValueError("env.shadow=false removes the full-recompute reference, so env.w_kl and env.w_flip must "
                             "be 0 (or set env.shadow=true)")

    def _settings(self) -> list[dict[str, Any]]:
        """Every per-episode decoding setting, complete (gen_length, block_length, steps, threshold) and checked."""
        base = {"gen_length": self.gen_length, "block_length": self.block_length, "steps": self.steps,
                "threshold": self.threshold}
        if self.decode_settings is None:
            return [base]
        if isinstance(self.decode_settings, (str, dict)) or not self.decode_settings:
            raise ValueError(f"env.decode_settings={self.decode_settings!r} must be null or a non-empty list of "
                             "setting overrides, "
                             "e.g. [{block_length: 8}, {steps: null, threshold: 0.9}]")
        out = []
        for i, override in enumerate(self.decode_settings):
            override = dict(override) if hasattr(override, "items") else override
            if not isinstance(override, dict) or set(override) - set(SETTING_KEYS):
                raise ValueError(f"env.decode_settings[{i}]={override!r}: each entry overrides some of "
                                 f"{list(SETTING_KEYS)}")
            setting = apply_setting(base, override)
            try:
                validate_generation_args([[0]], setting["gen_length"], setting["block_length"], setting["steps"],
                                         setting["threshold"], self.temperature, self.remasking)
            except ValueError as err:
                raise ValueError(f"env.decode_settings[{i}]: {err}") from None
            out.append(setting)
        return out

    @property
    def reward(self) -> RewardWeights:
        return RewardWeights(**{k: float(getattr(self, k)) for k in REWARD_KEYS})

    @classmethod
    def from_settings(cls, **settings: Any) -> EnvConfig:
        """The config of keyword settings; an unknown key is refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown env settings {unknown}; known: {sorted(known)}")
        return cls(**settings)

    def settings(self) -> dict[str, Any]:
        """The keyword settings (inverse of `from_settings`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class BehaviourEntry:
    """One component of the collection's behaviour mixture: a policy, its knob values (one drawn per episode),
    fixed knobs, and its weight."""

    name: str = MISSING
    values: list[Any] | None = None  # knob values; null: the policy's default (or a policy without a knob)
    knobs: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0


@dataclass
class BehaviourConfig:
    random_prob: float = MISSING  # probability of a random action instead of the episode policy's
    random_scope: str = MISSING  # step: per step | episode: whole random episodes
    policies: list[BehaviourEntry] = MISSING

    def __post_init__(self) -> None:
        v.fraction("collect.behaviour.random_prob", self.random_prob, open_low=False)
        v.choice("collect.behaviour.random_scope", self.random_scope, RANDOM_SCOPES)
        for i, entry in enumerate(self.policies):
            check_policy_name(f"collect.behaviour.policies[{i}].name", entry.name)
            v.number(f"collect.behaviour.policies[{i}].weight", entry.weight, low=0.0)
        if not self.policies and self.random_prob < 1.0:
            raise ValueError("collect.behaviour.policies is empty: list at least one policy or set "
                             "collect.behaviour.random_prob=1")
        if self.policies and sum(e.weight for e in self.policies) <= 0:
            raise ValueError("collect.behaviour.policies: the weights must have a positive sum")


@dataclass
class CollectConfig:
    split: str = MISSING
    n_prompts: int = MISSING
    episodes: int = MISSING
    shard_size: int = MISSING
    flush_episodes: int | None = MISSING  # also write a shard every this many episodes (what a kill can lose)
    output_dir: str = MISSING
    overwrite: bool = MISSING
    resume: bool = MISSING  # continue a killed collection in output_dir
    seed: int = MISSING
    progress_bar: bool = MISSING
    backend: str = MISSING  # local: this process | ray: episode ranges fanned out to Ray workers (the ray group)
    behaviour: BehaviourConfig = MISSING

    def __post_init__(self) -> None:
        v.choice("collect.backend", self.backend, BACKENDS)
        if self.backend == "ray" and self.flush_episodes is None:
            raise ValueError("collect.backend=ray needs collect.flush_episodes (the episodes of one Ray task and of "
                             "its shard): set it, e.g. collect.flush_episodes=8")
        v.choice("collect.split", self.split, SPLITS)
        v.number("collect.n_prompts", self.n_prompts, integer=True, low=1)
        v.number("collect.episodes", self.episodes, integer=True, low=1)
        v.number("collect.shard_size", self.shard_size, integer=True, low=1)
        v.number("collect.flush_episodes", self.flush_episodes, integer=True, low=1, optional=True)
        if self.overwrite and self.resume:
            raise ValueError("collect.overwrite and collect.resume are exclusive: replace a collection or continue it")
        v.number("collect.seed", self.seed, integer=True, low=0)
        v.text("collect.output_dir", self.output_dir)


@dataclass
class RayConfig:
    """The Ray cluster of `collect.backend=ray`, `evaluate.backend=ray` and `rl.vec_env=ray` (the `ray` group)."""

    address: str | None = MISSING  # null: start a local Ray instance | auto | host:port | ray://host:10001
    connect_timeout_s: float = MISSING  # joining the cluster at `address` must succeed within this
    local_cpus: int | None = MISSING  # CPUs of a local instance (null: every core)
    num_workers: int = MISSING  # workers of collect and evaluate, each with its own model (rl: rl.n_envs)
    cpus_per_worker: float = MISSING
    gpus_per_worker: float = MISSING  # fractions share a GPU between workers
    worker_threads: int = MISSING  # torch threads in each worker
    max_retries: int = MISSING  # restarts of a lost worker and retries of the task it was running

    def __post_init__(self) -> None:
        v.text("ray.address", self.address, optional=True)
        v.number("ray.connect_timeout_s", self.connect_timeout_s, low=0.0, open_low=True)
        v.number("ray.local_cpus", self.local_cpus, integer=True, low=1, optional=True)
        v.number("ray.num_workers", self.num_workers, integer=True, low=1)
        v.number("ray.cpus_per_worker", self.cpus_per_worker, low=0.0)
        v.number("ray.gpus_per_worker", self.gpus_per_worker, low=0.0)
        v.number("ray.worker_threads", self.worker_threads, integer=True, low=1)
        v.number("ray.max_retries", self.max_retries, integer=True, low=0)


@dataclass
class EnvBenchmarkConfig:
    n_envs: int = MISSING  # parallel envs of the SubprocVecEnv measurement
    single_steps: int = MISSING  # env steps of the one-env measurement (random actions)
    vec_steps: int = MISSING  # vector steps of the SubprocVecEnv measurement (x n_envs env steps)
    policy: str = MISSING  # policy of the overhead measurement
    knobs: dict[str, Any] = MISSING
    split: str = MISSING
    n_prompts: int = MISSING  # prompts of the overhead measurement (one episode each)
    start_method: str | None = MISSING  # SubprocVecEnv start method (null: SB3's default, forkserver)
    allow_random_model: bool = MISSING
    output: str = MISSING  # the JSON file

    def __post_init__(self) -> None:
        for key in ("n_envs", "single_steps", "vec_steps", "n_prompts"):
            v.number(f"env_benchmark.{key}", getattr(self, key), integer=True, low=1)
        v.choice("env_benchmark.split", self.split, SPLITS)
        check_policy_name("env_benchmark.policy", self.policy)

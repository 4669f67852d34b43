"""Typed configs of every job: one dataclass per config group, registered with Hydra's ConfigStore as the group's
schema, and `RootConfig`, the whole tree a job reads.

Defaults live in YAML only (`conf/<group>/*.yaml`, each extending its group's `schema`; the env group's own
defaults are `envs.config.EnvConfig`'s, since a Gymnasium env must carry them). The dataclasses give every key a type
(Hydra refuses `evaluate.n_examples=abc` when composing) and check values in `__post_init__` when the composed config
becomes a `RootConfig` (`typed(cfg)`), so `evaluate.n_examples=-3` is refused with that key's name before any job
starts. Jobs read attributes of the typed tree; no job repeats a default.

    from policies.config import compose
    cfg = compose(["mode=evaluate", "evaluate.n_examples=32"])   # RootConfig, outside any Hydra app
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from cache_core import validate as v
from cache_core.actions import ACTION_MODES
from cache_core.bench import REPO_ROOT
from cache_core.bench.config import (
    BenchmarkConfig,
    BuiltinModelConfig,
    GenerationConfig,
    PretrainConfig,
    TaskConfig,
    TuneConfig,
)
from cache_core.bench.tasks import SPLITS
from cache_core.bench.tracking import LoggerConfig
from cache_core.registry import check_policy_name
from envs.config import BACKENDS, CollectConfig, EnvBenchmarkConfig, EnvConfig, RayConfig
from policies.predictor import ARCHS

CONF_DIR = REPO_ROOT / "conf"
# The jobs of train.py (its MODES maps each but `main` to the module that runs it).
JOB_MODES = ("main", "pretrain", "benchmark", "collect", "env_benchmark", "supervised", "rl", "export", "evaluate",
             "tune")
GROUP_BY = ("episode", "prompt")
VEC_ENVS = ("subproc", "dummy", "ray")
LABEL_WEIGHTINGS = ("none", "attention")


@dataclass
class PathsConfig:
    root: str = MISSING  # the repository (where checkpoints/ lies), whatever the working directory
    checkpoints: str = MISSING
    model: str = MISSING  # the model every job runs: a checkpoint directory (built-in or a local LLaDA directory)
    output: str = MISSING  # this run's directory: every file a job writes goes here unless a key says otherwise


@dataclass
class DataConfig:
    shards_dir: Any = MISSING  # one shard directory or a list of them
    batch_size: int = MISSING
    val_fraction: float = MISSING
    group_by: str = MISSING
    num_workers: int = MISSING
    max_rows: int | None = MISSING

    def __post_init__(self) -> None:
        dirs = self.shards_dir if isinstance(self.shards_dir, (list, tuple)) else [self.shards_dir]
        if not dirs or not all(isinstance(d, str) and d for d in dirs):
            raise ValueError(f"data.shards_dir={self.shards_dir!r} must be a shard directory or a list of them: "
                             "collect shards with `python train.py mode=collect` and pass data.shards_dir=<dir>")
        v.number("data.batch_size", self.batch_size, integer=True, low=1)
        v.number("data.val_fraction", self.val_fraction, low=0.0, high=1.0, open_high=True)
        v.choice("data.group_by", self.group_by, GROUP_BY)
        v.number("data.num_workers", self.num_workers, integer=True, low=0)
        v.number("data.max_rows", self.max_rows, integer=True, low=1, optional=True)

    @property
    def directories(self) -> list[Path]:
        return [Path(d) for d in (self.shards_dir if isinstance(self.shards_dir, (list, tuple)) else [self.shards_dir])]


@dataclass
class GenerationCheckConfig:
    enabled: bool = MISSING
    every_n_epochs: int = MISSING
    n_prompts: int = MISSING
    batch_size: int = MISSING
    split: str = MISSING
    budget: float | None = MISSING

    def __post_init__(self) -> None:
        p = "policy.generation_check."
        v.number(p + "every_n_epochs", self.every_n_epochs, integer=True, low=1)
        v.number(p + "n_prompts", self.n_prompts, integer=True, low=0)
        v.number(p + "batch_size", self.batch_size, integer=True, low=1)
        v.choice(p + "split", self.split, SPLITS)
        v.fraction(p + "budget", self.budget, optional=True)


def check_epsilon(key: str, epsilon: Any) -> float:
    return float(v.number(key, epsilon, low=0.0, high=1e3, open_low=True, open_high=True))


@dataclass
class PolicyConfig:
    """The supervised block predictor (policies.supervised)."""

    name: str = MISSING
    arch: str = MISSING
    hidden: int = MISSING
    n_layers_attn: int = MISSING
    n_heads: int = MISSING
    dropout: float = MISSING
    action_mode: str = MISSING
    epsilon: float = MISSING
    label_weighting: str = MISSING
    attention_power: float = MISSING
    threshold: float = MISSING
    pos_weight: Any = MISSING  # auto | a number | null (no weighting)
    ignore_features: list[str] = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    budget_conditioned: bool = MISSING
    budget_epsilons: list[float] = MISSING
    checkpoint_dir: str = MISSING
    resume: str | None = MISSING  # a .ckpt to continue from
    checkpoint_every_n_steps: int | None = MISSING  # last.ckpt every N training steps too (null: each epoch's end)
    log_export: bool = MISSING
    generation_check: GenerationCheckConfig = MISSING

    def __post_init__(self) -> None:
        p = "policy."
        v.choice(p + "arch", self.arch, ARCHS)
        v.choice(p + "action_mode", self.action_mode, ACTION_MODES)
        v.choice(p + "label_weighting", self.label_weighting, LABEL_WEIGHTINGS)
        for key in ("hidden", "n_layers_attn", "n_heads"):
            v.number(p + key, getattr(self, key), integer=True, low=1)
        if self.arch == "transformer" and self.hidden % self.n_heads:
            raise ValueError(f"policy.hidden={self.hidden} must be a multiple of policy.n_heads={self.n_heads}")
        v.number(p + "dropout", self.dropout, low=0.0, high=1.0, open_high=True)
        check_epsilon(p + "epsilon", self.epsilon)
        v.number(p + "attention_power", self.attention_power)
        v.fraction(p + "threshold", self.threshold, open_low=False)
        if self.pos_weight != "auto":
            v.number(p + "pos_weight", self.pos_weight, low=0.0, open_low=True, optional=True)
        v.number(p + "lr", self.lr, low=0.0, open_low=True)
        v.number(p + "weight_decay", self.weight_decay, low=0.0)
        if self.budget_conditioned:
            if not self.budget_epsilons:
                raise ValueError("policy.budget_conditioned=true needs policy.budget_epsilons (a list of epsilons)")
            for i, eps in enumerate(self.budget_epsilons):
                check_epsilon(f"{p}budget_epsilons[{i}]", eps)
            if "budget" in self.ignore_features:
                raise ValueError("policy.budget_conditioned=true needs the budget feature: drop it from "
                                 "policy.ignore_features")
        v.number(p + "checkpoint_every_n_steps", self.checkpoint_every_n_steps, integer=True, low=1, optional=True)
        if self.resume is not None and not Path(self.resume).is_file():
            raise ValueError(f"policy.resume={self.resume} does not exist (a last.ckpt of an earlier "
                             "mode=supervised run, under <its run dir>/checkpoints/)")


@dataclass
class ExportConfig:
    """`mode=export`: ship a trained policy to an explicit path."""

    source: str | None = MISSING  # a supervised .ckpt or an exported .onnx of any run
    path: str | None = MISSING  # writes <path>.onnx + .json (+ .safetensors)
    threshold: float | None = MISSING  # refresh-logit predictors: null = as trained
    budget: float | None = MISSING  # budget-conditioned predictors: generate()'s budget when given none

    def __post_init__(self) -> None:
        v.fraction("export.threshold", self.threshold, optional=True, open_low=False)
        v.fraction("export.budget", self.budget, optional=True)


@dataclass
class TrainerConfig:
    """lightning.Trainer arguments (`extra`: any other Trainer argument, e.g. `+trainer.extra.max_time=...`)."""

    accelerator: str = MISSING
    devices: Any = MISSING  # a count, a list of ids, "auto" or -1 (all)
    strategy: str = MISSING
    num_nodes: int = MISSING
    precision: str = MISSING
    max_epochs: int = MISSING
    gradient_clip_val: float | None = MISSING
    log_every_n_steps: int = MISSING
    check_val_every_n_epoch: int = MISSING
    enable_progress_bar: bool = MISSING
    enable_model_summary: bool = MISSING
    deterministic: bool = MISSING
    limit_train_batches: float | None = MISSING
    limit_val_batches: float | None = MISSING
    sync_batchnorm: bool = MISSING
    use_distributed_sampler: bool = MISSING
    matmul_precision: str | None = MISSING  # torch.set_float32_matmul_precision, applied by the job
    extra: dict[str, Any] = MISSING

    def __post_init__(self) -> None:
        v.number("trainer.max_epochs", self.max_epochs, integer=True, low=1)
        v.number("trainer.num_nodes", self.num_nodes, integer=True, low=1)
        v.choice("trainer.matmul_precision", self.matmul_precision, (None, "highest", "high", "medium"))

    def kwargs(self) -> dict[str, Any]:
        """lightning.Trainer keyword arguments (None values left to Lightning's defaults)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("matmul_precision", "extra")}
        return {**{k: val for k, val in out.items() if val is not None}, **self.extra}


@dataclass
class RLPolicyConfig:
    hidden: int = MISSING
    arch: str = MISSING
    predictor_kwargs: dict[str, Any] = MISSING
    net_arch: dict[str, list[int]] = MISSING
    activation: str = MISSING
    ortho_init: bool = MISSING
    init_refresh_prob: float | None = MISSING

    def __post_init__(self) -> None:
        v.number("rl.policy.hidden", self.hidden, integer=True, low=1)
        v.choice("rl.policy.arch", self.arch, ARCHS)
        v.choice("rl.policy.activation", self.activation, ("relu", "tanh", "gelu", "silu"))
        v.number("rl.policy.init_refresh_prob", self.init_refresh_prob, low=0.0, high=1.0, open_low=True,
                 open_high=True, optional=True)
        unknown = set(self.net_arch) - {"pi", "vf"}
        if unknown:
            raise ValueError(f"rl.policy.net_arch has unknown keys {sorted(unknown)}; use pi and vf")


@dataclass
class RLEvalConfig:
    split: str = MISSING
    n_prompts: int = MISSING
    budgets: list[float] = MISSING
    freq: int = MISSING
    batch_size: int = MISSING
    at_start: bool | None = MISSING
    flop_weight: float = MISSING
    over_weight: float = MISSING

    def __post_init__(self) -> None:
        v.choice("rl.eval.split", self.split, SPLITS)
        v.number("rl.eval.n_prompts", self.n_prompts, integer=True, low=1)
        for i, b in enumerate(self.budgets):
            v.fraction(f"rl.eval.budgets[{i}]", b)
        v.number("rl.eval.freq", self.freq, integer=True, low=0)
        v.number("rl.eval.batch_size", self.batch_size, integer=True, low=1)


@dataclass
class RLCheckpointConfig:
    freq: int = MISSING
    dir: str = MISSING

    def __post_init__(self) -> None:
        v.number("rl.checkpoint.freq", self.freq, integer=True, low=0)


@dataclass
class RLExportConfig:
    path: str = MISSING
    which: str = MISSING
    budget: float | None = MISSING

    def __post_init__(self) -> None:
        v.choice("rl.export.which", self.which, ("best", "last"))
        v.fraction("rl.export.budget", self.budget, optional=True)


@dataclass
class RLConfig:
    """The RL reuse agent (policies.rl)."""

    algo: str = MISSING
    total_timesteps: int = MISSING
    max_minutes: float | None = MISSING
    n_envs: int = MISSING
    vec_env: str = MISSING
    seed: int | None = MISSING
    device: str = MISSING
    verbose: int = MISSING
    progress_bar: bool = MISSING
    log_formats: list[str] = MISSING
    env: dict[str, Any] = MISSING  # BlockReuseEnv settings on top of the env group's
    policy: RLPolicyConfig = MISSING
    hyperparams: dict[str, Any] = MISSING  # SB3 arguments shared by the algorithms (checked by SB3)
    ppo: dict[str, Any] = MISSING
    a2c: dict[str, Any] = MISSING
    warm_start: str | None = MISSING
    warm_start_auto: str = MISSING
    resume: str | None = MISSING
    eval: RLEvalConfig = MISSING
    checkpoint: RLCheckpointConfig = MISSING
    export: RLExportConfig = MISSING

    def __post_init__(self) -> None:
        v.number("rl.total_timesteps", self.total_timesteps, integer=True, low=1)
        v.number("rl.max_minutes", self.max_minutes, low=0.0, open_low=True, optional=True)
        v.number("rl.n_envs", self.n_envs, integer=True, low=1)
        v.choice("rl.vec_env", self.vec_env, VEC_ENVS)
        if self.warm_start not in (None, "auto") and self.resume:
            raise ValueError("rl.warm_start and rl.resume are exclusive: a resumed run already has trained weights")
        from envs.image_env import ImageEnvConfig

        # Either family's env keys; RootConfig checks that rl.env fits the env group the run has.
        known = set(EnvConfig.__dataclass_fields__) | set(ImageEnvConfig.__dataclass_fields__)
        unknown = set(self.env) - known
        if unknown:
            raise ValueError(f"rl.env has unknown env settings {sorted(unknown)}; known: {sorted(known)}")


@dataclass
class LearnedEntry:
    """An exported policy to evaluate; a missing file is skipped unless `required`."""

    name: str = MISSING
    path: str = MISSING
    required: bool = False
    knob: str | None = None  # several action-logit files of one name on one curve: the knob and this file's value
    value: Any = None


@dataclass
class EvaluateConfig:
    split: str = MISSING
    n_examples: int = MISSING
    batch_sizes: list[int] = MISSING
    heuristics: list[str] | None = MISSING
    include_oracle: bool = MISSING
    learned: list[LearnedEntry] = MISSING
    thresholds: list[float] | None = MISSING
    budgets: list[float] | None = MISSING
    max_em_loss: float = MISSING  # text: exact-match loss; image family: classifier-accuracy loss
    min_agreement: float = MISSING
    min_psnr: float = MISSING  # image family: the quality floor (dB against the no-cache sample)
    max_psnr_loss: float = MISSING  # image family: dB a learned point may lose against the best heuristic's
    output_dir: str = MISSING
    name: str = MISSING
    progress: bool = MISSING
    backend: str = MISSING  # local | ray: prompt batches fanned out to Ray workers (the ray group)
    # Decoding settings to evaluate one after the other (null: the generation group's only): each entry overrides
    # gen_length / block_length / steps / threshold and may carry `name` and `held_out` (a setting no policy was
    # trained on); a combined table of the cheapest points per setting closes the run.
    settings: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        p = "evaluate."
        v.choice(p + "backend", self.backend, BACKENDS)
        for i, entry in enumerate(self.settings or []):
            extra = set(entry) - {"gen_length", "block_length", "steps", "threshold", "name", "held_out"}
            if extra:
                raise ValueError(f"{p}settings[{i}] has unknown keys {sorted(extra)}; an entry overrides gen_length, "
                                 "block_length, steps, threshold and may name itself (name, held_out)")
        v.choice(p + "split", self.split, SPLITS)
        v.number(p + "n_examples", self.n_examples, integer=True, low=1)
        v.numbers(p + "batch_sizes", self.batch_sizes, integer=True, low=1)
        v.numbers(p + "thresholds", self.thresholds, optional=True, low=0.0, high=1.0)
        v.numbers(p + "budgets", self.budgets, optional=True, low=0.0, high=1.0, open_low=True)
        for i, name in enumerate(self.heuristics or []):
            check_policy_name(f"{p}heuristics[{i}]", name, files=False)
        v.fraction(p + "max_em_loss", self.max_em_loss, open_low=False)
        v.fraction(p + "min_agreement", self.min_agreement, open_low=False)
        v.number(p + "min_psnr", self.min_psnr)
        v.number(p + "max_psnr_loss", self.max_psnr_loss, low=0.0)
        v.text(p + "name", self.name)
        names = [e.name for e in self.learned]
        if len(set(names)) != len(names) and any(e.knob is None for e in self.learned):
            raise ValueError(f"evaluate.learned names {names} repeat: give each file its own name, or a knob/value "
                             "to put several files on one curve")


@dataclass
class RootConfig:
    """The whole config of a `train.py` run."""

    mode: str = MISSING
    seed: int = MISSING
    threads: int | None = MISSING  # torch CPU threads; null = the engine's default (cache_core.runtime)
    paths: PathsConfig = MISSING
    # model / pretrain / env hold the text family's schema (BuiltinModelConfig, PretrainConfig, EnvConfig) or, with
    # experiment=dit, the image family's (IMAGE_SCHEMAS): each option's YAML names its own schema, which types it.
    model: Any = MISSING
    task: TaskConfig = MISSING
    generation: GenerationConfig = MISSING
    pretrain: Any = MISSING
    benchmark: BenchmarkConfig = MISSING
    env: Any = MISSING
    collect: CollectConfig = MISSING
    env_benchmark: EnvBenchmarkConfig = MISSING
    data: DataConfig = MISSING
    policy: PolicyConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    rl: RLConfig = MISSING
    evaluate: EvaluateConfig = MISSING
    export: ExportConfig = MISSING
    ray: RayConfig = MISSING
    tune: TuneConfig = MISSING

    def __post_init__(self) -> None:
        v.choice("mode", self.mode, JOB_MODES)
        v.number("seed", self.seed, integer=True, low=0)
        v.number("threads", self.threads, integer=True, low=1, optional=True)
        try:  # rl.env sits on top of the env group: the pair must make a valid env
            replace(self.env, **self.rl.env)
        except (TypeError, ValueError) as err:
            raise ValueError(f"rl.env (on top of the env group): {err}") from None


# group -> schema, the order of RootConfig's fields
SCHEMAS: dict[str, type] = {
    "model": BuiltinModelConfig, "task": TaskConfig, "generation": GenerationConfig, "pretrain": PretrainConfig,
    "benchmark": BenchmarkConfig, "env": EnvConfig, "collect": CollectConfig, "env_benchmark": EnvBenchmarkConfig,
    "data": DataConfig, "policy": PolicyConfig, "trainer": TrainerConfig, "logger": LoggerConfig, "rl": RLConfig,
    "evaluate": EvaluateConfig, "export": ExportConfig, "ray": RayConfig, "tune": TuneConfig,
}


def _image_schemas() -> dict[str, type]:
    from cache_core.bench.image_config import DiTModelGroupConfig, DiTPretrainGroupConfig
    from envs.image_env import ImageEnvConfig

    return {"model": DiTModelGroupConfig, "pretrain": DiTPretrainGroupConfig, "env": ImageEnvConfig}


IMAGE_SCHEMAS: dict[str, type] = _image_schemas()  # the image family's options of those groups (experiment=dit)


def family_of_config(cfg: Any) -> str:
    """"image" when the run's model group is the DiT (experiment=dit), else "text"."""
    return "image" if getattr(cfg.model, "family", None) == "dit" else "text"


def register_configs() -> None:
    """Put every schema in Hydra's ConfigStore (`<group>/schema`, the root as `root_schema`) and the `repo_root`
    resolver; idempotent. train.py calls it before Hydra composes; so does `compose`."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="root_schema", node=RootConfig)
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)
    for group, schema in IMAGE_SCHEMAS.items():
        cs.store(group=group, name="dit_schema", node=schema)
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))


def typed(cfg: DictConfig | RootConfig) -> RootConfig:
    """The composed config as a `RootConfig`: every group's values checked (errors name the key)."""
    if isinstance(cfg, RootConfig):
        return cfg
    root = OmegaConf.to_object(cfg)  # instantiates the dataclasses: their __post_init__ checks run here
    if root.task.kind == "file" and root.env.task_file is None:
        # The env (and every worker process it starts) builds its prompts from the same file task.
        root.env.task_file = asdict(root.task)
    return root


def compose(overrides: Sequence[str] = (), *, as_dict: bool = False) -> RootConfig | DictConfig:
    """The project's config with `overrides` (Hydra syntax), outside a Hydra app. `paths.output` has no Hydra run
    directory here: pass `paths.output=DIR` when a job will write files."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    overrides = list(overrides)
    if not any(o.startswith("paths.output=") for o in overrides):
        overrides.append("paths.output=outputs/composed")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return cfg if as_dict else typed(cfg)


def plain(cfg: Any) -> Any:
    """A typed config (or part of it) as plain dicts and lists, for logs and manifests."""
    from dataclasses import asdict, is_dataclass

    return asdict(cfg) if is_dataclass(cfg) else cfg

"""Typed configs of the bench's groups: `task`, `generation`, `model` (the built-in model's shape), `pretrain`,
`benchmark`. Defaults live in YAML only (`conf/<group>/*.yaml`); these classes type and check them, and Hydra's
ConfigStore holds them as each group's schema (`policies.config.register_configs`). A wrong value names its key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING

from cache_core import validate as v
from cache_core.bench.taskfile import FileTask, FileTaskSettings
from cache_core.bench.tasks import SPLITS, TASK_NAMES
from cache_core.memory import MemoryConfig
from cache_core.monitor import QualityMonitor
from cache_core.partition import DynamicPartitioner, check_cache_block_size
from cache_core.registry import check_policy_name
from cache_core.session import REMASKING, validate_generation_args


@dataclass
class TaskConfig(FileTaskSettings):
    """Where prompts come from: the synthetic task suite (`kind: builtin`, `cache_core.bench.tasks`) or a user's file
    (`kind: file`: the keys of `cache_core.bench.taskfile.FileTaskSettings`, JSONL or a saved Hugging Face dataset, a
    field mapping, n-shot prompts, GSM8K / normalised / unit-test scoring). Splits are fixed by `seed` either way."""

    seed: int = MISSING
    kind: str = "builtin"
    tasks: list[str] = MISSING

    def __post_init__(self) -> None:
        v.choice("task.kind", self.kind, ("builtin", "file"))
        if not self.tasks:
            raise ValueError("task.tasks must list at least one task")
        for name in self.tasks:
            v.choice("task.tasks", name, TASK_NAMES)
        v.number("task.seed", self.seed, integer=True)
        if self.kind == "file":
            self.check()


def make_task(task: Any):
    """The example source of a task config (TaskConfig, or its dict): `.split(name, n)` -> list[Example]."""
    from cache_core.bench.tasks import TaskSuite

    get = (lambda k, d=None: task.get(k, d)) if isinstance(task, dict) else (lambda k, d=None: getattr(task, k, d))
    if get("kind", "builtin") == "builtin":
        return TaskSuite(list(get("tasks")), seed=int(get("seed", 0)))
    if isinstance(task, FileTaskSettings):
        return FileTask(task)
    return FileTask(FileTaskSettings(**{f.name: task[f.name] for f in fields(FileTaskSettings) if f.name in task}))


@dataclass
class GenerationConfig:
    """Decoding settings (`cache_core.generate`), LLaDA semantics."""

    gen_length: int = MISSING
    block_length: int = MISSING
    steps: int | None = MISSING  # total denoising steps (a multiple of gen_length / block_length); null with threshold
    threshold: float | None = MISSING  # Fast-dLLM parallel decoding: commit every token with confidence >= threshold
    temperature: float = MISSING
    remasking: str = MISSING
    # The cache runtime, each part off by default (README "Cache runtime"): generate()'s arguments of the same names.
    # Each is the engine's own dataclass; `enabled: false` in conf/generation/*.yaml keeps it off, and the fields
    # not named there take the class's defaults (cache_core/monitor.py, memory.py, partition.py).
    cache_block_size: int | None = None  # cache blocks of another size: a divisor or a multiple of block_length
    dynamic_blocks: DynamicPartitioner = field(default_factory=lambda: DynamicPartitioner(enabled=False))
    monitor: QualityMonitor = field(default_factory=lambda: QualityMonitor(enabled=False))
    memory: MemoryConfig = field(default_factory=lambda: MemoryConfig(enabled=False))

    def __post_init__(self) -> None:
        v.choice("generation.remasking", self.remasking, REMASKING)
        try:
            validate_generation_args([[0]], self.gen_length, self.block_length, self.steps, self.threshold,
                                     self.temperature, self.remasking)
            if self.dynamic_blocks.enabled:
                self.dynamic_blocks.check(self.block_length)
            if self.cache_block_size is not None:
                check_cache_block_size(self.cache_block_size, self.block_length)
                if self.dynamic_blocks.enabled:
                    raise ValueError("cache_block_size and dynamic_blocks are exclusive")
        except (ValueError, TypeError) as err:
            raise ValueError(f"generation: {err}") from None

    def kwargs(self) -> dict[str, Any]:
        """generate()'s keyword arguments (the runtime parts only when switched on)."""
        out = dict(gen_length=self.gen_length, block_length=self.block_length, steps=self.steps,
                   threshold=self.threshold, temperature=self.temperature, remasking=self.remasking)
        if self.cache_block_size is not None:
            out["cache_block_size"] = self.cache_block_size
        for key in ("dynamic_blocks", "monitor", "memory"):
            if getattr(self, key).enabled:
                out[key] = getattr(self, key)
        return out


@dataclass
class BuiltinModelConfig:
    """The built-in model's shape (`cache_core.models.ModelConfig` fields, LLaDA architecture); vocab_size and
    mask_token_id null = filled from the built-in tokenizer."""

    vocab_size: int | None = MISSING
    mask_token_id: int | None = MISSING
    d_model: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: int | None = MISSING
    mlp_hidden_size: int = MISSING
    embedding_size: int | None = MISSING
    max_sequence_length: int = MISSING
    rope_theta: float = MISSING
    rms_norm_eps: float = MISSING
    weight_tying: bool = MISSING

    def __post_init__(self) -> None:
        for key in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "max_sequence_length"):
            v.number(f"model.{key}", getattr(self, key), integer=True, low=1)
        for key in ("vocab_size", "mask_token_id", "n_kv_heads", "embedding_size"):
            v.number(f"model.{key}", getattr(self, key), integer=True, low=0, optional=True)
        v.number("model.rope_theta", self.rope_theta, low=0.0, open_low=True)
        v.number("model.rms_norm_eps", self.rms_norm_eps, low=0.0, open_low=True)

    def to_model_config(self, tok: Any) -> Any:
        """The `cache_core.models.ModelConfig` of this shape; vocab_size / mask_token_id left null come from the
        tokenizer, and numbers given must fit it."""
        from dataclasses import asdict

        from cache_core.models import ModelConfig

        fields = {k: val for k, val in asdict(self).items() if k in ModelConfig.field_names()}
        if fields["vocab_size"] is None:
            fields["vocab_size"] = tok.vocab_size
        if fields["mask_token_id"] is None:
            fields["mask_token_id"] = tok.mask_token_id
        if fields["vocab_size"] < tok.vocab_size or fields["mask_token_id"] != tok.mask_token_id:
            raise ValueError(f"model.vocab_size={fields['vocab_size']} / model.mask_token_id={fields['mask_token_id']} "
                             f"do not fit the tokenizer (vocab {tok.vocab_size}, mask id {tok.mask_token_id}); set "
                             "them to null")
        return ModelConfig(**fields)


@dataclass
class PretrainConfig:
    name: str = MISSING
    output_dir: str = MISSING
    steps: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    min_lr_ratio: float = MISSING
    warmup_steps: int = MISSING
    weight_decay: float = MISSING
    grad_clip: float = MISSING
    eps: float = MISSING
    loss_weighting: str = MISSING
    semi_ar_fraction: float = MISSING
    seed: int = MISSING
    accelerator: str = MISSING
    max_minutes: float | None = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    eval_examples: int = MISSING
    eval_steps: int = MISSING
    test_examples: int = MISSING
    test_threshold: float | None = MISSING  # also report test exact match under threshold (parallel) decoding
    init_from: str | None = MISSING
    progress_bar: bool = MISSING

    def __post_init__(self) -> None:
        p = "pretrain."
        v.text(p + "name", self.name)
        for key in ("steps", "batch_size", "log_every", "eval_steps"):
            v.number(p + key, getattr(self, key), integer=True, low=1)
        for key in ("warmup_steps", "eval_every", "eval_examples", "test_examples"):
            v.number(p + key, getattr(self, key), integer=True, low=0)
        v.number(p + "lr", self.lr, low=0.0, open_low=True)
        v.fraction(p + "min_lr_ratio", self.min_lr_ratio, open_low=False)
        v.number(p + "weight_decay", self.weight_decay, low=0.0)
        v.number(p + "grad_clip", self.grad_clip, low=0.0)
        v.number(p + "eps", self.eps, low=0.0, high=1.0, open_low=True, open_high=True)
        v.choice(p + "loss_weighting", self.loss_weighting, ("mean", "elbo"))
        v.fraction(p + "semi_ar_fraction", self.semi_ar_fraction, open_low=False)
        v.choice(p + "accelerator", self.accelerator, ("cpu", "gpu", "cuda", "auto", "mps"))
        v.number(p + "max_minutes", self.max_minutes, low=0.0, open_low=True, optional=True)
        v.number(p + "test_threshold", self.test_threshold, low=0.0, high=1.0, open_low=True, optional=True)


@dataclass
class BenchmarkConfig:
    split: str = MISSING
    n_examples: int = MISSING
    batch_sizes: list[int] = MISSING
    examples_per_batch_size: dict[int, int] = MISSING
    policies: list[str] | None = MISSING
    include_oracle: bool = MISSING
    device: str = MISSING
    output_dir: str = MISSING
    # Exported policy files, as `evaluate.learned` (policies.config.LearnedEntry: name, path, required, knob, value;
    # typed Any here because that class lives in the policies package): a missing file is skipped unless required.
    learned: list[Any] = field(default_factory=list)
    thresholds: list[float] | None = None  # refresh-logit files' sweep; null = LearnedPolicy.knob_sweep
    budgets: list[float] | None = None  # budget-conditioned files' sweep; null = their manifest's threshold sweep
    # ModelConfig fields to replace in the checkpoint's config, with random weights: a timing model (exact match is
    # meaningless there). null = the checkpoint itself.
    random_model: Any = None  # a dict of ModelConfig fields (Any: Hydra cannot merge a dict into a null Dict node)

    def __post_init__(self) -> None:
        v.choice("benchmark.split", self.split, SPLITS)
        for i, name in enumerate(self.policies or []):
            check_policy_name(f"benchmark.policies[{i}]", name, files=False)
        v.number("benchmark.n_examples", self.n_examples, integer=True, low=1)
        v.numbers("benchmark.batch_sizes", self.batch_sizes, integer=True, low=1)
        for size, cap in self.examples_per_batch_size.items():
            v.number(f"benchmark.examples_per_batch_size[{size}]", cap, integer=True, low=1)
        v.numbers("benchmark.thresholds", self.thresholds, optional=True, low=0.0, high=1.0)
        v.numbers("benchmark.budgets", self.budgets, optional=True, low=0.0, high=1.0, open_low=True)
        if self.learned:
            from policies.config import LearnedEntry  # the one definition, evaluate.learned's

            entries = []
            for i, entry in enumerate(self.learned):
                if not isinstance(entry, LearnedEntry):
                    try:
                        entry = LearnedEntry(**dict(entry))
                    except (TypeError, ValueError) as err:
                        raise ValueError(f"benchmark.learned[{i}]={entry!r}: {err}; give {{name, path}} (and "
                                         "optionally required, knob, value)") from None
                v.text(f"benchmark.learned[{i}].name", entry.name)
                v.text(f"benchmark.learned[{i}].path", entry.path)
                entries.append(entry)
            self.learned = entries
        if self.random_model is not None:
            from cache_core.models import ModelConfig

            if not isinstance(self.random_model, dict):
                raise ValueError(f"benchmark.random_model={self.random_model!r} must be null or a dict of ModelConfig "
                                 "fields, e.g. {d_model: 1024, n_heads: 16}")
            unknown = sorted(set(self.random_model) - ModelConfig.field_names())
            if unknown or not self.random_model:
                raise ValueError(f"benchmark.random_model={self.random_model!r}: give ModelConfig fields to replace "
                                 f"(unknown: {unknown}; known: {sorted(ModelConfig.field_names())})")
            if {"vocab_size", "mask_token_id"} & set(self.random_model):
                raise ValueError("benchmark.random_model may not change vocab_size or mask_token_id: the model "
                                 "keeps the checkpoint's tokenizer")


@dataclass
class TuneConfig:
    """`mode=tune` (cache_core/bench/tuning.py): search the cache block size (and decoding block length)."""

    policy: str = MISSING  # a registry name or an exported policy file
    cache_block_sizes: list[int] = MISSING
    block_lengths: list[int] = MISSING  # [] = only generation.block_length (the decoding block stays the user's)
    max_em_loss: float = MISSING  # feasible: exact match >= no-cache's - max_em_loss
    objective: str = MISSING  # flops | wall
    split: str = MISSING
    n_examples: int = MISSING
    batch_size: int = MISSING
    device: str = MISSING
    output_dir: str = MISSING

    def __post_init__(self) -> None:
        check_policy_name("tune.policy", self.policy)
        v.numbers("tune.cache_block_sizes", self.cache_block_sizes, integer=True, low=1)
        v.numbers("tune.block_lengths", self.block_lengths, integer=True, low=1, nonempty=False)
        v.fraction("tune.max_em_loss", self.max_em_loss, open_low=False)
        v.choice("tune.objective", self.objective, ("flops", "wall"))
        v.choice("tune.split", self.split, SPLITS)
        v.number("tune.n_examples", self.n_examples, integer=True, low=1)
        v.number("tune.batch_size", self.batch_size, integer=True, low=1)

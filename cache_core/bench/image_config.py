"""Typed configs of the image family's config-group options (`experiment=dit`): the DiT's shape (`model=dit`) and
its pretraining recipe (`pretrain=dit`). Defaults live in YAML only (conf/model/dit.yaml, conf/pretrain/dit.yaml);
these classes type and check them. The image env's group option is `envs.image_env.ImageEnvConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from omegaconf import MISSING

from cache_core import validate as v


@dataclass
class DiTModelGroupConfig:
    """The built-in DiT's shape (`cache_core.models.dit.DiTConfig` fields)."""

    family: str = MISSING  # "dit": which family's pretraining, env and evaluation the jobs run
    image_size: int = MISSING
    channels: int = MISSING
    patch_size: int = MISSING
    n_classes: int = MISSING
    d_model: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    mlp_ratio: float = MISSING
    train_timesteps: int = MISSING
    beta_start: float = MISSING
    beta_end: float = MISSING
    class_dropout: float = MISSING

    def __post_init__(self) -> None:
        v.choice("model.family", self.family, ("dit",))
        try:
            self.to_model_config()
        except ValueError as err:
            raise ValueError(f"model: {err}") from None

    def to_model_config(self):
        from cache_core.models.dit import DiTConfig

        names = {f.name for f in fields(DiTConfig)}
        return DiTConfig(**{k: val for k, val in asdict(self).items() if k in names})


@dataclass
class DiTPretrainGroupConfig:
    """`pretrain=dit`: `cache_core.bench.dit_pretrain.DiTTrainConfig` plus where the checkpoint goes."""

    name: str = MISSING
    output_dir: str = MISSING
    steps: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    min_lr_ratio: float = MISSING
    warmup_steps: int = MISSING
    weight_decay: float = MISSING
    grad_clip: float = MISSING
    ema_decay: float = MISSING
    seed: int = MISSING
    max_minutes: float | None = MISSING
    log_every: int = MISSING
    save_every: int = MISSING
    init_from: str | None = MISSING
    classifier_steps: int = MISSING  # the digit classifier trained beside the DiT (quality metrics)

    def __post_init__(self) -> None:
        p = "pretrain."
        for key in ("steps", "batch_size", "log_every", "save_every", "classifier_steps"):
            v.number(p + key, getattr(self, key), integer=True, low=1)
        v.number(p + "warmup_steps", self.warmup_steps, integer=True, low=0)
        v.number(p + "lr", self.lr, low=0.0, open_low=True)
        v.fraction(p + "min_lr_ratio", self.min_lr_ratio, open_low=False)
        v.fraction(p + "ema_decay", self.ema_decay, open_low=False)
        v.number(p + "max_minutes", self.max_minutes, low=0.0, open_low=True, optional=True)
        v.text(p + "name", self.name)

    def train_config(self):
        from cache_core.bench.dit_pretrain import DiTTrainConfig

        names = {f.name for f in fields(DiTTrainConfig)}
        return DiTTrainConfig(**{k: val for k, val in asdict(self).items() if k in names})

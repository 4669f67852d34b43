"""Experiment tracking for every job, in one place: W&B runs (offline by default), artifacts, run directories and
per-job checkpoint directories. Part of the bench (the engine never imports it), so that jobs in every package
(cache_core.bench, envs, policies) share it.

- `start_run(logger, job_type, config)` -> a `Run` (a no-op one when logging is off): `log`, `summary`,
  `log_artifact`, `log_table`, `log_image`, `finish`. Jobs that are not Lightning use it (rl, collect, evaluate,
  benchmark, env_benchmark).
- `lightning_logger(logger, job_type, config)` -> Lightning's `WandbLogger` with the same settings, or None (pretrain,
  supervised); `Run.of_lightning(logger)` wraps it for artifacts.
- `hydra_job()`, `run_names(...)`, `per_job(path)`: what a Hydra run or multirun job is called and where it writes;
  in a multirun every job is its own W&B run (`<name>-<job num>`, grouped by the sweep directory) and a directory
  given outside the job's own run directory gets a `job<num>` part, so that jobs never share files.

W&B never reaches for the network unless `logger.mode=online`: train.py sets WANDB_MODE=offline, and the mode is
passed to every run explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from cache_core import validate as v

_WANDB_DIRS = ("WANDB_DATA_DIR", "WANDB_CACHE_DIR")
_USER_WANDB_DIRS = {variable: os.environ.get(variable) for variable in _WANDB_DIRS}  # as the process started
LOGGER_BACKENDS = ("wandb", "none")
LOGGER_MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    """The `logger` group: W&B, offline by default (conf/logger/wandb.yaml)."""

    backend: str = MISSING  # wandb | none
    mode: str = MISSING  # offline | online | disabled
    project: str = MISSING
    entity: str | None = MISSING
    name: str | None = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING
    save_dir: str = MISSING

    def __post_init__(self) -> None:
        v.choice("logger.backend", self.backend, LOGGER_BACKENDS)
        v.choice("logger.mode", self.mode, LOGGER_MODES)

    @property
    def enabled(self) -> bool:
        return self.backend != "none" and self.mode != "disabled"


def hydra_job() -> dict[str, Any]:
    """Hydra's run mode, job number, sweep and run directories, when inside a Hydra app ({} otherwise)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    h = HydraConfig.get()
    multirun = str(h.mode).endswith("MULTIRUN")
    return {"multirun": multirun, "num": h.job.get("num"), "sweep_dir": h.sweep.dir if multirun else None,
            "output_dir": h.runtime.output_dir}


def per_job(path: str | Path, file: bool = False) -> Path:
    """`path`, made distinct per job in a multirun when it lies outside the job's own run directory (a directory
    shared by the sweep): `<dir>/job<num>`, or `<stem>_job<num><suffix>` for a file."""
    path = Path(path)
    job = hydra_job()
    if not job.get("multirun") or path.resolve().is_relative_to(Path(str(job["output_dir"])).resolve()):
        return path
    if file:
        return path.with_name(f"{path.stem}_job{job['num']}{path.suffix}")
    return path / f"job{job['num']}"


def portable_path(path: str | Path) -> str:
    """A path as a manifest records it: relative to the repository when inside it, else its last two parts (the
    file and its folder), never a machine's absolute directories."""
    from cache_core.bench import REPO_ROOT

    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(Path(*path.parts[-2:]))


def run_names(name: str | None, group: str | None, job: dict[str, Any], job_type: str) -> tuple[str, str | None]:
    """W&B run name and group: the configured ones, else `<job type>-<run dir name>`; in a multirun the name gets the
    job number (one run per job) and the group defaults to the sweep directory's name."""
    if job.get("multirun"):
        return f"{name or job_type}-{job['num']}", group or Path(str(job["sweep_dir"])).name
    name = name or (f"{job_type}-{Path(str(job['output_dir'])).name}" if job.get("output_dir") else job_type)
    return name, group


def plain_config(config: Any) -> dict[str, Any]:
    """A config (typed dataclass tree or dict) as plain values for a run's config."""
    return asdict(config) if is_dataclass(config) else dict(config or {})


def _init_kwargs(logger: LoggerConfig, job_type: str) -> dict[str, Any]:
    name, group = run_names(logger.name, logger.group, hydra_job(), job_type)
    save_dir = Path(logger.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    # W&B's artifact staging and its cache (debug logs included) would go under ~/.local and ~/.cache: keep them with
    # this run, unless the user pointed them elsewhere. Its settings and login stay where the user keeps them.
    for variable in _WANDB_DIRS:
        if _USER_WANDB_DIRS[variable] is None:
            os.environ[variable] = str(save_dir / "wandb")
    return {"project": logger.project, "entity": logger.entity, "name": name, "group": group,
            "tags": list(logger.tags), "job_type": job_type, "mode": logger.mode, "dir": str(save_dir)}


class Run:
    """One job's W&B run; every method does nothing when logging is off (`Run(None)`)."""

    def __init__(self, wandb_run: Any | None):
        self.wandb_run = wandb_run

    @classmethod
    def of_lightning(cls, logger: Any | None) -> Run:
        """The run behind a Lightning WandbLogger (None: logging off). Only rank 0 holds a real one."""
        if logger is None:
            return cls(None)
        from lightning.pytorch.utilities import rank_zero_only

        return cls(logger.experiment if rank_zero_only.rank == 0 else None)

    @property
    def active(self) -> bool:
        return self.wandb_run is not None

    @property
    def directory(self) -> str | None:
        """The run's files (wandb/offline-run-*/), for `wandb sync`."""
        return None if self.wandb_run is None else str(Path(self.wandb_run.dir).parent)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), **({} if step is None else {"step": int(step)}))

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(dict(values))

    def log_artifact(self, files: Sequence[str | Path], name: str, kind: str = "model",
                     metadata: dict[str, Any] | None = None) -> None:
        """Files (an exported policy: .onnx + .json + .safetensors; a result's JSON) as one W&B artifact."""
        if self.wandb_run is None:
            return
        import wandb

        artifact = wandb.Artifact(name=name, type=kind, metadata=dict(metadata or {}))
        for f in files:
            if Path(f).is_file():
                artifact.add_file(str(f))
        self.wandb_run.log_artifact(artifact)

    def log_table(self, key: str, rows: Sequence[dict[str, Any]]) -> None:
        if self.wandb_run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        self.wandb_run.log({key: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def log_image(self, key: str, path: str | Path) -> None:
        if self.wandb_run is None:
            return
        import wandb

        self.wandb_run.log({key: wandb.Image(str(path))})

    def sb3_callback(self) -> Any | None:
        """SB3's W&B callback (the algorithm's hyperparameters into the run's config), or None when logging is off."""
        if self.wandb_run is None:
            return None
        from wandb.integration.sb3 import WandbCallback

        return WandbCallback(verbose=0)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def start_run(logger: LoggerConfig, job_type: str, config: Any = None) -> Run:
    """A W&B run of this job (offline unless `logger.mode=online`), or a no-op Run when `logger=none`/disabled.
    Each call starts a new run and finishes a previous one, so every Hydra multirun job logs its own run."""
    if not logger.enabled:
        return Run(None)
    import wandb

    run = wandb.init(**_init_kwargs(logger, job_type), config=plain_config(config), reinit="finish_previous")
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")
    return Run(run)


def lightning_logger(logger: LoggerConfig, job_type: str, config: Any = None) -> Any | None:
    """Lightning's WandbLogger with this job's W&B settings (offline by default), or None when logging is off."""
    if not logger.enabled:
        return None
    from lightning.pytorch.loggers import WandbLogger

    kwargs = _init_kwargs(logger, job_type)
    kwargs["save_dir"] = kwargs.pop("dir")  # WandbLogger's name for it (its `dir` loses to save_dir's default ".")
    wandb_logger = WandbLogger(**kwargs, log_model=False)
    wandb_logger.log_hyperparams(plain_config(config))
    return wandb_logger


def finish_lightning(logger: Any | None) -> None:
    if logger is None:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()

"""blockreuse: one Hydra entry point for every job.

    python train.py                     # the main job on the built-in model (see MAIN_PIPELINE)
    python train.py --help              # the modes, one line each, and the config groups
    python train.py mode=<mode> key=value ...

Each mode is one function `run(cfg: RootConfig) -> dict` in the package that owns it; this file checks the whole
config once (every group typed and validated, `policies.config`), sets the CPU threads once, and dispatches, so a
reader follows a job top to bottom in that one function.
"""

from __future__ import annotations

import importlib
import logging
import os

import hydra
from omegaconf import DictConfig, OmegaConf

from policies.config import JOB_MODES, RootConfig, register_configs, typed

log = logging.getLogger("blockreuse")

MODES = {  # mode -> the module whose run(cfg) does it
    "pretrain": "cache_core.bench.pretrain",
    "benchmark": "cache_core.bench.benchmark",
    "collect": "envs.collect",
    "env_benchmark": "envs.benchmark",
    "supervised": "policies.supervised",
    "rl": "policies.rl",
    "export": "policies.export",
    "evaluate": "policies.evaluate",
    "tune": "cache_core.bench.tuning",
}
# The main job: collect rollouts, train the predictor (which exports itself into the run directory), evaluate it
# against the heuristics, the oracle and the shipped policies. It writes into its run directory only.
MAIN_PIPELINE = ("collect", "supervised", "evaluate")
assert set(MODES) | {"main"} == set(JOB_MODES), "policies.config.JOB_MODES lists the modes of train.MODES"

register_configs()  # the groups' schemas and the repo_root resolver, before Hydra composes


def run_mode(mode: str, cfg: RootConfig | DictConfig) -> dict:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {['main', *MODES]} (python train.py --help)")
    module = importlib.import_module(MODES[mode])
    log.info("mode=%s (%s.run)", mode, MODES[mode])
    return module.run(typed(cfg))


def apply_threads(threads: int | None) -> int:
    """The job's torch threads, once; worker processes inherit them through $BLOCKREUSE_THREADS."""
    from cache_core.runtime import THREADS_ENV, set_threads

    if threads is not None:
        os.environ[THREADS_ENV] = str(threads)
    return set_threads(threads)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    os.environ.setdefault("WANDB_MODE", "offline")  # never reach for the network unless asked (logger.mode=online)
    config = typed(cfg)  # every group checked before any job starts (the mode too): a bad value names its key
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))  # also in <run dir>/.hydra/config.yaml
    log.info("torch threads: %d; run directory: %s", apply_threads(config.threads), config.paths.output)
    if config.mode != "main":
        return run_mode(config.mode, config)
    results = {mode: run_mode(mode, config) for mode in MAIN_PIPELINE}
    log.info("main job done; every file it wrote is under %s", config.paths.output)
    return results


if __name__ == "__main__":
    main()

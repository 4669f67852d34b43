"""blockreuse: one Hydra entry point for every job.

    python train.py                     # the main job on the built-in model (see MAIN_PIPELINE)
    python train.py mode=pretrain       # train the built-in diffusion LM
    python train.py mode=benchmark      # every heuristic policy across its knob, batch 1 and 16
    python train.py mode=<mode> key=value ...

Each mode is one function `run(cfg) -> dict` in the package that owns it; this file only dispatches, so a reader
follows a job top to bottom in that one function.
"""

from __future__ import annotations

import importlib
import logging
import os

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("blockreuse")

MODES = {
    "pretrain": "cache_core.pretrain",
    "benchmark": "cache_core.benchmark",
    "collect": "envs.collect",
    "env_benchmark": "envs.benchmark",
    "supervised": "policies.supervised",
    "rl": "policies.rl",
    "export": "policies.export",
    "evaluate": "policies.evaluate",
}
MAIN_PIPELINE = ("collect", "supervised", "export", "evaluate")


def run_mode(mode: str, cfg: DictConfig) -> dict:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {['main', *MODES]}")
    module = importlib.import_module(MODES[mode])
    log.info("mode=%s (%s.run)", mode, MODES[mode])
    return module.run(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    os.environ.setdefault("WANDB_MODE", "offline")  # never reach for the network unless asked (logger.mode=online)
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    if cfg.mode != "main":
        return run_mode(cfg.mode, cfg)
    results = {}
    for mode in MAIN_PIPELINE:
        results[mode] = run_mode(mode, cfg)
    return results


if __name__ == "__main__":
    main()

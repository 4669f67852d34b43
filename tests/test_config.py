"""The Hydra configs compose, and the inference engine stays free of training frameworks."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


def test_cache_core_imports_no_training_framework():
    code = (
        "import sys, cache_core, cache_core.generate, cache_core.learned, cache_core.benchmark;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'stable_baselines3', 'wandb') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("mode", ["main", "pretrain", "benchmark", "collect", "supervised", "rl", "export", "evaluate"])
def test_config_composes_for_every_mode(mode):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"mode={mode}"])
    assert cfg.mode == mode
    assert cfg.generation.gen_length % cfg.generation.block_length == 0
    assert {"model", "task", "generation", "benchmark"} <= set(cfg)


def test_unknown_mode_is_refused():
    import train

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["mode=nope"])
    with pytest.raises(ValueError, match="unknown mode 'nope'"):
        train.run_mode(cfg.mode, cfg)

"""W&B through the one tracking module (cache_core.bench.tracking), offline: a tiny supervised run (Lightning's
WandbLogger) and a tiny evaluate run (a plain W&B run) write offline run directories whose records hold the metrics,
the resolved config and their artifacts (read back from the .wandb file; no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import compose_cfg, read_offline_run

from cache_core.bench.tracking import run_names
from envs.testing import save_tiny_checkpoint
from policies.data import write_synthetic_shards
from policies.supervised import run


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    write_synthetic_shards(tmp / "shards", episodes=8, steps=6)
    model = save_tiny_checkpoint(tmp / "tiny")
    cfg = compose_cfg(tmp, "logger=wandb", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
                      f"paths.model={model}", "policy.generation_check.enabled=true",
                      "policy.generation_check.n_prompts=2", "policy.generation_check.every_n_epochs=1",
                      "generation.gen_length=16", "generation.block_length=8", "generation.steps=4",
                      "logger.name=tiny")
    return tmp, run(cfg)


def test_offline_run_holds_metrics_config_and_artifact(offline_run):
    tmp, result = offline_run
    run_dir = Path(result["wandb_dir"])
    assert run_dir.name.startswith("offline-run-") and run_dir.parent == tmp / "out" / "wandb"
    found = read_offline_run(run_dir)
    assert "exit" in found["kinds"], found["kinds"]
    assert {"train/loss", "val/loss", "val/ap", "val/auroc", "val/recall", "gen/exact_match",
            "gen/flop_fraction"} <= found["history"], found["history"]
    assert {"policy", "trainer", "data", "logger", "mode"} <= found["config"]  # the resolved Hydra config
    assert "block-predictor" in found["artifacts"]
    assert {"predictor.onnx", "predictor.json", "predictor.safetensors"} <= found["artifact_files"]
    assert {"tiny", "supervised", "blockreuse"} <= found["run"]
    staged = list((tmp / "out" / "wandb" / "artifacts").rglob("*"))  # W&B's artifact staging stays with the run
    assert staged, sorted(p.name for p in (tmp / "out" / "wandb").iterdir())


def test_logger_none_writes_no_run(tmp_path):
    write_synthetic_shards(tmp_path / "shards", episodes=6, steps=4)
    result = run(compose_cfg(tmp_path, "logger=none", "trainer.max_epochs=1"))
    assert "wandb_dir" not in result and not (tmp_path / "out" / "wandb").exists()


def test_evaluate_logs_its_table_plot_and_files(tmp_path):
    from policies.evaluate import run as evaluate

    model = save_tiny_checkpoint(tmp_path / "tiny")
    cfg = compose_cfg(tmp_path, "logger=wandb", f"paths.model={model}", "generation.gen_length=16",
                      "generation.block_length=8", "generation.steps=4", "evaluate.n_examples=2",
                      "evaluate.batch_sizes=[2]", "evaluate.heuristics=[full,never]", "evaluate.include_oracle=false",
                      "evaluate.learned=[]", "evaluate.progress=false")
    evaluate(cfg)
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    found = read_offline_run(run_dir)
    assert "exit" in found["kinds"]
    logged = {key.split("/_type")[0] for key in found["history"] if key.endswith("/_type")}  # media keys
    assert {"evaluate/rows", "evaluate/pareto"} <= logged, found["history"]
    assert "evaluate" in found["artifacts"] and {"evaluate.json", "evaluate.txt", "evaluate_pareto.png"} <= \
        found["artifact_files"]
    assert "evaluate" in found["run"]


def test_run_names_per_multirun_job():
    single = {"multirun": False, "num": None, "output_dir": "/x/outputs/2026-11-22/11-00-00"}
    assert run_names(None, None, single, "supervised") == ("supervised-11-00-00", None)
    job = {"multirun": True, "num": 3, "sweep_dir": "/x/multirun/2026-11-22/11-00-00", "output_dir": "/x/m/3"}
    assert run_names(None, None, job, "supervised") == ("supervised-3", "11-00-00")
    assert run_names("eps", "sweep", job, "supervised") == ("eps-3", "sweep")
    assert run_names(None, None, {}, "supervised") == ("supervised", None)

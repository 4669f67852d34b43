"""W&B through Lightning's WandbLogger, offline: a tiny supervised run writes an offline run directory whose records
hold the metrics, the resolved config and the exported policy artifact (read back from the .wandb file; no network)."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import wandb_records
from test_predictor import compose_cfg

from envs.testing import save_tiny_checkpoint
from policies.data import write_synthetic_shards
from policies.supervised import run, run_names


def read_offline_run(run_dir: Path, timeout: float = 60.0) -> dict[str, set]:
    """Record kinds and keys of an offline run. wandb-core may still be writing the log when wandb.finish() returns
    on a loaded machine, so wait for the run's `exit` record."""
    deadline = time.monotonic() + timeout
    while True:
        found = _read_offline_run(run_dir)
        if "exit" in found["kinds"] or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _read_offline_run(run_dir: Path) -> dict[str, set]:
    from wandb.proto import wandb_internal_pb2 as pb

    found: dict[str, set] = defaultdict(set)
    (log_file,) = run_dir.glob("run-*.wandb")
    for raw in wandb_records(log_file):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        found["kinds"].add(kind)
        if kind == "history":
            found["history"] |= {i.key or "/".join(i.nested_key) for i in record.history.item}
        elif kind == "config":
            found["config"] |= {i.key or "/".join(i.nested_key) for i in record.config.update}
        elif kind == "artifact":
            found["artifacts"].add(record.artifact.name)
            found["artifact_files"] |= {m.path for m in record.artifact.manifest.contents}
        elif kind == "run":
            found["run"] |= {record.run.display_name, record.run.job_type, record.run.project}
    return found


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


def test_logger_none_writes_no_run(tmp_path):
    write_synthetic_shards(tmp_path / "shards", episodes=6, steps=4)
    result = run(compose_cfg(tmp_path, "logger=none", "trainer.max_epochs=1"))
    assert "wandb_dir" not in result and not (tmp_path / "out" / "wandb").exists()


def test_run_names_per_multirun_job():
    single = {"multirun": False, "num": None, "output_dir": "/x/outputs/2026-11-22/11-00-00"}
    assert run_names(None, None, single, "supervised") == ("supervised-11-00-00", None)
    job = {"multirun": True, "num": 3, "sweep_dir": "/x/multirun/2026-11-22/11-00-00", "output_dir": "/x/m/3"}
    assert run_names(None, None, job, "supervised") == ("supervised-3", "11-00-00")
    assert run_names("eps", "sweep", job, "supervised") == ("eps-3", "sweep")
    assert run_names(None, None, {}, "supervised") == ("supervised", None)

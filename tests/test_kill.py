"""No work is lost to a kill: `python train.py` jobs killed with SIGKILL leave whole checkpoints on disk, at most one
checkpoint interval behind, and continue from them. Tiny models, so each job takes seconds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from envs.shards import load_shards, read_manifest
from envs.testing import save_tiny_checkpoint
from policies.data import write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
TINY_GEN = ["generation.gen_length=32", "generation.steps=4"]


def train_py(*overrides: str) -> list[str]:
    return [sys.executable, "train.py", "logger=none", "threads=1", *overrides]


def run_until(cmd: list[str], ready: Callable[[], bool], timeout: float = 240.0) -> None:
    """Start `cmd`, wait until `ready()` (a checkpoint is on disk), then SIGKILL it while it is still working."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the job ended (rc {proc.returncode}) before the kill: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint appeared in time")
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before it could be killed: make it longer"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def finish(cmd: list[str]) -> None:
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def episodes_on_disk(directory: Path) -> int:
    try:
        return read_manifest(directory)["episodes"]
    except Exception:  # noqa: BLE001  (not written yet)
        return 0


def test_a_killed_collection_keeps_its_shards_and_resumes_to_the_same_data(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "tiny")
    out, whole = tmp_path / "killed", tmp_path / "whole"
    common = [f"paths.model={model}", *TINY_GEN, "mode=collect", "collect.n_prompts=4", "collect.flush_episodes=1",
              "collect.progress_bar=false", "env.w_agree=0"]
    run_until(train_py(*common, "collect.episodes=2000", f"collect.output_dir={out}",
                       f"hydra.run.dir={tmp_path / 'run1'}"), lambda: episodes_on_disk(out) >= 3)
    manifest = read_manifest(out)
    kept = manifest["episodes"]
    assert kept >= 3 and not manifest["complete"]
    assert int(load_shards(out)["episode"].max()) + 1 == kept  # the manifest counts exactly what is on disk
    n = kept + 2  # resume to a few more episodes than were kept, and compare with a run that was never killed
    finish(train_py(*common, f"collect.episodes={n}", f"collect.output_dir={out}", "collect.resume=true",
                    f"hydra.run.dir={tmp_path / 'run2'}"))
    finish(train_py(*common, f"collect.episodes={n}", f"collect.output_dir={whole}",
                    f"hydra.run.dir={tmp_path / 'run3'}"))
    a, b = load_shards(out), load_shards(whole)
    assert read_manifest(out)["complete"] and int(a["episode"].max()) + 1 == n
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_killed_supervised_run_keeps_its_last_epoch_and_resumes(tmp_path):
    write_synthetic_shards(tmp_path / "shards", episodes=16, steps=8)
    ckpt = tmp_path / "run1" / "checkpoints" / "last.ckpt"

    def epoch_done() -> bool:
        try:
            return torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] >= 1
        except Exception:  # noqa: BLE001  (not there yet)
            return False

    common = ["mode=supervised", f"data.shards_dir={tmp_path / 'shards'}", "policy.generation_check.enabled=false",
              "trainer.enable_progress_bar=false", "data.batch_size=8"]
    run_until(train_py(*common, "trainer.max_epochs=100000", f"hydra.run.dir={tmp_path / 'run1'}"), epoch_done)
    kept = torch.load(ckpt, map_location="cpu", weights_only=True)  # whole: written under another name, renamed
    assert kept["epoch"] >= 1 and not list(ckpt.parent.glob("*.partial"))
    finish(train_py(*common, f"trainer.max_epochs={kept['epoch'] + 3}", f"policy.resume={ckpt}",
                    f"hydra.run.dir={tmp_path / 'run2'}"))
    resumed = torch.load(tmp_path / "run2" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == kept["epoch"] + 2 and resumed["global_step"] > kept["global_step"]


def test_a_killed_rl_run_keeps_its_checkpoints_and_resumes_from_them(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "tiny")
    ckpt_dir = tmp_path / "run1" / "checkpoints"

    def saved() -> list[Path]:
        return sorted(ckpt_dir.glob("rl_agent_*_steps.json"), key=lambda p: int(p.stem.split("_")[2]))

    common = ["mode=rl", f"paths.model={model}", *TINY_GEN, "rl.n_envs=1", "rl.vec_env=dummy",
              "rl.ppo.n_steps=16", "rl.ppo.batch_size=16", "rl.ppo.n_epochs=1", "rl.env.n_prompts=2",
              "rl.eval.n_prompts=2", "rl.eval.freq=0", "rl.eval.at_start=false", "rl.eval.budgets=[0.5]",
              "rl.policy.hidden=8", "rl.progress_bar=false", "rl.verbose=0", "rl.checkpoint.freq=16",
              "rl.warm_start=null", "rl.max_minutes=null"]
    run_until(train_py(*common, "rl.total_timesteps=1000000", f"hydra.run.dir={tmp_path / 'run1'}"),
              lambda: len(saved()) >= 2)
    latest = saved()[-1]
    record = json.loads(latest.read_text())
    assert record["num_timesteps"] >= 32 and latest.with_suffix(".safetensors").is_file()
    target = record["num_timesteps"] + 32
    finish(train_py(*common, f"rl.total_timesteps={target}", f"rl.resume={latest.with_suffix('')}",
                    f"hydra.run.dir={tmp_path / 'run2'}"))
    result = json.loads((tmp_path / "run2" / "rl_result.json").read_text())
    assert result["timesteps"] >= target and (tmp_path / "run2" / "rl_agent.onnx").is_file()

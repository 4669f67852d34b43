"""The Ray backends on one local Ray instance (2 CPUs): collection equals the local backend's, a worker killed
mid-episode is retried without loss or duplicates, an address that does not answer fails fast naming ray.address, a
full disk keeps what was collected; RL env workers as Ray actors give DummyVecEnv's observations and PPO result;
evaluation on Ray gives the local rows."""

from __future__ import annotations

import errno
import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_cfg
from test_collect import settings

from envs.block_reuse_env import BlockReuseEnv
from envs.cluster import collect_ray
from envs.collect import collect
from envs.shards import MANIFEST_FILE, load_shards, read_manifest
from envs.testing import DISK_FULL_MARKER, disk_full_save, dying_env, tiny_env_kwargs

EPISODES = 5


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module; shard writes in its workers go through the fake full disk."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"worker_process_setup_hook": "envs.testing.ray_worker_faults"})
    yield ray
    ray.shutdown()


def ray_cfg(tmp_path: Path, *overrides: str):
    return compose_cfg(tmp_path, "ray.num_workers=2", *overrides).ray


def collect_settings(tmp_path: Path, name: str, **overrides):
    return settings(tmp_path, **{"episodes": EPISODES, "shard_size": 10_000, "flush_episodes": 2,
                                 "output_dir": str(tmp_path / name), **overrides})


def kwargs() -> dict:
    return tiny_env_kwargs(action_mode="depth")


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    """The local backend's collection: the reference of every Ray collection here."""
    tmp = tmp_path_factory.mktemp("local")
    result = collect(BlockReuseEnv(**kwargs()), collect_settings(tmp, "local"))
    return load_shards(result["output_dir"]), read_manifest(result["output_dir"])


def assert_same_collection(directory: Path, local_data, episodes: int = EPISODES) -> None:
    """Equal means: the same rows in the same order (every column, bit for bit) and the same manifest, except the
    shard partition (a Ray shard is one task's episode range) and the creation time."""
    data, manifest = load_shards(directory), read_manifest(directory)
    reference, ref_manifest = local_data
    keep = reference["episode"] < episodes
    for key in reference:
        assert torch.equal(data[key], reference[key][keep]), key
    assert manifest["complete"] and manifest["episodes"] == episodes
    ignore = {"shards", "created", "episodes", "rows", "episode_summary"}
    assert {k: v for k, v in manifest.items() if k not in ignore} == {
        k: v for k, v in ref_manifest.items() if k not in ignore}
    assert manifest["episode_summary"] == ref_manifest["episode_summary"][:episodes]
    files = [s["file"] for s in manifest["shards"]]
    assert len(set(files)) == len(files) and sorted(p.name for p in directory.glob("shard-*")) == sorted(files)
    assert data["episode"].unique().tolist() == list(range(episodes))  # each episode once


def test_ray_collection_equals_the_local_one(ray_local, tmp_path, local_data):
    result = collect_ray(kwargs(), collect_settings(tmp_path, "ray", backend="ray"), ray_cfg(tmp_path))
    directory = Path(result["output_dir"])
    assert_same_collection(directory, local_data)
    assert result["backend"] == "ray" and result["workers"] == 2 and result["shards"] == 3
    assert [s["rows"] for s in read_manifest(directory)["shards"]] == [16, 16, 8]  # 2 + 2 + 1 episodes of 8 steps


def test_a_worker_killed_mid_episode_is_retried_without_loss_or_duplicates(ray_local, tmp_path, local_data):
    marker = tmp_path / "killed"
    factory = partial(dying_env, str(marker), 3)  # the first worker to play a 3rd step dies there, once
    result = collect_ray(kwargs(), collect_settings(tmp_path, "ray", backend="ray"), ray_cfg(tmp_path),
                         env_factory=factory)
    assert marker.is_file()  # a worker did die mid-episode
    assert_same_collection(Path(result["output_dir"]), local_data)


def test_a_worker_lost_beyond_its_retries_stops_with_the_collected_episodes_kept(ray_local, tmp_path, local_data):
    marker = tmp_path / "killed"
    s = collect_settings(tmp_path, "ray", backend="ray", flush_episodes=1)
    with pytest.raises(RuntimeError, match=r"ray\.max_retries=0.*collect\.resume=true"):
        # dies in its third episode (8 steps each), after the first two have been written
        collect_ray(kwargs(), s, ray_cfg(tmp_path, "ray.max_retries=0"), env_factory=partial(dying_env, str(marker),
                                                                                           19))
    directory = tmp_path / "ray"
    kept = read_manifest(directory)
    assert marker.is_file() and 2 <= kept["episodes"] < EPISODES and not kept["complete"]
    assert load_shards(directory)["episode"].unique().tolist() == list(range(kept["episodes"]))
    collect_ray(kwargs(), collect_settings(tmp_path, "ray", backend="ray", flush_episodes=1, resume=True),
                ray_cfg(tmp_path))
    assert_same_collection(directory, local_data)


PROBE = """
import sys, time
from pathlib import Path
sys.path.insert(0, "tests")
from helpers import compose_cfg
from envs.cluster import connect
for address in sys.argv[1:]:
    started = time.monotonic()
    try:
        connect(compose_cfg(Path("unused"), f"ray.address={address}", "ray.connect_timeout_s=3").ray)
        print("CONNECTED")
    except (ConnectionError, ValueError) as err:
        print(type(err).__name__, round(time.monotonic() - started), err)
"""


def test_an_address_that_does_not_answer_fails_fast_naming_the_key():
    """A fresh job (a subprocess: this module's Ray instance is up): a refused port, an address where something
    that is not Ray answers (or nothing: the 3 s timeout), and a malformed one; each a clear error, none a hang."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", PROBE, "127.0.0.1:1", "10.255.255.1:6379", "headnode"], cwd=repo,
                            capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.split(" ")[0] in ("ConnectionError", "ValueError",
                                                                                   "CONNECTED")]
    assert len(lines) == 3, result.stdout + result.stderr[-2000:]
    refused, silent, malformed = lines
    assert refused.startswith("ConnectionError") and "ray.address='127.0.0.1:1' does not answer" in refused
    assert "ray.address=null" in refused and int(refused.split()[1]) <= 4
    assert silent.startswith("ConnectionError") and "ray.address='10.255.255.1:6379'" in silent
    assert int(silent.split()[1]) <= 5  # within ray.connect_timeout_s=3 (+ rounding), not Ray's endless retries
    assert malformed.startswith("ValueError") and "ray.address='headnode' is not host:port" in malformed


def test_config_refuses_a_ray_collection_without_ranges_and_bad_ray_values(tmp_path):
    with pytest.raises(ValueError, match=r"collect\.backend=ray needs collect\.flush_episodes"):
        compose_cfg(tmp_path, "collect.backend=ray", "collect.flush_episodes=null")
    with pytest.raises(ValueError, match=r"ray\.num_workers=0 must be >= 1"):
        compose_cfg(tmp_path, "ray.num_workers=0")
    with pytest.raises(ValueError, match="collect.backend"):
        compose_cfg(tmp_path, "collect.backend=spark")
    with pytest.raises(ValueError, match="rl.vec_env"):
        compose_cfg(tmp_path, "rl.vec_env=mpi")
    trainer = compose_cfg(tmp_path, "trainer=fsdp", "trainer.num_nodes=2").trainer  # GPUs only: composed, not run
    assert trainer.kwargs()["strategy"] == "fsdp" and trainer.kwargs()["num_nodes"] == 2


def test_a_full_disk_keeps_the_collected_shards_and_resumes(ray_local, monkeypatch, tmp_path, local_data):
    import envs.shards

    # local backend: room for one shard
    monkeypatch.setattr(envs.shards, "save_file", disk_full_save(envs.shards.save_file))
    local = tmp_path / "local"
    local.mkdir()
    (local / DISK_FULL_MARKER).write_text("1")
    with pytest.raises(OSError, match=r"no space left on the device.*2 episodes already in the manifest.*"
                                      r"collect\.resume=true") as err:
        collect(BlockReuseEnv(**kwargs()), collect_settings(tmp_path, "local"))
    assert err.value.errno == errno.ENOSPC
    assert read_manifest(local)["episodes"] == 2 and not list(local.glob("*.tmp"))
    (local / DISK_FULL_MARKER).unlink()
    collect(BlockReuseEnv(**kwargs()), collect_settings(tmp_path, "local", resume=True))
    assert_same_collection(local, local_data)

    # Ray backend: the workers write the shards; room for two
    remote = tmp_path / "ray"
    remote.mkdir()
    (remote / DISK_FULL_MARKER).write_text("2")
    s = collect_settings(tmp_path, "ray", backend="ray", flush_episodes=1)
    with pytest.raises(OSError, match=r"no space left on the device.*collect\.resume=true"):
        collect_ray(kwargs(), s, ray_cfg(tmp_path))
    manifest = json.loads((remote / MANIFEST_FILE).read_text())
    assert manifest["episodes"] == 2 and len(manifest["shards"]) == 2 and not list(remote.glob("*.tmp"))
    (remote / DISK_FULL_MARKER).unlink()
    collect_ray(kwargs(), collect_settings(tmp_path, "ray", backend="ray", flush_episodes=1, resume=True),
                ray_cfg(tmp_path))
    assert_same_collection(remote, local_data)


# --- RL env workers --------------------------------------------------------------------------------------------------
def test_ray_vec_env_steps_as_dummy_vec_env(ray_local, tmp_path):
    from envs.vector import make_sb3_vec_env

    ray = ray_cfg(tmp_path)
    venvs = [make_sb3_vec_env(tiny_env_kwargs(), 2, subproc=False, seed=3),
             make_sb3_vec_env(tiny_env_kwargs(), 2, seed=3, ray=ray)]
    try:
        assert type(venvs[1]).__name__ == "RayVecEnv"
        obs = [v.reset() for v in venvs]
        rng = np.random.default_rng(0)
        dones = 0
        for _ in range(20):  # 8 steps an episode: crosses two auto-resets
            for key in obs[0]:
                np.testing.assert_array_equal(obs[0][key], obs[1][key])
            actions = np.stack([venvs[0].action_space.sample() for _ in range(2)])
            actions = rng.integers(0, 2, size=actions.shape)
            out = [v.step(actions) for v in venvs]
            obs = [o[0] for o in out]
            # rewards: DummyVecEnv buffers them as float32, SubprocVecEnv and RayVecEnv stack the envs' floats
            np.testing.assert_array_equal(out[0][1], out[1][1].astype(np.float32))
            np.testing.assert_array_equal(out[0][2], out[1][2])  # dones
            for a, b in zip(out[0][3], out[1][3]):
                if "terminal_observation" in a:
                    dones += 1
                    np.testing.assert_array_equal(a["terminal_observation"]["blocks"],
                                                  b["terminal_observation"]["blocks"])
        assert dones >= 2
        assert venvs[1].get_attr("max_blocks") == venvs[0].get_attr("max_blocks")
        assert venvs[1].env_method("describe", indices=[1]) == venvs[0].env_method("describe", indices=[1])
        assert venvs[1].has_attr("session") and not venvs[1].has_attr("no_such_attribute")
    finally:
        for v in venvs:
            v.close()


def test_ppo_on_two_ray_env_workers_equals_dummy_vec_env(ray_local, tmp_path):
    """A short PPO (2 updates) with 2 Ray env workers: the same weights as on DummyVecEnv under the same seed."""
    from test_rl import env_kwargs, tiny_rl

    from envs.vector import make_sb3_vec_env
    from policies.rl import build_agent

    weights = []
    for ray in (None, ray_cfg(tmp_path)):
        rl = tiny_rl(tmp_path, vec_env="ray" if ray else "dummy")
        venv = make_sb3_vec_env(env_kwargs(), rl.n_envs, subproc=False, seed=rl.seed, ray=ray)
        try:
            model = build_agent(rl, venv, "binary")
            model.learn(total_timesteps=128)
            assert model.num_timesteps == 128
            weights.append({k: v.clone() for k, v in model.policy.state_dict().items()})
        finally:
            venv.close()
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0, msg=key)


def test_train_agent_runs_on_ray_env_workers(ray_local, tmp_path):
    from test_rl import env_kwargs, tiny_rl

    from policies.rl import train_agent

    rl = tiny_rl(tmp_path, vec_env="ray", total_timesteps=64, eval={"freq": 0, "at_start": False},
                 checkpoint={"freq": 0})
    result = train_agent(rl, env_kwargs(), tmp_path / "out", ray=ray_cfg(tmp_path))
    assert result["timesteps"] == 64 and Path(result["policy"]).is_file()


# --- evaluation ------------------------------------------------------------------------------------------------------
def test_ray_evaluation_gives_the_local_rows(ray_local, tmp_path):
    """evaluate.backend=ray through the job: 2 prompt batches on 2 workers, a learned policy file among the
    heuristics; every row field equals the local run's except the wall times (and the speedups, tokens/s and policy
    time shares made of them)."""
    from envs.testing import save_tiny_checkpoint
    from policies.evaluate import run
    from policies.export import export_onnx
    from policies.predictor import BlockPredictor

    model = save_tiny_checkpoint(tmp_path / "tiny")
    torch.manual_seed(0)
    export_onnx(BlockPredictor(hidden=8), tmp_path / "predictor", action_mode="binary", output="refresh_logit",
                n_layers=2)
    common = [f"paths.model={model}", "generation.gen_length=16", "generation.block_length=8", "generation.steps=4",
              "evaluate.n_examples=4", "evaluate.batch_sizes=[2]", "evaluate.heuristics=[never,dual_cache]",
              "evaluate.thresholds=[0.5]", "evaluate.progress=false", "ray.num_workers=2",
              f"evaluate.learned=[{{name: predictor, path: '{tmp_path / 'predictor.onnx'}'}}]"]
    rows = {}
    for backend in ("local", "ray"):
        out = run(compose_cfg(tmp_path / backend, *common, f"evaluate.backend={backend}"))
        data = json.loads(Path(out["json"]).read_text())
        assert data["meta"]["backend"] == backend
        timed = ("wall_s", "speedup", "tokens_per_s", "policy_s", "policy_share")
        rows[backend] = [{k: v for k, v in r.items() if k not in timed} for r in data["rows"]]
    assert rows["ray"] == rows["local"]
    assert {r["family"] for r in rows["ray"]} == {"full", "never", "dual_cache", "oracle", "predictor"}
    assert len({r["flop_fraction"] for r in rows["ray"]}) > 2  # the policies differ, so equality is informative
    with pytest.raises(FileNotFoundError, match="mode=pretrain"):
        run(compose_cfg(tmp_path, f"paths.model={tmp_path / 'none'}", "evaluate.backend=ray"))


def test_a_worker_that_cannot_start_says_why(ray_local, tmp_path):
    s = collect_settings(tmp_path, "ray", backend="ray")
    with pytest.raises(RuntimeError, match=r"collect\.backend=ray: a Ray worker could not start: .*no-such-model"):
        collect_ray(tiny_env_kwargs(model=None, model_path=str(tmp_path / "no-such-model")), s, ray_cfg(tmp_path))
    assert not (tmp_path / "ray" / MANIFEST_FILE).exists()

"""Rollout collection and dataset shards: round trip, manifest, format/schema checks, behaviour configs, Hydra run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_cfg
from omegaconf import OmegaConf

from cache_core.features import N_BLOCK_FEATURES, N_GLOBAL_FEATURES, SCHEMA_ID
from envs.block_reuse_env import BlockReuseEnv
from envs.collect import BehaviourPolicy, collect
from envs.shards import (
    COLUMNS,
    MANIFEST_FILE,
    SHARD_FORMAT_VERSION,
    ShardFormatError,
    ShardWriter,
    load_shards,
    read_manifest,
)
from envs.testing import save_tiny_checkpoint, tiny_env_kwargs

REPO = Path(__file__).resolve().parents[1]
BEHAVIOUR = {
    "random_prob": 0.3,
    "random_scope": "step",
    "policies": [
        {"name": "dual_cache", "values": [2, None]},
        {"name": "elastic_cache", "values": [0.9]},
        {"name": "confidence", "values": [0.9, 0.5]},
        {"name": "dllm_cache", "values": [2]},
        {"name": "oracle", "values": [0.05]},
        {"name": "full", "weight": 0.5},
    ],
}


def settings(tmp_path, **overrides):
    """The collect group of conf/collect/default.yaml with these settings (behaviour replaced as a whole), checked as
    `python train.py` checks it."""
    s = {"episodes": 5, "shard_size": 12, "output_dir": str(tmp_path / "shards"), "seed": 0, "progress_bar": False,
         "behaviour": BEHAVIOUR, **overrides}
    cfg = compose_cfg(tmp_path, as_dict=True)
    behaviour = OmegaConf.merge(cfg.collect.behaviour, {"policies": []}, s.pop("behaviour"))
    cfg.collect = OmegaConf.merge(cfg.collect, s)
    cfg.collect.behaviour = behaviour
    from policies.config import typed

    return typed(cfg).collect


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collect")
    env = BlockReuseEnv(**tiny_env_kwargs(action_mode="depth"))
    result = collect(env, settings(tmp))
    return env, result, Path(result["output_dir"])


def test_round_trip(collected):
    env, result, directory = collected
    data = load_shards(directory)
    assert set(data) == set(COLUMNS)
    S, B, L = result["rows"], env.max_blocks, env.n_layers
    assert S == 5 * env.steps and result["episodes"] == 5
    # Shards hold whole episodes: one is written once 12 rows are buffered (2 episodes of 8 steps), the last at close.
    assert result["shards"] == 3 and len(list(directory.glob("shard-*.safetensors"))) == result["shards"]
    assert [s["rows"] for s in read_manifest(directory)["shards"]] == [16, 16, 8]
    shapes = {"blocks": (S, B, N_BLOCK_FEATURES), "block_mask": (S, B), "global": (S, N_GLOBAL_FEATURES),
              "actions": (S, B), "oracle_drift": (S, B, L), "reward": (S,), "kl": (S,), "flip": (S,),
              "flop_fraction": (S,), "episode": (S,), "step": (S,)}
    for key, shape in shapes.items():
        assert tuple(data[key].shape) == shape, key
    assert data["blocks"].dtype == torch.float32 and data["actions"].dtype == torch.int64
    assert data["block_mask"].dtype == torch.bool and data["episode"].dtype == torch.int64
    for key in ("blocks", "global", "oracle_drift", "reward", "kl", "flip", "flop_fraction"):
        assert torch.isfinite(data[key]).all(), key
    # Episodes and steps are contiguous; done marks each episode's last row.
    assert data["episode"].tolist() == [e for e in range(5) for _ in range(env.steps)]
    assert data["step"].tolist() == list(range(env.steps)) * 5
    assert data["done"].sum() == 5 and data["done"][env.steps - 1::env.steps].all()
    # Padded rows: zero features, zero actions, zero labels.
    pad = ~data["block_mask"]
    assert pad.any(), "tiny prompts leave padded block rows"
    assert not data["blocks"][pad].any() and not data["actions"][pad].any() and not data["oracle_drift"][pad].any()
    assert data["actions"].min() >= 0 and data["actions"].max() <= L
    assert data["random_action"].any() and not data["random_action"].all()
    assert data["prompt_index"].tolist()[:: env.steps] == [e % len(env.prompts) for e in range(5)]


def test_manifest(collected):
    env, result, directory = collected
    manifest = read_manifest(directory)
    assert manifest["format_version"] == SHARD_FORMAT_VERSION and manifest["schema_id"] == SCHEMA_ID
    assert manifest["n_layers"] == env.n_layers and manifest["max_blocks"] == env.max_blocks
    assert manifest["action_mode"] == "depth" and manifest["episodes"] == 5 and manifest["complete"] is True
    assert manifest["split"] == env.prompts.split and manifest["rows"] == result["rows"]
    assert manifest["behaviour"]["random_prob"] == 0.3
    components = manifest["behaviour"]["components"]
    assert [c["name"] for c in components][:2] == ["dual_cache", "dual_cache"]
    oracle = [c for c in components if c["name"] == "oracle"][0]
    assert oracle["knobs"]["depth"] is True  # depth action mode -> depth oracle
    assert len(manifest["episode_summary"]) == 5
    assert manifest["env"]["gen_length"] == env.gen_length
    data = load_shards(directory, keys=["behaviour"])
    assert set(data) == {"behaviour"} and data["behaviour"].max() < len(components)


def test_rows_replay_in_the_env(collected, tmp_path):
    """Replaying the recorded actions of an episode reproduces its observations, labels and rewards."""
    env, _, directory = collected
    data = load_shards(directory)
    rows = (data["episode"] == 0).nonzero().flatten()
    obs, _ = env.reset(seed=0, options={"prompt_index": int(data["prompt_index"][rows[0]])})
    for r in rows.tolist():
        np.testing.assert_allclose(obs["blocks"], data["blocks"][r].numpy(), atol=1e-6)
        obs, reward, _, _, info = env.step(data["actions"][r].numpy())
        np.testing.assert_allclose(info["oracle_drift"], data["oracle_drift"][r].numpy(), rtol=1e-5)
        assert reward == pytest.approx(float(data["reward"][r]), rel=1e-5, abs=1e-6)


def test_binary_random_only_collection(tmp_path):
    env = BlockReuseEnv(**tiny_env_kwargs())
    result = collect(env, settings(tmp_path, episodes=2, shard_size=1000,
                                   behaviour={"random_prob": 1.0, "policies": []}))
    data = load_shards(result["output_dir"])
    assert result["shards"] == 1 and data["random_action"].all()
    assert set(data["actions"].unique().tolist()) <= {0, 1}
    assert (data["behaviour"] == -1).all()


def test_episode_scope_random(tmp_path):
    env = BlockReuseEnv(**tiny_env_kwargs())
    result = collect(env, settings(tmp_path, episodes=6, behaviour={
        "random_prob": 0.5, "random_scope": "episode", "policies": [{"name": "dual_cache"}]}))
    data = load_shards(result["output_dir"])
    per_episode = data["random_action"].view(6, env.steps)
    assert (per_episode.all(1) | ~per_episode.any(1)).all()  # whole episodes are random or not


# --- format and schema errors ------------------------------------------------------------------------------------

def copy_shards(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_manifest(directory: Path, **changes):
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_version_mismatch(collected, tmp_path):
    d = copy_shards(collected[2], tmp_path / "v")
    edit_manifest(d, format_version=99)
    with pytest.raises(ShardFormatError, match=r"99.*version 1.*re-collect"):
        load_shards(d)


def test_schema_mismatch(collected, tmp_path):
    d = copy_shards(collected[2], tmp_path / "s")
    edit_manifest(d, schema_id="v0:old,columns|x")
    with pytest.raises(ShardFormatError) as err:
        load_shards(d)
    message = str(err.value)
    assert "v0:old,columns|x" in message and SCHEMA_ID in message and "re-collect" in message


@pytest.mark.parametrize("damage", ["garbage_manifest", "no_manifest", "missing_shard", "truncated_shard",
                                    "wrong_shape", "list_manifest", "escaping_path", "no_rows", "nan_drift"])
def test_corrupt_directories(collected, tmp_path, damage):
    d = copy_shards(collected[2], tmp_path / damage)
    shard = d / "shard-00000.safetensors"
    if damage == "garbage_manifest":
        (d / MANIFEST_FILE).write_text("{not json")
    elif damage == "list_manifest":
        (d / MANIFEST_FILE).write_text("[1, 2]")
    elif damage == "no_manifest":
        (d / MANIFEST_FILE).unlink()
    elif damage == "missing_shard":
        shard.unlink()
    elif damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:200])
    elif damage == "wrong_shape":
        edit_manifest(d, max_blocks=collected[0].max_blocks + 1)
    elif damage == "escaping_path":  # a manifest may not point outside its directory
        (tmp_path / "outside.safetensors").write_bytes(shard.read_bytes())
        shards = json.loads((d / MANIFEST_FILE).read_text())["shards"]
        edit_manifest(d, shards=[{**shards[0], "file": "../outside.safetensors"}, *shards[1:]])
    elif damage == "no_rows":
        shards = json.loads((d / MANIFEST_FILE).read_text())["shards"]
        edit_manifest(d, shards=[{"file": shards[0]["file"]}, *shards[1:]])
    elif damage == "nan_drift":
        from safetensors.torch import load_file, save_file

        tensors = load_file(shard)
        tensors["oracle_drift"][0, -1, 0] = float("nan")
        save_file(tensors, shard, metadata={"format_version": str(SHARD_FORMAT_VERSION), "schema_id": SCHEMA_ID})
    with pytest.raises(ShardFormatError, match="re-collect"):
        load_shards(d)


def test_writer_refuses_existing_directory(collected):
    env, _, directory = collected
    with pytest.raises(FileExistsError, match="overwrite"):
        collect(env, settings(directory.parent, episodes=1, output_dir=str(directory)))
    with pytest.raises(FileExistsError, match="complete collection: nothing to resume"):
        collect(env, settings(directory.parent, episodes=1, output_dir=str(directory), resume=True))


def test_overwrite_replaces_only_a_collection_of_this_project(tmp_path):
    env = BlockReuseEnv(**tiny_env_kwargs())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / MANIFEST_FILE).write_text(json.dumps({"hello": "world"}))
    (foreign / "shard-00000.safetensors").write_bytes(b"someone's data")
    with pytest.raises(ShardFormatError, match="not a blockreuse shard manifest"):
        collect(env, settings(tmp_path, episodes=1, output_dir=str(foreign), overwrite=True))
    assert (foreign / "shard-00000.safetensors").read_bytes() == b"someone's data"  # nothing deleted
    ours = tmp_path / "ours"
    collect(env, settings(tmp_path, episodes=2, shard_size=1, output_dir=str(ours)))
    (ours / "notes.txt").write_text("mine")
    again = collect(env, settings(tmp_path, episodes=1, output_dir=str(ours), overwrite=True))
    assert again["episodes"] == 1 and (ours / "notes.txt").read_text() == "mine"  # only its own files went
    assert sorted(p.name for p in ours.glob("shard-*")) == ["shard-00000.safetensors"]


def test_a_stopped_collection_resumes_to_the_same_data(tmp_path, caplog):
    """Interrupt a collection after two shards (with a third written but not in the manifest, as a kill between the
    shard and the manifest leaves it), resume it: the data equals an uninterrupted collection's."""
    env = BlockReuseEnv(**tiny_env_kwargs())
    whole = collect(env, settings(tmp_path, episodes=5, flush_episodes=1, output_dir=str(tmp_path / "whole")))
    stopped = tmp_path / "stopped"

    class Stop(Exception):
        pass

    calls = {"n": 0}
    real = ShardWriter.flush

    def flush_then_stop(self):
        real(self)
        calls["n"] += 1
        if calls["n"] == 2:
            (self.directory / "shard-00002.safetensors").write_bytes(b"half-written")  # the orphan of a kill
            raise Stop

    ShardWriter.flush = flush_then_stop
    try:
        with pytest.raises(Stop):
            collect(env, settings(tmp_path, episodes=5, flush_episodes=1, output_dir=str(stopped)))
    finally:
        ShardWriter.flush = real
    manifest = read_manifest(stopped)
    assert manifest["episodes"] == 2 and not manifest["complete"]  # the manifest counts what is on disk
    with caplog.at_level("WARNING", logger="envs.shards"):
        assert load_shards(stopped)["episode"].max() == 1  # the orphan is left out, and said so
    assert "not in the manifest" in caplog.text
    with pytest.raises(ValueError, match="resuming with other settings than the killed collection had .seed"):
        collect(env, settings(tmp_path, episodes=5, flush_episodes=1, output_dir=str(stopped), resume=True, seed=9))
    with pytest.raises(ValueError, match="already holds 2 episodes, more than collect.episodes=1"):
        collect(env, settings(tmp_path, episodes=1, flush_episodes=1, output_dir=str(stopped), resume=True))
    with pytest.raises(FileNotFoundError, match="no collection to resume"):
        collect(env, settings(tmp_path, episodes=5, output_dir=str(tmp_path / "typo"), resume=True))
    resumed = collect(env, settings(tmp_path, episodes=5, flush_episodes=1, output_dir=str(stopped), resume=True))
    assert resumed["resumed_at"] == 2 and resumed["episodes"] == 5
    a, b = load_shards(whole["output_dir"]), load_shards(stopped)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("behaviour,match", [
    ({"random_prob": 1.5, "policies": []}, r"collect.behaviour.random_prob=1.5 must be <= 1"),
    ({"random_scope": "block", "policies": [{"name": "full"}]}, r"collect.behaviour.random_scope='block'"),
    ({"random_prob": 0.1, "policies": []}, "empty"),
    ({"policies": [{"name": "nope"}]}, r"collect.behaviour.policies\[0\].name='nope' is not a policy"),
    ({"policies": [{"name": "full", "values": [1]}]}, "no knob"),
    ({"policies": [{"name": "dual_cache", "values": [0]}]}, "refresh_interval"),
    ({"policies": [{"name": "full", "colour": "red"}]}, "colour"),
    ({"policies": [{"name": "full", "weight": -1.0}]}, r"collect.behaviour.policies\[0\].weight=-1.0 must be >= 0"),
])
def test_bad_behaviour(tmp_path, behaviour, match):
    env = BlockReuseEnv(**tiny_env_kwargs())
    with pytest.raises((ValueError, KeyError), match=match):
        BehaviourPolicy(settings(tmp_path, behaviour=behaviour).behaviour, env, seed=0)


# --- the Hydra entry point -----------------------------------------------------------------------------------------

def test_run_from_hydra_config(tmp_path):
    from envs import collect as collect_module

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    cfg = compose_cfg(tmp_path, f"paths.model={ckpt}", "generation.gen_length=32", "generation.steps=4",
                      "collect.episodes=2", "collect.n_prompts=2", "collect.shard_size=3", "collect.progress_bar=false")
    result = collect_module.run(cfg)
    assert Path(result["output_dir"]) == tmp_path / "out" / "shards"  # in the run directory
    assert result["episodes"] == 2 and result["rows"] == 8 and result["shards"] == 2  # one episode (4 rows >= 3) each
    manifest = read_manifest(result["output_dir"])
    assert manifest["split"] == "train" and manifest["env"]["prompts"]["source"] == "TaskSuitePromptSet"
    assert load_shards(result["output_dir"])["blocks"].shape[1] == manifest["max_blocks"]


def test_collect_config_composes_from_the_real_yaml(tmp_path):
    cfg = compose_cfg(tmp_path, "mode=collect", "seed=3")
    assert cfg.collect.split == "train" and cfg.collect.seed == 3  # collect.seed follows the root seed
    assert {p.name for p in cfg.collect.behaviour.policies} >= {"dual_cache", "oracle", "elastic_cache"}
    with pytest.raises(ValueError, match=r"collect.episodes=0 must be >= 1"):
        compose_cfg(tmp_path, "collect.episodes=0")


def test_collection_mixes_decoding_settings(tmp_path):
    """env.decode_settings: each episode decodes under one drawn setting; the shards (sized for the smallest block)
    train one policy for all of them, and their setting columns tell the settings apart."""
    from cache_core.features import TEXT_SCHEMA
    from envs import collect as collect_module

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    settings = "env.decode_settings=[{block_length: 4, steps: 8}, {block_length: 8, steps: null, threshold: 0.5}]"
    cfg = compose_cfg(tmp_path, f"paths.model={ckpt}", "generation.gen_length=16", "generation.block_length=8",
                      "generation.steps=4", "collect.episodes=6", "collect.n_prompts=4", "collect.progress_bar=false",
                      settings)
    result = collect_module.run(cfg)
    manifest = read_manifest(result["output_dir"])
    assert len(manifest["env"]["settings"]) == 2
    data = load_shards(result["output_dir"])
    assert data["blocks"].shape[1] == manifest["max_blocks"] == (manifest["env"]["max_prompt_length"] + 16) // 4
    block_size = data["global"][:, TEXT_SCHEMA.global_index("block_size")]
    assert set(np.round(block_size.numpy() * 64).astype(int).tolist()) == {4, 8}  # both settings were drawn


def test_experiment_long_composes_the_long_regime(tmp_path):
    cfg = compose_cfg(tmp_path, "experiment=long")
    assert (cfg.generation.gen_length, cfg.generation.block_length, cfg.generation.steps) == (256, 32, 256)
    assert list(cfg.task.tasks) == ["motif", "shift", "xor"]
    settings = cfg.env.setting_list
    assert {s["block_length"] for s in settings} == {8, 16, 32}
    assert {s["threshold"] for s in settings} == {None, 0.9} and all(
        (s["steps"] is None) == (s["threshold"] is not None) for s in settings)
    assert cfg.policy.budget_conditioned and cfg.rl.warm_start_auto.endswith("long_predictor.safetensors")

"""The RL agent (policies/rl.py): per-block policy, training on a tiny random model, export round trip, seeds,
resume, warm start, offline W&B, bad configs. Tiny models and a few hundred timesteps: seconds each."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_cfg, wandb_records
from omegaconf import OmegaConf

from cache_core.bench.tracking import LoggerConfig
from cache_core.features import (
    N_BLOCK_FEATURES,
    N_GLOBAL_FEATURES,
    SCHEMA_ID,
    TEXT_SCHEMA,
    StepFeatures,
    policy_input,
)
from cache_core.generate import generate
from cache_core.learned import LearnedPolicy, read_manifest
from envs.block_reuse_env import BlockReuseEnv
from envs.testing import random_pairs, save_tiny_checkpoint, tiny_env_kwargs, tiny_model
from policies.config import RLConfig, typed
from policies.predictor import read_predictor
from policies.rl import load_agent, resolve_algo, train_agent
from policies.rl_callbacks import checkpoint_files, read_agent_checkpoint
from policies.rl_policy import ExportedActor, PerBlockActorCriticPolicy

REPO = Path(__file__).resolve().parents[1]
N_FEATURES = N_BLOCK_FEATURES + N_GLOBAL_FEATURES


def tiny_rl(tmp_path: Path, **overrides) -> RLConfig:
    """The rl group of conf/rl/ppo.yaml for a few-hundred-step PPO run on the tiny env (from scratch, export into
    tmp_path), with `overrides` merged in (nested dicts merge key by key) and checked as `python train.py` checks."""
    base = {
        "total_timesteps": 128, "n_envs": 2, "vec_env": "dummy", "seed": 0, "verbose": 0, "progress_bar": False,
        "log_formats": ["csv"], "warm_start": None,
        "policy": {"hidden": 16, "arch": "mlp", "net_arch": {"pi": [], "vf": [16]}},
        "hyperparams": {"learning_rate": 1e-3, "gamma": 0.99},
        "ppo": {"n_steps": 32, "batch_size": 32, "n_epochs": 2},
        "eval": {"budgets": [0.3, 0.6], "freq": 64, "batch_size": 4, "at_start": True},
        "checkpoint": {"freq": 64, "dir": str(tmp_path / "ckpt")},
        "export": {"path": str(tmp_path / "policies" / "rl_agent.onnx"), "which": "best"},
    }
    cfg = compose_cfg(tmp_path, as_dict=True)
    OmegaConf.set_struct(cfg, False)  # new keys in open dicts, as `+rl.env.key=...` adds them on the command line
    cfg.rl = OmegaConf.merge(cfg.rl, base, overrides)
    return typed(cfg).rl


def offline_logger(directory: Path) -> LoggerConfig:
    return LoggerConfig(backend="wandb", mode="offline", project="blockreuse", entity=None, name=None, group=None,
                        tags=["rl"], save_dir=str(directory))


def env_kwargs(**overrides) -> dict:
    return tiny_env_kwargs(budget=[0.2, 0.8], **overrides)


def eval_kwargs() -> dict:
    return tiny_env_kwargs(prompts=random_pairs(n=4, seed=7))


def train(tmp_path: Path, env_overrides: dict | None = None, logger: LoggerConfig | None = None, **overrides) -> dict:
    return train_agent(tiny_rl(tmp_path, **overrides), env_kwargs(**(env_overrides or {})), tmp_path / "out",
                       eval_env_kwargs=eval_kwargs(), logger=logger)


def env_observations(action_mode: str, n: int = 24, seed: int = 0) -> list[dict]:
    """Observations of random-action episodes, with budgets, padded rows and decoding blocks of every position."""
    env = BlockReuseEnv(**env_kwargs(action_mode=action_mode))
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    out = [obs]
    while len(out) < n:
        obs, _, terminated, _, _ = env.step(env.action_space.sample())
        if terminated:
            obs, _ = env.reset()
        out.append(obs)
    return out


def stack(observations: list[dict]) -> dict:
    return {k: np.stack([o[k] for o in observations]) for k in observations[0]}


@pytest.fixture(scope="module", params=["binary", "depth"])
def trained(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"rl_{request.param}")
    result = train(tmp, env_overrides={"action_mode": request.param})
    return request.param, tmp, result


# --- bad configs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    ({"algo": "nope"}, "unknown rl.algo 'nope'"),
    ({"algo": "sac"}, "does not support MultiBinary"),
    ({"algo": "dqn"}, "does not support MultiBinary"),
    ({"n_envs": 0}, r"rl.n_envs=0 must be >= 1"),
    ({"max_minutes": 0}, r"rl.max_minutes=0.0 must be > 0"),
    ({"total_timesteps": 0}, r"rl.total_timesteps=0 must be >= 1"),
    ({"vec_env": "mpi"}, r"rl.vec_env='mpi'"),
    ({"eval": {"budgets": [1.5]}}, r"rl.eval.budgets\[0\]=1.5"),
    ({"export": {"which": "median"}}, r"rl.export.which='median'"),
    ({"export": {"budget": 0.0}}, r"rl.export.budget=0.0"),
    ({"warm_start": "a.ckpt", "resume": "b.zip"}, "exclusive"),
    ({"env": {"num_threads": 1}}, r"rl.env has unknown env settings \['num_threads'\]"),
])
def test_bad_settings_are_refused_before_anything_starts(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        train_agent(tiny_rl(tmp_path, **overrides), env_kwargs(), tmp_path, eval_env_kwargs=eval_kwargs())
    assert not (tmp_path / "ckpt").exists()


def test_algos_by_action_space():
    assert resolve_algo("PPO", "depth").__name__ == "PPO" and resolve_algo("a2c", "binary").__name__ == "A2C"
    with pytest.raises(ValueError, match="does not support MultiDiscrete.*'ppo', 'a2c'"):
        resolve_algo("td3", "depth")
    with pytest.raises(ValueError, match="unknown action_mode"):
        resolve_algo("ppo", "layers")


# --- the per-block policy ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action_mode", ["binary", "depth"])
def test_policy_is_per_block(action_mode, tmp_path):
    from stable_baselines3 import PPO

    from envs.vector import make_sb3_vec_env
    from policies.rl import policy_kwargs

    venv = make_sb3_vec_env(env_kwargs(action_mode=action_mode), 1, subproc=False, seed=0)
    rl = tiny_rl(tmp_path, policy={"hidden": 16, "init_refresh_prob": 0.2, "net_arch": {"pi": [], "vf": [64]}})
    model = PPO(PerBlockActorCriticPolicy, venv, n_steps=16, batch_size=16, seed=0,
                policy_kwargs=policy_kwargs(rl.policy))
    obs = stack(env_observations(action_mode, n=8))
    pinned = (obs["block_mask"] == 0) | (obs["blocks"][..., 2] > 0.5)  # padding rows and the decoding block
    with torch.no_grad():  # the initial policy refreshes a free block with probability ~0.2
        dist = model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0]).distribution
        reuse = 1 - dist.probs if action_mode == "binary" else torch.stack([d.probs[:, 0] for d in dist], dim=1)
    np.testing.assert_allclose(1 - reuse.numpy()[~pinned], 0.2, atol=0.03)
    k = 1 if action_mode == "binary" else 3
    head = model.policy.action_net.linear
    assert tuple(head.weight.shape) == (k, 16)  # one head for every block: nothing indexed by block row
    with torch.no_grad():
        head.weight.normal_(0, 3.0)
        head.bias.normal_(0, 1.0)
    actor = ExportedActor(model.policy).eval()
    x = policy_input(torch.as_tensor(obs["blocks"]), torch.as_tensor(obs["global"]))
    logits = actor(x)
    assert logits.shape == (8, x.shape[1], 2 if action_mode == "binary" else 3)
    # The same function of a block whatever the number of blocks: drop the padded rows, add foreign ones.
    real = obs["block_mask"][0].astype(bool)
    torch.testing.assert_close(actor(x[:1, torch.as_tensor(real)]), logits[:1, torch.as_tensor(real)])
    # Padded rows and the decoding block are pinned to action 0 (reuse): their action changes nothing.
    assert (logits.argmax(-1).numpy()[pinned] == 0).all()
    dist = model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0])
    entropy = dist.distribution.entropy() if action_mode == "binary" else torch.stack(
        [d.entropy() for d in dist.distribution], dim=1)
    assert entropy.detach().numpy()[pinned].max() < 1e-6


# --- training, export, the deployable file ---------------------------------------------------------------------
def test_training_exports_a_budget_conditioned_policy(trained):
    action_mode, tmp, result = trained
    onnx = Path(result["policy"])
    assert onnx == tmp / "policies" / "rl_agent.onnx" and onnx.exists()
    manifest = read_manifest(onnx)
    assert manifest["budget_conditioned"] is True and manifest["output"] == "action_logits"
    assert manifest["action_mode"] == action_mode and manifest["n_layers"] == 2 and manifest["schema_id"] == SCHEMA_ID
    assert manifest["source"]["kind"] == "rl" and manifest["source"]["algo"] == "ppo"
    assert result["timesteps"] >= 128
    # evaluated at start, every 64 steps and at the end, at both budgets
    assert len(result["eval"]) >= 3 and all(len(e["budgets"]) == 2 for e in result["eval"])
    assert {"exact_match", "agreement", "flop_fraction"} <= set(result["eval"][-1]["budgets"][0])
    assert manifest["metrics"]["eval_score"] == max(e["score"] for e in result["eval"])
    saved = sorted((tmp / "ckpt").glob("rl_agent_*_steps.safetensors"))
    assert saved and all(checkpoint_files(p)[1].is_file() for p in saved)  # weights + the JSON record
    assert not list((tmp / "ckpt").glob("*.zip"))  # SB3's pickled zips are never written
    for name in ("rl_agent_best", "rl_agent_final"):
        assert all(p.is_file() for p in checkpoint_files(tmp / "ckpt" / name))


def test_exported_file_acts_like_the_sb3_policy(trained):
    action_mode, tmp, result = trained
    model = load_agent(tmp / "ckpt" / "rl_agent_best", tiny_rl(tmp), vec(action_mode), action_mode)  # the exported
    # weights are the best model's
    obs = stack(env_observations(action_mode, n=32))
    x = policy_input(torch.as_tensor(obs["blocks"]), torch.as_tensor(obs["global"]))
    # A briefly trained policy reuses almost everywhere: give it a random head centred on these observations, so the
    # comparison covers every action.
    head = model.policy.action_net.linear
    with torch.no_grad():
        torch.manual_seed(0)
        head.weight.normal_(0.0, 3.0)
        head.bias.zero_()
        enc = model.policy.features_extractor.encode_blocks(x, torch.as_tensor(obs["block_mask"]).bool())
        free = enc[..., -1] > 0.5
        head.bias.copy_(0.0123 - head(enc[..., :-2])[free].median(0).values)  # offset: no logit sits at a tie
    path = tmp / "sharp" / "rl_agent.onnx"
    from policies.rl import export_agent

    export_agent(model, path, n_layers=2, budget_conditioned=True)
    expected, _ = model.predict(obs, deterministic=True)
    policy = LearnedPolicy(path)

    scores = policy.scores(StepFeatures(x[..., :N_BLOCK_FEATURES], x[:, 0, N_BLOCK_FEATURES:]))
    actions = scores.argmax(-1)
    real = obs["block_mask"].astype(bool)
    np.testing.assert_array_equal(actions[real], expected[real].astype(np.int64))
    assert set(np.unique(actions[real])) == set(range(2 if action_mode == "binary" else 3))


def test_generate_runs_the_exported_agent_at_any_budget(trained):
    action_mode, tmp, result = trained
    model = tiny_model()
    prompts = [p for p, _ in random_pairs(n=3, seed=3)]
    spent = []
    for budget in (0.25, 0.9, None):
        out = generate(model, prompts, gen_length=16, block_length=4, steps=8, policy=result["policy"],
                       budget=budget)
        assert out.tokens.shape == (3, 16) and out.policy["policy"] == "learned"
        spent.append(out.stats.flop_fraction)
    assert all(0 < f <= 1 for f in spent)


# --- seeds and resume ------------------------------------------------------------------------------------------
def _params(path: Path) -> dict:
    return {k: v for k, v in read_agent_checkpoint(path)[0].items() if k.startswith("policy.")}


def vec(action_mode: str = "binary"):
    from envs.vector import make_sb3_vec_env

    return make_sb3_vec_env(env_kwargs(action_mode=action_mode), 1, subproc=False, seed=0)


def test_same_seed_same_agent_other_seed_other_agent(tmp_path):
    settings = {"total_timesteps": 64, "eval": {"at_start": False, "freq": 0}, "checkpoint": {"freq": 0}}
    a = train(tmp_path / "a", **settings, seed=5)
    b = train(tmp_path / "b", **settings, seed=5)
    c = train(tmp_path / "c", **settings, seed=6)
    pa, pb, pc = (_params(Path(r["checkpoint"])) for r in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)
    assert Path(a["policy"]).read_bytes() == Path(b["policy"]).read_bytes()


def test_resume_continues_from_data_only_checkpoints(trained, tmp_path):
    action_mode, tmp, result = trained
    final = Path(result["checkpoint"])
    tensors, record = read_agent_checkpoint(final)
    assert record["num_timesteps"] == result["timesteps"] and record["policy_config"]["hidden"] == 16
    assert any(k.startswith("optim.") for k in tensors)  # the optimiser's state travels too
    resumed = train(tmp_path, env_overrides={"action_mode": action_mode}, resume=str(final), total_timesteps=192,
                    eval={"at_start": False, "freq": 0})
    assert resumed["timesteps"] >= 192 > result["timesteps"]
    # an agent rebuilt from a checkpoint holds its weights and counters
    model = load_agent(final, tiny_rl(tmp_path), vec(action_mode), action_mode)
    assert model.num_timesteps == result["timesteps"]
    stored = {**tensors, **{a: tensors[t] for a, t in record["aliases"].items()}}  # a shared extractor is stored once
    assert record["aliases"]
    assert all(torch.equal(v, stored[f"policy.{k}"]) for k, v in model.policy.state_dict().items())


@pytest.mark.parametrize("damage, match", [
    ("zip", "SB3 zips hold pickles"),
    ("no_json", "no such file"),
    ("truncated", "not a readable safetensors file"),
    ("other_schema", "feature schema 'v0:old'"),
    ("bad_counter", "num_timesteps=-5 must be a count"),
    ("nan", "NaN/inf"),
    ("half_saved", "not those agent.json was written with"),
])
def test_resume_refuses_what_is_not_a_checkpoint_of_this_project(trained, tmp_path, damage, match):
    from safetensors.torch import load_file, save_file

    action_mode, tmp, result = trained
    src_t, src_j = checkpoint_files(result["checkpoint"])
    t, j = checkpoint_files(tmp_path / "agent")
    t.write_bytes(src_t.read_bytes())
    j.write_text(src_j.read_text())
    record = json.loads(j.read_text())
    target = t
    if damage == "zip":
        target = tmp_path / "agent.zip"
        target.write_bytes(b"PK\x03\x04 a pickle inside")
    elif damage == "no_json":
        j.unlink()
    elif damage == "truncated":
        t.write_bytes(t.read_bytes()[:100])
    elif damage == "other_schema":
        j.write_text(json.dumps({**record, "schema_id": "v0:old"}))
    elif damage == "bad_counter":
        j.write_text(json.dumps({**record, "num_timesteps": -5}))
    elif damage == "nan":  # a diverged run's weights, recorded as they are
        tensors = load_file(t)
        first = next(k for k in tensors if k.startswith("policy."))
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        save_file(tensors, t)
    elif damage == "half_saved":  # new weights beside the old record (a kill between the two renames)
        tensors = load_file(t)
        save_file({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, t)
    if damage in ("truncated", "nan"):  # the record matches the file: the file's own defect is named
        j.write_text(json.dumps({**record, "tensors_sha256": hashlib.sha256(t.read_bytes()).hexdigest()}))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train(tmp_path / "r", env_overrides={"action_mode": action_mode}, resume=str(target))
    assert not (tmp_path / "r" / "ckpt").exists()  # refused before anything started


def test_no_pickle_is_loaded_from_a_user_path():
    """grep-able: no SB3 `.load(` (it unpickles), no `pickle`, no `torch.load` without weights_only=True."""
    import re

    offenders = []
    for path in sorted(REPO.glob("*/**/*.py")):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if (re.search(r"\b(PPO|A2C|cls|model|BaseAlgorithm)\.load\(", code) or re.search(r"\bimport pickle\b", code)
                    or ("torch.load(" in code and "weights_only=True" not in code)):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, offenders


# --- warm start from the supervised predictor -------------------------------------------------------------------
def test_warm_start_reproduces_the_supervised_predictor(tmp_path):
    from envs.vector import make_sb3_vec_env
    from policies.predictor import BlockPredictor
    from policies.rl import build_agent, warm_start, warm_start_policy

    obs = stack(env_observations("binary", n=16))
    x = policy_input(torch.as_tensor(obs["blocks"]), torch.as_tensor(obs["global"]))
    x1 = x.clone()
    x1[..., TEXT_SCHEMA.input_index("budget")] = 1.0  # the budget feature as the supervised data had it
    mask = torch.as_tensor(obs["block_mask"]).bool()
    free = mask & torch.as_tensor(obs["blocks"][..., 2] < 0.5)
    torch.manual_seed(0)
    net = BlockPredictor(N_FEATURES, hidden=24, arch="transformer", n_outputs=1, n_layers_attn=1, n_heads=2)
    with torch.no_grad():  # centre its refresh logits on these states, so that it refreshes some blocks, not all
        net.head.weight.mul_(20.0)
        net.head.bias.add_(0.0123 - float(net(x1, mask)[free].median()) + float(torch.logit(torch.tensor(0.3))))
    ckpt = tmp_path / "best.ckpt"  # the layout of a Lightning checkpoint of policies.supervised
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"threshold": 0.3, "budget_conditioned": False, "action_mode": "binary"},
                "blockreuse": {"net_config": net.config()}}, ckpt)
    rl = tiny_rl(tmp_path)
    rl = replace(rl, policy=warm_start_policy(rl.policy, read_predictor(ckpt)[1]))
    venv = make_sb3_vec_env(env_kwargs(), 1, subproc=False, seed=0)
    model = build_agent(rl, venv, "binary")
    info = warm_start(model.policy, ckpt)
    assert info["head"] and info["tensors"] > 0
    with torch.no_grad():  # at budget 1 the agent decides as the predictor at its threshold
        expected = torch.sigmoid(net(x1, mask)) >= 0.3
        got = ExportedActor(model.policy).eval()(x1).argmax(-1).bool()
        assert torch.equal(got[free], expected[free]) and expected[free].any() and not expected[free].all()
        # and the budget it never saw does not move it (yet)
        torch.testing.assert_close(ExportedActor(model.policy)(x), ExportedActor(model.policy)(x1))
    with pytest.raises(ValueError, match="depth agent|binary predictor cannot start a depth"):
        model_d = build_agent(rl, make_sb3_vec_env(env_kwargs(action_mode="depth"), 1, subproc=False), "depth")
        warm_start(model_d.policy, ckpt)


def test_warm_start_from_the_exported_predictor_weights(tmp_path, caplog):
    """mode=export writes the predictor's weights next to its .onnx; rl.warm_start=auto (the default) starts from
    them, and an agent so started decides as the exported file does."""
    from envs.vector import make_sb3_vec_env
    from policies.export import export_onnx, weights_path, write_weights
    from policies.predictor import BlockPredictor
    from policies.rl import build_agent, resolve_warm_start, warm_start, warm_start_policy

    obs = stack(env_observations("binary", n=16))
    x = policy_input(torch.as_tensor(obs["blocks"]), torch.as_tensor(obs["global"]))
    x[..., TEXT_SCHEMA.input_index("budget")] = 1.0
    mask = torch.as_tensor(obs["block_mask"]).bool()
    free = mask & torch.as_tensor(obs["blocks"][..., 2] < 0.5)
    torch.manual_seed(1)
    net = BlockPredictor(N_FEATURES, hidden=24, arch="transformer", n_outputs=1, n_layers_attn=1, n_heads=2).eval()
    with torch.no_grad():
        net.head.weight.mul_(20.0)
        net.head.bias.add_(0.0123 - float(net(x, mask)[free].median()))
    onnx_path = export_onnx(net, tmp_path / "predictor", action_mode="binary", output="refresh_logit", n_layers=2)
    weights = write_weights(net, onnx_path, threshold=0.5, action_mode="binary", budget_conditioned=False)
    assert weights == weights_path(tmp_path / "predictor") == tmp_path / "predictor.safetensors"
    tensors, meta = read_predictor(weights)
    assert meta["net_config"] == net.config() and meta["action_mode"] == "binary" and meta["threshold"] == 0.5
    assert set(tensors) == set(net.state_dict())

    rl = tiny_rl(tmp_path)
    auto = replace(rl, warm_start="auto", warm_start_auto=str(weights))
    assert resolve_warm_start(auto, "binary") == str(weights)
    with caplog.at_level("WARNING", logger="policies.rl"):
        assert resolve_warm_start(auto, "depth") is None  # a binary predictor cannot start a depth agent
        assert resolve_warm_start(replace(auto, warm_start_auto=str(tmp_path / "none.safetensors")), "binary") is None
    assert "binary policy and this agent is depth" in caplog.text and "starts from scratch" in caplog.text
    assert resolve_warm_start(replace(auto, warm_start=None), "binary") is None
    assert resolve_warm_start(replace(auto, resume="a.zip"), "binary") is None

    rl = replace(rl, policy=warm_start_policy(rl.policy, meta))
    model = build_agent(rl, make_sb3_vec_env(env_kwargs(), 1, subproc=False, seed=0), "binary")
    assert warm_start(model.policy, weights)["head"]
    with torch.no_grad():
        expected = torch.sigmoid(net(x, mask)) >= 0.5
        got = ExportedActor(model.policy).eval()(x).argmax(-1).bool()
    assert torch.equal(got[free], expected[free]) and expected[free].any() and not expected[free].all()

    other = tmp_path / "other.safetensors"  # weights written under another feature schema are refused
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(other),
              metadata={"schema_id": "v0:old", "net_config": json.dumps(net.config()), "action_mode": "binary"})
    with pytest.raises(ValueError, match="feature schema 'v0:old'"):
        read_predictor(other)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_predictor(tmp_path / "broken.safetensors")


# --- vectorised training, offline W&B, the Hydra entry point --------------------------------------------------------
def wandb_history_keys(run_dir: Path, timeout: float = 30.0) -> set[str]:
    """Metric keys of an offline W&B run, read from its `.wandb` record log (LevelDB log framing, protobuf records).
    W&B's writer process may still be flushing when `finish()` returns: wait for the run's exit record."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        keys = _read_wandb_keys(next(run_dir.glob("run-*.wandb")))
        if "record:exit" in keys or time.monotonic() > deadline:
            return keys
        time.sleep(0.5)


def _read_wandb_keys(path: Path) -> set[str]:
    from wandb.proto import wandb_internal_pb2 as pb

    records = wandb_records(path)
    keys: set[str] = set()
    kinds: set[str] = set()
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kinds.add(record.WhichOneof("record_type") or "")
        if record.HasField("history"):
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys | {f"record:{k}" for k in kinds}


def test_subproc_training_logs_to_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = train(tmp_path, n_envs=2, vec_env="subproc", logger=offline_logger(tmp_path / "wb"),
                   total_timesteps=64, eval={"freq": 0, "at_start": False}, checkpoint={"freq": 0})
    run_dirs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1 and result["wandb_dir"] == str(run_dirs[0])
    keys = wandb_history_keys(run_dirs[0])
    for key in ("rollout/ep_rew_mean", "rollout/flop_fraction", "rollout/exact_match", "train/loss",
                "train/entropy_loss", "eval/exact_match@0.3", "eval/flop_fraction@0.6", "eval/score", "global_step",
                "record:config", "record:artifact"):
        assert key in keys, f"{key} not logged; logged: {sorted(keys)}"


def test_train_py_mode_rl_from_hydra_config(tmp_path, monkeypatch):
    from policies import rl

    ckpt = save_tiny_checkpoint(tmp_path / "builtin")
    cfg = compose_cfg(
        tmp_path, "mode=rl", f"paths.root={tmp_path}", f"paths.model={ckpt}",
        "generation.gen_length=32", "generation.steps=4", "rl.total_timesteps=32", "rl.n_envs=1", "rl.vec_env=dummy",
        "rl.ppo.n_steps=16", "rl.ppo.batch_size=16", "rl.ppo.n_epochs=1", "rl.env.n_prompts=4",
        "rl.eval.n_prompts=2", "rl.eval.freq=0", "rl.eval.at_start=false", "rl.eval.budgets=[0.5]",
        "rl.policy.hidden=8", "rl.progress_bar=false", "rl.verbose=0",
    )
    result = rl.run(cfg)
    assert Path(result["policy"]) == tmp_path / "out" / "rl_agent.onnx"  # the run directory, not checkpoints/
    assert not (tmp_path / "checkpoints").exists()
    manifest = json.loads(Path(result["policy"]).with_suffix(".json").read_text())
    assert manifest["budget_conditioned"] is True and manifest["source"]["env"]["budget"] == [0.1, 0.6]
    assert manifest["default_budget"] == 0.6  # without a budget, generate() runs it at the top of its range
    assert manifest["source"]["eval_split"] == "validation"


@pytest.mark.slow
def test_agent_learns_to_spend_its_budget(tmp_path):
    """~1-2 min: with a KL penalty and a budget penalty, the trained agent spends more at a larger budget."""
    settings = tiny_rl(tmp_path, total_timesteps=6144, ppo={"n_steps": 64, "batch_size": 64, "n_epochs": 4},
                       hyperparams={"learning_rate": 3e-3}, eval={"freq": 0, "at_start": False, "budgets": [0.25, 0.9]},
                       export={"which": "last"})
    result = train_agent(settings, tiny_env_kwargs(budget=[0.2, 1.0], w_flops=0.0, w_kl=2.0, w_flip=0.5, w_budget=4.0,
                                                   w_exact=0.0, w_agree=0.0), tmp_path / "out",
                         eval_env_kwargs=eval_kwargs())
    low, high = result["eval"][-1]["budgets"]
    assert high["flop_fraction"] > low["flop_fraction"] + 0.05, result["eval"][-1]


@pytest.mark.slow
def test_multirun_logs_one_offline_wandb_run_per_job(tmp_path):
    """~25 s: `python train.py -m mode=rl rl.seed=0,1`: two jobs, two offline W&B runs, each with the exported
    artifact, and two exported agents."""
    import os
    import subprocess
    import sys

    ckpt = save_tiny_checkpoint(tmp_path / "builtin")
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "mode=rl", "rl.seed=0,1", f"paths.root={tmp_path}",
           f"paths.model={ckpt}", f"hydra.sweep.dir={sweep}", "generation.gen_length=32", "generation.steps=4",
           "rl.total_timesteps=16", "rl.n_envs=1", "rl.vec_env=dummy", "rl.ppo.n_steps=16", "rl.ppo.batch_size=16",
           "rl.ppo.n_epochs=1", "rl.env.n_prompts=2", "rl.eval.n_prompts=2", "rl.eval.freq=0",
           "rl.eval.at_start=false", "rl.eval.budgets=[0.5]", "rl.policy.hidden=8", "rl.progress_bar=false",
           "rl.verbose=0", "rl.checkpoint.freq=0", "threads=1"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert [r.parent.parent.name for r in runs] == ["0", "1"]
    exported = sorted(str(p.relative_to(sweep)) for p in sweep.glob("*/rl_agent.onnx"))
    assert exported == ["0/rl_agent.onnx", "1/rl_agent.onnx"]  # each job exports into its own run directory
    for run_dir in runs:
        keys = wandb_history_keys(run_dir)
        assert {"eval/exact_match@0.5", "record:config", "record:artifact"} <= keys


def test_time_limit_stops_training_and_still_exports(tmp_path):
    result = train(tmp_path, total_timesteps=100_000, max_minutes=1e-4, eval={"at_start": False, "freq": 0},
                   checkpoint={"freq": 0})
    assert result["stopped_by_time_limit"] and result["timesteps"] < 100_000
    assert Path(result["policy"]).exists() and len(result["eval"]) == 1


def test_manifest_env_summary_keeps_name_lists() -> None:
    from policies.rl import _plain

    out = _plain({"tasks": ["repeat", "runsum"], "budget": [0.1, 0.6], "split": "train", "model": object()})
    assert out == {"tasks": ["repeat", "runsum"], "budget": [0.1, 0.6], "split": "train", "model": "object"}

"""Bad, hostile or broken inputs get a clear error naming the file (or key) and the problem; nothing is silently
accepted. Every input here is built by the test. (Kills and resumes: test_kill.py; shards: test_collect.py; env
actions and settings: test_env.py; RL checkpoints: test_rl.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_cfg, random_prompts, tiny_model
from safetensors.torch import load_file, save_file

from cache_core import CheckpointError, generate, load_model, make_policy
from cache_core.features import BLOCK_FEATURE_NAMES, N_BLOCK_FEATURES, N_GLOBAL_FEATURES, SCHEMA_ID, TEXT_SCHEMA_V1
from cache_core.learned import LearnedPolicy, PolicyFileError
from envs.testing import save_tiny_checkpoint
from policies.export import export_onnx
from policies.predictor import BlockPredictor

REPO = Path(__file__).resolve().parents[1]
N_FEATURES = N_BLOCK_FEATURES + N_GLOBAL_FEATURES
VALID = BLOCK_FEATURE_NAMES.index("valid_fraction")


# --- model checkpoints -------------------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    return save_tiny_checkpoint(tmp_path / "ckpt")


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_string_where_a_number_belongs_names_the_key(checkpoint):
    edit_config(checkpoint, d_model="128")
    with pytest.raises(CheckpointError, match=r"config.json: d_model='128' must be an integer, not str"):
        load_model(checkpoint)


def test_random_bytes_or_a_json_list_as_config_name_the_file(checkpoint):
    (checkpoint / "config.json").write_bytes(bytes(range(256)))
    with pytest.raises(CheckpointError, match="config.json: this model config is not valid JSON"):
        load_model(checkpoint)
    (checkpoint / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must be a JSON object, this one is a list"):
        load_model(checkpoint)


def test_nan_or_inf_weights_are_refused(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.transformer.blocks.0.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"blocks.0.q_proj.weight holds 1 NaN/inf values"):
        load_model(checkpoint)


def test_a_shard_index_may_not_point_outside_its_directory(checkpoint, tmp_path):
    weights = checkpoint / "model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(weights.read_bytes())
    weights.unlink()
    names = list(load_file(outside))
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict.fromkeys(names, "../elsewhere.safetensors")}))
    with pytest.raises(CheckpointError, match="lies outside"):
        load_model(checkpoint)


# --- exported policies -------------------------------------------------------------------------------------------
@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    return export_onnx(BlockPredictor(hidden=8), tmp_path / "p", action_mode="binary", output="refresh_logit",
                       n_layers=2)


def edit_manifest(onnx: Path, **changes) -> None:
    path = onnx.with_suffix(".json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, match", [
    ({"threshold": "high"}, "threshold='high' must be a number"),
    ({"n_layers": "2"}, "n_layers='2' must be an integer"),
    ({"budget_conditioned": "yes"}, "budget_conditioned='yes' must be true or false"),
])
def test_a_bad_manifest_value_names_the_file_and_key(exported, changes, match):
    edit_manifest(exported, **changes)
    with pytest.raises(PolicyFileError, match=f"p.json: {match}"):
        LearnedPolicy(exported)


def test_random_bytes_or_a_json_list_as_manifest_name_the_file(exported):
    exported.with_suffix(".json").write_bytes(bytes(range(256)))
    with pytest.raises(PolicyFileError, match="p.json: this policy manifest is not valid JSON"):
        LearnedPolicy(exported)
    exported.with_suffix(".json").write_text("[1]")
    with pytest.raises(PolicyFileError, match="must be a JSON object"):
        LearnedPolicy(exported)


@pytest.mark.parametrize("changes", [{"output": "action_logits"}, {"action_mode": "depth", "output": "action_logits"}])
def test_a_manifest_that_does_not_fit_its_graph_is_refused_at_load(exported, changes):
    edit_manifest(exported, **changes)
    with pytest.raises(PolicyFileError, match=r"the graph outputs shape \(1, 3\) where the manifest"):
        LearnedPolicy(exported)


def test_a_graph_of_another_input_width_is_refused_at_load(exported, tmp_path):
    other = tmp_path / "narrow.onnx"
    torch.onnx.export(torch.nn.Linear(5, 1), (torch.zeros(1, 3, 5),), str(other), input_names=["features"],
                      output_names=["refresh_logit"], dynamic_axes={"features": {0: "b", 1: "n"}}, dynamo=False)
    other.with_suffix(".json").write_text(exported.with_suffix(".json").read_text())
    with pytest.raises(PolicyFileError, match="does not take the feature schema's input"):
        LearnedPolicy(other)


class _SqrtOfValid(torch.nn.Module):
    """A broken network: finite on whole blocks, NaN on partly padded ones (sqrt of valid_fraction - 0.5)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(features[..., VALID] - 0.5)


def test_a_policy_that_outputs_nan_is_refused_not_followed(exported, tmp_path):
    broken = tmp_path / "broken.onnx"
    torch.onnx.export(_SqrtOfValid(), (torch.ones(1, 3, N_FEATURES),), str(broken), input_names=["features"],
                      output_names=["refresh_logit"], dynamic_axes={"features": {0: "b", 1: "n"}}, dynamo=False)
    broken.with_suffix(".json").write_text(exported.with_suffix(".json").read_text())
    policy = LearnedPolicy(broken)  # finite on the load-time probe (whole blocks)
    model = tiny_model(0)
    with pytest.raises(PolicyFileError, match="output NaN/inf for this step's features"):
        generate(model, random_prompts([3, 11], 0), 8, 4, 4, policy=policy)  # left padding: partial blocks


def test_missing_files_say_which(exported, tmp_path):
    with pytest.raises(ValueError, match="not an exported policy file"):
        make_policy(str(tmp_path / "p.onx"))  # a typo'd suffix
    with pytest.raises(PolicyFileError, match="no such policy file"):
        make_policy(str(tmp_path / "nothing.onnx"))
    exported.with_suffix(".json").rename(tmp_path / "kept.json")
    with pytest.raises(PolicyFileError, match=r"p.onnx: no manifest p.json beside this ONNX file"):
        make_policy(str(exported))
    (tmp_path / "kept.json").rename(exported.with_suffix(".json"))
    exported.unlink()
    with pytest.raises(PolicyFileError, match="the ONNX file named by the manifest is missing"):
        make_policy(str(exported))


def test_shipped_manifests_record_no_machine_paths():
    for name in ("predictor", "rl_agent"):
        text = (REPO / "checkpoints" / "policies" / f"{name}.json").read_text()
        assert "/tmp/" not in text and "/work/" not in text and "/home/" not in text, name
        assert json.loads(text)["schema_id"] in (SCHEMA_ID, TEXT_SCHEMA_V1.id)  # short-regime files: v1


# --- generate() and configs --------------------------------------------------------------------------------------
def test_a_budget_for_a_policy_that_ignores_it_is_refused(exported):
    model = tiny_model(0)
    prompts = random_prompts([4], 1)
    with pytest.raises(ValueError, match="policy 'dual_cache' is not budget-conditioned and would ignore it"):
        generate(model, prompts, 8, 4, 4, policy="dual_cache", budget=0.3)
    with pytest.raises(ValueError, match="policy 'learned' is not budget-conditioned"):
        generate(model, prompts, 8, 4, 4, policy=str(exported), budget=0.3)
    edit_manifest(exported, budget_conditioned=True)
    assert generate(model, prompts, 8, 4, 4, policy=str(exported), budget=0.3).tokens.shape == (1, 8)


def test_text_instead_of_token_ids_says_so():
    with pytest.raises(TypeError, match="prompts are token ids, not text"):
        generate(tiny_model(0), "hello", 8, 4, 4)
    with pytest.raises(TypeError, match="prompts are token ids, not text"):
        generate(tiny_model(0), ["hello"], 8, 4, 4)


def test_zero_epochs_is_refused(tmp_path):
    with pytest.raises(ValueError, match="trainer.max_epochs=0 must be >= 1"):
        compose_cfg(tmp_path, "trainer.max_epochs=0")


def test_progress_bars_end_full_and_say_what_they_measure(monkeypatch):
    import tqdm.auto

    from cache_core.bench.benchmark import evaluate_policies, heuristic_specs
    from cache_core.tokenizer import Tokenizer

    bars = []
    real = tqdm.auto.tqdm

    class Spy(real):
        def close(self):
            bars.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Spy)
    from cache_core.bench.tasks import TaskSuite

    model = tiny_model(0, vocab_size=99, embedding_size=99, mask_token_id=1, max_sequence_length=256)
    examples = TaskSuite().split("test", 2)
    evaluate_policies(model, Tokenizer(), examples, heuristic_specs(["full", "never"], include_oracle=False), [2],
                      dict(gen_length=16, block_length=8, steps=4, threshold=None, temperature=0.0,
                           remasking="low_confidence"), desc="evaluate")
    assert set(bars) == {("evaluate", 2, 2)}  # full (the reference, once) and never: 2 of 2


def test_python_m_cache_core_prints_without_warnings():
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "cache_core"], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0 and "RuntimeWarning" not in result.stderr, result.stderr
    assert f"Schema id (text family): {SCHEMA_ID}" in result.stdout
    assert "Schema id (image family): dit-v1:" in result.stdout and "teacache(threshold)" in result.stdout


def test_a_train_py_error_is_not_buried_under_the_config(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "mode=export", f"hydra.run.dir={tmp_path}"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "export.source=" in result.stderr
    assert len((result.stdout + result.stderr).splitlines()) < 40  # the config is in <run dir>/.hydra/config.yaml
    assert (tmp_path / ".hydra" / "config.yaml").is_file()


def test_nan_features_never_reach_a_shard(tmp_path):
    """The env refuses a NaN reward weight (so no NaN reward is collected), and load_shards refuses NaN data."""
    from envs.block_reuse_env import BlockReuseEnv
    from envs.testing import tiny_env_kwargs

    with pytest.raises(ValueError, match="env.w_kl=nan must be finite"):
        BlockReuseEnv(**tiny_env_kwargs(w_kl=float("nan")))
    assert np.isfinite(BlockReuseEnv(**tiny_env_kwargs()).reset(seed=0)[0]["blocks"]).all()

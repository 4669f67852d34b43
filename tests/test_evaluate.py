"""The evaluation job: heuristics, oracle and every listed learned policy file on the test split, written as JSON,
table and Pareto plot by cache_core.benchmark; files that do not exist yet are skipped."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_predictor import compose_cfg

from cache_core.benchmark import Row
from cache_core.features import GLOBAL_FEATURE_NAMES, N_BLOCK_FEATURES, StepFeatures
from cache_core.learned import LearnedPolicy
from envs.testing import save_tiny_checkpoint
from policies.evaluate import BudgetedPolicy, learned_specs, run, summarize
from policies.export import export_onnx
from policies.predictor import BlockPredictor

TINY_GEN = ["generation.gen_length=16", "generation.block_length=8", "generation.steps=4"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    export_onnx(BlockPredictor(hidden=8), tmp / "predictor", action_mode="binary", output="refresh_logit", n_layers=2)
    # The RL agent's file: action logits (binary, A = 2), as policies/rl.py exports it.
    export_onnx(BlockPredictor(hidden=8, n_outputs=2), tmp / "rl_agent", action_mode="binary",
                output="action_logits", n_layers=2)
    export_onnx(BlockPredictor(hidden=8), tmp / "budgeted", action_mode="binary", output="refresh_logit", n_layers=2,
                budget_conditioned=True)
    return tmp


def test_learned_specs(files):
    entries = [{"name": "predictor", "path": str(files / "predictor.onnx")},
               {"name": "rl_agent", "path": str(files / "rl_agent.onnx")},
               {"name": "budgeted", "path": str(files / "budgeted.onnx")},
               {"name": "later", "path": str(files / "not_yet.onnx")}]
    specs = learned_specs(entries, thresholds=[0.2, 0.8], budgets=[0.3, 0.6])
    assert [s.label for s in specs] == [
        "predictor(refresh_threshold=0.2)", "predictor(refresh_threshold=0.8)", "rl_agent",
        "budgeted(budget=0.3)", "budgeted(budget=0.6)"]
    assert specs[1].build().refresh_threshold == 0.8 and isinstance(specs[3].build(), BudgetedPolicy)
    with pytest.raises(FileNotFoundError, match="mode=export"):
        learned_specs([{"name": "later", "path": str(files / "not_yet.onnx"), "required": True}])


def test_budgeted_policy_sets_the_budget_feature(files):
    inner = LearnedPolicy(files / "budgeted.onnx")
    seen = {}

    def scores(features: StepFeatures) -> np.ndarray:
        seen["x"] = features.global_.clone()
        return np.zeros((1, 4), np.float32)

    inner.scores = scores
    policy = BudgetedPolicy(inner, 0.25)
    features = StepFeatures(torch.rand(1, 4, N_BLOCK_FEATURES), torch.ones(1, 5))
    policy.plan(features, SimpleNamespace(n_layers=2))
    assert seen["x"][0, GLOBAL_FEATURE_NAMES.index("budget")] == 0.25
    assert features.global_[0, GLOBAL_FEATURE_NAMES.index("budget")] == 1.0  # the caller's features untouched
    with pytest.raises(ValueError, match="budget"):
        BudgetedPolicy(inner, 0.0)


def test_summary_finds_cheapest_point_within_the_loss():
    def row(policy, family, em, flops):
        return Row(policy, family, None, None, 8, 100, em, 1.0, flops, 1.0, 1.0, 0)

    rows = [row("full", "full", 0.80, 1.0), row("dual(4)", "dual_cache", 0.80, 0.4),
            row("dual(8)", "dual_cache", 0.70, 0.2), row("oracle", "oracle", 0.80, 0.1),
            row("pred(0.5)", "predictor", 0.795, 0.1), row("pred(0.9)", "predictor", 0.6, 0.05)]
    s = summarize(rows, 0.01, ["predictor"])["8"]["exact_match"]
    assert s["best_heuristic"]["policy"] == "dual(4)" and s["best_per_family"]["predictor"]["policy"] == "pred(0.5)"
    assert s["predictor_flop_reduction_vs_best_heuristic"] == pytest.approx(4.0)
    rows[4].agreement = 0.9  # pred(0.5) answers differently from no-cache on 10% of the prompts
    s = summarize(rows, 0.01, ["predictor"], min_agreement=0.95)["8"]["agreement"]
    assert s["best_per_family"]["predictor"]["policy"] == "pred(0.9)"


def test_evaluate_run_writes_table_json_and_plot(tmp_path, files):
    model = save_tiny_checkpoint(tmp_path / "tiny")
    learned = (f"evaluate.learned=[{{name: predictor, path: '{files / 'predictor.onnx'}'}}, "
               f"{{name: rl_agent, path: '{files / 'rl_agent.onnx'}'}}, "
               f"{{name: later, path: '{tmp_path / 'missing.onnx'}'}}]")
    cfg = compose_cfg(tmp_path, f"paths.model={model}", *TINY_GEN, "evaluate.n_examples=2", "evaluate.batch_sizes=[2]",
                      "evaluate.heuristics=[never,dual_cache]", "evaluate.thresholds=[0.5]", "evaluate.progress=false",
                      "evaluate.threads=1", learned)
    out = run(cfg)
    data = json.loads(Path(out["json"]).read_text())
    families = {r["family"] for r in data["rows"]}
    assert families == {"full", "never", "dual_cache", "oracle", "predictor", "rl_agent"}
    assert Path(out["plot"]).stat().st_size > 0 and "rl_agent" in Path(out["table"]).read_text()
    assert out["summary"]["2"]["full_exact_match"] == next(r for r in data["rows"] if r["family"] == "full")[
        "exact_match"]
    with pytest.raises(FileNotFoundError, match="mode=pretrain"):
        run(compose_cfg(tmp_path, f"paths.model={tmp_path / 'none'}"))


@pytest.mark.slow
def test_main_pipeline_on_a_tiny_model(tmp_path):
    """`python train.py` = collect -> supervised -> export -> evaluate, end to end on a tiny random checkpoint."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    model = save_tiny_checkpoint(tmp_path / "tiny")
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path / 'run'}", f"paths.model={model}", *TINY_GEN,
           "collect.episodes=6", "collect.n_prompts=6", "collect.progress_bar=false", "env.w_agree=0",
           "trainer.max_epochs=2", "trainer.enable_progress_bar=false", f"policy.checkpoint_dir={tmp_path / 'ckpt'}",
           f"policy.export.path={tmp_path / 'shipped' / 'predictor'}", "policy.generation_check.n_prompts=2",
           "evaluate.n_examples=2", "evaluate.batch_sizes=[2]", "evaluate.heuristics=[dual_cache]",
           "evaluate.thresholds=[0.5]", "evaluate.progress=false", "logger=none"]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plot: " in result.stdout and "predictor(refresh_threshold=0.5)" in result.stdout
    assert (tmp_path / "shipped" / "predictor.onnx").is_file()
    rows = json.loads((tmp_path / "run" / "evaluate.json").read_text())["rows"]
    assert {"full", "dual_cache", "oracle", "predictor"} == {r["family"] for r in rows}

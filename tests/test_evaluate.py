"""The evaluation job: heuristics, oracle and every listed learned policy file on the test split, written as JSON,
table and Pareto plot by cache_core.bench.benchmark; files that do not exist yet are skipped."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import compose_cfg

from cache_core.bench.benchmark import Row
from cache_core.features import GLOBAL_FEATURE_NAMES, N_BLOCK_FEATURES, StepFeatures
from cache_core.learned import LearnedPolicy
from envs.testing import save_tiny_checkpoint
from policies.config import LearnedEntry
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
    entries = [LearnedEntry("predictor", str(files / "predictor.onnx")),
               LearnedEntry("rl_agent", str(files / "rl_agent.onnx")),
               LearnedEntry("budgeted", str(files / "budgeted.onnx")),
               LearnedEntry("later", str(files / "not_yet.onnx"))]
    specs = learned_specs(entries, thresholds=[0.2, 0.8], budgets=[0.3, 0.6])
    assert [s.label for s in specs] == [
        "predictor(refresh_threshold=0.2)", "predictor(refresh_threshold=0.8)", "rl_agent",
        "budgeted(budget=0.3)", "budgeted(budget=0.6)"]
    assert specs[1].build().refresh_threshold == 0.8 and isinstance(specs[3].build(), BudgetedPolicy)
    with pytest.raises(FileNotFoundError, match="mode=export"):
        learned_specs([LearnedEntry("later", str(files / "not_yet.onnx"), required=True)])


def test_budgeted_policy_sets_the_budget_feature(files):
    inner = LearnedPolicy(files / "budgeted.onnx", budget_control="feature")  # the feature alone, no runtime control
    seen = {}

    def scores(features: StepFeatures) -> np.ndarray:
        seen["x"] = features.global_.clone()
        return np.zeros((1, 4), np.float32)

    inner.scores = scores
    policy = BudgetedPolicy(inner, 0.25)
    features = StepFeatures(torch.rand(1, 4, N_BLOCK_FEATURES), torch.ones(1, len(GLOBAL_FEATURE_NAMES)))
    policy.plan(features, SimpleNamespace(n_layers=2))
    assert seen["x"][0, GLOBAL_FEATURE_NAMES.index("budget")] == 0.25
    assert features.global_[0, GLOBAL_FEATURE_NAMES.index("budget")] == 1.0  # the caller's features untouched
    with pytest.raises(ValueError, match="budget"):
        BudgetedPolicy(inner, 0.0)


def test_summary_finds_cheapest_point_within_the_loss():
    def row(policy, family, em, flops):
        return Row(policy, family, None, None, 8, 100, em, 1.0, flops, 1.0, 1.0, 4.0, 16.0, 100.0)

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
                      learned)
    out = run(cfg)
    data = json.loads(Path(out["json"]).read_text())
    families = {r["family"] for r in data["rows"]}
    assert families == {"full", "never", "dual_cache", "oracle", "predictor", "rl_agent"}
    assert Path(out["plot"]).stat().st_size > 0 and "rl_agent" in Path(out["table"]).read_text()
    assert out["summary"]["2"]["full_exact_match"] == next(r for r in data["rows"] if r["family"] == "full")[
        "exact_match"]
    with pytest.raises(FileNotFoundError, match="mode=pretrain"):
        run(compose_cfg(tmp_path, f"paths.model={tmp_path / 'none'}"))


def test_main_job_writes_only_into_its_run_directory(tmp_path):
    """`python train.py` = collect -> supervised (+ export into the run dir) -> evaluate, end to end on a tiny random
    checkpoint: every file lands in the run directory, the tracked tree is untouched, and the evaluate table compares
    the run's fresh predictor with the shipped policies."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, capture_output=True,
                            text=True).stdout
    model = save_tiny_checkpoint(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    shipped = root / "checkpoints" / "policies"
    before = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()}
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"paths.model={model}", *TINY_GEN,
           "collect.episodes=6", "collect.n_prompts=6", "collect.progress_bar=false", "env.w_agree=0",
           "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "policy.generation_check.n_prompts=2",
           "evaluate.n_examples=2", "evaluate.batch_sizes=[2]", "evaluate.heuristics=[dual_cache]",
           "evaluate.include_oracle=false", "evaluate.thresholds=[0.5]", "evaluate.budgets=[0.3]",
           "evaluate.progress=false", "logger=none", "threads=1",
           # the shipped files are for the built-in model; the tiny model's run compares with tiny stand-ins
           f"evaluate.learned=[{{name: fresh_predictor, path: '{run_dir / 'predictor.onnx'}'}}]"]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plot: " in result.stdout and str(run_dir) in result.stdout
    for name in ("predictor.onnx", "predictor.json", "predictor.safetensors", "evaluate.json", "evaluate_pareto.png",
                 "shards/manifest.json", "checkpoints/best.ckpt"):
        assert (run_dir / name).is_file(), name
    rows = json.loads((run_dir / "evaluate.json").read_text())["rows"]
    assert {"full", "dual_cache", "fresh_predictor"} == {r["family"] for r in rows}
    assert {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} == before  # shipped policies untouched
    after = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, capture_output=True,
                           text=True).stdout
    assert after == status, "the main job changed the working tree"


def test_evaluate_sweeps_decoding_settings_into_one_table(tmp_path, files):
    """evaluate.settings runs the same policies under each decoding setting (a held-out one flagged) and closes with
    one table of the cheapest points per setting."""
    model = save_tiny_checkpoint(tmp_path / "tiny")
    learned = f"evaluate.learned=[{{name: budgeted, path: '{files / 'budgeted.onnx'}'}}]"
    settings = ("evaluate.settings=[{block_length: 8}, {block_length: 4, name: small}, "
                "{threshold: 0.5, held_out: true}]")
    cfg = compose_cfg(tmp_path, f"paths.model={model}", *TINY_GEN, "evaluate.n_examples=2", "evaluate.batch_sizes=[2]",
                      "evaluate.heuristics=[dual_cache]", "evaluate.include_oracle=false", "evaluate.budgets=[0.5]",
                      "evaluate.progress=false", learned, settings)
    out = run(cfg)
    names = [r["setting"] for r in out["settings"]]
    assert names == ["g16_b8_s4", "small", "g16_b8_thr0.5"]
    assert [r["held_out"] for r in out["settings"]] == [False, False, True]
    assert out["settings"][2]["generation"]["steps"] is None  # a threshold entry drops the step count
    for r in out["settings"]:
        rows = json.loads(Path(r["files"]["json"]).read_text())
        assert rows["meta"]["generation"]["block_length"] == r["generation"]["block_length"]
        assert {row["family"] for row in rows["rows"]} == {"full", "dual_cache", "budgeted"}
    table = json.loads((Path(out["json"]).parent / "evaluate_settings.json").read_text())["table"]
    assert {(row["setting"], row["criterion"]) for row in table} == {
        (n, c) for n in names for c in ("exact_match", "agreement")}
    assert all("budgeted_reduction" in row for row in table)
    with pytest.raises(ValueError, match=r"settings\[0\] has unknown keys \['block'\]"):
        compose_cfg(tmp_path, "evaluate.settings=[{block: 8}]")

"""The policy benchmark on a tiny random model: rows, metrics, table, JSON and plot."""

import json
import time

import pytest
import torch
from helpers import compose_cfg

from cache_core import LLaDAModel, ModelConfig
from cache_core.bench.benchmark import (
    PolicySpec,
    Row,
    evaluate_policies,
    family_styles,
    heuristic_specs,
    write_results,
)
from cache_core.bench.tasks import TaskSuite, encode_prompt
from cache_core.cache import RefreshPlan
from cache_core.generate import generate
from cache_core.policy import ReusePolicy
from cache_core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = Tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id, d_model=32, n_layers=2,
                      n_heads=2, mlp_hidden_size=64)
    return LLaDAModel(cfg).eval(), tok


def test_benchmark_rows_table_json_plot(tiny, tmp_path):
    model, tok = tiny
    examples = TaskSuite(seed=0).split("test", 3)
    specs = heuristic_specs(["dual_cache", "never"], include_oracle=True)
    gen = dict(gen_length=64, block_length=16, steps=16)
    rows = evaluate_policies(model, tok, examples, specs, batch_sizes=[1, 3], gen=gen, progress=False)
    labels = {r.policy for r in rows}
    assert "full" in labels and "never" in labels and "oracle(epsilon=0.01)" in labels
    assert len(rows) == 2 * (1 + len(specs))
    full = [r for r in rows if r.policy == "full"]
    assert all(r.flop_fraction == 1.0 and r.agreement == 1.0 and r.speedup == 1.0 for r in full)
    never = [r for r in rows if r.policy == "never"]
    dual = [r for r in rows if r.family == "dual_cache"]
    assert all(0 < r.flop_fraction < 1 for r in never + dual)
    # never recomputes only the decoding block: cheaper than any dual-cache setting
    assert max(r.flop_fraction for r in never) < min(r.flop_fraction for r in dual)
    # FLOP fractions do not depend on the batch size (same prompts, per-row accounting)
    by_label = {}
    for r in rows:
        by_label.setdefault(r.policy, []).append(r.flop_fraction)
    assert all(abs(a - b) < 1e-9 for a, b in by_label.values())
    out = write_results(rows, tmp_path, "bench", {"note": "test"})
    data = json.loads(open(out["json"]).read())
    assert len(data["rows"]) == len(rows) and data["meta"]["note"] == "test"
    assert open(out["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "dual_cache(refresh_interval=None)" in open(out["table"]).read()


def test_unknown_policy_in_benchmark():
    with pytest.raises(ValueError, match="unknown policies"):
        heuristic_specs(["dual_cache", "no_such_policy"])


# ---------------------------------------------------------------------------------------------------------------
# Policy time, per-batch-size plots, learned policies and the random timing model in mode=benchmark
# ---------------------------------------------------------------------------------------------------------------
SLEEP_S = 0.03


class SlowPlan(ReusePolicy):
    """Refreshes everything, after sleeping in `plan`: its decision time is known from below."""

    name = "slow_plan"
    uses_features = True

    def plan(self, features, ctx):
        time.sleep(SLEEP_S)
        return RefreshPlan.refresh_all(ctx.batch_size, ctx.n_blocks)


def test_policy_time_is_recorded_per_step_apart_from_the_step(tiny):
    model, tok = tiny
    gen = dict(gen_length=16, block_length=8, steps=4)
    prompts = [encode_prompt(tok, e) for e in TaskSuite(seed=0).split("test", 2)]
    slow = generate(model, prompts, policy=SlowPlan(), **gen).stats
    assert len(slow.steps) == 4 and all(s.policy_s >= SLEEP_S for s in slow.steps)
    # the sleep is billed to the policy, not to the step it planned
    assert sorted(s.wall_s for s in slow.steps)[len(slow.steps) // 2] < SLEEP_S
    assert slow.policy_seconds == pytest.approx(sum(s.policy_s for s in slow.steps))
    assert slow.step_seconds == pytest.approx(sum(s.wall_s for s in slow.steps)) and slow.policy_share > 0.5
    assert slow.summary()["policy_s"] == slow.policy_seconds
    # a feature-reading heuristic: every step has a decision time, a small but nonzero share
    dual = generate(model, prompts, policy="elastic_cache", **gen).stats
    assert all(s.policy_s > 0 for s in dual.steps) and 0 < dual.policy_share < 1
    specs = [PolicySpec("slow_plan", None, None, SlowPlan), *heuristic_specs(["dual_cache"], include_oracle=False)]
    rows = evaluate_policies(model, tok, TaskSuite(seed=0).split("test", 2), specs, batch_sizes=[1, 2], gen=gen,
                             progress=False)
    assert all(0 < r.policy_share < 1 and r.policy_s > 0 for r in rows)
    for size in (1, 2):
        at = {r.family: r for r in rows if r.batch_size == size}
        assert at["slow_plan"].policy_share > max(at["full"].policy_share, at["dual_cache"].policy_share)
        assert at["slow_plan"].policy_s >= SLEEP_S * 4 * (2 // size)  # 4 steps per batch


def _row(policy, family, batch_size, flops, em=0.5):
    return Row(policy, family, None, None, batch_size, 4, em, 1.0, flops, 1.0 / flops, 1.0, 4.0, 4.0, 10.0, 0.1, 0.01)


def test_one_pareto_png_per_batch_size_and_distinct_styles(tmp_path):
    families = ["full", "dual_cache", "never", "oracle", "predictor", *(f"h{i}" for i in range(20))]
    rows = [_row(f"{f}({x})", f, b, x) for b in (1, 2) for f in families for x in (0.6, 0.3, 0.9)]
    out = write_results(rows, tmp_path, "bench", {"note": "test"})
    assert out["plots"] == [str(tmp_path / "bench_pareto_b1.png"), str(tmp_path / "bench_pareto_b2.png")]
    assert out["plot"] == str(tmp_path / "bench_pareto.png")
    for path in [out["plot"], *out["plots"]]:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert open(out["plot"], "rb").read() == open(out["plots"][-1], "rb").read()  # the largest batch size
    meta = json.loads(open(out["json"]).read())["meta"]
    assert meta["plots"] == {"1": out["plots"][0], "2": out["plots"][1]} and meta["note"] == "test"
    styles = family_styles(rows)
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == len(families)
    assert styles["oracle"]["linestyle"] == "--" and styles["full"]["linestyle"] == "-"
    # unregistered families are the learned ones: thicker and on top
    assert styles["predictor"]["linewidth"] > styles["dual_cache"]["linewidth"]
    assert styles["predictor"]["zorder"] > styles["dual_cache"]["zorder"]


BENCH_GEN = ["generation.gen_length=16", "generation.block_length=8", "generation.steps=4", "benchmark.n_examples=2",
             "benchmark.batch_sizes=[1,2]", "benchmark.examples_per_batch_size={}", "benchmark.include_oracle=false",
             "benchmark.policies=[dual_cache]", "threads=1"]


def test_benchmark_mode_runs_the_shipped_predictor(tmp_path):
    from cache_core.bench import BUILTIN_MODEL, REPO_ROOT
    from cache_core.bench.benchmark import run

    shipped = REPO_ROOT / "checkpoints" / "policies" / "predictor.onnx"
    assert json.loads(shipped.with_suffix(".json").read_text())["budget_conditioned"]
    learned = (f"benchmark.learned=[{{name: predictor, path: '{shipped}', required: true}}, "
               f"{{name: later, path: '{tmp_path / 'missing.onnx'}'}}]")
    cfg = compose_cfg(tmp_path, "mode=benchmark", f"paths.model={BUILTIN_MODEL}", *BENCH_GEN, learned,
                      "benchmark.budgets=[0.2,0.4]")
    out = run(cfg)
    data = json.loads(open(out["json"]).read())
    rows = data["rows"]
    assert {r["family"] for r in rows} == {"full", "dual_cache", "predictor"}
    predictor = [r for r in rows if r["family"] == "predictor"]
    assert sorted((r["batch_size"], r["value"]) for r in predictor) == [(1, 0.2), (1, 0.4), (2, 0.2), (2, 0.4)]
    assert all(0 < r["flop_fraction"] <= 1 and 0 < r["policy_share"] < 1 for r in rows)
    assert data["meta"]["learned_families"] == ["predictor"] and data["meta"]["random_model"] is None
    assert len(out["plots"]) == 2 and all(p.endswith(f"_b{b}.png") for p, b in zip(out["plots"], (1, 2)))
    assert data["meta"]["threads"] == 1 and data["meta"]["device"] == "cpu"
    required = f"benchmark.learned=[{{name: later, path: '{tmp_path / 'missing.onnx'}', required: true}}]"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(compose_cfg(tmp_path, "mode=benchmark", f"paths.model={BUILTIN_MODEL}", *BENCH_GEN, required))


def test_random_model_of_the_requested_width(tmp_path):
    from cache_core.bench.benchmark import random_model, run
    from envs.testing import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "tiny")  # d_model 32, 4 heads, 2 KV heads
    wide = {"d_model": 64, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 96}
    model = random_model(ckpt, wide, seed=3)
    assert (model.config.d_model, model.config.n_kv_heads, model.config.mlp_hidden_size) == (64, 4, 96)
    assert model.config.n_layers == 2 and model.config.vocab_size == Tokenizer().vocab_size  # the rest: the checkpoint
    again = random_model(ckpt, wide, seed=3).state_dict()
    assert all(torch.equal(t, again[k]) for k, t in model.state_dict().items())  # seeded
    with pytest.raises(ValueError, match="random_model"):
        random_model(ckpt, {"d_model": 30}, seed=0)  # not a multiple of n_heads
    cfg = compose_cfg(tmp_path, "mode=benchmark", f"paths.model={ckpt}", *BENCH_GEN, "seed=3",
                      "benchmark.random_model={d_model: 64, n_heads: 4, n_kv_heads: 4, mlp_hidden_size: 96}")
    data = json.loads(open(run(cfg)["json"]).read())
    meta = data["meta"]["random_model"]
    assert meta["config"]["d_model"] == 64 and meta["seed"] == 3 and "meaningless" in meta["note"]
    dual = [r for r in data["rows"] if r["family"] == "dual_cache"]
    assert dual and all(0 < r["flop_fraction"] < 1 and r["tokens_per_s"] > 0 for r in dual)
    with pytest.raises(ValueError, match="vocab_size"):
        compose_cfg(tmp_path, "mode=benchmark", "benchmark.random_model={vocab_size: 7}")

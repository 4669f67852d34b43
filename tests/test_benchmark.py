"""The policy benchmark on a tiny random model: rows, metrics, table, JSON and plot."""

import json

import pytest
import torch

from cache_core import LLaDAModel, ModelConfig
from cache_core.bench.benchmark import evaluate_policies, heuristic_specs, write_results
from cache_core.bench.tasks import TaskSuite
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

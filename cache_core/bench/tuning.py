"""Block-size tuning: the cache block size (and, where the user allows, the decoding block length) that spends the
fewest FLOPs (or least wall time) for a model, a task and a policy, under an accuracy constraint.

    python train.py mode=tune                                     # dual_cache on the built-in model and task
    python train.py mode=tune tune.policy=checkpoints/policies/predictor.onnx 'tune.block_lengths=[8,16,32]'

The reference is the no-cache run at the configured decoding setting (`generation.*`). Every candidate (decoding
block length x cache block size; a cache block divides or is a multiple of the decoding block, and the total steps
must split evenly over the decoding blocks, else the candidate is skipped with its reason) runs the policy on the
same prompts; a candidate is *feasible* when its exact match is at least the reference's minus `tune.max_em_loss`.
The best feasible one by `tune.objective` is reported, with JSON, a table and a plot (exact match vs FLOP fraction).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cache_core.bench.tasks import Example, encode_prompt, score
from cache_core.generate import generate
from cache_core.partition import PartitionError, check_cache_block_size
from cache_core.registry import make_policy
from cache_core.session import validate_generation_args

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    block_length: int
    cache_block_size: int
    exact_match: float
    flop_fraction: float  # FLOPs / the no-cache reference's FLOPs on the same prompts
    wall_s: float
    feasible: bool


def candidates(block_lengths: list[int], cache_block_sizes: list[int], gen_length: int, steps: int | None
               ) -> tuple[list[tuple[int, int]], list[str]]:
    """The (block_length, cache_block_size) pairs that fit, and a reason for each one that does not."""
    fit, skipped = [], []
    for bl in block_lengths:
        try:  # with threshold decoding (steps None) any threshold checks the same block layout
            validate_generation_args([[0]], gen_length, bl, steps, None if steps is not None else 1.0, 0.0,
                                     "low_confidence")
        except ValueError as err:
            skipped.append(f"block_length={bl}: {err}")
            continue
        for size in cache_block_sizes:
            try:
                check_cache_block_size(size, bl)
            except PartitionError as err:
                skipped.append(f"block_length={bl}, cache_block_size={size}: {err}")
                continue
            fit.append((bl, size))
    return fit, skipped


def _measure(model, tokenizer, examples: list[Example], policy: str, gen: dict[str, Any], batch_size: int
             ) -> tuple[float, float, float]:
    """Exact match, FLOPs and wall seconds of `policy` under `gen` on the examples."""
    correct, flops, wall = 0, 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        prompts = [encode_prompt(tokenizer, e) for e in batch]
        t0 = time.perf_counter()
        result = generate(model, prompts, policy=make_policy(policy), **gen)
        wall += time.perf_counter() - t0
        flops += result.stats.flops
        answers = [tokenizer.decode(row.tolist()) for row in result.tokens]
        correct += sum(score(a, e) for a, e in zip(answers, batch))
    return correct / len(examples), flops, wall


def tune(model, tokenizer, examples: list[Example], policy: str, gen: dict[str, Any], block_lengths: list[int],
         cache_block_sizes: list[int], max_em_loss: float, objective: str = "flops", batch_size: int = 16,
         progress: bool = True) -> dict[str, Any]:
    """Search the candidates; returns the reference, every candidate, the skipped ones and the best feasible one."""
    from tqdm.auto import tqdm

    ref_em, ref_flops, ref_wall = _measure(model, tokenizer, examples, "full", gen, batch_size)
    pairs, skipped = candidates(block_lengths, cache_block_sizes, gen["gen_length"], gen["steps"])
    for reason in skipped:
        log.info("tune: skipped %s", reason)
    rows = []
    for bl, size in tqdm(pairs, desc="tune", disable=not progress):
        setting = {**gen, "block_length": bl, "cache_block_size": size}
        setting.pop("dynamic_blocks", None)  # a fixed size is what is being tuned
        em, flops, wall = _measure(model, tokenizer, examples, policy, setting, batch_size)
        rows.append(Candidate(bl, size, em, flops / ref_flops, wall, em >= ref_em - max_em_loss - 1e-12))
    feasible = [r for r in rows if r.feasible]
    key = (lambda r: r.flop_fraction) if objective == "flops" else (lambda r: r.wall_s)
    best = min(feasible, key=key) if feasible else None
    return {"policy": policy, "objective": objective, "max_em_loss": max_em_loss,
            "reference": {"exact_match": ref_em, "wall_s": ref_wall, "block_length": gen["block_length"]},
            "candidates": [asdict(r) for r in rows], "skipped": skipped,
            "best": asdict(best) if best else None}


def report(result: dict[str, Any], directory: str | Path) -> dict[str, str]:
    """JSON, a rich table and the plot of a tuning result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.console import Console
    from rich.table import Table

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "tune.json"
    json_path.write_text(json.dumps(result, indent=2))
    table = Table(title=f"block-size tuning: {result['policy']} (reference exact match "
                        f"{result['reference']['exact_match']:.3f}, max loss {result['max_em_loss']})")
    for col in ("block_length", "cache_block_size", "exact match", "FLOP fraction", "wall s", "feasible"):
        table.add_column(col, justify="right")
    best = result["best"]
    for r in result["candidates"]:
        mark = " *" if best and (r["block_length"], r["cache_block_size"]) == (best["block_length"],
                                                                              best["cache_block_size"]) else ""
        table.add_row(str(r["block_length"]), str(r["cache_block_size"]) + mark, f"{r['exact_match']:.3f}",
                      f"{r['flop_fraction']:.3f}", f"{r['wall_s']:.2f}", "yes" if r["feasible"] else "no")
    console = Console(width=140, record=True)
    console.print(table)
    verdict = (f"best: block_length={best['block_length']} cache_block_size={best['cache_block_size']} "
               f"(exact match {best['exact_match']:.3f}, FLOP fraction {best['flop_fraction']:.3f})"
               if best else "no candidate meets the accuracy constraint")
    console.print(verdict)
    (directory / "tune.txt").write_text(console.export_text())

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "os^Dv<>P"
    for i, bl in enumerate(sorted({r["block_length"] for r in result["candidates"]})):
        pts = sorted((r for r in result["candidates"] if r["block_length"] == bl), key=lambda r: r["flop_fraction"])
        ax.plot([p["flop_fraction"] for p in pts], [p["exact_match"] for p in pts], marker=markers[i % 8],
                label=f"block_length {bl}")
        for p in pts:
            ax.annotate(str(p["cache_block_size"]), (p["flop_fraction"], p["exact_match"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    floor = result["reference"]["exact_match"] - result["max_em_loss"]
    ax.axhline(floor, color="grey", linestyle=":", label="accuracy constraint")
    if best:
        ax.scatter([best["flop_fraction"]], [best["exact_match"]], s=200, marker="*", color="gold", zorder=5,
                   edgecolor="black", label="best")
    ax.set_xlabel("FLOP fraction of no-cache")
    ax.set_ylabel("exact match")
    ax.set_title("cache block size (labels) per decoding block length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    png = directory / "tune.png"
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return {"json": str(json_path), "table": str(directory / "tune.txt"), "plot": str(png), "verdict": verdict}


def run(cfg: Any) -> dict:
    """`python train.py mode=tune` (cfg: policies.config.RootConfig)."""
    from cache_core.bench import tracking
    from cache_core.bench.benchmark import load_model_and_tokenizer
    from cache_core.bench.config import make_task

    t = cfg.tune
    model, tokenizer = load_model_and_tokenizer(cfg.paths.model, device=t.device)
    examples = make_task(cfg.task).split(t.split, t.n_examples)
    gen = cfg.generation.kwargs()
    block_lengths = list(t.block_lengths) or [gen["block_length"]]
    run = tracking.start_run(cfg.logger, "tune", cfg)
    try:
        result = tune(model, tokenizer, examples, t.policy, gen, block_lengths, list(t.cache_block_sizes),
                      t.max_em_loss, t.objective, t.batch_size)
        out = report(result, tracking.per_job(t.output_dir))
        run.log_table("tune/candidates", result["candidates"])
        run.log_image("tune/plot", out["plot"])
        run.summary({"best": result["best"]})
    finally:
        run.finish()
    print(f"JSON: {out['json']}\ntable: {out['table']}\nplot: {out['plot']}")
    return {**out, "result": result}

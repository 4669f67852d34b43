"""Measure the cache runtime on the built-in benchmark: the quality monitor, the memory manager, cache partitions.

    python -m cache_core.bench.runtime_study monitor   # how much lost exact match the monitor recovers, at what cost
    python -m cache_core.bench.runtime_study memory    # peak cache bytes vs exact match vs FLOPs per memory mode
    python -m cache_core.bench.runtime_study blocks    # cache block sizes and the dynamic partition per policy
    python -m cache_core.bench.runtime_study all --n 48 --out runtime_study

Every part runs the no-cache reference of each decoding setting (its own row) and each setting on the same test
prompts (batch 16, greedy), prints a table, and writes <out>/<part>.json, <part>.txt and <part>.png. The monitor's
"recovered" column is the share of the exact match its policy lost against no cache that the monitor won back.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cache_core.bench.tasks import Example, TaskSuite, encode_prompt, score
from cache_core.generate import generate

ROOT = Path(__file__).resolve().parents[2]
PREDICTOR = str(ROOT / "checkpoints" / "policies" / "predictor.onnx")
BASE = dict(gen_length=64, block_length=16, steps=64)


@dataclass
class Point:
    part: str
    policy: str
    setting: str
    exact_match: float
    agreement: float  # same answer as the no-cache run
    flop_fraction: float
    peak_cache_bytes: int
    wall_s: float
    extra: dict[str, Any]


def measure(model, tok, examples: list[Example], policy: str, gen: dict[str, Any], reference: list[str] | None,
            batch_size: int = 16, **kw: Any) -> tuple[list[str], dict[str, Any]]:
    answers, flops, full, wall, peak, extra = [], 0.0, 0.0, 0.0, 0, {"monitor_flops": 0.0, "monitor_alarms": 0}
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        t0 = time.perf_counter()
        out = generate(model, [encode_prompt(tok, e) for e in batch], policy=policy, **gen, **kw)
        wall += time.perf_counter() - t0
        answers += [tok.decode(r.tolist()) for r in out.tokens]
        flops, full = flops + out.stats.flops, full + out.stats.full_flops
        peak = max(peak, out.stats.peak_cache_bytes)
        s = out.stats.summary()
        extra["monitor_flops"] += s["monitor_flops"]
        extra["monitor_alarms"] += s["monitor_alarms"]
    return answers, {
        "exact_match": sum(score(a, e) for a, e in zip(answers, examples)) / len(examples),
        "agreement": (sum(a == r for a, r in zip(answers, reference)) / len(examples)) if reference else 1.0,
        "flop_fraction": flops / full, "peak_cache_bytes": peak, "wall_s": wall,
        "extra": {"monitor_flop_fraction": extra["monitor_flops"] / full, "monitor_alarms": extra["monitor_alarms"]},
    }


def _describe(gen: dict[str, Any]) -> str:
    decoding = f"threshold {gen['threshold']}" if gen.get("threshold") else f"steps {gen['steps']}"
    return f"no cache (block {gen['block_length']}, {decoding})"


def _points(part: str, model, tok, examples, settings: list[tuple[str, str, dict, dict]]) -> list[Point]:
    """Each setting, after the no-cache reference of its decoding setting (a row of its own)."""
    from tqdm.auto import tqdm

    refs: dict[str, list[str]] = {}
    points = []
    for policy, label, gen, kw in tqdm(settings, desc=part):
        key = json.dumps(gen, sort_keys=True)
        if key not in refs:
            refs[key], m = measure(model, tok, examples, "full", gen, None)
            points.append(Point(part, "full", _describe(gen), **m))
        _, m = measure(model, tok, examples, policy, gen, refs[key], **kw)
        points.append(Point(part, Path(policy).stem if policy.endswith(".onnx") else policy, label, **m))
    return points


def recovered(points: list[Point]) -> None:
    """Monitor rows: the share of the exact match their policy lost (against no cache) that the monitor won back."""
    reference = base = None
    for p in points:
        if p.policy == "full":
            reference = p.exact_match
        elif p.setting.endswith("no monitor"):
            base = p.exact_match
        elif "monitor" in p.setting and reference is not None and base is not None:
            lost = reference - base
            p.extra["recovered"] = (p.exact_match - base) / lost if lost > 0 else None  # None: nothing was lost


def monitor_settings() -> list[tuple[str, str, dict, dict]]:
    aggressive = [("never", "", BASE, {}), ("dual_cache", "", BASE, {}),
                  (PREDICTOR, "budget 0.12", BASE, {"budget": 0.12}),
                  (PREDICTOR, "held-out: block 32", {**BASE, "block_length": 32}, {}),
                  (PREDICTOR, "held-out: threshold 0.9", {**BASE, "steps": None, "threshold": 0.9}, {})]
    out = []
    for policy, label, gen, kw in aggressive:
        out.append((policy, f"{label} no monitor".strip(), gen, kw))
        for rate in (0.05, 0.1, 0.25):
            out.append((policy, f"{label} monitor {rate}".strip(), gen, {**kw, "monitor": {"sample_rate": rate}}))
        strict = {"sample_rate": 0.25, "kl_threshold": 0.01, "drift_threshold": 0.02}
        out.append((policy, f"{label} monitor 0.25 strict".strip(), gen, {**kw, "monitor": strict}))
    return out


def memory_settings(dense_bytes: int) -> list[tuple[str, str, dict, dict]]:
    out = []
    for policy in ("dual_cache", PREDICTOR):
        out += [(policy, "dense (no manager)", BASE, {}),
                (policy, "speed preset", BASE, {"memory": {"preset": "speed"}}),
                (policy, "stable bf16", BASE, {"memory": {"stable_precision": "bf16"}}),
                (policy, "stable fp8", BASE, {"memory": {"stable_precision": "fp8"}}),
                (policy, "memory preset (int8)", BASE, {"memory": {"preset": "memory"}}),
                (policy, "evict_far (DPad), window 1", BASE, {"memory": {"evict_far": True}})]
        for share in (0.6, 0.5, 0.45, 0.4):
            budget = int(share * dense_bytes)
            out.append((policy, f"speed, budget {share:.0%} of dense", BASE,
                        {"memory": {"budget_bytes": budget}}))
            out.append((policy, f"memory, budget {share:.0%} of dense", BASE,
                        {"memory": {"budget_bytes": budget, "preset": "memory"}}))
    return out


def blocks_settings() -> list[tuple[str, str, dict, dict]]:
    out = []
    for policy, kw in ((PREDICTOR, {}), ("confidence", {"min_confidence": 0.9}), ("dllm_cache", {})):
        out.append((policy, "cache block 16 (= decoding block)", BASE, kw))
        for size in (4, 8, 32, 64):
            out.append((policy, f"cache block {size}", BASE, {**kw, "cache_block_size": size}))
        for granule in (8, 16):
            out.append((policy, f"dynamic, granule {granule}", BASE, {**kw, "dynamic_blocks": {"granule": granule}}))
    return out


def _share(extra: dict[str, Any]) -> str:
    if "recovered" not in extra:
        return ""
    value = extra["recovered"]
    return "no loss" if value is None else f"{value:.0%}"


def write(points: list[Point], part: str, directory: Path, meta: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.console import Console
    from rich.table import Table

    directory.mkdir(parents=True, exist_ok=True)
    if part == "monitor":
        recovered(points)
    (directory / f"{part}.json").write_text(json.dumps({"meta": meta, "points": [asdict(p) for p in points]},
                                                       indent=2))
    table = Table(title=f"cache runtime: {part} ({meta['n_examples']} test prompts, batch 16)")
    for col in ("policy", "setting", "exact match", "agreement", "FLOP fraction", "monitor FLOPs", "alarms",
                "recovered", "peak cache MB", "wall s"):
        table.add_column(col, justify="left" if col in ("policy", "setting") else "right")
    for p in points:
        table.add_row(p.policy, p.setting, f"{p.exact_match:.3f}", f"{p.agreement:.3f}", f"{p.flop_fraction:.3f}",
                      f"{p.extra['monitor_flop_fraction']:.3f}", str(p.extra["monitor_alarms"]),
                      _share(p.extra),
                      f"{p.peak_cache_bytes / 1e6:.2f}", f"{p.wall_s:.1f}")
    console = Console(width=160, record=True)
    console.print(table)
    text = console.export_text()
    (directory / f"{part}.txt").write_text(text)

    x_key = "peak_cache_bytes" if part == "memory" else "flop_fraction"
    scale = 1e6 if part == "memory" else 1.0
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10").colors
    for i, policy in enumerate(dict.fromkeys(p.policy for p in points)):
        mine = sorted((p for p in points if p.policy == policy), key=lambda p: getattr(p, x_key))
        ax.scatter([getattr(p, x_key) / scale for p in mine], [p.exact_match for p in mine], color=colours[i % 10],
                   marker="os^Dv<>P"[i % 8], label=policy, alpha=0.8)
        for p in mine:
            ax.annotate(p.setting, (getattr(p, x_key) / scale, p.exact_match), fontsize=6, xytext=(3, 2 + 5 * (i % 2)),
                        textcoords="offset points", color=colours[i % 10])
    ax.set_xlabel("peak cache MB (store + one-layer workspace)" if part == "memory"
                  else "FLOP fraction of no-cache (monitor included)")
    ax.set_ylabel("exact match")
    ax.set_title(f"cache runtime: {part}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(directory / f"{part}.png", dpi=120)
    plt.close(fig)
    return text


def main(argv: list[str] | None = None) -> None:
    from cache_core.bench.benchmark import load_model_and_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("monitor", "memory", "blocks", "all"))
    parser.add_argument("--n", type=int, default=48, help="test prompts (default 48)")
    parser.add_argument("--out", default="runtime_study", help="output directory")
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "builtin"))
    args = parser.parse_args(argv)
    model, tok = load_model_and_tokenizer(args.model)
    examples = TaskSuite().split("test", args.n)
    parts = ("monitor", "memory", "blocks") if args.part == "all" else (args.part,)
    for part in parts:
        if part == "memory":
            dense = generate(model, [encode_prompt(tok, e) for e in examples[:16]], policy="never", **BASE)
            settings = memory_settings(dense.stats.peak_cache_bytes)
        else:
            settings = monitor_settings() if part == "monitor" else blocks_settings()
        points = _points(part, model, tok, examples, settings)
        write(points, part, Path(args.out), {"n_examples": len(examples), "model": args.model, "generation": BASE})
    print(f"written to {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()

"""The policy benchmark: every policy across its knob on the test split, at several batch sizes.

    python train.py mode=benchmark                      # heuristics + oracle, batch 1 and 16, built-in model
    python train.py mode=benchmark benchmark.n_examples=32 'benchmark.batch_sizes=[16]'

For each (policy, knob value, batch size) it measures exact match, agreement with the no-cache answer, FLOP fraction
(FLOPs spent / FLOPs of the no-cache run on the same prompts) and wall-clock speedup (no-cache wall time / wall time,
same prompts and batch size). It prints a table, writes JSON, and draws the accuracy-vs-FLOPs plot (PNG).
`policies.evaluate` calls `evaluate_policies` with the learned policies added.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cache_core.bench.tasks import Example, encode_prompt, score
from cache_core.generate import generate
from cache_core.models import DiffusionModel
from cache_core.policy import ReusePolicy
from cache_core.registry import make_policy, policy_registry

log = logging.getLogger(__name__)


@dataclass
class PolicySpec:
    """One point of the benchmark: a label, a factory of fresh policies, and the knob it sets."""

    family: str
    knob: str | None
    value: Any
    build: Callable[[], ReusePolicy]

    @property
    def label(self) -> str:
        return self.family if self.knob is None else f"{self.family}({self.knob}={self.value})"


def heuristic_specs(names: Sequence[str] | None = None, include_oracle: bool = True, modality: str = "text"
                    ) -> list[PolicySpec]:
    """Every registered heuristic of a modality ("text" or "image") across its knob sweep (conservative ->
    aggressive), the oracle last."""
    registry = policy_registry(modality)
    names = list(names) if names is not None else [n for n in registry if n != "oracle"]
    if include_oracle and "oracle" not in names:
        names.append("oracle")
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown policies {unknown} for {modality} models; choose from {sorted(registry)}")
    specs = []
    for name in names:
        cls = registry[name]
        if cls.knob is None:
            specs.append(PolicySpec(name, None, None, lambda n=name: make_policy(n)))
        for value in cls.knob_sweep:
            build = lambda n=name, k=cls.knob, v=value: make_policy(n, **{k: v})  # noqa: E731
            specs.append(PolicySpec(name, cls.knob, value, build))
    return specs


@dataclass
class Row:
    policy: str
    family: str
    knob: str | None
    value: Any
    batch_size: int
    n: int
    exact_match: float
    agreement: float
    flop_fraction: float
    speedup: float
    wall_s: float
    steps: float  # forwards per sequence (NFE), averaged over the prompts
    tokens_per_forward: float  # generated positions per forward: parallel decoding's figure (gen_length / NFE)
    tokens_per_s: float  # generated positions per second of generate(), all prompts (the field's throughput)


Measured = tuple[list[str], float, float, int]  # answers, FLOPs, wall seconds, forwards x sequences


def run_batch(model: DiffusionModel, tokenizer, batch: list[Example], spec: PolicySpec, gen: dict[str, Any]
              ) -> Measured:
    """One generate() call of `spec` on one batch of prompts."""
    prompts = [encode_prompt(tokenizer, e) for e in batch]
    t0 = time.perf_counter()
    result = generate(model, prompts, policy=spec.build(), **gen)
    wall = time.perf_counter() - t0
    answers = [tokenizer.decode(row.tolist()) for row in result.tokens]
    return answers, result.stats.flops, wall, len(result.stats.steps) * len(batch)


def combine(parts: Sequence[Measured]) -> Measured:
    """The batches of one spec, in prompt order, as one measurement (sums in that order: any backend that splits
    the prompts into the same batches gets the same FLOPs, bit for bit)."""
    answers, flops, wall, steps = [], 0.0, 0.0, 0
    for a, f, w, n in parts:
        answers, flops, wall, steps = answers + list(a), flops + f, wall + w, steps + n
    return answers, flops, wall, steps


def batches(examples: list[Example], batch_size: int) -> list[list[Example]]:
    return [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]


def _run(model: DiffusionModel, tokenizer, examples: list[Example], spec: PolicySpec, batch_size: int,
         gen: dict[str, Any]) -> Measured:
    return combine([run_batch(model, tokenizer, b, spec, gen) for b in batches(examples, batch_size)])


def make_rows(specs: list[PolicySpec], measured: list[Measured], examples: list[Example], batch_size: int,
              gen_length: int) -> list[Row]:
    """Rows of one batch size; specs[0] is the no-cache reference the others are compared with."""
    ref_answers, ref_flops, ref_wall, _ = measured[0]
    rows = []
    n = len(examples)
    for spec, (answers, flops, wall, sequence_forwards) in zip(specs, measured):
        rows.append(Row(
            policy=spec.label, family=spec.family, knob=spec.knob, value=spec.value, batch_size=batch_size,
            n=n, exact_match=sum(score(a, e) for a, e in zip(answers, examples)) / n,
            agreement=sum(a == r for a, r in zip(answers, ref_answers)) / n,
            flop_fraction=flops / ref_flops, speedup=ref_wall / wall, wall_s=wall, steps=sequence_forwards / n,
            tokens_per_forward=gen_length * n / sequence_forwards, tokens_per_s=gen_length * n / wall,
        ))
    return rows


def reference_spec() -> PolicySpec:
    return PolicySpec("full", None, None, lambda: make_policy("full"))


def evaluate_policies(model: DiffusionModel, tokenizer, examples: list[Example], specs: list[PolicySpec],
                      batch_sizes: Sequence[int], gen: dict[str, Any], progress: bool = True,
                      examples_per_batch_size: dict[int, int] | None = None, desc: str = "benchmark") -> list[Row]:
    """Run every spec at every batch size; the no-cache reference (`full`) runs first at each batch size.

    examples_per_batch_size caps the prompts used at a batch size (e.g. {1: 16}: batch 1 is slow and there for
    latency; batching does not change a policy's decisions, which the test suite checks).
    """
    from tqdm.auto import tqdm

    reference = reference_spec()
    ordered = [reference, *(s for s in specs if s.family != "full")]  # the reference is the full recompute: once
    rows = []
    bar = tqdm(total=len(batch_sizes) * len(ordered), desc=desc, disable=not progress)
    all_examples = examples
    for batch_size in batch_sizes:
        examples = all_examples[: (examples_per_batch_size or {}).get(batch_size, len(all_examples))]
        _run(model, tokenizer, examples[:batch_size], reference, batch_size, gen)  # warm-up, not timed
        measured = []
        for spec in ordered:
            measured.append(_run(model, tokenizer, examples, spec, batch_size, gen))
            bar.update()
            bar.set_postfix_str(f"b={batch_size} {spec.label}")
        rows += make_rows(ordered, measured, examples, batch_size, gen["gen_length"])
    bar.close()
    return rows


def print_table(rows: list[Row], title: str = "policy benchmark") -> str:
    """Print the rows as a rich table; returns the plain-text rendering too."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("policy", "batch", "exact match", "agree w/ no-cache", "FLOP fraction", "wall speedup",
                "speedup / FLOP reduction", "tokens/s", "tokens/forward"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        efficiency = r.speedup * r.flop_fraction
        table.add_row(r.policy, str(r.batch_size), f"{r.exact_match:.3f}", f"{r.agreement:.3f}",
                      f"{r.flop_fraction:.3f}", f"{r.speedup:.2f}x", f"{efficiency:.2f}", f"{r.tokens_per_s:.1f}",
                      f"{r.tokens_per_forward:.2f}")
    console = Console(width=170, record=True)
    console.print(table)
    return console.export_text()


def pareto_plot(rows: list[Row], path: str | Path, batch_size: int | None = None) -> Path:
    """Exact match against FLOP fraction, one line per policy family (its knob sweep), at one batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_size = batch_size if batch_size is not None else max(r.batch_size for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    families: dict[str, list[Row]] = {}
    for r in rows:
        if r.batch_size == batch_size:
            families.setdefault(r.family, []).append(r)
    for ax, metric, label in ((axes[0], "exact_match", "exact match"),
                              (axes[1], "agreement", "agreement with the no-cache answer")):
        colours = plt.get_cmap("tab20").colors  # 20 colours and 8 markers: no two families look alike
        for i, (family, points) in enumerate(families.items()):
            points = sorted(points, key=lambda r: r.flop_fraction)
            ax.plot([p.flop_fraction for p in points], [getattr(p, metric) for p in points],
                    marker="os^Dv<>P"[i % 8], color=colours[(2 * i) % 20 + (i // 10) % 2], label=family,
                    linestyle="--" if family == "oracle" else "-")
        ax.set_xlabel("FLOP fraction of no-cache (lower = cheaper)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs compute (batch {batch_size})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(rows: list[Row], directory: str | Path, name: str, meta: dict[str, Any]) -> dict[str, str]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{name}.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2, default=str))
    text = print_table(rows, title=name)
    (directory / f"{name}.txt").write_text(text)
    png = pareto_plot(rows, directory / f"{name}_pareto.png")
    return {"json": str(json_path), "table": str(directory / f"{name}.txt"), "plot": str(png)}


def load_model_and_tokenizer(directory: str | Path, device: str = "cpu") -> tuple[DiffusionModel, Any]:
    """The model at `directory` (any family; loaded straight onto `device`, bf16 on CUDA) and its tokenizer, with a
    clear error when it is missing."""
    from cache_core.checkpoint import load_model, load_tokenizer

    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(f"no model checkpoint at {directory}: train the built-in model with `python train.py "
                                "mode=pretrain` or set paths.model")
    return load_model(directory, device=device), load_tokenizer(directory)


def run(cfg: Any) -> dict:
    """`python train.py mode=benchmark` (cfg: policies.config.RootConfig)."""
    from cache_core.bench import tracking
    from cache_core.bench.config import make_task

    b = cfg.benchmark
    model, tokenizer = load_model_and_tokenizer(cfg.paths.model, device=b.device)
    examples = make_task(cfg.task).split(b.split, b.n_examples)
    specs = heuristic_specs(b.policies, include_oracle=b.include_oracle)
    caps = dict(b.examples_per_batch_size)
    gen = cfg.generation.kwargs()
    run = tracking.start_run(cfg.logger, "benchmark", cfg)
    try:
        rows = evaluate_policies(model, tokenizer, examples, specs, list(b.batch_sizes), gen,
                                 examples_per_batch_size=caps)
        meta = {"model": str(cfg.paths.model), "split": b.split, "n_examples": len(examples), "caps": caps,
                "generation": gen, "threads": torch.get_num_threads(), "device": str(model.device)}
        out = write_results(rows, tracking.per_job(b.output_dir), "benchmark", meta)
        log_results(run, rows, out, "benchmark")
    finally:
        run.finish()
    log.info("benchmark written: %s", out)
    print(f"JSON: {out['json']}\ntable: {out['table']}\nplot: {out['plot']}")
    return out


def log_results(run: Any, rows: list[Row], out: dict[str, str], name: str) -> None:
    """The rows as a W&B table, the Pareto plot as an image, and the files as an artifact of the job's run."""
    run.log_table(f"{name}/rows", [asdict(r) for r in rows])
    run.log_image(f"{name}/pareto", out["plot"])
    run.log_artifact([out["json"], out["table"], out["plot"]], name, kind="results")

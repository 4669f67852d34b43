"""The policy benchmark: every policy across its knob on the test split, at several batch sizes.

    python train.py mode=benchmark                      # heuristics + oracle, batch 1 and 16, built-in model
    python train.py mode=benchmark benchmark.n_examples=32 'benchmark.batch_sizes=[16]'
    python train.py mode=benchmark 'benchmark.learned=[{name: predictor, path: checkpoints/policies/predictor.onnx}]'
    python train.py mode=benchmark 'benchmark.random_model={d_model: 1024, n_heads: 16, n_kv_heads: 16}'

For each (policy, knob value, batch size) it measures exact match, agreement with the no-cache answer, FLOP fraction
(FLOPs spent / FLOPs of the no-cache run on the same prompts), wall-clock speedup (no-cache wall time / wall time,
same prompts and batch size), tokens/s and the policy share: the seconds the policy spends deciding (feature
computation + `plan`, and its end-of-step hook; `StepRecord.policy_s`) over those plus the seconds of the steps
themselves (`StepRecord.wall_s`). It prints a table, writes JSON, and draws one accuracy-vs-FLOPs plot (PNG) per batch
size. Learned policy files (`benchmark.learned`, as `evaluate.learned`) join the heuristics across
`benchmark.thresholds` / `benchmark.budgets`. `policies.evaluate` calls `evaluate_policies` with the learned policies
added.

`benchmark.random_model` (a dict of `ModelConfig` fields, e.g. a wider model) swaps the checkpoint's weights for a
randomly initialised LLaDA model of the checkpoint's config with those fields replaced (seeded by `seed`; same
tokenizer and prompts): a timing instrument for a model whose forward dominates as a real model's does. Its exact
match and agreement are meaningless (random weights); its FLOP fraction, wall speedup, tokens/s and policy share are
the figures to read.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

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
    # policy seconds (features + plan + end-of-step hook) / (policy seconds + step seconds), all prompts
    policy_share: float = float("nan")
    policy_s: float = 0.0  # the policy seconds themselves, all prompts


class Measured(NamedTuple):
    """One spec's measurement on some prompts."""

    answers: list[str]
    flops: float
    wall: float  # seconds of generate()
    n_forwards: int  # forwards x sequences
    policy_s: float = 0.0  # seconds deciding (GenerationStats.policy_seconds)
    step_s: float = 0.0  # seconds in session.step (GenerationStats.step_seconds)


def run_batch(model: DiffusionModel, tokenizer, batch: list[Example], spec: PolicySpec, gen: dict[str, Any]
              ) -> Measured:
    """One generate() call of `spec` on one batch of prompts."""
    prompts = [encode_prompt(tokenizer, e) for e in batch]
    t0 = time.perf_counter()
    result = generate(model, prompts, policy=spec.build(), **gen)
    wall = time.perf_counter() - t0
    answers = [tokenizer.decode(row.tolist()) for row in result.tokens]
    stats = result.stats
    return Measured(answers, stats.flops, wall, len(stats.steps) * len(batch), stats.policy_seconds,
                    stats.step_seconds)


def combine(parts: Sequence[Measured]) -> Measured:
    """The batches of one spec, in prompt order, as one measurement (sums in that order: any backend that splits
    the prompts into the same batches gets the same FLOPs, bit for bit)."""
    answers, flops, wall, steps, policy_s, step_s = [], 0.0, 0.0, 0, 0.0, 0.0
    for m in (Measured(*p) for p in parts):
        answers, flops, wall, steps = answers + list(m.answers), flops + m.flops, wall + m.wall, steps + m.n_forwards
        policy_s, step_s = policy_s + m.policy_s, step_s + m.step_s
    return Measured(answers, flops, wall, steps, policy_s, step_s)


def batches(examples: list[Example], batch_size: int) -> list[list[Example]]:
    return [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]


def _run(model: DiffusionModel, tokenizer, examples: list[Example], spec: PolicySpec, batch_size: int,
         gen: dict[str, Any]) -> Measured:
    return combine([run_batch(model, tokenizer, b, spec, gen) for b in batches(examples, batch_size)])


def make_rows(specs: list[PolicySpec], measured: list[Measured], examples: list[Example], batch_size: int,
              gen_length: int) -> list[Row]:
    """Rows of one batch size; specs[0] is the no-cache reference the others are compared with."""
    ref_answers, ref_flops, ref_wall = measured[0][:3]
    rows = []
    n = len(examples)
    for spec, m in zip(specs, measured):
        answers, flops, wall, sequence_forwards, policy_s, step_s = Measured(*m)
        decided = policy_s + step_s
        rows.append(Row(
            policy=spec.label, family=spec.family, knob=spec.knob, value=spec.value, batch_size=batch_size,
            n=n, exact_match=sum(score(a, e) for a, e in zip(answers, examples)) / n,
            agreement=sum(a == r for a, r in zip(answers, ref_answers)) / n,
            flop_fraction=flops / ref_flops, speedup=ref_wall / wall, wall_s=wall, steps=sequence_forwards / n,
            tokens_per_forward=gen_length * n / sequence_forwards, tokens_per_s=gen_length * n / wall,
            policy_share=policy_s / decided if decided > 0 else float("nan"), policy_s=policy_s,
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
                "speedup / FLOP reduction", "tokens/s", "tokens/forward", "policy share"):
        if col == "policy":
            table.add_column(col, justify="left", overflow="fold")  # labels are read whole, never cut
        else:
            table.add_column(col, justify="right")
    for r in rows:
        efficiency = r.speedup * r.flop_fraction
        table.add_row(r.policy, str(r.batch_size), f"{r.exact_match:.3f}", f"{r.agreement:.3f}",
                      f"{r.flop_fraction:.3f}", f"{r.speedup:.2f}x", f"{efficiency:.2f}", f"{r.tokens_per_s:.1f}",
                      f"{r.tokens_per_forward:.2f}", f"{100 * r.policy_share:.1f}%")
    console = Console(width=190, record=True)
    console.print(table)
    return console.export_text()


COLOURS = 10  # tab10
MARKERS = "os^Dv<>PX"  # 9 markers: (i mod 10, i mod 9) differ for the first 90 families


def family_styles(rows: list[Row], learned: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """A matplotlib style per family, the same in every plot of these rows: a colour (tab10) and a marker (a cycle
    of 9: no two of the first 90 families share both), learned policies thick and on top, the oracle dashed and
    underneath.
    learned: the learned families (None: every family that is no registered policy)."""
    from matplotlib import colormaps

    if learned is None:
        from cache_core.registry import policy_registry

        registered = set(policy_registry())
        learned = [f for f in dict.fromkeys(r.family for r in rows) if f not in registered]
    colours = colormaps["tab10"].colors
    styles = {}
    for i, family in enumerate(dict.fromkeys(r.family for r in rows)):
        mine = family in learned
        oracle = family == "oracle"  # dashed and underneath: a policy on the oracle's points stays visible
        styles[family] = dict(color=colours[i % COLOURS], marker=MARKERS[i % len(MARKERS)],
                              linestyle="--" if oracle else "-", linewidth=2.8 if mine else 1.3,
                              markersize=8 if mine else 5, zorder=4 if mine else 1.5 if oracle else 2,
                              alpha=0.9, label=family)
    return styles


def pareto_plot(rows: list[Row], path: str | Path, batch_size: int | None = None,
                learned: Sequence[str] | None = None) -> Path:
    """At one batch size (default the largest): exact match, agreement and wall-clock speedup against FLOP fraction,
    one line per policy family (its knob sweep, sorted by FLOP fraction). Styles come from all the rows
    (`family_styles`), so a family looks the same in the plot of every batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_size = batch_size if batch_size is not None else max(r.batch_size for r in rows)
    styles = family_styles(rows, learned)
    families: dict[str, list[Row]] = {}
    for r in rows:
        if r.batch_size == batch_size:
            families.setdefault(r.family, []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    panels = ((axes[0], "exact_match", "exact match"), (axes[1], "agreement", "agreement with the no-cache answer"),
              (axes[2], "speedup", "wall-clock speedup over no-cache"))
    for ax, metric, label in panels:
        for family, points in families.items():
            points = sorted(points, key=lambda r: (r.flop_fraction, getattr(r, metric)))
            ax.plot([p.flop_fraction for p in points], [getattr(p, metric) for p in points], **styles[family])
        ax.set_xlabel("FLOP fraction of no-cache (lower = cheaper)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs compute")
        ax.grid(alpha=0.3)
    lo = min((r.flop_fraction for pts in families.values() for r in pts), default=1.0)
    xs = [lo + (1.0 - lo) * k / 50 for k in range(51)]
    axes[2].plot(xs, [1 / x for x in xs], color="grey", linestyle=":", linewidth=1, zorder=1,
                 label="1 / FLOP fraction (ideal)")
    axes[2].legend(fontsize=7, loc="upper right")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"batch size {batch_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(rows: list[Row], directory: str | Path, name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """<name>.json (meta + rows), <name>.txt (the table), one Pareto PNG per batch size (<name>_pareto_b<bs>.png)
    and <name>_pareto.png (the largest batch size's). Returns their paths: json, table, plot (the largest batch
    size's) and plots (one per batch size, ascending); meta gains `plots` (batch size -> path)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = sorted({r.batch_size for r in rows})
    plots = [pareto_plot(rows, directory / f"{name}_pareto_b{size}.png", size) for size in sizes]
    main = directory / f"{name}_pareto.png"
    shutil.copyfile(plots[-1], main)
    meta = {**meta, "plot": str(main), "plots": {str(size): str(p) for size, p in zip(sizes, plots)}}
    json_path = directory / f"{name}.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2, default=str))
    text = print_table(rows, title=name)
    (directory / f"{name}.txt").write_text(text)
    return {"json": str(json_path), "table": str(directory / f"{name}.txt"), "plot": str(main),
            "plots": [str(p) for p in plots]}


def load_model_and_tokenizer(directory: str | Path, device: str = "cpu") -> tuple[DiffusionModel, Any]:
    """The model at `directory` (any family; loaded straight onto `device`, bf16 on CUDA) and its tokenizer, with a
    clear error when it is missing."""
    from cache_core.checkpoint import load_model, load_tokenizer

    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(f"no model checkpoint at {directory}: train the built-in model with `python train.py "
                                "mode=pretrain` or set paths.model")
    return load_model(directory, device=device), load_tokenizer(directory)


def random_model(directory: str | Path, overrides: dict[str, Any], seed: int, device: str = "cpu") -> DiffusionModel:
    """A LLaDA model of the config at `directory` with `overrides` (ModelConfig fields) replaced and random weights
    (the engine's initialisation under torch.manual_seed(seed), on the CPU, then moved to `device`: bf16 on CUDA).
    A timing instrument only: its answers mean nothing."""
    from dataclasses import replace

    from cache_core.checkpoint import CONFIG_FILE, default_dtype, read_json
    from cache_core.models import LLaDAModel, ModelConfig, family_of

    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no model checkpoint at {directory}: benchmark.random_model takes its config (and "
                                "tokenizer) from paths.model")
    raw = read_json(config_path, "model config")
    family = family_of(raw, str(config_path))
    if family is not LLaDAModel:
        raise ValueError(f"benchmark.random_model builds a LLaDA model from the checkpoint's config, but {directory} "
                         f"holds a {family.__name__}; point paths.model at a LLaDA-layout checkpoint")
    unknown = sorted(set(overrides) - set(ModelConfig.field_names()))
    if unknown:
        raise ValueError(f"benchmark.random_model: {unknown} are not ModelConfig fields "
                         f"({sorted(ModelConfig.field_names())})")
    try:
        cfg = replace(LLaDAModel.config_from_dict(raw, str(config_path)), **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"benchmark.random_model={overrides}: {err}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaDAModel(cfg)
    return model.to(device=device, dtype=default_dtype(device)).eval()


def run(cfg: Any) -> dict:
    """`python train.py mode=benchmark` (cfg: policies.config.RootConfig)."""
    from cache_core.bench import tracking
    from cache_core.bench.config import make_task
    from cache_core.checkpoint import load_tokenizer

    b = cfg.benchmark
    if b.random_model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.paths.model, device=b.device)
    else:
        model = random_model(cfg.paths.model, dict(b.random_model), cfg.seed, device=b.device)
        tokenizer = load_tokenizer(cfg.paths.model)
    examples = make_task(cfg.task).split(b.split, b.n_examples)
    specs = heuristic_specs(b.policies, include_oracle=b.include_oracle)
    if b.learned:
        from policies.evaluate import learned_specs  # lazily: the bench does not import the policies package

        specs += learned_specs(list(b.learned), b.thresholds, b.budgets)
    caps = dict(b.examples_per_batch_size)
    gen = cfg.generation.kwargs()
    run = tracking.start_run(cfg.logger, "benchmark", cfg)
    try:
        rows = evaluate_policies(model, tokenizer, examples, specs, list(b.batch_sizes), gen,
                                 examples_per_batch_size=caps)
        meta = {"model": str(cfg.paths.model), "split": b.split, "n_examples": len(examples), "caps": caps,
                "generation": gen, "threads": torch.get_num_threads(), "device": str(model.device),
                "learned": [tracking.plain_config(x) for x in b.learned],
                "learned_families": sorted({s.family for s in specs} - set(policy_registry())),
                "random_model": None if b.random_model is None else {
                    "overrides": dict(b.random_model), "seed": cfg.seed, "config": model.config_dict(),
                    "note": "random weights: exact match and agreement are meaningless; read FLOP fraction, wall "
                            "speedup, tokens/s and policy share"}}
        out = write_results(rows, tracking.per_job(b.output_dir), "benchmark", meta)
        log_results(run, rows, out, "benchmark")
    finally:
        run.finish()
    log.info("benchmark written: %s", out)
    print(f"JSON: {out['json']}\ntable: {out['table']}\nplot: {out['plot']}\nplots: {', '.join(out['plots'])}")
    return out


def log_results(run: Any, rows: list[Row], out: dict[str, Any], name: str) -> None:
    """The rows as a W&B table, the Pareto plots as images (`<name>/pareto` the largest batch size's), and the files
    as an artifact of the job's run."""
    run.log_table(f"{name}/rows", [asdict(r) for r in rows])
    run.log_image(f"{name}/pareto", out["plot"])
    for path in out.get("plots", []):
        run.log_image(f"{name}/{Path(path).stem.removeprefix(name + '_')}", path)
    run.log_artifact([out["json"], out["table"], out["plot"], *out.get("plots", [])], name, kind="results")

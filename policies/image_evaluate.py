"""Evaluate the image family's policies (`python train.py mode=evaluate experiment=dit`): the image heuristics
across their knobs, the Learning-to-Cache static router, the oracle, and exported learned policies trained on the
image schema, against the uncached DDIM sampler on the same noise.

Per point (policy, knob value, batch size): FLOP fraction, wall-clock and speedup against no cache, PSNR and SSIM
against the uncached sample from the same noise, the digit classifier's accuracy on the samples (as their
conditioning class), and the Frechet classifier distance (FCD: FID's formula in the classifier's feature space,
not FID) of the samples to the test-set digits. It writes JSON, a table, a Pareto plot (FLOP fraction against PSNR
and against accuracy, every family its colour and marker) and a grid of samples per family (PNG).

Summary (the issue's target): quality = accuracy within `evaluate.max_em_loss` of no cache's and PSNR >=
`evaluate.min_psnr`. The best heuristic point H is the cheapest heuristic point of that quality (the router counts
as a heuristic family, `l2c`); a learned policy beats it at the cheapest of its points with accuracy >= H's -
max_em_loss and PSNR >= H's - `evaluate.max_psnr_loss` dB, if that point spends fewer FLOPs than H.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cache_core.bench import tracking
from cache_core.bench.benchmark import PolicySpec, heuristic_specs
from cache_core.image.data import class_labels, digits
from cache_core.image.heuristics import fit_teacache_coefficients
from cache_core.image.metrics import (
    CLASSIFIER_FILE,
    classifier_accuracy,
    frechet_classifier_distance,
    load_classifier,
    psnr,
    ssim,
)
from cache_core.image.sample import sample_images
from cache_core.image.session import initial_noise
from cache_core.registry import make_policy

log = logging.getLogger(__name__)
HEURISTIC_FAMILIES = ("fora", "toca", "teacache", "teacache_identity", "deepcache", "l2c", "never")


@dataclass
class ImageRow:
    policy: str
    family: str
    knob: str | None
    value: Any
    batch_size: int
    n: int
    flop_fraction: float
    psnr: float
    ssim: float
    accuracy: float
    fcd: float
    wall_s: float
    speedup: float
    images_per_s: float


def image_specs(heuristics: list[str] | None, include_oracle: bool, teacache_coefficients: list[float] | None,
                router: str | None, steps: int | None = None) -> list[PolicySpec]:
    """The image heuristics across their knobs (TeaCache with and without its fitted rescaling), the router at
    `router` (left out, with a warning saying why, when it was trained for another number of steps), the oracle."""
    from cache_core.image.heuristics import read_router

    specs = []
    for spec in heuristic_specs(heuristics, include_oracle, modality="image"):
        if spec.family == "l2c" and router is not None and steps is not None:
            trained = read_router(router).shape[0]
            if trained != steps:
                log.warning("l2c left out: the router %s was trained for %d steps, this evaluation samples %d; "
                            "train one with `python -m cache_core.image.router --steps %d`", router, trained, steps,
                            steps)
                continue
        if spec.family == "teacache" and teacache_coefficients is not None:
            # TeaCache with its fitted rescaling (the paper's), and without it (identity), which is the better
            # trade-off on the built-in DiT: both are reported, the best heuristic is the cheaper of the two.
            specs.append(PolicySpec("teacache_identity", spec.knob, spec.value, spec.build))
            spec = PolicySpec(spec.family, spec.knob, spec.value, lambda v=spec.value: make_policy(
                "teacache", threshold=v, coefficients=teacache_coefficients))
        if spec.family == "l2c" and router is not None:
            spec = PolicySpec(spec.family, spec.knob, spec.value, lambda v=spec.value: make_policy(
                "l2c", threshold=v, router=router))
        specs.append(spec)
    return specs


def measure(model: Any, spec: PolicySpec, labels: torch.Tensor, noise: torch.Tensor, steps: int, block_length: int,
            batch_size: int) -> tuple[torch.Tensor, float, float]:
    """(images, FLOP fraction, wall seconds) of one policy over every label, in batches."""
    images, flops, full, wall = [], 0.0, 0.0, 0.0
    for start in range(0, len(labels), batch_size):
        policy = spec.build()
        t0 = time.perf_counter()
        result = sample_images(model, labels[start:start + batch_size], steps, policy=policy,
                               block_size=block_length, noise=noise[start:start + batch_size])
        wall += time.perf_counter() - t0
        images.append(result.images)
        flops += result.stats.flops
        full += result.stats.full_flops
    return torch.cat(images), flops / full, wall


def evaluate_images(model: Any, classifier: Any, specs: list[PolicySpec], n: int, steps: int, block_length: int,
                    batch_sizes: list[int], seed: int = 0, progress: bool = True
                    ) -> tuple[list[ImageRow], dict[str, torch.Tensor]]:
    """Every spec at every batch size on n images (classes round robin, seeded noise); the rows and, per spec label,
    the samples of the first batch size (for the grid)."""
    from tqdm.auto import tqdm

    labels = class_labels(n, seed)
    noise = initial_noise(model, n, seed + 10_000)  # test noise: never the env's train/validation streams
    test_images, _ = digits("test", model.config.image_size)
    rows, samples = [], {}
    full_spec = PolicySpec("full", None, None, lambda: make_policy("full"))
    ordered = [full_spec, *(s for s in specs if s.family != "full")]
    bar = tqdm(total=len(ordered) * len(batch_sizes), desc="evaluate images", unit="point", disable=not progress)
    for b in batch_sizes:
        measure(model, full_spec, labels[:b], noise[:b], steps, block_length, b)  # warm-up, untimed
        reference, _, full_wall = measure(model, full_spec, labels, noise, steps, block_length, b)
        for spec in ordered:
            if spec.family == "full":
                images, fraction, wall = reference, 1.0, full_wall
            else:
                images, fraction, wall = measure(model, spec, labels, noise, steps, block_length, b)
            rows.append(ImageRow(
                policy=spec.label, family=spec.family, knob=spec.knob, value=spec.value, batch_size=b, n=n,
                flop_fraction=float(fraction), psnr=float(psnr(images, reference).mean()),
                ssim=float(ssim(images, reference).mean()), accuracy=classifier_accuracy(classifier, images, labels),
                fcd=frechet_classifier_distance(classifier, images, test_images), wall_s=wall,
                speedup=full_wall / wall if wall else float("nan"), images_per_s=n / wall if wall else float("nan")))
            if b == batch_sizes[0]:
                samples[spec.label] = images[:20].cpu()
            bar.update()
    bar.close()
    return rows, samples


def summarize(rows: list[ImageRow], learned: list[str], max_accuracy_loss: float, min_psnr: float,
              max_psnr_loss: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b in sorted({r.batch_size for r in rows}):
        at = [r for r in rows if r.batch_size == b]
        full = next(r for r in at if r.family == "full")
        floor = full.accuracy - max_accuracy_loss - 1e-9

        def ok(r: ImageRow, floor: float = floor) -> bool:
            return r.accuracy >= floor and r.psnr >= min_psnr - 1e-9

        cheapest: dict[str, dict[str, Any]] = {}
        for family in sorted({r.family for r in at}):
            good = [r for r in at if r.family == family and ok(r)]
            if good:
                r = min(good, key=lambda r: r.flop_fraction)
                cheapest[family] = asdict(r)
        heuristic = [r for r in at if r.family in HEURISTIC_FAMILIES and ok(r)]
        entry: dict[str, Any] = {"full_accuracy": full.accuracy, "cheapest_at_quality": cheapest}
        if heuristic:
            h = min(heuristic, key=lambda r: r.flop_fraction)
            entry["best_heuristic"] = asdict(h)
            for name in learned:
                near = [r for r in at if r.family == name and r.accuracy >= h.accuracy - max_accuracy_loss - 1e-9
                        and r.psnr >= h.psnr - max_psnr_loss - 1e-9]
                if near:
                    r = min(near, key=lambda r: r.flop_fraction)
                    others = {f: c["flop_fraction"] for f, c in cheapest.items() if f in HEURISTIC_FAMILIES}
                    entry[name] = {"point": asdict(r), "flop_reduction_vs_best_heuristic": h.flop_fraction /
                                   r.flop_fraction, "cheaper_than_every_heuristic": all(
                                       r.flop_fraction < f for f in others.values()), "heuristics_at_quality": others}
                else:
                    entry[name] = {"point": None, "note": "no point within the best heuristic's quality"}
        out[f"batch_{b}"] = entry
    return out


def table(rows: list[ImageRow]) -> str:
    head = ("| policy | batch | FLOP frac | PSNR dB | SSIM | accuracy | FCD | speedup | img/s |\n"
            "|---|---|---|---|---|---|---|---|---|")
    body = [f"| {r.policy} | {r.batch_size} | {r.flop_fraction:.3f} | {r.psnr:.2f} | {r.ssim:.4f} | {r.accuracy:.3f} "
            f"| {r.fcd:.2f} | {r.speedup:.2f} | {r.images_per_s:.1f} |" for r in rows]
    return "\n".join([head, *body])


def pareto_plot(rows: list[ImageRow], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r.family for r in rows})
    markers = "osD^v<>pPX*h"
    colours = plt.get_cmap("tab20").colors
    batch_sizes = sorted({r.batch_size for r in rows})
    fig, axes = plt.subplots(len(batch_sizes), 2, figsize=(12, 4.5 * len(batch_sizes)), squeeze=False)
    for i, b in enumerate(batch_sizes):
        for j, (key, label) in enumerate((("psnr", "PSNR vs no cache (dB)"), ("accuracy", "classifier accuracy"))):
            ax = axes[i][j]
            for k, family in enumerate(families):
                pts = sorted((r for r in rows if r.family == family and r.batch_size == b),
                             key=lambda r: r.flop_fraction)
                ax.plot([r.flop_fraction for r in pts], [getattr(r, key) for r in pts], marker=markers[k % 12],
                        color=colours[(2 * k) % 20], label=family, linewidth=1.2, markersize=6, alpha=0.9)
            ax.set_xlabel("FLOP fraction of no cache")
            ax.set_ylabel(label)
            ax.set_title(f"batch {b}: {label}")
            ax.grid(alpha=0.3)
        axes[i][1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sample_grid(samples: dict[str, torch.Tensor], chosen: dict[str, str], path: Path) -> Path:
    """One row per family (its chosen point's label): the first 10 samples (classes in the evaluation's order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(chosen)
    columns = min(10, min(len(samples[chosen[f]]) for f in names))
    fig, axes = plt.subplots(len(names), columns, figsize=(2.4 + columns * 0.75, 0.3 + len(names) * 0.78),
                             squeeze=False)
    for i, family in enumerate(names):
        images = samples[chosen[family]]
        for j in range(columns):
            ax = axes[i][j]
            ax.imshow(images[j, 0].numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(chosen[family], fontsize=7, rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=2.3 / (2.4 + columns * 0.75), right=0.99, top=0.99, bottom=0.01, wspace=0.06, hspace=0.08)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(cfg: Any) -> dict[str, Any]:
    """`mode=evaluate` on an image model (cfg: RootConfig with `experiment=dit`)."""
    from cache_core.checkpoint import load_model
    from policies.evaluate import learned_specs

    e = cfg.evaluate
    model = load_model(cfg.paths.model)
    classifier = load_classifier(Path(cfg.paths.model) / CLASSIFIER_FILE)
    steps, block_length = cfg.env.steps, cfg.env.block_length
    coefficients = fit_teacache_coefficients(model, class_labels(20, 1), steps, seed=1)  # TeaCache's calibration
    log.info("TeaCache rescaling polynomial (fitted on 20 calibration trajectories, noise seed 1): %s", coefficients)
    router = str(Path(cfg.paths.checkpoints) / "policies" / "dit_router.json")
    specs = image_specs(list(e.heuristics) if e.heuristics else None, e.include_oracle, coefficients, router, steps)
    specs += learned_specs(list(e.learned), e.thresholds, e.budgets)
    out_dir = Path(e.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_ = tracking.start_run(cfg.logger, "evaluate", cfg)
    try:
        rows, samples = evaluate_images(model, classifier, specs, e.n_examples, steps, block_length,
                                        list(e.batch_sizes), seed=cfg.seed, progress=e.progress)
        learned = sorted({s.family for s in specs} - set(HEURISTIC_FAMILIES) - {"full", "oracle"})
        summary = summarize(rows, learned, e.max_em_loss, e.min_psnr, e.max_psnr_loss)
        first = f"batch_{e.batch_sizes[0]}"
        chosen = {"full": "full"}
        for family, point in summary[first]["cheapest_at_quality"].items():
            if family != "full":
                chosen[family] = point["policy"]
        text = table(rows)
        paths = {"json": out_dir / f"{e.name}.json", "table": out_dir / f"{e.name}.md",
                 "plot": out_dir / f"{e.name}_pareto.png", "grid": out_dir / f"{e.name}_samples.png"}
        paths["json"].write_text(json.dumps({"rows": [asdict(r) for r in rows], "summary": summary,
                                             "teacache_coefficients": coefficients, "steps": steps,
                                             "block_length": block_length}, indent=1, default=str) + "\n")
        paths["table"].write_text(text + "\n")
        pareto_plot(rows, paths["plot"])
        sample_grid(samples, chosen, paths["grid"])
        print(text)
        for b, entry in summary.items():
            h = entry.get("best_heuristic")
            print(f"{b}: no-cache accuracy {entry['full_accuracy']:.3f}; best heuristic at quality: "
                  f"{h['policy'] if h else None} ({h['flop_fraction']:.3f} FLOPs)" if h else f"{b}: none at quality")
            for name in learned:
                if name in entry and entry[name].get("point"):
                    p = entry[name]["point"]
                    print(f"  {name}: {p['policy']} at {p['flop_fraction']:.3f} FLOPs, "
                          f"{entry[name]['flop_reduction_vs_best_heuristic']:.2f}x fewer than the best heuristic")
        print("files:", {k: str(v) for k, v in paths.items()})
        run_.log_table("evaluate/images", [asdict(r) for r in rows])
        run_.log_image("evaluate/pareto", paths["plot"])
        run_.log_image("evaluate/samples", paths["grid"])
        return {"rows": [asdict(r) for r in rows], "summary": summary, "files": {k: str(v) for k, v in paths.items()}}
    finally:
        run_.finish()

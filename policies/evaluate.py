"""Evaluate learned policies against the heuristics on the test split (`python train.py mode=evaluate`).

Full recompute (the reference), every heuristic across its knob and the oracle come from
`cache_core.bench.benchmark.heuristic_specs`; each exported policy listed in `evaluate.learned` (the predictor this
run trained, the shipped predictor and RL agent in `checkpoints/policies/`, ...) is added across its threshold, or
across `evaluate.budgets` when its manifest says it is budget-conditioned. A listed file that does not exist is
skipped (unless `required`), so a policy that lands later plugs in without a code change. Measurement, table, JSON
and Pareto plot are `cache_core.bench.benchmark`'s (`evaluate_policies`, `write_results`).

The summary answers the project's question: per family, the cheapest point whose exact match is within
`max_em_loss` of full recompute, and how many times fewer FLOPs the learned policies need than the best heuristic
there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from cache_core.bench import tracking
from cache_core.bench.benchmark import (
    Measured,
    PolicySpec,
    Row,
    batches,
    combine,
    evaluate_policies,
    heuristic_specs,
    load_model_and_tokenizer,
    log_results,
    make_rows,
    reference_spec,
    run_batch,
    write_results,
)
from cache_core.cache import RefreshPlan
from cache_core.features import TEXT_SCHEMA, FeatureSchema, StepFeatures, projectable
from cache_core.learned import LearnedPolicy, policy_files, read_manifest
from cache_core.policy import ReusePolicy, StepContext
from envs.config import RayConfig, apply_setting
from policies.config import LearnedEntry, RootConfig

log = logging.getLogger(__name__)
BUDGET = TEXT_SCHEMA.global_index(TEXT_SCHEMA.budget)  # the text schema's, for existing imports


class BudgetedPolicy(ReusePolicy):
    """A budget-conditioned learned policy run at a fixed budget: sets the budget feature (the column of the inner
    policy's feature schema, its `schema`; else the features' own), as `generate(..., budget=b)` would, so that one
    benchmark run can sweep budgets as a knob."""

    uses_features = True
    knob = "budget"

    def __init__(self, inner: ReusePolicy, budget: float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget={budget} must lie in (0, 1]")
        self.inner, self.budget = inner, float(budget)
        self.name = inner.name
        # What the inner policy declares, so the driver treats the pair as it treats the inner policy. It sets the
        # budget feature itself, so generate() is given none.
        self.uses_attention, self.refresh_at_block_start = inner.uses_attention, inner.refresh_at_block_start
        self.modalities = inner.modalities

    def reset(self, batch_size: int) -> None:
        self.inner.reset(batch_size)

    def on_block_start(self, ctx: StepContext) -> None:
        self.inner.on_block_start(ctx)

    def on_step_end(self, ctx: StepContext, result: Any) -> None:
        self.inner.on_step_end(ctx, result)

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        schema = getattr(self.inner, "schema", None)
        schema = schema if isinstance(schema, FeatureSchema) else features.schema
        if schema.id != features.schema.id and projectable(features.schema, schema):
            features = features.project(schema)  # an older schema of this family (a text v1 policy)
        if schema.id != features.schema.id:  # the inner policy refuses them, with a message naming both schemas
            return self.inner.plan(features, ctx)
        global_ = features.global_.clone()
        global_[:, schema.global_index(schema.budget)] = self.budget
        return self.inner.plan(StepFeatures(features.blocks, global_, features.schema), ctx)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "budget": self.budget}


def learned_specs(entries: list[LearnedEntry], thresholds: list[float] | None = None,
                  budgets: list[float] | None = None) -> list[PolicySpec]:
    """PolicySpecs of exported policy files (`evaluate.learned` entries), swept over thresholds (refresh-logit
    outputs), budgets (budget-conditioned files) or a single point (action-logit outputs; entries of one name with
    `knob`/`value`, e.g. depth predictors trained at several epsilons, form one curve)."""
    specs = []
    for entry in entries:
        name, path, required = entry.name, Path(entry.path), entry.required
        if not policy_files(path)[0].is_file():
            if required:
                raise FileNotFoundError(f"learned policy {name!r}: {path} does not exist (export it with "
                                        "`python train.py mode=export`, or drop it from evaluate.learned)")
            log.info("learned policy %s: %s not found, skipped", name, path)
            continue
        manifest = read_manifest(path)  # refuses another schema / format with a clear message
        LearnedPolicy(path)  # loads the graph once, so a corrupt file fails here and not mid-benchmark
        if manifest.get("budget_conditioned") and budgets:
            for b in budgets:
                specs.append(PolicySpec(name, "budget", float(b),
                                        lambda p=path, b=b: BudgetedPolicy(LearnedPolicy(p), float(b))))
        elif manifest["output"] == "refresh_logit":
            knob = LearnedPolicy.knob  # the decision threshold on sigmoid(refresh logit)
            for t in thresholds or LearnedPolicy.knob_sweep:
                specs.append(PolicySpec(name, knob, float(t),
                                        lambda p=path, k=knob, t=t: LearnedPolicy(p, **{k: float(t)})))
        else:  # argmax of action logits: one point per file; `knob`/`value` place several files on one curve
            knob = entry.knob if entry.value is not None else None
            specs.append(PolicySpec(name, knob, entry.value, lambda p=path: LearnedPolicy(p)))
    return specs


class EvalWorker:
    """One evaluation worker (a Ray actor): its own model; measures every policy on one batch of prompts."""

    def __init__(self, model_path: str, gen: dict[str, Any]):
        import ray

        from cache_core.runtime import set_threads

        set_threads()  # $BLOCKREUSE_THREADS of the actor's runtime env (ray.worker_threads)
        self.model, self.tokenizer = load_model_and_tokenizer(model_path)
        if ray.get_gpu_ids():  # a worker given a GPU (ray.gpus_per_worker) runs its model there
            self.model = self.model.to("cuda")
        self.gen, self.warm = gen, set()

    def measure(self, batch: list[Any], specs: list[PolicySpec], batch_size: int) -> list[Measured]:
        """Every spec (the reference first) on this batch; the first batch of a batch size warms up, untimed."""
        if batch_size not in self.warm:
            run_batch(self.model, self.tokenizer, batch, specs[0], self.gen)
            self.warm.add(batch_size)
        return [run_batch(self.model, self.tokenizer, batch, spec, self.gen) for spec in specs]


def evaluate_policies_ray(model_path: str, examples: list[Any], specs: list[PolicySpec], batch_sizes: list[int],
                          gen: dict[str, Any], ray_cfg: RayConfig, progress: bool = True, desc: str = "evaluate"
                          ) -> list[Row]:
    """`evaluate_policies` on Ray workers: each batch of prompts (every policy on it) is one task. The same batches
    as the local backend, so the same answers, exact match, agreement, FLOP fractions and steps; wall times (and
    speedups) are each worker's, summed per policy as locally."""
    import ray
    from tqdm.auto import tqdm

    from envs.cluster import check_resources, connect, run_tasks, worker_options

    ordered = [reference_spec(), *(s for s in specs if s.family != "full")]
    if ray_cfg.address is None and not (Path(model_path) / "config.json").is_file():
        load_model_and_tokenizer(model_path)  # a local instance shares this filesystem: its clear error, here
    started_ray = connect(ray_cfg)
    workers: list[Any] = []
    try:
        check_resources(ray_cfg)
        actor = ray.remote(EvalWorker).options(**worker_options(ray_cfg))
        workers = [actor.remote(str(model_path), gen) for _ in range(ray_cfg.num_workers)]
        specs_ref = ray.put(ordered)
        jobs = [(b, chunk) for b in batch_sizes for chunk in batches(examples, b)]
        bar = tqdm(total=len(jobs), desc=f"{desc} (ray)", unit="batch", disable=not progress)
        results: dict[int, list[Measured]] = {}
        calls = [("measure", (chunk, specs_ref, b)) for b, chunk in jobs]
        for k, result in run_tasks(workers, calls, "evaluate.backend=ray", ray_cfg,
                                   "no rows were written: run the evaluation again"):
            results[k] = result
            bar.update()
        bar.close()
        rows = []
        for b in batch_sizes:
            mine = [k for k, (size, _) in enumerate(jobs) if size == b]
            measured = [combine([results[k][j] for k in mine]) for j in range(len(ordered))]
            rows += make_rows(ordered, measured, examples, b, gen["gen_length"])
        return rows
    finally:
        for w in workers:
            ray.kill(w)
        if started_ray:
            ray.shutdown()


def summarize(rows: list[Row], max_em_loss: float, learned: list[str], min_agreement: float = 0.99
              ) -> dict[str, Any]:
    """Per batch size and criterion, the cheapest point of each family that meets it, and the FLOP ratio best
    heuristic / learned policy there. Criteria: `exact_match` = within max_em_loss of full recompute's exact match
    (the project's target); `agreement` = the same answer as full recompute on >= min_agreement of the prompts
    (stricter, and still informative when the model's exact match is low)."""
    out: dict[str, Any] = {}
    for batch_size in sorted({r.batch_size for r in rows}):
        at = [r for r in rows if r.batch_size == batch_size]
        full = next(r for r in at if r.family == "full")
        em_floor = full.exact_match - max_em_loss - 1e-9
        criteria = {"exact_match": lambda r, floor=em_floor: r.exact_match >= floor,
                    "agreement": lambda r: r.agreement >= min_agreement - 1e-9}
        entry: dict[str, Any] = {"full_exact_match": full.exact_match}
        for criterion, ok in criteria.items():
            best: dict[str, dict[str, Any]] = {}
            for r in at:
                if ok(r) and (r.family not in best or r.flop_fraction < best[r.family]["flop_fraction"]):
                    best[r.family] = {"policy": r.policy, "flop_fraction": r.flop_fraction,
                                      "exact_match": r.exact_match, "agreement": r.agreement}
            heuristic = [v for k, v in best.items() if k not in learned and k not in ("oracle", "full")]
            top = min(heuristic, key=lambda v: v["flop_fraction"]) if heuristic else None
            block: dict[str, Any] = {"best_per_family": best, "best_heuristic": top}
            for name in learned:
                if name in best and top is not None:
                    block[f"{name}_flop_reduction_vs_best_heuristic"] = (top["flop_fraction"]
                                                                         / best[name]["flop_fraction"])
            entry[criterion] = block
        out[str(batch_size)] = entry
    return out


def print_summary(summary: dict[str, Any], max_em_loss: float, min_agreement: float = 0.99) -> str:
    titles = {"exact_match": f"exact match within {100 * max_em_loss:g} point(s) of no-cache",
              "agreement": f"same answer as no-cache on >= {100 * min_agreement:g}% of prompts"}
    lines = []
    for batch_size, entry in summary.items():
        lines.append(f"batch {batch_size}: no-cache exact match {entry['full_exact_match']:.3f}")
        for criterion, title in titles.items():
            block = entry[criterion]
            lines.append(f" cheapest point per family with {title}:")
            for family, v in sorted(block["best_per_family"].items(), key=lambda kv: kv[1]["flop_fraction"]):
                lines.append(f"  {family:15s} {v['policy']:42s} FLOP fraction {v['flop_fraction']:.3f}  "
                             f"exact match {v['exact_match']:.3f}  agreement {v['agreement']:.3f}")
            for key, value in block.items():
                if key.endswith("_vs_best_heuristic"):
                    lines.append(f"  {key.replace('_', ' ')}: {value:.2f}x")
    text = "\n".join(lines)
    print(text)
    return text


def run(cfg: RootConfig) -> dict[str, Any]:
    """`mode=evaluate`: heuristics, oracle and learned policy files on the test split -> JSON, table, Pareto PNGs
    (one per batch size, and `<name>_pareto.png` at the largest)."""
    from cache_core.bench.config import make_task
    from policies.config import family_of_config

    if family_of_config(cfg) == "image":  # experiment=dit: images, their metrics and their heuristics
        from policies.image_evaluate import run as run_image

        return run_image(cfg)
    e = cfg.evaluate
    examples = make_task(cfg.task).split(e.split, e.n_examples)
    learned = learned_specs(list(e.learned), e.thresholds, e.budgets)
    specs = heuristic_specs(e.heuristics, include_oracle=e.include_oracle) + learned
    learned_names = sorted({s.family for s in learned})
    log.info("evaluate: %d policy points (%s learned) on %d %s examples", len(specs), learned_names or "no",
             len(examples), e.split)
    base = cfg.generation.kwargs()
    settings = [{}] if not e.settings else [dict(x) for x in e.settings]
    run = tracking.start_run(cfg.logger, "evaluate", cfg)
    model = tokenizer = None
    results = []
    try:
        for setting in settings:
            name, held_out = setting.pop("name", None), bool(setting.pop("held_out", False))
            gen = apply_setting(base, setting)
            if e.settings:
                name = name or setting_name(gen)
            if e.backend != "ray" and model is None:
                model, tokenizer = load_model_and_tokenizer(cfg.paths.model)
            out, summary = _evaluate_one(cfg, examples, specs, learned_names, gen, model, tokenizer, run,
                                         e.name if name is None else f"{e.name}_{name}")
            results.append({"setting": name, "held_out": held_out, "generation": gen, "files": out,
                            "summary": summary})
        if e.settings:
            table = settings_table(results, learned_names, e.max_em_loss, e.min_agreement)
            directory = Path(tracking.per_job(e.output_dir))
            (directory / f"{e.name}_settings.json").write_text(json.dumps(
                {"settings": results, "table": table}, indent=2, default=str))
            text = print_settings_table(table, e.max_em_loss, e.min_agreement)
            (directory / f"{e.name}_settings.txt").write_text(text + "\n")
            print(f"settings table: {directory / f'{e.name}_settings.txt'} (JSON beside it)")
        run.summary({"n_examples": len(examples), "learned": learned_names})
    finally:
        run.finish()
    out, summary = results[-1]["files"], results[-1]["summary"]
    return {**out, "summary": summary, "settings": results}


def setting_name(gen: dict[str, Any]) -> str:
    """A short label of a decoding setting: g256_b32_thr0.9, g256_b32_s256."""
    schedule = f"thr{gen['threshold']:g}" if gen.get("threshold") is not None else f"s{gen['steps']}"
    return f"g{gen['gen_length']}_b{gen['block_length']}_{schedule}"


def _evaluate_one(cfg: RootConfig, examples: list[Any], specs: list[PolicySpec], learned_names: list[str],
                  gen: dict[str, Any], model: Any, tokenizer: Any, run: Any, name: str
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every spec on the examples under one decoding setting: rows, summary, files (JSON, table, plots)."""
    from cache_core.bench import taskfile, tracking

    e = cfg.evaluate
    counted = dict(taskfile.COUNTERS)  # answers the scoring rule could not read, programs killed: reported below
    if e.backend == "ray":
        rows = evaluate_policies_ray(cfg.paths.model, examples, specs, list(e.batch_sizes), gen, cfg.ray,
                                     progress=e.progress, desc=name)
    else:
        rows = evaluate_policies(model, tokenizer, examples, specs, list(e.batch_sizes), gen,
                                 progress=e.progress, desc=name)
    summary = summarize(rows, e.max_em_loss, learned_names, e.min_agreement)
    scoring = {k: taskfile.COUNTERS[k] - counted[k] for k in counted}
    if any(scoring.values()):
        log.warning("evaluate: over all policies, %d answers had no extractable final answer and %d programs "
                    "hit their timeout (each counted wrong)", scoring["extraction_failures"],
                    scoring["code_timeouts"])
    meta = {"task": {"kind": cfg.task.kind, "name": cfg.task.name if cfg.task.kind == "file" else "builtin",
                     "path": cfg.task.path, "scoring_failures": scoring},
            "model": str(cfg.paths.model), "split": e.split, "n_examples": len(examples), "generation": gen,
            "backend": e.backend, "workers": cfg.ray.num_workers if e.backend == "ray" else 1,
            "threads": torch.get_num_threads(), "learned": [tracking.plain_config(x) for x in e.learned],
            "summary": summary}
    out = write_results(rows, tracking.per_job(e.output_dir), name, meta)
    summary_text = print_summary(summary, e.max_em_loss, e.min_agreement)
    Path(out["table"]).write_text(Path(out["table"]).read_text() + "\n" + summary_text + "\n")
    log_results(run, rows, out, name)
    print(f"evaluate files (in {Path(out['json']).parent}):\n  JSON: {out['json']}\n  table: {out['table']}\n"
          f"  plot: {out['plot']}\n  plots per batch size: {', '.join(out['plots'])}")
    return out, summary


def settings_table(results: list[dict[str, Any]], learned: list[str], max_em_loss: float, min_agreement: float
                   ) -> list[dict[str, Any]]:
    """One row per (setting, batch size, criterion): the best heuristic's and each learned family's cheapest point
    meeting the criterion, and the FLOP reduction of the learned one over the heuristic."""
    rows = []
    for r in results:
        for batch_size, entry in r["summary"].items():
            for criterion in ("exact_match", "agreement"):
                block = entry[criterion]
                top = block["best_heuristic"]
                row = {"setting": r["setting"], "held_out": r["held_out"], "batch_size": int(batch_size),
                       "criterion": criterion, "full_exact_match": entry["full_exact_match"],
                       "best_heuristic": top}
                for name in learned:
                    row[name] = block["best_per_family"].get(name)
                    row[f"{name}_reduction"] = block.get(f"{name}_flop_reduction_vs_best_heuristic")
                rows.append(row)
    return rows


def print_settings_table(table: list[dict[str, Any]], max_em_loss: float, min_agreement: float) -> str:
    from rich.console import Console
    from rich.table import Table

    learned = sorted({k for row in table for k in row if k.endswith("_reduction")})
    t = Table(title=f"cheapest point per setting (exact match within {100 * max_em_loss:g} point(s) of no cache; "
                    f">= {100 * min_agreement:g}% agreement)")
    for col in ("setting", "held out", "batch", "criterion", "no-cache EM", "best heuristic"):
        t.add_column(col)
    for key in learned:
        t.add_column(key.removesuffix("_reduction"))
        t.add_column("reduction", justify="right")

    def point(p: dict[str, Any] | None) -> str:
        return "none meets it" if p is None else f"{p['flop_fraction']:.3f} {p['policy']}"

    for row in table:
        cells = [str(row["setting"]), "yes" if row["held_out"] else "", str(row["batch_size"]), row["criterion"],
                 f"{row['full_exact_match']:.3f}", point(row["best_heuristic"])]
        for key in learned:
            name = key.removesuffix("_reduction")
            cells += [point(row.get(name)), "" if row.get(key) is None else f"{row[key]:.2f}x"]
        t.add_row(*cells)
    console = Console(width=220, record=True)
    console.print(t)
    return console.export_text()

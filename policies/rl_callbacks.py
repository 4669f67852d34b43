"""Callbacks and logging of the RL run: episode metrics, the deployable-policy evaluation, W&B, checkpoints.

- `EpisodeMetricsCallback`: the env's end-of-episode info (exact match, agreement, FLOP fraction, budget excess)
  as `rollout/*` means, next to SB3's own `rollout/ep_rew_mean`.
- `GenerationEvalCallback`: every `freq` env steps, exports the deterministic policy to ONNX (the deployable file),
  runs `generate(..., policy=<that file>, budget=b)` on held-out prompts at each evaluation budget and logs exact
  match, agreement with the no-cache answer and FLOP fraction under `eval/*`; keeps the best model by `eval/score`.
- `WandbOutputFormat`: an SB3 logger output that forwards every dumped record (rollout/*, train/*, time/*, eval/*)
  to `wandb.log` (SB3's `WandbCallback` reads metrics through TensorBoard, which this project does not install).
- `AgentCheckpointCallback` / `save_agent` / `read_agent_checkpoint`: agent checkpoints as data only (safetensors +
  JSON: weights, optimiser state, counters, the network's config, the feature schema id), so resuming unpickles
  nothing. SB3 zips (pickles) are refused, and so is a checkpoint of another feature schema than the env's.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter

from cache_core.features import SCHEMAS, TEXT_SCHEMA, FeatureSchema, schema_by_id
from cache_core.validate import read_json_object

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "blockreuse-rl-checkpoint"
CHECKPOINT_VERSION = 2  # 1 was an SB3 zip with a provenance file; 2 holds no pickle
EPISODE_KEYS = ("exact_match", "agreement", "agree_exact", "episode_flop_fraction", "budget", "budget_excess")


# --- agent checkpoints: safetensors + JSON, no pickle ----------------------------------------------------------------
def checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """`<name>.safetensors` (weights and optimiser tensors) and `<name>.json` (counters, optimiser settings, the
    network's config) of an agent checkpoint given as `<name>`, `<name>.safetensors` or `<name>.json`."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.parent / (path.name + ".safetensors"), path.parent / (path.name + ".json")


def agent_schema(model: BaseAlgorithm) -> FeatureSchema:
    """The feature schema an agent reads: its features extractor's (BlockEncoderExtractor), else the text schema."""
    schema = getattr(model.policy.features_extractor, "schema", None)
    return schema if isinstance(schema, FeatureSchema) else TEXT_SCHEMA


def check_agent_schema(record: dict[str, Any], source: str | Path, schema: FeatureSchema | None = None
                       ) -> FeatureSchema:
    """The feature schema an agent checkpoint's record names; refused when it is not registered or, given the
    env's schema, when it is another (an agent trained on one model family's features cannot continue on another's)."""
    recorded = record.get("schema_id")
    if recorded not in SCHEMAS:
        raise ValueError(f"{source}: trained on feature schema {recorded!r}, which this blockreuse does not know "
                         f"(known schemas: {sorted(SCHEMAS)}; a model family's schema is registered when its package "
                         "is imported, e.g. `import cache_core.image`); start a new run instead of resuming")
    if schema is not None and recorded != schema.id:
        raise ValueError(f"{source}: trained on feature schema {recorded!r}, but the env computes {schema.id!r} "
                         f"({schema.family} family); resume with the env it was trained on, or start a new run")
    return schema_by_id(recorded)


def save_agent(model: BaseAlgorithm, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """What resuming needs, as data: the policy's weights and the optimiser's tensors (safetensors), the counters,
    the optimiser's settings and the network's config (JSON, written last: a checkpoint whose JSON is there is
    whole). Nothing in it is code, so loading it runs none. Returns the .safetensors path."""
    from safetensors.torch import save_file

    tensor_path, json_path = checkpoint_files(path)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    schema_id = agent_schema(model).id
    policy = model.policy
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}  # SB3 shares the features extractor between actor and critic: store it once
    seen: dict[tuple, str] = {}
    for key, value in policy.state_dict().items():
        identity = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if value.numel() and identity in seen:
            aliases[f"policy.{key}"] = seen[identity]
            continue
        seen[identity] = f"policy.{key}"
        tensors[f"policy.{key}"] = value
    optimizer = policy.optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tmp_tensors = tensor_path.with_suffix(".safetensors.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp_tensors),
              metadata={"format": CHECKPOINT_FORMAT, "schema_id": schema_id})
    record = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "schema_id": schema_id,
              "tensors_sha256": _sha256(tmp_tensors),
              "algo": type(model).__name__.lower(), "action_mode": getattr(policy, "action_mode", None),
              "num_timesteps": int(model.num_timesteps), "n_updates": int(getattr(model, "_n_updates", 0)),
              "max_blocks": int(model.observation_space["blocks"].shape[0]),
              "policy_config": getattr(policy, "blockreuse_config", None), "aliases": aliases,
              "optimizer": {"param_groups": optimizer["param_groups"], "scalars": scalars}, **(extra or {})}
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    # Both files land by rename; the record names the tensors' hash, so a kill between the two renames (new weights,
    # old record) is caught when the checkpoint is read.
    tmp_tensors.replace(tensor_path)
    tmp.replace(json_path)
    return tensor_path


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_agent_checkpoint(path: str | Path, schema: FeatureSchema | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the record of an agent checkpoint written by `save_agent`, checked (its feature schema
    registered and, given the env's `schema`, that one); an SB3 zip (a pickle) is refused, never opened."""
    from safetensors import safe_open

    if Path(path).suffix == ".zip":
        raise ValueError(f"{path}: SB3 zips hold pickles, which run code when loaded, so this project never loads "
                         "them; resume from a checkpoint it wrote: <name>.safetensors + <name>.json "
                         "(e.g. <run dir>/checkpoints/rl_agent_4096_steps.safetensors)")
    tensor_path, json_path = checkpoint_files(path)
    for file in (tensor_path, json_path):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file; an agent checkpoint is <name>.safetensors + <name>.json "
                                    "(written by `python train.py mode=rl` under its checkpoints/)")
    record = read_json_object(json_path, "agent checkpoint record")
    if record.get("format") != CHECKPOINT_FORMAT or record.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{json_path}: not a {CHECKPOINT_FORMAT} version {CHECKPOINT_VERSION} record "
                         f"(format={record.get('format')!r}, version={record.get('format_version')!r})")
    check_agent_schema(record, json_path, schema)
    for key in ("num_timesteps", "n_updates"):
        if not isinstance(record.get(key), int) or record[key] < 0:
            raise ValueError(f"{json_path}: {key}={record.get(key)!r} must be a count; the record is corrupt")
    if record.get("tensors_sha256") != _sha256(tensor_path):
        raise ValueError(f"{tensor_path}: its contents are not those {json_path.name} was written with (a save "
                         "killed half-way, or a file replaced); resume from another checkpoint")
    try:
        with safe_open(str(tensor_path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"{tensor_path}: not a readable safetensors file ({err}); the checkpoint is corrupt or "
                         "truncated") from err
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{tensor_path}: NaN/inf in {bad[:3]}; the run diverged or the file is damaged")
    return tensors, record


def restore_agent(model: BaseAlgorithm, tensors: dict[str, torch.Tensor], record: dict[str, Any],
                  source: str | Path = "checkpoint", weights_only: bool = False) -> None:
    """Load a checkpoint's policy weights into `model` and, unless weights_only, its optimiser state and counters."""
    aliases = dict(record.get("aliases") or {})
    named = {**tensors, **{alias: tensors[target] for alias, target in aliases.items() if target in tensors}}
    policy = {k[len("policy."):]: v for k, v in named.items() if k.startswith("policy.")}
    try:
        model.policy.load_state_dict(policy, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{source}: the checkpoint's network differs from this agent's ({err}); resume with the "
                         "rl.policy settings it was trained with") from None
    if weights_only:
        return
    opt = record["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, scalars in opt.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(scalars)
    model.policy.optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    model.num_timesteps = int(record["num_timesteps"])
    model._n_updates = int(record["n_updates"])


class AgentCheckpointCallback(BaseCallback):
    """Every `save_freq` calls (x n_envs env steps), `save_agent` to `<dir>/<prefix>_<timesteps>_steps`."""

    def __init__(self, save_freq: int, directory: str | Path, name_prefix: str = "rl_agent", verbose: int = 0):
        super().__init__(verbose)
        self.save_freq, self.directory, self.name_prefix = int(save_freq), Path(directory), name_prefix

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            path = save_agent(self.model, self.directory / f"{self.name_prefix}_{self.num_timesteps}_steps")
            log.info("saved checkpoint %s", path)
        return True


class TimeLimitCallback(BaseCallback):
    """Stops `learn` once `max_minutes` of wall-clock time have passed since training started (None: no limit)."""

    def __init__(self, max_minutes: float | None, verbose: int = 0):
        super().__init__(verbose)
        self.max_seconds = None if max_minutes is None else 60.0 * float(max_minutes)
        self.started = time.perf_counter()
        self.stopped_early = False

    def _on_training_start(self) -> None:
        self.started = time.perf_counter()

    def _on_step(self) -> bool:
        if self.max_seconds is not None and time.perf_counter() - self.started > self.max_seconds:
            if not self.stopped_early:
                log.info("time limit of %.0f min reached at %d timesteps: stopping", self.max_seconds / 60,
                         self.num_timesteps)
            self.stopped_early = True
            return False
        return True


# --- episode metrics ----------------------------------------------------------------------------------------------
class EpisodeMetricsCallback(BaseCallback):
    """Averages the env's end-of-episode info into `rollout/<key>` (dumped with SB3's rollout metrics)."""

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"]):
            if not done:
                continue
            for key in EPISODE_KEYS:
                if key in info:
                    name = "flop_fraction" if key == "episode_flop_fraction" else key
                    self.logger.record_mean(f"rollout/{name}", float(info[key]))
        return True


# --- evaluation of the deployable policy ----------------------------------------------------------------------------
def evaluate_exported(path: str | Path, env: Any, budgets: Sequence[float | None], batch_size: int,
                      references: list[list[int]] | None = None) -> dict[str, Any]:
    """Exact match, agreement with the no-cache answer and FLOP fraction of the exported policy at `path`, run with
    `generate()` on every prompt of `env.prompts` (the env supplies the model, decoding settings and the task's exact
    match rule), once per budget. Returns {"budgets": [{budget, exact_match, agreement, flop_fraction}], ...}.
    An image env evaluates itself (`ImageReuseEnv.evaluate_exported`: agreement from PSNR, no exact match)."""
    from cache_core.generate import generate

    if hasattr(env, "evaluate_exported"):
        return env.evaluate_exported(str(path), list(budgets), batch_size, references)

    items = [env.prompts[i] for i in range(len(env.prompts))]
    gen = dict(gen_length=env.gen_length, block_length=env.block_length, steps=env.steps, threshold=env.threshold,
               temperature=env.temperature, remasking=env.remasking, seed=0)

    def run_all(policy: Any, budget: float | None) -> tuple[list[list[int]], float, float]:
        out, flops, full = [], 0.0, 0.0
        for i in range(0, len(items), batch_size):
            batch = [list(it.prompt_ids) for it in items[i:i + batch_size]]
            result = generate(env.model, batch, policy=policy, budget=budget, **gen)
            out += result.tokens.tolist()
            flops += result.stats.flops
            full += result.stats.full_flops
        return out, flops, full

    if references is None:
        references, _, _ = run_all("full", None)
    rows = []
    for budget in budgets:
        answers, flops, full = run_all(str(path), budget)
        em = float(np.mean([env.prompts.exact_match(i, a) for i, a in enumerate(answers)])) \
            if env.prompts.has_answers else float("nan")
        agree = float(np.mean([a == r for a, r in zip(answers, references)]))
        rows.append({"budget": budget, "exact_match": em, "agreement": agree, "flop_fraction": flops / full})
    return {"budgets": rows, "references": references}


def eval_score(rows: list[dict[str, Any]], flop_weight: float, over_weight: float) -> float:
    """Mean over budgets of accuracy - over_weight * budget overshoot - flop_weight * FLOP fraction (higher is better),
    accuracy = the mean of exact match and agreement with the no-cache answer (agreement alone without answers): the
    task's score, and what caching must not change."""
    scores = []
    for r in rows:
        acc = r["agreement"] if math.isnan(r["exact_match"]) else 0.5 * (r["exact_match"] + r["agreement"])
        over = max(0.0, r["flop_fraction"] - (1.0 if r["budget"] is None else r["budget"]))
        scores.append(acc - over_weight * over - flop_weight * r["flop_fraction"])
    return float(np.mean(scores))


class GenerationEvalCallback(BaseCallback):
    """Every `freq` env steps (and at the start and the end of training): export the deterministic policy, evaluate it
    with `generate()` at every budget, log `eval/*`, keep the best model (by `eval/score`) as `best_path`."""

    def __init__(self, env: Any, export: Callable[[BaseAlgorithm, Path], Path], budgets: Sequence[float | None],
                 freq: int, batch_size: int = 16, flop_weight: float = 0.1, over_weight: float = 2.0,
                 best_path: str | Path | None = None, at_start: bool = True, verbose: int = 0):
        super().__init__(verbose)
        self.env, self.export, self.budgets = env, export, list(budgets)
        self.freq, self.batch_size = int(freq), int(batch_size)
        self.flop_weight, self.over_weight = float(flop_weight), float(over_weight)
        self.best_path = None if best_path is None else Path(best_path)
        self.at_start = at_start
        self.best_score = -math.inf
        self.best_saved = False  # whether this run wrote best_path
        self.history: list[dict[str, Any]] = []
        self._references: list[list[int]] | None = None
        self._last_eval = -1
        self._tmp = tempfile.TemporaryDirectory(prefix="rl_eval_")

    def _on_training_start(self) -> None:
        self._last_eval = self.num_timesteps
        if self.at_start:
            self.evaluate()

    def _on_step(self) -> bool:
        if self.freq > 0 and self.num_timesteps - self._last_eval >= self.freq:
            self._last_eval = self.num_timesteps
            self.evaluate()
        return True

    def _on_training_end(self) -> None:
        if not self.history or self.history[-1]["timesteps"] != self.num_timesteps:
            self.evaluate()
        self._tmp.cleanup()

    def evaluate(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        path = self.export(self.model, Path(self._tmp.name) / "policy.onnx")
        result = evaluate_exported(path, self.env, self.budgets, self.batch_size, self._references)
        self._references = result["references"]
        rows = result["budgets"]
        score = eval_score(rows, self.flop_weight, self.over_weight)
        for r in rows:
            tag = "" if r["budget"] is None else f"@{r['budget']:g}"
            for key in ("exact_match", "agreement", "flop_fraction"):
                self.logger.record(f"eval/{key}{tag}", r[key])
        for key in ("exact_match", "agreement", "flop_fraction"):
            self.logger.record(f"eval/{key}", float(np.mean([r[key] for r in rows])))
        self.logger.record("eval/score", score)
        self.logger.record("eval/seconds", time.perf_counter() - t0)
        entry = {"timesteps": int(self.num_timesteps), "score": score, "budgets": rows}
        self.history.append(entry)
        improved = score > self.best_score
        if improved:
            self.best_score = score
            if self.best_path is not None:
                save_agent(self.model, self.best_path, {"eval": entry})
                self.best_saved = True
        self.logger.record("eval/best_score", self.best_score)
        self.logger.dump(self.num_timesteps)
        summary = ", ".join(f"b={r['budget']}: em {r['exact_match']:.3f} flops {r['flop_fraction']:.3f}"
                            for r in rows)
        log.info("eval @ %d steps: score %.4f%s (%s) [%.0fs]", self.num_timesteps, score,
                 " (best)" if improved else "", summary, time.perf_counter() - t0)
        return entry


# --- W&B -----------------------------------------------------------------------------------------------------------
class WandbOutputFormat(KVWriter):
    """SB3 logger output that sends every dumped scalar to the job's W&B run (`cache_core.bench.tracking.Run`;
    step = env timesteps)."""

    def __init__(self, run: Any):
        self.run = run

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        data = {}
        for key, value in key_values.items():
            excluded = key_excluded.get(key) or ()
            if "wandb" in excluded:
                continue
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                data[key] = float(value)
        if data:
            self.run.log({**data, "global_step": int(step)})

    def close(self) -> None:
        pass

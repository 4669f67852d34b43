"""Learned reuse policies at inference: one ONNX file + a JSON manifest, run with onnxruntime.

No Lightning, no Stable-Baselines3, no pickle: the exported network maps the feature schema's policy input
(B, n_blocks, F_block + F_global) to per-block scores, and the manifest says how to read them:

    {"format": "blockreuse-policy", "format_version": 1, "schema_id": <a registered FeatureSchema's id>,
     "action_mode": "binary" | "depth", "n_layers": L, "output": "refresh_logit" | "action_logits",
     "threshold": 0.5, "budget_conditioned": false, "source": {...}, "metrics": {...}}

- output `refresh_logit`: (B, n_blocks) logits; a block is refreshed (all layers) when sigmoid(logit) >= threshold.
- output `action_logits`: (B, n_blocks, A); the argmax action is read by `cache_core.actions`, as the environment
  reads its actions: binary (A = 2): 1 = refresh; depth (A = L + 1): 0 = reuse, j = refresh from layer L - j.
- `budget_control` (binary budget-conditioned files): "feature" = the budget is only the network's input (the files
  before it); "enforce" = the budget is a FLOP fraction the runtime holds (`budget_refresh`): each step refreshes
  the blocks the network scores highest while the generation's spend stays within budget x full recompute, so a
  budget means the same FLOP fraction in every decoding setting.
A file built for another feature schema, action mode or layer count is refused with a message naming both sides: the
manifest's schema must be registered (`cache_core.features.schema_by_id`), and `plan` refuses features of another
schema (a policy trained on one model family does not serve another).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache_core import validate as v
from cache_core.actions import ACTION_MODES, OUTPUTS, n_actions, plan_from_output
from cache_core.cache import RefreshPlan
from cache_core.features import SCHEMAS, StepFeatures, projectable, schema_by_id
from cache_core.policy import ReusePolicy, StepContext

POLICY_FORMAT = "blockreuse-policy"
POLICY_FORMAT_VERSION = 1
BUDGET_CONTROLS = ("feature", "enforce")
BUDGET_SAVING = 1.0  # budget_refresh: unspent budget kept for later steps, in full-recompute steps


class PolicyFileError(ValueError):
    """An exported policy that cannot be used here; the message names the mismatch and the fix."""


def policy_files(path: str | Path) -> tuple[Path, Path]:
    """`<name>.onnx`, `<name>.json` of a policy given as `<name>`, `<name>.onnx` or `<name>.json` (a name may hold
    dots of its own: `predictor.v2` is `predictor.v2.onnx`)."""
    path = Path(path)
    if path.suffix in (".onnx", ".json"):
        path = path.with_suffix("")
    return path.parent / (path.name + ".onnx"), path.parent / (path.name + ".json")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an exported policy, every field checked (types included)."""
    onnx_path, mpath = policy_files(path)
    if not mpath.exists():
        if not onnx_path.exists():
            raise PolicyFileError(f"{path}: no such policy file (an exported policy is <name>.onnx + <name>.json; "
                                  "python train.py mode=export writes one)")
        raise PolicyFileError(f"{onnx_path}: no manifest {mpath.name} beside this ONNX file; re-export the policy "
                              "with `python train.py mode=export`")
    manifest = v.read_json_object(mpath, "policy manifest", PolicyFileError, "re-export the policy")
    if manifest.get("format") != POLICY_FORMAT:
        raise PolicyFileError(f"{mpath}: not a {POLICY_FORMAT} manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") != POLICY_FORMAT_VERSION:
        raise PolicyFileError(
            f"{mpath}: policy format version {manifest.get('format_version')} is not supported "
            f"(this blockreuse reads version {POLICY_FORMAT_VERSION}); re-export the policy"
        )
    if manifest.get("schema_id") not in SCHEMAS:
        raise PolicyFileError(
            f"{mpath}: the policy was trained on feature schema {manifest.get('schema_id')!r}, which this blockreuse "
            f"does not know (known schemas: {sorted(SCHEMAS)}; a model family's schema is registered when its package "
            "is imported, e.g. `import cache_core.image`); retrain (collect + supervised/rl) and re-export it with "
            "this version"
        )
    if manifest.get("action_mode") not in ACTION_MODES or manifest.get("output") not in OUTPUTS:
        raise PolicyFileError(f"{mpath}: action_mode must be one of {ACTION_MODES} and output one of {OUTPUTS}")
    try:
        v.number("n_layers", manifest.get("n_layers"), integer=True, low=1)
        v.fraction("threshold", manifest.get("threshold", 0.5), open_low=False)
        v.flag("budget_conditioned", manifest.get("budget_conditioned", False))
        v.fraction("default_budget", manifest.get("default_budget"), optional=True)
        v.choice("budget_control", manifest.get("budget_control", "feature"), BUDGET_CONTROLS)
    except ValueError as err:
        raise PolicyFileError(f"{mpath}: {err}; re-export the policy") from None
    default = manifest.get("default_budget")
    if default is not None and not manifest.get("budget_conditioned"):
        raise PolicyFileError(f"{mpath}: default_budget={default!r} needs budget_conditioned=true; re-export the "
                              "policy")
    return manifest


class LearnedPolicy(ReusePolicy):
    """A trained network (supervised predictor or RL agent) exported to ONNX, behind the ReusePolicy interface.

    Knob: `refresh_threshold` for refresh-logit outputs (higher = refresh less = aggressive; not `threshold`, which
    is generate()'s parallel-decoding argument); budget-conditioned policies read the budget given to
    `generate(..., budget=...)` from the features, and without one run at the manifest's `default_budget`.
    """

    name = "learned"
    uses_features = True
    modalities = ("text", "image")  # either family's engine may run it; `plan` refuses features of another schema
    knob = "refresh_threshold"
    knob_sweep = (0.1, 0.3, 0.5, 0.7, 0.9)

    def __init__(self, path: str | Path, refresh_threshold: float | None = None, budget_control: str | None = None):
        import onnxruntime as ort

        manifest = read_manifest(path)
        onnx_path = policy_files(path)[0]
        if not onnx_path.exists():
            raise PolicyFileError(f"{onnx_path}: the ONNX file named by the manifest is missing")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # tiny network: threads cost more than they give, and torch holds the cores
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for corrupt graphs
            raise PolicyFileError(f"{onnx_path}: cannot load the ONNX graph ({err}); the file is corrupt") from err
        self.manifest = manifest
        self.schema = schema_by_id(manifest["schema_id"])
        self.path = str(onnx_path)
        self.action_mode = manifest["action_mode"]
        self.output = manifest["output"]
        default = manifest.get("threshold", 0.5)
        self.refresh_threshold = float(default if refresh_threshold is None else refresh_threshold)
        if not 0.0 <= self.refresh_threshold <= 1.0:
            raise ValueError(f"refresh_threshold={self.refresh_threshold} must lie in [0, 1]")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._bound: tuple | None = None  # `_run`'s IOBinding: (input shape, binding, input buffer, output buffer)
        default_budget = manifest.get("default_budget")
        self.default_budget = None if default_budget is None else float(default_budget)
        self.budget_conditioned = bool(manifest.get("budget_conditioned", False))
        self.budget_control = budget_control or manifest.get("budget_control", "feature")
        if self.budget_control not in BUDGET_CONTROLS:
            raise ValueError(f"budget_control={self.budget_control!r}: use one of {list(BUDGET_CONTROLS)}")
        if self.budget_control == "enforce" and (self.action_mode != "binary" or not self.budget_conditioned):
            raise PolicyFileError(f"{self.path}: budget_control='enforce' needs a budget-conditioned binary policy "
                                  f"(this one: action_mode={self.action_mode}, budget_conditioned="
                                  f"{self.budget_conditioned}); use budget_control='feature'")
        self._check_graph()

    def _check_graph(self) -> None:
        """Run the graph once on a dummy input of the schema's width: a manifest that does not fit its graph (another
        output, action mode or input width) is refused here, not at the first generation step."""
        # 0 clipped into each column's declared range, every block real.
        cols = self.schema.columns
        x = np.broadcast_to(np.clip(0.0, [c.low for c in cols], [c.high for c in cols]).astype(np.float32),
                            (1, 3, len(cols))).copy()
        x[..., self.schema.block_index(self.schema.valid)] = 1.0
        try:
            out = self.session.run(None, {self.input_name: x})[0]
        except Exception as err:  # onnxruntime's own error types: wrong input width or name
            raise PolicyFileError(f"{self.path}: the graph does not take the feature schema's input (1, n_blocks, "
                                  f"{x.shape[-1]}) ({err}); the manifest does not describe this graph") from err
        want = (1, 3) if self.output == "refresh_logit" else (
            1, 3, n_actions(self.action_mode, int(self.manifest["n_layers"])))
        if tuple(out.shape) != want:
            raise PolicyFileError(f"{self.path}: the graph outputs shape {tuple(out.shape)} where the manifest "
                                  f"(output={self.output}, action_mode={self.action_mode}, n_layers="
                                  f"{self.manifest['n_layers']}) implies {want}; re-export the policy")
        if not np.isfinite(out).all():
            raise PolicyFileError(f"{self.path}: the graph outputs NaN/inf on a plain input; the file is corrupt")
        self._output_tail = tuple(out.shape[2:])  # per block: nothing (a refresh logit) or the action logits

    def scores(self, features: StepFeatures) -> np.ndarray:
        x = features.policy_input().detach().cpu().numpy()
        out = self._run(x)
        if not np.isfinite(out).all():  # NaN would read as "reuse every block": refuse instead of caching blindly
            raise PolicyFileError(f"{self.path}: the policy output NaN/inf for this step's features (their range: "
                                  f"[{float(x.min()):.3g}, {float(x.max()):.3g}]); the network is broken")
        return out

    def _run(self, x: np.ndarray) -> np.ndarray:
        """The graph's output for the policy input x, run through an IOBinding kept for the input's shape: the input
        is copied into a buffer bound once and the output written into another (a plain `session.run` binds, checks
        and allocates both at every call, which costs a fifth of this small network's time). Returns a copy."""
        if self._bound is None or self._bound[0] != x.shape:
            import onnxruntime as ort

            inp = np.empty(x.shape, np.float32)
            out = np.empty((*x.shape[:2], *self._output_tail), np.float32)
            io = self.session.io_binding()  # (OrtValues over the numpy buffers share their memory)
            io.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(inp))
            io.bind_ortvalue_output(self.output_name, ort.OrtValue.ortvalue_from_numpy(out))
            self._bound = (x.shape, io, inp, out)
        _, io, inp, out = self._bound
        np.copyto(inp, x)  # (casting to float32, as the plain run's input was)
        self.session.run_with_iobinding(io)
        return out.copy()

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        if features.schema is not self.schema and projectable(features.schema, self.schema):
            features = features.project(self.schema)  # a policy of an older schema of this family (text v1)
        if features.schema is not self.schema and features.schema.id != self.schema.id:
            raise PolicyFileError(
                f"{self.path}: the policy was trained on feature schema {self.schema.id!r} ({self.schema.family} "
                f"family), but this step's features have schema {features.schema.id!r} ({features.schema.family} "
                f"family); retrain and re-export a policy for the {features.schema.family} model family"
            )
        if self.action_mode == "depth" and int(self.manifest.get("n_layers", -1)) != ctx.n_layers:
            raise PolicyFileError(
                f"{self.path}: depth policy exported for n_layers={self.manifest.get('n_layers')} but the model has "
                f"{ctx.n_layers}; depth actions only transfer between models of the same depth"
            )
        out = torch.from_numpy(self.scores(features))
        if self.budget_control == "enforce":
            score = out if self.output == "refresh_logit" else out[..., 1] - out[..., 0]  # binary: refresh vs reuse
            cut = 0.0 if self.output == "action_logits" else float(np.log(self.refresh_threshold + 1e-12)
                                                                    - np.log1p(-self.refresh_threshold + 1e-12))
            refresh = budget_refresh(score, features, ctx, confident=score >= cut)
            return RefreshPlan.from_refresh_mask(refresh, ctx.n_layers)
        return plan_from_output(out, self.output, self.action_mode, ctx.n_layers, self.refresh_threshold)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "path": self.path, "refresh_threshold": self.refresh_threshold,
                "budget_control": self.budget_control,
                "action_mode": self.action_mode, "default_budget": self.default_budget,
                "source": self.manifest.get("source", {})}


def budget_refresh(score: torch.Tensor, features: StepFeatures, ctx: StepContext,
                   confident: torch.Tensor | None = None, saving: float = BUDGET_SAVING) -> torch.Tensor:
    """(B, n_blocks) bool: the blocks to refresh this step so that the generation's FLOP fraction tracks its budget.

    The allowance is budget x (steps so far + 1) - spent so far, in units of one full-recompute step (spent from the
    `compute_spent` feature, which counts real FLOPs, so the rounding of earlier steps is paid back). The forced
    (decoding) blocks come first; the others are taken in descending score while their cost fits the allowance, as
    long as the network asks for them (`confident`) or the allowance exceeds `saving` full steps: unspent budget is
    saved up to that much (so a later step can afford a full refresh, e.g. at a block start) and spent on the
    best-scored blocks beyond it. So the generation ends within `saving` / steps of its budget. A block's cost is its
    share of the valid positions: exact for the projections and the MLP, and for attention at a fixed key count; the
    LM head (the decoding block's only) is rounding the feedback absorbs. A budget below the floor (the decoding block
    alone) cannot be met: the step then computes only the forced blocks."""
    schema = features.schema
    spent = features.global_[:, schema.global_index("compute_spent")].to(score.device).double()
    budget = features.global_[:, schema.global_index(schema.budget)].to(score.device).double()
    valid = ctx.key_mask.to(score.device).float()
    partition = ctx.partition
    positions = (partition.to(score.device).sum(valid) if partition is not None
                 else valid.view(valid.shape[0], ctx.n_blocks, -1).sum(-1)).double()
    cost = positions / positions.sum(1, keepdim=True).clamp(min=1)
    forced = features.column(schema.forced).to(score.device) > 0.5
    step = float(ctx.step)
    allowance = budget * (step + 1) - spent * step - (cost * forced).sum(1)
    candidates = ~forced & (positions > 0)
    ranked = score.double().masked_fill(~candidates, float("-inf")).argsort(dim=1, descending=True, stable=True)
    ranked_cost = cost.gather(1, ranked) * candidates.gather(1, ranked)
    cum = ranked_cost.cumsum(1)
    wanted = torch.ones_like(candidates) if confident is None else confident.to(score.device)
    must = (cum - ranked_cost) < (allowance - saving)[:, None]  # the prefix that keeps the saving at most `saving`
    take = (cum <= allowance[:, None] + 1e-9) & candidates.gather(1, ranked) & (wanted.gather(1, ranked) | must)
    refresh = torch.zeros_like(candidates)
    refresh.scatter_(1, ranked, take)
    return (refresh | forced).cpu()


def load_policy(path: str | Path, **knobs: Any) -> LearnedPolicy:
    """Load an exported policy (`<name>.onnx` + `<name>.json`)."""
    return LearnedPolicy(path, **knobs)

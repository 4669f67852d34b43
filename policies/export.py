"""Export a trained network to the deployable policy format: `<path>.onnx` + `<path>.json`, and ship trained policies
(`python train.py mode=export export.source=... export.path=...`). A supervised predictor also gets
`<path>.safetensors` (its weights, for an RL warm start).

`export_onnx(net, path, ...)` takes a network and a path and knows nothing of how the network was trained: the
supervised job calls it on its best checkpoint (`export_checkpoint`, which reads the checkpoint back with
`policies.predictor.load_predictor`, no Lightning), the RL job on its agent's actor.

The contract is `cache_core.learned` (read its docstring): the graph maps the feature schema's policy input
`features` (B, n_blocks, F_block + F_global) to `refresh_logit` (B, n_blocks) or `action_logits` (B, n_blocks, A),
with dynamic batch and n_blocks axes; the manifest says how to read it and which feature schema it was trained on.
`export_onnx` works for any torch module with that signature: the supervised `BlockPredictor` and the RL agent's
exported actor (policies/rl.py) both go through it.

After writing, the file is loaded back through `cache_core.learned.LearnedPolicy` and compared with the network on
random inputs of two shapes, so a file that would decide differently from the network is never left behind silently.
The legacy TorchScript exporter (`dynamo=False`) is used: the dynamo exporter needs onnxscript, which is not a
dependency, and these small graphs gain nothing from it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache_core.actions import ACTION_MODES, OUTPUTS, n_actions
from cache_core.bench.tracking import portable_path
from cache_core.features import TEXT_SCHEMA, FeatureSchema, StepFeatures
from cache_core.learned import POLICY_FORMAT, POLICY_FORMAT_VERSION, policy_files

log = logging.getLogger(__name__)
INPUT_NAME = "features"
OPSET = 17
N_FEATURES = TEXT_SCHEMA.n_features  # the text schema's width, for existing imports


policy_paths = policy_files  # `<path>.onnx`, `<path>.json` (cache_core.learned.policy_files)


def network_schema(net: nn.Module) -> FeatureSchema:
    """The feature schema a network reads: its own `schema` (BlockPredictor, the RL agent's ExportedActor), else the
    text schema (any other module over the text policy input)."""
    schema = getattr(net, "schema", None)
    return schema if isinstance(schema, FeatureSchema) else TEXT_SCHEMA


class _Graph(nn.Module):
    """The exported signature: features only (the network infers real blocks from its schema's valid column), float32
    out."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).float()


def _check_output(out: torch.Tensor, output: str, action_mode: str, n_layers: int, shape: tuple[int, int]) -> None:
    if output == "refresh_logit":
        if tuple(out.shape) != shape:
            raise ValueError(f"output='refresh_logit' needs a network output of shape (B, n_blocks) = {shape}, got "
                             f"{tuple(out.shape)} (a BlockPredictor with n_outputs=1)")
        return
    actions = n_actions(action_mode, n_layers)
    if tuple(out.shape) != (*shape, actions):
        raise ValueError(f"output='action_logits' in action_mode={action_mode!r} with n_layers={n_layers} needs a "
                         f"network output of shape (B, n_blocks, {actions}), got {tuple(out.shape)}")


def export_onnx(net: nn.Module, path: str | Path, *, action_mode: str, output: str, n_layers: int,
                threshold: float = 0.5, budget_conditioned: bool = False, source: dict[str, Any] | None = None,
                metrics: dict[str, Any] | None = None, default_budget: float | None = None) -> Path:
    """Write `<path>.onnx` and its manifest `<path>.json` as `cache_core.learned` reads them; returns the .onnx path.

    net: any module mapping (B, n_blocks, F_block + F_global) float32 to the `output` tensor; its feature schema is
    `network_schema(net)` (recorded in the manifest). action_mode: binary |
    depth. output: refresh_logit (binary only; a block is refreshed when sigmoid >= threshold) | action_logits
    (argmax read as in the environment). default_budget: the budget a budget-conditioned policy runs at when
    generate() is given none (else it would see budget 1 and refresh nearly everything). Raises ValueError on an
    inconsistent combination, and RuntimeError when the written file does not reproduce the network's decisions.
    """
    if action_mode not in ACTION_MODES:
        raise ValueError(f"action_mode={action_mode!r}; choose one of {list(ACTION_MODES)}")
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r}; choose one of {list(OUTPUTS)}")
    if output == "refresh_logit" and action_mode != "binary":
        raise ValueError("output='refresh_logit' is a binary refresh decision; depth policies export action_logits")
    if int(n_layers) < 1:
        raise ValueError(f"n_layers={n_layers} must be >= 1 (the model's layer count)")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold} must lie in [0, 1]")
    if default_budget is not None and not (budget_conditioned and 0.0 < float(default_budget) <= 1.0):
        raise ValueError(f"default_budget={default_budget} needs a budget-conditioned policy and a FLOP fraction in "
                         "(0, 1]")
    schema = network_schema(net)
    onnx_path, json_path = policy_paths(path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)

    was_training = net.training
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    graph = _Graph(net).eval().cpu()  # moves net in place; put back below
    # Trace with sizes > 1 so that no axis is specialised to a constant.
    dummy = _random_features(3, 5, seed=0, schema=schema)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": chosen on purpose, see above
        _check_output(graph(dummy), output, action_mode, int(n_layers), (3, 5))
        torch.onnx.export(
            graph, (dummy,), str(onnx_path), input_names=[INPUT_NAME], output_names=[output],
            dynamic_axes={INPUT_NAME: {0: "batch", 1: "n_blocks"}, output: {0: "batch", 1: "n_blocks"}},
            opset_version=OPSET, dynamo=False,
        )
    import onnx

    onnx.checker.check_model(onnx.load(str(onnx_path)))
    manifest = {
        "format": POLICY_FORMAT, "format_version": POLICY_FORMAT_VERSION, "schema_id": schema.id,
        "schema_version": schema.version, "schema_family": schema.family, "action_mode": action_mode,
        "n_layers": int(n_layers), "output": output,
        "threshold": float(threshold), "budget_conditioned": bool(budget_conditioned),
        "default_budget": None if default_budget is None else float(default_budget),
        # A budget-conditioned binary policy holds its budget as a FLOP fraction (cache_core.learned.budget_refresh).
        "budget_control": "enforce" if budget_conditioned and action_mode == "binary" else "feature",
        "input": {"name": INPUT_NAME, "shape": ["batch", "n_blocks", schema.n_features],
                  "block_features": list(schema.block_names), "global_features": list(schema.global_names)},
        "source": dict(source or {}), "metrics": dict(metrics or {}), "opset": OPSET,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    json_path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    try:
        verify_export(graph, onnx_path, schema=schema)
    finally:
        net.to(device).train(was_training)
    log.info("exported %s (+ %s)", onnx_path, json_path.name)
    return onnx_path


def _random_features(batch: int, n_blocks: int, seed: int, schema: FeatureSchema = TEXT_SCHEMA) -> torch.Tensor:
    """Policy inputs uniform in each column's declared [low, high], every block real (valid column in (0.01, 1])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n_blocks, schema.n_features, generator=g)
    low = torch.tensor([c.low for c in schema.columns])
    x = low + (torch.tensor([c.high for c in schema.columns]) - low) * x  # exact for [0, 1] columns
    valid = schema.block_index(schema.valid)
    x[..., valid] = 0.01 + 0.99 * x[..., valid]
    nb = schema.n_block
    x[..., nb:] = x[:, :1, nb:]  # global features are the same for every block
    return x


def verify_export(net: nn.Module, path: str | Path, atol: float = 1e-4, schema: FeatureSchema | None = None) -> None:
    """The file loaded by onnxruntime must reproduce the network's outputs on inputs of several shapes (of `schema`,
    default the network's)."""
    from cache_core.learned import LearnedPolicy

    schema = network_schema(net) if schema is None else schema
    policy = LearnedPolicy(path)
    if policy.schema.id != schema.id:
        raise RuntimeError(f"{path}: the file records feature schema {policy.schema.id!r}, the network reads "
                           f"{schema.id!r}; export it again")
    net = net.eval()
    nb = schema.n_block
    for batch, n_blocks in ((1, 7), (4, 13)):
        x = _random_features(batch, n_blocks, seed=batch * 100 + n_blocks, schema=schema)
        with torch.no_grad():
            expected = net(x).float()
        features = StepFeatures(x[..., :nb], x[:, 0, nb:], schema)
        got = torch.from_numpy(policy.scores(features))
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=atol, rtol=1e-4):
            err = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
            raise RuntimeError(f"{path}: the exported graph does not reproduce the network (shape {tuple(got.shape)} "
                               f"vs {tuple(expected.shape)}, max |diff| {err:.3g}); not usable")


# --- checkpoints -> files ----------------------------------------------------------------------------------------
def export_checkpoint(ckpt_path: str | Path, path: str | Path, *, threshold: float | None = None,
                      source: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                      budget: float | None = None) -> Path:
    """Export a supervised checkpoint (a `.ckpt` of mode=supervised) to `<path>.onnx/.json` (+ `.safetensors`).
    budget: a budget-conditioned predictor's default budget (None: the oracle FLOP fraction at the training epsilon,
    `policy.epsilon`)."""
    from policies.predictor import load_predictor

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"no supervised checkpoint at {ckpt_path}: train one with `python train.py "
                                "mode=supervised` (its run directory holds checkpoints/best.ckpt)")
    net, meta = load_predictor(ckpt_path)
    if meta.get("n_layers") is None or meta.get("action_mode") is None:
        raise ValueError(f"{ckpt_path}: not a mode=supervised checkpoint (no n_layers / action_mode recorded)")
    conditioned = bool(meta["budget_conditioned"])
    info = {"kind": "supervised", "checkpoint": portable_path(ckpt_path), "epoch": meta.get("epoch"),
            "global_step": meta.get("global_step"), "arch": meta.get("arch"), "hidden": meta.get("hidden"),
            "epsilon": meta.get("epsilon"), "net": meta["net_config"],
            **({"budget_epsilons": meta.get("budget_epsilons"), "budgets": meta.get("budgets")} if conditioned else {}),
            **(source or {})}
    output = "refresh_logit" if meta["action_mode"] == "binary" else "action_logits"
    onnx_path = export_onnx(net, path, action_mode=meta["action_mode"], output=output, n_layers=int(meta["n_layers"]),
                            threshold=meta["threshold"] if threshold is None else float(threshold),
                            budget_conditioned=conditioned, source=info,
                            metrics={**meta.get("val_metrics", {}), **(metrics or {})},
                            default_budget=(None if not conditioned else
                                            float(meta.get("nominal_budget", 1.0) if budget is None else budget)))
    write_weights(net, onnx_path, threshold=float(meta["threshold"]), action_mode=meta["action_mode"],
                  budget_conditioned=conditioned)
    return onnx_path


WEIGHTS_FORMAT = "blockreuse-predictor-weights"


def weights_path(path: str | Path) -> Path:
    """`<path>.safetensors`: the exported predictor's network weights, next to its .onnx and .json."""
    return policy_paths(path)[0].with_suffix(".safetensors")


def write_weights(net: nn.Module, path: str | Path, *, threshold: float, action_mode: str,
                  budget_conditioned: bool) -> Path:
    """The `BlockPredictor` state dict as safetensors, with what a warm start needs in its header (net config,
    training threshold, action mode, budget conditioning, feature schema). cache_core never reads it (it runs the
    .onnx); `python train.py mode=rl` starts the RL agent from it (rl.warm_start)."""
    from safetensors.torch import save_file

    out = weights_path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    config = net.config() if hasattr(net, "config") else {}
    save_file(state, str(out), metadata={
        "format": WEIGHTS_FORMAT, "schema_id": network_schema(net).id, "net_config": json.dumps(config),
        "threshold": repr(float(threshold)), "action_mode": action_mode,
        "budget_conditioned": json.dumps(bool(budget_conditioned))})
    return out


def ship_exported(source: str | Path, path: str | Path) -> Path:
    """Copy an exported policy (`<source>.onnx` + `.json`, and `.safetensors` when there) to `<path>.*`, after loading
    it through the runtime (`LearnedPolicy`), so that a file that cannot run here is never shipped."""
    from cache_core.learned import LearnedPolicy

    src_onnx, src_json = policy_paths(source)
    LearnedPolicy(src_onnx)  # refuses a missing, corrupt or other-schema file with a message naming it
    dst_onnx, dst_json = policy_paths(path)
    if dst_onnx.resolve() == src_onnx.resolve():
        raise ValueError(f"export.source and export.path are the same file ({src_onnx})")
    dst_onnx.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src_onnx, dst_onnx)
    shutil.copyfile(src_json, dst_json)
    if weights_path(source).is_file():
        shutil.copyfile(weights_path(source), weights_path(path))
    elif weights_path(path).is_file():
        weights_path(path).unlink()  # a stale predictor's weights must not sit beside another policy
    return dst_onnx


def run(cfg: Any) -> dict[str, Any]:
    """`mode=export`: ship a trained policy to an explicit path. export.source: a supervised `.ckpt` (exported
    afresh, with export.threshold / export.budget) or an exported `.onnx` of any run (checked, then copied)."""
    e = cfg.export
    if not e.source or not e.path:
        raise ValueError("mode=export ships a trained policy to an explicit place: give export.source=<a run's "
                         "checkpoints/best.ckpt or predictor.onnx / rl_agent.onnx> and export.path=<where>, e.g. "
                         "export.path=checkpoints/policies/predictor")
    source = Path(e.source)
    if source.suffix == ".ckpt":
        onnx_path = export_checkpoint(source, e.path, threshold=e.threshold, budget=e.budget)
    elif source.suffix in (".onnx", ".json"):
        if e.threshold is not None or e.budget is not None:
            raise ValueError("export.threshold / export.budget re-export a supervised checkpoint; an exported .onnx "
                             "is shipped as it is (give its run's checkpoints/best.ckpt to change them)")
        onnx_path = ship_exported(source, e.path)
    else:
        raise ValueError(f"export.source={source}: expected a supervised checkpoint (.ckpt) or an exported policy "
                         "(.onnx)")
    json_path, weights = onnx_path.with_suffix(".json"), weights_path(onnx_path)
    shipped = [str(p) for p in (onnx_path, json_path, weights) if p.is_file()]
    print(f"exported policy: {', '.join(shipped)} (from {source})")
    return {"onnx": str(onnx_path), "manifest": str(json_path), "weights": str(weights) if weights.is_file() else None,
            "source": str(source)}

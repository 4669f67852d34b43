"""The block predictor: a small network over the feature schema's policy input that scores every KV-cache block.

    x (B, n_blocks, schema.n_features) = StepFeatures.policy_input()
      -> encode(x, block_mask)  (B, n_blocks, hidden)   per-block embedding
      -> head                   (B, n_blocks) refresh logit (n_outputs = 1) or (B, n_blocks, n_outputs) action logits

Two trunks behind one interface:
- `mlp`: every block on its own (its features + the broadcast global features); cheapest, and the same function of
  a block wherever it sits.
- `transformer`: pre-norm self-attention layers over the blocks, so a block's score can depend on the others (e.g.
  on how much the decoding block just changed). No positional encoding: `relative_position` is a feature, so the
  network is permutation-equivariant and serves any number of blocks. Padded blocks are masked out as keys.

`block_mask=None` means "infer it": a block is real when its schema's valid column (text: `valid_fraction`) is > 0.
The env's padded rows are all-zero and a block of pure left padding in a batched `generate()` has valid_fraction 0, so
the exported graph (which takes only x) masks exactly what training masked. The RL agent (policies/rl_policy.py) uses
`encode` as its SB3 features extractor, so keep `BlockPredictor(in_features, hidden, arch=..., n_outputs=..., ...)`
and `encode(x, mask)` stable. A predictor is built for one feature schema (`schema_id`, default the text schema's),
recorded in its config, so a checkpoint or exported file says which model family's features it reads.

`TorchPolicy` wraps a live network as a `ReusePolicy` in-process (validation generations during training, and the
reference the exported file is compared with); it reads outputs with the action codec (`cache_core.actions`), as
`cache_core.learned.LearnedPolicy` does. `read_predictor` / `load_predictor` read a trained predictor back without
Lightning (for `mode=export` and the RL warm start).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache_core.actions import plan_from_output
from cache_core.cache import RefreshPlan
from cache_core.features import TEXT_SCHEMA, FeatureSchema, StepFeatures, schema_by_id
from cache_core.policy import ReusePolicy, StepContext

ARCHS = ("mlp", "transformer")
# The text schema's values, for existing imports; a predictor reads its own schema.
N_FEATURES = TEXT_SCHEMA.n_features
FEATURE_NAMES = TEXT_SCHEMA.names  # columns of the policy input
VALID_FRACTION = TEXT_SCHEMA.block_index(TEXT_SCHEMA.valid)
IS_DECODING = TEXT_SCHEMA.block_index(TEXT_SCHEMA.forced)
# Additive attention bias of masked keys: finite, so a row whose keys are all masked (a padded query) gets a uniform
# softmax instead of NaN (NaN would leak into the loss through 0 * NaN).
_MASKED = -1e4


class _AttentionLayer(nn.Module):
    """Pre-norm self-attention + MLP over blocks, written with plain ops so the ONNX export has no fused kernels."""

    def __init__(self, hidden: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, hidden // n_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        B, nb, d = h.shape
        qkv = self.qkv(self.norm1(h)).reshape(B, nb, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, nb, head_dim)
        scores = (q @ k.transpose(-1, -2)) * self.scale + key_bias  # (B, heads, nb, nb)
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, nb, d)
        h = h + self.dropout(self.out(o))
        return h + self.dropout(self.mlp(self.norm2(h)))


class BlockPredictor(nn.Module):
    """Per-block scores from the policy input. n_outputs = 1: refresh logit (B, nb); n_layers + 1: depth action
    logits (B, nb, n_layers + 1) read by `cache_core.actions` (0 = reuse, j = refresh the top j layers).
    schema_id: the registered feature schema the input follows; in_features defaults to its width (another width is
    a plain network over unnamed columns: no ignore_features, every block real unless a mask is given)."""

    def __init__(self, in_features: int | None = None, hidden: int = 64, arch: str = "mlp", n_outputs: int = 1,
                 n_layers_attn: int = 1, n_heads: int = 2, dropout: float = 0.0,
                 ignore_features: tuple[str, ...] | list[str] = (), schema_id: str = TEXT_SCHEMA.id):
        super().__init__()
        self.schema: FeatureSchema = schema_by_id(schema_id)
        in_features = self.schema.n_features if in_features is None else int(in_features)
        if arch not in ARCHS:
            raise ValueError(f"unknown predictor arch {arch!r}; choose one of {list(ARCHS)} (policy.arch)")
        if in_features < 1 or hidden < 1 or n_outputs < 1:
            raise ValueError(f"in_features ({in_features}), hidden ({hidden}) and n_outputs ({n_outputs}) must be >= 1")
        if arch == "transformer":
            if n_layers_attn < 1 or n_heads < 1 or hidden % n_heads:
                raise ValueError(f"transformer predictor: n_layers_attn ({n_layers_attn}) and n_heads ({n_heads}) "
                                 f"must be >= 1 and hidden ({hidden}) divisible by n_heads")
        self.in_features, self.hidden, self.arch, self.n_outputs = in_features, hidden, arch, n_outputs
        self.n_layers_attn, self.n_heads, self.dropout = n_layers_attn, n_heads, dropout
        # Columns the network must not read (a fixed input mask, kept in the ONNX graph, and zero weight columns):
        # e.g. compute_spent, which tells which behaviour policy collected an episode more than how stale a block is.
        names = self._names(in_features)
        unknown = [f for f in ignore_features if f not in names]
        if unknown:
            raise ValueError(f"ignore_features {unknown} are not policy-input columns {list(names)}")
        keep = torch.ones(in_features)
        keep[[names.index(f) for f in ignore_features]] = 0.0
        # Not in the state dict: the weights alone define the function (see the zeroed columns below), so a warm
        # start into a BlockPredictor without ignore_features (the RL agent) computes the same function.
        self.register_buffer("input_keep", keep, persistent=False)
        self.embed = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        with torch.no_grad():  # the masked input gives these columns no gradient (and AdamW's decay keeps 0 at 0)
            self.embed[0].weight[:, keep == 0] = 0.0
        self.layers = nn.ModuleList(
            [_AttentionLayer(hidden, n_heads, dropout) for _ in range(n_layers_attn)] if arch == "transformer" else []
        )
        self.norm = nn.LayerNorm(hidden) if arch == "transformer" else nn.Identity()
        self.head = nn.Linear(hidden, n_outputs)

    def _names(self, in_features: int) -> tuple[str, ...]:
        """The input's column names when it is the schema's policy input, else none."""
        return self.schema.names if in_features == self.schema.n_features else ()

    @property
    def ignore_features(self) -> tuple[str, ...]:
        names = self._names(self.in_features)
        return tuple(n for n, k in zip(names, self.input_keep.tolist()) if k == 0.0)

    def config(self) -> dict[str, Any]:
        """Constructor arguments: `BlockPredictor(**net.config())` rebuilds the architecture."""
        return {"in_features": self.in_features, "hidden": self.hidden, "arch": self.arch, "n_outputs": self.n_outputs,
                "n_layers_attn": self.n_layers_attn, "n_heads": self.n_heads, "dropout": self.dropout,
                "ignore_features": list(self.ignore_features), "schema_id": self.schema.id}

    def _check(self, x: torch.Tensor, block_mask: torch.Tensor | None) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.dim() != 3 or x.shape[-1] != self.in_features):
            raise ValueError(f"BlockPredictor expects x of shape (B, n_blocks, {self.in_features}), got "
                             f"{tuple(x.shape)}")
        if block_mask is None:
            if self.in_features != self.schema.n_features:
                return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            return x[..., self.schema.block_index(self.schema.valid)] > 0
        if not torch.jit.is_tracing() and tuple(block_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"block_mask has shape {tuple(block_mask.shape)}, expected {tuple(x.shape[:2])}")
        return block_mask.bool()

    def encode(self, x: torch.Tensor, block_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, nb, F), (B, nb) bool or None -> (B, nb, hidden) per-block embeddings."""
        mask = self._check(x, block_mask)
        h = self.embed(x * self.input_keep)
        if self.layers:
            key_bias = torch.where(mask, 0.0, _MASKED).to(h.dtype)[:, None, None, :]
            for layer in self.layers:
                h = layer(h, key_bias)
        return self.norm(h)

    def forward(self, x: torch.Tensor, block_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.head(self.encode(x, block_mask))
        return out.squeeze(-1) if self.n_outputs == 1 else out


PREDICTOR_ANCHOR = "embed.0.weight"  # BlockPredictor's first layer: its key gives the prefix a network was saved under


def read_predictor(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The `BlockPredictor` tensors of a trained predictor and what is known about them (net config, threshold,
    action mode, budget conditioning, ...), from a supervised Lightning checkpoint (`.ckpt`, network under `net.`,
    facts in its hyperparameters) or an exported predictor's weights (`.safetensors`, facts in its header; see
    `policies.export.write_weights`). Read with safetensors or `torch.load(weights_only=True)`, which restores
    tensors and plain containers only, never code. Used by `mode=export` and the RL agent's warm start."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictor file (a supervised run's <run dir>/checkpoints/best.ckpt, "
                                "or an exported <name>.safetensors)")
    header: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:  # one read: the header and the tensors
                header = dict(f.metadata() or {})
                raw: Any = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
        if header.get("schema_id") is not None:
            try:
                schema_by_id(header["schema_id"])
            except ValueError as err:
                raise ValueError(f"{path}: built for feature schema {header['schema_id']!r}, which this code does "
                                 f"not know ({err}); retrain the predictor (python train.py) and export it "
                                 "again") from None
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  (unpickling errors come in many types)
            raise ValueError(f"{path}: not loadable with torch.load(weights_only=True) ({err}); the file is "
                             "corrupt, truncated or not a checkpoint") from err
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict or a Lightning checkpoint")
    prefixes = [k[: -len(PREDICTOR_ANCHOR)] for k in state if k.endswith(PREDICTOR_ANCHOR)]
    if not prefixes:
        raise ValueError(f"{path}: no BlockPredictor weights in it (no key ending in {PREDICTOR_ANCHOR!r})")
    prefix = min(prefixes, key=len)
    tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and torch.is_tensor(v)}
    if header:
        meta = {"net_config": json.loads(header.get("net_config") or "{}"),
                "threshold": float(header.get("threshold", 0.5)),
                "budget_conditioned": json.loads(header.get("budget_conditioned", "false")),
                "action_mode": header.get("action_mode")}
        return tensors, {**meta, "schema_id": _schema_id(meta, header.get("schema_id"))}
    hp = dict(raw.get("hyper_parameters") or {}) if isinstance(raw, dict) else {}
    extra = (raw.get("blockreuse") if isinstance(raw, dict) else None) or {}
    meta = {**hp, "net_config": dict(extra.get("net_config") or {}), "threshold": float(hp.get("threshold", 0.5)),
            "budget_conditioned": bool(hp.get("budget_conditioned", False)), "action_mode": hp.get("action_mode"),
            "val_metrics": dict(extra.get("val_metrics") or {}), "epoch": raw.get("epoch"),
            "global_step": raw.get("global_step")}
    return tensors, {**meta, "schema_id": _schema_id(meta, hp.get("schema_id"))}


def _schema_id(meta: dict[str, Any], recorded: str | None) -> str:
    """The schema a predictor file was built for: recorded with it, else in its net config; files written before
    schemas were per family are the text schema's."""
    return recorded or meta["net_config"].get("schema_id") or TEXT_SCHEMA.id


def load_predictor(path: str | Path) -> tuple[BlockPredictor, dict[str, Any]]:
    """A trained predictor (`read_predictor`) rebuilt as an eval-mode `BlockPredictor`, with its facts."""
    tensors, meta = read_predictor(path)
    if not meta["net_config"]:
        raise ValueError(f"{path}: no net config recorded with the weights; it was not written by this project's "
                         "mode=supervised / export")
    net = BlockPredictor(**{**meta["net_config"], "schema_id": meta["schema_id"]})
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not fit the recorded network (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    return net.eval(), meta


class TorchPolicy(ReusePolicy):
    """A live `BlockPredictor` (or any net over the policy input) behind the `ReusePolicy` interface."""

    name = "predictor"
    uses_features = True
    knob = "refresh_threshold"  # as LearnedPolicy's (`threshold` is generate()'s parallel-decoding argument)
    knob_sweep = (0.1, 0.3, 0.5, 0.7, 0.9)

    def __init__(self, net: nn.Module, action_mode: str = "binary", output: str | None = None,
                 refresh_threshold: float = 0.5):
        self.net = net
        self.action_mode = action_mode
        self.output = output or ("refresh_logit" if action_mode == "binary" else "action_logits")
        self.refresh_threshold = float(refresh_threshold)

    @torch.no_grad()
    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        was_training = self.net.training
        self.net.eval()
        try:
            param = next(self.net.parameters(), None)
            x = features.policy_input()
            if param is not None:
                x = x.to(device=param.device, dtype=param.dtype)
            out = self.net(x).float().cpu()
        finally:
            self.net.train(was_training)
        return plan_from_output(out, self.output, self.action_mode, ctx.n_layers, self.refresh_threshold)

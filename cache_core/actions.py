"""The one action codec: refresh plan <-> per-block action <-> oracle label <-> network output.

A block's decision is one integer action in an action mode:
- `binary`: 1 = refresh the block in every layer (start layer 0), 0 = reuse it (start layer n_layers);
- `depth`:  j in [0, n_layers] = recompute the top j layers, i.e. start layer n_layers - j (0 = reuse, n_layers =
  refresh the whole block).
The environment's action space, the learned runtime's reading of an exported network, the predictor's training
labels and the oracle's decisions all go through these functions, and nothing else writes the encoding.
"""

from __future__ import annotations

import numpy as np
import torch

from cache_core.cache import RefreshPlan

ACTION_MODES = ("binary", "depth")
# What an exported network outputs: one refresh logit per block (binary), or logits over the mode's actions.
OUTPUTS = ("refresh_logit", "action_logits")


def check_action_mode(mode: str) -> str:
    if mode not in ACTION_MODES:
        raise ValueError(f"unknown action_mode {mode!r}; use one of {list(ACTION_MODES)}")
    return mode


def n_actions(mode: str, n_layers: int) -> int:
    """Actions per block: 2 in binary mode, n_layers + 1 in depth mode."""
    return 2 if check_action_mode(mode) == "binary" else int(n_layers) + 1


def start_from_actions(actions: torch.Tensor, mode: str, n_layers: int) -> torch.Tensor:
    """Per-block actions (..., n_blocks) -> start layers (same shape). Actions must lie in the mode's range
    (`check_actions`); this function does not clamp, so an out-of-range action is never silently reinterpreted."""
    actions = torch.as_tensor(actions).long()
    if check_action_mode(mode) == "binary":
        return torch.where(actions == 1, 0, n_layers).long()
    return (n_layers - actions).long()


def actions_from_start(start: torch.Tensor, mode: str, n_layers: int) -> torch.Tensor:
    """Start layers (..., n_blocks) in [0, n_layers] -> the mode's actions. Binary refreshes a block whenever it
    recomputes any layer (start < n_layers)."""
    start = torch.as_tensor(start).long()
    if check_action_mode(mode) == "binary":
        return (start < n_layers).long()
    return (n_layers - start.clamp(0, n_layers)).long()


def plan_from_actions(actions: torch.Tensor, mode: str, n_layers: int) -> RefreshPlan:
    """(B, n_blocks) actions -> the RefreshPlan they encode."""
    return RefreshPlan(start_from_actions(actions, mode, n_layers))


def block_start_of_plan(plan: RefreshPlan, block_length: int) -> torch.Tensor:
    """(B, n_blocks) shallowest start layer a plan asks of each block; single refreshed positions (token-level plans)
    count for their block. dLLM-Cache's adaptive per-layer, per-token refresh (`RefreshPlan.adaptive`) has no
    block-level counterpart and is dropped: only its interval refreshes remain."""
    start = plan.start_layer.long().cpu().clone()
    if plan.refresh_positions is not None:
        B, n_blocks = start.shape
        touched = plan.refresh_positions.cpu().view(B, n_blocks, block_length).any(-1)
        start = torch.where(touched, 0, start)
    return start


def actions_from_plan(plan: RefreshPlan, block_length: int, mode: str, n_layers: int) -> torch.Tensor:
    """(B, n_blocks) the actions closest to a policy's plan (see `block_start_of_plan`)."""
    return actions_from_start(block_start_of_plan(plan, block_length), mode, n_layers)


def check_actions(actions: np.ndarray | torch.Tensor, mode: str, n_layers: int) -> np.ndarray:
    """The actions as int64, refused with a clear error when any lies outside the mode's action space."""
    a = np.asarray(actions.detach().cpu() if isinstance(actions, torch.Tensor) else actions)
    top = n_actions(mode, n_layers) - 1
    if a.dtype.kind == "b":
        a = a.astype(np.int64)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or (a != np.round(a)).any():
            raise ValueError(f"{mode} actions must be integers in [0, {top}], got {a.tolist()}")
    elif a.dtype.kind not in "iu":
        raise ValueError(f"{mode} actions must be integers in [0, {top}], got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > top):
        bad = sorted({int(v) for v in a.ravel() if not 0 <= v <= top})
        meaning = "0 = reuse, 1 = refresh" if mode == "binary" else "0 = reuse, j = recompute the top j layers"
        raise ValueError(f"{mode} actions must lie in [0, {top}] ({meaning}), got {bad}")
    return a.astype(np.int64)


def oracle_start_layer(drift: torch.Tensor, epsilon: float | torch.Tensor) -> torch.Tensor:
    """The oracle's decision from hindsight drift (..., n_blocks, n_layers): the start layer per block.

    n_layers (reuse) where no layer drifts more than epsilon. To refresh K/V at layer l the block must recompute
    layer l - 1, whose output is layer l's input; K/V at layer 0 change only with the token, which a start at
    layer 0 re-embeds. epsilon: a number, or a tensor over the leading dims (one epsilon per row of labels).
    """
    n_layers = drift.shape[-1]
    eps = torch.as_tensor(epsilon, dtype=drift.dtype, device=drift.device)
    if eps.dim():
        eps = eps.reshape(*eps.shape, *([1] * (drift.dim() - eps.dim())))
    over = drift > eps
    first = (over.float().argmax(-1) - 1).clamp(min=0)
    return torch.where(over.any(-1), first, n_layers).long()


def oracle_actions(drift: torch.Tensor, epsilon: float | torch.Tensor, mode: str) -> torch.Tensor:
    """The oracle's actions (..., n_blocks) at epsilon: the supervised labels of the predictor."""
    return actions_from_start(oracle_start_layer(drift, epsilon), mode, drift.shape[-1])


def refresh_probability(out: torch.Tensor, output: str) -> torch.Tensor:
    """P(refresh) per block from a network output: sigmoid of the refresh logit, or 1 - P(action 0 = reuse)."""
    if output == "refresh_logit":
        return torch.sigmoid(out)
    return 1.0 - out.softmax(-1)[..., 0]


def actions_from_output(out: torch.Tensor, output: str, threshold: float) -> torch.Tensor:
    """A network output -> actions: a refresh logit refreshes when sigmoid >= threshold; action logits by argmax."""
    if output not in OUTPUTS:
        raise ValueError(f"unknown network output {output!r}; use one of {list(OUTPUTS)}")
    if output == "refresh_logit":
        return (torch.sigmoid(out) >= threshold).long()
    return out.argmax(-1).long()


def plan_from_output(out: torch.Tensor, output: str, mode: str, n_layers: int, threshold: float) -> RefreshPlan:
    """The plan a network output asks for: how the learned runtime and a live network in training both decide."""
    return plan_from_actions(actions_from_output(out, output, threshold), mode, n_layers)

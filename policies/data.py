"""Supervised data: rollout shards (envs.shards) -> (policy input, masks, oracle drift) tensors, split by episode.

One row of the dataset = one environment step: x (max_blocks, F) = [blocks | global broadcast] exactly as
`StepFeatures.policy_input()` builds it at inference, the real-block mask, the loss mask and the oracle drift
(max_blocks, n_layers). Labels are the oracle's actions at a chosen epsilon (`cache_core.actions.oracle_actions`, the
function OraclePolicy and the environment use), made in the training step rather than here, so that a
budget-conditioned run can label each row at another epsilon.

The loss mask keeps the blocks whose decision matters: real blocks that are not forced (the schema's `forced` column,
text: the decoding block, which the cache always recomputes) and that were computed before (never-computed blocks
carry `drift_cap` and are always computed too). Column indices come from the shards' feature schema (their manifest's
`schema_id`), so shards of any registered model family load here.

Train/validation split by *episode* (`group_by: episode`) or, stricter, by prompt (`group_by: prompt`: every episode
of a prompt lands on the same side), never by step: steps of one episode are strongly correlated.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from cache_core.actions import oracle_actions
from cache_core.features import TEXT_SCHEMA, FeatureSchema, policy_input, schema_by_id
from policies.config import GROUP_BY

log = logging.getLogger(__name__)

# The text schema's indices, for existing imports; the code below reads the data's schema.
IS_DECODING = TEXT_SCHEMA.block_index(TEXT_SCHEMA.forced)
VALID_FRACTION = TEXT_SCHEMA.block_index(TEXT_SCHEMA.valid)
BUDGET_COLUMN = TEXT_SCHEMA.input_index(TEXT_SCHEMA.budget)  # in the policy input
COLLECT_HINT = "collect them first with `python train.py mode=collect` (or point data.shards_dir at a shard directory)"


def load_rows(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Shards -> {x, block_mask, loss_mask, drift, episode, prompt} and the shard manifest."""
    from envs.shards import load_shards, read_manifest

    directory = Path(directory)
    if not (directory / "manifest.json").is_file():
        raise FileNotFoundError(f"no rollout shards at {directory} (no manifest.json): {COLLECT_HINT}")
    manifest = read_manifest(directory)
    schema = schema_by_id(manifest["schema_id"])  # read_manifest refused an unknown one
    keys = ["blocks", "block_mask", "global", "oracle_drift", "episode", "prompt_index"]
    data = load_shards(directory, keys=keys)
    if data["blocks"].shape[0] == 0:
        raise ValueError(f"{directory} holds no rows: {COLLECT_HINT}")
    drift_cap = float((manifest.get("env") or {}).get("drift_cap", 1e3))
    drift = data["oracle_drift"]
    block_mask = data["block_mask"].bool()
    computed = drift.amax(-1) < drift_cap
    loss_mask = block_mask & (data["blocks"][..., schema.block_index(schema.forced)] < 0.5) & computed
    rows = {"x": policy_input(data["blocks"], data["global"]), "block_mask": block_mask, "loss_mask": loss_mask,
            "drift": drift, "episode": data["episode"], "prompt": data["prompt_index"]}
    return rows, manifest


def load_many(directories: list[str | Path]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rows of several shard directories (e.g. a first collection and a DAgger round under the learned policy),
    concatenated; episode ids are renumbered so that they stay distinct, prompt indices are kept (the same prompt
    of the same split in two collections is one group for `group_by: prompt`)."""
    parts, manifests = [], []
    for directory in directories:
        rows, manifest = load_rows(directory)
        if manifests and manifest["schema_id"] != manifests[0]["schema_id"]:
            raise ValueError(f"{directory}: feature schema {manifest['schema_id']!r} differs from {directories[0]}'s "
                             f"{manifests[0]['schema_id']!r}; train on shards of one model family and schema")
        if manifests and (manifest["n_layers"], manifest["max_blocks"]) != (manifests[0]["n_layers"],
                                                                           manifests[0]["max_blocks"]):
            raise ValueError(f"{directory}: n_layers/max_blocks {manifest['n_layers']}/{manifest['max_blocks']} differ "
                             f"from {directories[0]}'s {manifests[0]['n_layers']}/{manifests[0]['max_blocks']}; "
                             "train on shards of one model and one env setting")
        if parts:
            rows["episode"] = rows["episode"] + int(parts[-1]["episode"].max()) + 1
        parts.append(rows)
        manifests.append(manifest)
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return merged, {**manifests[0], "sources": [str(d) for d in directories]}


def split_groups(groups: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (train, val) with every group (episode or prompt) on one side; at least one group each side when
    there are two or more groups."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must lie in [0, 1)")
    unique = torch.unique(groups)
    g = torch.Generator().manual_seed(int(seed))
    order = unique[torch.randperm(len(unique), generator=g)]
    n_val = int(round(val_fraction * len(unique)))
    if val_fraction > 0 and len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1)
    val_groups = order[:n_val]
    is_val = torch.isin(groups, val_groups)
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


def budget_of_epsilon(drift: torch.Tensor, x: torch.Tensor, loss_mask: torch.Tensor, block_mask: torch.Tensor,
                      epsilons: list[float], schema: FeatureSchema = TEXT_SCHEMA) -> list[float]:
    """Approximate FLOP fraction the oracle at each epsilon spends on these rows: recomputed positions / valid
    positions, counting the decoding block (always computed) and weighting blocks by their valid fraction. Ignores
    the LM head and attention's dependence on the key count; it is the budget value a budget-conditioned predictor
    is trained with (see policies.supervised). schema: the feature schema of x (its valid column)."""
    weight = x[..., schema.block_index(schema.valid)] * block_mask
    forced = (block_mask & ~loss_mask).float() * weight
    total = weight.sum()
    out = []
    for eps in epsilons:
        refreshed = oracle_actions(drift, eps, "binary").float() * loss_mask * weight
        out.append(float(((refreshed.sum() + forced.sum()) / total.clamp(min=1e-9)).clamp(0.0, 1.0)))
    return out


def write_synthetic_shards(directory: str | Path, episodes: int = 12, steps: int = 8, max_blocks: int = 6,
                           n_layers: int = 2, seed: int = 0, drift_cap: float = 1e3, shard_size: int = 40,
                           schema: FeatureSchema = TEXT_SCHEMA) -> Path:
    """Shards in the real format (envs.shards.ShardWriter) of `schema` with a learnable rule, for tests and smoke runs
    in seconds: drift grows with two signal columns (text: `changed_since_refresh` and `steps_since_refresh`; another
    schema: its first two block columns without a role) and with depth; the forced (decoding) block is one of the
    last blocks, padding rows lead, and every block is never-computed (drift_cap) at step 0. Columns are uniform in
    their declared ranges."""
    import numpy as np

    from envs.shards import ShardWriter

    rng = np.random.default_rng(seed)
    forced, valid = schema.block_index(schema.forced), schema.block_index(schema.valid)
    if schema.family == "text":  # the text rule, as it always was
        signals = ["changed_since_refresh", "steps_since_refresh"]
    else:
        roles = {schema.forced, schema.valid, schema.attention, schema.relative}
        signals = [n for n in schema.block_names if n not in roles][:2]
        if len(signals) < 2:
            raise ValueError(f"write_synthetic_shards needs two block columns without a role in schema {schema.id!r}")
    changed, since = (schema.block_index(n) for n in signals)
    n_block, n_global = schema.n_block, schema.n_global
    block_low = np.array([c.low for c in schema.block_columns], np.float32)
    block_span = np.array([c.high - c.low for c in schema.block_columns], np.float32)
    global_low = np.array([c.low for c in schema.global_columns], np.float32)
    global_span = np.array([c.high - c.low for c in schema.global_columns], np.float32)
    manifest = {"schema_id": schema.id, "n_layers": n_layers, "max_blocks": max_blocks, "n_block_features": n_block,
                "n_global_features": n_global, "block_feature_names": list(schema.block_names),
                "global_feature_names": list(schema.global_names), "action_mode": "binary", "split": "train",
                "behaviour": {"synthetic": True}, "env": {"drift_cap": drift_cap}, "seed": seed}
    writer = ShardWriter(directory, shard_size, manifest, overwrite=True)
    for episode in range(episodes):
        real = int(rng.integers(max(2, max_blocks - 3), max_blocks + 1))
        offset = max_blocks - real
        for step in range(steps):
            blocks = np.zeros((max_blocks, n_block), np.float32)
            blocks[offset:] = block_low + block_span * rng.random((real, n_block), dtype=np.float32)
            if schema.relative is not None:
                blocks[offset:, schema.block_index(schema.relative)] = (np.arange(real) - (real - 1)) / real
            blocks[offset:, forced] = 0.0
            decoding = max_blocks - 1 - int(rng.integers(0, min(2, real)))
            blocks[decoding, forced] = 1.0
            blocks[offset:, valid] = 1.0
            depth = (np.arange(n_layers) + 1) / n_layers
            drift = np.zeros((max_blocks, n_layers), np.float32)
            drift[offset:] = (0.12 * blocks[offset:, changed, None] + 0.04 * blocks[offset:, since, None]) * depth
            if step == 0:
                drift[offset:] = drift_cap
            glob = global_low + global_span * rng.random(n_global, dtype=np.float32)
            glob[schema.global_index(schema.budget)] = 1.0
            mask = np.zeros(max_blocks, bool)
            mask[offset:] = True
            writer.add({"blocks": blocks, "block_mask": mask, "global": glob,
                        "actions": (drift > 0.05).any(-1).astype(np.int64) * mask, "oracle_drift": drift,
                        "reward": 0.0, "kl": 0.0, "flip": 0.0, "flop_fraction": 1.0, "episode": episode,
                        "step": step, "done": step == steps - 1, "prompt_index": episode % max(1, episodes // 2),
                        "behaviour": 0, "random_action": False})
        writer.end_episode({"episode": episode, "steps": steps})
    writer.close()
    return Path(directory)


class ShardDataModule(L.LightningDataModule):
    """The rollout shards of `shards_dir` (one directory or a list), split into train/validation by episode (or
    prompt)."""

    def __init__(self, shards_dir: str | Path | list[str | Path], batch_size: int = 256, val_fraction: float = 0.2,
                 group_by: str = "episode", seed: int = 0, num_workers: int = 0, max_rows: int | None = None):
        super().__init__()
        if group_by not in GROUP_BY:
            raise ValueError(f"data.group_by={group_by!r}; choose one of {list(GROUP_BY)}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        dirs = [shards_dir] if isinstance(shards_dir, (str, Path)) else list(shards_dir)
        if not dirs:
            raise ValueError(f"data.shards_dir is empty: {COLLECT_HINT}")
        self.shards_dirs = [Path(str(d)) for d in dirs]
        self.shards_dir = self.shards_dirs[0] if len(self.shards_dirs) == 1 else self.shards_dirs
        self.batch_size, self.val_fraction, self.group_by = int(batch_size), float(val_fraction), group_by
        self.seed, self.num_workers, self.max_rows = int(seed), int(num_workers), max_rows
        self.rows: dict[str, torch.Tensor] | None = None
        self.manifest: dict[str, Any] = {}
        self.train_index = self.val_index = torch.zeros(0, dtype=torch.long)

    def prepare(self) -> ShardDataModule:
        """Load and split once (idempotent); called by `setup` and, before the Trainer exists, by `run`."""
        if self.rows is not None:
            return self
        rows, self.manifest = load_many(self.shards_dirs)
        if self.max_rows:  # debugging: the first rows only
            rows = {k: v[: int(self.max_rows)] for k, v in rows.items()}
        self.rows = rows
        self.train_index, self.val_index = split_groups(rows[self.group_by], self.val_fraction, self.seed)
        log.info("shards %s: %d rows (%d train, %d val, split by %s), %d labelled blocks", self.shards_dir,
                 len(rows["x"]), len(self.train_index), len(self.val_index), self.group_by,
                 int(rows["loss_mask"].sum()))
        return self

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    @property
    def schema(self) -> FeatureSchema:
        """The feature schema of the shards (their manifest's schema_id)."""
        return schema_by_id(self.manifest["schema_id"])

    @property
    def n_layers(self) -> int:
        return int(self.manifest["n_layers"])

    @property
    def action_mode(self) -> str:
        return str(self.manifest.get("action_mode", "binary"))

    def subset(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: self.rows[k][index] for k in ("x", "block_mask", "loss_mask", "drift")}

    def _dataset(self, index: torch.Tensor) -> TensorDataset:
        s = self.subset(index)
        return TensorDataset(s["x"], s["block_mask"], s["loss_mask"], s["drift"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(self.train_index), batch_size=self.batch_size, shuffle=True,
                          num_workers=self.num_workers, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(self.val_index), batch_size=4 * self.batch_size, shuffle=False,
                          num_workers=self.num_workers)

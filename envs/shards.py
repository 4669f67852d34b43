"""Rollout dataset shards: the on-disk format written by `envs.collect` and read by supervised / offline training.

Format version 1 (`SHARD_FORMAT_VERSION`). A shard directory holds

    manifest.json               what the data is (below); written when the collection starts and after every shard
                                (atomically), `complete: true` at the end
    shard-00000.safetensors     rows 0 .. S0-1
    shard-00001.safetensors     ...

One row = one environment step = (observation the action was chosen on, action, oracle labels of that state,
reward and divergence of the step). Tensors of a shard with S rows (B = max_blocks, L = n_layers):

    blocks         (S, B, F_b) float32   observation["blocks"]: `cache_core.features` block columns, padded rows 0
    block_mask     (S, B)      bool      observation["block_mask"]: real (True) vs padded (False) block rows
    global         (S, F_g)    float32   observation["global"]: `cache_core.features` global columns
    actions        (S, B)      int64     the action taken, in the manifest's action_mode (binary: 1 = refresh;
                                         depth: 0 = reuse, j = refresh the top j layers); 0 on padded rows
    oracle_drift   (S, B, L)   float32   relative K/V drift of the cache from a full recompute in that state
                                         (never computed = drift_cap, padded rows 0): the supervised labels
    reward         (S,)        float32   the environment's reward of the step (end-of-episode terms included)
    kl             (S,)        float32   KL(full || cached) of the decoding block's predictions
    flip           (S,)        float32   1 if a committed token differs from the full recompute's prediction
    flop_fraction  (S,)        float32   step FLOPs / FLOPs of a full recompute of the step
    episode        (S,)        int64     episode index (global across shards)
    step           (S,)        int64     denoising step within the episode
    done           (S,)        bool      last step of its episode
    prompt_index   (S,)        int64     index of the prompt in the collection split
    behaviour      (S,)        int64     index into manifest["behaviour"]["components"] of the episode's policy
    random_action  (S,)        bool      the step's action was the behaviour's random action, not the policy's

Each shard's safetensors metadata repeats `format_version` and `schema_id`. manifest.json keys: format_version,
schema_id (the collecting env's `FeatureSchema.id`; text: `cache_core.features.SCHEMA_ID`), n_layers, max_blocks,
n_block_features, n_global_features, block_feature_names, global_feature_names, action_mode, split, episodes, rows,
shards ([{file, rows}]), behaviour (the behaviour policy config and its component list), env (the environment's
settings), episode_summary (per episode: prompt, behaviour, knob, steps, flop fraction, exact match, agreement),
complete, created.

`load_shards(directory)` checks the format version and the feature schema and refuses data of another version or of
a schema that is not registered (`cache_core.features.schema_by_id`), or shards whose schema differs from the
manifest's (features are not comparable across schemas: re-collect); widths come from the manifest's schema.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cache_core.features import SCHEMA_ID, SCHEMAS, FeatureSchema, schema_by_id
from cache_core.validate import read_json_object

log = logging.getLogger(__name__)

SHARD_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
# key -> (dtype, trailing shape names); a row holds one entry of each.
COLUMNS: dict[str, tuple[torch.dtype, tuple[str, ...]]] = {
    "blocks": (torch.float32, ("max_blocks", "n_block_features")),
    "block_mask": (torch.bool, ("max_blocks",)),
    "global": (torch.float32, ("n_global_features",)),
    "actions": (torch.int64, ("max_blocks",)),
    "oracle_drift": (torch.float32, ("max_blocks", "n_layers")),
    "reward": (torch.float32, ()),
    "kl": (torch.float32, ()),
    "flip": (torch.float32, ()),
    "flop_fraction": (torch.float32, ()),
    "episode": (torch.int64, ()),
    "step": (torch.int64, ()),
    "done": (torch.bool, ()),
    "prompt_index": (torch.int64, ()),
    "behaviour": (torch.int64, ()),
    "random_action": (torch.bool, ()),
}
RECOLLECT = "re-collect the shards with `python train.py mode=collect`"


_SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")


class ShardFormatError(ValueError):
    """A shard directory that cannot be read as this version's format and feature schema."""


class ShardWriter:
    """Buffers rows and writes whole episodes as shards, keeping manifest.json up to date (atomically) after each.
    The manifest's `schema_id` (default: the text schema's) is recorded in it and in every shard.

    A shard is written once `shard_size` rows or `flush_episodes` episodes are buffered, always at an episode's end,
    so the manifest's episode count is what is on disk and a killed collection loses at most the episodes since the
    last shard. `resume=True` continues a collection killed in `directory` (its manifest must be this project's, of
    this format and schema, and not complete); `overwrite=True` replaces a collection of this project there. A
    directory that holds anything else is never written into.
    """

    def __init__(self, directory: str | Path, shard_size: int, manifest: dict[str, Any], overwrite: bool = False,
                 flush_episodes: int | None = None, resume: bool = False):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if flush_episodes is not None and flush_episodes < 1:
            raise ValueError(f"flush_episodes must be >= 1 or None, got {flush_episodes}")
        self.directory = Path(directory)
        self.shard_size, self.flush_episodes = int(shard_size), flush_episodes
        manifest = {"schema_id": SCHEMA_ID, **manifest}
        self.schema_id = _schema(manifest["schema_id"], self.directory).id
        self._buffer: dict[str, list[Any]] = {k: [] for k in COLUMNS}
        self._buffered_episodes: list[dict[str, Any]] = []
        existing = self.directory / MANIFEST_FILE
        if resume and not existing.exists():
            raise FileNotFoundError(f"{self.directory}: no collection to resume (no {MANIFEST_FILE}); give the killed "
                                    "run's collect.output_dir, or drop collect.resume to start a new collection")
        if resume:
            self.manifest = read_manifest(self.directory)  # refuses another format or schema
            if self.manifest.get("complete"):
                raise FileExistsError(f"{self.directory} holds a complete collection: nothing to resume (choose "
                                      "another output directory, or collect.overwrite=true to replace it)")
            # The same collection or none: a resume under other settings would mix two data sets silently.
            changed = sorted(k for k in RESUME_KEYS if _jsonable_tree(manifest.get(k)) !=
                             _jsonable_tree(self.manifest.get(k)))
            if changed:
                raise ValueError(f"{self.directory}: resuming with other settings than the killed collection had "
                                 f"({', '.join(changed)} differ); resume with its settings, or collect anew")
            self._drop_orphans()
            log.info("resuming the collection in %s after %d episodes (%d rows)", self.directory,
                     self.manifest["episodes"], self.manifest["rows"])
            return
        if existing.exists():
            if not overwrite:
                raise FileExistsError(f"{self.directory} already holds shards: choose another output directory, "
                                      "set collect.resume=true to continue a killed collection, or "
                                      "collect.overwrite=true to replace it")
            old = own_manifest(self.directory)  # only a collection of this project is ever deleted
            for entry in old["shards"]:
                (self.directory / entry["file"]).unlink(missing_ok=True)
            existing.unlink()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manifest = {
            "format_version": SHARD_FORMAT_VERSION, **manifest,
            "episodes": 0, "rows": 0, "shards": [], "episode_summary": [], "complete": False,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self._write_manifest()

    @property
    def episodes(self) -> int:
        """Episodes on disk (the next episode to collect)."""
        return int(self.manifest["episodes"])

    def add(self, row: dict[str, Any]) -> None:
        missing = set(COLUMNS) - set(row)
        if missing:
            raise KeyError(f"row lacks {sorted(missing)}")
        for key in COLUMNS:
            self._buffer[key].append(row[key])

    @property
    def rows(self) -> int:
        """Rows added so far (written and buffered)."""
        return self.manifest["rows"] + len(self._buffer["reward"])

    def end_episode(self, summary: dict[str, Any]) -> None:
        self._buffered_episodes.append(summary)
        full = len(self._buffer["reward"]) >= self.shard_size
        if full or (self.flush_episodes is not None and len(self._buffered_episodes) >= self.flush_episodes):
            self.flush()

    def flush(self) -> None:
        n = len(self._buffer["reward"])
        if n == 0:
            return
        name = SHARD_PATTERN.format(len(self.manifest["shards"]))
        write_shard(self.directory / name, self._buffer, kept=self.manifest["episodes"], schema_id=self.schema_id)
        self.add_shard(name, n, self._buffered_episodes)
        self._buffer = {k: [] for k in COLUMNS}
        self._buffered_episodes = []

    def add_shard(self, name: str, rows: int, summaries: list[dict[str, Any]]) -> None:
        """Name a shard that is on disk (written by `flush`, or by a worker: `envs.cluster`) in the manifest, with
        the summaries of its episodes, which follow the manifest's episodes so far."""
        # The shard is on disk before the manifest names it: a kill in between leaves an orphan shard, which a resume
        # drops (its episodes are collected again) and a reader reports.
        if not (self.directory / name).is_file():
            raise FileNotFoundError(f"{self.directory / name}: a worker wrote this shard, but it is not here; with "
                                    "Ray workers on several machines collect.output_dir must be a directory every "
                                    "machine shares (NFS, a mounted bucket)")
        self.manifest["shards"].append({"file": name, "rows": int(rows)})
        self.manifest["rows"] += int(rows)
        self.manifest["episodes"] += len(summaries)
        self.manifest["episode_summary"] += list(summaries)
        self._write_manifest()

    def close(self) -> dict[str, Any]:
        self.flush()
        self.manifest["complete"] = True
        self._write_manifest()
        return self.manifest

    def _drop_orphans(self) -> None:
        listed = {e["file"] for e in self.manifest["shards"]}
        for path in sorted(self.directory.glob("shard-*.tmp")):  # a shard being written when the job was killed
            path.unlink()
        for path in sorted(self.directory.glob("shard-*.safetensors")):
            if path.name not in listed:
                log.warning("%s: not in the manifest (written when the collection was killed); dropped, its episodes "
                            "are collected again", path)
                path.unlink()

    def _write_manifest(self) -> None:
        tmp = self.directory / (MANIFEST_FILE + ".tmp")
        try:
            tmp.write_text(json.dumps(self.manifest, indent=1, default=_jsonable))
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise _write_error(err, self.directory / MANIFEST_FILE, self.manifest["episodes"]) from err
        tmp.replace(self.directory / MANIFEST_FILE)


def write_shard(path: Path, rows: dict[str, list[Any]], kept: int | None = None, schema_id: str = SCHEMA_ID) -> int:
    """Write buffered rows ({column: one value per row}) as the shard file `path`, recording `schema_id` (the
    collection's feature schema); returns its row count.

    Atomic (a temporary file renamed over `path`), so a kill or a full disk mid-write never leaves a truncated shard
    under a shard's name, and a retried task that writes the same episodes again replaces its earlier file: one
    shard per episode range, never two. kept: the episodes already on disk, for the error message."""
    n = len(rows["reward"])
    tensors = {key: torch.as_tensor(np.stack([np.asarray(v) for v in rows[key]])).to(dtype).contiguous()
               for key, (dtype, _) in COLUMNS.items()}
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata={"format_version": str(SHARD_FORMAT_VERSION), "schema_id": schema_id,
                                          "rows": str(n)})
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(err, path, kept) from err
    return n


def _write_error(err: OSError, path: Path, kept: int | None) -> OSError:
    """The OSError of a failed shard or manifest write, saying what is kept and how to continue."""
    what = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    episodes = "the episodes" if kept is None else f"the {kept} episodes"
    return OSError(err.errno, f"{path}: {what} while writing it; {episodes} already in the manifest and their "
                              "shards are kept: free space (or give collect.output_dir on a larger disk, moving the "
                              "directory there) and continue with collect.resume=true")


RESUME_KEYS = ("schema_id", "seed", "split", "behaviour", "env", "action_mode", "n_layers", "max_blocks")


def _jsonable_tree(x: Any) -> Any:
    """A manifest value as it reads back from JSON (for comparing a new collection's settings with a stored one)."""
    return json.loads(json.dumps(x, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.tolist()
    return str(x)


def own_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a shard directory of this project (any format version or schema), for deleting its files:
    refuses a directory whose manifest.json is not one, so `collect.overwrite` never deletes anything else."""
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = read_json_object(path, "shard manifest", ShardFormatError)
        shards = manifest["shards"]
        names = [entry["file"] for entry in shards]
        ours = isinstance(manifest.get("format_version"), int) and isinstance(manifest.get("schema_id"), str)
    except (ShardFormatError, KeyError, TypeError) as err:
        raise ShardFormatError(f"{path} is not a blockreuse shard manifest ({err}); collect.overwrite=true only "
                               "replaces a collection of this project: choose another output directory") from None
    if not ours or not all(isinstance(n, str) and _SHARD_NAME.fullmatch(n) for n in names):
        raise ShardFormatError(f"{path} is not a blockreuse shard manifest (or names files that are not shards); "
                               "collect.overwrite=true only replaces a collection of this project: choose another "
                               "output directory")
    return manifest


def _schema(schema_id: Any, directory: Path) -> FeatureSchema:
    """The registered schema of a shard directory's `schema_id`; a ShardFormatError naming it and the known ones."""
    if schema_id in SCHEMAS:
        return schema_by_id(schema_id)
    raise ShardFormatError(
        f"{directory}: the shards were collected under feature schema {schema_id!r}, which this code does not know "
        f"(known schemas: {sorted(SCHEMAS)}; a model family's schema is registered when its package is imported, "
        f"e.g. `import cache_core.image`); features of different schemas are not comparable: {RECOLLECT}"
    )


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a shard directory, with its format version and feature schema checked."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ShardFormatError(f"{directory}: no {MANIFEST_FILE}, so this is not a shard directory; {RECOLLECT}")
    manifest = read_json_object(path, "shard manifest", ShardFormatError, f"the file is corrupt; {RECOLLECT}")
    version = manifest.get("format_version")
    if version != SHARD_FORMAT_VERSION:
        raise ShardFormatError(
            f"{directory}: shard format version {version!r}, but this code reads version {SHARD_FORMAT_VERSION}; "
            f"{RECOLLECT}"
        )
    _schema(manifest.get("schema_id"), directory)
    for key in ("n_layers", "max_blocks", "shards", "action_mode"):
        if key not in manifest:
            raise ShardFormatError(f"{path} lacks {key!r} (corrupt or hand-edited); {RECOLLECT}")
    for i, entry in enumerate(manifest["shards"]):
        # A shard is a file of this directory, named as the writer names it: never a path elsewhere (`../x`).
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not _SHARD_NAME.fullmatch(
                entry["file"]) or not isinstance(entry.get("rows"), int) or entry["rows"] < 0:
            raise ShardFormatError(f"{path}: shards[{i}]={entry!r} is not a shard entry ({{file: shard-NNNNN."
                                   f"safetensors, rows: n}}); the manifest is corrupt or hand-edited: {RECOLLECT}")
    if not manifest.get("complete", False):
        log.warning("%s: the collection did not finish (complete=false); loading the %d rows written",
                    directory, manifest.get("rows", 0))
    return manifest


def load_shards(directory: str | Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """All rows of a shard directory, concatenated: {key: tensor} (see the module docstring for keys and shapes).

    Raises ShardFormatError on another format version, an unknown feature schema or shards of another schema than
    the manifest's, a corrupt manifest, a missing or corrupt shard, or tensors whose shapes do not match the manifest.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    schema = schema_by_id(manifest["schema_id"])
    listed = {e["file"] for e in manifest["shards"]}
    for orphan in sorted(p.name for p in directory.glob("shard-*.safetensors") if p.name not in listed):
        log.warning("%s/%s is not in the manifest (a collection killed while writing it): left out; resume the "
                    "collection (collect.resume=true) to collect its episodes again", directory, orphan)
    keys = list(COLUMNS) if keys is None else list(keys)
    unknown = set(keys) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown shard keys {sorted(unknown)}; known: {list(COLUMNS)}")
    dims = {"max_blocks": manifest["max_blocks"], "n_layers": manifest["n_layers"],
            "n_block_features": schema.n_block, "n_global_features": schema.n_global}
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        if not path.is_file():
            raise ShardFormatError(f"{path} is listed in the manifest but missing; {RECOLLECT}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format_version") != str(SHARD_FORMAT_VERSION) or meta.get("schema_id") != schema.id:
                    raise ShardFormatError(
                        f"{path}: shard format version {meta.get('format_version')!r} / schema "
                        f"{meta.get('schema_id')!r} differ from this code's version {SHARD_FORMAT_VERSION} / the "
                        f"manifest's schema {schema.id!r}; {RECOLLECT}"
                    )
                for key in keys:
                    if key not in f.keys():
                        raise ShardFormatError(f"{path} lacks tensor {key!r}; {RECOLLECT}")
                    t = f.get_tensor(key)
                    dtype, names = COLUMNS[key]
                    expected = (entry["rows"], *(dims[n] for n in names))
                    if tuple(t.shape) != expected or t.dtype != dtype:
                        raise ShardFormatError(f"{path}: {key} has shape {tuple(t.shape)} {t.dtype}, the manifest "
                                               f"implies {expected} {dtype}; {RECOLLECT}")
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise ShardFormatError(f"{path}: {key} holds {int((~torch.isfinite(t)).sum())} NaN/inf "
                                               f"values; {RECOLLECT}")
                    parts[key].append(t)
        except (SafetensorError, OSError) as err:
            raise ShardFormatError(f"{path} is corrupt or truncated ({err}); {RECOLLECT}") from err
    out = {}
    for key in keys:
        if parts[key]:
            out[key] = torch.cat(parts[key])
        else:
            dtype, names = COLUMNS[key]
            out[key] = torch.zeros((0, *(dims[n] for n in names)), dtype=dtype)
    return out

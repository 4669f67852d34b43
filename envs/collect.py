"""Rollout collection (`python train.py mode=collect`): environment episodes under a behaviour policy, written as
dataset shards (format: `envs.shards`).

The behaviour policy is a mixture. Each episode draws one component from `behaviour.policies` (by weight) and one of
its knob values, e.g. dual_cache with refresh_interval 4, then plays it through `BlockReuseEnv.policy_action` (the
heuristic's plan projected on the env's action space). With probability `behaviour.random_prob` a step (scope
`step`) or a whole episode (scope `episode`) takes a random action instead: every block refreshed with a probability
drawn per episode, so random actions span every compute level; in depth mode a refreshed block gets a uniform
depth. The episode's heuristic still sees every step, so stateful heuristics stay in sync.

Episodes cycle through the first `n_prompts` prompts of `split` (episode e plays prompt e mod n_prompts), so the
split is covered evenly. Rows are (observation the action was taken on, action, oracle labels of that state, reward).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cache_core.features import BLOCK_FEATURE_NAMES, GLOBAL_FEATURE_NAMES, N_BLOCK_FEATURES, N_GLOBAL_FEATURES
from cache_core.policy import ReusePolicy, make_policy
from envs.block_reuse_env import BlockReuseEnv
from envs.shards import SHARD_FORMAT_VERSION, ShardWriter

log = logging.getLogger(__name__)
RANDOM_SCOPES = ("step", "episode")


class BehaviourPolicy:
    """The collection's behaviour: a per-episode heuristic (with a knob value) mixed with random actions."""

    def __init__(self, spec: dict[str, Any], env: BlockReuseEnv, seed: int):
        self.random_prob = float(spec.get("random_prob", 0.0))
        self.random_scope = str(spec.get("random_scope", "step"))
        if not 0.0 <= self.random_prob <= 1.0:
            raise ValueError(f"behaviour.random_prob={self.random_prob} must lie in [0, 1]")
        if self.random_scope not in RANDOM_SCOPES:
            raise ValueError(f"behaviour.random_scope={self.random_scope!r}; use one of {list(RANDOM_SCOPES)}")
        self.env = env
        self.rng = np.random.default_rng(seed)
        # Components: (policy name, knob name or None, knob value, fixed knobs), each with a weight.
        self.components: list[dict[str, Any]] = []
        weights = []
        for entry in spec.get("policies") or []:
            entry = dict(entry)
            name = entry.pop("name")
            weight = float(entry.pop("weight", 1.0))
            fixed = dict(entry.pop("knobs", None) or {})
            values = entry.pop("values", None)
            if entry:
                raise ValueError(f"behaviour policy {name!r}: unknown keys {sorted(entry)} (use name, values, knobs, "
                                 "weight)")
            if name == "oracle" and env.action_mode == "depth":
                fixed.setdefault("depth", True)
            probe = make_policy(name, **fixed)  # fails early on an unknown name or bad knobs
            knob = probe.knob
            if values is not None and knob is None:
                raise ValueError(f"behaviour policy {name!r} has no knob, so it takes no values")
            for value in [None] if values is None else list(values):
                comp = {"name": name, "knob": knob if values is not None else None, "value": value, "knobs": fixed}
                make_policy(name, **self._knobs(comp))
                self.components.append(comp)
                weights.append(weight / (1 if values is None else len(values)))
        if not self.components and self.random_prob < 1.0:
            raise ValueError("behaviour.policies is empty: list at least one policy or set behaviour.random_prob=1")
        if any(w < 0 for w in weights) or (weights and sum(weights) <= 0):
            raise ValueError("behaviour policy weights must be >= 0 with a positive sum")
        self.weights = np.array(weights) / sum(weights) if weights else np.zeros(0)
        self.policy: ReusePolicy | None = None
        self.component = -1
        self._density = 0.5
        self._random_episode = False

    @staticmethod
    def _knobs(comp: dict[str, Any]) -> dict[str, Any]:
        knobs = dict(comp["knobs"])
        if comp["knob"] is not None:
            knobs[comp["knob"]] = comp["value"]
        return knobs

    def describe(self) -> dict[str, Any]:
        return {"random_prob": self.random_prob, "random_scope": self.random_scope,
                "components": [{**c, "weight": float(w)} for c, w in zip(self.components, self.weights)]}

    def start_episode(self) -> None:
        if self.components:
            self.component = int(self.rng.choice(len(self.components), p=self.weights))
            comp = self.components[self.component]
            self.policy = make_policy(comp["name"], **self._knobs(comp))
            self.policy.reset(1)
        self._density = float(self.rng.random())
        self._random_episode = self.random_scope == "episode" and self.rng.random() < self.random_prob

    def act(self) -> tuple[np.ndarray, bool]:
        """(action, whether it is the random action) for the env's current state."""
        planned = self.env.policy_action(self.policy) if self.policy is not None else None
        use_random = planned is None or self._random_episode or (
            self.random_scope == "step" and self.random_prob > 0 and self.rng.random() < self.random_prob)
        return (self._random_action() if use_random else planned), bool(use_random)

    def _random_action(self) -> np.ndarray:
        env = self.env
        action = np.zeros(env.max_blocks, dtype=env.action_space.dtype)
        real = env.session.n_blocks
        refresh = self.rng.random(real) < self._density
        if env.action_mode == "binary":
            values = refresh.astype(np.int64)
        else:
            values = np.where(refresh, self.rng.integers(1, env.n_layers + 1, size=real), 0)
        action[env.max_blocks - real:] = values
        return action

    def label(self) -> str:
        if self.component < 0:
            return "random"
        comp = self.components[self.component]
        return comp["name"] if comp["knob"] is None else f"{comp['name']}({comp['knob']}={comp['value']})"


def collect(env: BlockReuseEnv, settings: dict[str, Any] | DictConfig) -> dict[str, Any]:
    """Run `episodes` episodes of `env` under the behaviour policy and write shards to `output_dir`."""
    from tqdm.auto import tqdm

    s = OmegaConf.to_container(settings, resolve=True) if isinstance(settings, DictConfig) else dict(settings)
    episodes, shard_size = int(s.get("episodes", 1)), int(s.get("shard_size", 4096))
    if episodes < 1:
        raise ValueError(f"collect.episodes must be >= 1, got {episodes}")
    if not env.use_shadow:
        raise ValueError("collection records oracle labels and KL/flip, which need the shadow forward: build the env "
                         "with shadow=true")
    seed = int(s.get("seed", 0))
    n_prompts = len(env.prompts)
    behaviour = BehaviourPolicy(s.get("behaviour") or {}, env, seed)
    manifest = {
        "n_layers": env.n_layers, "max_blocks": env.max_blocks, "n_block_features": N_BLOCK_FEATURES,
        "n_global_features": N_GLOBAL_FEATURES, "block_feature_names": list(BLOCK_FEATURE_NAMES),
        "global_feature_names": list(GLOBAL_FEATURE_NAMES), "action_mode": env.action_mode,
        "split": env.prompts.split, "behaviour": {**(s.get("behaviour") or {}), **behaviour.describe()},
        "env": env.describe(), "seed": seed,
    }
    writer = ShardWriter(s["output_dir"], shard_size, manifest, overwrite=bool(s.get("overwrite", False)))
    started = time.perf_counter()
    per_behaviour: dict[str, list[dict[str, float]]] = defaultdict(list)
    bar = tqdm(range(episodes), desc="collect", unit="episode", disable=not s.get("progress_bar", True),
               mininterval=1.0)
    for episode in bar:
        behaviour.start_episode()
        obs, _ = env.reset(seed=seed if episode == 0 else None, options={"prompt_index": episode % n_prompts})
        step, done, info = 0, False, {}
        while not done:
            action, random_action = behaviour.act()
            next_obs, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            writer.add({
                "blocks": obs["blocks"], "block_mask": obs["block_mask"].astype(bool), "global": obs["global"],
                "actions": np.asarray(action, dtype=np.int64), "oracle_drift": info["oracle_drift"],
                "reward": reward, "kl": info["kl"], "flip": info["flip"], "flop_fraction": info["flop_fraction"],
                "episode": episode, "step": step, "done": done, "prompt_index": env.prompt_index,
                "behaviour": behaviour.component, "random_action": random_action,
            })
            obs, step = next_obs, step + 1
        summary = {"episode": episode, "prompt_index": env.prompt_index, "behaviour": behaviour.component,
                   "label": behaviour.label(), "steps": step, "flop_fraction": info["episode_flop_fraction"],
                   **{k: info[k] for k in ("exact_match", "agreement") if k in info}}
        writer.end_episode(summary)
        per_behaviour[behaviour.label()].append(summary)
        bar.set_postfix(rows=writer.rows, flops=f"{summary['flop_fraction']:.2f}", refresh=False)
    manifest = writer.close()
    seconds = time.perf_counter() - started

    def mean(rows: list[dict[str, float]], key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return float(np.mean(values)) if values else None

    every = [r for rows in per_behaviour.values() for r in rows]
    result = {
        "output_dir": str(writer.directory), "format_version": SHARD_FORMAT_VERSION, "episodes": episodes,
        "rows": manifest["rows"], "shards": len(manifest["shards"]), "seconds": seconds,
        "rows_per_second": manifest["rows"] / seconds if seconds else None,
        "flop_fraction": mean(every, "flop_fraction"), "exact_match": mean(every, "exact_match"),
        "agreement": mean(every, "agreement"),
        "by_behaviour": {k: {"episodes": len(v), "flop_fraction": mean(v, "flop_fraction"),
                             "exact_match": mean(v, "exact_match"), "agreement": mean(v, "agreement")}
                         for k, v in sorted(per_behaviour.items())},
    }
    log.info("collected %d episodes, %d rows in %d shards -> %s (%.0fs)", episodes, result["rows"],
             result["shards"], result["output_dir"], seconds)
    return result


def collect_config(cfg: DictConfig) -> DictConfig:
    """cfg.collect (conf/collect/default.yaml), with a clear error when the group is missing."""
    if "collect" not in cfg or cfg.collect is None:
        raise KeyError("config has no 'collect' group; expected conf/collect/default.yaml (defaults: `- optional "
                       "collect: default`)")
    return cfg.collect


def make_env(cfg: DictConfig, **overrides: Any) -> BlockReuseEnv:
    """The environment of cfg.env (`hydra.utils.instantiate`), with keyword overrides."""
    from hydra.utils import instantiate

    if "env" not in cfg or cfg.env is None:
        raise KeyError("config has no 'env' group; expected conf/env/default.yaml (defaults: `- optional env: "
                       "default`)")
    return instantiate(cfg.env, _convert_="all", **overrides)


def run(cfg: DictConfig) -> dict[str, Any]:
    """`mode=collect`: build the env from cfg.env on cfg.collect.split and collect rollouts into shards."""
    ccfg = collect_config(cfg)
    overrides = {"split": ccfg.split, "n_prompts": int(ccfg.n_prompts)}
    if ccfg.get("num_threads"):
        overrides["num_threads"] = int(ccfg.num_threads)
    env = make_env(cfg, **overrides)
    try:
        return collect(env, ccfg)
    finally:
        env.close()

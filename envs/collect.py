"""Rollout collection (`python train.py mode=collect`): environment episodes under a behaviour policy, written as
dataset shards (format: `envs.shards`).

The behaviour policy is a mixture. Each episode draws one component from `behaviour.policies` (by weight) and one of
its knob values, e.g. dual_cache with refresh_interval 4, then plays it through `BlockReuseEnv.policy_action` (the
heuristic's plan projected on the env's action space). With probability `behaviour.random_prob` a step (scope
`step`) or a whole episode (scope `episode`) takes a random action instead: every block refreshed with a probability
drawn per episode, so random actions span every compute level; in depth mode a refreshed block gets a uniform
depth. The episode's heuristic still sees every step, so stateful heuristics stay in sync.

Episodes cycle through the first `n_prompts` prompts of `split` (episode e plays prompt e mod n_prompts), so the
split is covered evenly. Episode e draws from its own random streams (seeded by `seed` and e), and shards hold whole
episodes written every `flush_episodes`: a killed collection loses at most those episodes, and `collect.resume=true`
continues it to the same data an uninterrupted run writes. Rows are (observation the action was taken on, action,
oracle labels of that state, reward). `collect.backend=ray` plays the same episodes on Ray workers
(`envs.cluster.collect_ray`), each range of `flush_episodes` episodes written as one shard by its worker: the same rows.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from cache_core.actions import n_actions
from cache_core.policy import ReusePolicy
from cache_core.registry import make_policy
from envs.block_reuse_env import BlockReuseEnv
from envs.config import BehaviourConfig, CollectConfig
from envs.factory import make_env
from envs.shards import SHARD_FORMAT_VERSION, ShardWriter

log = logging.getLogger(__name__)


class BehaviourPolicy:
    """The collection's behaviour: a per-episode heuristic (with a knob value) mixed with random actions."""

    def __init__(self, spec: BehaviourConfig, env: BlockReuseEnv, seed: int):
        self.random_prob, self.random_scope = float(spec.random_prob), spec.random_scope
        self.env, self.seed = env, int(seed)
        self.rng = np.random.default_rng([self.seed])
        # Components: (policy name, knob name or None, knob value, fixed knobs), each with a weight.
        self.components: list[dict[str, Any]] = []
        weights = []
        for entry in spec.policies:
            fixed = dict(entry.knobs)
            if entry.name == "oracle" and env.action_mode == "depth":
                fixed.setdefault("depth", True)
            probe = make_policy(entry.name, **fixed)  # fails early on an unknown name or bad knobs
            knob = probe.knob
            if entry.values is not None and knob is None:
                raise ValueError(f"collect.behaviour: policy {entry.name!r} has no knob, so it takes no values")
            for value in [None] if entry.values is None else list(entry.values):
                comp = {"name": entry.name, "knob": knob if entry.values is not None else None, "value": value,
                        "knobs": fixed}
                make_policy(entry.name, **self._knobs(comp))
                self.components.append(comp)
                weights.append(float(entry.weight) / (1 if entry.values is None else len(entry.values)))
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

    def start_episode(self, episode: int) -> None:
        # One random stream per episode, so a resumed collection draws what an uninterrupted one would have.
        self.rng = np.random.default_rng([self.seed, episode])
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
        # A refreshed block takes one of the mode's refresh actions (binary: 1; depth: a uniform depth 1..L).
        top = n_actions(env.action_mode, env.n_layers) - 1
        values = np.where(refresh, self.rng.integers(1, top + 1, size=real), 0) if top > 1 else refresh.astype(np.int64)
        action[env.max_blocks - real:] = values
        return action

    def label(self) -> str:
        if self.component < 0:
            return "random"
        comp = self.components[self.component]
        return comp["name"] if comp["knob"] is None else f"{comp['name']}({comp['knob']}={comp['value']})"


def collection_header(env: BlockReuseEnv, settings: CollectConfig, behaviour: BehaviourPolicy) -> dict[str, Any]:
    """What a collection is (the manifest's keys besides its counts): the same on every backend. The feature schema
    is the env's (`env.schema`)."""
    schema = env.schema
    return {
        "schema_id": schema.id, "n_layers": env.n_layers, "max_blocks": env.max_blocks,
        "n_block_features": schema.n_block, "n_global_features": schema.n_global,
        "block_feature_names": list(schema.block_names), "global_feature_names": list(schema.global_names),
        "action_mode": env.action_mode,
        "split": env.prompts.split, "behaviour": {**asdict(settings.behaviour), **behaviour.describe()},
        "env": env.describe(), "seed": settings.seed,
    }


def check_shadow(env: BlockReuseEnv) -> None:
    if not env.use_shadow:
        raise ValueError("collection records oracle labels and KL/flip, which need the shadow forward: build the env "
                         "with shadow=true")


def play_episode(env: BlockReuseEnv, behaviour: BehaviourPolicy, episode: int, seed: int
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Episode `episode` of a collection: its rows and its summary. It depends on (seed, episode) only, not on the
    episodes before it, so a resumed collection or another process plays the very same episode."""
    behaviour.start_episode(episode)
    env_seed = int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])
    obs, _ = env.reset(seed=env_seed, options={"prompt_index": episode % len(env.prompts)})
    rows: list[dict[str, Any]] = []
    step, done, info = 0, False, {}
    while not done:
        action, random_action = behaviour.act()
        next_obs, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        rows.append({
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
    return rows, summary


def open_writer(settings: CollectConfig, header: dict[str, Any]) -> ShardWriter:
    """The collection's ShardWriter (new, replacing or resuming), refusing more episodes on disk than asked for."""
    from cache_core.bench.tracking import per_job

    s = settings
    writer = ShardWriter(per_job(s.output_dir), s.shard_size, header, overwrite=s.overwrite,
                         flush_episodes=s.flush_episodes, resume=s.resume)
    if writer.episodes > s.episodes:
        raise ValueError(f"{writer.directory} already holds {writer.episodes} episodes, more than "
                         f"collect.episodes={s.episodes}: ask for at least as many as are there")
    return writer


def collect(env: BlockReuseEnv, settings: CollectConfig, run: Any = None) -> dict[str, Any]:
    """Run `settings.episodes` episodes of `env` under the behaviour policy and write shards to `settings.output_dir`.
    run: the job's tracking run (`cache_core.bench.tracking.Run`), which gets per-episode metrics."""
    from tqdm.auto import tqdm

    check_shadow(env)
    s, seed, episodes = settings, settings.seed, settings.episodes
    behaviour = BehaviourPolicy(s.behaviour, env, seed)
    writer = open_writer(s, collection_header(env, s, behaviour))
    started = time.perf_counter()
    first = writer.episodes
    bar = tqdm(range(first, episodes), desc="collect", unit="episode", disable=not s.progress_bar, mininterval=1.0,
               initial=first, total=episodes)
    for episode in bar:
        rows, summary = play_episode(env, behaviour, episode, seed)
        for row in rows:
            writer.add(row)
        writer.end_episode(summary)
        if run is not None:
            run.log({f"collect/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        bar.set_postfix(rows=writer.rows, flops=f"{summary['flop_fraction']:.2f}", refresh=False)
    return collect_result(writer, s, first, time.perf_counter() - started)


def collect_result(writer: ShardWriter, settings: CollectConfig, first: int, seconds: float) -> dict[str, Any]:
    """Close the collection (manifest complete) and summarise it: rows, shards, speed, per-behaviour means."""
    episodes = settings.episodes
    per_behaviour: dict[str, list[dict[str, float]]] = defaultdict(list)
    manifest = writer.close()
    for summary in manifest["episode_summary"]:
        per_behaviour[summary["label"]].append(summary)

    def mean(rows: list[dict[str, float]], key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return float(np.mean(values)) if values else None

    every = [r for rows in per_behaviour.values() for r in rows]
    result = {
        "output_dir": str(writer.directory), "format_version": SHARD_FORMAT_VERSION, "episodes": episodes,
        "resumed_at": first if first else None,
        "rows": manifest["rows"], "shards": len(manifest["shards"]), "seconds": seconds,
        "episodes_per_second": (episodes - first) / seconds if seconds else None,
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


def run(cfg: Any) -> dict[str, Any]:
    """`mode=collect`: the env group on collect.split / collect.n_prompts, rollouts into shards (cfg: RootConfig)."""
    from cache_core.bench import tracking

    c = cfg.collect
    env_config = replace(cfg.env, split=c.split, n_prompts=c.n_prompts)
    run = tracking.start_run(cfg.logger, "collect", cfg)
    try:
        if c.backend == "ray":
            from envs.cluster import collect_ray

            result = collect_ray(env_config.settings(), c, cfg.ray, run)
        else:
            env = make_env(config=env_config)  # the text or the image env, by the env group's schema
            try:
                result = collect(env, c, run)
            finally:
                env.close()
        run.summary({k: v for k, v in result.items() if isinstance(v, (int, float))})
        return result
    finally:
        run.finish()

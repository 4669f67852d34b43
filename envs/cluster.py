"""Ray backends: collection (`collect.backend=ray`), RL env workers (`rl.vec_env=ray`) and the cluster connection
that `evaluate.backend=ray` shares (the `ray` config group, `envs.config.RayConfig`).

- `connect(ray_cfg)`: a local Ray instance (`ray.address=null`) or an existing cluster (`auto`, `host:port`,
  `ray://host:10001`). An address that does not answer within `ray.connect_timeout_s` stops the job with an error
  naming `ray.address` (Ray itself would retry the connection for ever).
- `collect_ray`: `ray.num_workers` actors, each with its own env (its own model), play episode ranges of
  `collect.flush_episodes` episodes; the worker writes the range's shard itself, with a name fixed by the range, and
  the driver names shards in the one manifest (`ShardWriter.add_shard`, atomic) in episode order. Episode e depends
  on (seed, e) only (`envs.collect.play_episode`), so the data equal the local backend's row for row. A lost worker
  is restarted by Ray and its range replayed (`max_restarts` / `max_task_retries` = `ray.max_retries`); the replay
  rewrites the same shard file, so an episode is never lost nor written twice.
- `RayVecEnv`: SB3's `VecEnv` interface over one Ray actor per env, the same protocol as SB3's `SubprocVecEnv`
  (auto-reset, `terminal_observation`, seeds and options used once), with actors spread over the cluster.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv
from stable_baselines3.common.vec_env.subproc_vec_env import _stack_obs

from envs.config import CollectConfig, RayConfig

log = logging.getLogger(__name__)


# --- the cluster -----------------------------------------------------------------------------------------------------
def _host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"ray.address={address!r} is not host:port (the head node's GCS port, e.g. 10.0.0.1:6379), "
                         "ray://host:10001, auto or null (a local instance)")
    return host, int(port)


def connect(ray_cfg: RayConfig, **init_kwargs: Any) -> bool:
    """Connect this process to Ray as `ray_cfg` says, unless it already is; returns whether it connected (then the
    caller shuts Ray down when done). init_kwargs: further `ray.init` arguments (e.g. a runtime_env)."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_cfg.address
    quiet = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING, **init_kwargs}
    if address is None:
        ray.init(num_cpus=ray_cfg.local_cpus, **quiet)
        log.info("started a local Ray instance: %s", ray.cluster_resources())
        return True
    if address != "auto":
        host, port = _host_port(address)
        try:  # Ray would retry a silent address for ever: a plain TCP connect answers within the timeout
            socket.create_connection((host, port), timeout=ray_cfg.connect_timeout_s).close()
        except OSError as err:
            raise ConnectionError(f"ray.address={address!r} does not answer ({err}; waited at most "
                                  f"{ray_cfg.connect_timeout_s:g}s): start the cluster (`ray start --head` on the "
                                  "head node), fix the address, or set ray.address=null to run a local Ray instance"
                                  ) from None
    quiet.pop("include_dashboard")  # a setting of a new instance, refused when joining a cluster
    # Something may accept TCP at that address without being Ray (a proxy, another service), and ray.init then
    # retries for ever (or ~20 s, depending on what answers): it runs in a thread that gets connect_timeout_s.
    outcome: dict[str, BaseException | None] = {}

    def join() -> None:
        try:
            ray.init(address=address, **quiet)
            outcome["error"] = None
        except BaseException as err:  # noqa: BLE001  (handed to the caller below)
            outcome["error"] = err

    thread = threading.Thread(target=join, name="ray-connect", daemon=True)
    thread.start()
    thread.join(ray_cfg.connect_timeout_s)
    if "error" not in outcome:
        raise ConnectionError(f"ray.address={address!r} answers, but no Ray cluster could be joined there within "
                              f"ray.connect_timeout_s={ray_cfg.connect_timeout_s:g}s: give the head node's GCS address "
                              "(`ray status` on the head shows it), raise ray.connect_timeout_s on a slow network, or "
                              "set ray.address=null for a local instance")
    err = outcome["error"]
    if err is not None:
        raise ConnectionError(f"ray.address={address!r}: could not join the Ray cluster ({err}); start it with "
                              "`ray start --head`, fix the address, or set ray.address=null for a local instance"
                              ) from None
    log.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())
    return True


def worker_options(ray_cfg: RayConfig, restartable: bool = True) -> dict[str, Any]:
    """Ray actor options of one worker: its CPUs and GPUs, threads, placement spread over the nodes, and (when
    restartable) Ray's restarts of a lost worker with retries of the task it ran."""
    from cache_core.runtime import THREADS_ENV

    retries = ray_cfg.max_retries if restartable else 0
    return {"num_cpus": ray_cfg.cpus_per_worker, "num_gpus": ray_cfg.gpus_per_worker, "max_restarts": retries,
            "max_task_retries": retries, "scheduling_strategy": "SPREAD",
            "runtime_env": {"env_vars": {THREADS_ENV: str(ray_cfg.worker_threads)}}}


def check_resources(ray_cfg: RayConfig) -> None:
    """Refuse workers the cluster cannot place (Ray would keep them pending for ever)."""
    import ray

    have = ray.cluster_resources()
    for key, need in (("CPU", ray_cfg.cpus_per_worker), ("GPU", ray_cfg.gpus_per_worker)):
        if need > have.get(key, 0.0):
            name = "cpus" if key == "CPU" else "gpus"
            raise ValueError(f"ray.{name}_per_worker={need:g}, but the Ray cluster has {have.get(key, 0.0):g} {key}s "
                             f"in all: lower ray.{name}_per_worker or add nodes with {key}s")


def ray_error(err: Exception, what: str, ray_cfg: RayConfig, keep: str) -> Exception:
    """A lost Ray worker (beyond its restarts) or a task's own error, as an error that says what is kept. A task's
    exception (a full disk, a bad setting) comes back as itself; a lost worker as a RuntimeError."""
    import ray

    if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        return err.cause
    if isinstance(err, ray.exceptions.RayActorError) and err.actor_init_failed:
        # The worker's own start failed (a missing model, a bad setting): the traceback's last line says why.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)),
                      lines[-1] if lines else "")
        return RuntimeError(f"{what}: a Ray worker could not start: {reason}")
    return RuntimeError(f"{what}: a Ray worker was lost and not brought back within ray.max_retries="
                        f"{ray_cfg.max_retries} restarts ({type(err).__name__}: {str(err).splitlines()[0]}); {keep}")


def run_tasks(workers: list[Any], calls: list[tuple[str, tuple[Any, ...]]], what: str, ray_cfg: RayConfig,
              keep: str) -> Iterator[tuple[int, Any]]:
    """Run calls (method name, arguments) on Ray actors, one at a time per worker, the next call going to the
    first worker that is free; yields (index of the call, its result) as calls finish. After a failure no new call
    starts, the running ones finish (and are yielded, so their work is kept), then the first error is raised
    (`ray_error`: `keep` says what is kept)."""
    import ray

    todo, pending = list(reversed(range(len(calls)))), {}
    errors: list[Exception] = []

    def submit(i: int) -> None:
        if todo:
            k = todo.pop()
            method, args = calls[k]
            pending[getattr(workers[i], method).remote(*args)] = (i, k)

    for i in range(len(workers)):
        submit(i)
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        i, k = pending.pop(ref)
        try:
            result = ray.get(ref)
        except (ray.exceptions.RayError, OSError) as err:
            errors.append(err)
            todo.clear()
            continue
        submit(i)
        yield k, result
    if errors:
        raise ray_error(errors[0], what, ray_cfg, keep) from None


# --- collection ------------------------------------------------------------------------------------------------------
class CollectWorker:
    """One collection worker (a Ray actor): its own env and behaviour policy; plays episode ranges into shards."""

    def __init__(self, env_factory: Callable[..., Any], env_kwargs: dict[str, Any], settings: CollectConfig,
                 directory: str):
        from cache_core.runtime import set_threads
        from envs.collect import BehaviourPolicy, check_shadow

        started = time.perf_counter()
        set_threads()  # $BLOCKREUSE_THREADS of the actor's runtime env (ray.worker_threads)
        self.env = env_factory(**env_kwargs)
        check_shadow(self.env)
        self.settings, self.directory = settings, Path(directory)
        self.behaviour = BehaviourPolicy(settings.behaviour, self.env, settings.seed)
        self.load_seconds = time.perf_counter() - started

    def header(self) -> dict[str, Any]:
        from envs.collect import collection_header

        return {**collection_header(self.env, self.settings, self.behaviour), "_load_seconds": self.load_seconds}

    def play(self, shard_index: int, first: int, stop: int) -> dict[str, Any]:
        """Episodes first .. stop-1 into shard `shard_index` (replaced if an earlier attempt wrote it)."""
        import ray

        from envs.collect import play_episode
        from envs.shards import COLUMNS, SHARD_PATTERN, write_shard

        started, shadow = time.perf_counter(), self.env.timings["shadow_s"]
        buffer: dict[str, list[Any]] = {k: [] for k in COLUMNS}
        summaries = []
        for episode in range(first, stop):
            rows, summary = play_episode(self.env, self.behaviour, episode, self.settings.seed)
            for row in rows:
                for key in COLUMNS:
                    buffer[key].append(row[key])
            summaries.append(summary)
        played = time.perf_counter()
        name = SHARD_PATTERN.format(shard_index)
        n = write_shard(self.directory / name, buffer, schema_id=self.env.schema.id)
        return {"file": name, "rows": n, "summaries": summaries, "play_seconds": played - started,
                "shadow_seconds": self.env.timings["shadow_s"] - shadow,
                "write_seconds": time.perf_counter() - played, "node": ray.util.get_node_ip_address()}


def collect_ray(env_kwargs: dict[str, Any], settings: CollectConfig, ray_cfg: RayConfig, run: Any = None,
                env_factory: Callable[..., Any] | None = None) -> dict[str, Any]:
    """`collect` on Ray workers: the same episodes, rows and manifest as `envs.collect.collect` on
    `env_factory(**env_kwargs)` (default BlockReuseEnv), in shards of `collect.flush_episodes` episodes."""
    import ray
    from tqdm.auto import tqdm

    from cache_core.bench.tracking import per_job
    from envs.block_reuse_env import BlockReuseEnv
    from envs.collect import collect_result, open_writer

    s, chunk = settings, int(settings.flush_episodes)
    started_ray = connect(ray_cfg)
    workers: list[Any] = []
    try:
        check_resources(ray_cfg)
        started = time.perf_counter()
        actor = ray.remote(CollectWorker).options(**worker_options(ray_cfg))
        directory = str(per_job(s.output_dir))
        Path(directory).mkdir(parents=True, exist_ok=True)
        workers = [actor.remote(env_factory or BlockReuseEnv, env_kwargs, s, directory)
                   for _ in range(ray_cfg.num_workers)]
        try:
            headers = ray.get([w.header.remote() for w in workers])  # every worker has loaded its model
        except ray.exceptions.RayError as err:
            raise ray_error(err, "collect.backend=ray", ray_cfg, "nothing was collected") from None
        load_seconds = [h.pop("_load_seconds") for h in headers]
        ready_seconds = time.perf_counter() - started  # worker processes started, imports done, models loaded
        writer = open_writer(s, headers[0])
        first, base = writer.episodes, len(writer.manifest["shards"])
        ranges = [(base + k, lo, min(lo + chunk, s.episodes)) for k, lo in enumerate(range(first, s.episodes, chunk))]
        log.info("collect on Ray: %d workers (model loaded in %.1fs at most), %d tasks of %d episodes", len(workers),
                 max(load_seconds), len(ranges), chunk)
        keep = (f"the episodes in {writer.directory}/manifest.json and their shards are kept: continue with "
                "collect.resume=true")
        bar = tqdm(total=s.episodes, initial=first, desc="collect (ray)", unit="episode",
                   disable=not s.progress_bar, mininterval=1.0)
        done: dict[int, dict[str, Any]] = {}
        next_shard, timing = base, {"play_seconds": 0.0, "shadow_seconds": 0.0, "write_seconds": 0.0}
        nodes: set[str] = set()
        calls = [("play", (shard, lo, hi)) for shard, lo, hi in ranges]
        for k, result in run_tasks(workers, calls, "collect.backend=ray", ray_cfg, keep):
            done[base + k] = result
            bar.update(len(result["summaries"]))
            while next_shard in done:  # the manifest counts episodes 0..n-1: shards join it in episode order
                result = done.pop(next_shard)
                writer.add_shard(result["file"], result["rows"], result["summaries"])
                timing = {key: timing[key] + result[key] for key in timing}
                nodes.add(result["node"])
                if run is not None:
                    for summary in result["summaries"]:
                        run.log({f"collect/{key}": v for key, v in summary.items() if isinstance(v, (int, float))})
                next_shard += 1
            bar.set_postfix(rows=writer.manifest["rows"], refresh=False)
        bar.close()
        out = collect_result(writer, s, first, time.perf_counter() - started)
        return {**out, "backend": "ray", "workers": len(workers), "nodes": len(nodes),
                "worker_load_seconds": load_seconds, "workers_ready_seconds": ready_seconds, **timing}
    finally:
        for w in workers:
            ray.kill(w)
        if started_ray:
            ray.shutdown()


# --- RL env workers --------------------------------------------------------------------------------------------------
class EnvWorker:
    """One env of a RayVecEnv (a Ray actor): SB3's SubprocVecEnv worker protocol as methods."""

    def __init__(self, env_fn: Callable[[], Any]):
        from stable_baselines3.common.vec_env.patch_gym import _patch_env

        from cache_core.runtime import set_threads

        set_threads()
        self.env = _patch_env(env_fn())

    def spaces(self) -> tuple[Any, Any]:
        return self.env.observation_space, self.env.action_space

    def step(self, action: Any) -> tuple[Any, ...]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        done = terminated or truncated
        info["TimeLimit.truncated"] = truncated and not terminated
        reset_info: dict[str, Any] = {}
        if done:  # as SubprocVecEnv: the final observation in info, then the next episode's first
            info["terminal_observation"] = observation
            observation, reset_info = self.env.reset()
        return observation, reward, done, info, reset_info

    def reset(self, seed: int | None, options: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
        return self.env.reset(seed=seed, **({"options": options} if options else {}))

    def call(self, kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
        from stable_baselines3.common.env_util import is_wrapped

        if kind == "env_method":
            return self.env.get_wrapper_attr(name)(*args, **kwargs)
        if kind == "get_attr":
            return self.env.get_wrapper_attr(name)
        if kind == "has_attr":
            try:
                self.env.get_wrapper_attr(name)
                return True
            except AttributeError:
                return False
        if kind == "set_attr":
            return setattr(self.env, name, args[0])
        if kind == "is_wrapped":
            return is_wrapped(self.env, args[0])
        if kind == "render":
            return self.env.render()
        raise NotImplementedError(kind)

    def close(self) -> None:
        self.env.close()


class RayVecEnv(VecEnv):
    """SB3 VecEnv whose envs are Ray actors (one each, spread over the cluster). An env's state cannot be
    rebuilt mid-episode, so a lost env worker stops training with an error (rl.resume continues from the last
    checkpoint) instead of being restarted."""

    def __init__(self, env_fns: list[Callable[[], Any]], actor_options: dict[str, Any] | None = None):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("RayVecEnv needs a Ray connection: call envs.cluster.connect(ray_cfg) first")
        options = {"num_cpus": 1, **(actor_options or {}), "max_restarts": 0, "max_task_retries": 0}
        worker = ray.remote(EnvWorker).options(**options)
        self.actors = [worker.remote(fn) for fn in env_fns]
        self.closed, self._futures = False, None
        observation_space, action_space = self._get([self.actors[0].spaces.remote()])[0]
        super().__init__(len(env_fns), observation_space, action_space)

    def _get(self, refs: list[Any]) -> list[Any]:
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as err:
            raise RuntimeError(f"a Ray env worker was lost ({str(err).splitlines()[0]}): training stops; continue "
                               "from the last checkpoint with rl.resume=<run>/checkpoints/rl_agent_<steps>_steps"
                               ) from None
        except ray.exceptions.RayTaskError as err:
            raise (err.cause if err.cause is not None else err) from None

    def step_async(self, actions: np.ndarray) -> None:
        self._futures = [a.step.remote(action) for a, action in zip(self.actors, actions)]

    def step_wait(self) -> Any:
        results, self._futures = self._get(self._futures), None
        obs, rews, dones, infos, self.reset_infos = zip(*results)
        return _stack_obs(obs, self.observation_space), np.stack(rews), np.stack(dones), infos

    def reset(self) -> Any:
        refs = [a.reset.remote(self._seeds[i], self._options[i]) for i, a in enumerate(self.actors)]
        obs, self.reset_infos = zip(*self._get(refs))
        self._reset_seeds()  # seeds and options are used once, as in SB3's own VecEnvs
        self._reset_options()
        return _stack_obs(obs, self.observation_space)

    def close(self) -> None:
        import ray

        if self.closed:
            return
        if self._futures is not None:
            ray.wait(self._futures, num_returns=len(self._futures))
        try:
            ray.get([a.close.remote() for a in self.actors])
        except ray.exceptions.RayError:
            pass  # a lost worker has nothing left to close
        for a in self.actors:
            ray.kill(a)
        self.closed = True

    def _call(self, kind: str, name: str, indices: Any, *args: Any, **kwargs: Any) -> list[Any]:
        return self._get([self.actors[i].call.remote(kind, name, *args, **kwargs)
                          for i in self._get_indices(indices)])

    def get_images(self) -> Sequence[np.ndarray | None]:
        return self._call("render", "", None)

    def has_attr(self, attr_name: str) -> bool:
        return all(self._call("has_attr", attr_name, None))

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return self._call("get_attr", attr_name, indices)

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        self._call("set_attr", attr_name, indices, value)

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any
                   ) -> list[Any]:
        return self._call("env_method", method_name, indices, *method_args, **method_kwargs)

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return self._call("is_wrapped", "", indices, wrapper_class)


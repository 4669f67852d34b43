"""Vectorised BlockReuseEnvs for SB3 (`SubprocVecEnv` / `DummyVecEnv` / `envs.cluster.RayVecEnv`) and Gymnasium
(`gym.make_vec`).

Each worker process builds its own env (and loads the model from `model_path`, or unpickles a passed `model`) and
runs torch with `WORKER_THREADS` thread (`cache_core.set_threads`), so N workers on N cores do not oversubscribe
the CPU.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from envs.block_reuse_env import ENV_ID, BlockReuseEnv
from envs.config import RayConfig

WORKER_THREADS = 1


def worker_env(threads: int | None = WORKER_THREADS, **env_kwargs: Any) -> BlockReuseEnv:
    """The env of `env_kwargs` (text or image, `envs.factory.make_env`) built inside a worker process, with that
    process's torch threads set first."""
    from cache_core.runtime import set_threads
    from envs.factory import make_env

    set_threads(threads)
    return make_env(**env_kwargs)


def make_sb3_vec_env(env_kwargs: dict[str, Any], n_envs: int, subproc: bool = True, seed: int | None = 0,
                     start_method: str | None = None, monitor: bool = True, ray: RayConfig | None = None):
    """An SB3 VecEnv of n_envs BlockReuseEnvs: SubprocVecEnv, DummyVecEnv (subproc=False), or with `ray` (a
    RayConfig; Ray connected beforehand, `envs.cluster.connect`) a RayVecEnv of one Ray actor per env. The same
    seed gives the same observations whichever it is."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    if ray is not None:
        from envs.cluster import RayVecEnv, worker_options

        # Threads come from the actor's runtime env (ray.worker_threads); a lost env worker is not restarted.
        cls, vec_kwargs = RayVecEnv, {"actor_options": worker_options(ray, restartable=False)}
        factory = partial(worker_env, None)
    else:
        factory = partial(worker_env, WORKER_THREADS) if subproc else partial(worker_env, None)
        cls = SubprocVecEnv if subproc else DummyVecEnv
        vec_kwargs = {"start_method": start_method} if subproc and start_method else None
    return make_vec_env(factory, n_envs=n_envs, seed=seed, env_kwargs=dict(env_kwargs), vec_env_cls=cls,
                        vec_env_kwargs=vec_kwargs, wrapper_class=None if monitor else (lambda env: env))


def _gym_worker_env(threads: int | None, env_kwargs: dict[str, Any]):
    """gym.make(ENV_ID, ...) (the registered env with Gymnasium's wrappers and spec) after setting the threads."""
    import gymnasium as gym

    from cache_core.runtime import set_threads

    set_threads(threads)
    return gym.make(ENV_ID, **env_kwargs)


def make_gym_vec_env(env_kwargs: dict[str, Any], n_envs: int, mode: str = "sync"):
    """A Gymnasium vector env of n_envs BlockReuseEnvs; mode 'sync' (in-process) or 'async' (a worker process each,
    `WORKER_THREADS` torch thread per worker; `gym.make_vec(ENV_ID, ...)` works too, with the workers' default
    threads)."""
    import gymnasium as gym

    if mode == "sync":
        return gym.vector.SyncVectorEnv([partial(gym.make, ENV_ID, **env_kwargs)] * n_envs)
    if mode == "async":
        return gym.vector.AsyncVectorEnv([partial(_gym_worker_env, WORKER_THREADS, env_kwargs)] * n_envs)
    raise ValueError(f"unknown vector mode {mode!r}; use 'sync' or 'async'")


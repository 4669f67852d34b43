"""Vectorised BlockReuseEnvs for SB3 (`SubprocVecEnv` / `DummyVecEnv`) and Gymnasium (`gym.make_vec`).

Each worker builds its own env (and loads the model from `model_path`, or unpickles a passed `model`) and runs torch
with `num_threads` threads (1 by default), so N workers on N cores do not oversubscribe the CPU.
"""

from __future__ import annotations

from typing import Any

from envs.block_reuse_env import ENV_ID, BlockReuseEnv


def make_sb3_vec_env(env_kwargs: dict[str, Any], n_envs: int, subproc: bool = True, seed: int | None = 0,
                     start_method: str | None = None, monitor: bool = True):
    """An SB3 VecEnv of n_envs BlockReuseEnvs (SubprocVecEnv unless subproc=False)."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    kwargs = {"num_threads": 1, **env_kwargs} if subproc else dict(env_kwargs)
    vec_kwargs = {"start_method": start_method} if subproc and start_method else None
    return make_vec_env(BlockReuseEnv, n_envs=n_envs, seed=seed, env_kwargs=kwargs,
                        vec_env_cls=SubprocVecEnv if subproc else DummyVecEnv, vec_env_kwargs=vec_kwargs,
                        wrapper_class=None if monitor else (lambda env: env))


def make_gym_vec_env(env_kwargs: dict[str, Any], n_envs: int, mode: str = "sync"):
    """A Gymnasium vector env (`gym.make_vec`) of n_envs BlockReuseEnvs; mode 'sync' or 'async'."""
    import gymnasium as gym

    kwargs = {"num_threads": 1, **env_kwargs} if mode == "async" else dict(env_kwargs)
    return gym.make_vec(ENV_ID, num_envs=n_envs, vectorization_mode=mode, **kwargs)

"""Environment benchmark (`python train.py mode=env_benchmark`): env steps per second, and what the env costs on top
of the generation it wraps.

- steps/s of one env (random actions, resets included) and of N envs in SB3's SubprocVecEnv;
- overhead: the same cached generation (same policy and knob, same prompts) run through the env (the policy's plan
  turned into an action each step) and through `generate()`; ratio = env time / generate time. The env's time
  includes its shadow forward (the full recompute behind the KL/flip reward and the oracle labels), which is also
  reported on its own, with the ratio it would have without it. The no-cache reference answers (w_agree) are
  computed before timing, once per prompt, and reported apart. The env's generated tokens are compared with
  generate()'s: the two run the same session code, so they must agree.

Settings: `env_benchmark.*` (defaults in DEFAULTS; e.g. `+env_benchmark.n_envs=4`), the env from cfg.env. If the
checkpoint at cfg.env.model_path does not exist and `allow_random_model` is true, a randomly initialised model of
cfg.model's shape is used (speed does not depend on the weights; the report says so).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cache_core.generate import generate
from cache_core.policy import make_policy
from envs.block_reuse_env import BlockReuseEnv
from envs.vector import make_sb3_vec_env

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "n_envs": 2,  # parallel envs of the SubprocVecEnv measurement
    "single_steps": 256,  # env steps of the one-env measurement (random actions)
    "vec_steps": 128,  # vector steps of the SubprocVecEnv measurement (x n_envs env steps)
    "policy": "dual_cache",  # policy of the overhead measurement
    "knobs": {},
    "split": "test",
    "n_prompts": 4,  # prompts of the overhead measurement (one episode each)
    "num_threads": 1,  # torch threads, main process and each worker
    "start_method": None,  # SubprocVecEnv start method (None: SB3's default, forkserver)
    "allow_random_model": True,
    "output": None,  # JSON path; None: <cfg.paths.output>/env_benchmark.json
}


def _settings(cfg: DictConfig) -> dict[str, Any]:
    settings = dict(DEFAULTS)
    if "env_benchmark" in cfg and cfg.env_benchmark is not None:
        settings.update(OmegaConf.to_container(cfg.env_benchmark, resolve=True))
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown env_benchmark keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return settings


def _env_kwargs(cfg: DictConfig, settings: dict[str, Any]) -> tuple[dict[str, Any], str]:
    kwargs = OmegaConf.to_container(cfg.env, resolve=True)
    kwargs.pop("_target_", None)
    kwargs.update(split=settings["split"], n_prompts=int(settings["n_prompts"]),
                  num_threads=int(settings["num_threads"]))
    path = kwargs.pop("model_path", None)
    if path and (Path(path) / "config.json").exists():
        # Load once here: every measurement (and every worker, which gets a pickled copy) uses the same weights.
        from cache_core.checkpoint import load_model, load_tokenizer

        kwargs.update(model=load_model(path), tokenizer=load_tokenizer(path))
        return kwargs, str(path)
    if not settings["allow_random_model"]:
        raise FileNotFoundError(f"no checkpoint at {path}: train it with `python train.py mode=pretrain`")
    from cache_core.model import LLaDAModel, ModelConfig
    from cache_core.tokenizer import Tokenizer

    tok = Tokenizer()
    fields = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if v is not None}
    fields.update(vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id)
    torch.manual_seed(0)
    model = LLaDAModel(ModelConfig(**{k: v for k, v in fields.items() if k in ModelConfig.field_names()})).eval()
    log.warning("no checkpoint at %s: benchmarking a randomly initialised model of the same shape", path)
    kwargs.update(model=model, tokenizer=tok)
    return kwargs, "random-init " + json.dumps({k: fields[k] for k in ("d_model", "n_layers") if k in fields})


def single_env_rate(env: BlockReuseEnv, steps: int, seed: int = 0) -> dict[str, float]:
    """Env steps per second with random actions, resets included, one warm-up episode excluded."""
    env.action_space.seed(seed)
    env.reset(seed=seed)
    done = False
    while not done:  # warm-up (and the no-cache reference of its prompt)
        done = env.step(env.action_space.sample())[2]
    for i in range(len(env.prompts)):
        env.reference_answer(i)
    env.reset_timings()
    env.reset()
    started = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    seconds = time.perf_counter() - started
    t = env.timings
    return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
            "shadow_share": t["shadow_s"] / seconds, "session_step_share": t["session_step_s"] / seconds}


def vec_env_rate(env_kwargs: dict[str, Any], n_envs: int, vec_steps: int, start_method: str | None,
                 seed: int = 0) -> dict[str, float]:
    started = time.perf_counter()
    venv = make_sb3_vec_env(env_kwargs, n_envs, subproc=True, seed=seed, start_method=start_method)
    try:
        venv.reset()
        startup = time.perf_counter() - started
        venv.action_space.seed(seed)
        for _ in range(8):  # warm-up
            venv.step(np.stack([venv.action_space.sample() for _ in range(n_envs)]))
        t0 = time.perf_counter()
        for _ in range(vec_steps):
            venv.step(np.stack([venv.action_space.sample() for _ in range(n_envs)]))
        seconds = time.perf_counter() - t0
    finally:
        venv.close()
    return {"n_envs": n_envs, "steps": vec_steps * n_envs, "seconds": seconds,
            "steps_per_s": vec_steps * n_envs / seconds, "startup_s": startup}


def overhead(env: BlockReuseEnv, policy_name: str, knobs: dict[str, Any]) -> dict[str, Any]:
    """The same cached generation through the env and through generate(), prompt by prompt."""
    n = len(env.prompts)
    for i in range(n):
        env.reference_answer(i)  # outside the timing: once per prompt, cached
    policy = make_policy(policy_name, **knobs)
    # Warm-up both paths on the first prompt.
    item = env.prompts[0]
    generate(env.model, [list(item.prompt_ids)], env.gen_length, env.block_length, env.steps,
             threshold=env.threshold, temperature=env.temperature, remasking=env.remasking, policy=policy)
    env_s = policy_s = gen_s = 0.0
    steps = matches = 0
    env.reset_timings()
    for i in range(n):
        t0 = time.perf_counter()
        env.reset(seed=i, options={"prompt_index": i})
        env_s += time.perf_counter() - t0
        policy.reset(1)
        done = False
        while not done:
            t0 = time.perf_counter()
            action = env.policy_action(policy)
            t1 = time.perf_counter()
            _, _, done, _, info = env.step(action)
            t2 = time.perf_counter()
            policy_s += t1 - t0
            env_s += t2 - t1
            steps += 1
        env_tokens = info["generated"]
        item = env.prompts[i]
        t0 = time.perf_counter()
        result = generate(env.model, [list(item.prompt_ids)], env.gen_length, env.block_length, env.steps,
                          threshold=env.threshold, temperature=env.temperature, remasking=env.remasking,
                          policy=policy, seed=None)
        gen_s += time.perf_counter() - t0
        matches += int(np.array_equal(result.tokens[0].numpy(), env_tokens))
    shadow_s = env.timings["shadow_s"]
    described = policy.describe()
    label = described.pop("policy") + "".join(f"({k}={v})" for k, v in described.items())
    return {
        "policy": label, "prompts": n, "steps": steps,
        "env_s": env_s, "policy_s": policy_s, "generate_s": gen_s, "shadow_s": shadow_s,
        "overhead_ratio": env_s / gen_s, "overhead_ratio_without_shadow": (env_s - shadow_s) / gen_s,
        "shadow_share_of_env": shadow_s / env_s, "tokens_match_generate": f"{matches}/{n}",
        "reference_s": env.timings["reference_s"],
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """`mode=env_benchmark`: prints a table and writes JSON (see the module docstring)."""
    settings = _settings(cfg)
    torch.set_num_threads(int(settings["num_threads"]))
    env_kwargs, model_desc = _env_kwargs(cfg, settings)
    env = BlockReuseEnv(**env_kwargs)
    single = single_env_rate(env, int(settings["single_steps"]))
    over = overhead(env, settings["policy"], dict(settings["knobs"] or {}))
    vec = vec_env_rate(env_kwargs, int(settings["n_envs"]), int(settings["vec_steps"]), settings["start_method"])
    result = {
        "model": model_desc, "n_layers": env.n_layers, "max_blocks": env.max_blocks, "action_mode": env.action_mode,
        "gen_length": env.gen_length, "block_length": env.block_length, "steps": env.steps,
        "torch_threads": int(settings["num_threads"]), "single_env": single, "vec_env": vec, "overhead": over,
    }
    env.close()
    output = settings["output"]
    if output is None:
        try:
            output = str(Path(cfg.paths.output) / "env_benchmark.json")
        except Exception:  # no Hydra run directory (e.g. a composed config): write next to the working directory
            output = "env_benchmark.json"
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=1))
    result["output"] = output
    print(format_table(result))
    return result


def format_table(r: dict[str, Any]) -> str:
    o, s, v = r["overhead"], r["single_env"], r["vec_env"]
    rows = [
        ("model", r["model"]),
        ("canvas", f"{r['max_blocks']} blocks max, {r['n_layers']} layers, {r['steps']} steps, "
                   f"action {r['action_mode']}, torch threads {r['torch_threads']}"),
        ("1 env (random actions)", f"{s['steps_per_s']:.1f} steps/s (shadow forward {100 * s['shadow_share']:.0f}% "
                                   "of the time)"),
        (f"{v['n_envs']} envs SubprocVecEnv", f"{v['steps_per_s']:.1f} steps/s (startup {v['startup_s']:.1f}s)"),
        (f"env vs generate() [{o['policy']}]", f"{o['env_s']:.2f}s vs {o['generate_s']:.2f}s over {o['prompts']} "
                                                f"prompts / {o['steps']} steps"),
        ("overhead ratio", f"{o['overhead_ratio']:.2f}x (without the shadow forward "
                           f"{o['overhead_ratio_without_shadow']:.2f}x)"),
        ("shadow forward", f"{o['shadow_s']:.2f}s = {100 * o['shadow_share_of_env']:.0f}% of env time"),
        ("policy planning (outside env)", f"{o['policy_s']:.2f}s"),
        ("tokens equal to generate()", o["tokens_match_generate"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["env benchmark", "-" * (width + 60)] + [f"{k:<{width}}  {val}" for k, val in rows]
    return "\n".join(lines)

"""Environment benchmark (`python train.py mode=env_benchmark`): env steps per second, and what the env costs on top
of the generation it wraps.

- steps/s of one env (random actions, resets included) and of N envs in SB3's SubprocVecEnv;
- overhead: the same cached generation (same policy and knob, same prompts) run through the env (the policy's plan
  turned into an action each step) and through `generate()`; ratio = env time / generate time. The env's time
  includes its shadow forward (the full recompute behind the KL/flip reward and the oracle labels), which is also
  reported on its own, with the ratio it would have without it. The no-cache reference answers (w_agree) are
  computed before timing, once per prompt, and reported apart. The env's generated tokens are compared with
  generate()'s: the two run the same session code, so they must agree.

Settings: the `env_benchmark` group (conf/env_benchmark/default.yaml; e.g. `env_benchmark.n_envs=4`), the env from
the env group. If the checkpoint at env.model_path does not exist and `allow_random_model` is true, a randomly
initialised model of the model group's shape is used (speed does not depend on the weights; the report says so).
Torch threads: the run's `threads` (each SubprocVecEnv worker runs 1).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache_core.generate import generate
from cache_core.registry import make_policy
from envs.block_reuse_env import BlockReuseEnv
from envs.vector import make_sb3_vec_env

log = logging.getLogger(__name__)

def _env_kwargs(cfg: Any) -> tuple[dict[str, Any], str]:
    """The env group's settings on env_benchmark.split / n_prompts, with the model loaded once (every measurement, and
    every worker, which gets a pickled copy, uses the same weights), or a random model of the model group's shape."""
    b = cfg.env_benchmark
    settings = replace(cfg.env, split=b.split, n_prompts=b.n_prompts).settings()
    path = settings.pop("model_path")
    if path and (Path(path) / "config.json").exists():
        from cache_core.checkpoint import load_model, load_tokenizer

        return {**settings, "model": load_model(path), "tokenizer": load_tokenizer(path)}, str(path)
    if not b.allow_random_model:
        raise FileNotFoundError(f"no checkpoint at {path}: train it with `python train.py mode=pretrain` (or set "
                                "env_benchmark.allow_random_model=true)")
    from cache_core.models import LLaDAModel
    from cache_core.tokenizer import Tokenizer

    tok = Tokenizer()
    model_cfg = cfg.model.to_model_config(tok)
    torch.manual_seed(0)
    model = LLaDAModel(model_cfg).eval()
    log.warning("no checkpoint at %s: benchmarking a randomly initialised model of the same shape", path)
    shape = json.dumps({"d_model": model_cfg.d_model, "n_layers": model_cfg.n_layers})
    return {**settings, "model": model, "tokenizer": tok}, "random-init " + shape


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


def run(cfg: Any) -> dict[str, Any]:
    """`mode=env_benchmark`: prints a table and writes JSON (cfg: policies.config.RootConfig)."""
    from cache_core.bench import tracking

    b = cfg.env_benchmark
    env_kwargs, model_desc = _env_kwargs(cfg)
    env = BlockReuseEnv(**env_kwargs)
    single = single_env_rate(env, b.single_steps)
    over = overhead(env, b.policy, dict(b.knobs))
    vec = vec_env_rate(env_kwargs, b.n_envs, b.vec_steps, b.start_method)
    result = {
        "model": model_desc, "n_layers": env.n_layers, "max_blocks": env.max_blocks, "action_mode": env.action_mode,
        "gen_length": env.gen_length, "block_length": env.block_length, "steps": env.steps,
        "torch_threads": torch.get_num_threads(), "single_env": single, "vec_env": vec, "overhead": over,
    }
    env.close()
    output = Path(b.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    result["output"] = str(output)
    run = tracking.start_run(cfg.logger, "env_benchmark", cfg)
    run.summary({"single_env_steps_per_s": single["steps_per_s"], "vec_env_steps_per_s": vec["steps_per_s"],
                 "overhead_ratio": over["overhead_ratio"]})
    run.log_artifact([output], "env_benchmark", kind="results")
    run.finish()
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

"""Collection throughput: episodes/s of the local backend and of `collect.backend=ray` with 1, 2, ... workers, on the
same episodes (the collect and env groups; any Hydra override applies).

    python -m envs.collect_benchmark                              # built-in model, 16 episodes, 1 and 2 Ray workers
    python -m envs.collect_benchmark --workers 1 2 4 --episodes 32 ray.address=auto   # on a cluster

Each run collects into its own temporary directory. Per run: `seconds` (the collection, from the first worker's start
to the complete manifest: model loading per worker included), `worker_load_seconds` (a worker's env and model
construction), `steady_episodes_per_second` (episodes / (seconds - start-up): the rate once every worker
is up; Ray: seconds minus `workers_ready_seconds`, until every worker process has started and loaded its model),
`play_seconds` / `shadow_seconds` / `write_seconds` (summed over tasks: episodes played, the env's shadow full
forward within them, shards written). Ray's own start
(`ray_start_seconds`) is apart. Prints a table and the JSON, and writes the JSON to --output.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


def measure(overrides: list[str], workers: list[int], episodes: int) -> dict[str, Any]:
    import ray

    from cache_core.runtime import set_threads
    from envs.block_reuse_env import BlockReuseEnv
    from envs.cluster import collect_ray, connect
    from envs.collect import collect
    from policies.config import compose

    set_threads(1)  # the driver's own torch, as each worker's (ray.worker_threads)
    tmp = Path(tempfile.mkdtemp(prefix="collect-bench-"))
    cfg = compose([f"paths.output={tmp}", "logger=none", "mode=collect", f"collect.episodes={episodes}",
                   "collect.flush_episodes=2", "collect.progress_bar=false", *overrides])
    c = cfg.collect
    env_config = replace(cfg.env, split=c.split, n_prompts=c.n_prompts)
    runs = []
    started = time.perf_counter()
    env = BlockReuseEnv(config=env_config)
    load = time.perf_counter() - started
    result = collect(env, replace(c, output_dir=str(tmp / "local")))
    env.close()
    runs.append({**summary("local", 1, result, [load], load), "shadow_seconds": env.timings["shadow_s"]})
    reference = result["rows"]
    for n in workers:
        ray_cfg = replace(cfg.ray, num_workers=n)
        t0 = time.perf_counter()
        connect(ray_cfg)
        ray_start = time.perf_counter() - t0
        try:
            result = collect_ray(env_config.settings(), replace(c, backend="ray", output_dir=str(tmp / f"ray{n}")),
                                 ray_cfg)
        finally:
            ray.shutdown()
        if result["rows"] != reference:
            raise RuntimeError(f"ray with {n} workers collected {result['rows']} rows, the local backend {reference}")
        runs.append({**summary("ray", n, result, result["worker_load_seconds"], result["workers_ready_seconds"]),
                     "ray_start_seconds": ray_start, **{k: result[k] for k in ("play_seconds", "shadow_seconds",
                                                                               "write_seconds")}})
    return {"episodes": episodes, "steps_per_episode": reference / episodes, "model": str(cfg.env.model_path),
            "flush_episodes": c.flush_episodes, "overrides": overrides, "runs": runs}


def summary(backend: str, workers: int, result: dict[str, Any], load: list[float], startup: float
            ) -> dict[str, Any]:
    seconds = result["seconds"] + (load[0] if backend == "local" else 0.0)  # local: its one model load too
    steady = seconds - startup
    return {"backend": backend, "workers": workers, "episodes": result["episodes"], "seconds": seconds,
            "episodes_per_second": result["episodes"] / seconds, "worker_load_seconds": max(load),
            "startup_seconds": startup,
            "steady_episodes_per_second": result["episodes"] / steady if steady > 0 else None}


def table(report: dict[str, Any]) -> str:
    head = (f"{'backend':8s} {'workers':>7s} {'seconds':>8s} {'episodes/s':>10s} {'steady ep/s':>11s} "
            f"{'start-up s':>10s} {'model load s':>12s} {'shadow s':>8s} {'write s':>7s}")
    lines = [head, "-" * len(head)]
    for r in report["runs"]:
        steady = f"{r['steady_episodes_per_second']:.3f}" if r["steady_episodes_per_second"] else "-"
        write = f"{r['write_seconds']:.2f}" if "write_seconds" in r else "-"  # the local writer is not timed apart
        lines.append(f"{r['backend']:8s} {r['workers']:7d} {r['seconds']:8.1f} {r['episodes_per_second']:10.3f} "
                     f"{steady:>11s} {r['startup_seconds']:10.2f} {r['worker_load_seconds']:12.2f} "
                     f"{r['shadow_seconds']:8.1f} {write:>7s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to measure")
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--output", default="collect_benchmark.json")
    args, overrides = parser.parse_known_args(argv)
    report = measure(overrides, args.workers, args.episodes)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(table(report))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

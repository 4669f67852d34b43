"""The RL reuse agent (`python train.py mode=rl`): Stable-Baselines3 on `BlockReuseEnv`, exported like the predictor.

    python train.py mode=rl                                  # PPO, binary, budget-conditioned, ~20 min; starts
                                                             #   from the shipped predictor (rl.warm_start=auto)
    python train.py mode=rl rl.env.action_mode=depth         # refresh depth per block (MultiDiscrete)
    python train.py mode=rl rl.algo=a2c rl.n_envs=4
    python train.py mode=rl rl.warm_start=<run>/checkpoints/best.ckpt   # start from a supervised checkpoint
    python train.py mode=rl rl.warm_start=null               # from scratch (collapses to "never" on the built-in)
    python train.py mode=rl rl.resume=<run>/checkpoints/rl_agent_8192_steps   # .safetensors + .json
    python train.py -m mode=rl rl.seed=0,1                   # Hydra multirun: one W&B run per job

One function does the job top to bottom (`train_agent`): vectorised envs (`make_vec_env` with `SubprocVecEnv`),
the per-block actor-critic (`policies.rl_policy`), callbacks (episode metrics, evaluation of the exported policy on
validation prompts across budgets, checkpoints, W&B through `cache_core.bench.tracking`), `learn`, then the export of
the deterministic policy through `policies.export.export_onnx` (output `action_logits`) into the run directory
(`rl_agent.{onnx,json}`); `mode=export export.source=<run>/rl_agent.onnx export.path=...` ships it.

Budget conditioning: with `rl.env.budget: [low, high]` every episode draws its FLOP budget from that range; the agent
reads it in the global feature `budget` (and `compute_spent`), is penalised for overshooting it at the episode's
end, and the manifest says `budget_conditioned: true`, so `generate(..., policy=<onnx>, budget=b)` serves any b.

Checkpoints and `rl.resume`: SB3's own zips contain pickles, and unpickling runs code, so this project never writes
or loads them. A checkpoint is data only (`policies.rl_callbacks.save_agent`): the policy's weights and the
optimiser's tensors in `<name>.safetensors`, the counters, the optimiser's settings and the network's config in
`<name>.json`; `load_agent` rebuilds the agent from config and loads that data. The deployable artifact is the ONNX
file + JSON manifest, which holds no code either.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from cache_core.actions import check_action_mode
from cache_core.bench import tracking
from cache_core.features import TEXT_SCHEMA, FeatureSchema
from cache_core.learned import policy_files, read_manifest
from envs.config import EnvConfig, RayConfig
from policies.config import LoggerConfig, RLConfig, RLPolicyConfig, RootConfig
from policies.predictor import read_predictor
from policies.rl_callbacks import (
    AgentCheckpointCallback,
    EpisodeMetricsCallback,
    GenerationEvalCallback,
    TimeLimitCallback,
    WandbOutputFormat,
    check_agent_schema,
    read_agent_checkpoint,
    restore_agent,
    save_agent,
)
from policies.rl_policy import ACTIVATIONS, ExportedActor, PerBlockActorCriticPolicy

log = logging.getLogger(__name__)

# SB3 algorithms and the action spaces they accept (their `supported_action_spaces`). The per-block policy is an
# ActorCriticPolicy, so it also needs an on-policy actor-critic algorithm: PPO and A2C qualify.
ALGO_ACTION_SPACES: dict[str, tuple[str, ...]] = {
    "ppo": ("Box", "Discrete", "MultiDiscrete", "MultiBinary"),
    "a2c": ("Box", "Discrete", "MultiDiscrete", "MultiBinary"),
    "dqn": ("Discrete",),
    "sac": ("Box",),
    "td3": ("Box",),
    "ddpg": ("Box",),
}
ACTION_SPACE_OF_MODE = {"binary": "MultiBinary", "depth": "MultiDiscrete"}
ENV_OBJECTS = ("model", "prompts", "tokenizer", "render_mode")  # BlockReuseEnv arguments that are not settings


# --- configuration ---------------------------------------------------------------------------------------------------
def resolve_algo(name: str, action_mode: str) -> type:
    """The SB3 algorithm class for `rl.algo`, refused with a clear message when it cannot drive this env."""
    from stable_baselines3 import A2C, PPO

    key = str(name).lower()
    check_action_mode(action_mode)
    space = ACTION_SPACE_OF_MODE[action_mode]
    usable = [a for a, s in ALGO_ACTION_SPACES.items() if space in s]
    if key not in ALGO_ACTION_SPACES:
        raise ValueError(f"unknown rl.algo {name!r}; choose one of {usable} (SB3 algorithms that support "
                         f"{space} actions)")
    if space not in ALGO_ACTION_SPACES[key]:
        raise ValueError(f"rl.algo={name!r} does not support {space} action spaces (action_mode={action_mode!r}); it "
                         f"only handles {'/'.join(ALGO_ACTION_SPACES[key])}. Use one of {usable}")
    return {"ppo": PPO, "a2c": A2C}[key]


def env_settings(env_kwargs: dict[str, Any]) -> Any:
    """The typed settings inside env keyword arguments (objects such as a model left out): an `EnvConfig`, or an
    `ImageEnvConfig` when they describe the image env (`envs.factory.image_settings`)."""
    from envs.factory import image_settings
    from envs.image_env import ImageEnvConfig

    plain = {k: v for k, v in env_kwargs.items() if k not in ENV_OBJECTS}
    model = env_kwargs.get("model")
    if image_settings(plain) or getattr(model, "modality", "text") == "image":
        return ImageEnvConfig.from_settings(**plain)
    return EnvConfig.from_settings(**plain)


# --- the agent -------------------------------------------------------------------------------------------------------
def env_schema(env: Any) -> FeatureSchema:
    """The feature schema of an env (`env.schema`), or of the first env of an SB3 VecEnv (the envs of one VecEnv are
    built from the same settings)."""
    if hasattr(env, "get_attr"):
        return env.get_attr("schema", [0])[0]
    return env.unwrapped.schema


def policy_kwargs(p: RLPolicyConfig, schema_id: str = TEXT_SCHEMA.id) -> dict[str, Any]:
    return {
        "features_extractor_kwargs": {"hidden": p.hidden, "arch": p.arch, "predictor_kwargs": dict(p.predictor_kwargs),
                                      "schema_id": schema_id},
        "net_arch": {k: list(v) for k, v in p.net_arch.items()},
        "activation_fn": ACTIVATIONS[p.activation],
        "ortho_init": p.ortho_init,
        "init_refresh_prob": p.init_refresh_prob,
    }


def algo_kwargs(rl: RLConfig) -> dict[str, Any]:
    """The shared `rl.hyperparams` plus the algorithm's own section (`rl.ppo`, `rl.a2c`)."""
    return {**rl.hyperparams, **getattr(rl, rl.algo.lower(), {})}


def build_agent(rl: RLConfig, venv: Any, action_mode: str) -> Any:
    """A fresh SB3 model of `rl.algo` with the per-block policy on `venv`, reading the envs' feature schema."""
    cls = resolve_algo(rl.algo, action_mode)
    kwargs = algo_kwargs(rl)
    schema_id = env_schema(venv).id
    try:
        model = cls(PerBlockActorCriticPolicy, venv, policy_kwargs=policy_kwargs(rl.policy, schema_id), seed=rl.seed,
                    device=rl.device, verbose=rl.verbose, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad hyperparameters for {cls.__name__}: {sorted(kwargs)} ({err}); fix rl.hyperparams / "
                         f"rl.{rl.algo}") from err
    model.policy.blockreuse_config = asdict(rl.policy)  # recorded in checkpoints, so a resume rebuilds this network
    return model


def load_agent(path: str | Path, rl: RLConfig, env: Any, action_mode: str,
               checkpoint: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None) -> Any:
    """An agent rebuilt from config (rl, with the network config its checkpoint records) and the checkpoint's data
    (`policies.rl_callbacks.save_agent`): weights, optimiser state, counters. No pickle is loaded. checkpoint: the
    already read `read_agent_checkpoint(path)`. A checkpoint of another feature schema than the env's is refused."""
    schema = env_schema(env)
    if checkpoint is None:
        tensors, record = read_agent_checkpoint(path, schema)
    else:
        tensors, record = checkpoint
        check_agent_schema(record, path, schema)
    if record.get("action_mode") != action_mode:
        raise ValueError(f"{path}: a {record.get('action_mode')} agent cannot continue as a {action_mode} one; set "
                         f"rl.env.action_mode={record.get('action_mode')}")
    if record.get("algo") != rl.algo.lower():
        raise ValueError(f"{path}: written by {record.get('algo')!r}, but rl.algo={rl.algo!r}")
    blocks = int(env.observation_space["blocks"].shape[0])
    if record.get("max_blocks") != blocks:
        raise ValueError(f"{path}: trained on observations of {record.get('max_blocks')} blocks, this env has "
                         f"{blocks}; resume with the env settings it was trained with (max_prompt_length, gen_length)")
    if record.get("policy_config"):
        rl = replace(rl, policy=RLPolicyConfig(**record["policy_config"]))
    model = build_agent(rl, env, action_mode)
    restore_agent(model, tensors, record, source=path)
    return model


def resolve_warm_start(rl: RLConfig, action_mode: str, schema: FeatureSchema = TEXT_SCHEMA) -> str | None:
    """rl.warm_start as a path or None. `auto` (the default) takes the shipped predictor's weights (rl.warm_start_auto)
    when they exist and fit the action mode and the env's feature schema, and otherwise starts from scratch with a
    warning saying why; an explicit path must fit (errors say why not)."""
    value = rl.warm_start
    if value is None or str(value).lower() in ("null", "none", ""):
        return None
    if str(value).lower() != "auto":
        return str(value)
    if rl.resume:
        return None  # a resumed agent already has trained weights
    path = Path(rl.warm_start_auto)
    if not path.is_file():
        log.warning("rl.warm_start=auto: no exported predictor weights at %s; the agent starts from scratch, which on "
                    "the built-in model tends to collapse to refreshing nothing: train a predictor first (its run "
                    "writes <run dir>/predictor.safetensors), or set rl.warm_start=PATH", path)
        return None
    meta = read_predictor(path)[1]
    if meta.get("action_mode") not in (None, action_mode):
        log.warning("rl.warm_start=auto: the exported predictor at %s is a %s policy and this agent is %s; starting "
                    "from scratch (train a %s predictor to warm-start it)", path, meta["action_mode"], action_mode,
                    action_mode)
        return None
    if meta["schema_id"] != schema.id:
        log.warning("rl.warm_start=auto: the exported predictor at %s reads feature schema %r, this agent's env %r "
                    "(%s family); starting from scratch (train a predictor on this family's shards to warm-start it)",
                    path, meta["schema_id"], schema.id, schema.family)
        return None
    log.info("rl.warm_start=auto: starting from the exported predictor %s", path)
    return str(path)


def warm_start_policy(policy: RLPolicyConfig, meta: dict[str, Any]) -> RLPolicyConfig:
    """rl.policy with the supervised network's architecture (hidden, arch, attention layers) where it is known."""
    net = meta.get("net_config") or {}
    if not net:
        return policy
    extra = {k: net[k] for k in ("n_layers_attn", "n_heads", "dropout") if k in net}
    return replace(policy, hidden=net["hidden"], arch=net["arch"],
                   predictor_kwargs={**policy.predictor_kwargs, **extra})


def warm_start(policy: PerBlockActorCriticPolicy, path: str | Path) -> dict[str, Any]:
    """Initialise the extractor's `BlockPredictor` from a supervised predictor, and the action head from the
    predictor's output layer when they have the same shape (binary: the refresh logit minus logit(threshold) is the
    Bernoulli logit; depth: the same L + 1 action logits), so that PPO starts from the supervised policy.

    A predictor trained without budget conditioning saw the `budget` input at the constant 1, so its weight column
    acted as a bias. It is folded into the bias and zeroed: the network computes the supervised function at budget 1
    and starts budget-independent, instead of reacting arbitrarily to budgets it never saw."""
    state, meta = read_predictor(path)
    if meta.get("action_mode") not in (None, policy.action_mode):
        raise ValueError(f"rl.warm_start={path}: a {meta['action_mode']} predictor cannot start a "
                         f"{policy.action_mode} agent; set rl.env.action_mode={meta['action_mode']}")
    predictor = policy.features_extractor.predictor
    if meta["schema_id"] != predictor.schema.id:
        raise ValueError(f"rl.warm_start={path}: the predictor reads feature schema {meta['schema_id']!r}, the agent's "
                         f"env {predictor.schema.id!r}; warm-start from a predictor trained on this model family's "
                         "shards, or set rl.warm_start=null")
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = predictor.state_dict()
    bad = [k for k, v in body.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    missing = [k for k in own if not k.startswith("head.") and k not in body]
    if bad or missing:
        raise ValueError(f"rl.warm_start={path}: the checkpoint's network differs from rl.policy (shapes differ: "
                         f"{bad[:3]}, missing: {missing[:3]}); set rl.policy.hidden / arch / predictor_kwargs to the "
                         "supervised predictor's")
    predictor.load_state_dict(body, strict=False)
    with torch.no_grad():
        if not meta["budget_conditioned"]:
            first = predictor.embed[0]
            col = predictor.schema.input_index(predictor.schema.budget)
            first.bias += first.weight[:, col]
            first.weight[:, col] = 0.0
        linear = policy.action_net.linear
        head_loaded = (not policy.net_arch["pi"] and "weight" in head
                       and tuple(head["weight"].shape) == tuple(linear.weight.shape))
        if head_loaded:
            linear.weight.copy_(head["weight"])
            linear.bias.copy_(head["bias"])
            if policy.action_mode == "binary":
                t = min(max(meta["threshold"], 1e-6), 1 - 1e-6)
                linear.bias -= math.log(t / (1 - t))
    loaded = {"path": tracking.portable_path(path), "tensors": len(body), "head": bool(head_loaded),
              **{k: meta[k] for k in ("net_config", "threshold", "budget_conditioned", "action_mode")}}
    log.info("warm start from %s: %d predictor tensors, action head %s", path, len(body),
             "loaded" if head_loaded else "fresh")
    return loaded


def export_agent(model: Any, path: str | Path, *, n_layers: int, budget_conditioned: bool,
                 source: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                 default_budget: float | None = None) -> Path:
    """The deterministic policy of `model` -> `<path>.onnx` + `<path>.json` via `policies.export.export_onnx`
    (output `action_logits`, read by `cache_core.learned.LearnedPolicy`)."""
    from policies.export import export_onnx

    policy = model.policy
    if policy.action_mode == "depth" and policy.k != n_layers + 1:
        raise ValueError(f"depth agent has {policy.k} actions per block but the model has n_layers={n_layers}")
    actor = ExportedActor(policy).eval()
    return Path(export_onnx(actor, path, action_mode=policy.action_mode, output="action_logits", n_layers=n_layers,
                            budget_conditioned=budget_conditioned, source=source, metrics=metrics,
                            default_budget=default_budget))


# --- the job ---------------------------------------------------------------------------------------------------------
def train_agent(rl: RLConfig, env_kwargs: dict[str, Any], output_dir: str | Path, *,
                eval_env_kwargs: dict[str, Any] | None = None, logger: LoggerConfig | None = None,
                run_config: Any = None, ray: RayConfig | None = None) -> dict[str, Any]:
    """Train (or resume), evaluate and export the RL agent. env_kwargs: the BlockReuseEnv keyword arguments of the
    training envs (settings with rl.env already merged in, and objects such as a model); eval_env_kwargs: those of
    the held-out prompts (default: env_kwargs on rl.eval.split with rl.eval.n_prompts); logger: the W&B settings
    (None: no run); run_config: what W&B records as the run's config (default: rl and the env settings); ray: the
    cluster of rl.vec_env=ray (the ray group)."""
    from stable_baselines3.common.callbacks import CallbackList
    from stable_baselines3.common.logger import configure

    from envs.block_reuse_env import BlockReuseEnv
    from envs.factory import make_env
    from envs.image_env import ImageEnvConfig, ImageReuseEnv
    from envs.vector import make_sb3_vec_env

    settings = env_settings(env_kwargs)  # refuses bad env settings before any process starts
    image = isinstance(settings, ImageEnvConfig)
    action_mode = settings.action_mode
    resolve_algo(rl.algo, action_mode)
    schema = (ImageReuseEnv if image else BlockReuseEnv).schema  # the training and evaluation envs' (make_env's)
    # A bad checkpoint fails before any process starts.
    resumed = read_agent_checkpoint(rl.resume, schema) if rl.resume else None
    warm_path = resolve_warm_start(rl, action_mode, schema)
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    budget_conditioned = settings.budget is not None
    budgets: list[float | None] = list(rl.eval.budgets) if budget_conditioned and rl.eval.budgets else [None]

    # Held-out prompts first: a bad eval split fails before worker processes start.
    if eval_env_kwargs is None:
        eval_env_kwargs = {**env_kwargs, "split": rl.eval.split, "n_prompts": rl.eval.n_prompts}
    no_shadow = {"w_error": 0.0} if image else {"w_kl": 0.0, "w_flip": 0.0}  # the eval env runs no shadow forward
    eval_env_kwargs = {**eval_env_kwargs, "budget": None, "shadow": False, **no_shadow}
    eval_env = make_env(**eval_env_kwargs)

    started_ray = False
    if rl.vec_env == "ray":
        from envs.cluster import check_resources, connect

        if ray is None:
            raise ValueError("rl.vec_env=ray needs the ray group's settings (train_agent(..., ray=cfg.ray))")
        started_ray = connect(ray)
        check_resources(ray)
    try:
        venv = make_sb3_vec_env(env_kwargs, rl.n_envs, subproc=rl.vec_env == "subproc", seed=rl.seed,
                                ray=ray if rl.vec_env == "ray" else None)
    except BaseException:
        if started_ray:
            _shutdown_ray()
        raise
    run = tracking.Run(None)
    try:
        policy_cfg = rl.policy
        if rl.resume:
            model = load_agent(rl.resume, rl, venv, action_mode, checkpoint=resumed)
            log.info("resumed %s at %d timesteps", rl.resume, model.num_timesteps)
            warm = None
        else:
            if warm_path:
                policy_cfg = warm_start_policy(rl.policy, read_predictor(warm_path)[1])
            model = build_agent(replace(rl, policy=policy_cfg), venv, action_mode)
            warm = warm_start(model.policy, warm_path) if warm_path else None

        if logger is not None:
            config = run_config if run_config is not None else {"rl": tracking.plain_config(rl),
                                                                 "env": _plain(env_kwargs)}
            run = tracking.start_run(logger, "rl", config)
        sb3_logger = configure(str(output_dir / "sb3"), list(rl.log_formats))
        if run.active:
            sb3_logger.output_formats.append(WandbOutputFormat(run))
        model.set_logger(sb3_logger)

        ckpt_dir = tracking.per_job(rl.checkpoint.dir)

        def export_for_eval(m: Any, path: Path) -> Path:
            return export_agent(m, path, n_layers=eval_env.n_layers, budget_conditioned=budget_conditioned)

        at_start = bool(warm_path) if rl.eval.at_start is None else rl.eval.at_start
        evaluator = GenerationEvalCallback(
            eval_env, export_for_eval, budgets, freq=rl.eval.freq, batch_size=rl.eval.batch_size,
            flop_weight=rl.eval.flop_weight, over_weight=rl.eval.over_weight,
            best_path=ckpt_dir / "rl_agent_best", at_start=at_start)
        time_limit = TimeLimitCallback(rl.max_minutes)
        callbacks = [EpisodeMetricsCallback(), time_limit, evaluator]
        if rl.checkpoint.freq > 0:
            callbacks.append(AgentCheckpointCallback(max(rl.checkpoint.freq // rl.n_envs, 1), ckpt_dir,
                                                     name_prefix="rl_agent"))
        if run.active:
            callbacks.append(run.sb3_callback())

        remaining = max(rl.total_timesteps - int(model.num_timesteps), 0)
        if remaining:
            model.learn(total_timesteps=remaining, callback=CallbackList(callbacks), progress_bar=rl.progress_bar,
                        reset_num_timesteps=not rl.resume)
        final = save_agent(model, ckpt_dir / "rl_agent_final")

        # --- export ---
        history = evaluator.history
        chosen = history[-1] if history else None
        if rl.export.which == "best" and history and evaluator.best_saved:  # this run's best, not a stale file
            restore_agent(model, *read_agent_checkpoint(evaluator.best_path), source=evaluator.best_path,
                          weights_only=True)
            chosen = max(history, key=lambda e: e["score"])
        metrics = None if chosen is None else {"timesteps": chosen["timesteps"], "eval_score": chosen["score"],
                                                "eval": chosen["budgets"]}
        source = {"kind": "rl", "algo": rl.algo, "timesteps": int(model.num_timesteps), "which": rl.export.which,
                  "checkpoint": final.name, "seed": rl.seed, "env": _plain(env_kwargs),
                  "warm_start": warm, "eval_budgets": budgets, "eval_split": eval_env.prompts.split,
                  "eval_prompts": len(eval_env.prompts)}
        onnx_path = export_agent(model, tracking.per_job(policy_files(rl.export.path)[0], file=True),
                                 n_layers=eval_env.n_layers, budget_conditioned=budget_conditioned, source=source,
                                 metrics=metrics, default_budget=default_budget(settings.budget, rl.export.budget))
        run.log_artifact(list(policy_files(onnx_path)), "rl_agent", metadata=read_manifest(onnx_path))
        result = {"policy": str(onnx_path), "checkpoint": str(final), "timesteps": int(model.num_timesteps),
                  "stopped_by_time_limit": time_limit.stopped_early,
                  "budget_conditioned": budget_conditioned, "eval": history, "exported_eval": metrics,
                  "seconds": time.perf_counter() - started, "wandb_dir": run.directory}
        (output_dir / "rl_result.json").write_text(json.dumps(result, indent=2, default=str))
        log.info("RL agent exported to %s (%d timesteps, %.0fs)", onnx_path, model.num_timesteps, result["seconds"])
        return result
    finally:
        venv.close()
        run.finish()
        if started_ray:
            _shutdown_ray()


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


def default_budget(env_budget: Any, chosen: float | None) -> float | None:
    """The exported agent's budget when generate() is given none: rl.export.budget, else the most generous budget
    it trained with (the top of rl.env.budget's range); None for an agent trained without budgets."""
    if env_budget is None:
        return None
    if chosen is not None:
        return float(chosen)
    return float(max(env_budget)) if isinstance(env_budget, (list, tuple)) else float(env_budget)


def _plain(kwargs: dict[str, Any]) -> dict[str, Any]:
    """env kwargs as loggable values (objects such as a model or prompt lists summarised, paths made portable)."""
    out = {}
    for key, value in kwargs.items():
        if key.endswith("_path") and isinstance(value, str):
            out[key] = tracking.portable_path(value)
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            out[key] = list(value)
        else:
            out[key] = type(value).__name__
    return out


def run(cfg: RootConfig) -> dict[str, Any]:
    """`python train.py mode=rl`: the env group's settings with rl.env on top, the rl group, the logger group."""
    env_kwargs = {**cfg.env.settings(), **cfg.rl.env}
    return train_agent(cfg.rl, env_kwargs, cfg.paths.output, logger=cfg.logger, run_config=cfg, ray=cfg.ray)

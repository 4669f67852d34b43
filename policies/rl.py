"""The RL reuse agent (`python train.py mode=rl`): Stable-Baselines3 on `BlockReuseEnv`, exported like the predictor.

    python train.py mode=rl                                  # PPO, binary, budget-conditioned, ~20 min; starts
                                                             #   from the exported predictor (rl.warm_start=auto)
    python train.py mode=rl rl.env.action_mode=depth         # refresh depth per block (MultiDiscrete)
    python train.py mode=rl rl.algo=a2c rl.n_envs=4
    python train.py mode=rl rl.warm_start=runs/supervised/mlp/best.ckpt   # start from a supervised checkpoint
    python train.py mode=rl rl.warm_start=null               # from scratch (collapses to "never" on the built-in)
    python train.py mode=rl rl.resume=outputs/.../checkpoints/rl_agent_8192_steps.zip
    python train.py -m mode=rl rl.seed=0,1                   # Hydra multirun: one W&B run per job

One function does the job top to bottom (`train_agent`): vectorised envs (`make_vec_env` with `SubprocVecEnv`),
the per-block actor-critic (`policies.rl_policy`), callbacks (episode metrics, evaluation of the exported policy on
validation prompts across budgets, checkpoints, W&B), `learn`, then the export of the deterministic policy through
`policies.export.export_onnx` (output `action_logits`) to `checkpoints/policies/rl_agent.{onnx,json}`.

Budget conditioning: with `rl.env.budget: [low, high]` every episode draws its FLOP budget from that range; the agent
reads it in the global feature `budget` (and `compute_spent`), is penalised for overshooting it at the episode's
end, and the manifest says `budget_conditioned: true`, so `generate(..., policy=<onnx>, budget=b)` serves any b.

Checkpoints and `rl.resume`: SB3 saves zips that contain pickles, and unpickling runs code. This module therefore
only loads zips it wrote itself: every save writes `<name>.provenance.json` with the zip's sha256, and `load_agent`
refuses a zip without one or whose hash differs. Never resume from a zip obtained elsewhere; the deployable artifact
is the ONNX file + JSON manifest, which holds no code.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cache_core.features import SCHEMA_ID
from policies.rl_callbacks import (
    EpisodeMetricsCallback,
    GenerationEvalCallback,
    ProvenanceCheckpointCallback,
    TimeLimitCallback,
    WandbOutputFormat,
    check_provenance,
    save_agent,
)
from policies.rl_policy import ACTIVATIONS, ExportedActor, PerBlockActorCriticPolicy

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "conf" / "rl" / "ppo.yaml"

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
VEC_ENVS = ("subproc", "dummy")
EXPORT_WHICH = ("best", "last")


# --- configuration ---------------------------------------------------------------------------------------------------
def resolve_algo(name: str, action_mode: str) -> type:
    """The SB3 algorithm class for `rl.algo`, refused with a clear message when it cannot drive this env."""
    from stable_baselines3 import A2C, PPO

    key = str(name).lower()
    if action_mode not in ACTION_SPACE_OF_MODE:
        raise ValueError(f"unknown action_mode {action_mode!r}; use one of {list(ACTION_SPACE_OF_MODE)}")
    space = ACTION_SPACE_OF_MODE[action_mode]
    usable = [a for a, s in ALGO_ACTION_SPACES.items() if space in s]
    if key not in ALGO_ACTION_SPACES:
        raise ValueError(f"unknown rl.algo {name!r}; choose one of {usable} (SB3 algorithms that support "
                         f"{space} actions)")
    if space not in ALGO_ACTION_SPACES[key]:
        raise ValueError(f"rl.algo={name!r} does not support {space} action spaces (action_mode={action_mode!r}); it "
                         f"only handles {'/'.join(ALGO_ACTION_SPACES[key])}. Use one of {usable}")
    return {"ppo": PPO, "a2c": A2C}[key]


def rl_config(cfg: DictConfig) -> DictConfig:
    """cfg.rl, or conf/rl/ppo.yaml when the root config does not list the `rl` group."""
    if "rl" in cfg and cfg.rl is not None:
        return cfg.rl
    log.warning("config has no 'rl' group; reading %s (add `- optional rl: ppo` to conf/config.yaml)", DEFAULT_CONFIG)
    merged = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    merged.rl = OmegaConf.load(DEFAULT_CONFIG)
    return merged.rl


def validate_settings(s: dict[str, Any]) -> None:
    """Refuse bad `rl.*` settings before any process or model is started."""
    if int(s.get("n_envs", 1)) < 1:
        raise ValueError(f"rl.n_envs must be >= 1, got {s.get('n_envs')}")
    if int(s.get("total_timesteps", 1)) < 1:
        raise ValueError(f"rl.total_timesteps must be >= 1, got {s.get('total_timesteps')}")
    if s.get("max_minutes") is not None and float(s["max_minutes"]) <= 0:
        raise ValueError(f"rl.max_minutes must be > 0 (or null = no limit), got {s['max_minutes']}")
    if s.get("vec_env", "subproc") not in VEC_ENVS:
        raise ValueError(f"rl.vec_env={s.get('vec_env')!r}; use one of {list(VEC_ENVS)}")
    resolve_algo(s.get("algo", "ppo"), (s.get("env") or {}).get("action_mode", "binary"))
    ev = s.get("eval") or {}
    for b in ev.get("budgets") or []:
        if b is not None and not 0.0 < float(b) <= 1.0:
            raise ValueError(f"rl.eval.budgets: {b} must lie in (0, 1] (or null = unconditioned)")
    budget = (s.get("export") or {}).get("budget")
    if budget is not None and not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"rl.export.budget={budget} must lie in (0, 1] (or null = the top of rl.env.budget)")
    if (s.get("export") or {}).get("which", "best") not in EXPORT_WHICH:
        raise ValueError(f"rl.export.which must be one of {list(EXPORT_WHICH)}")
    if s.get("warm_start") not in (None, "auto") and s.get("resume"):
        raise ValueError("rl.warm_start and rl.resume are exclusive: a resumed run already has trained weights")
    activation = (s.get("policy") or {}).get("activation", "relu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"rl.policy.activation={activation!r}; use one of {sorted(ACTIVATIONS)}")


def env_kwargs_from(cfg: DictConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """BlockReuseEnv keyword arguments: cfg.env (without `_target_`) overridden by rl.env."""
    if "env" not in cfg or cfg.env is None:
        raise KeyError("config has no 'env' group; expected conf/env/default.yaml "
                       "(defaults: `- optional env: default`)")
    kwargs = OmegaConf.to_container(cfg.env, resolve=True)
    kwargs.pop("_target_", None)
    kwargs.update(settings.get("env") or {})
    return kwargs


# --- the agent -------------------------------------------------------------------------------------------------------
def policy_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    p = settings.get("policy") or {}
    return {
        "features_extractor_kwargs": {"hidden": int(p.get("hidden", 64)), "arch": p.get("arch", "mlp"),
                                      "predictor_kwargs": dict(p.get("predictor_kwargs") or {})},
        "net_arch": dict(p.get("net_arch") or {"pi": [], "vf": [64]}),
        "activation_fn": ACTIVATIONS[p.get("activation", "relu")],
        "ortho_init": bool(p.get("ortho_init", True)),
        "init_refresh_prob": None if p.get("init_refresh_prob") is None else float(p["init_refresh_prob"]),
    }


def algo_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """The shared `rl.hyperparams` plus the algorithm's own section (`rl.ppo`, `rl.a2c`)."""
    algo = str(settings.get("algo", "ppo")).lower()
    return {**(settings.get("hyperparams") or {}), **(settings.get(algo) or {})}


def build_agent(algo: str, venv: Any, settings: dict[str, Any]) -> Any:
    """A fresh SB3 model of `algo` with the per-block policy on `venv`."""
    cls = resolve_algo(algo, (settings.get("env") or {}).get("action_mode", "binary"))
    kwargs = algo_kwargs(settings)
    try:
        return cls(PerBlockActorCriticPolicy, venv, policy_kwargs=policy_kwargs(settings),
                   seed=settings.get("seed"), device=settings.get("device", "cpu"),
                   verbose=int(settings.get("verbose", 1)), **kwargs)
    except TypeError as err:
        raise ValueError(f"bad hyperparameters for {cls.__name__}: {sorted(kwargs)} ({err}); fix rl.hyperparams / "
                         f"rl.{algo}") from err


def load_agent(path: str | Path, env: Any = None, device: str = "cpu") -> Any:
    """Load an SB3 zip that this project wrote (checked against its provenance file before unpickling)."""
    record = check_provenance(path)
    algo = str(record.get("algo", "PPO")).lower()
    cls = resolve_algo(algo, record.get("action_mode") or "binary")
    model = cls.load(str(path), env=env, device=device)
    if not isinstance(model.policy, PerBlockActorCriticPolicy):
        raise ValueError(f"{path}: not a blockreuse per-block agent")
    return model


def load_predictor_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The `BlockPredictor` tensors of a supervised checkpoint and what is known about them: a Lightning `.ckpt` of
    `policies.supervised.SupervisedPredictor` (network under `net.`; net config, threshold, budget conditioning from
    its hyperparameters) or a plain state dict (`.pt`, `.safetensors`). Read with `torch.load(weights_only=True)`,
    which restores tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rl.warm_start={path}: no such file (the supervised predictor's checkpoint, e.g. "
                                "checkpoints/policies/supervised/best.ckpt)")
    header: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:  # one read: the header and the tensors
                header = dict(f.metadata() or {})
                raw: Any = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
            raise ValueError(f"rl.warm_start={path}: not a readable safetensors file ({err})") from err
        if header.get("schema_id") not in (None, SCHEMA_ID):
            raise ValueError(f"rl.warm_start={path}: built for feature schema {header['schema_id']!r}, this code "
                             f"computes {SCHEMA_ID!r}; retrain the predictor (python train.py) and warm-start from it")
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  (unpickling errors come in many types)
            raise ValueError(f"rl.warm_start={path}: not loadable with torch.load(weights_only=True) ({err})") from err
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"rl.warm_start={path}: expected a state dict or a Lightning checkpoint")
    anchor = "embed.0.weight"  # BlockPredictor's first layer: its key gives the prefix the network was saved under
    prefixes = [k[: -len(anchor)] for k in state if k.endswith(anchor)]
    if not prefixes:
        raise ValueError(f"rl.warm_start={path}: no BlockPredictor weights in it (no key ending in {anchor!r})")
    prefix = min(prefixes, key=len)
    tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and torch.is_tensor(v)}
    if header:  # an exported predictor's weights (policies.export.write_weights): the facts are in the header
        meta = {"net_config": json.loads(header.get("net_config") or "{}"),
                "threshold": float(header.get("threshold", 0.5)),
                "budget_conditioned": json.loads(header.get("budget_conditioned", "false")),
                "action_mode": header.get("action_mode")}
        return tensors, meta
    hp = dict(raw.get("hyper_parameters") or {}) if isinstance(raw, dict) else {}
    extra = raw.get("blockreuse") if isinstance(raw, dict) else None
    meta = {"net_config": dict((extra or {}).get("net_config") or {}), "threshold": float(hp.get("threshold", 0.5)),
            "budget_conditioned": bool(hp.get("budget_conditioned", False)), "action_mode": hp.get("action_mode")}
    return tensors, meta


def resolve_warm_start(settings: dict[str, Any], action_mode: str) -> str | None:
    """rl.warm_start as a path or None. `auto` (the default) takes the exported predictor's weights
    (rl.warm_start_auto, written by `mode=export` / the main job) when they exist and fit the action mode, and
    otherwise starts from scratch with a warning saying why; an explicit path must fit (errors say why not)."""
    value = settings.get("warm_start")
    if value is None or str(value).lower() in ("null", "none", ""):
        return None
    if str(value).lower() != "auto":
        return str(value)
    if settings.get("resume"):
        return None  # a resumed agent already has trained weights
    path = Path(str(settings.get("warm_start_auto") or ""))
    if not path.is_file():
        log.warning("rl.warm_start=auto: no exported predictor weights at %s (written by `python train.py` or "
                    "mode=export); the agent starts from scratch, which on the built-in model tends to collapse to "
                    "refreshing nothing: train a predictor first, or set rl.warm_start=PATH", path)
        return None
    meta = load_predictor_checkpoint(path)[1]
    if meta.get("action_mode") not in (None, action_mode):
        log.warning("rl.warm_start=auto: the exported predictor at %s is a %s policy and this agent is %s; starting "
                    "from scratch (train a %s predictor to warm-start it)", path, meta["action_mode"], action_mode,
                    action_mode)
        return None
    log.info("rl.warm_start=auto: starting from the exported predictor %s", path)
    return str(path)


def warm_start_policy_kwargs(settings: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """rl.policy with the supervised network's architecture (hidden, arch, attention layers) where it is known."""
    net = meta.get("net_config") or {}
    policy = dict(settings.get("policy") or {})
    if net:
        policy["hidden"], policy["arch"] = net["hidden"], net["arch"]
        policy["predictor_kwargs"] = {**(policy.get("predictor_kwargs") or {}),
                                      **{k: net[k] for k in ("n_layers_attn", "n_heads", "dropout") if k in net}}
    return {**settings, "policy": policy}


def warm_start(policy: PerBlockActorCriticPolicy, path: str | Path) -> dict[str, Any]:
    """Initialise the extractor's `BlockPredictor` from a supervised predictor checkpoint, and the action head from the
    predictor's output layer when they have the same shape (binary: the refresh logit minus logit(threshold) is the
    Bernoulli logit; depth: the same L + 1 action logits), so that PPO starts from the supervised policy.

    A predictor trained without budget conditioning saw the `budget` input at the constant 1, so its weight column
    acted as a bias. It is folded into the bias and zeroed: the network computes the supervised function at budget 1
    and starts budget-independent, instead of reacting arbitrarily to budgets it never saw."""
    import math

    from cache_core.features import BLOCK_FEATURE_NAMES, GLOBAL_FEATURE_NAMES

    state, meta = load_predictor_checkpoint(path)
    if meta.get("action_mode") not in (None, policy.action_mode):
        raise ValueError(f"rl.warm_start={path}: a {meta['action_mode']} predictor cannot start a "
                         f"{policy.action_mode} agent; set rl.env.action_mode={meta['action_mode']}")
    predictor = policy.features_extractor.predictor
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
            col = len(BLOCK_FEATURE_NAMES) + GLOBAL_FEATURE_NAMES.index("budget")
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
    loaded = {"path": str(path), "tensors": len(body), "head": bool(head_loaded), **meta}
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


# --- W&B -------------------------------------------------------------------------------------------------------------
def wandb_settings(cfg: DictConfig | None, settings: dict[str, Any]) -> dict[str, Any]:
    """The W&B settings of the run: the shared `logger` group (backend, mode, project, entity, group, tags, save_dir)
    when the config has one, overridden by the non-null entries of `rl.wandb`."""
    out: dict[str, Any] = {}
    lcfg = None if cfg is None else cfg.get("logger")
    if lcfg is not None:
        lg = OmegaConf.to_container(lcfg, resolve=True)
        out = {k: lg.get(k) for k in ("mode", "project", "entity", "group", "tags") if lg.get(k) is not None}
        if lg.get("save_dir"):
            out["dir"] = lg["save_dir"]
        if str(lg.get("backend", "wandb")) == "none":
            out["enabled"] = False
    out.update({k: v for k, v in (settings.get("wandb") or {}).items() if v is not None})
    return out


def start_wandb(w: dict[str, Any], config: dict[str, Any], output_dir: Path) -> Any:
    """An offline-by-default W&B run, or None when disabled. Each call starts a new run (and finishes a previous one),
    so every Hydra multirun job logs its own run, named `<name>-<job num>`."""
    mode = w.get("mode") or os.environ.get("WANDB_MODE", "offline")
    if not w.get("enabled", True) or mode == "disabled":
        return None
    if mode not in ("offline", "online"):
        raise ValueError(f"rl.wandb.mode={mode!r}; choose offline (default, no network), online or disabled")
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    name, group = w.get("name"), w.get("group")
    job = _hydra_job()
    if job.get("multirun"):
        name = f"{name or 'rl'}-{job['num']}"
        group = group or Path(str(job["sweep_dir"])).name
    directory = Path(w.get("dir") or output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=w.get("project", "blockreuse"), entity=w.get("entity"), group=group, name=name,
                     tags=list(w.get("tags") or []), job_type="rl", dir=str(directory), mode=mode, config=config,
                     reinit="finish_previous")
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")
    return run


def _hydra_job() -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    h = HydraConfig.get()
    return {"multirun": str(h.mode).endswith("MULTIRUN"), "num": h.job.get("num"), "sweep_dir": h.sweep.dir}


def log_artifact(run: Any, onnx_path: Path, manifest: dict[str, Any]) -> None:
    import wandb

    artifact = wandb.Artifact("rl_agent", type="model", metadata=manifest)
    artifact.add_file(str(onnx_path))
    artifact.add_file(str(onnx_path.with_suffix(".json")))
    run.log_artifact(artifact)


# --- the job ---------------------------------------------------------------------------------------------------------
def train_agent(settings: dict[str, Any], env_kwargs: dict[str, Any], output_dir: str | Path,
                eval_env_kwargs: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                wandb_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume), evaluate and export the RL agent. settings: the `rl` config as a dict; env_kwargs: the
    BlockReuseEnv keyword arguments of the training envs (rl.env already merged in); eval_env_kwargs: those of the
    held-out prompts (default: env_kwargs on rl.eval.split with rl.eval.n_prompts); config: what W&B records as the
    run's config (default: settings and env_kwargs); wandb_cfg: W&B settings (default: rl.wandb)."""

    from stable_baselines3.common.callbacks import CallbackList
    from stable_baselines3.common.logger import configure

    from envs.block_reuse_env import BlockReuseEnv
    from envs.vector import make_sb3_vec_env

    settings = copy.deepcopy(settings)
    settings["env"] = {**(settings.get("env") or {}), "action_mode": env_kwargs.get("action_mode", "binary")}
    validate_settings(settings)
    settings["warm_start"] = resolve_warm_start(settings, settings["env"]["action_mode"])
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if settings.get("torch_threads"):
        torch.set_num_threads(int(settings["torch_threads"]))
    seed = settings.get("seed")
    n_envs = int(settings.get("n_envs", 1))
    algo = str(settings.get("algo", "ppo")).lower()
    ev = settings.get("eval") or {}
    budget_conditioned = env_kwargs.get("budget") is not None
    budgets = list(ev.get("budgets") or []) if budget_conditioned else [None]
    budgets = budgets or [None]

    # Held-out prompts first: a bad eval split fails before worker processes start.
    if eval_env_kwargs is None:
        eval_env_kwargs = {**env_kwargs, "split": ev.get("split", "validation"),
                           "n_prompts": int(ev.get("n_prompts", 32))}
    eval_env_kwargs = {**eval_env_kwargs, "budget": None, "shadow": False, "w_kl": 0.0, "w_flip": 0.0}
    eval_env = BlockReuseEnv(**eval_env_kwargs)

    venv = make_sb3_vec_env(env_kwargs, n_envs, subproc=settings.get("vec_env", "subproc") == "subproc", seed=seed)
    run = None
    try:
        resume = settings.get("resume")
        if resume:
            model = load_agent(resume, env=venv, device=settings.get("device", "cpu"))
            log.info("resumed %s at %d timesteps", resume, model.num_timesteps)
            warm = None
        else:
            if settings.get("warm_start"):
                settings = warm_start_policy_kwargs(settings, load_predictor_checkpoint(settings["warm_start"])[1])
            model = build_agent(algo, venv, settings)
            warm = warm_start(model.policy, settings["warm_start"]) if settings.get("warm_start") else None

        run = start_wandb(wandb_cfg if wandb_cfg is not None else wandb_settings(None, settings),
                          config if config is not None else {"rl": settings, "env": _plain(env_kwargs)}, output_dir)
        logger = configure(str(output_dir / "sb3"), list(settings.get("log_formats") or ["stdout", "csv"]))
        if run is not None:
            logger.output_formats.append(WandbOutputFormat(run))
        model.set_logger(logger)

        ckpt = settings.get("checkpoint") or {}
        ckpt_dir = Path(ckpt.get("dir") or output_dir / "checkpoints")

        def export_for_eval(m: Any, path: Path) -> Path:
            return export_agent(m, path, n_layers=eval_env.n_layers, budget_conditioned=budget_conditioned)

        at_start = bool(settings.get("warm_start")) if ev.get("at_start") is None else bool(ev["at_start"])
        evaluator = GenerationEvalCallback(
            eval_env, export_for_eval, budgets, freq=int(ev.get("freq", 4096)),
            batch_size=int(ev.get("batch_size", 16)),
            flop_weight=float(ev.get("flop_weight", 0.1)), over_weight=float(ev.get("over_weight", 2.0)),
            best_path=ckpt_dir / "rl_agent_best.zip", at_start=at_start)
        time_limit = TimeLimitCallback(settings.get("max_minutes"))
        callbacks = [EpisodeMetricsCallback(), time_limit, evaluator]
        if int(ckpt.get("freq", 0)) > 0:
            callbacks.append(ProvenanceCheckpointCallback(max(int(ckpt["freq"]) // n_envs, 1), str(ckpt_dir),
                                                          name_prefix="rl_agent"))
        if run is not None:
            from wandb.integration.sb3 import WandbCallback

            callbacks.append(WandbCallback(verbose=0))  # the algorithm's hyperparameters into the run's config

        total = int(settings.get("total_timesteps", 1))
        remaining = max(total - int(model.num_timesteps), 0)
        if remaining:
            model.learn(total_timesteps=remaining, callback=CallbackList(callbacks),
                        progress_bar=bool(settings.get("progress_bar", True)), reset_num_timesteps=not resume)
        final_zip = save_agent(model, ckpt_dir / "rl_agent_final.zip")

        # --- export ---
        ex = settings.get("export") or {}
        which = ex.get("which", "best")
        history = evaluator.history
        chosen = history[-1] if history else None
        if which == "best" and evaluator.best_path is not None and evaluator.best_path.exists():
            best = load_agent(evaluator.best_path, device=settings.get("device", "cpu"))
            model.policy.load_state_dict(best.policy.state_dict())
            chosen = max(history, key=lambda e: e["score"])
        metrics = None if chosen is None else {"timesteps": chosen["timesteps"], "eval_score": chosen["score"],
                                                "eval": chosen["budgets"]}
        source = {"kind": "rl", "algo": algo, "timesteps": int(model.num_timesteps), "which": which,
                  "checkpoint": str(final_zip), "seed": seed, "env": _plain(env_kwargs),
                  "warm_start": warm, "eval_budgets": budgets, "eval_split": eval_env.prompts.split,
                  "eval_prompts": len(eval_env.prompts)}
        onnx_path = export_agent(model, export_path(ex.get("path") or output_dir / "rl_agent.onnx"),
                                 n_layers=eval_env.n_layers,
                                 budget_conditioned=budget_conditioned, source=source, metrics=metrics,
                                 default_budget=default_budget(env_kwargs.get("budget"), ex.get("budget")))
        manifest = json.loads(Path(onnx_path).with_suffix(".json").read_text())
        if run is not None:
            log_artifact(run, Path(onnx_path), manifest)
        result = {"policy": str(onnx_path), "checkpoint": str(final_zip), "timesteps": int(model.num_timesteps),
                  "stopped_by_time_limit": time_limit.stopped_early,
                  "budget_conditioned": budget_conditioned, "eval": history, "exported_eval": metrics,
                  "seconds": time.perf_counter() - started,
                  "wandb_dir": None if run is None else str(Path(run.dir).parent)}
        (output_dir / "rl_result.json").write_text(json.dumps(result, indent=2, default=str))
        log.info("RL agent exported to %s (%d timesteps, %.0fs)", onnx_path, model.num_timesteps, result["seconds"])
        return result
    finally:
        venv.close()
        if run is not None:
            run.finish()


def default_budget(env_budget: Any, chosen: float | None) -> float | None:
    """The exported agent's budget when generate() is given none: rl.export.budget, else the most generous budget
    it trained with (the top of rl.env.budget's range); None for an agent trained without budgets."""
    if env_budget is None:
        return None
    if chosen is not None:
        return float(chosen)
    return float(max(env_budget)) if isinstance(env_budget, (list, tuple)) else float(env_budget)


def export_path(path: str | Path) -> Path:
    """rl.export.path; in a Hydra multirun `<stem>_job<num>.onnx`, so that jobs do not overwrite each other's agent."""
    path = Path(path).with_suffix(".onnx")
    job = _hydra_job()
    if job.get("multirun"):
        path = path.with_name(f"{path.stem}_job{job['num']}.onnx")
        log.info("multirun job %s exports to %s", job["num"], path)
    return path


def _plain(kwargs: dict[str, Any]) -> dict[str, Any]:
    """env kwargs as loggable values (objects such as a model or prompt lists summarised)."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            out[key] = list(value)
        else:
            out[key] = type(value).__name__
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    """`python train.py mode=rl`: settings from cfg.rl, the env from cfg.env with cfg.rl.env on top."""
    rl = rl_config(cfg)
    settings = OmegaConf.to_container(rl, resolve=True)
    env_kwargs = env_kwargs_from(cfg, settings)
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001  (outside a Hydra run `${hydra:...}` does not resolve)
        config = OmegaConf.to_container(cfg, resolve=False)
    output = settings.get("output_dir") or OmegaConf.select(cfg, "paths.output")
    return train_agent(settings, env_kwargs, output, config=config, wandb_cfg=wandb_settings(cfg, settings))

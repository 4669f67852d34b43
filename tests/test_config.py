"""The Hydra configs compose and are typed, train.py explains itself, and the engine stays free of frameworks."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import compose_cfg
from hydra.errors import ConfigCompositionException

import train
from policies.config import SCHEMAS, RootConfig, compose

ROOT = Path(__file__).resolve().parents[1]
ENGINE_MODULES = ["cache_core", "cache_core.actions", "cache_core.accounting", "cache_core.cache",
                  "cache_core.checkpoint", "cache_core.features", "cache_core.generate", "cache_core.heuristics",
                  "cache_core.learned", "cache_core.models", "cache_core.models.base", "cache_core.models.llada",
                  "cache_core.models.hf_layout", "cache_core.models.dream", "cache_core.models.llada_moe",
                  "cache_core.models.layers", "cache_core.partition", "cache_core.monitor", "cache_core.memory",
                  "cache_core.oracle", "cache_core.policy", "cache_core.registry", "cache_core.runtime",
                  "cache_core.session", "cache_core.tokenizer", "cache_core.validate", "cache_core.__main__",
                  "cache_core.models.dit", "cache_core.image", "cache_core.image.cache", "cache_core.image.data",
                  "cache_core.image.features", "cache_core.image.heuristics", "cache_core.image.metrics",
                  "cache_core.image.router", "cache_core.image.sample", "cache_core.image.session"]
FRAMEWORKS = ("lightning", "pytorch_lightning", "stable_baselines3", "wandb", "hydra", "omegaconf", "matplotlib")


def test_the_engine_imports_no_training_tracking_or_config_framework():
    # Building a tokenizer imports transformers: that must not pull a framework in either.
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {ENGINE_MODULES!r}];"
            "from cache_core import Tokenizer; Tokenizer().encode('a');"
            f"bad = [m for m in {FRAMEWORKS!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    # and every engine module was listed: a new engine file joins this check
    listed = {m.rsplit(".", 1)[-1] for m in ENGINE_MODULES}
    on_disk = {p.stem for folder in ("cache_core", "cache_core/models", "cache_core/image")
               for p in (ROOT / folder).glob("*.py")}
    assert on_disk - {"__init__"} <= listed | {"__init__"}, on_disk - listed


@pytest.mark.parametrize("mode", ["main", *train.MODES])
def test_config_composes_and_types_for_every_mode(tmp_path, mode):
    cfg = compose_cfg(tmp_path, f"mode={mode}")
    assert isinstance(cfg, RootConfig) and cfg.mode == mode
    assert cfg.generation.gen_length % cfg.generation.block_length == 0
    for group, schema in SCHEMAS.items():
        assert isinstance(getattr(cfg, group), schema), group
    assert Path(cfg.paths.root) == ROOT  # the repository, whatever the working directory


@pytest.mark.parametrize("override, message", [
    ("evaluate.n_examples=-3", "evaluate.n_examples=-3 must be >= 1"),
    ("env.w_kl=nan", "env.w_kl=nan must be finite"),
    ("rl.n_envs=0", "rl.n_envs=0 must be >= 1"),
    ("threads=0", "threads=0 must be >= 1"),
    ("generation.steps=5", "generation: steps=5 must be a positive multiple"),
    ("policy.action_mode=ternary", "policy.action_mode='ternary'"),
    ("task.tasks=[repeat,nope]", "task.tasks='nope'"),
    ("benchmark.batch_sizes=[]", "benchmark.batch_sizes must not be empty"),
    ("evaluate.heuristics=[dual_cache,nope]", "evaluate.heuristics[1]='nope' is not a policy"),
    ("rl.env.w_kl=abc", "rl.env (on top of the env group): env.w_kl='abc' must be a number"),
    ("rl.env.budget=[0.6,0.1]", "rl.env (on top of the env group): env.budget range [0.6, 0.1] has low > high"),
    ("collect.split=bogus", "collect.split='bogus'"),
])
def test_a_bad_value_names_its_key(tmp_path, override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compose_cfg(tmp_path, override)


def test_a_bad_type_names_its_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["evaluate.n_examples=abc"])
    assert "evaluate.n_examples" in str(err.value) + str(err.value.__cause__)


def test_groups_are_required_with_their_defaults_in_yaml():
    """Every group is in the defaults list (no `optional`), and its YAML extends the group's typed schema."""
    defaults = (ROOT / "conf" / "config.yaml").read_text()
    assert "optional" not in defaults
    for group in SCHEMAS:
        files = list((ROOT / "conf" / group).glob("*.yaml"))
        assert files, group
        assert any("- schema" in f.read_text() for f in files), f"conf/{group}/ does not extend its schema"


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode='nope'; choose one of"):
        compose_cfg(tmp_path, "mode=nope")
    cfg = compose_cfg(tmp_path)
    with pytest.raises(ValueError, match="unknown mode 'nope'"):
        train.run_mode("nope", cfg)


def test_help_lists_every_mode():
    result = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for mode in ["main", *train.MODES]:
        assert any(line.strip().startswith(mode + " ") for line in lines), f"--help does not list mode {mode}"


def test_train_py_refuses_a_bad_value_before_any_job(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "mode=evaluate", "evaluate.n_examples=-3",
                             f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert "evaluate.n_examples=-3 must be >= 1" in result.stderr


def test_tracked_files_speak_only_of_what_a_clone_contains():
    """No code, test, config or README points at the developers' shared folder, which a user's clone lacks."""
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    needles = ("../" + "shared", "shared/" + "REFERENCE", "shared/" + "DESIGN")  # split: this file must not match
    offenders = [f for f in files if (ROOT / f).suffix in (".py", ".md", ".yaml", ".toml", "") and (ROOT / f).is_file()
                 and any(n in (ROOT / f).read_text(errors="ignore") for n in needles)]
    assert not offenders, offenders

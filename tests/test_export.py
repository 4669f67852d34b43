"""Export to the deployable format: the file decides exactly as the network, loads through generate(), and is refused
under another feature schema."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cache_core.features import (
    N_BLOCK_FEATURES,
    N_GLOBAL_FEATURES,
    SCHEMA_ID,
    TEXT_SCHEMA,
    TEXT_SCHEMA_V1,
    StepFeatures,
    projectable,
)
from cache_core.generate import generate
from cache_core.learned import LearnedPolicy, PolicyFileError, load_policy
from cache_core.policy import ReusePolicy
from envs.testing import random_pairs, tiny_model
from policies.export import export_onnx, policy_paths
from policies.predictor import BlockPredictor, TorchPolicy

N_LAYERS = 2
GEN = dict(gen_length=16, block_length=4, steps=8)


class Recorder(ReusePolicy):
    """Runs another policy and keeps every step's features (real-shaped inputs from a real session)."""

    uses_features = True

    def __init__(self, inner: ReusePolicy):
        self.inner, self.seen = inner, []

    def plan(self, features, ctx):
        self.seen.append(StepFeatures(features.blocks.clone(), features.global_.clone()))
        return self.inner.plan(features, ctx)


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=N_LAYERS)


@pytest.fixture(scope="module")
def real_features(model):
    """Features of batched generations (prompts of different lengths -> pure-padding blocks in some rows)."""
    prompts = [p for p, _ in random_pairs(n=4, seed=1, min_length=2, max_length=13)]
    recorder = Recorder(TorchPolicy(BlockPredictor(n_outputs=1)))
    generate(model, prompts, policy=recorder, **GEN)
    return recorder.seen


def _random_features(seed: int, B: int = 3, nb: int = 9) -> StepFeatures:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(B, nb, N_BLOCK_FEATURES, generator=g)
    blocks[..., 0] = 2 * blocks[..., 0] - 1
    return StepFeatures(blocks, torch.rand(B, N_GLOBAL_FEATURES, generator=g))


CASES = [("mlp", "binary", "refresh_logit", 1), ("transformer", "binary", "refresh_logit", 1),
         ("mlp", "depth", "action_logits", N_LAYERS + 1), ("transformer", "depth", "action_logits", N_LAYERS + 1),
         ("mlp", "binary", "action_logits", 2)]


@pytest.mark.parametrize("arch,action_mode,output,n_outputs", CASES)
def test_exported_file_makes_the_same_decisions(tmp_path, real_features, arch, action_mode, output, n_outputs):
    torch.manual_seed(0)
    net = BlockPredictor(hidden=32, arch=arch, n_outputs=n_outputs, n_layers_attn=2)
    inputs = [*real_features, *(_random_features(s) for s in range(5))]
    # Centre and spread the random outputs so that decisions vary across blocks (a random init is nearly constant).
    with torch.no_grad():
        net.head.weight.mul_(10.0)
        outs = torch.cat([net(f.policy_input()).reshape(-1, n_outputs) for f in inputs])
        net.head.bias.sub_(outs.mean(0))
    path = export_onnx(net, tmp_path / "p", action_mode=action_mode, output=output, n_layers=N_LAYERS,
                       source={"test": True}, metrics={"val/ap": 0.5})
    assert path == tmp_path / "p.onnx" and (tmp_path / "p.json").is_file()
    manifest = json.loads((tmp_path / "p.json").read_text())
    assert manifest["schema_id"] == SCHEMA_ID and manifest["format"] == "blockreuse-policy"
    assert manifest["action_mode"] == action_mode and manifest["output"] == output and manifest["n_layers"] == N_LAYERS
    ctx = SimpleNamespace(n_layers=N_LAYERS)
    assert any(bool((f.blocks[..., -1] == 0).any()) for f in real_features), "want pure-padding blocks too"
    thresholds = (0.3, 0.5, 0.7) if output == "refresh_logit" else (0.5,)
    decided = set()
    for t in thresholds:
        deployed = LearnedPolicy(path, refresh_threshold=t)
        live = TorchPolicy(net, action_mode, output, refresh_threshold=t)
        for f in inputs:
            a = deployed.plan(f, ctx).start_layer
            b = live.plan(f, ctx).start_layer
            assert torch.equal(a, b)
            decided |= set(a.flatten().tolist())
    assert len(decided) > 1, "decisions should not be constant"


def test_generate_runs_the_exported_file(tmp_path, model):
    torch.manual_seed(1)
    net = BlockPredictor(hidden=16, arch="transformer")
    path = export_onnx(net, tmp_path / "predictor.onnx", action_mode="binary", output="refresh_logit",
                       n_layers=N_LAYERS, threshold=0.5)
    prompts = [p for p, _ in random_pairs(n=3, seed=2)]
    live = generate(model, prompts, policy=TorchPolicy(net), **GEN)
    for policy in (str(path), tmp_path / "predictor.json", load_policy(path)):
        out = generate(model, prompts, policy=policy, **GEN)
        assert torch.equal(out.tokens, live.tokens)
        assert out.stats.flops == live.stats.flops
    knobbed = generate(model, prompts, policy=str(path), refresh_threshold=1.0, **GEN)  # refresh only what must be
    assert knobbed.stats.flop_fraction <= live.stats.flop_fraction


def test_budget_conditioned_file_runs_at_its_default_budget(tmp_path, model):
    """A budget-conditioned policy given no budget runs at its manifest's default_budget, not at budget 1."""
    class BudgetNet(torch.nn.Module):  # refresh every block above budget 0.5, none below
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 20.0 * (x[..., TEXT_SCHEMA.input_index("budget")] - 0.5)

    net = BudgetNet()
    path = export_onnx(net, tmp_path / "p.onnx", action_mode="binary", output="refresh_logit", n_layers=N_LAYERS,
                       budget_conditioned=True, default_budget=0.3)
    policy = LearnedPolicy(path)
    assert policy.default_budget == 0.3 and policy.describe()["default_budget"] == 0.3
    prompts = [p for p, _ in random_pairs(n=3, seed=4)]
    plain = generate(model, prompts, policy=str(path), **GEN)
    at_default = generate(model, prompts, policy=str(path), budget=0.3, **GEN)
    at_one = generate(model, prompts, policy=str(path), budget=1.0, **GEN)
    assert plain.stats.flops == at_default.stats.flops and torch.equal(plain.tokens, at_default.tokens)
    assert at_one.stats.flops != at_default.stats.flops  # the budget does steer this network
    with pytest.raises(ValueError, match="default_budget=0.3 needs a budget-conditioned policy"):
        export_onnx(net, tmp_path / "q", action_mode="binary", output="refresh_logit", n_layers=N_LAYERS,
                    default_budget=0.3)
    manifest = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**manifest, "budget_conditioned": False}))
    with pytest.raises(PolicyFileError, match="default_budget=0.3 needs budget_conditioned=true"):
        LearnedPolicy(path)


def test_other_schema_is_refused(tmp_path):
    path = export_onnx(BlockPredictor(hidden=8), tmp_path / "p", action_mode="binary", output="refresh_logit",
                       n_layers=N_LAYERS)
    manifest = json.loads(path.with_suffix(".json").read_text())
    manifest["schema_id"] = "v0:some,older,columns|progress"
    path.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(PolicyFileError, match="v0:some,older,columns.*retrain") as err:
        load_policy(path)
    assert SCHEMA_ID in str(err.value)


def test_inconsistent_exports_are_refused(tmp_path):
    with pytest.raises(ValueError, match="depth policies export action_logits"):
        export_onnx(BlockPredictor(), tmp_path / "a", action_mode="depth", output="refresh_logit", n_layers=2)
    with pytest.raises(ValueError, match=r"\(B, n_blocks, 3\)"):
        export_onnx(BlockPredictor(n_outputs=5), tmp_path / "b", action_mode="depth", output="action_logits",
                    n_layers=2)
    with pytest.raises(ValueError, match="action_mode='both'"):
        export_onnx(BlockPredictor(), tmp_path / "c", action_mode="both", output="refresh_logit", n_layers=2)
    assert not list(tmp_path.iterdir())
    assert policy_paths("x/p.onnx") == (Path("x/p.onnx"), Path("x/p.json"))


def test_export_mode_ships_a_checkpoint_or_an_exported_file_to_an_explicit_path(tmp_path):
    from helpers import compose_cfg

    from policies import export, supervised
    from policies.data import write_synthetic_shards
    from policies.predictor import read_predictor

    write_synthetic_shards(tmp_path / "shards", episodes=8, steps=6)
    with pytest.raises(ValueError, match="export.source=.*export.path="):
        export.run(compose_cfg(tmp_path, "mode=export"))  # nothing is shipped anywhere by default
    with pytest.raises(FileNotFoundError, match="mode=supervised"):
        export.run(compose_cfg(tmp_path, f"export.source={tmp_path / 'none.ckpt'}", f"export.path={tmp_path / 'p'}"))
    trained = supervised.run(compose_cfg(tmp_path, "trainer.max_epochs=2"))
    assert Path(trained["exported"]) == tmp_path / "out" / "predictor.onnx"  # the run's own export, in its run dir
    ship = tmp_path / "shipped" / "predictor"
    out = export.run(compose_cfg(tmp_path, f"export.source={trained['best_ckpt']}", f"export.path={ship}",
                                 "export.threshold=0.3"))
    manifest = json.loads(Path(out["manifest"]).read_text())
    assert out["source"] == trained["best_ckpt"] and out["onnx"] == str(ship) + ".onnx" and manifest["threshold"] == 0.3
    assert manifest["source"]["kind"] == "supervised" and "val/ap" in manifest["metrics"]
    assert LearnedPolicy(out["onnx"]).refresh_threshold == 0.3
    # the weights for an RL warm start: the trained network's tensors, its config and training threshold
    tensors, meta = read_predictor(out["weights"])
    state = torch.load(trained["best_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    assert tensors.keys() == {k[len("net."):] for k in state if k.startswith("net.")}
    assert all(torch.equal(v, state[f"net.{k}"]) for k, v in tensors.items())
    assert meta["threshold"] == 0.5 and meta["action_mode"] == "binary" and meta["net_config"]["arch"] == "mlp"
    # an exported file of a run (here the supervised run's own) is checked and copied as it is
    copied = export.run(compose_cfg(tmp_path, f"export.source={trained['exported']}",
                                    f"export.path={tmp_path / 'again' / 'p'}"))
    assert Path(copied["onnx"]).read_bytes() == Path(trained["exported"]).read_bytes()
    assert Path(copied["weights"]).is_file()
    with pytest.raises(ValueError, match="shipped as it is"):
        export.run(compose_cfg(tmp_path, f"export.source={trained['exported']}", f"export.path={tmp_path / 'x'}",
                               "export.threshold=0.2"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "p.onnx").write_bytes(b"not onnx")
    (broken / "p.json").write_text(Path(trained["exported"]).with_suffix(".json").read_text())
    with pytest.raises(PolicyFileError, match="corrupt"):
        export.run(compose_cfg(tmp_path, f"export.source={broken / 'p.onnx'}", f"export.path={tmp_path / 'y'}"))
    assert not (tmp_path / "y.onnx").exists()


SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "policies"


def test_shipped_policies_load_and_the_weights_match_the_graph():
    """What ships in checkpoints/policies: both files load under this feature schema, and the predictor's
    .safetensors (the RL warm start) is the network its .onnx runs."""
    from policies.export import _random_features
    from policies.predictor import read_predictor

    for name in ("predictor", "rl_agent"):
        policy = LearnedPolicy(SHIPPED / f"{name}.onnx")
        # The short-regime files predate the setting columns: text schema v1, read out of v2 features.
        assert policy.manifest["schema_id"] == TEXT_SCHEMA_V1.id and projectable(TEXT_SCHEMA, policy.schema)
    for name in ("long_predictor", "long_rl_agent"):
        assert LearnedPolicy(SHIPPED / f"{name}.onnx").manifest["schema_id"] == SCHEMA_ID
    tensors, meta = read_predictor(SHIPPED / "predictor.safetensors")
    net = BlockPredictor(**{**meta["net_config"], "schema_id": meta["schema_id"]}).eval()  # the v1 file's schema
    net.load_state_dict(tensors)
    x = _random_features(4, 7, seed=3, schema=TEXT_SCHEMA_V1)
    with torch.no_grad():
        expected = net(x).numpy()
    got = LearnedPolicy(SHIPPED / "predictor.onnx").scores(SimpleNamespace(policy_input=lambda: x))
    assert got.shape == expected.shape and abs(got - expected).max() < 1e-4

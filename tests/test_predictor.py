"""The block predictor, its labels and data split, and supervised training on synthetic shards (seconds, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import compose_cfg

from cache_core.actions import oracle_actions
from cache_core.features import BLOCK_FEATURE_NAMES, N_BLOCK_FEATURES, N_GLOBAL_FEATURES, TEXT_SCHEMA
from cache_core.oracle import OraclePolicy
from policies.data import (
    BUDGET_COLUMN,
    IS_DECODING,
    ShardDataModule,
    budget_of_epsilon,
    load_rows,
    split_groups,
    write_synthetic_shards,
)
from policies.predictor import BlockPredictor

ROOT = Path(__file__).resolve().parents[1]
F = N_BLOCK_FEATURES + N_GLOBAL_FEATURES
VALID = BLOCK_FEATURE_NAMES.index("valid_fraction")


def features(B: int = 3, nb: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, nb, F, generator=g)
    x[..., VALID] = 0.5 + 0.5 * x[..., VALID]
    return x


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
@pytest.mark.parametrize("n_outputs", [1, 5])
def test_shapes(arch, n_outputs):
    net = BlockPredictor(hidden=16, arch=arch, n_outputs=n_outputs)
    x = features()
    assert net.encode(x).shape == (3, 6, 16)
    assert net(x).shape == ((3, 6) if n_outputs == 1 else (3, 6, n_outputs))
    assert BlockPredictor(**net.config()).config() == net.config()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown predictor arch 'lstm'.*mlp.*transformer"):
        BlockPredictor(arch="lstm")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        BlockPredictor(hidden=10, arch="transformer", n_heads=3)
    width = N_BLOCK_FEATURES + N_GLOBAL_FEATURES
    with pytest.raises(ValueError, match=rf"expects x of shape \(B, n_blocks, {width}\)"):
        BlockPredictor()(torch.zeros(2, 3, 5))


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
def test_ignored_features_do_not_move_the_output(arch):
    net = BlockPredictor(hidden=16, arch=arch, ignore_features=["compute_spent", "budget"]).eval()
    x = features()
    other = x.clone()
    for name in ("compute_spent", "budget"):
        other[..., TEXT_SCHEMA.input_index(name)] = torch.rand(3, 1)
    with torch.no_grad():
        assert torch.equal(net(x), net(other))
        assert not torch.equal(net(x), net(x + 0.1))
    assert BlockPredictor(**net.config()).ignore_features == ("compute_spent", "budget")
    # The weights alone carry it (zero columns, no state-dict buffer): loaded into a plain BlockPredictor (the RL
    # agent's warm start) they compute the same function.
    plain = BlockPredictor(hidden=16, arch=arch).eval()
    plain.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain(other), net(other), atol=1e-6)
    with pytest.raises(ValueError, match="not policy-input columns"):
        BlockPredictor(ignore_features=["colour"])


def test_transformer_ignores_padded_blocks():
    """Left-padded rows (as the env pads) masked out give the same scores as the unpadded input."""
    torch.manual_seed(0)
    net = BlockPredictor(hidden=16, arch="transformer", n_layers_attn=2).eval()
    x = features(2, 5)
    padded = torch.cat([torch.zeros(2, 3, F), x], dim=1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        ref = net(x)
        assert torch.allclose(net(padded, mask)[:, 3:], ref, atol=1e-5)
        # No mask given: real blocks are inferred from valid_fraction > 0 (padding rows are all zero).
        assert torch.allclose(net(padded)[:, 3:], ref, atol=1e-5)
        # Blocks do see each other: changing another block changes a block's score.
        other = x.clone()
        other[:, 0] = 1 - other[:, 0]
        assert not torch.allclose(net(other)[:, 1:], ref[:, 1:])


def test_labels_follow_the_oracle():
    drift = torch.tensor([[0.0, 0.01, 0.2, 0.3],   # layers 2, 3 drifted -> run from layer 1 = top 3 layers
                          [0.5, 0.0, 0.0, 0.0],    # layer 0 (the block's tokens changed) -> all layers
                          [0.01, 0.02, 0.03, 0.04],  # nothing over epsilon -> reuse
                          [0.0, 0.0, 0.0, 0.06],   # last layer only -> run from layer 2 = top 2 layers
                          [0.0, 0.07, 0.0, 0.0]])  # layer 1 -> run from layer 0
    assert oracle_actions(drift, 0.05, "binary").tolist() == [1, 1, 0, 1, 1]
    depth = oracle_actions(drift, 0.05, "depth")
    assert depth.tolist() == [3, 4, 0, 2, 4]
    # Read as cache_core.learned reads actions: start layer = n_layers - action, one below the first drifted layer.
    over = drift > 0.05
    first = torch.where(over.any(-1), over.float().argmax(-1), 4)
    assert (4 - depth).tolist() == [1, 0, 4, 2, 0] and ((4 - depth) <= first).all()
    # Per-row epsilons (budget conditioning).
    assert oracle_actions(drift, torch.tensor([0.5, 0.4, 0.01, 0.1, 0.1]), "binary").tolist() == [0, 1, 1, 0, 0]
    assert OraclePolicy.knob == "epsilon"


def test_depth_refresh_from_the_first_drifted_layer_does_not_fix_it():
    """Why depth labels start one layer below the first drifted layer: a refresh from layer k recomputes layer k's
    K/V from its cached (stale) input, so layer k's drift stays; starting at k - 1 removes it."""
    from cache_core.cache import RefreshPlan
    from cache_core.session import DecodingSession
    from envs.testing import random_pairs, tiny_model

    model = tiny_model(n_layers=3)
    prompt = random_pairs(n=1, seed=3, min_length=8, max_length=8)[0][0]

    def layer_drift(s: DecodingSession, canvas: torch.Tensor, layer: int) -> float:
        """Relative drift of the cached keys of the prompt's blocks from a fresh forward of `canvas`."""
        with torch.no_grad():
            _, keys, _ = model(canvas, s.cache.key_mask, s.cache.positions, return_kv=True)
        prompt = slice(0, s.prompt_region)
        cached, fresh = s.cache.keys[layer][:, :, prompt], keys[layer][:, :, prompt]
        return float((cached - fresh).norm() / fresh.norm())

    drift = {}
    for start in (1, 0):
        s = DecodingSession(model, [prompt], gen_length=8, block_length=4, steps=8)
        s.step(RefreshPlan.refresh_all(1, s.n_blocks))
        for _ in range(2):  # commit tokens while the prompt blocks reuse everything: their K/V drift from layer 1
            s.step(RefreshPlan.reuse_all(1, s.n_blocks, 3))
        canvas = s.canvas.clone()
        before = [layer_drift(s, canvas, layer) for layer in range(3)]
        s.step(RefreshPlan(torch.full((1, s.n_blocks), start)))  # every block from `start` (the canvas it ran on)
        drift[start] = (before, [layer_drift(s, canvas, layer) for layer in range(3)])
    before, after = drift[1]
    assert before[0] < 1e-6 < 1e-3 < before[1]  # the prompt's tokens did not change; layer 1 is the first to drift
    assert after[1] > 0.9 * before[1]  # starting at layer 1 leaves layer 1's drift (its input is the stale cache)
    assert max(drift[0][1]) < 1e-5  # starting one layer below (here layer 0) removes it


def test_rows_masks_and_split(tmp_path):
    directory = write_synthetic_shards(tmp_path / "shards", episodes=10, steps=5, max_blocks=6)
    rows, manifest = load_rows(directory)
    S = 50
    assert rows["x"].shape == (S, 6, F) and rows["drift"].shape == (S, 6, 2) and manifest["n_layers"] == 2
    decoding = rows["x"][..., IS_DECODING] > 0.5
    never = rows["drift"].amax(-1) >= 1e3
    assert not (rows["loss_mask"] & (decoding | never | ~rows["block_mask"])).any()
    assert rows["loss_mask"].sum() > 0 and never.any() and (~rows["block_mask"]).any()
    for group_by in ("episode", "prompt"):
        train, val = split_groups(rows[group_by], 0.3, seed=0)
        assert len(train) + len(val) == S and len(val) > 0
        assert not set(rows["episode"][train].tolist()) & set(rows["episode"][val].tolist())
        assert not set(rows[group_by][train].tolist()) & set(rows[group_by][val].tolist())
    dm = ShardDataModule(directory, batch_size=8, val_fraction=0.2).prepare()
    x, block_mask, loss_mask, drift = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (6, F) and drift.shape[1:] == (6, 2)
    budgets = budget_of_epsilon(rows["drift"], rows["x"], rows["loss_mask"], rows["block_mask"], [0.01, 0.05, 0.2])
    assert budgets[0] >= budgets[1] >= budgets[2] and 0 < budgets[2] and budgets[0] <= 1


def test_missing_shards_and_bad_config(tmp_path):
    from policies.supervised import run

    with pytest.raises(FileNotFoundError, match="mode=collect"):
        run(compose_cfg(tmp_path))
    write_synthetic_shards(tmp_path / "shards")
    with pytest.raises(ValueError, match="policy.arch='rnn'; choose one of"):
        run(compose_cfg(tmp_path, "policy.arch=rnn"))
    with pytest.raises(ValueError, match=r"policy.epsilon=0.0 must be > 0"):
        run(compose_cfg(tmp_path, "policy.epsilon=0.0"))
    with pytest.raises(ValueError, match="policy.action_mode"):
        run(compose_cfg(tmp_path, "policy.action_mode=ternary"))
    with pytest.raises(ValueError, match="data.group_by"):
        run(compose_cfg(tmp_path, "data.group_by=step"))


def test_supervised_learns_checkpoints_and_resumes(tmp_path):
    from policies.supervised import run

    write_synthetic_shards(tmp_path / "shards", episodes=16, steps=8)
    result = run(compose_cfg(tmp_path, "trainer.max_epochs=4"))
    assert Path(result["best_ckpt"]).is_file() and Path(result["last_ckpt"]).is_file()
    assert result["metrics"]["val/auroc"] > 0.85, result["metrics"]
    assert Path(result["exported"]).is_file()  # the run's own export (logged as a W&B artifact when logging)
    ckpt = torch.load(result["last_ckpt"], weights_only=True)  # plain tensors and containers (the RL warm start)
    ignored = [N_BLOCK_FEATURES + 3, N_BLOCK_FEATURES + 4]  # compute_spent (config) and budget (not conditioned)
    assert not ckpt["state_dict"]["net.embed.0.weight"][:, ignored].any()
    step = ckpt["global_step"]
    earlier = tmp_path / "earlier.ckpt"  # the next run writes into the same run directory
    earlier.write_bytes(Path(result["last_ckpt"]).read_bytes())
    resumed = run(compose_cfg(tmp_path, "trainer.max_epochs=6", f"policy.resume={earlier}"))
    assert torch.load(resumed["last_ckpt"], weights_only=True)["global_step"] > step
    assert torch.load(resumed["last_ckpt"], weights_only=True)["epoch"] == 5
    with pytest.raises(ValueError, match="policy.resume=.*nope.ckpt does not exist"):
        run(compose_cfg(tmp_path, f"policy.resume={tmp_path / 'nope.ckpt'}"))


def test_last_checkpoint_every_epoch_and_tiny_data_said(tmp_path, caplog):
    """last.ckpt is written at every epoch's end, not only when val/ap improves (here it cannot: lr ~ 0), so a kill
    loses at most one epoch; a data set too small to split or to fill a batch is said so."""
    from policies.supervised import run

    write_synthetic_shards(tmp_path / "shards", episodes=8, steps=6)
    result = run(compose_cfg(tmp_path, "trainer.max_epochs=3", "policy.lr=1e-12"))
    assert torch.load(result["best_ckpt"], weights_only=True)["epoch"] == 0  # val/ap never improved after epoch 0
    assert torch.load(result["last_ckpt"], weights_only=True)["epoch"] == 2
    write_synthetic_shards(tmp_path / "one", episodes=1, steps=6)
    with caplog.at_level("WARNING", logger="policies.supervised"):
        run(compose_cfg(tmp_path, f"data.shards_dir={tmp_path / 'one'}", "trainer.max_epochs=1"))
    assert "too few for a validation split" in caplog.text and "fewer than one batch" in caplog.text
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(Path(result["last_ckpt"]).read_bytes()[:300])
    with pytest.raises(ValueError, match="broken.ckpt: not loadable"):
        run(compose_cfg(tmp_path, f"policy.resume={broken}"))


@pytest.mark.parametrize("variant", ["transformer-depth", "budget"])
def test_variants_train(tmp_path, variant):
    from policies.supervised import SupervisedPredictor, run

    write_synthetic_shards(tmp_path / "shards", episodes=10, steps=6)
    if variant == "transformer-depth":
        overrides = ["policy=transformer", "policy.action_mode=depth"]
    else:  # with the generation check at a budget: the live predictor reads it, the no-cache reference does not
        from envs.testing import save_tiny_checkpoint

        model = save_tiny_checkpoint(tmp_path / "tiny")
        overrides = ["policy.budget_conditioned=true", "policy.budget_epsilons=[0.02,0.05,0.1]",
                     f"paths.model={model}", "policy.generation_check.enabled=true",
                     "policy.generation_check.budget=0.3", "policy.generation_check.n_prompts=2",
                     "generation.gen_length=16", "generation.block_length=8", "generation.steps=4"]
    result = run(compose_cfg(tmp_path, "trainer.max_epochs=2", *overrides))
    module = SupervisedPredictor.load_from_checkpoint(result["best_ckpt"], map_location="cpu")
    if variant == "budget":
        hp = module.hparams
        assert hp.budget_conditioned and hp.budgets[0] >= hp.budgets[1] >= hp.budgets[2]
        x = torch.rand(2, 4, F)
        x0, eps = module._condition(x, train=True)
        assert set(x0[..., BUDGET_COLUMN].flatten().tolist()) <= {float(torch.tensor(b)) for b in hp.budgets}
        # the live policy (generation checks) and the exported file run at the same budget when given none
        assert hp.nominal_budget < 1.0 and module.policy().default_budget == pytest.approx(hp.nominal_budget)
        exported = json.loads(Path(result["exported"]).with_suffix(".json").read_text())
        assert exported["default_budget"] == pytest.approx(hp.nominal_budget)
    else:
        assert module.net.arch == "transformer" and module.net.n_outputs == 3 and module.output == "action_logits"


@pytest.mark.slow
def test_ddp_relaunch_shares_the_hydra_run_dir(tmp_path):
    """trainer=ddp on 2 CPU processes (gloo): Lightning re-launches train.py for rank 1 with rank 0's hydra.run.dir;
    one checkpoint directory, one W&B run, one exported file."""
    import subprocess
    import sys

    write_synthetic_shards(tmp_path / "shards", episodes=12, steps=6)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "mode=supervised", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.matmul_precision=null", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
           f"data.shards_dir={tmp_path / 'shards'}", f"policy.checkpoint_dir={tmp_path / 'ckpt'}",
           "policy.generation_check.enabled=false", f"hydra.run.dir={run_dir}", "threads=1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ckpt" / "best.ckpt").is_file() and (run_dir / "predictor.onnx").is_file()
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran inside rank 0's run dir
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # W&B from rank 0 only


def test_ddp_on_two_gloo_processes_matches_one_process(tmp_path):
    """trainer=ddp on 2 CPU processes (gloo) trains the network one process trains on the same data: full-batch
    epochs (each rank one half of the rows, gradients averaged), so the two differ only by how the masked-mean loss
    weighs the halves. After 4 epochs the two networks' refresh probabilities differ by under a quarter of what the
    last 3 epochs changed them."""
    import subprocess
    import sys

    from policies.supervised import SupervisedPredictor, run

    write_synthetic_shards(tmp_path / "shards", episodes=10, steps=6)
    common = ["mode=supervised", "trainer.matmul_precision=null", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "data.batch_size=100000", "data.num_workers=0",
              f"data.shards_dir={tmp_path / 'shards'}", "policy.generation_check.enabled=false", "policy.lr=1e-2",
              "logger=none", "threads=1"]
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "train.py", *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.max_epochs=4", f"policy.checkpoint_dir={tmp_path / 'ckpt-ddp'}", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 did run

    from policies.data import load_rows

    rows, _ = load_rows(tmp_path / "shards")

    def predictions(directory: Path) -> torch.Tensor:
        """P(refresh) of the run's last network on every labelled block of the data."""
        module = SupervisedPredictor.load_from_checkpoint(directory / "last.ckpt", map_location="cpu",
                                                          weights_only=True).eval()
        with torch.no_grad():
            return torch.sigmoid(module(rows["x"], rows["block_mask"]))[rows["loss_mask"]]

    for epochs in (1, 4):
        run(compose_cfg(tmp_path / f"single{epochs}", *common[:-2], f"trainer.max_epochs={epochs}",
                        f"policy.checkpoint_dir={tmp_path / f'ckpt-{epochs}'}"))
    ddp, single, early = (predictions(tmp_path / name) for name in ("ckpt-ddp", "ckpt-4", "ckpt-1"))
    gap, moved = float((ddp - single).abs().mean()), float((single - early).abs().mean())
    # Measured: gap ~ 0.09 x moved (Adam's first steps amplify the small loss-weighting difference); a rank training
    # alone or from another initialisation lands as far off as the training moved the network.
    assert moved > 1e-3 and gap < 0.25 * moved, (gap, moved)


def test_several_shard_directories(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", episodes=4, steps=3, seed=0)
    b = write_synthetic_shards(tmp_path / "b", episodes=5, steps=3, seed=1)
    dm = ShardDataModule([a, b], val_fraction=0.25).prepare()
    assert len(dm.rows["x"]) == 27 and dm.rows["episode"].unique().numel() == 9
    with pytest.raises(ValueError, match="max_blocks"):
        ShardDataModule([a, write_synthetic_shards(tmp_path / "c", episodes=2, max_blocks=7)]).prepare()

"""The image family: the DiT, its block cache and DDIM session, the image heuristics, the router, the metrics and
the image env, on a tiny random DiT (and the shipped one where the claim is about it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cache_core.cache import RefreshPlan
from cache_core.checkpoint import CheckpointError, load_model, save_checkpoint
from cache_core.image import IMAGE_SCHEMA, DenoisingSession, ddim_reference, sample_images
from cache_core.image.session import initial_noise
from cache_core.models.dit import DiTConfig, DiTModel

STEPS = 8


def tiny_dit(seed: int = 0, **overrides) -> DiTModel:
    torch.manual_seed(seed)
    model = DiTModel(DiTConfig(d_model=32, n_layers=3, n_heads=2, **overrides))
    model.reset_parameters()
    for p in model.parameters():  # adaLN-Zero starts every layer as the identity: give them all weights
        p.data.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def dit() -> DiTModel:
    return tiny_dit()


def test_always_refresh_equals_the_uncached_sampler(dit):
    labels = [0, 3, 7, 10]  # 10 = no class
    noise = initial_noise(dit, 4, 3)
    reference = ddim_reference(dit, labels, STEPS, noise)
    for block_size in (4, 8, 16, 64):
        result = sample_images(dit, labels, STEPS, policy="full", block_size=block_size, noise=noise)
        assert torch.equal(result.images, reference.clamp(-1, 1))
        assert result.stats.flop_fraction == pytest.approx(1.0)


def test_partial_forward_with_every_entry_is_the_plain_forward_and_reuse_of_unchanged_state_is_exact(dit):
    from cache_core.image.cache import ImageBlockCache

    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([900, 40]), torch.tensor([1, 2])
    cache = ImageBlockCache(dit, 2, 8)
    every = torch.ones(2, 64, 3, dtype=torch.bool)
    with torch.inference_mode():
        eps, trace = dit.forward_partial(x, t, y, cache, every)
        assert torch.equal(eps, dit(x, t, y))
        assert trace["active_counts"].tolist() == [[64, 64]] * 3
        # The same input again, reusing half the entries: the cached updates are the ones it would compute.
        half = torch.rand(2, 64, 3) < 0.5
        again, trace = dit.forward_partial(x, t, y, cache, half)
    torch.testing.assert_close(again, eps, rtol=1e-5, atol=1e-5)
    assert trace["active_counts"].sum() == int(half.sum())


def test_reuse_changes_the_output_and_saves_flops_and_the_mask_reaches_the_forward(dit):
    noise = initial_noise(dit, 2, 0)
    full = sample_images(dit, [1, 2], STEPS, policy="full", noise=noise)
    never = sample_images(dit, [1, 2], STEPS, policy="never", noise=noise)
    assert not torch.equal(full.images, never.images)
    assert never.stats.flop_fraction < 0.25  # only the first step (and the per-step overhead) runs
    session = DenoisingSession(dit, [1, 2], STEPS, block_size=8, seed=0)
    session.step(RefreshPlan.refresh_all(2, 8))
    start = torch.full((2, 8), 3)
    start[0, 2] = 1  # block 2 of row 0 recomputes layers 1 and 2
    result = session.step(RefreshPlan(start))
    ran = result.recompute.sum(1)  # (B, L) tokens per layer
    assert ran.tolist() == [[0, 8, 8], [0, 0, 0]]
    assert result.record.positions_x_layers == 16


@pytest.mark.parametrize("name, knob", [("fora", {"interval": 1}), ("toca", {"ratio": 1.0}),
                                        ("teacache", {"threshold": 0.0}), ("deepcache", {"interval": 1})])
def test_each_heuristic_at_its_conservative_end_is_the_uncached_sampler(dit, name, knob):
    noise = initial_noise(dit, 2, 1)
    full = sample_images(dit, [4, 5], STEPS, policy="full", noise=noise)
    same = sample_images(dit, [4, 5], STEPS, policy=name, noise=noise, **knob)
    assert torch.equal(same.images, full.images)
    assert same.stats.flop_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("name, knobs", [("fora", [1, 2, 4]), ("toca", [1.0, 0.5, 0.1]),
                                         ("teacache", [0.0, 0.5, 4.0]), ("deepcache", [1, 2, 4])])
def test_each_heuristic_spends_less_as_its_knob_turns_aggressive(dit, name, knobs):
    from cache_core.registry import policy_registry

    knob = policy_registry()[name].knob
    fractions = [sample_images(dit, [1, 2], STEPS, policy=name, seed=2, **{knob: k}).stats.flop_fraction
                 for k in knobs]
    assert fractions[0] > fractions[1] > fractions[2], fractions


def test_toca_recomputes_the_top_ratio_of_blocks_in_every_layer(dit):
    from cache_core.image.sample import ImageStepContext
    from cache_core.registry import make_policy

    session = DenoisingSession(dit, [1], STEPS, block_size=8, seed=0)
    session.step(RefreshPlan.refresh_all(1, 8))
    plan = make_policy("toca", ratio=0.25, interval=4).plan(None, ImageStepContext.of(session))
    assert plan.layer_mask.shape == (1, 8, 3)
    assert plan.layer_mask.sum(1).tolist() == [[2, 2, 2]]


def test_the_router_trains_loads_and_sets_a_per_step_per_layer_schedule(dit, tmp_path):
    from cache_core.image.router import save_router, train_router

    router = train_router(dit, steps=4, n_images=4, iterations=3)
    path = save_router(router, tmp_path / "router.json")
    scores = torch.tensor(router["scores"])
    assert scores.shape == (4, 3) and bool(((scores >= 0) & (scores <= 1)).all())
    everything = sample_images(dit, [1], 4, policy="l2c", router=str(path), threshold=0.0, seed=0)
    nothing = sample_images(dit, [1], 4, policy="l2c", router=str(path), threshold=1.0, seed=0)
    assert everything.stats.flop_fraction == pytest.approx(1.0)
    assert nothing.stats.flop_fraction < 0.5
    with pytest.raises(ValueError, match="trained for 4 steps"):
        sample_images(dit, [1], 6, policy="l2c", router=str(path))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError, match="not a blockreuse-l2c-router"):
        sample_images(dit, [1], 4, policy="l2c", router=str(tmp_path / "bad.json"))


def test_features_follow_the_image_schema_and_stay_in_range(dit):
    session = DenoisingSession(dit, [1, 2], STEPS, block_size=8, seed=0)
    for _ in range(STEPS):
        f = session.features(0.3)
        assert f.schema is IMAGE_SCHEMA
        assert f.blocks.shape == (2, 8, IMAGE_SCHEMA.n_block) and f.global_.shape == (2, IMAGE_SCHEMA.n_global)
        lows = torch.tensor([c.low for c in IMAGE_SCHEMA.block_columns])
        highs = torch.tensor([c.high for c in IMAGE_SCHEMA.block_columns])
        assert bool(((f.blocks >= lows) & (f.blocks <= highs)).all())
        assert float(f.global_[0, IMAGE_SCHEMA.global_index("budget")]) == pytest.approx(0.3)
        session.step(RefreshPlan(torch.randint(0, 4, (2, 8))))
    assert IMAGE_SCHEMA.id.startswith("dit-v1:")


def test_the_oracle_runs_on_images_and_its_labels_are_drift_per_block_and_layer(dit):
    session = DenoisingSession(dit, [3], STEPS, seed=0)
    assert bool(torch.isinf(session.shadow_forward().drift).all())  # nothing cached yet
    session.step(RefreshPlan.refresh_all(1, 8))
    drift = session.shadow_forward().drift
    assert drift.shape == (1, 8, 3) and bool((drift > 0).all()) and bool(torch.isfinite(drift).all())
    cheap = sample_images(dit, [3], STEPS, policy="oracle", epsilon=10.0, seed=0)
    exact = sample_images(dit, [3], STEPS, policy="oracle", epsilon=0.0, seed=0)
    assert cheap.stats.flop_fraction < exact.stats.flop_fraction == pytest.approx(1.0)


def test_bad_input_is_refused_with_a_clear_message(dit):
    with pytest.raises(ValueError, match="text-cache rule"):
        sample_images(dit, [1], STEPS, policy="dual_cache")
    with pytest.raises(ValueError, match="class labels must lie in"):
        sample_images(dit, [11], STEPS)
    with pytest.raises(ValueError, match="block_size=5"):
        sample_images(dit, [1], STEPS, block_size=5)
    with pytest.raises(ValueError, match="steps=0"):
        sample_images(dit, [1], 0)
    with pytest.raises(ValueError, match="noise has shape"):
        sample_images(dit, [1, 2], STEPS, noise=torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="images must be"):
        dit(torch.randn(1, 1, 4, 4), torch.tensor([1]), torch.tensor([1]))
    session = DenoisingSession(dit, [1], STEPS)
    with pytest.raises(ValueError, match="layer_mask has shape"):
        session.step(RefreshPlan(torch.zeros(1, 8, dtype=torch.long), layer_mask=torch.ones(1, 8, 2)))
    with pytest.raises(ValueError, match="DiTConfig.d_model|multiple of n_heads"):
        DiTConfig(d_model=30, n_heads=4)


def test_text_and_image_engines_refuse_each_others_models_and_policies(dit):
    import helpers

    from cache_core.generate import generate
    from cache_core.session import DecodingSession

    text = helpers.tiny_model()
    with pytest.raises(ValueError, match="image-cache rule"):
        generate(text, [[3, 4]], 8, 4, 8, policy="fora")
    with pytest.raises(TypeError, match="not an image diffusion model"):
        DenoisingSession(text, [1], STEPS)
    with pytest.raises(TypeError, match="image diffusion model"):
        DecodingSession(dit, [[3, 4]], 8, 4, 8)


def test_a_text_policy_file_is_refused_on_image_features(dit):
    from cache_core.bench import REPO_ROOT
    from cache_core.learned import PolicyFileError

    with pytest.raises(PolicyFileError, match="dit-v1"):
        sample_images(dit, [1], STEPS, policy=str(REPO_ROOT / "checkpoints" / "policies" / "predictor.onnx"))


def test_the_dit_checkpoint_round_trips_and_a_corrupt_one_is_refused(dit, tmp_path):
    save_checkpoint(dit, tmp_path / "dit")
    loaded = load_model(tmp_path / "dit")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 10])
    assert torch.equal(loaded(x, t, y), dit(x, t, y))
    raw = json.loads((tmp_path / "dit" / "config.json").read_text())
    raw["d_model"] = 48
    (tmp_path / "dit" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "dit")


def test_metrics_psnr_ssim_fcd_behave():
    from cache_core.image.data import digits
    from cache_core.image.metrics import DigitClassifier, frechet_classifier_distance, psnr, ssim

    images, _ = digits("test")
    assert float(psnr(images[:4], images[:4]).min()) == 100.0
    noisy = (images[:4] + 0.1 * torch.randn(images[:4].shape)).clamp(-1, 1)
    assert 15 < float(psnr(noisy, images[:4]).mean()) < 40
    assert float(ssim(images[:4], images[:4]).min()) == pytest.approx(1.0)
    assert float(ssim(noisy, images[:4]).mean()) < 1.0
    classifier = DigitClassifier()
    same = frechet_classifier_distance(classifier, images, images)
    other = frechet_classifier_distance(classifier, torch.rand_like(images) * 2 - 1, images)
    assert abs(same) < 1e-3 < other


def test_the_digits_splits_are_disjoint_stratified_and_fixed():
    from cache_core.image.data import _digits, split_indices

    _, labels = _digits(8)
    parts = [split_indices(labels.numpy(), s) for s in ("train", "validation", "test")]
    assert sum(len(p) for p in parts) == len(labels) and len(set(np.concatenate(parts))) == len(labels)
    assert np.array_equal(parts[2], split_indices(labels.numpy(), "test"))
    assert set(labels[parts[1]].tolist()) == set(range(10))


def test_the_image_env_passes_both_checkers_and_is_deterministic(dit):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    from envs.image_env import ImageReuseEnv

    for mode in ("binary", "depth"):
        env = ImageReuseEnv(dit, steps=4, n_prompts=3, action_mode=mode)
        check_env(env, skip_render_check=True)
        with pytest.warns(UserWarning):  # SB3 only suggests flattening the (blocks, features) observation
            sb3_check_env(env)

    def episode(seed: int) -> list[np.ndarray]:
        env = ImageReuseEnv(dit, steps=4, n_prompts=3)
        obs, _ = env.reset(seed=seed)
        env.action_space.seed(seed)
        seen, done = [obs["blocks"]], False
        while not done:
            obs, reward, done, _, info = env.step(env.action_space.sample())
            seen.append(obs["blocks"])
        assert info["oracle_drift"].shape == (8, 3) and "psnr" in info
        return seen

    a, b = episode(5), episode(5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_the_image_env_plays_an_image_policy_as_its_actions(dit):
    from cache_core.registry import make_policy
    from envs.factory import make_env

    env = make_env(model=dit, steps=4, n_prompts=2)
    assert type(env).__name__ == "ImageReuseEnv" and env.schema is IMAGE_SCHEMA
    env.reset(seed=0)
    policy = make_policy("fora", interval=2)
    policy.reset(1)
    actions = []
    done = False
    while not done:
        action = env.policy_action(policy)
        actions.append(action.tolist())
        _, _, done, _, info = env.step(action)
    assert actions == [[1] * 8, [0] * 8, [1] * 8, [0] * 8]
    assert info["agreement"] > 0


def test_the_shipped_dit_samples_recognisable_digits_and_loads_with_its_classifier():
    from cache_core.bench import REPO_ROOT
    from cache_core.image.data import class_labels
    from cache_core.image.metrics import CLASSIFIER_FILE, classifier_accuracy, load_classifier

    directory = REPO_ROOT / "checkpoints" / "dit"
    model = load_model(directory)
    assert isinstance(model, DiTModel) and sum(f.stat().st_size for f in directory.iterdir()) < 20e6
    classifier = load_classifier(directory / CLASSIFIER_FILE)
    labels = class_labels(50, 3)
    result = sample_images(model, labels, 25, policy="full", seed=11)
    assert classifier_accuracy(classifier, result.images, labels) >= 0.85  # 92.5% on 200 samples (README)


def test_experiment_dit_runs_collect_supervised_export_and_evaluate(tmp_path):
    """The main job's stages on the shipped DiT through the real configs, at toy sizes."""
    from policies.config import compose
    from train import run_mode

    base = ["experiment=dit", "logger=none", f"paths.output={tmp_path}", "env.steps=6", "collect.episodes=3",
            "collect.n_prompts=3", "collect.progress_bar=false", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", "evaluate.n_examples=4", "evaluate.batch_sizes=[4]",
            "evaluate.progress=false", "'evaluate.heuristics=[fora,teacache,never]'", "evaluate.include_oracle=false"]
    cfg = compose([o.strip("'") for o in base])
    assert type(cfg.env).__name__ == "ImageEnvConfig" and cfg.paths.model.endswith("checkpoints/dit")
    collected = run_mode("collect", cfg)
    assert collected["rows"] == 18
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["schema_id"] == IMAGE_SCHEMA.id
    trained = run_mode("supervised", cfg)
    exported = json.loads((tmp_path / "predictor.json").read_text())
    assert exported["schema_id"] == IMAGE_SCHEMA.id and trained
    result = run_mode("evaluate", cfg)
    families = {r["family"] for r in result["rows"]}
    assert {"full", "fora", "teacache", "teacache_identity", "never", "fresh_predictor"} <= families
    for key in ("json", "table", "plot", "grid"):
        assert (tmp_path / result["files"][key].split("/")[-1]).exists()
    full = next(r for r in result["rows"] if r["family"] == "full")
    assert full["psnr"] == 100.0 and full["flop_fraction"] == 1.0

"""generate() argument errors name the problem; the feature schema stays inside its declared ranges."""

from __future__ import annotations

import pytest
import torch
from helpers import MASK_ID, random_prompts, tiny_model

from cache_core import SCHEMA_ID, SCHEMA_VERSION, DecodingSession, RefreshPlan, generate, make_policy
from cache_core.features import (
    BLOCK_COLUMNS,
    BLOCK_FEATURE_NAMES,
    GLOBAL_COLUMNS,
    GLOBAL_FEATURE_NAMES,
    N_BLOCK_FEATURES,
    N_GLOBAL_FEATURES,
    compute_features,
    schema_table,
)
from cache_core.policy import decide


@pytest.fixture(scope="module")
def model():
    return tiny_model(0, max_sequence_length=48)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(gen_length=10, block_length=4, steps=4), "gen_length=10 is not a multiple of block_length=4"),
        (dict(gen_length=12, block_length=4, steps=4), r"steps=4 must be a positive multiple of the number of blocks "
                                                       r"\(3 = gen_length / block_length\)"),
        (dict(gen_length=8, block_length=4, steps=3), "steps=3 must be a positive multiple of the number of blocks"),
        (dict(gen_length=8, block_length=4, steps=0), "steps=0 must be a positive multiple"),
        (dict(gen_length=8, block_length=4, steps=-2), "steps=-2 must be a positive multiple"),
        (dict(gen_length=8, block_length=4, steps=10), r"steps=10 gives more steps per block than tokens per block"),
        (dict(gen_length=8, block_length=4, steps=4, threshold=0.9), "steps and threshold are exclusive"),
        (dict(gen_length=8, block_length=4, steps=None), "steps is required unless a confidence threshold"),
        (dict(gen_length=8, block_length=4, steps=None, threshold=0.0), r"threshold=0.0 must lie in \(0, 1\]"),
        (dict(gen_length=8, block_length=4, steps=None, threshold=1.5), r"threshold=1.5 must lie in \(0, 1\]"),
        (dict(gen_length=0, block_length=4, steps=4), r"gen_length \(0\) and block_length \(4\) must be positive"),
        (dict(gen_length=8, block_length=0, steps=4), r"gen_length \(8\) and block_length \(0\) must be positive"),
        (dict(gen_length=8, block_length=4, steps=2, temperature=-1.0), "temperature=-1.0 must be >= 0"),
        (dict(gen_length=8, block_length=4, steps=2, remasking="top_p"),
         r"unknown remasking 'top_p'; choose one of \('low_confidence', 'random'\)"),
    ],
)
def test_argument_errors(model, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2, 3]], **kwargs)


def test_nan_temperature_is_refused(model) -> None:
    """ENGINE BUG (minor): validate_generation_args checks `temperature < 0`, which NaN passes; the Gumbel noise then
    turns every score into NaN and argmax returns token 0 everywhere, silently. (threshold and budget use
    `not 0 < x <= 1`, which does refuse NaN.) Fix: `if not temperature >= 0` (or math.isfinite)."""
    with pytest.raises(ValueError, match="temperature=nan"):
        generate(model, [[1, 2, 3]], gen_length=8, block_length=4, steps=2, temperature=float("nan"))


def test_too_long_for_the_model(model) -> None:
    # max_sequence_length 48: a 20-token prompt (padded to 24) + 32 generated tokens does not fit
    with pytest.raises(ValueError, match=r"gen_length \(32\) = 56 exceeds the model's max_sequence_length=48"):
        generate(model, [[1] * 20], gen_length=32, block_length=8, steps=4)
    generate(model, [[1] * 16], gen_length=32, block_length=8, steps=4)  # 16 + 32 = 48 fits exactly


def test_empty_prompts(model) -> None:
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, [], gen_length=8, block_length=4, steps=2)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate(model, [[1, 2], []], gen_length=8, block_length=4, steps=2)


def test_errors_come_before_any_work(model) -> None:
    """The session refuses bad arguments itself (the environment builds sessions directly)."""
    with pytest.raises(ValueError, match="not a multiple of block_length"):
        DecodingSession(model, [[1, 2]], gen_length=6, block_length=4, steps=2)


def test_prompts_as_tensors(model) -> None:
    prompts = [torch.tensor([3, 4, 5]), torch.tensor([7])]
    a = generate(model, prompts, gen_length=8, block_length=4, steps=4).tokens
    b = generate(model, [[3, 4, 5], [7]], gen_length=8, block_length=4, steps=4).tokens
    assert torch.equal(a, b)


@pytest.mark.parametrize("threshold", [None, 0.9])
def test_a_model_that_predicts_the_mask_token_still_finishes(threshold) -> None:
    """ENGINE BUG: session._commit takes the argmax over the whole vocabulary, mask id included. When the model's
    argmax is the mask token, the 'committed' position stays masked, the block never completes, and
    - with steps: the next step indexes past the block's transfer schedule (IndexError in _commit);
    - with a threshold: every step re-commits the mask and generate() loops forever.
    LLaDA's tokenizer has the mask inside the vocabulary (126336 < 126464), as does the built-in tokenizer (id 1).
    Here the head is zeroed so every logit ties and argmax picks id 0 = the mask token."""
    model = tiny_model(1, mask_token_id=0)
    with torch.no_grad():
        model.transformer["ff_out"].weight.zero_()
    steps = None if threshold is not None else 4
    session = DecodingSession(model, [[5, 6, 7]], gen_length=8, block_length=4, steps=steps, threshold=threshold)
    for _ in range(16):  # bounded: the bug would otherwise loop forever
        if session.done:
            break
        session.step(RefreshPlan.refresh_all(1, session.n_blocks))
    assert session.done
    assert not bool((session.generated == 0).any())


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------
def check_features(feats, B: int, n_blocks: int) -> None:
    assert feats.blocks.shape == (B, n_blocks, N_BLOCK_FEATURES)
    assert feats.global_.shape == (B, N_GLOBAL_FEATURES)
    assert feats.blocks.dtype == torch.float32 and feats.global_.dtype == torch.float32
    assert torch.isfinite(feats.blocks).all() and torch.isfinite(feats.global_).all()
    for i, col in enumerate(BLOCK_COLUMNS):
        v = feats.blocks[..., i]
        assert col.low <= float(v.min()) and float(v.max()) <= col.high, (col.name, v.min(), v.max())
    for i, col in enumerate(GLOBAL_COLUMNS):
        v = feats.global_[..., i]
        assert col.low <= float(v.min()) and float(v.max()) <= col.high, (col.name, v.min(), v.max())
    assert feats.policy_input().shape == (B, n_blocks, N_BLOCK_FEATURES + N_GLOBAL_FEATURES)


@pytest.mark.parametrize("policy", ["full", "dual_cache", "elastic_cache", "dkv_cache", "dllm_cache", "never"])
@pytest.mark.parametrize("seed", [0, 1])
def test_features_stay_in_declared_ranges(policy: str, seed: int) -> None:
    model = tiny_model(seed, n_kv_heads=2)
    prompts = random_prompts([3, 11, 6], seed)
    session = DecodingSession(model, prompts, gen_length=12, block_length=4, steps=6)
    pol = make_policy(policy)
    pol.reset(session.batch_size)
    budget = 0.4 if seed else None
    while not session.done:
        feats = compute_features(session, budget)
        check_features(feats, 3, session.n_blocks)
        assert torch.equal(feats.blocks, session.features(budget).blocks)
        plan, ctx = decide(pol, session, budget, features=feats)
        pol.on_step_end(ctx, session.step(plan))
    check_features(compute_features(session), 3, session.n_blocks)  # and once the generation is complete


def test_feature_values_that_are_known() -> None:
    model = tiny_model(2)
    session = DecodingSession(model, random_prompts([3, 6], 2), gen_length=8, block_length=4, steps=4)
    f = session.features(0.7)
    nb = session.n_blocks  # 2 prompt blocks + 2 generation blocks
    assert nb == 4
    assert f.column("is_prompt").tolist() == [[1, 1, 0, 0]] * 2
    assert f.column("is_decoding").tolist() == [[0, 0, 1, 0]] * 2
    assert f.column("masked_fraction").tolist() == [[0, 0, 1, 1]] * 2
    assert f.column("relative_position").tolist() == [[-0.5, -0.25, 0.0, 0.25]] * 2
    assert f.column("valid_fraction").tolist() == [[0.0, 0.75, 1, 1], [0.5, 1, 1, 1]]
    assert f.column("confidence")[:, :2].tolist() == [[0.0, 1.0], [1.0, 1.0]]  # prompt = 1, padding-only block = 0
    g = dict(zip(GLOBAL_FEATURE_NAMES, f.global_[0].tolist()))
    assert g["progress"] == 0.0 and g["decoding_block_fraction"] == 0.0 and g["step_in_block"] == 0.0
    assert g["compute_spent"] == 1.0 and g["budget"] == pytest.approx(0.7)
    session.step(RefreshPlan.refresh_all(2, nb))
    f = session.features()
    assert f.column("masked_fraction")[:, 2].tolist() == [0.5, 0.5]  # 2 of 4 committed
    g = dict(zip(GLOBAL_FEATURE_NAMES, f.global_[0].tolist()))
    assert g["progress"] == 0.25 and g["step_in_block"] == 0.25 and g["budget"] == 1.0


@pytest.mark.parametrize("vocab", [40, 50])
def test_entropy_feature_in_range_for_uniform_predictions(vocab: int) -> None:
    """ENGINE BUG (edge): the entropy column is -sum p log p / log(vocab), not clamped; for an exactly uniform
    prediction fp32 rounding gives 1.0000001 > the declared high of 1.0 for some vocabulary sizes (e.g. 50)."""
    model = tiny_model(3, vocab_size=vocab, embedding_size=vocab + 8, mask_token_id=vocab + 5)
    with torch.no_grad():
        model.transformer["ff_out"].weight.zero_()  # uniform predictions
    session = DecodingSession(model, [[1, 2, 3]], gen_length=4, block_length=4, steps=1)
    session.step(RefreshPlan.refresh_all(1, session.n_blocks))
    assert session.done
    # the decoding block's entropy was recorded at the last step
    check_features(compute_features(session), 1, session.n_blocks)


def test_schema_id_embeds_version_and_every_column_name() -> None:
    assert SCHEMA_ID.startswith(f"v{SCHEMA_VERSION}:")
    for name in BLOCK_FEATURE_NAMES + GLOBAL_FEATURE_NAMES:
        assert name in SCHEMA_ID
    # order is part of the identity: block names in order, then global names in order
    assert SCHEMA_ID == f"v{SCHEMA_VERSION}:" + ",".join(BLOCK_FEATURE_NAMES) + "|" + ",".join(GLOBAL_FEATURE_NAMES)
    assert len(set(BLOCK_FEATURE_NAMES)) == N_BLOCK_FEATURES and len(set(GLOBAL_FEATURE_NAMES)) == N_GLOBAL_FEATURES
    for col in BLOCK_COLUMNS + GLOBAL_COLUMNS:
        assert col.low < col.high and col.meaning
    table = schema_table()
    assert all(name in table for name in BLOCK_FEATURE_NAMES + GLOBAL_FEATURE_NAMES)


def test_features_are_mask_free_after_generation() -> None:
    """Sanity of the session bookkeeping the features read: nothing masked once done."""
    model = tiny_model(4)
    session = DecodingSession(model, random_prompts([5], 4), gen_length=8, block_length=4, steps=8)
    while not session.done:
        session.step(RefreshPlan.refresh_all(1, session.n_blocks))
    assert not bool((session.generated == MASK_ID).any())
    f = compute_features(session)
    assert float(f.column("masked_fraction").max()) == 0.0
    assert float(f.global_[0, GLOBAL_FEATURE_NAMES.index("progress")]) == 1.0


def test_prompt_ids_outside_vocabulary_are_refused():
    model = tiny_model(0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [[1, 2, model.config.vocab_size + 3]], gen_length=8, block_length=4, steps=4)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [[1, -1]], gen_length=8, block_length=4, steps=4)

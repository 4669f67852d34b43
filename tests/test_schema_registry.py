"""Feature schemas per model family: the registry, and a second (toy) schema through shards, supervised data,
training, export and the learned runtime, refused where it meets the text schema's features."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gymnasium import spaces

from cache_core.features import (
    GLOBAL_COLUMNS,
    N_BLOCK_FEATURES,
    N_GLOBAL_FEATURES,
    SCHEMA_ID,
    SCHEMAS,
    SETTING_COLUMNS,
    TEXT_SCHEMA,
    TEXT_SCHEMA_V1,
    Column,
    FeatureSchema,
    StepFeatures,
    register_schema,
    schema_by_id,
    schema_table,
)
from cache_core.learned import LearnedPolicy, PolicyFileError
from envs.shards import ShardFormatError, load_shards
from policies.data import ShardDataModule, load_many, load_rows, write_synthetic_shards

N_LAYERS = 2


def _not_computed(view):  # the toy family's sessions would compute these; the tests write features directly
    raise NotImplementedError


def _col(name: str, low: float = 0.0, high: float = 1.0) -> Column:
    return Column(name, f"toy column {name}", low, high, _not_computed)


TOY = FeatureSchema(
    family="toy", version=1,
    block_columns=(_col("offset", -1.0, 1.0), _col("pinned"), _col("noise_level", 0.0, 2.0), _col("staleness"),
                   _col("texture"), _col("real")),
    global_columns=(_col("timestep"), _col("spend")),
    forced="pinned", valid="real", budget="spend", attention=None, relative="offset", id_prefix="toy-",
)


@pytest.fixture(autouse=True, scope="module")
def toy_registered():
    register_schema(TOY)
    yield
    SCHEMAS.pop(TOY.id, None)


def toy_features(n_blocks: int = 5, forced: int = 4, schema: FeatureSchema = TOY) -> StepFeatures:
    g = torch.Generator().manual_seed(3)
    blocks = torch.rand(1, n_blocks, schema.n_block, generator=g)
    blocks[..., schema.block_index(schema.valid)] = 1.0
    blocks[..., schema.block_index(schema.forced)] = 0.0
    blocks[0, forced, schema.block_index(schema.forced)] = 1.0
    return StepFeatures(blocks, torch.rand(1, schema.n_global, generator=g), schema)


# --- the registry ----------------------------------------------------------------------------------------------------
def test_text_schema_ids_are_unchanged():
    # The short-regime policies and shards record the v1 string; v2 (the long regime's) appends the setting columns.
    assert TEXT_SCHEMA_V1.id == (
        "v1:relative_position,is_prompt,is_decoding,masked_fraction,changed_since_refresh,steps_since_refresh,"
        "confidence,entropy,attention_mass,attention_shift,refresh_drift,valid_fraction|progress,"
        "decoding_block_fraction,step_in_block,compute_spent,budget")
    assert SCHEMA_ID == TEXT_SCHEMA.id == TEXT_SCHEMA_V1.id.replace("v1:", "v2:") + (
        ",block_share,block_size,generation_share,commit_rate,threshold")
    assert schema_by_id(SCHEMA_ID) is TEXT_SCHEMA and schema_by_id(TEXT_SCHEMA_V1.id) is TEXT_SCHEMA_V1
    assert StepFeatures(torch.zeros(1, 2, 12), torch.zeros(1, 10)).schema is TEXT_SCHEMA
    assert (TEXT_SCHEMA.n_block, TEXT_SCHEMA.n_global) == (N_BLOCK_FEATURES, N_GLOBAL_FEATURES) == (12, 10)
    assert TEXT_SCHEMA.global_columns == GLOBAL_COLUMNS + SETTING_COLUMNS and schema_table() == TEXT_SCHEMA.table()
    assert TEXT_SCHEMA.input_index("budget") == TEXT_SCHEMA_V1.input_index("budget") == N_BLOCK_FEATURES + 4


def test_registry_round_trip_and_unknown_ids():
    assert TOY.id == "toy-v1:offset,pinned,noise_level,staleness,texture,real|timestep,spend"
    assert schema_by_id(TOY.id) is TOY and pickle.loads(pickle.dumps(TOY)) is TOY  # travels to workers as its id
    assert (TOY.n_block, TOY.n_global, TOY.n_features) == (6, 2, 8)
    assert TOY.block_index("real") == 5 and TOY.global_index("spend") == 1 and TOY.input_index("spend") == 7
    assert "| block | noise_level | [0, 2] |" in TOY.table()
    with pytest.raises(ValueError) as err:
        schema_by_id("dit-v9:nothing|here")
    message = str(err.value)
    assert "dit-v9:nothing|here" in message and TOY.id in message and SCHEMA_ID in message
    assert "import cache_core.image" in message
    with pytest.raises(ValueError, match="not a block column of feature schema 'toy-v1"):
        TOY.block_index("is_decoding")
    with pytest.raises(ValueError, match="new version"):  # same id, other ranges
        register_schema(FeatureSchema("toy", 1, (_col("offset"), *TOY.block_columns[1:]), TOY.global_columns,
                                      forced="pinned", valid="real", budget="spend", id_prefix="toy-"))
    with pytest.raises(ValueError, match="budget='missing' is not one of its global columns"):
        FeatureSchema("bad", 1, TOY.block_columns, TOY.global_columns, forced="pinned", valid="real", budget="missing")


# --- shards and the supervised data path ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("toy") / "shards", episodes=10, steps=6, max_blocks=5,
                                  n_layers=N_LAYERS, schema=TOY)


def test_toy_shards_load_with_toy_widths(toy_shards):
    manifest = json.loads((toy_shards / "manifest.json").read_text())
    assert manifest["schema_id"] == TOY.id and manifest["n_block_features"] == TOY.n_block
    assert load_shards(toy_shards, keys=["blocks"])["blocks"].shape[-1] == TOY.n_block
    rows, _ = load_rows(toy_shards)
    assert rows["x"].shape[1:] == (5, TOY.n_features)
    pinned = rows["x"][..., TOY.block_index("pinned")] > 0.5
    assert pinned.any() and not (rows["loss_mask"] & pinned).any()  # the forced block carries no loss
    noise = rows["x"][..., TOY.block_index("noise_level")][rows["block_mask"]]
    assert float(noise.max()) > 1.0 and float(noise.min()) >= 0.0  # drawn in the column's declared range
    dm = ShardDataModule(toy_shards, batch_size=16, seed=0).prepare()
    assert dm.schema is TOY and len(dm.train_index) and len(dm.val_index)


def test_shards_of_two_schemas_are_not_mixed(toy_shards, tmp_path):
    text = write_synthetic_shards(tmp_path / "text", episodes=2, steps=3, max_blocks=5, n_layers=N_LAYERS)
    with pytest.raises(ValueError, match="feature schema .* differs"):
        load_many([text, toy_shards])
    manifest = json.loads((text / "manifest.json").read_text())
    (text / "manifest.json").write_text(json.dumps({**manifest, "schema_id": TOY.id}))  # shards still say text
    with pytest.raises(ShardFormatError) as err:
        load_shards(text)
    assert SCHEMA_ID in str(err.value) and TOY.id in str(err.value)


# --- training, export, the learned runtime ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_policy(toy_shards, tmp_path_factory):
    from policies.export import export_checkpoint
    from policies.supervised import SupervisedPredictor

    torch.manual_seed(0)
    dm = ShardDataModule(toy_shards, batch_size=32, seed=0).prepare()
    module = SupervisedPredictor(n_layers=N_LAYERS, hidden=16, epsilon=0.05, lr=1e-2, schema_id=dm.schema.id,
                                 ignore_features=["spend"])
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for _ in range(3):
        for batch in dm.train_dataloader():
            loss = module._step(batch, train=True)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.isfinite(loss)
    # A checkpoint as Lightning writes one (state dict under net., hyperparameters, the net config).
    out = tmp_path_factory.mktemp("toy_policy")
    ckpt = out / "best.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in module.net.state_dict().items()},
                "hyper_parameters": dict(module.hparams), "epoch": 2, "global_step": 9,
                "blockreuse": {"net_config": module.net.config(), "val_metrics": {}}}, ckpt)
    return export_checkpoint(ckpt, out / "toy"), module.net.eval()


def test_toy_policy_exports_and_plans_on_toy_features(toy_policy):
    from policies.predictor import load_predictor

    onnx_path, net = toy_policy
    manifest = json.loads(onnx_path.with_suffix(".json").read_text())
    assert manifest["schema_id"] == TOY.id and manifest["input"]["shape"][-1] == TOY.n_features
    assert manifest["input"]["block_features"] == list(TOY.block_names)
    reloaded, meta = load_predictor(onnx_path.with_suffix(".safetensors"))
    assert meta["schema_id"] == TOY.id and reloaded.schema is TOY and reloaded.ignore_features == ("spend",)

    policy = LearnedPolicy(onnx_path)
    assert policy.schema is TOY
    features = toy_features()
    plan = policy.plan(features, SimpleNamespace(n_layers=N_LAYERS))
    with torch.no_grad():
        refresh = torch.sigmoid(net(features.policy_input())) >= policy.refresh_threshold
    assert torch.equal(plan.start_layer == 0, refresh)


def test_policies_refuse_features_of_another_schema(toy_policy, tmp_path):
    from policies.export import export_onnx
    from policies.predictor import BlockPredictor

    policy = LearnedPolicy(toy_policy[0])
    with pytest.raises(PolicyFileError) as err:
        policy.plan(toy_features(n_blocks=4, forced=3, schema=TEXT_SCHEMA), SimpleNamespace(n_layers=N_LAYERS))
    message = str(err.value)
    assert TOY.id in message and SCHEMA_ID in message and "retrain and re-export" in message
    text_policy = LearnedPolicy(export_onnx(BlockPredictor(hidden=8), tmp_path / "text", action_mode="binary",
                                            output="refresh_logit", n_layers=N_LAYERS))
    with pytest.raises(PolicyFileError, match="toy family"):
        text_policy.plan(toy_features(), SimpleNamespace(n_layers=N_LAYERS))


def test_unknown_schema_in_a_policy_file_is_refused(toy_policy, tmp_path):
    onnx_path = toy_policy[0]
    other = tmp_path / "other"
    other.with_suffix(".onnx").write_bytes(onnx_path.read_bytes())
    manifest = json.loads(onnx_path.with_suffix(".json").read_text())
    other.with_suffix(".json").write_text(json.dumps({**manifest, "schema_id": "dit-v1:a|b"}))
    with pytest.raises(PolicyFileError, match="'dit-v1:a|b', which this blockreuse does not know") as err:
        LearnedPolicy(other)
    assert TOY.id in str(err.value) and SCHEMA_ID in str(err.value)


def test_attention_weighting_needs_an_attention_column():
    from policies.supervised import SupervisedPredictor, label_drift

    with pytest.raises(ValueError, match="label_weighting=attention .* has none"):
        SupervisedPredictor(n_layers=N_LAYERS, hidden=8, label_weighting="attention", schema_id=TOY.id)
    x, mask = torch.rand(2, 3, TOY.n_features), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="has none"):
        label_drift(torch.rand(2, 3, N_LAYERS), x, mask, "attention", schema=TOY)


def test_budgeted_policy_sets_the_toy_budget_column(toy_policy):
    from policies.evaluate import BudgetedPolicy

    inner = LearnedPolicy(toy_policy[0])
    seen = {}

    def scores(features: StepFeatures) -> np.ndarray:
        seen["global"] = features.global_.clone()
        return np.zeros((1, features.blocks.shape[1]), np.float32)

    inner.scores = scores
    BudgetedPolicy(inner, 0.25).plan(toy_features(), SimpleNamespace(n_layers=N_LAYERS))
    assert float(seen["global"][0, TOY.global_index("spend")]) == 0.25


def test_rl_network_and_checkpoints_follow_the_schema():
    from policies.rl_callbacks import check_agent_schema
    from policies.rl_policy import BlockEncoderExtractor

    def space(schema: FeatureSchema) -> spaces.Dict:
        return spaces.Dict({"blocks": spaces.Box(-1, 2, (4, schema.n_block), np.float32),
                            "block_mask": spaces.MultiBinary(4),
                            "global": spaces.Box(0, 1, (schema.n_global,), np.float32)})

    extractor = BlockEncoderExtractor(space(TOY), hidden=8, schema_id=TOY.id)
    assert extractor.schema is TOY and extractor.predictor.schema is TOY
    features = toy_features(n_blocks=4, forced=3)
    obs = {"blocks": features.blocks, "block_mask": torch.ones(1, 4), "global": features.global_}
    free = extractor(obs).view(1, 4, 10)[..., -1]
    assert free.tolist() == [[1.0, 1.0, 1.0, 0.0]]  # the forced block is not free
    with pytest.raises(ValueError, match="build the agent with the env's schema"):
        BlockEncoderExtractor(space(TEXT_SCHEMA), hidden=8, schema_id=TOY.id)
    assert check_agent_schema({"schema_id": TOY.id}, "agent.json", TOY) is TOY
    with pytest.raises(ValueError, match="but the env computes") as err:
        check_agent_schema({"schema_id": SCHEMA_ID}, "agent.json", TOY)
    assert SCHEMA_ID in str(err.value) and TOY.id in str(err.value)

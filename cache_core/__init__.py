"""blockreuse inference engine: model families, the one generate loop, the block KV cache, features and policies.

The engine imports no training or tracking framework (Lightning, Stable-Baselines3, W&B, Hydra, omegaconf,
matplotlib); the built-in tasks, pretraining and the policy benchmark live apart in `cache_core.bench`.
Importing it sets torch's CPU threads once (`cache_core.runtime`).
"""

from cache_core.runtime import set_threads

set_threads()

from cache_core.cache import BlockKVCache, RefreshPlan  # noqa: E402
from cache_core.checkpoint import CheckpointError, load_model, load_tokenizer, save_checkpoint  # noqa: E402
from cache_core.features import SCHEMA_ID, SCHEMA_VERSION, StepFeatures  # noqa: E402
from cache_core.generate import GenerationResult, generate  # noqa: E402
from cache_core.models import (  # noqa: E402
    DiffusionModel,
    DiTModel,
    DreamModel,
    LLaDAModel,
    LLaDAMoEModel,
    ModelConfig,
    ModelFacts,
)
from cache_core.oracle import OraclePolicy  # noqa: E402
from cache_core.policy import ReusePolicy, StepContext, decide, run_step  # noqa: E402
from cache_core.registry import make_policy, policy_registry, register_policy  # noqa: E402
from cache_core.session import DecodingSession  # noqa: E402
from cache_core.tokenizer import Tokenizer  # noqa: E402

__all__ = [
    "BlockKVCache", "CheckpointError", "decide", "DecodingSession", "DiffusionModel", "DiTModel", "DreamModel",
    "generate", "GenerationResult", "LLaDAModel", "LLaDAMoEModel", "load_model", "load_tokenizer", "make_policy",
    "ModelConfig", "ModelFacts", "OraclePolicy", "policy_registry", "RefreshPlan", "register_policy", "ReusePolicy",
    "run_step", "save_checkpoint", "SCHEMA_ID", "SCHEMA_VERSION", "set_threads", "StepContext", "StepFeatures",
    "Tokenizer",
]

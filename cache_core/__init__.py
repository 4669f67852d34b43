"""blockreuse inference engine: the masked-diffusion model, the one generate loop, the block KV cache and policies.

Importing cache_core loads neither Lightning nor Stable-Baselines3 (only `cache_core.pretrain`, a training module,
needs Lightning).
"""

from cache_core.cache import BlockKVCache, RefreshPlan
from cache_core.checkpoint import CheckpointError, load_model, load_tokenizer, save_checkpoint
from cache_core.features import SCHEMA_ID, SCHEMA_VERSION, StepFeatures
from cache_core.generate import GenerationResult, generate
from cache_core.model import LLaDAModel, ModelConfig
from cache_core.policy import OraclePolicy, ReusePolicy, StepContext, make_policy, policy_registry
from cache_core.session import DecodingSession

__all__ = [
    "BlockKVCache", "CheckpointError", "DecodingSession", "GenerationResult", "LLaDAModel", "ModelConfig",
    "OraclePolicy", "RefreshPlan", "ReusePolicy", "SCHEMA_ID", "SCHEMA_VERSION", "StepContext", "StepFeatures",
    "generate", "load_model", "load_tokenizer", "make_policy", "policy_registry", "save_checkpoint",
]

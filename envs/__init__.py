"""blockreuse environments: `BlockReuseEnv` (registered as `blockreuse/BlockReuse-v0`), its settings and reward,
rollout collection into dataset shards, and the environment benchmark.

    import gymnasium as gym, envs
    env = gym.make("blockreuse/BlockReuse-v0")                      # the built-in model
    env = gym.make("blockreuse/BlockReuse-v0", model_path="checkpoints/builtin", split="train")

Importing `envs.block_reuse_env` registers the id; in a fresh process (vector workers, scripts) the id
`"envs.block_reuse_env:blockreuse/BlockReuse-v0"` makes `gym.make` import it first.
"""

from envs.block_reuse_env import ACTION_MODES, ENV_ID, BlockReuseEnv, labels_to_action, register
from envs.config import EnvConfig, RewardWeights
from envs.prompts import PromptItem, PromptSet, TaskSuitePromptSet, TokenPromptSet

register()

__all__ = ["ACTION_MODES", "ENV_ID", "BlockReuseEnv", "EnvConfig", "PromptItem", "PromptSet", "RewardWeights",
           "TaskSuitePromptSet", "TokenPromptSet", "labels_to_action", "register"]

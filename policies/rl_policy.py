"""The RL agent's network: a per-block actor-critic for Stable-Baselines3 built on `BlockPredictor.encode`.

    obs {blocks (B, nb, F_b), block_mask (B, nb), global (B, F_g)}
      -> x = [blocks | global broadcast to every block]          (B, nb, F_b + F_g) = StepFeatures.policy_input()
      -> BlockEncoderExtractor: BlockPredictor.encode(x, mask)     (B, nb, H)       (warm-startable from supervised)
      -> actor:  per-block MLP (shared by blocks) -> per-block action head (shared) -> logits (B, nb, k)
         critic: per-block MLP -> masked mean and max over blocks -> MLP -> value
Why a custom `ActorCriticPolicy` and not a features extractor + `net_arch`: SB3's default head is one `nn.Linear`
from a flat latent to the flattened action space, i.e. its weights are indexed by block row. That ties the head to
max_blocks, learns every row separately (14x the data to learn the same rule), and a network exported from it could
not serve a canvas of another length. Here the action head is one small `nn.Linear(H, k)` applied to every block, so
the policy is the same function of a block's features wherever the block sits and however many blocks there are:
the ONNX export runs it on any (B, n_blocks, F) input, like the supervised predictor.

SB3 still hands tensors between its modules flat, so the extractor emits per block [encoding (H), valid, free]
flattened to (B, nb * (H + 2)) and the heads reshape it back. `valid` marks real blocks (padding rows of the env's
observation); `free` = valid and not forced (the schema's forced column; text: the decoding block). Blocks that are
not free get a fixed "reuse" action with (numerically) probability 1: the cache always computes the decoding block and
ignores padding rows, so their action changes nothing and must not add noise to the policy gradient or entropy.

Actions (as the env reads them): binary mode, `BernoulliDistribution` over k = 1 logit per block (1 = refresh);
depth mode, `MultiCategoricalDistribution` over k = L + 1 logits per block (0 = reuse, j = refresh the top j layers).
`ExportedActor` maps (B, nb, F) to the deterministic policy's action logits (B, nb, A) in the exported-policy format
of `cache_core.learned` (binary: A = 2 with logits [0, l], so argmax = 1 exactly where SB3's Bernoulli mode is 1).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import BernoulliDistribution, MultiCategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from cache_core.features import TEXT_SCHEMA, FeatureSchema, policy_input, schema_by_id

# The text schema's indices, for existing imports; the networks read their own schema.
IS_DECODING = TEXT_SCHEMA.block_index(TEXT_SCHEMA.forced)
VALID_FRACTION = TEXT_SCHEMA.block_index(TEXT_SCHEMA.valid)
MASKED_LOGIT = 30.0  # |logit| that pins a non-free block to "reuse" (probability 1 - 1e-13)
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def _mlp(in_dim: int, sizes: list[int], activation: type[nn.Module]) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    for size in sizes:
        layers += [nn.Linear(in_dim, size), activation()]
        in_dim = size
    return nn.Sequential(*layers), in_dim


class BlockEncoderExtractor(BaseFeaturesExtractor):
    """SB3 features extractor: the observation through `BlockPredictor.encode`, flattened with two mask channels.

    `predictor` is a `policies.predictor.BlockPredictor(in_features, hidden, arch, n_outputs)` like the supervised
    one, so a supervised checkpoint loads into it (`policies.rl.warm_start`); only its `encode` is used here.
    schema_id: the env's feature schema (`env.schema.id`), whose widths the observation space must have.
    """

    def __init__(self, observation_space: spaces.Dict, hidden: int = 64, arch: str = "mlp",
                 predictor_kwargs: dict[str, Any] | None = None, schema_id: str = TEXT_SCHEMA.id):
        from policies.predictor import BlockPredictor

        schema: FeatureSchema = schema_by_id(schema_id)
        max_blocks, n_block = observation_space["blocks"].shape
        n_global = observation_space["global"].shape[0]
        if (n_block, n_global) != (schema.n_block, schema.n_global):
            raise ValueError(f"the observation has {n_block} block and {n_global} global features, feature schema "
                             f"{schema.id!r} has {schema.n_block} and {schema.n_global}; build the "
                             "agent with the env's schema (env.schema)")
        super().__init__(observation_space, features_dim=max_blocks * (hidden + 2))
        self.hidden, self.max_blocks, self.in_features = int(hidden), int(max_blocks), int(n_block + n_global)
        self.schema = schema
        self.forced = schema.block_index(schema.forced)
        self.predictor = BlockPredictor(self.in_features, self.hidden, arch=arch, n_outputs=1,
                                        **(predictor_kwargs or {}), schema_id=schema.id)

    def encode_blocks(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, nb, F), (B, nb) bool -> (B, nb, H + 2): [encoding, valid, free] per block, for any nb."""
        h = self.predictor.encode(x, valid) * valid[..., None]
        free = valid & (x[..., self.forced] < 0.5)
        return torch.cat([h, valid[..., None].to(h.dtype), free[..., None].to(h.dtype)], dim=-1)

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        x = policy_input(observations["blocks"], observations["global"])
        return self.encode_blocks(x, observations["block_mask"] > 0.5).flatten(1)


class PerBlockNetwork(nn.Module):
    """SB3's `mlp_extractor` slot: a per-block actor trunk and a pooled critic, both independent of the block count.

    latent_pi: (B, nb * (pi_out + 2)) [actor features, valid, free] per block; latent_vf: (B, latent_dim_vf).
    """

    def __init__(self, width: int, max_blocks: int, pi: list[int], vf: list[int], activation: type[nn.Module]):
        super().__init__()
        self.width, self.max_blocks = width, max_blocks
        self.actor, pi_out = _mlp(width, list(pi), activation)
        vf = list(vf) or [width]
        self.critic_block, block_out = _mlp(width, vf[:1], activation)
        self.critic_head, vf_out = _mlp(2 * block_out, vf[1:], activation)
        self.pi_width = pi_out
        self.latent_dim_pi = max_blocks * (pi_out + 2)
        self.latent_dim_vf = vf_out

    def actor_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """(B, nb, width + 2) -> (B, nb, pi_out + 2)."""
        return torch.cat([self.actor(blocks[..., :-2]), blocks[..., -2:]], dim=-1)

    def critic_pooled(self, blocks: torch.Tensor) -> torch.Tensor:
        valid = blocks[..., -2:-1]  # (B, nb, 1)
        h = self.critic_block(blocks[..., :-2])
        mean = (h * valid).sum(1) / valid.sum(1).clamp(min=1.0)
        peak = h.masked_fill(valid == 0, -1e4).amax(1)
        return self.critic_head(torch.cat([mean, peak], dim=-1))

    def _blocks(self, features: torch.Tensor) -> torch.Tensor:
        return features.view(features.shape[0], self.max_blocks, self.width + 2)

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        return self.actor_blocks(self._blocks(features)).flatten(1)

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return self.critic_pooled(self._blocks(features))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)


class PerBlockActionHead(nn.Module):
    """One `nn.Linear(width, k)` shared by every block; non-free blocks are pinned to action 0 (reuse)."""

    def __init__(self, width: int, k: int, max_blocks: int):
        super().__init__()
        self.width, self.k, self.max_blocks = width, k, max_blocks
        self.linear = nn.Linear(width, k)
        pinned = torch.full((k,), -MASKED_LOGIT)  # Bernoulli (k = 1): logit -30 = reuse
        if k > 1:
            pinned[0] = 0.0  # categorical: action 0 (reuse) wins by 30 nats
        self.register_buffer("pinned", pinned, persistent=False)

    def block_logits(self, blocks: torch.Tensor) -> torch.Tensor:
        """(B, nb, width + 2) -> (B, nb, k) logits."""
        logits = self.linear(blocks[..., :-2])
        free = blocks[..., -1:] > 0.5
        return torch.where(free, logits, self.pinned.to(logits.dtype))

    def forward(self, latent_pi: torch.Tensor) -> torch.Tensor:
        blocks = latent_pi.view(latent_pi.shape[0], self.max_blocks, self.width + 2)
        return self.block_logits(blocks).flatten(1)  # block-major: what SB3's distributions split by block


def action_mode_of(action_space: spaces.Space) -> tuple[str, int]:
    """('binary', 1) for MultiBinary, ('depth', L + 1) for MultiDiscrete([L + 1] * nb); anything else is refused."""
    if isinstance(action_space, spaces.MultiBinary):
        return "binary", 1
    if isinstance(action_space, spaces.MultiDiscrete):
        nvec = np.asarray(action_space.nvec).ravel()
        if nvec.size and (nvec == nvec[0]).all():
            return "depth", int(nvec[0])
    raise ValueError(f"the per-block policy needs MultiBinary or MultiDiscrete([L + 1] * n_blocks) actions, got "
                     f"{action_space}")


class PerBlockActorCriticPolicy(ActorCriticPolicy):
    """`ActorCriticPolicy` whose actor is per block (see the module docstring). net_arch: dict(pi=[...], vf=[...]),
    per-block layer sizes of the actor trunk (default none: the head reads the encoding directly, which lets a
    supervised predictor's output layer warm-start it) and of the critic (first size per block, the rest after
    pooling). features_extractor_kwargs: hidden, arch, predictor_kwargs of the `BlockPredictor`. init_refresh_prob:
    the action head's initial bias makes every free block refresh with this probability (None: SB3's near-uniform
    start, i.e. 1/2 in binary mode)."""

    def __init__(self, observation_space: spaces.Dict, action_space: spaces.Space, lr_schedule: Any,
                 net_arch: dict[str, list[int]] | None = None, activation_fn: type[nn.Module] = nn.ReLU,
                 features_extractor_class: type[BaseFeaturesExtractor] = BlockEncoderExtractor,
                 init_refresh_prob: float | None = None, **kwargs: Any):
        if init_refresh_prob is not None and not 0.0 < init_refresh_prob < 1.0:
            raise ValueError(f"init_refresh_prob={init_refresh_prob} must lie in (0, 1)")
        self.init_refresh_prob = init_refresh_prob
        if not isinstance(observation_space, spaces.Dict) or not {"blocks", "block_mask", "global"} <= set(
                observation_space.spaces):
            raise ValueError("the per-block policy needs the BlockReuseEnv observation: Dict(blocks, block_mask, "
                             f"global), got {observation_space}")
        self.action_mode, self.k = action_mode_of(action_space)
        net_arch = dict(net_arch or {})
        net_arch = {"pi": list(net_arch.get("pi", [])), "vf": list(net_arch.get("vf", [64]))}
        super().__init__(observation_space, action_space, lr_schedule, net_arch=net_arch, activation_fn=activation_fn,
                         features_extractor_class=features_extractor_class, **kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "init_refresh_prob": self.init_refresh_prob}

    def _build_mlp_extractor(self) -> None:
        fe = self.features_extractor
        self.mlp_extractor = PerBlockNetwork(fe.hidden, fe.max_blocks, self.net_arch["pi"], self.net_arch["vf"],
                                             self.activation_fn)

    def _build(self, lr_schedule: Any) -> None:
        if not isinstance(self.action_dist, (BernoulliDistribution, MultiCategoricalDistribution)):
            raise ValueError(f"unsupported action distribution {type(self.action_dist).__name__}")
        self._build_mlp_extractor()
        ex = self.mlp_extractor
        self.action_net = PerBlockActionHead(ex.pi_width, self.k, ex.max_blocks)
        self.value_net = nn.Linear(ex.latent_dim_vf, 1)
        if self.ortho_init:  # SB3's gains: trunks sqrt(2), policy head 0.01 (near-uniform start), value head 1
            for module, gain in ((self.features_extractor, np.sqrt(2)), (self.mlp_extractor, np.sqrt(2)),
                                 (self.action_net, 0.01), (self.value_net, 1.0)):
                module.apply(partial(self.init_weights, gain=gain))
        if self.init_refresh_prob is not None:  # start exploring near a refresh rate, not at a coin flip per block
            p = self.init_refresh_prob
            with torch.no_grad():
                bias = self.action_net.linear.bias
                if self.k == 1:
                    bias.fill_(float(np.log(p / (1 - p))))
                else:  # reuse with probability 1 - p, each refresh depth with p / L
                    bias.fill_(float(np.log(p / (self.k - 1))))
                    bias[0] = float(np.log(1 - p))
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)


class ExportedActor(nn.Module):
    """The deterministic policy as a network over the feature schema's policy input, for `export_onnx`:
    (B, nb, F_b + F_g) -> action logits (B, nb, A). Real blocks are those whose schema's valid column is > 0 (the
    env's padding rows are all-zero; in a batched `generate()` a block of pure left padding is never computed
    either). `schema` is the agent's (its extractor's), which the exported manifest records."""

    def __init__(self, policy: PerBlockActorCriticPolicy):
        super().__init__()
        self.extractor = policy.features_extractor
        self.trunk = policy.mlp_extractor
        self.head = policy.action_net
        self.binary = policy.action_mode == "binary"
        self.schema: FeatureSchema = self.extractor.schema
        self.valid = self.schema.block_index(self.schema.valid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        valid = x[..., self.valid] > 0
        logits = self.head.block_logits(self.trunk.actor_blocks(self.extractor.encode_blocks(x, valid)))
        if self.binary:  # Bernoulli logit l -> [0, l]: argmax is 1 iff l > 0, SB3's mode round(sigmoid(l))
            logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
        return logits

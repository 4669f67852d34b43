"""LLaDA-MoE (LLaDA-MoE-7B-A1B Base/Instruct): a bidirectional Hugging Face-layout decoder with routed experts.

Its config ships as `model_type: "llada"` with MoE keys (`num_experts`, ...); `cache_core.models.family_of` sends
such a config here, so the downloaded directory loads as it is. Per layer: q/k/v/o projections without biases,
`q_norm`/`k_norm` RMSNorm over each head's channels before the rotary embedding (`qk_layernorm`), rotate-half RoPE on
the first `partial_rotary_factor` of each head's channels; the MLP is, per `moe_layer_freq`, either dense SwiGLU
(`dense_intermediate_size`) or a mixture: a router `mlp.gate` scores the experts (softmax in fp32, or sigmoid), each
position runs its top `num_experts_per_tok` experts (`mlp.experts.{e}.*`, SwiGLU of `expert_intermediate_size`),
weighted by their scores (renormalised when `norm_topk_prob`, times `routed_scaling_factor`), plus a shared expert
(`mlp.shared_expert.*`) when `shared_expert_intermediate_size` is set. The reference ships `norm_topk_prob` off,
scaling 1 and no shared expert. Group-limited routing and expert biases (LLaDA 2.x) are refused by name.
FLOPs count the router and the k experts each computed position ran (top-k routing without capacity drops runs
exactly k per position).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from cache_core import validate as v
from cache_core.models.base import read_config
from cache_core.models.hf_layout import DecoderConfig, HFLayoutModel, SwiGLU

MOE_KEYS = ("num_experts", "num_experts_per_tok", "expert_intermediate_size")
SCORE_FUNCTIONS = ("softmax", "sigmoid")


@dataclass
class MoEConfig(DecoderConfig):
    _positive: ClassVar[tuple[str, ...]] = ()  # dense layers use dense_intermediate_size, not intermediate_size

    num_experts: int = 0
    num_experts_per_tok: int = 0
    expert_intermediate_size: int = 0
    dense_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    moe_layer_freq: int | list[int] = 1
    first_k_dense_replace: int = 0
    moe_router_score_function: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    moe_layers: list[bool] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_experts", "num_experts_per_tok", "expert_intermediate_size", "first_k_dense_replace"):
            v.number(name, getattr(self, name), integer=True, low=0)
        for name in ("dense_intermediate_size", "shared_expert_intermediate_size"):
            v.number(name, getattr(self, name), integer=True, optional=True, low=0)
        v.choice("moe_router_score_function", self.moe_router_score_function, SCORE_FUNCTIONS)
        v.flag("norm_topk_prob", self.norm_topk_prob)
        v.number("routed_scaling_factor", self.routed_scaling_factor, low=0.0, open_low=True)
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must lie in [1, num_experts="
                             f"{self.num_experts}]")
        L = self.num_hidden_layers
        freq = self.moe_layer_freq
        if isinstance(freq, list):
            if len(freq) != L or any(f not in (0, 1) for f in freq):
                raise ValueError(f"moe_layer_freq must be {L} entries of 0/1 (one per layer), got {freq!r}")
            layers = [bool(f) for f in freq]
        else:
            v.number("moe_layer_freq", freq, integer=True, low=1)
            layers = [i % freq == 0 for i in range(L)]  # Megatron's meaning of an integer: every freq-th layer
        self.moe_layers = [moe and i >= self.first_k_dense_replace for i, moe in enumerate(layers)]
        if not all(self.moe_layers) and not self.dense_intermediate_size:
            raise ValueError("some layers are dense (moe_layer_freq / first_k_dense_replace) but "
                             "dense_intermediate_size is not set")
        if any(self.moe_layers) and not self.expert_intermediate_size:
            raise ValueError("expert_intermediate_size must be positive")


# Keys that do not change the maths we implement.
_IGNORED = {
    "architectures", "auto_map", "model_type", "torch_dtype", "transformers_version", "use_cache", "initializer_range",
    "attention_dropout", "blockreuse", "dtype", "output_router_logits", "router_aux_loss_coef", "moe_aux_loss_coeff",
    "output_attentions", "output_hidden_states", "return_dict", "use_qk_norm",
}
_SUPPORTED = {
    "hidden_act": {"silu"},
    "rope_scaling": {None},
    "attention_bias": {False, None},
    "use_qkv_bias": {False, None},
    "use_sliding_window": {False, None},
    "sliding_window": {None},
    "moe_router_enable_expert_bias": {False, None},  # LLaDA 2.x's aux-free expert bias
    "router_num_group": {None, 1},
    "n_group": {None, 1},
    "router_topk_group": {None, 1},
    "topk_group": {None, 1},
    "num_shared_experts": {None, 0, 1},
}
_REQUIRED = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "mask_token_id",
             *MOE_KEYS, "rope_theta"}


class MoEBlock(nn.Module):
    """Top-k routed SwiGLU experts (+ an optional shared expert) over the rows of h."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.gate = nn.Linear(d, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, cfg.expert_intermediate_size) for _ in range(cfg.num_experts))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(d, cfg.shared_expert_intermediate_size)

    def route(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, d) -> routing weights (T, k) in the rows' dtype and expert ids (T, k)."""
        cfg = self.cfg
        logits = self.gate(rows)
        scores = logits.float().softmax(-1) if cfg.moe_router_score_function == "softmax" else logits.float().sigmoid()
        weights, experts = scores.topk(cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return (weights * cfg.routed_scaling_factor).to(rows.dtype), experts

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rows = h.reshape(-1, h.shape[-1])
        weights, experts = self.route(rows)
        out = torch.zeros_like(rows)
        # Only the experts some row was routed to run, each on its rows alone.
        for e in experts.unique().tolist():
            token, slot = (experts == e).nonzero(as_tuple=True)
            out.index_add_(0, token, self.experts[e](rows[token]) * weights[token, slot, None])
        if self.cfg.shared_expert_intermediate_size:
            out = out + self.shared_expert(rows)
        return out.view(h.shape)


class LLaDAMoEModel(HFLayoutModel):
    family: ClassVar[str] = "llada_moe"
    model_type: ClassVar[str] = "llada"  # as the released config.json says, MoE keys beside it

    def make_mlp(self, cfg: MoEConfig, layer: int) -> nn.Module:
        return MoEBlock(cfg) if cfg.moe_layers[layer] else SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size)

    def mlp_flops(self, n: torch.Tensor | float, layer: int) -> torch.Tensor | float:
        cfg = self.config
        d = cfg.hidden_size
        if not cfg.moe_layers[layer]:
            return 2 * n * 3 * d * cfg.dense_intermediate_size
        router = 2 * n * d * cfg.num_experts
        routed = 2 * n * cfg.num_experts_per_tok * 3 * d * cfg.expert_intermediate_size
        shared = 2 * n * 3 * d * (cfg.shared_expert_intermediate_size or 0)
        return router + routed + shared

    @classmethod
    def config_from_dict(cls, raw: dict[str, Any], source: str) -> MoEConfig:
        from cache_core.checkpoint import CheckpointError

        qk_norm = raw.get("qk_layernorm", raw.get("use_qk_norm", False))
        if not isinstance(qk_norm, bool):
            raise CheckpointError(f"{source}: qk_layernorm={qk_norm!r} must be true or false")
        raw = dict(raw)
        factor = raw.pop("partial_rotary_factor", 1.0)
        raw.pop("qk_layernorm", None)
        return read_config(MoEConfig, raw, source, required=_REQUIRED, supported=_SUPPORTED, ignored=_IGNORED,
                           switches={"qkv_bias": False, "qk_layernorm": qk_norm, "partial_rotary_factor": factor})

    def config_dict(self) -> dict[str, Any]:
        raw = asdict(self.config)
        raw.pop("moe_layers")
        raw.pop("qkv_bias")
        raw["qk_layernorm"] = raw.pop("qk_layernorm")
        return {**raw, "hidden_act": "silu", "rope_scaling": None}

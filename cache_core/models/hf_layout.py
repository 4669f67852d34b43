"""The Hugging Face decoder layout shared by Dream (Qwen2) and LLaDA-MoE, run bidirectionally.

Both families store `model.embed_tokens`, `model.layers.{i}.{input,post_attention}_layernorm`,
`model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.mlp.*`, `model.norm` and `lm_head`; the module tree
here has exactly those names, so a checkpoint's names are this module's state_dict names. What differs between the
families is a few switches of `DecoderConfig` (q/k/v biases, q/k RMSNorm, partial rotary) and the MLP of each layer
(dense SwiGLU, or a top-k routed mixture of SwiGLU experts). The numerics follow transformers' Qwen2/Llama code
(RMSNorm casts back to the input dtype before the weight; cos/sin are cast to the activations' dtype), so bf16
results match those implementations, not LLaDA's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cache_core import validate as v
from cache_core.models.base import DiffusionModel, ModelFacts, rowwise
from cache_core.models.layers import RMSNorm, apply_rope, attend


@dataclass
class DecoderConfig:
    """Shapes and switches of a Hugging Face-layout diffusion decoder. Field names are the config.json keys."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    mask_token_id: int
    intermediate_size: int = 0  # the dense MLP's width (families whose layers are all dense need it)
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    head_dim: int | None = None
    # Architecture switches (not config.json keys of Dream; set by the family).
    qkv_bias: bool = False
    qk_layernorm: bool = False
    partial_rotary_factor: float = 1.0

    _positive: ClassVar[tuple[str, ...]] = ("intermediate_size",)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "mask_token_id", "max_position_embeddings"):
            v.number(name, getattr(self, name), integer=True)
        for name in ("num_key_value_heads", "pad_token_id", "bos_token_id", "head_dim"):
            v.number(name, getattr(self, name), integer=True, optional=True)
        v.number("rms_norm_eps", self.rms_norm_eps, low=0.0, open_low=True)
        v.number("rope_theta", self.rope_theta, low=0.0, open_low=True)
        v.number("partial_rotary_factor", self.partial_rotary_factor, low=0.0, high=1.0, open_low=True)
        v.flag("tie_word_embeddings", self.tie_word_embeddings)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        problems = []
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", *self._positive):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.num_attention_heads > 0:
            if self.hidden_size % self.num_attention_heads:
                problems.append(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                                f"{self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            problems.append(f"rotary dimension {self.rotary_dim} (head_dim x partial_rotary_factor) must be even")
        if not 0 <= self.mask_token_id < max(self.vocab_size, 1):
            problems.append(f"mask_token_id={self.mask_token_id} outside the embedding (vocab_size {self.vocab_size})")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor) if self.head_dim else 0

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def hf_rms_norm(dim: int, eps: float) -> RMSNorm:
    """transformers' Llama/Qwen2 RMSNorm: normalise in fp32, cast back, then scale."""
    return RMSNorm(dim, eps, weight_in_fp32=False)


class SwiGLU(nn.Module):
    """down_proj(silu(gate_proj(h)) * up_proj(h))."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        if cfg.qk_layernorm:  # LLaDA-MoE: RMSNorm over each head's channels, before the rotary embedding
            self.q_norm = hf_rms_norm(hd, cfg.rms_norm_eps)
            self.k_norm = hf_rms_norm(hd, cfg.rms_norm_eps)


class DecoderLayer(nn.Module):
    """x += o_proj(attention(q, k, v) of input_layernorm(x)); x += mlp(post_attention_layernorm(x))."""

    def __init__(self, cfg: DecoderConfig, mlp: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.self_attn = Attention(cfg)
        self.mlp = mlp
        self.input_layernorm = hf_rms_norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = hf_rms_norm(cfg.hidden_size, cfg.rms_norm_eps)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, attn = self.cfg, self.self_attn
        B, n, _ = x.shape

        def project(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
            h = self.input_layernorm(rows)
            return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

        q, k, val = rowwise(project, (x,), real)
        q = q.view(B, n, cfg.num_attention_heads, cfg.head_dim)
        k = k.view(B, n, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_layernorm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        val = val.view(B, n, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        return (apply_rope(q, positions, cfg.rope_theta, cfg.rotary_dim, fp32=False),
                apply_rope(k, positions, cfg.rope_theta, cfg.rotary_dim, fp32=False), val)

    def finish(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               key_mask: torch.Tensor | None, real: torch.Tensor | None = None) -> torch.Tensor:
        def residual_updates(rows: torch.Tensor, heads: torch.Tensor) -> tuple[torch.Tensor]:
            rows = rows + self.self_attn.o_proj(heads)
            return (rows + self.mlp(self.post_attention_layernorm(rows)),)

        return rowwise(residual_updates, (x, attend(q, keys, values, key_mask)), real)[0]


class HFLayoutModel(DiffusionModel):
    """A bidirectional decoder in the Hugging Face layout; a family supplies its config reader and per-layer MLP."""

    weight_names_hint: ClassVar[str] = "Hugging Face names (model.layers.{i}.self_attn.q_proj.weight, ...)"
    layer_count_key: ClassVar[str] = "num_hidden_layers"
    shape_keys: ClassVar[str] = "hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, vocab_size"

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, self.make_mlp(cfg, i))
                                          for i in range(cfg.num_hidden_layers))
        self.model.norm = hf_rms_norm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        self._facts = ModelFacts(n_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size,
                                 mask_token_id=cfg.mask_token_id, max_sequence_length=cfg.max_position_embeddings,
                                 hidden_size=cfg.hidden_size, n_kv_heads=cfg.num_key_value_heads,
                                 head_dim=cfg.head_dim)

    def make_mlp(self, cfg: DecoderConfig, layer: int) -> nn.Module:
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def mlp_flops(self, n: torch.Tensor | float, layer: int) -> torch.Tensor | float:
        return 2 * n * 3 * self.config.hidden_size * self.config.intermediate_size

    @property
    def facts(self) -> ModelFacts:
        return self._facts

    # --- per-layer primitives ---------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def layer_qkv(self, layer: int, x: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.layers[layer].qkv(x, positions, real)

    def layer_finish(self, layer: int, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     key_mask: torch.Tensor | None, real: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.layers[layer].finish(x, q, keys, values, key_mask, real)

    def value_probe(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.model.layers[layer]
        return block.self_attn.v_proj(block.input_layernorm(x))

    def value_probe_flops(self, n_positions: float) -> float:
        cfg = self.config
        return 2.0 * n_positions * cfg.hidden_size * cfg.num_key_value_heads * cfg.head_dim

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.model.norm(hidden), self.lm_head_weight()).float()

    # --- accounting -------------------------------------------------------------------------------------------------
    def layer_flops(self, n_queries: torch.Tensor | float, n_keys: torch.Tensor | float, layer: int = 0
                    ) -> torch.Tensor | float:
        """projections 2·n·d·(d_q + 2·d_kv) + 2·n·d_q·d (output), the layer's MLP, attention 4·n·N·d_q."""
        cfg = self.config
        d, d_q, d_kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        projections = 2 * n_queries * d * (d_q + 2 * d_kv) + 2 * n_queries * d_q * d
        return projections + self.mlp_flops(n_queries, layer) + 4 * n_queries * n_keys * d_q

    def head_flops(self, n_out: float) -> float:
        return 2.0 * n_out * self.config.hidden_size * self.config.vocab_size

    # --- checkpoint format: the state_dict names are the checkpoint names -----------------------------------------
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def optional_checkpoint_names(self) -> set[str]:
        # Tied checkpoints may still carry a copy of the head; the embedding is the head.
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def checkpoint_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError


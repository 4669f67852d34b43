"""The LLaDA family: the masked-diffusion transformer of LLaDA-8B / LLaDA-1.5 (and the built-in model), in one file.

Module names copy LLaDA's checkpoint names (`transformer.blocks.{i}.q_proj`, ...) so that a LLaDA checkpoint and our
own format load through one loader with no renaming table: a checkpoint name is `model.` + the state_dict name.

The model implements the per-layer primitives of `cache_core.models.base.DiffusionModel`; the plain and the partial
forward are the base class's, shared with every family.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cache_core import validate as v
from cache_core.models.base import DiffusionModel, ModelFacts, read_config, rowwise
from cache_core.models.layers import RMSNorm, apply_rope, attend

WEIGHT_PREFIX = "model."


@dataclass
class ModelConfig:
    """Shapes and constants of a LLaDA-architecture model. Field names follow LLaDA's `config.json`."""

    vocab_size: int
    mask_token_id: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: one KV head per query head (no grouping)
    mlp_hidden_size: int = 768
    embedding_size: int | None = None  # rows of the embedding/LM head; LLaDA pads the vocabulary to this
    max_sequence_length: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False

    def __post_init__(self) -> None:
        # Types first: a config.json with `"d_model": "128"` must say so, not fail comparing str and int.
        for name in ("vocab_size", "mask_token_id", "d_model", "n_layers", "n_heads", "mlp_hidden_size",
                     "max_sequence_length"):
            v.number(name, getattr(self, name), integer=True)
        for name in ("n_kv_heads", "embedding_size"):
            v.number(name, getattr(self, name), integer=True, optional=True)
        v.number("rope_theta", self.rope_theta, low=0.0, open_low=True)
        v.number("rms_norm_eps", self.rms_norm_eps, low=0.0, open_low=True)
        v.flag("weight_tying", self.weight_tying)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        problems = []
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "max_sequence_length"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads > 0 and self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads > 0 and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.n_heads > 0 and (self.d_model // self.n_heads) % 2:
            problems.append(f"head dim {self.d_model // self.n_heads} must be even for rotary embeddings")
        if self.embedding_size < self.vocab_size:
            problems.append(f"embedding_size={self.embedding_size} < vocab_size={self.vocab_size}")
        if not 0 <= self.mask_token_id < self.embedding_size:
            problems.append(f"mask_token_id={self.mask_token_id} outside the embedding (size {self.embedding_size})")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_kv(self) -> int:
        """Width of the key (and value) projection: n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


class LLaDABlock(nn.Module):
    """x += attn_out(attention(q, k, v) on attn_norm(x)); x += ff_out(silu(ff_proj(h)) * up_proj(h)), h = ff_norm(x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, d_kv, f = cfg.d_model, cfg.d_kv, cfg.mlp_hidden_size
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d_kv, bias=False)
        self.v_proj = nn.Linear(d, d_kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, f, bias=False)  # SiLU gate
        self.up_proj = nn.Linear(d, f, bias=False)  # linear branch
        self.ff_out = nn.Linear(f, d, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries, rotated keys and values of the rows of x: each (B, heads, n, head_dim).
        real: optional (B, n) bool, the rows that are not padding (see `rowwise`)."""
        cfg = self.cfg
        B, n, _ = x.shape

        def project(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
            h = self.attn_norm(rows)
            return self.q_proj(h), self.k_proj(h), self.v_proj(h)

        q, k, v = rowwise(project, (x,), real)
        q = q.view(B, n, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(B, n, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(B, n, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        return apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta), v

    def finish(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               key_mask: torch.Tensor | None, real: torch.Tensor | None = None) -> torch.Tensor:
        """Attend the queries of x's rows to (keys, values) and apply the residual attention and MLP updates."""
        def residual_updates(rows: torch.Tensor, attended: torch.Tensor) -> tuple[torch.Tensor]:
            rows = rows + self.attn_out(attended)
            h = self.ff_norm(rows)
            return (rows + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h)),)

        return rowwise(residual_updates, (x, attend(q, keys, values, key_mask)), real)[0]


# LLaDA config keys that do not change the maths we implement (bookkeeping, training-only settings).
_IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "torch_dtype", "transformers_version", "use_cache", "init_device",
    "init_fn", "init_std", "init_cutoff_factor", "eos_token_id", "pad_token_id", "bos_token_id", "mlp_ratio",
    "attention_dropout", "residual_dropout", "embedding_dropout", "precision", "flash_attention", "rope_full_precision",
    "blockreuse", "alibi_bias_max", "block_group_size", "attention_layer_norm_with_affine", "layer_norm_with_affine",
    "bias_for_layer_norm", "multi_query_attention", "new_embedding_init_range", "emb_init_std",
}
# Keys whose value must be the one we implement; anything else is a different architecture.
_REQUIRED_VALUES = {
    "activation_type": {"silu", "swiglu"},
    "alibi": {False},
    "rope": {True},
    "include_bias": {False},
    "include_qkv_bias": {False, None},
    "layer_norm_type": {"rms"},  # OLMo/LLaDA "default" and "low_precision" are LayerNorm (mean-centred)
    "scale_logits": {False, None},  # True multiplies the logits by 1/sqrt(d_model)
    "input_emb_norm": {False, None},  # True multiplies the embeddings by sqrt(d_model)
    "block_type": {"llama"},
    "attention_layer_norm": {False},
    "clip_qkv": {None},
}


class LLaDAModel(DiffusionModel):
    family: ClassVar[str] = "llada"
    weight_names_hint: ClassVar[str] = "LLaDA names (model.transformer.blocks.{i}.q_proj.weight, ...)"
    layer_count_key: ClassVar[str] = "n_layers"
    shape_keys: ClassVar[str] = "d_model, n_heads, n_kv_heads, mlp_hidden_size, embedding_size"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.embedding_size, cfg.d_model),
                blocks=nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers)),
                ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            )
        )
        if not cfg.weight_tying:
            self.transformer["ff_out"] = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        self.apply(self._init_weights)
        self._facts = ModelFacts(n_layers=cfg.n_layers, vocab_size=cfg.vocab_size, mask_token_id=cfg.mask_token_id,
                                 max_sequence_length=cfg.max_sequence_length, hidden_size=cfg.d_model,
                                 n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def facts(self) -> ModelFacts:
        return self._facts

    # --- per-layer primitives ---------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer["wte"](input_ids)

    def layer_qkv(self, layer: int, x: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.transformer["blocks"][layer].qkv(x, positions, real)

    def layer_finish(self, layer: int, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     key_mask: torch.Tensor | None, real: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer["blocks"][layer].finish(x, q, keys, values, key_mask, real)

    def value_probe(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.transformer["blocks"][layer]
        return block.v_proj(block.attn_norm(x))

    def value_probe_flops(self, n_positions: float) -> float:
        return 2.0 * n_positions * self.config.d_model * self.config.d_kv

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.transformer["ln_f"](hidden)
        if self.config.weight_tying:
            logits = F.linear(h, self.transformer["wte"].weight)
        else:
            logits = self.transformer["ff_out"](h)
        # Rows past vocab_size are padding of the embedding table, never real tokens.
        return logits[..., : self.config.vocab_size].float()

    # --- accounting -------------------------------------------------------------------------------------------------
    def layer_flops(self, n_queries: torch.Tensor | float, n_keys: torch.Tensor | float, layer: int = 0
                    ) -> torch.Tensor | float:
        """projections 2·n·d·(d + 2·d_kv) (q, k, v) + 2·n·d·d (attention output) + 2·n·3·d·f (SwiGLU MLP);
        attention 4·n·N·d (scores and weighted sum)."""
        d, d_kv, f = self.config.d_model, self.config.d_kv, self.config.mlp_hidden_size
        projections = 2 * n_queries * d * (d + 2 * d_kv) + 2 * n_queries * d * d + 2 * n_queries * 3 * d * f
        attention = 4 * n_queries * n_keys * d
        return projections + attention

    def head_flops(self, n_out: float) -> float:
        return 2.0 * n_out * self.config.d_model * self.config.vocab_size

    # --- checkpoint format ------------------------------------------------------------------------------------------
    @classmethod
    def config_from_dict(cls, raw: dict[str, Any], source: str) -> ModelConfig:
        """A ModelConfig from LLaDA-style config keys; settings of another architecture are refused."""
        return read_config(ModelConfig, raw, source, required={"vocab_size", "mask_token_id"},
                           supported=_REQUIRED_VALUES, ignored=_IGNORED_KEYS)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {WEIGHT_PREFIX + k: v for k, v in self.state_dict().items()}

    def optional_checkpoint_names(self) -> set[str]:
        # Some LLaDA exports keep a copy of a tied head; with weight tying the embedding is the head.
        return {WEIGHT_PREFIX + "transformer.ff_out.weight"} if self.config.weight_tying else set()

    def checkpoint_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k[len(WEIGHT_PREFIX):]: v for k, v in tensors.items()}

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

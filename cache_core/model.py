"""The masked-diffusion transformer (LLaDA architecture), in one readable file.

Module names copy LLaDA's checkpoint names (`transformer.blocks.{i}.q_proj`, ...) so that a LLaDA checkpoint and our
own format load through one loader with no renaming table.

Two forwards share every layer computation:
- `forward(ids)`: the plain bidirectional forward over the whole canvas (the no-cache reference).
- `forward_partial(ids, cache, ...)`: per layer, only the *active* positions run; every other position contributes
  its cached keys/values. Which positions are active at which layer is the refresh plan, turned into a per-position
  start layer by the cache (see `cache.py`). With every position active from layer 0 it computes what `forward` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from cache_core.cache import BlockKVCache


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like LLaDA, so bf16 weights do not change the statistics.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, rotate-half convention, computed in fp32.

    x: (B, heads, n, head_dim); positions: (B, n) integer positions of those n tokens.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None, :, None] * inv_freq  # (B, 1, n, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)
    x32 = x.float()
    return (x32 * angles.cos() + rotate_half(x32) * angles.sin()).to(x.dtype)


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
        B, n, d = x.shape
        mask = None if key_mask is None else key_mask[:, None, None, :]
        grouped = self.cfg.n_kv_heads != self.cfg.n_heads
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=grouped)

        def residual_updates(rows: torch.Tensor, attended: torch.Tensor) -> tuple[torch.Tensor]:
            rows = rows + self.attn_out(attended)
            h = self.ff_norm(rows)
            return (rows + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h)),)

        return rowwise(residual_updates, (x, attn.transpose(1, 2).reshape(B, n, d)), real)[0]


def rowwise(fn: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...],
            real: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """fn (a per-position map of (B, n, ...) tensors) on the real rows only, packed into one (T, ...) batch.

    A partial forward pads each batch row to the longest row's active count. When rows refresh different numbers of
    positions (learned policies, the oracle) the padding can be most of the batch; the projections and the MLP, which
    act on each position alone, then run on the T real positions instead. Padding slots get their row's first slot's
    output: a padded index repeats that position (`active_index`), so the cache writes stay the same."""
    if real is None:
        return fn(*inputs)
    outputs = fn(*(t[real] for t in inputs))
    full = []
    for out in outputs:
        grid = out.new_zeros((*real.shape, *out.shape[1:]))
        grid[real] = out
        pad = ~real.view(*real.shape, *([1] * (out.dim() - 1)))
        full.append(torch.where(pad, grid[:, :1], grid))
    return tuple(full)


@dataclass
class PartialForwardTrace:
    """What one partial forward observed, for features, heuristics and accounting.

    active_counts: (n_layers, B) positions computed per layer and row.
    attention_to_keys: (n_traced, B, n_out, N) attention of each logit query on each key (mean over heads), only
        when asked for: every layer (Elastic-Cache's drift test) or the last one (the attention features).
    value_drift: (B, N) 1 - cosine(old cached value, new value), averaged over the layers where the position was
        recomputed and had been computed before; NaN where it was not recomputed.
    """

    active_counts: torch.Tensor
    attention_to_keys: torch.Tensor | None = None
    value_drift: torch.Tensor | None = None
    extra_flops: float = 0.0  # probes that are not part of a layer's compute (adaptive value probes)
    adaptive_counts: torch.Tensor | None = None  # (n_layers, B) positions added by an adaptive refresh
    extras: dict[str, Any] = field(default_factory=dict)


class LLaDAModel(nn.Module):
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

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.transformer["wte"].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer["wte"].weight.dtype

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.transformer["ln_f"](hidden)
        if self.config.weight_tying:
            logits = F.linear(h, self.transformer["wte"].weight)
        else:
            logits = self.transformer["ff_out"](h)
        # Rows past vocab_size are padding of the embedding table, never real tokens.
        return logits[..., : self.config.vocab_size].float()

    def check_input(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_sequence_length:
            raise ValueError(
                f"sequence of {input_ids.shape[1]} tokens exceeds the model's max_sequence_length="
                f"{self.config.max_sequence_length}: shorten the prompt or gen_length"
            )

    def forward(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, return_kv: bool = False):
        """Plain forward over the whole canvas.

        input_ids: (B, N); key_mask: (B, N) bool, False for padding (never attended to); positions: (B, N) rotary
        positions (default 0..N-1). Returns logits (B, N, vocab) in fp32, and with return_kv the per-layer
        (keys, values) lists, each (B, n_kv_heads, N, head_dim), for oracle drift measurement.
        """
        self.check_input(input_ids)
        B, N = input_ids.shape
        if positions is None:
            positions = torch.arange(N, device=input_ids.device).expand(B, N)
        x = self.transformer["wte"](input_ids)
        keys, values = [], []
        for block in self.transformer["blocks"]:
            q, k, v = block.qkv(x, positions)
            if return_kv:
                keys.append(k)
                values.append(v)
            x = block.finish(x, q, k, v, key_mask)
        logits = self.lm_head(x)
        return (logits, keys, values) if return_kv else logits

    def forward_partial(self, input_ids: torch.Tensor, cache: BlockKVCache, start_layer: torch.Tensor,
                        logit_positions: torch.Tensor, trace_attention: bool | str = False,
                        adaptive: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, PartialForwardTrace]:
        """Forward that recomputes position p only in layers >= start_layer[b, p] and reuses the cache elsewhere.

        input_ids: (B, N) canvas; start_layer: (B, N) ints in [0, n_layers] (n_layers = reuse in every layer);
        logit_positions: (B, n_out) positions whose logits are returned; they must start at layer 0.
        trace_attention: True/"all": record every layer's attention of the logit queries (Elastic-Cache reads them);
            "last": the last layer's only (all the feature schema reads); False: none.
        adaptive: optional (candidates (B, N) bool, fraction rho): dLLM-Cache's per-layer rule; at each layer the
            candidates' values are recomputed from the layer's current input, and the rho fraction least similar to
            the cached values are recomputed in that layer too.
        The cache's keys, values and layer inputs are updated in place at every computed position.
        Returns logits (B, n_out, vocab) and a trace.
        """
        self.check_input(input_ids)
        cfg = self.config
        B, N = input_ids.shape
        rows = torch.arange(B, device=input_ids.device)[:, None]
        if not bool((start_layer.gather(1, logit_positions) == 0).all()):
            raise ValueError("every logit position must be recomputed from layer 0 (start_layer == 0)")

        first = start_layer == 0
        if bool(first.any()):
            idx, _ = active_index(first)
            cache.hidden[0][rows, idx] = self.transformer["wte"](input_ids.gather(1, idx))

        active_counts = torch.zeros(cfg.n_layers, B, dtype=torch.long)
        adaptive_counts = torch.zeros(cfg.n_layers, B, dtype=torch.long) if adaptive is not None else None
        check_trace_attention(trace_attention)
        traced = [] if not trace_attention else [cfg.n_layers - 1] if trace_attention == "last" else range(cfg.n_layers)
        attention = torch.zeros(len(traced), B, logit_positions.shape[1], N) if traced else None
        drift_sum = torch.zeros(B, N, device=input_ids.device)
        drift_n = torch.zeros(B, N, device=input_ids.device)
        extra_flops = 0.0
        out = None
        for layer, block in enumerate(self.transformer["blocks"]):
            active = start_layer <= layer
            if adaptive is not None:
                candidates, rho = adaptive
                chosen, probe_flops = self._adaptive_choice(block, cache, layer, candidates & ~active, rho)
                extra_flops += probe_flops
                adaptive_counts[layer] = chosen.sum(1).cpu()
                active = active | chosen
            idx, counts = active_index(active)
            active_counts[layer] = counts.cpu()
            real = packing_mask(idx, counts)
            x = cache.hidden[layer][rows, idx]
            q, k, v = block.qkv(x, cache.positions.gather(1, idx), real)
            # Drift probe at no extra cost: compare each recomputed value with the one it replaces.
            was_computed = cache.computed[layer].gather(1, idx)
            old_v = cache.values[layer][rows, :, idx]  # (B, n, kv_heads, head_dim)
            cos = F.cosine_similarity(old_v.flatten(2).float(), v.transpose(1, 2).flatten(2).float(), dim=-1)
            drift = torch.where(was_computed, 1.0 - cos, torch.zeros_like(cos))
            drift_sum.scatter_add_(1, idx, drift * unique_mask(idx, counts))
            drift_n.scatter_add_(1, idx, was_computed.float() * unique_mask(idx, counts))
            cache.keys[layer][rows, :, idx] = k.transpose(1, 2)
            cache.values[layer][rows, :, idx] = v.transpose(1, 2)
            cache.computed[layer][rows, idx] = True
            if layer in traced:
                attention[layer - cfg.n_layers] = self._attention_to_keys(q, cache, layer, idx, logit_positions)
            x = block.finish(x, q, cache.keys[layer], cache.values[layer], cache.key_mask, real)
            if layer + 1 < cfg.n_layers:
                cache.hidden[layer + 1][rows, idx] = x
            else:
                out = x
        # Logit positions are active in the last layer; find them among its active rows (idx is that layer's).
        where = (idx[:, None, :] == logit_positions[:, :, None]).float().argmax(-1)
        final = out.gather(1, where[..., None].expand(-1, -1, out.shape[-1]))
        nan = torch.full_like(drift_sum, float("nan"))
        value_drift = torch.where(drift_n > 0, drift_sum / drift_n.clamp(min=1), nan)
        trace = PartialForwardTrace(active_counts=active_counts, attention_to_keys=attention, value_drift=value_drift,
                                    extra_flops=extra_flops, adaptive_counts=adaptive_counts)
        return self.lm_head(final), trace

    def _adaptive_choice(self, block: LLaDABlock, cache: BlockKVCache, layer: int, candidates: torch.Tensor,
                         rho: float) -> tuple[torch.Tensor, float]:
        """dLLM-Cache: recompute values of the candidates from the layer input, keep the rho least similar."""
        B, N = candidates.shape
        chosen = torch.zeros_like(candidates)
        if not bool(candidates.any()):
            return chosen, 0.0
        rows = torch.arange(B, device=candidates.device)[:, None]
        idx, counts = active_index(candidates)
        x = cache.hidden[layer][rows, idx]
        v_new = block.v_proj(block.attn_norm(x))  # (B, n, d_kv); values carry no rotary embedding
        v_old = cache.values[layer][rows, :, idx].flatten(2)
        similarity = F.cosine_similarity(v_new.float(), v_old.float(), dim=-1)
        valid = unique_mask(idx, counts).bool()
        similarity = similarity.masked_fill(~valid, float("inf"))
        for b in range(B):
            k = math.ceil(rho * int(counts[b]))
            if k > 0:
                pick = similarity[b].topk(k, largest=False).indices
                chosen[b, idx[b, pick]] = True
        probe_flops = 2.0 * float(counts.sum()) * self.config.d_model * self.config.d_kv
        return chosen, probe_flops

    def _attention_to_keys(self, q: torch.Tensor, cache: BlockKVCache, layer: int, idx: torch.Tensor,
                           logit_positions: torch.Tensor) -> torch.Tensor:
        """Attention of each logit query on each key, averaged over heads: (B, n_out, N)."""
        where = (idx[:, None, :] == logit_positions[:, :, None]).float().argmax(-1)  # (B, n_out)
        qd = q.gather(2, where[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        keys = cache.keys[layer]
        if keys.shape[1] != qd.shape[1]:
            keys = keys.repeat_interleave(qd.shape[1] // keys.shape[1], dim=1)
        scores = (qd.float() @ keys.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~cache.key_mask[:, None, None, :], float("-inf"))
        return scores.softmax(-1).mean(dim=1).cpu()


def active_index(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where `active` is True, per row, as a padded index (B, n) plus the real count per row.

    Rows with fewer active positions are padded by repeating their first active position: recomputing a position
    twice writes the same values twice, so padding never changes the result (and accounting uses the counts).
    """
    B, N = active.shape
    counts = active.sum(1)
    n = int(counts.max())
    if n == 0:
        raise ValueError("a partial forward needs at least one active position per layer")
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :n]  # active positions first, in order
    slot = torch.arange(n, device=active.device)[None, :]
    return torch.where(slot < counts[:, None], order, order[:, :1]), counts


def check_trace_attention(value: bool | str) -> None:
    """trace_attention of `forward_partial` / `DecodingSession`: True or "all", "last", or False."""
    if value not in (True, False, "all", "last"):
        raise ValueError(f"trace_attention={value!r}; use True/'all', 'last' or False")


PACK_BELOW = 0.85  # pack the per-position layers when real positions fill less than this share of the padded batch


def packing_mask(idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """The real (non-padding) slots of a padded index when packing them pays, else None (see `rowwise`)."""
    if idx.shape[0] == 1 or int(counts.min()) < 1:
        return None
    if float(counts.sum()) >= PACK_BELOW * idx.numel():
        return None
    return unique_mask(idx, counts).bool()


def unique_mask(idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """1.0 for the real entries of a padded index from `active_index`, 0.0 for the padding."""
    slot = torch.arange(idx.shape[1], device=idx.device)[None, :]
    return (slot < counts[:, None]).float()

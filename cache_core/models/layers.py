"""Layers every family shares: RMSNorm and the rotate-half rotary embedding, with each family's numerics as a switch.

LLaDA computes both in fp32 and casts once at the end; transformers' Qwen2/Llama code (Dream, LLaDA-MoE) casts back to
the activations' dtype before the norm's weight and casts cos/sin to that dtype. In fp32 the two agree bit for bit;
in bf16 each family keeps the numerics of its reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32. weight_in_fp32: scale before casting back (LLaDA) or after (HF)."""

    def __init__(self, dim: int, eps: float, weight_in_fp32: bool = True):
        super().__init__()
        self.eps = eps
        self.weight_in_fp32 = weight_in_fp32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_fp32:
            return (x32 * self.weight.float()).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int | None = None,
               fp32: bool = True) -> torch.Tensor:
    """Rotary embedding, rotate-half convention, on the first rotary_dim channels of each head (all by default).

    x: (B, heads, n, head_dim); positions: (B, n) integer positions of those n tokens. fp32: rotate in fp32 and cast
    once (LLaDA), else cast cos/sin to x's dtype and rotate in it (transformers)."""
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    channels = torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.int64).float()
    inv_freq = 1.0 / (theta ** (channels / rotary_dim))
    angles = positions.float()[:, None, :, None] * inv_freq  # (B, 1, n, rotary_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    work = x.float() if fp32 else x
    if not fp32:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, passed = work[..., :rotary_dim], work[..., rotary_dim:]
    rot = rot * cos + rotate_half(rot) * sin
    out = torch.cat((rot, passed), dim=-1) if passed.shape[-1] else rot
    return out.to(x.dtype)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional SDPA of q (B, heads, n, hd) over (keys, values) (B, kv_heads, N, hd), padding keys masked out;
    grouped KV heads are shared by their query heads. Returns the heads side by side: (B, n, heads * hd)."""
    B, _, n, _ = q.shape
    mask = None if key_mask is None else key_mask[:, None, None, :]
    grouped = keys.shape[1] != q.shape[1]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=grouped)
    return out.transpose(1, 2).reshape(B, n, -1)

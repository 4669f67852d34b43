"""A class-conditional diffusion transformer (DiT, Peebles & Xie 2023) for images, in one readable file.

    image (B, C, H, W) --patchify--> tokens (B, N, d) + fixed 2-D sin-cos positions
    c = timestep embedding + class embedding (class n_classes = "no class", for classifier-free guidance)
    each layer: x += gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
                x += gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))     (6 modulations from c: adaLN-Zero)
    final:     eps = Linear(modulate(LN(x), shift, scale)) --unpatchify--> (B, C, H, W)

The network predicts the noise eps of a DDPM forward process (linear betas over `train_timesteps`); sampling is DDIM
(`cache_core.image.session`). The block cache of this family keeps, per layer and patch token, the keys, the values
and the layer's residual update `x_{l+1} - x_l` (attention + MLP, gated); a token reused in a layer adds its cached
update to the fresh residual stream, so the final layer always sees a fresh embedding of the current noisy image plus
cached updates (FORA / ToCa's reuse of layer outputs). `forward_partial` runs that under a per-(token, layer)
recompute mask; with every entry set it computes exactly what `forward` does.

It implements the checkpoint protocol of `DiffusionModel` (config.json + model.safetensors through
`cache_core.checkpoint`), not the text primitives: `modality = "image"`, and the text session refuses it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cache_core import validate as v
from cache_core.models.base import DiffusionModel, active_index, read_config

if TYPE_CHECKING:
    from cache_core.image.cache import ImageBlockCache


@dataclass
class DiTConfig:
    image_size: int = 8
    channels: int = 1
    patch_size: int = 1
    n_classes: int = 10
    d_model: int = 64
    n_layers: int = 6
    n_heads: int = 4
    mlp_ratio: float = 4.0
    train_timesteps: int = 1000  # DDPM discretisation of the forward process
    beta_start: float = 1e-4
    beta_end: float = 0.02
    class_dropout: float = 0.1  # training-time share of "no class" labels (classifier-free guidance)

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "patch_size", "n_classes", "d_model", "n_layers", "n_heads",
                     "train_timesteps"):
            v.number(f"DiTConfig.{name}", getattr(self, name), integer=True, low=1)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 4:
            raise ValueError("d_model / n_heads must be a multiple of 4 (2-D sin-cos positions)")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start ({self.beta_start}) < beta_end ({self.beta_end}) < 1")
        v.number("DiTConfig.class_dropout", self.class_dropout, low=0.0, high=1.0, open_high=True)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        return self.grid ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** 2 * self.channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.d_model * self.mlp_ratio)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / DiT): (grid * grid, dim), row-major over the patch grid."""
    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d // 2))
        angles = pos.double()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_axis(ys.flatten(), dim // 2), one_axis(xs.flatten(), dim // 2)], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal embedding of (B,) integer timesteps: (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, d // cfg.n_heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(d, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, d)
        self.adaLN = nn.Linear(d, 6 * d)  # zero-initialised: every layer starts as the identity (adaLN-Zero)

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, d) conditioning -> shift/scale/gate of attention and MLP, each (B, d)."""
        return self.adaLN(F.silu(c)).chunk(6, dim=-1)

    def qkv_of(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, n, d) -> q, k, v, each (B, heads, n, head_dim)."""
        B, n, _ = x.shape
        h = modulate(self.norm1(x), mod[0], mod[1])
        q, k, v = self.qkv(h).view(B, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def update(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The layer's residual update of the rows of x (attention of q over keys/values, then the MLP): (B, n, d)."""
        B, n, d = x.shape
        attn = F.scaled_dot_product_attention(q, keys, values).transpose(1, 2).reshape(B, n, d)
        delta_attn = mod[2][:, None] * self.proj(attn)
        h = modulate(self.norm2(x + delta_attn), mod[3], mod[4])
        return delta_attn + mod[5][:, None] * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class DiTModel(DiffusionModel):
    """Class-conditional DiT over patch tokens (see the module docstring)."""

    family: ClassVar[str] = "dit"
    modality: ClassVar[str] = "image"
    weight_names_hint: ClassVar[str] = "DiT names (patch_embed.*, layers.N.qkv.*, final.*)"
    layer_count_key: ClassVar[str] = "n_layers"
    shape_keys: ClassVar[str] = "image_size, channels, patch_size, n_classes, d_model, n_heads, mlp_ratio"

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.patch_embed = nn.Linear(cfg.patch_dim, d)
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.class_embed = nn.Embedding(cfg.n_classes + 1, d)  # the last row is "no class"
        self.layers = nn.ModuleList(DiTLayer(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Linear(d, 2 * d)
        self.final = nn.Linear(d, cfg.patch_dim)
        self.register_buffer("pos", sincos_2d(cfg.grid, d), persistent=False)
        self.register_buffer("alphas_cumprod", self._alphas_cumprod(), persistent=False)

    def _alphas_cumprod(self) -> torch.Tensor:
        cfg = self.config
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.train_timesteps, dtype=torch.float64)
        return torch.cumprod(1 - betas, 0)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        # The fixed buffers are not in the checkpoint: rebuild them where the weights now live (the loader builds
        # the module on the meta device).
        device, dtype = self.patch_embed.weight.device, self.patch_embed.weight.dtype
        self.pos = sincos_2d(self.config.grid, self.config.d_model).to(device=device, dtype=dtype)
        self.alphas_cumprod = self._alphas_cumprod().to(device)
        return result

    def reset_parameters(self) -> None:
        """DiT's initialisation: Xavier linears, zero adaLN and output layers (each block starts as the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.normal_(self.t_mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_mlp[2].weight, std=0.02)
        for layer in self.layers:
            nn.init.zeros_(layer.adaLN.weight)
            nn.init.zeros_(layer.adaLN.bias)
        for module in (self.final_adaLN, self.final):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def n_tokens(self) -> int:
        return self.config.n_tokens

    # --- the pieces the sampler and the cache use ------------------------------------------------------------------
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C) patches, row-major."""
        cfg = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"images must be (batch, {cfg.channels}, {cfg.image_size}, {cfg.image_size}), got shape "
                             f"{tuple(images.shape)}")
        B, g, p = images.shape[0], cfg.grid, cfg.patch_size
        x = images.reshape(B, cfg.channels, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, g * g, cfg.patch_dim)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        B, g, p = patches.shape[0], cfg.grid, cfg.patch_size
        x = patches.reshape(B, g, g, p, p, cfg.channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, cfg.channels, cfg.image_size, cfg.image_size)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Layer-0 input: patch embedding + positions, (B, N, d)."""
        return self.patch_embed(self.patchify(images)) + self.pos

    def conditioning(self, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps and (B,) class ids (n_classes = no class) -> (B, d)."""
        if bool(((labels < 0) | (labels > self.config.n_classes)).any()):
            raise ValueError(f"class labels must lie in [0, {self.config.n_classes}] ({self.config.n_classes} = no "
                             "class)")
        return self.t_mlp(timestep_embedding(t).to(self.dtype)) + self.class_embed(labels)

    def head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final adaLN + linear + unpatchify: predicted noise (B, C, H, W)."""
        shift, scale = self.final_adaLN(F.silu(c)).chunk(2, dim=-1)
        return self.unpatchify(self.final(modulate(self.final_norm(x), shift, scale)))

    def forward(self, images: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, return_state: bool = False):
        """Plain forward: predicted noise (B, C, H, W); with return_state also per layer (keys, values, updates)."""
        c = self.conditioning(t, labels)
        x = self.tokens(images)
        keys, values, updates = [], [], []
        for layer in self.layers:
            mod = layer.modulation(c)
            q, k, v = layer.qkv_of(x, mod)
            delta = layer.update(x, q, k, v, mod)
            if return_state:
                keys.append(k)
                values.append(v)
                updates.append(delta)
            x = x + delta
        eps = self.head(x, c)
        return (eps, keys, values, updates) if return_state else eps

    def forward_partial(self, images: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cache: ImageBlockCache,
                        recompute: torch.Tensor, trace_attention: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward that recomputes token p in layer l only where recompute[b, p, l], reusing the cache elsewhere.

        recompute: (B, N, n_layers) bool. A recomputed token's keys, values and residual update are written into the
        cache; a reused one keeps its cached keys/values (other tokens attend to them) and adds its cached update.
        Returns the predicted noise and a trace: active_counts (n_layers, B), attention (B, N) of the last layer's
        queries on each key (mean over heads and queries, when traced), update_drift (B, N): 1 - cos(old, new update)
        averaged over the layers where the token was recomputed and had been computed before (NaN elsewhere).
        """
        B, N, L = recompute.shape
        if (N, L) != (self.n_tokens, self.n_layers):
            raise ValueError(f"recompute must be (batch, {self.n_tokens} tokens, {self.n_layers} layers), got "
                             f"{tuple(recompute.shape)}")
        c = self.conditioning(t, labels)
        x = self.tokens(images)
        rows = torch.arange(B, device=images.device)[:, None]
        active_counts = torch.zeros(L, B, dtype=torch.long)
        drift_sum = torch.zeros(B, N, device=images.device)
        drift_n = torch.zeros(B, N, device=images.device)
        attention = None
        for l, layer in enumerate(self.layers):
            mod = layer.modulation(c)
            active = recompute[:, :, l]
            active_counts[l] = active.sum(1).cpu()
            if bool(active.any()):
                # A row with nothing to recompute runs every token as a dummy whose results are not written.
                idx, counts = active_index(active | ~active.any(1, keepdim=True))
                write = active.gather(1, idx)  # padding slots repeat an active token: writing it twice is harmless
                unique = write & (torch.arange(idx.shape[1], device=idx.device)[None] < counts[:, None])
                xa = x[rows, idx]
                q, k, v = layer.qkv_of(xa, mod)
                w4 = write[..., None, None]
                cache.keys[l][rows, :, idx] = torch.where(w4, k.transpose(1, 2), cache.keys[l][rows, :, idx])
                cache.values[l][rows, :, idx] = torch.where(w4, v.transpose(1, 2), cache.values[l][rows, :, idx])
                delta = layer.update(xa, q, cache.keys[l], cache.values[l], mod)
                old = cache.updates[l][rows, idx]
                was = cache.computed[l].gather(1, idx) & unique
                cos = F.cosine_similarity(old.float(), delta.float(), dim=-1)
                drift_sum.scatter_add_(1, idx, torch.where(was, 1.0 - cos, torch.zeros_like(cos)))
                drift_n.scatter_add_(1, idx, was.float())
                cache.updates[l][rows, idx] = torch.where(write[..., None], delta, old)
                cache.computed[l] |= active
                if trace_attention and l == L - 1:
                    scores = (q.float() @ cache.keys[l].float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
                    probs = scores.softmax(-1).mean(1)  # (B, n, N): mean over heads
                    weight = unique.float()[..., None]
                    attention = (probs * weight).sum(1) / weight.sum(1).clamp(min=1)
            x = x + cache.updates[l]
        eps = self.head(x, c)
        nan = torch.full_like(drift_sum, float("nan"))
        trace = {"active_counts": active_counts, "attention": attention,
                 "update_drift": torch.where(drift_n > 0, drift_sum / drift_n.clamp(min=1), nan)}
        return eps, trace

    # --- accounting -----------------------------------------------------------------------------------------------
    def layer_flops(self, n_queries: torch.Tensor | float, n_keys: torch.Tensor | float, layer: int = 0
                    ) -> torch.Tensor | float:
        """One layer for n recomputed tokens over N keys: qkv 2·n·d·3d + out 2·n·d·d + MLP 2·n·2·d·f + attention
        4·n·N·d (the per-image adaLN modulation, 2·d·6d, is counted once per step in `step_overhead_flops`)."""
        cfg = self.config
        d, f = cfg.d_model, cfg.mlp_hidden
        return 2 * n_queries * d * 4 * d + 4 * n_queries * d * f + 4 * n_queries * n_keys * d

    def step_overhead_flops(self, batch: int) -> float:
        """What every step computes whatever the plan: conditioning, every layer's modulation, the patch embedding
        and the final layer over all tokens."""
        cfg = self.config
        d, N = cfg.d_model, cfg.n_tokens
        per_image = 2 * (256 * d + d * d) + cfg.n_layers * 2 * d * 6 * d + 2 * d * 2 * d
        per_image += 2 * N * cfg.patch_dim * d * 2  # patch embedding in, final linear out
        return float(batch * per_image)

    # --- checkpoint protocol --------------------------------------------------------------------------------------
    @classmethod
    def config_from_dict(cls, raw: dict[str, Any], source: str) -> DiTConfig:
        return read_config(DiTConfig, raw, source, required={"image_size", "patch_size", "d_model", "n_layers",
                                                             "n_heads"},
                           supported={}, ignored={"model_type", "blockreuse"})

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def checkpoint_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    @property
    def facts(self):
        raise TypeError("a DiT is an image diffusion model: sample it with cache_core.image.sample_images (the text "
                        "generate() / DecodingSession need a masked-diffusion LM)")

"""Shared test helpers: tiny random models, an independent LLaDA forward, a plain no-cache LLaDA generate loop.

Nothing here calls the engine's layer code: `reference_logits` re-derives LLaDA's maths from the state_dict tensors
with plain torch ops (float64), and `reference_generate` is LLaDA's whole-canvas sampling loop written from the
published description of LLaDA's sampling (canvas, linear schedule, low-confidence remasking). Tests compare the engine
against these.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cache_core.models import LLaDAModel, ModelConfig

# Tiny models: vocabulary 40 padded to an embedding of 48 rows (like LLaDA pads its embedding). The mask token lives
# in the padded rows, outside the predicted vocabulary, so a random model can never predict it (a model that predicts
# the mask id trips an engine bug that has its own test, see test_generate_errors.py).
VOCAB = 40
EMBEDDING = 48
MASK_ID = 45


def tiny_config(n_kv_heads: int | None = None, **overrides: Any) -> ModelConfig:
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB, mask_token_id=MASK_ID, embedding_size=EMBEDDING, d_model=32, n_layers=2, n_heads=4,
        n_kv_heads=n_kv_heads, mlp_hidden_size=48, max_sequence_length=128, rope_theta=10000.0, rms_norm_eps=1e-5,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def random_state(cfg: ModelConfig, seed: int, head_gain: float = 2.0) -> dict[str, torch.Tensor]:
    """A random LLaDA state_dict (names without the `model.` prefix), scaled so that predictions are peaked.

    Embeddings ~ N(0, 1), projections ~ N(0, 1/fan_in), norm weights ~ 1 + 0.2 N(0, 1) (so that a forgotten norm
    weight shows), head ~ N(0, head_gain^2 / d_model) (logits of a few units: confident, well separated argmaxes).
    """
    g = torch.Generator().manual_seed(seed)
    d, d_kv, f, E = cfg.d_model, cfg.d_kv, cfg.mlp_hidden_size, cfg.embedding_size

    def w(out_f: int, in_f: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) * gain / math.sqrt(in_f)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(n, generator=g)

    state = {"transformer.wte.weight": torch.randn(E, d, generator=g)}
    for i in range(cfg.n_layers):
        p = f"transformer.blocks.{i}."
        state.update({
            p + "attn_norm.weight": norm(d), p + "ff_norm.weight": norm(d),
            p + "q_proj.weight": w(d, d), p + "k_proj.weight": w(d_kv, d), p + "v_proj.weight": w(d_kv, d),
            p + "attn_out.weight": w(d, d), p + "ff_proj.weight": w(f, d), p + "up_proj.weight": w(f, d),
            p + "ff_out.weight": w(d, f),
        })
    state["transformer.ln_f.weight"] = norm(d)
    if not cfg.weight_tying:
        state["transformer.ff_out.weight"] = w(E, d, head_gain)
    return state


def tiny_model(seed: int = 0, n_kv_heads: int | None = None, head_gain: float = 2.0, **overrides: Any) -> LLaDAModel:
    """A tiny random LLaDA-architecture model in eval mode (deterministic in `seed`, global RNG untouched)."""
    cfg = tiny_config(n_kv_heads=n_kv_heads, **overrides)
    model = LLaDAModel(cfg)
    model.load_state_dict(random_state(cfg, seed, head_gain))
    return model.eval()


def random_prompts(lengths: list[int], seed: int, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------------------------
# Independent implementation of LLaDA's forward, from the state_dict tensors
# ---------------------------------------------------------------------------------------------------------------
def reference_logits(state: dict[str, torch.Tensor], cfg: dict[str, Any] | ModelConfig, input_ids: torch.Tensor,
                     key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                     prefix: str = "") -> torch.Tensor:
    """LLaDA forward in float64 with plain torch ops: (B, N) ids -> (B, N, vocab_size) logits.

    RMSNorm (x * rsqrt(mean(x^2) + eps) * w), rotate-half RoPE, bidirectional attention over the keys where key_mask
    is True, KV head j shared by query heads [j*g, (j+1)*g), SwiGLU with silu(ff_proj) * up_proj, untied head
    (or the embedding when weight_tying), logits cut to vocab_size.
    """
    c = cfg.to_dict() if isinstance(cfg, ModelConfig) else dict(cfg)
    d, H, L = c["d_model"], c["n_heads"], c["n_layers"]
    KV = c.get("n_kv_heads") or H
    hd = d // H
    eps, theta = float(c["rms_norm_eps"]), float(c["rope_theta"])

    def W(name: str) -> torch.Tensor:
        return state[prefix + name].to(torch.float64)

    B, N = input_ids.shape
    if positions is None:
        positions = torch.arange(N).expand(B, N)
    if key_mask is None:
        key_mask = torch.ones(B, N, dtype=torch.bool)

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = positions.to(torch.float64)[:, :, None] * inv_freq  # (B, N, hd/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, :, None, :]  # (B, N, 1, hd)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, :, None, :]

    def rope(t: torch.Tensor) -> torch.Tensor:  # (B, N, heads, hd)
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    x = W("transformer.wte.weight")[input_ids]
    bias = torch.zeros(B, 1, 1, N, dtype=torch.float64).masked_fill(~key_mask[:, None, None, :], float("-inf"))
    for i in range(L):
        p = f"transformer.blocks.{i}."
        h = rms(x, W(p + "attn_norm.weight"))
        q = rope((h @ W(p + "q_proj.weight").T).view(B, N, H, hd))
        k = rope((h @ W(p + "k_proj.weight").T).view(B, N, KV, hd))
        v = (h @ W(p + "v_proj.weight").T).view(B, N, KV, hd)
        group = H // KV
        k = torch.stack([k[:, :, j // group] for j in range(H)], dim=2)  # query head j reads KV head j // group
        v = torch.stack([v[:, :, j // group] for j in range(H)], dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + bias
        att = torch.softmax(scores, dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, N, d)
        x = x + o @ W(p + "attn_out.weight").T
        h = rms(x, W(p + "ff_norm.weight"))
        gate = h @ W(p + "ff_proj.weight").T
        x = x + (gate * torch.sigmoid(gate) * (h @ W(p + "up_proj.weight").T)) @ W(p + "ff_out.weight").T
    h = rms(x, W("transformer.ln_f.weight"))
    head = W("transformer.wte.weight") if c.get("weight_tying") else W("transformer.ff_out.weight")
    return (h @ head.T)[..., : c["vocab_size"]]


def model_state(model: LLaDAModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# Plain no-cache LLaDA generate loop
# ---------------------------------------------------------------------------------------------------------------
def left_pad(prompts: list[list[int]], width: int, pad_ids: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts to `width`: ids, key_mask (False on padding), positions (0 at each row's first real token)."""
    B = len(prompts)
    ids = torch.zeros(B, width, dtype=torch.long) if pad_ids is None else pad_ids[:, :width].clone()
    key_mask = torch.zeros(B, width, dtype=torch.bool)
    positions = torch.zeros(B, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        s = width - len(p)
        ids[b, s:] = torch.tensor(p)
        key_mask[b, s:] = True
        positions[b, s:] = torch.arange(len(p))
    return ids, key_mask, positions


def linear_schedule(mask_count: int, steps: int) -> list[int]:
    base, rem = divmod(mask_count, steps)
    return [base + 1 if i < rem else base for i in range(steps)]


@torch.no_grad()
def reference_generate(model: LLaDAModel, prompts: list[list[int]], gen_length: int, block_length: int,
                       steps: int | None, threshold: float | None = None, pad_seed: int = 1234
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """LLaDA's generate, no cache: whole-canvas forward every step, linear schedule, low-confidence remasking.

    Prompts are left-padded to the longest prompt with *random* padding ids (they must never matter), key_mask hides
    the padding, positions start at 0 at each row's first real token. With `threshold` (Fast-dLLM parallel decoding)
    every masked token of the block whose confidence >= threshold is committed, and at least the most confident one,
    until the block is complete. Temperature 0. Returns the generated tokens (B, gen_length) and the logits of the
    decoding block at every step, each (B, block_length, vocab).
    """
    cfg = model.config
    mask_id = cfg.mask_token_id
    B, P = len(prompts), max(len(p) for p in prompts)
    N = P + gen_length
    g = torch.Generator().manual_seed(pad_seed)
    pad_ids = torch.randint(0, cfg.vocab_size, (B, N), generator=g)
    pad_ids[pad_ids == mask_id] = 0
    ids, key_mask, positions = left_pad(prompts, P, pad_ids)
    # The generation region: real positions, masked, continuing each row's positions.
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.cat([ids, torch.full((B, gen_length), mask_id)], dim=1)
    key_mask = torch.cat([key_mask, torch.ones(B, gen_length, dtype=torch.bool)], dim=1)
    positions = torch.cat([positions, lengths[:, None] + torch.arange(gen_length)[None, :]], dim=1)
    device = next(model.parameters()).device  # a CUDA model runs its reference there too
    ids, key_mask, positions = ids.to(device), key_mask.to(device), positions.to(device)

    n_blocks = gen_length // block_length
    block_logits: list[torch.Tensor] = []
    for nb in range(n_blocks):
        s, e = P + nb * block_length, P + (nb + 1) * block_length
        schedule = None if threshold is not None else linear_schedule(block_length, steps // n_blocks)
        i = 0
        while True:
            if threshold is None and i == len(schedule):
                break
            if threshold is not None and not bool((ids[:, s:e] == mask_id).any()):
                break
            logits = model(ids, key_mask, positions)  # (B, N, V)
            block_logits.append(logits[:, s:e].clone())
            x0 = logits.argmax(-1)
            p = torch.softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            p[:, e:] = float("-inf")
            mask_index = ids == mask_id
            conf = torch.where(mask_index, p, torch.full_like(p, float("-inf")))
            for b in range(B):
                n_masked = int(mask_index[b, s:e].sum())
                if n_masked == 0:
                    continue
                if threshold is None:
                    sel = conf[b].topk(min(schedule[i], n_masked)).indices
                else:
                    keep = (conf[b] >= threshold) & mask_index[b]
                    keep[conf[b].argmax()] = True
                    sel = keep.nonzero().flatten()
                ids[b, sel] = x0[b, sel]
            i += 1
    return ids[:, P:].clone().cpu(), [b.cpu() for b in block_logits]


# ---------------------------------------------------------------------------------------------------------------
# LLaDA-format checkpoint directories
# ---------------------------------------------------------------------------------------------------------------
def llada_config(cfg: ModelConfig, **overrides: Any) -> dict[str, Any]:
    """LLaDA's config.json key set (as GSAI-ML/LLaDA-8B-Instruct ships it), with this model's shapes."""
    raw: dict[str, Any] = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM", "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": cfg.d_model,
        "embedding_dropout": 0.0, "embedding_size": cfg.embedding_size, "eos_token_id": 2, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": cfg.mask_token_id,
        "max_sequence_length": cfg.max_sequence_length, "mlp_hidden_size": cfg.mlp_hidden_size, "mlp_ratio": 4,
        "model_type": "llada", "multi_query_attention": None, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "n_layers": cfg.n_layers, "pad_token_id": 2, "precision": "amp_bf16", "residual_dropout": 0.0,
        "rms_norm_eps": cfg.rms_norm_eps, "rope": True, "rope_full_precision": True, "rope_theta": cfg.rope_theta,
        "scale_logits": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": False,
        "vocab_size": cfg.vocab_size, "weight_tying": cfg.weight_tying,
    }
    raw.update(overrides)
    return raw


def write_llada_dir(directory: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], n_shards: int = 3,
                    config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Write a LLaDA-style checkpoint: config.json and weights named `model.transformer.*`, sharded like LLaDA
    (model-0000i-of-0000n.safetensors + model.safetensors.index.json) or one model.safetensors when n_shards == 1.
    Returns the tensors as written (prefixed names)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"model." + k: v.contiguous() for k, v in state.items()}
    (directory / "config.json").write_text(json.dumps(config if config is not None else llada_config(cfg), indent=2))
    if n_shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return tensors
    names = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::n_shards]}
        save_file(part, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return tensors


# --- W&B offline runs --------------------------------------------------------------------------------------------

_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) records


def wandb_records(path: Path) -> list[bytes]:
    """Raw records of a .wandb transaction log (7-byte ':W&B' header, then full/first/middle/last fragments)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    return out


def compose_cfg(tmp: Path, *overrides: str, logger: str = "none", as_dict: bool = False):
    """The project's typed config (policies.config.RootConfig) with every path under tmp, a quiet trainer, no W&B
    unless asked and no generation check: what `python train.py` would run with these overrides."""
    from policies.config import compose

    base = [
        f"paths.output={tmp / 'out'}", f"paths.model={tmp / 'no-model'}", f"data.shards_dir={tmp / 'shards'}",
        f"logger={logger}", "trainer.max_epochs=3", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "policy.generation_check.enabled=false", "data.batch_size=32",
        "policy.lr=1e-2",
    ]
    return compose([*base, *overrides], as_dict=as_dict)


def read_offline_run(run_dir: Path, timeout: float = 60.0) -> dict[str, set]:
    """Record kinds and keys of an offline run. wandb-core may still be writing the log when wandb.finish() returns
    on a loaded machine, so wait for the run's `exit` record."""
    deadline = time.monotonic() + timeout
    while True:
        found = _read_offline_run(run_dir)
        if "exit" in found["kinds"] or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _read_offline_run(run_dir: Path) -> dict[str, set]:
    from wandb.proto import wandb_internal_pb2 as pb

    found: dict[str, set] = defaultdict(set)
    (log_file,) = run_dir.glob("run-*.wandb")
    for raw in wandb_records(log_file):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        found["kinds"].add(kind)
        if kind == "history":
            found["history"] |= {i.key or "/".join(i.nested_key) for i in record.history.item}
        elif kind == "config":
            found["config"] |= {i.key or "/".join(i.nested_key) for i in record.config.update}
        elif kind == "artifact":
            found["artifacts"].add(record.artifact.name)
            found["artifact_files"] |= {m.path for m in record.artifact.manifest.contents}
        elif kind == "run":
            found["run"] |= {record.run.display_name, record.run.job_type, record.run.project}
    return found

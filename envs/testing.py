"""Tiny random models and prompts for tests and smoke runs (seconds on a CPU, no checkpoint needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from cache_core.models import LLaDAModel, ModelConfig

VOCAB = 24
MASK_ID = 1
EOS_ID = 2


def tiny_model(seed: int = 0, n_layers: int = 2, d_model: int = 32, vocab_size: int = VOCAB,
               max_sequence_length: int = 128) -> LLaDAModel:
    """A random LLaDA model: d_model 32, 2 layers, 4 heads over 2 KV heads."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, mask_token_id=MASK_ID, d_model=d_model, n_layers=n_layers, n_heads=4,
                      n_kv_heads=2, mlp_hidden_size=2 * d_model, max_sequence_length=max_sequence_length)
    return LLaDAModel(cfg).eval()


def random_pairs(n: int = 6, seed: int = 0, min_length: int = 3, max_length: int = 13, answer_length: int = 5,
                 vocab_size: int = VOCAB) -> list[tuple[list[int], list[int]]]:
    """n (prompt_ids, answer_ids) pairs of random non-special tokens with varying prompt lengths."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        length = int(torch.randint(min_length, max_length + 1, (1,), generator=g))
        prompt = torch.randint(3, vocab_size, (length,), generator=g).tolist()
        answer = torch.randint(3, vocab_size, (answer_length,), generator=g).tolist()
        pairs.append((prompt, answer))
    return pairs


def tiny_env_kwargs(**overrides) -> dict:
    """Keyword arguments of a fast BlockReuseEnv on a tiny random model (canvas 16 + 16, blocks of 4)."""
    kwargs = dict(model=tiny_model(), prompts=random_pairs(), eos_id=EOS_ID, gen_length=16, block_length=4, steps=8,
                  max_prompt_length=16, w_flops=1.0, w_kl=1.0, w_flip=1.0, w_exact=1.0, w_agree=1.0)
    kwargs.update(overrides)
    return kwargs


def save_tiny_checkpoint(directory: str | Path, seed: int = 0, n_layers: int = 2) -> Path:
    """A tiny random checkpoint with the built-in character tokenizer (task-suite prompts fit its 256 positions)."""
    from cache_core.checkpoint import save_checkpoint
    from cache_core.tokenizer import Tokenizer

    tok = Tokenizer()
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id, d_model=32, n_layers=n_layers,
                      n_heads=4, n_kv_heads=2, mlp_hidden_size=64, max_sequence_length=256)
    return save_checkpoint(LLaDAModel(cfg).eval(), directory, tokenizer=tok)

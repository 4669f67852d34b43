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


# --- fault injection for the distributed backends' tests (importable by Ray worker processes) ----------------------
def dying_env(marker: str, at_step: int = 2, **env_kwargs):
    """A BlockReuseEnv whose process dies (os._exit, as a SIGKILL or a lost node would end it) at its `at_step`-th
    step, once: the first process to get there writes `marker`, and later processes, which see it, live."""
    import os

    from envs.block_reuse_env import BlockReuseEnv

    env = BlockReuseEnv(**env_kwargs)
    step, count = env.step, [0]

    def step_or_die(action):
        count[0] += 1
        if count[0] == at_step and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)
        return step(action)

    env.step = step_or_die
    return env


DISK_FULL_MARKER = "DISK_FULL_AFTER"  # in a shard directory: the number of shard files its "disk" has room for


def disk_full_save(save):
    """`safetensors.torch.save_file` as on a disk that fills up: once the directory holds as many shards as its
    DISK_FULL_AFTER file says, a write raises OSError(ENOSPC)."""
    import errno

    def save_file(tensors, filename, metadata=None):
        directory = Path(filename).parent
        marker = directory / DISK_FULL_MARKER
        if marker.exists() and len(list(directory.glob("shard-*.safetensors"))) >= int(marker.read_text()):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return save(tensors, filename, metadata=metadata)

    return save_file


def ray_worker_faults() -> None:
    """A Ray `worker_process_setup_hook`: shard writes in the workers go through `disk_full_save`."""
    import envs.shards

    envs.shards.save_file = disk_full_save(envs.shards.save_file)

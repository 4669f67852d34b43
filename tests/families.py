"""Tiny random checkpoints in the real formats of Dream and LLaDA-MoE (config.json as released, sharded safetensors,
a Hugging Face BPE tokenizer with its tokenizer_config.json), written by the tests: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cache_core.bench.tasks import TaskSuite

DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|mdm_mask|>"]
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLADA_TEMPLATE = ("<|startoftext|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                  "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>"
                  "assistant<|end_header_id|>\n\n{% endif %}")
CODE_MARKER = "imported_shipped_code"


def write_bpe_tokenizer(directory: Path, specials: list[str], chat_template: str | None, eos: str, pad: str,
                        mask: str, vocab_size: int = 320, extra: dict[str, Any] | None = None) -> int:
    """A byte-level BPE tokenizer.json trained on the task suite's text, plus tokenizer_config.json naming a custom
    tokenizer class whose module (shipped beside it) would leave a marker file if it were ever imported.
    Returns the tokenizer's size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [e.prompt + e.answer for e in TaskSuite().split("train", 200)]
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "DreamTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]},
              "eos_token": eos, "pad_token": pad, "mask_token": mask, "model_max_length": 4096, **(extra or {})}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "pad_token": pad}))
    (directory / "tokenization_x.py").write_text(
        f"open(__file__.replace('tokenization_x.py', '{CODE_MARKER}'), 'w').write('ran')\n")
    return tok.get_vocab_size()


def write_shards(directory: Path, tensors: dict[str, torch.Tensor], n_shards: int) -> None:
    names = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::n_shards]}
        save_file(part, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def random_tensors(names_shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Random weights: norms near 1, projections with enough gain that tokens are not all alike."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(names_shapes.items()):
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            out[name] = 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5 * (3.0 if "embed" in name else 1.0)
    return out


def dream_config(vocab: int, mask_id: int, pad_id: int, **overrides: Any) -> dict[str, Any]:
    """Dream-v0-Instruct-7B's config.json key set with tiny shapes."""
    raw = {
        "architectures": ["DreamModel"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": pad_id, "eos_token_id": pad_id, "hidden_act": "silu", "hidden_size": 32,
        "initializer_range": 0.02, "intermediate_size": 64, "mask_token_id": mask_id, "max_position_embeddings": 512,
        "max_window_layers": 28, "model_type": "Dream", "num_attention_heads": 4, "num_hidden_layers": 3,
        "num_key_value_heads": 2, "pad_token_id": pad_id, "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2", "use_cache": True, "use_sliding_window": False, "vocab_size": vocab,
    }
    raw.update(overrides)
    return raw


def moe_config(vocab: int, mask_id: int, eos_id: int, **overrides: Any) -> dict[str, Any]:
    """LLaDA-MoE-7B-A1B's config.json key set (model_type "llada" with MoE keys) with tiny shapes."""
    raw = {
        "architectures": ["LLaDAMoEModelLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
        "dense_intermediate_size": 48, "eos_token_id": eos_id, "expert_intermediate_size": 16, "hidden_act": "silu",
        "hidden_size": 32, "initializer_range": 0.02, "mask_token_id": mask_id, "max_position_embeddings": 512,
        "model_type": "llada", "moe_layer_freq": [1, 1, 1], "moe_router_enable_expert_bias": False,
        "moe_router_score_function": "softmax", "num_attention_heads": 4, "num_experts": 6,
        "num_experts_per_tok": 2, "num_hidden_layers": 3, "num_key_value_heads": 4, "output_router_logits": False,
        "pad_token_id": eos_id, "partial_rotary_factor": 1, "qk_layernorm": True, "rms_norm_eps": 1e-5,
        "rope_scaling": None, "rope_theta": 50000, "routed_scaling_factor": 1, "router_num_group": None,
        "router_topk_group": None, "shared_expert_intermediate_size": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.52.4", "use_cache": False, "vocab_size": vocab,
    }
    raw.update(overrides)
    return raw


def write_family_dir(directory: Path, family: str, seed: int = 0, n_shards: int = 2, tokenizer: bool = True,
                     **config_overrides: Any) -> dict[str, Any]:
    """A tiny random `family` ("dream" or "llada_moe") directory in the released layout; returns its config."""
    from cache_core.models import family_of

    directory.mkdir(parents=True, exist_ok=True)
    if family == "dream":
        size = write_bpe_tokenizer(directory, DREAM_SPECIALS, QWEN_TEMPLATE, "<|endoftext|>", "<|endoftext|>",
                                   "<|mask|>") if tokenizer else 320
        ids = _special_ids(directory, DREAM_SPECIALS) if tokenizer else dict(zip(DREAM_SPECIALS, range(4)))
        raw = dream_config(size + 8, ids["<|mask|>"], ids["<|endoftext|>"], **config_overrides)
    else:
        size = write_bpe_tokenizer(directory, LLADA_SPECIALS, LLADA_TEMPLATE, "<|endoftext|>", "<|endoftext|>",
                                   "<|mdm_mask|>") if tokenizer else 320
        ids = _special_ids(directory, LLADA_SPECIALS) if tokenizer else dict(zip(LLADA_SPECIALS, range(6)))
        raw = moe_config(size + 8, ids["<|mdm_mask|>"], ids["<|endoftext|>"], **config_overrides)
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    cls = family_of(raw, "test")
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in cls(cls.config_from_dict(raw, "test")).checkpoint_tensors().items()}
    write_shards(directory, random_tensors(shapes, seed), n_shards)
    return raw


def _special_ids(directory: Path, specials: list[str]) -> dict[str, int]:
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    return {s: vocab[s] for s in specials}

"""Dream (Dream-v0-Base/Instruct-7B, Dream-Coder): a Qwen2-layout decoder run bidirectionally, with shifted logits.

Dream's network predicts the token at position i from its hidden state at i - 1; its generation shifts the logits
right by one (`cat([logits[:, :1], logits[:, :-1]])`). Here that shift is part of the model (`logit_shift = 1`): both
forwards return logits aligned with the positions they predict, and a partial forward computes the position before
the decoding block too (`logit_sources`), which Fast-dLLM's cached Dream path does not (it predicts a block's first
position from itself). q/k/v projections carry biases, o_proj none; GQA; rotate-half RoPE applied before the KV
heads are repeated; left padding uses position ids counted from each row's first real token (the session's rule).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

from cache_core.models.base import read_config
from cache_core.models.hf_layout import DecoderConfig, HFLayoutModel

# Keys that do not change the maths we implement.
_IGNORED = {
    "architectures", "auto_map", "model_type", "torch_dtype", "transformers_version", "use_cache", "initializer_range",
    "attention_dropout", "max_window_layers", "sliding_window", "blockreuse",
    "dtype", "layer_types", "output_attentions", "output_hidden_states", "return_dict",
}
# Keys whose value must be the one implemented; anything else is refused by name.
_SUPPORTED = {
    "hidden_act": {"silu"},
    "use_sliding_window": {False},  # Dream attends to the whole canvas; a window would change every logit
    "rope_scaling": {None},  # no rope-scaling variant is implemented
}
_REQUIRED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "mask_token_id", "rope_theta", "rms_norm_eps"}


class DreamModel(HFLayoutModel):
    family: ClassVar[str] = "dream"
    model_type: ClassVar[str] = "Dream"
    logit_shift: ClassVar[int] = 1

    @classmethod
    def config_from_dict(cls, raw: dict[str, Any], source: str) -> DecoderConfig:
        return read_config(DecoderConfig, raw, source, required=_REQUIRED, supported=_SUPPORTED, ignored=_IGNORED,
                           switches={"qkv_bias": True, "qk_layernorm": False, "partial_rotary_factor": 1.0})

    def config_dict(self) -> dict[str, Any]:
        raw = asdict(self.config)
        for switch in ("qkv_bias", "qk_layernorm", "partial_rotary_factor"):
            raw.pop(switch)
        return {**raw, "hidden_act": "silu", "use_sliding_window": False, "rope_scaling": None}

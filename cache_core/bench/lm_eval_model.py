"""lm-evaluation-harness adapter: evaluate a diffusion LM under a reuse policy with `lm_eval`'s tasks.

    blockreuse-lm-eval run --model blockreuse \
        --model_args pretrained=<model dir>,policy=dual_cache,gen_length=256,block_length=32,threshold=0.9 \
        --tasks gsm8k --batch_size 8 --output_path results/

`blockreuse-lm-eval` is lm_eval's own command line (same subcommands and arguments) with the `blockreuse` model
registered in lm_eval's model registry first. lm_eval 0.4.x (the newest release on PyPI, 0.4.13) finds models only
in its registry, which a package fills by importing a module that calls `@register_model`; it has no entry-point
discovery, so a plain `lm_eval --model blockreuse` cannot know of us without that import. From Python,
`import cache_core.bench.lm_eval_model` registers it for `lm_eval.simple_evaluate(model="blockreuse", ...)`.

model_args: `pretrained` (a model directory, any family), `policy` (a registry name or an exported policy file),
`budget` (budget-conditioned policies), the policy's knob by name (e.g. `refresh_interval=4`), `gen_length`,
`block_length`, `steps` (LLaDA's linear schedule) or `threshold` (parallel decoding), `temperature`, `device`,
`dtype`. `generate_until` runs the one generate loop on batches of `batch_size` prompts and cuts each answer at the
request's stop sequences (`until`); `max_gen_toks` does not change the canvas (`gen_length` sets it, as LLaDA's and
Dream's own harness scripts do). Log-likelihood requests are refused: a masked diffusion LM has no left-to-right
likelihood, and the ELBO estimate LLaDA reports is not what a reuse policy is evaluated on.
After the run the adapter reports the policy's FLOP fraction, tokens per second and tokens per forward (printed, and
written to `<output_path>/blockreuse_stats.json` when `--output_path` is given).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from cache_core.registry import make_policy

log = logging.getLogger(__name__)
STATS_FILE = "blockreuse_stats.json"
_NUMBERS = ("budget", "threshold", "temperature")
_INTEGERS = ("gen_length", "block_length", "steps", "batch_size")


def _value(text: Any) -> Any:
    """lm_eval passes model_args as strings (or already-parsed numbers): numbers and null as such."""
    if not isinstance(text, str):
        return text
    if text.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@register_model("blockreuse")
class BlockReuseLM(LM):
    """A diffusion LM + reuse policy behind lm_eval's `LM` interface (generation requests only)."""

    last: BlockReuseLM | None = None  # the latest instance, whose stats the command line reports

    def __init__(self, pretrained: str, policy: str = "dual_cache", budget: float | None = None,
                 gen_length: int = 256, block_length: int = 32, steps: int | None = None,
                 threshold: float | None = None, temperature: float = 0.0, batch_size: int | str = 1,
                 device: str | None = None, dtype: str | None = None, max_batch_size: int | None = None,
                 **knobs: Any):
        super().__init__()
        import torch

        from cache_core.bench.benchmark import load_model_and_tokenizer

        if steps is None and threshold is None:
            raise ValueError("blockreuse: give steps=<n> (LLaDA's linear schedule) or threshold=<t> (parallel "
                             "decoding) in --model_args")
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval hands every model --device, whose default is cuda: on a CPU machine, say so and run there
            log.warning("blockreuse: --device %s but CUDA is not available; running on the CPU", device)
            device = "cpu"
        self.model, self.tokenizer = load_model_and_tokenizer(pretrained, device=device)
        if dtype is not None:
            self.model = self.model.to(getattr(torch, str(dtype)))
        self.policy_name = str(policy)
        self.knobs = {k: _value(val) for k, val in knobs.items()}
        make_policy(self.policy_name, **self.knobs)  # an unknown policy or knob fails here, before any request
        self.gen = {"gen_length": int(gen_length), "block_length": int(block_length),
                    "steps": None if _value(steps) is None else int(_value(steps)),
                    "threshold": _value(threshold), "temperature": float(_value(temperature))}
        self.budget = _value(budget)
        self.batch = 1 if str(batch_size).startswith("auto") else int(_value(batch_size))
        self.pretrained = str(pretrained)
        self.chat_applied = False
        self.stats = {"flops": 0.0, "full_flops": 0.0, "wall_s": 0.0, "sequences": 0, "sequence_forwards": 0,
                      "generated_positions": 0}
        BlockReuseLM.last = self

    # --- requests -----------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        from cache_core.generate import generate

        outputs: list[str] = []
        bar = tqdm(total=len(requests), desc="blockreuse generate_until", disable=disable_tqdm)
        for start in range(0, len(requests), self.batch):
            chunk = requests[start:start + self.batch]
            prompts = [self.tokenizer.encode(r.args[0], add_special_tokens=not self.chat_applied) for r in chunk]
            kwargs = {"budget": self.budget} if self.budget is not None else {}
            t0 = time.perf_counter()
            result = generate(self.model, prompts, policy=make_policy(self.policy_name, **self.knobs), **self.gen,
                              **kwargs)
            wall = time.perf_counter() - t0
            s = self.stats
            s["flops"] += result.stats.flops
            s["full_flops"] += result.stats.full_flops
            s["wall_s"] += wall
            s["sequences"] += len(chunk)
            s["sequence_forwards"] += len(result.stats.steps) * len(chunk)
            s["generated_positions"] += self.gen["gen_length"] * len(chunk)
            for request, row in zip(chunk, result.tokens):
                outputs.append(_cut(self.tokenizer.decode(row.tolist()), _stops(request.args[1])))
            bar.update(len(chunk))
        bar.close()
        log.info("blockreuse: %s", self.summary())
        return outputs

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "blockreuse: log-likelihood requests are not supported for diffusion generation (a masked diffusion LM "
            "has no left-to-right likelihood); evaluate generation tasks (output_type: generate_until), e.g. gsm8k")

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        raise NotImplementedError("blockreuse: rolling log-likelihood (perplexity) is not supported for diffusion "
                                  "generation; evaluate generation tasks (output_type: generate_until)")

    # --- chat templates -----------------------------------------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.has_chat_template:
            raise ValueError(f"{self.pretrained} has no chat template: drop --apply_chat_template")
        self.chat_applied = True  # the rendered text holds its special tokens: encode it without adding more
        return self.tokenizer.hf.apply_chat_template(chat_history, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer.hf, "chat_template", None) if chat_template else None

    # --- what the run cost --------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        s = self.stats
        return {
            "policy": self.policy_name, "knobs": self.knobs, "budget": self.budget, **self.gen,
            "sequences": s["sequences"],
            "flop_fraction": s["flops"] / s["full_flops"] if s["full_flops"] else None,
            "tokens_per_s": s["generated_positions"] / s["wall_s"] if s["wall_s"] else None,
            "tokens_per_forward": (s["generated_positions"] / s["sequence_forwards"]
                                   if s["sequence_forwards"] else None),
            "wall_s": s["wall_s"],
        }


def _stops(gen_kwargs: Any) -> list[str]:
    until = (gen_kwargs or {}).get("until", []) if isinstance(gen_kwargs, dict) else []
    return [until] if isinstance(until, str) else [u for u in until if u]


def _cut(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop in text:
            text = text[: text.index(stop)]
    return text


def _output_dir(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg in ("--output_path", "-o") and i + 1 < len(argv):
            path = Path(argv[i + 1])
            return path.parent if path.suffix == ".json" else path
        if arg.startswith("--output_path="):
            return Path(arg.split("=", 1)[1])
    return None


def main() -> None:
    """`blockreuse-lm-eval`: lm_eval's command line with the blockreuse model registered; then its cost figures."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
    if BlockReuseLM.last is not None:
        summary = BlockReuseLM.last.summary()
        print("blockreuse:", json.dumps(summary))
        out = _output_dir(sys.argv[1:])
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / STATS_FILE).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

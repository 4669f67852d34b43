"""Where an environment's episodes come from: a fixed, indexable set of prompts and the rule that scores an answer.

Two sources, one interface (`PromptSet`):
- `TokenPromptSet`: explicit (prompt_ids, answer_ids) pairs, e.g. random prompts for a tiny random model in tests.
  Exact match = the generated ids up to the first EOS equal the answer ids.
- `TaskSuitePromptSet`: a split of the built-in task suite (`cache_core.bench.tasks.TaskSuite`), encoded with the
  checkpoint's tokenizer; exact match = `cache_core.bench.tasks.score(tokenizer.decode(generated), example)`, the
  rule the evaluation uses. It is a thin adapter: it only turns `Example`s into token ids and delegates the scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PromptItem:
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...] | None = None
    task: str = ""  # task name when the prompt comes from the task suite


class PromptSet:
    """An indexable, fixed set of prompts plus the exact-match rule of their answers."""

    items: list[PromptItem]
    split: str = "custom"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PromptItem:
        return self.items[index]

    @property
    def has_answers(self) -> bool:
        return all(item.answer_ids is not None for item in self.items)

    @property
    def max_prompt_length(self) -> int:
        return max(len(item.prompt_ids) for item in self.items)

    def exact_match(self, index: int, generated: Sequence[int]) -> bool:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"source": type(self).__name__, "split": self.split, "size": len(self)}


def _ids(x: Any) -> tuple[int, ...]:
    if isinstance(x, torch.Tensor):
        x = x.flatten().tolist()
    return tuple(int(i) for i in x)


class TokenPromptSet(PromptSet):
    """Explicit (prompt_ids, answer_ids) pairs; answer_ids may be None when no exact match is needed."""

    def __init__(self, pairs: Sequence[Any], eos_id: int | None = None, split: str = "custom"):
        items = []
        for i, pair in enumerate(pairs):
            if isinstance(pair, PromptItem):
                items.append(pair)
                continue
            if isinstance(pair, dict):
                prompt, answer = pair.get("prompt_ids"), pair.get("answer_ids")
            elif isinstance(pair, (tuple, list)) and len(pair) == 2 and not isinstance(pair[0], int):
                prompt, answer = pair
            else:  # a bare prompt without an answer
                prompt, answer = pair, None
            prompt_ids = _ids(prompt)
            if not prompt_ids:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
            items.append(PromptItem(prompt_ids, None if answer is None else _ids(answer)))
        self.items = items
        self.eos_id = eos_id
        self.split = split

    def exact_match(self, index: int, generated: Sequence[int]) -> bool:
        answer = self.items[index].answer_ids
        if answer is None:
            raise ValueError(f"prompt {index} has no answer ids; exact match needs (prompt_ids, answer_ids) pairs")
        ids = [int(i) for i in generated]
        if self.eos_id is not None and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return tuple(ids) == tuple(answer)


class TaskSuitePromptSet(PromptSet):
    """The first n examples of a task-suite split, tokenized; scored with the suite's own rule."""

    def __init__(self, tokenizer: Any, split: str = "train", n: int = 64, tasks: Sequence[str] | None = None,
                 seed: int = 0, task_file: dict[str, Any] | None = None):
        from cache_core.bench.config import make_task
        from cache_core.bench.tasks import BUILTIN_TASKS, encode_prompt

        self.tokenizer = tokenizer
        self.split = split
        if task_file is not None and task_file.get("kind") == "file":  # a user's task file (task=file)
            source = make_task(task_file)
        else:
            source = make_task({"kind": "builtin", "tasks": list(tasks or BUILTIN_TASKS), "seed": int(seed)})
        self.examples = source.split(split, int(n))
        self.task_file = task_file
        self.items = [PromptItem(tuple(encode_prompt(tokenizer, e)), tuple(tokenizer.encode(e.answer)), e.task)
                      for e in self.examples]
        self.tasks = None if tasks is None else list(tasks)
        self.seed = int(seed)

    def exact_match(self, index: int, generated: Sequence[int]) -> bool:
        from cache_core.bench.tasks import score

        return bool(score(self.tokenizer.decode([int(i) for i in generated]), self.examples[index]))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tasks": self.tasks, "seed": self.seed,
                **({"task_file": self.task_file.get("path")} if self.task_file else {})}

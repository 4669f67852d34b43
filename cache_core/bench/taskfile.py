"""Tasks from a user's own file: local JSONL (or a Hugging Face `datasets` directory saved with `save_to_disk`), a
field mapping, n-shot prompts, a fixed-seed split, and the field's scoring rules.

`FileTask(settings).split(name, n)` returns the same `Example`s as the built-in `TaskSuite`, so every job (evaluate,
benchmark, collect, supervised, rl, and the environment) takes a file task through `task=file` unchanged.

Scoring (`score_file_task`, reached through `cache_core.bench.tasks.score`):
- `gsm8k`: the reference's final answer is the number after `####` (GSM8K's format; else its last number); the
  prediction's is the number after its own `####` if it wrote one, else its last number; numbers compare after
  removing `,`, `$` and a trailing `.0`/`.00` (lm-evaluation-harness's "flexible-extract" / "strict-match").
- `normalised`: exact match after lower-casing, collapsing whitespace and stripping surrounding punctuation.
- `code` (MBPP / HumanEval style; opt-in with `allow_code_execution`): the prediction (the prompt's code prefix
  first, for HumanEval-style completions) runs with the record's unit tests in a fresh `python -I` subprocess, in a
  temporary directory, with sockets disabled and a timeout; passing = exit status 0. **This executes model output
  on your machine**: it is no security sandbox (a determined program can undo the socket block), so run it only
  where that is acceptable, as lm-evaluation-harness's HF_ALLOW_CODE_EVAL warns too.
An answer whose final number cannot be extracted is wrong and counted (`extraction_failures`), never a crash.
"""

from __future__ import annotations

import json
import logging
import random
import re
import string
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache_core.bench.tasks import SPLITS, Example

log = logging.getLogger(__name__)

SCORINGS = ("gsm8k", "normalised", "code")
_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")
# Counters a run reports next to its accuracy (answers the rule could not read, programs killed at their timeout).
COUNTERS = {"extraction_failures": 0, "code_timeouts": 0}


@dataclass
class FileTaskSettings:
    """What `task=file` reads: the task group's file keys (`TaskConfig` extends this; conf/task/file.yaml)."""

    path: str | None = None
    name: str = "file"
    prompt_template: str = "Question: {question}\nAnswer:"
    answer_field: str = "answer"
    scoring: str = "gsm8k"
    n_shot: int = 0
    shot_template: str = "Question: {question}\nAnswer: {answer}\n\n"
    chat: bool | None = None
    seed: int = 0
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    tests_field: str = "test_list"
    allow_code_execution: bool = False
    code_timeout_s: float = 10.0

    def check(self) -> None:
        """Refuse a value a file task cannot run with; each error names the task group's key."""
        from cache_core import validate as v

        v.text("task.path", self.path)
        v.choice("task.scoring", self.scoring, SCORINGS)
        v.number("task.n_shot", self.n_shot, integer=True, low=0)
        v.number("task.seed", self.seed, integer=True)
        v.fraction("task.validation_fraction", self.validation_fraction, open_low=False)
        v.fraction("task.test_fraction", self.test_fraction)
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError("task.validation_fraction + task.test_fraction must leave records for train")
        v.flag("task.chat", self.chat, optional=True)
        v.flag("task.allow_code_execution", self.allow_code_execution)
        v.number("task.code_timeout_s", self.code_timeout_s, low=0.0, open_low=True)
        if self.scoring == "code" and not self.allow_code_execution:
            raise ValueError("task.scoring=code runs model-generated programs on this machine; set "
                             "task.allow_code_execution=true to accept that (see cache_core/bench/taskfile.py)")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file (one JSON object per line), or of a `datasets.save_to_disk` directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        try:
            import datasets
        except ImportError as err:
            raise ValueError(f"{path} is a directory: reading a saved Hugging Face dataset needs `pip install "
                             "datasets` (or give a .jsonl file)") from err
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = datasets.concatenate_datasets(list(data.values()))
        return [dict(r) for r in data]
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist (task.path)")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object ({err.msg}); a task file holds one JSON "
                                 "object per line") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: a JSON {type(record).__name__}, not an object")
            records.append(record)
    if not records:
        raise ValueError(f"task file {path} holds no records")
    return records


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


class FileTask:
    """A file's records split by a fixed seed into train / validation / test, rendered as prompts."""

    def __init__(self, settings: FileTaskSettings):
        settings.check()
        self.settings = s = settings
        records = read_records(s.path)
        needed = _fields(s.prompt_template) | {s.answer_field}
        if s.n_shot:
            needed |= _fields(s.shot_template) - {"answer"}
        if s.scoring == "code":
            needed.add(s.tests_field)
        for number, record in enumerate(records, 1):
            missing = sorted(needed - set(record))
            if missing:
                raise ValueError(f"{s.path}: record {number} has no field(s) {missing} (the templates and task."
                                 f"answer_field / tests_field use them; its fields: {sorted(record)})")
        order = list(range(len(records)))
        random.Random(f"blockreuse-taskfile/{s.seed}").shuffle(order)
        n_test = round(s.test_fraction * len(records))
        n_val = round(s.validation_fraction * len(records))
        self.records = records
        self.splits = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
                       "train": order[n_test + n_val:]}
        if s.n_shot and len(self.splits["train"]) < s.n_shot:
            raise ValueError(f"task.n_shot={s.n_shot} needs that many train records; the train split of {s.path} "
                             f"has {len(self.splits['train'])}")

    def _prompt(self, record: dict[str, Any], index: int) -> str:
        s = self.settings
        shots = ""
        if s.n_shot:
            pool = [i for i in self.splits["train"] if i != index]
            chosen = random.Random(f"blockreuse-shots/{s.seed}/{index}").sample(pool, min(s.n_shot, len(pool)))
            shots = "".join(s.shot_template.format(**{**self.records[i], "answer": self.records[i][s.answer_field]})
                            for i in chosen)
        return shots + s.prompt_template.format(**record)

    def split(self, name: str, n: int | None = None) -> list[Example]:
        """The first n examples of split `name` (all when n is None or larger, with a log line saying so)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {list(SPLITS)}")
        indices = self.splits[name]
        if not indices:
            raise ValueError(f"the {name} split of {self.settings.path} is empty ({len(self.records)} records, "
                             f"{name} fraction too small): add records or raise task.{name}_fraction")
        if n is not None and n > len(indices):
            log.info("task %s: %s split has %d examples (%d asked); using all", self.settings.name, name,
                     len(indices), n)
        s = self.settings
        chosen = indices if n is None else indices[:n]
        return [Example(task=s.name, prompt=self._prompt(self.records[i], i),
                        answer=str(self.records[i][s.answer_field]), scoring=s.scoring,
                        tests=_tests(self.records[i].get(s.tests_field)), chat=s.chat,
                        code_timeout_s=s.code_timeout_s)
                for i in chosen]


def _tests(value: Any) -> str:
    if value is None:
        return ""
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


# --- scoring --------------------------------------------------------------------------------------------------------
def _clean_number(text: str) -> str:
    text = text.replace(",", "").replace("$", "")
    return re.sub(r"\.0+$", "", text)


def final_number(text: str) -> str | None:
    """The number after `####`, else the last number in the text; None when there is none."""
    if "####" in text:
        found = _NUMBER.search(text.split("####")[-1])
        if found:
            return _clean_number(found.group())
    numbers = _NUMBER.findall(text)
    return _clean_number(numbers[-1]) if numbers else None


def normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def score_file_task(prediction: str, example: Example) -> bool:
    if example.scoring == "gsm8k":
        predicted, reference = final_number(prediction), final_number(example.answer)
        if reference is None:
            raise ValueError(f"the reference answer {example.answer[:60]!r} holds no number; task.scoring=gsm8k "
                             "needs one (after ####)")
        if predicted is None:
            COUNTERS["extraction_failures"] += 1
            return False
        return predicted == reference
    if example.scoring == "normalised":
        return normalise(prediction) == normalise(example.answer)
    if example.scoring == "code":
        return run_code(prediction, example.tests, example.prompt, example.code_timeout_s)
    raise ValueError(f"unknown scoring {example.scoring!r}; choose one of {list(SCORINGS)}")


_NO_NETWORK = ("import socket as _s\n"
               "def _blocked(*a, **k):\n    raise OSError('network access is disabled while scoring')\n"
               "_s.socket = _blocked; _s.create_connection = _blocked; _s.getaddrinfo = _blocked\n")


def run_code(program: str, tests: str, prompt: str = "", timeout_s: float = 10.0) -> bool:
    """Run `program` + `tests` in a fresh isolated interpreter; True when it exits 0 within the timeout."""
    if not tests.strip():
        raise ValueError("a code task needs unit tests (task.tests_field) to score a program")
    body = program
    if prompt.rstrip().endswith(":") or "def " in prompt and "def " not in program:
        body = prompt + program  # HumanEval-style: the prompt holds the signature, the model the body
    source = _NO_NETWORK + body + "\n\n" + tests + "\n"
    with tempfile.TemporaryDirectory() as cwd:
        try:
            result = subprocess.run([sys.executable, "-I", "-c", source], cwd=cwd, capture_output=True,
                                    timeout=timeout_s, env={"PATH": "/usr/bin:/bin"})
        except subprocess.TimeoutExpired:
            COUNTERS["code_timeouts"] += 1
            return False
    return result.returncode == 0

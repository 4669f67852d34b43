"""Synthetic few-shot tasks for the built-in diffusion LM, scored by exact match.

Every task writes answers whose later tokens are a function of earlier *answer* tokens, so a stale KV cache of a
freshly decoded block can change what follows:
- chain:  a letter->letter table (a cyclic shift of 1-3 letters); the answer follows the chain from a start letter
          (x_{i+1} = table[x_i]).
- runsum: a list of digits 0-2; the answer is the running sum mod 10 (s_i = s_{i-1} + d_i).
- arith:  a start digit and a list of operations (+-1..3, *1) mod 10; the answer writes every intermediate value.
Steps are small on purpose: the previous answer token narrows the next one, which is what lets a small model learn
these on a CPU budget (uniformly random tables/digits left it on a loss plateau: nothing to learn from piecewise).

Each prompt holds one solved example of the same task, then the query. Layouts are fixed per task (prompt lengths of
100+ tokens, answers of 20-40 tokens, i.e. 2-3 decoding blocks of 16 inside the 64 generated positions).

Splits: every problem instance (the query: table + start, digits, ops) is hashed into one of 1000 buckets: test owns
buckets [0, 100), validation [100, 200), train the rest; each split draws from its own seed stream and keeps only the
instances of its buckets, deduplicated. So the same seed always gives the same examples, and a test query can never
appear in train, whatever the number of training examples drawn.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

GEN_LENGTH = 64  # generated positions of the built-in setting: the answer, then EOS up to the end
BLOCK_LENGTH = 16  # decoding block of the built-in setting
SPLITS = ("train", "validation", "test")
_BUCKETS = 1000
_SPLIT_BUCKETS = {"test": range(0, 100), "validation": range(100, 200), "train": range(200, _BUCKETS)}

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
CHAIN_TABLE_SIZE = 16
CHAIN_LENGTH = 40
CHAIN_MAX_SHIFT = 3
RUNSUM_DIGITS = "012"  # small steps: the previous sum narrows the next one (same reason as the chain shift)
ARITH_OPS = ("+1", "+2", "+3", "-1", "-2", "-3", "*1")
RUNSUM_LENGTH = 32
ARITH_STEPS = 20


@dataclass
class Example:
    task: str
    prompt: str
    answer: str


@dataclass
class _Instance:
    key: str  # canonical query: decides the split and deduplication
    query: str  # text of the query (without its answer)
    answer: str


# --- chain ------------------------------------------------------------------------------------------------------

def _chain_table(rng: random.Random) -> dict[str, str]:
    # 16 letters drawn from a-z, listed in alphabetical order, each mapped to the listed letter 1-3 places later
    # (cyclically): a permutation without fixed points. Why this structure and not a uniformly random permutation:
    # with a random table nothing but a two-step lookup predicts the next letter, and a small model trained on a CPU
    # budget sat on that loss plateau; here the previous answer letter already narrows the next one (a later letter),
    # which gives the gradient a foothold. The answer still follows the chain through the table in the prompt.
    letters = sorted(rng.sample(ALPHABET, CHAIN_TABLE_SIZE))
    shift = rng.randint(1, CHAIN_MAX_SHIFT)
    return {c: letters[(i + shift) % len(letters)] for i, c in enumerate(letters)}


def chain_answer(table: dict[str, str], start: str, length: int = CHAIN_LENGTH) -> str:
    out, cur = [], start
    for _ in range(length):
        cur = table[cur]
        out.append(cur)
    return "".join(out)


def _chain_prompt(rng: random.Random, draw_instance: Callable[[random.Random], tuple[dict[str, str], str]]
                  ) -> tuple[_Instance, str]:
    table, start = draw_instance(rng)
    shot_start = rng.choice([c for c in table if c != start])
    table_text = " ".join(k + v for k, v in table.items())  # "ab cd ...": key then value, keys sorted
    header = f"chain table: {table_text}\n"
    shot = f"from {shot_start}: {chain_answer(table, shot_start)}\n"
    query = f"from {start}:"
    inst = _Instance(key=f"chain|{table_text}|{start}", query=query, answer=chain_answer(table, start))
    return inst, header + shot + query


def _chain(rng: random.Random) -> tuple[_Instance, str]:
    def draw(r: random.Random) -> tuple[dict[str, str], str]:
        table = _chain_table(r)
        return table, r.choice(list(table))

    return _chain_prompt(rng, draw)


def parse_chain(prompt: str) -> tuple[dict[str, str], str]:
    """(table, start letter) of a chain prompt."""
    first, *_, last = prompt.split("\n")
    pairs = first.split(": ", 1)[1].split()
    return {p[0]: p[1] for p in pairs}, last.removeprefix("from ").removesuffix(":")


# --- runsum -----------------------------------------------------------------------------------------------------

def runsum_answer(digits: str) -> str:
    total, out = 0, []
    for d in digits:
        total = (total + int(d)) % 10
        out.append(str(total))
    return "".join(out)


def _runsum(rng: random.Random) -> tuple[_Instance, str]:
    def draw() -> str:
        return "".join(rng.choice(RUNSUM_DIGITS) for _ in range(RUNSUM_LENGTH))

    digits, shot = draw(), draw()
    header = "running sum mod 10\n"
    shot_text = f"in {shot}\nout {runsum_answer(shot)}\n"
    query = f"in {digits}\nout"
    inst = _Instance(key=f"runsum|{digits}", query=query, answer=runsum_answer(digits))
    return inst, header + shot_text + query


# --- arith ------------------------------------------------------------------------------------------------------

def arith_answer(start: int, ops: str) -> str:
    """ops: 'op digit' pairs like '+3*7-2'; each intermediate value mod 10, written as one digit."""
    value, out = start, []
    for op, d in zip(ops[0::2], ops[1::2]):
        n = int(d)
        value = (value + n if op == "+" else value - n if op == "-" else value * n) % 10
        out.append(str(value))
    return "".join(out)


def _arith(rng: random.Random) -> tuple[_Instance, str]:
    def draw() -> tuple[int, str]:
        return rng.randrange(10), "".join(rng.choice(ARITH_OPS) for _ in range(ARITH_STEPS))

    (start, ops), (shot_start, shot_ops) = draw(), draw()
    header = "arithmetic mod 10\n"
    shot_text = f"calc {shot_start}{shot_ops}\nvals {arith_answer(shot_start, shot_ops)}\n"
    query = f"calc {start}{ops}\nvals"
    inst = _Instance(key=f"arith|{start}{ops}", query=query, answer=arith_answer(start, ops))
    return inst, header + shot_text + query


_GENERATORS: dict[str, Callable[[random.Random], tuple[_Instance, str]]] = {
    "chain": _chain,
    "runsum": _runsum,
    "arith": _arith,
}
TASK_NAMES: tuple[str, ...] = tuple(_GENERATORS)


def split_of(key: str) -> str:
    """The split that owns a problem instance, from a stable hash of its canonical key."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % _BUCKETS
    for name, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return name
    raise AssertionError("unreachable: buckets cover [0, 1000)")


class TaskSuite:
    """Deterministic train/validation/test examples of the chosen tasks (all of TASK_NAMES by default)."""

    def __init__(self, tasks: list[str] | None = None, seed: int = 0):
        tasks = list(TASK_NAMES) if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in _GENERATORS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known tasks: {list(TASK_NAMES)}")
        if not tasks:
            raise ValueError("TaskSuite needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate task names in {tasks}")
        self.tasks = tasks
        self.seed = int(seed)

    def _task_stream(self, split: str, task: str, stream: int) -> Iterator[Example]:
        # One seed stream per (seed, split, task, stream); string seeds hash stably across runs and platforms.
        rng = random.Random(f"blockreuse/{self.seed}/{split}/{task}/{stream}")
        seen: set[str] = set()
        misses = 0
        while True:
            inst, prompt = _GENERATORS[task](rng)
            if split_of(inst.key) != split or inst.key in seen:
                misses += 1
                if misses > 100_000:  # a task with few distinct instances would otherwise loop forever
                    raise RuntimeError(f"task {task!r} ran out of new {split} instances after {len(seen)}")
                continue
            misses = 0
            seen.add(inst.key)
            yield Example(task=task, prompt=prompt, answer=inst.answer)

    def iterate(self, name: str, stream: int = 0) -> Iterator[Example]:
        """Endless examples of split `name`, tasks in round robin. stream > 0 gives other (still in-split) draws,
        e.g. one per data-loader worker; split(name, n) is the first n of stream 0."""
        self._check_split(name)
        streams = [self._task_stream(name, t, stream) for t in self.tasks]
        while True:
            for s in streams:
                yield next(s)

    def split(self, name: str, n: int) -> list[Example]:
        """The first n examples of split `name` (train, validation or test); tasks alternate."""
        self._check_split(name)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        it = self.iterate(name)
        return [next(it) for _ in range(n)]

    @staticmethod
    def _check_split(name: str) -> None:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {list(SPLITS)}")


def score(prediction: str, example: Example) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == example.answer.strip()

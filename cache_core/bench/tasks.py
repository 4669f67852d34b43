"""Synthetic few-shot tasks for the built-in diffusion LM, scored by exact match.

Every task writes answers whose later tokens are a function of earlier *answer* tokens, so a stale KV cache of a
freshly decoded block can change what follows. The built-in suite (BUILTIN_TASKS):
- repeat: a 5-letter motif; the answer writes it four times (x_i = x_{i-5}): 20 letters over 2 blocks of 16.
- succ:   a start letter; the answer walks the alphabet ring (x_{i+1} = successor(x_i)): 20 letters.
- runsum: digits 0-2; the answer is the running sum mod 10 (s_i = s_{i-1} + d_i): 20 digits.
repeat and succ can be read off the prompt (the motif; the start letter and the position), so a stale cache costs
them little; runsum cannot: s_i needs s_{i-1} (or the sum of a whole prefix), so a block decoded against stale K/V
of the previous answer digits goes wrong. That is the task that makes reuse decisions matter in the benchmark.
Also available (tested, not in the built-in suite):
- parity: bits; the answer is the running parity (p_i = p_{i-1} xor b_i). Next to repeat/succ it was learned in a
          6000-step run (from ~3300 steps on) but not in the built-in recipe's 3000: twice the CPU budget.
- chain:  a letter->letter table in the prompt; the answer follows it from a start letter (an in-context lookup).
- walk:   a 10-letter ring and a step k in the prompt; x_{i+1} = ring[index(x_i) + k].
- arith:  a start digit and operations (+-1..3, *1) mod 10; the answer writes every intermediate value
          (space-separated, so value i sits at a fixed distance from operation i).
chain needs an induction head and walk/arith a modular-addition table with a step read from the prompt; a 0.8M
model did not learn them within the CPU budget.

Each prompt holds solved examples of the same task, then the query (prompt lengths of 100+ tokens; answers of 19-24
tokens, i.e. 2 decoding blocks of 16 inside the 64 generated positions, the rest EOS).

Splits: every problem instance (its canonical query) is hashed into one of 1000 buckets: test owns buckets [0, 100),
validation [100, 200), train the rest; each split draws from its own seed stream and keeps only the instances of its
buckets, deduplicated. So the same seed always gives the same examples, and a test query never appears in train,
whatever the number of training examples drawn. Where the answer depends on less than the query (walk: step and start;
succ: the start letter only, 26 answers in all), that is said at the task.
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
CHAIN_LENGTH = 24
WALK_LETTERS = "abcdefghij"
WALK_LENGTH = 20
WALK_SHOTS = 3
CHAIN_MAX_SHIFT = 3
RUNSUM_DIGITS = "012"  # small steps: the previous sum narrows the next one (same reason as the chain shift)
ARITH_OPS = ("+1", "+2", "+3", "-1", "-2", "-3", "*1")
RUNSUM_LENGTH = 20
ARITH_STEPS = 10


@dataclass
class Example:
    task: str
    prompt: str
    answer: str
    # How an answer is scored (`score`): "exact" (the built-in tasks), or a file task's rule (cache_core.bench.taskfile)
    scoring: str = "exact"
    tests: str = ""  # code tasks: the unit tests a generated program must pass
    code_timeout_s: float = 10.0  # code tasks: a program still running after this is killed (and wrong)
    chat: bool | None = None  # wrap the prompt in the model's chat template: None = when the model has one


@dataclass
class _Instance:
    key: str  # canonical query: deduplication (and the split, unless split_key is set)
    query: str  # text of the query (without its answer)
    answer: str
    split_key: str | None = None  # what decides the split when it is coarser than the query (walk)


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


# --- walk -------------------------------------------------------------------------------------------------------

def walk_answer(step: int, start: str, length: int = WALK_LENGTH) -> str:
    """Walk the ring WALK_LETTERS from `start`, `step` letters at a time (x_{i+1} = ring[index(x_i) + step])."""
    n = len(WALK_LETTERS)
    table = {c: WALK_LETTERS[(i + step) % n] for i, c in enumerate(WALK_LETTERS)}
    return chain_answer(table, start, length)


def _walk(rng: random.Random) -> tuple[_Instance, str]:
    step = rng.randint(1, len(WALK_LETTERS) - 1)
    starts = rng.sample(WALK_LETTERS, WALK_SHOTS + 1)
    header = f"walk {WALK_LETTERS} by {step}\n"
    shots = "".join(f"from {s}: {walk_answer(step, s)}\n" for s in starts[:-1])
    query = f"from {starts[-1]}:"
    # The split is decided by (step, start) alone: a test walk never occurs in train, whatever its solved examples.
    inst = _Instance(key=f"walk|{step}|{starts[-1]}|{''.join(starts[:-1])}", query=query,
                     answer=walk_answer(step, starts[-1]), split_key=f"walk|{step}|{starts[-1]}")
    return inst, header + shots + query


def parse_walk(prompt: str) -> tuple[int, str]:
    """(step, start letter) of a walk prompt."""
    first, *_, last = prompt.split("\n")
    return int(first.rsplit(" ", 1)[1]), last.removeprefix("from ").removesuffix(":")


# --- repeat / succ: copy-shaped steps --------------------------------------------------------------------------

REPEAT_PERIOD = 5
REPEAT_LENGTH = 20
REPEAT_SHOTS = 3
SUCC_LENGTH = 20
SUCC_SHOTS = 3


def repeat_answer(motif: str, length: int = REPEAT_LENGTH) -> str:
    """The motif written again and again: x_i = x_{i - period} once the first period is out."""
    return (motif * (length // len(motif) + 1))[:length]


def _repeat(rng: random.Random) -> tuple[_Instance, str]:
    motifs = ["".join(rng.choice(ALPHABET) for _ in range(REPEAT_PERIOD)) for _ in range(REPEAT_SHOTS + 1)]
    header = f"repeat the {REPEAT_PERIOD}-letter motif\n"
    shots = "".join(f"{m}: {repeat_answer(m)}\n" for m in motifs[:-1])
    query = f"{motifs[-1]}:"
    inst = _Instance(key=f"repeat|{motifs[-1]}", query=query, answer=repeat_answer(motifs[-1]))
    return inst, header + shots + query


def succ_answer(start: str, length: int = SUCC_LENGTH) -> str:
    """The letters after `start` on the alphabet ring: x_{i+1} = successor(x_i)."""
    i = ALPHABET.index(start)
    return "".join(ALPHABET[(i + 1 + j) % len(ALPHABET)] for j in range(length))


def _succ(rng: random.Random) -> tuple[_Instance, str]:
    starts = rng.sample(ALPHABET, SUCC_SHOTS + 1)
    header = "alphabet walk\n"
    shots = "".join(f"from {s}: {succ_answer(s)}\n" for s in starts[:-1])
    query = f"from {starts[-1]}:"
    # Only 26 distinct answers exist: instances differ by their solved examples; the test checks rule application.
    inst = _Instance(key=f"succ|{starts[-1]}|{''.join(starts[:-1])}", query=query, answer=succ_answer(starts[-1]))
    return inst, header + shots + query


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
    header = "running sum of the digits mod 10\n"
    shot_text = f"in {shot}\nout {runsum_answer(shot)}\n"
    query = f"in {digits}\nout"
    inst = _Instance(key=f"runsum|{digits}", query=query, answer=runsum_answer(digits))
    return inst, header + shot_text + query


# --- parity -----------------------------------------------------------------------------------------------------

PARITY_LENGTH = 20
PARITY_SHOTS = 2


def parity_answer(bits: str) -> str:
    """Running parity: p_i = p_{i-1} xor b_i. Each answer bit is a two-input function of the previous *answer* bit
    and the aligned prompt bit; without the previous answer bit it needs the parity of a whole prefix, which a small
    model cannot read off the prompt. So a stale (still-masked) K/V of the last decoded bit costs a coin flip."""
    acc, out = 0, []
    for b in bits:
        acc ^= int(b)
        out.append(str(acc))
    return "".join(out)


def _parity(rng: random.Random) -> tuple[_Instance, str]:
    def draw() -> str:
        return "".join(rng.choice("01") for _ in range(PARITY_LENGTH))

    bits, shots = draw(), [draw() for _ in range(PARITY_SHOTS)]
    header = "running parity of the bits\n"
    shot_text = "".join(f"in {s}\nout {parity_answer(s)}\n" for s in shots)
    query = f"in {bits}\nout"
    inst = _Instance(key=f"parity|{bits}", query=query, answer=parity_answer(bits))
    return inst, header + shot_text + query


# --- arith ------------------------------------------------------------------------------------------------------

def arith_answer(start: int, ops: str) -> str:
    """ops: 'op digit' pairs like '+3*7-2'; each intermediate value mod 10, one digit each, space-separated.

    Why the spaces: an operation takes two characters, so two characters per value keep value i at a fixed distance
    from operation i; a one-character answer drifts one place per step, an absolute-position alignment that a small
    model with rotary (relative) positions learns far more slowly."""
    value, out = start, []
    for op, d in zip(ops[0::2], ops[1::2]):
        n = int(d)
        value = (value + n if op == "+" else value - n if op == "-" else value * n) % 10
        out.append(str(value))
    return " ".join(out)


def _arith(rng: random.Random) -> tuple[_Instance, str]:
    def draw() -> tuple[int, str]:
        return rng.randrange(10), "".join(rng.choice(ARITH_OPS) for _ in range(ARITH_STEPS))

    (start, ops), (shot_start, shot_ops) = draw(), draw()
    header = "arithmetic mod 10\n"
    shot_text = f"calc {shot_start}{shot_ops}\nvals {arith_answer(shot_start, shot_ops)}\n"
    query = f"calc {start}{ops}\nvals"
    inst = _Instance(key=f"arith|{start}{ops}", query=query, answer=arith_answer(start, ops))
    return inst, header + shot_text + query


# --- the long regime: 203-215-token answers over a 256-position canvas -----------------------------------------------
# Each answer is lines of symbols (newline-separated): motif and shift 24 lines of 8 letters (215 tokens), xor 12 lines
# of 16 bits (203 tokens; narrower bit lines have too few distinct instances for a training stream that never repeats
# one), i.e. 7 decoding blocks of 32 (13-14 of 16) before the EOS filling. Every line is a function of the line
# before it, which the model itself generated: a block decoded against stale (still-masked) K/V of the previous line
# has to reach two lines back and apply the rule twice, which a small model does worse, so stale K/V costs exact
# match. motif can also be read off the prompt (the same line every time), so it is the task where reuse is cheap;
# shift and xor are not.
LONG_WIDTH = 8
LONG_LINES = 24
XOR_WIDTH = 16
XOR_LINES = 12


def _long_lines(first: str, rule: Callable[[str], str], lines: int = LONG_LINES) -> str:
    out, cur = [], first
    for _ in range(lines):
        cur = rule(cur)
        out.append(cur)
    return "\n".join(out)


def motif_answer(motif: str, lines: int = LONG_LINES) -> str:
    """The motif written on every line (line_j = line_{j-1})."""
    return _long_lines(motif, lambda line: line, lines)


def shift_answer(start: str, lines: int = LONG_LINES) -> str:
    """Each line is the line before with every letter advanced one place on the alphabet ring."""
    return _long_lines(start, lambda line: "".join(ALPHABET[(ALPHABET.index(c) + 1) % 26] for c in line), lines)


def xor_answer(bits: str, lines: int = XOR_LINES) -> str:
    """An elementary cellular automaton (rule 102): bit c of a line is bit c xor bit c+1 of the line before (the
    last bit xor 0). A two-input function of two neighbouring symbols one line back: a relative-position rule."""
    def rule(line: str) -> str:
        padded = line + "0"
        return "".join(str(int(padded[c]) ^ int(padded[c + 1])) for c in range(len(line)))
    return _long_lines(bits, rule, lines)


def _long(name: str, header: str, alphabet: str, width: int, answer: Callable[[str], str]
          ) -> Callable[[random.Random], tuple[_Instance, str]]:
    def draw(rng: random.Random) -> tuple[_Instance, str]:
        first = "".join(rng.choice(alphabet) for _ in range(width))
        query = f"{header}\n{first}\n"
        return _Instance(key=f"{name}|{first}", query=query, answer=answer(first)), query
    return draw


_motif = _long("motif", "copy the line", ALPHABET, LONG_WIDTH, motif_answer)
_shift = _long("shift", "shift each line", ALPHABET, LONG_WIDTH, shift_answer)
_xor = _long("xor", "rule 102", "01", XOR_WIDTH, xor_answer)


_GENERATORS: dict[str, Callable[[random.Random], tuple[_Instance, str]]] = {
    "chain": _chain,
    "walk": _walk,
    "repeat": _repeat,
    "succ": _succ,
    "runsum": _runsum,
    "parity": _parity,
    "arith": _arith,
    "motif": _motif,
    "shift": _shift,
    "xor": _xor,
}
TASK_NAMES: tuple[str, ...] = tuple(_GENERATORS)
# The suite of the built-in model. runsum alone trained slowly from scratch (60% next-token accuracy after 1500 steps
# of 32); next to the copy-shaped pair, whose position/copy circuits it reuses, it reaches ~95% exact match in 3000
# steps. The others stay available but did not train within the CPU budget on a 0.8M-parameter model (see above).
BUILTIN_TASKS: tuple[str, ...] = ("repeat", "succ", "runsum")
# The long regime (conf/task/long.yaml): 256 generated positions, see "the long regime" above.
LONG_TASKS: tuple[str, ...] = ("motif", "shift", "xor")
LONG_GEN_LENGTH = 256


def split_of(key: str) -> str:
    """The split that owns a problem instance, from a stable hash of its canonical key."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % _BUCKETS
    for name, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return name
    raise AssertionError("unreachable: buckets cover [0, 1000)")


class TaskSuite:
    """Deterministic train/validation/test examples of the chosen tasks (BUILTIN_TASKS by default)."""

    def __init__(self, tasks: list[str] | None = None, seed: int = 0):
        tasks = list(BUILTIN_TASKS) if tasks is None else list(tasks)
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
            if split_of(inst.split_key or inst.key) != split or inst.key in seen:
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
    """Whether a decoded answer is right: exact match after stripping surrounding whitespace for the built-in tasks,
    the file task's rule otherwise (GSM8K's final number, normalised exact match, unit tests)."""
    if example.scoring == "exact":
        return prediction.strip() == example.answer.strip()
    from cache_core.bench.taskfile import score_file_task

    return score_file_task(prediction, example)


def encode_prompt(tokenizer, example: Example) -> list[int]:
    """The prompt's ids: through the model's chat template when the example asks for it (or, with chat=None, when
    the model has one), else the plain text."""
    use_chat = example.chat if example.chat is not None else tokenizer.has_chat_template
    if use_chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}])
    return tokenizer.encode(example.prompt)

import pytest

from cache_core.bench.tasks import (
    BLOCK_LENGTH,
    BUILTIN_TASKS,
    GEN_LENGTH,
    LONG_TASKS,
    TASK_NAMES,
    Example,
    TaskSuite,
    arith_answer,
    chain_answer,
    parity_answer,
    parse_chain,
    parse_walk,
    repeat_answer,
    runsum_answer,
    score,
    split_of,
    succ_answer,
    walk_answer,
)
from cache_core.tokenizer import Tokenizer

SHORT_TASKS = [t for t in TASK_NAMES if t not in LONG_TASKS]  # few-shot prompts, answers within 64 positions

def test_constants_and_names():
    assert (GEN_LENGTH, BLOCK_LENGTH) == (64, 16)
    assert set(TASK_NAMES) == {"chain", "walk", "repeat", "succ", "runsum", "parity", "arith", *LONG_TASKS}
    assert set(BUILTIN_TASKS) <= set(TASK_NAMES)


def test_splits_are_deterministic_and_prefix_stable():
    a = TaskSuite(seed=3).split("test", 12)
    b = TaskSuite(seed=3).split("test", 12)
    assert a == b
    assert TaskSuite(seed=3).split("test", 5) == a[:5]
    assert TaskSuite(seed=4).split("test", 12) != a


def test_test_never_in_train_and_no_duplicates():
    suite = TaskSuite()
    train = suite.split("train", 900)
    val = suite.split("validation", 150)
    test = suite.split("test", 150)
    prompts = {name: {e.prompt for e in exs} for name, exs in [("train", train), ("val", val), ("test", test)]}
    assert len(prompts["test"]) == 150 and len(prompts["val"]) == 150  # deduplicated
    assert not prompts["test"] & prompts["train"]
    assert not prompts["val"] & prompts["train"]
    assert not prompts["test"] & prompts["val"]
    # Other training streams (e.g. data-loader workers) also stay inside train.
    extra = {e.prompt for _, e in zip(range(300), suite.iterate("train", stream=7))}
    assert not extra & prompts["test"]


def test_walk_split_is_by_step_and_start():
    # Whatever the solved examples, a (step, start) walk of the test split never occurs in train.
    suite = TaskSuite(["walk"])
    test = {parse_walk(e.prompt) for e in suite.split("test", 40)}
    train = {parse_walk(e.prompt) for e in suite.split("train", 400)}
    assert test and not test & train


def test_split_of_partitions_keys():
    names = [split_of(f"k{i}") for i in range(5000)]
    assert 0.07 < names.count("test") / 5000 < 0.13
    assert 0.07 < names.count("validation") / 5000 < 0.13


def test_unknown_split_and_task_raise():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        TaskSuite().split("dev", 3)
    with pytest.raises(ValueError, match="unknown task"):
        TaskSuite(["walk", "sort"])
    with pytest.raises(ValueError, match="n must be >= 0"):
        TaskSuite().split("test", -1)


def test_tasks_alternate_and_subset():
    exs = TaskSuite().split("validation", 2 * len(BUILTIN_TASKS))
    assert [e.task for e in exs] == list(BUILTIN_TASKS) * 2
    assert {e.task for e in TaskSuite(["runsum"]).split("test", 4)} == {"runsum"}


def test_lengths_fit_the_builtin_setting():
    tok = Tokenizer()
    for e in TaskSuite(SHORT_TASKS).split("test", 40):  # the long regime's tasks: tests/test_settings.py
        assert len(tok.encode(e.prompt)) >= 100
        assert 16 < len(e.answer) < GEN_LENGTH  # spans several blocks of 16, leaves room for EOS
        assert e.prompt.count("\n") >= 2  # a solved example precedes the query


def test_answers_depend_on_earlier_answer_tokens():
    # chain: every answer letter is the table entry of the previous answer letter.
    e = TaskSuite(["chain"]).split("test", 1)[0]
    table, start = parse_chain(e.prompt)
    assert e.answer == chain_answer(table, start)
    assert e.answer[0] == table[start]
    assert all(table[a] == b for a, b in zip(e.answer, e.answer[1:]))
    # A wrong early token changes every later one: the chain from another letter differs at each position.
    wrong = next(c for c in table if c != e.answer[0])
    assert all(x != y for x, y in zip(chain_answer(table, wrong)[:10], e.answer[1:11]))
    # runsum: s_i = s_{i-1} + d_i; changing one digit shifts every later sum.
    assert runsum_answer("1234") == "1360"
    assert runsum_answer("5234")[1:] != runsum_answer("1234")[1:]
    # parity: p_i = p_{i-1} xor b_i; flipping one bit flips every later answer bit.
    assert parity_answer("1101") == "1001"
    assert all(a != b for a, b in zip(parity_answer("0101")[1:], parity_answer("1101")[1:]))
    # repeat: every letter after the first period copies the one a period back.
    r = TaskSuite(["repeat"]).split("test", 1)[0]
    assert r.answer == repeat_answer(r.prompt.rsplit("\n", 1)[1].removesuffix(":"))
    assert all(r.answer[i] == r.answer[i - 5] for i in range(5, len(r.answer)))
    # succ: every letter is the alphabet successor of the previous one.
    c = TaskSuite(["succ"]).split("test", 1)[0]
    assert c.answer == succ_answer(c.prompt.rsplit(" ", 1)[1].removesuffix(":"))
    assert all((ord(b) - ord(a)) % 26 == 1 for a, b in zip(c.answer, c.answer[1:]))
    # walk: the next letter is `step` letters after the previous one on the ring given in the prompt.
    w = next(e for e in TaskSuite(["walk"]).split("test", 1))
    step, start = parse_walk(w.prompt)
    ring = w.prompt.split(" ")[1]
    assert w.answer == walk_answer(step, start)
    assert all(ring[(ring.index(a) + step) % len(ring)] == b for a, b in zip(w.answer, w.answer[1:]))
    # arith: intermediate values feed the next operation.
    assert arith_answer(7, "+5*3-9") == "2 6 7"  # 12 -> 2, 2*3 = 6, 6-9 = -3 -> 7


def test_arith_value_sits_at_a_fixed_distance_from_its_operation():
    # Two characters per operation and per value: value i and operation i are a constant offset apart.
    e = TaskSuite(["arith"]).split("test", 1)[0]
    calc_line = e.prompt.split("\n")[-2]
    ops = calc_line.removeprefix("calc ")[1:]
    assert len(ops) == 2 * len(e.answer.split(" "))
    assert e.answer[0::2] == e.answer.replace(" ", "")


def test_prompt_contains_a_correct_solved_example():
    for e in TaskSuite(SHORT_TASKS).split("train", 12):
        lines = e.prompt.split("\n")
        if e.task == "chain":
            table, _ = parse_chain(e.prompt)
            shot_start, shot_answer = lines[1].removeprefix("from ").split(": ")
            assert shot_answer == chain_answer(table, shot_start)
        elif e.task == "repeat":
            for line in lines[1:-1]:
                motif, shot_answer = line.split(": ")
                assert shot_answer == repeat_answer(motif)
        elif e.task == "succ":
            for line in lines[1:-1]:
                shot_start, shot_answer = line.removeprefix("from ").split(": ")
                assert shot_answer == succ_answer(shot_start)
        elif e.task == "walk":
            step, _ = parse_walk(e.prompt)
            for line in lines[1:-1]:
                shot_start, shot_answer = line.removeprefix("from ").split(": ")
                assert shot_answer == walk_answer(step, shot_start)
        elif e.task == "parity":
            for bits_line, out_line in zip(lines[1:-2:2], lines[2:-2:2]):
                assert out_line == "out " + parity_answer(bits_line.removeprefix("in "))
            assert e.answer == parity_answer(lines[-2].removeprefix("in "))
        elif e.task == "runsum":
            assert lines[2] == "out " + runsum_answer(lines[1].removeprefix("in "))
            assert e.answer == runsum_answer(lines[3].removeprefix("in "))
        else:
            calc = lines[3].removeprefix("calc ")
            assert e.answer == arith_answer(int(calc[0]), calc[1:])


def test_score_exact_match_after_strip():
    e = Example(task="runsum", prompt="p", answer="1360")
    assert score("1360", e)
    assert score("  1360\n", e)
    assert not score("136", e)
    assert not score("13600", e)

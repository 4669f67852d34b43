"""Task files (task=file): JSONL / saved datasets, field mapping, n-shot, fixed-seed splits, GSM8K / normalised /
unit-test scoring; every job on them; and lm-evaluation-harness through the blockreuse adapter, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import compose_cfg

from cache_core.bench import taskfile
from cache_core.bench.config import make_task
from cache_core.bench.taskfile import FileTask, FileTaskSettings, final_number, run_code
from cache_core.bench.tasks import Example, TaskSuite, encode_prompt, score
from envs.testing import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_GEN = ["generation.gen_length=16", "generation.block_length=8", "generation.steps=4"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def gsm8k_records(n: int) -> list[dict]:
    return [{"question": f"Tom has {i} apples and buys {i + 2}. How many?",
             "answer": f"He has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2:,}"} for i in range(n)]


# --- scoring ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,number", [
    ("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,234", "1234"), ("The answer is $18.00.", "18"), ("x = -3", "-3"),
    ("about 2.5 kg", "2.5"), ("no digits here", None), ("first 3 then 12", "12"),
])
def test_final_number(text, number) -> None:
    assert final_number(text) == number


def test_gsm8k_scoring_and_extraction_failures_are_counted() -> None:
    example = Example(task="gsm8k", prompt="q", answer="2 + 2 = 4\n#### 4", scoring="gsm8k")
    assert score("2 and 2 make 4", example)
    assert score("reasoning 9 ... #### 4", example)
    assert not score("#### 5", example)
    before = taskfile.COUNTERS["extraction_failures"]
    assert not score("I do not know", example)  # no number: wrong, counted, no crash
    assert taskfile.COUNTERS["extraction_failures"] == before + 1
    normalised = Example(task="n", prompt="q", answer="Paris", scoring="normalised")
    assert score("  paris. ", normalised) and not score("Lyon", normalised)


def test_code_scoring_runs_tests_with_a_timeout_and_no_network() -> None:
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    assert run_code("def add(a, b):\n    return a + b", tests)
    assert not run_code("def add(a, b):\n    return a - b", tests)
    assert not run_code("def add(a, b):\n    return a +", tests)  # a syntax error is a failure, not a crash
    before = taskfile.COUNTERS["code_timeouts"]
    assert not run_code("def add(a, b):\n    while True:\n        pass", tests, timeout_s=1.0)
    assert taskfile.COUNTERS["code_timeouts"] == before + 1
    network = "import socket\nsocket.create_connection(('127.0.0.1', 9))\ndef add(a, b):\n    return a + b"
    assert not run_code(network, tests)  # the socket block makes the program fail before its tests
    # HumanEval style: the prompt holds the signature, the model writes the body
    assert run_code("    return a + b", tests, prompt="def add(a, b):\n")
    with pytest.raises(ValueError, match="needs unit tests"):
        run_code("def add(a, b): return a + b", "")


# --- reading, splitting, prompting ---------------------------------------------------------------------------------
def test_file_task_splits_shots_and_templates(tmp_path) -> None:
    path = write_jsonl(tmp_path / "gsm.jsonl", gsm8k_records(40))
    settings = FileTaskSettings(path=str(path), n_shot=2, seed=3)
    task = FileTask(settings)
    splits = {name: task.split(name) for name in ("train", "validation", "test")}
    assert [len(splits[n]) for n in ("train", "validation", "test")] == [28, 4, 8]
    questions = {n: {e.prompt.rsplit("Question: ", 1)[1] for e in splits[n]} for n in splits}
    assert not questions["test"] & questions["train"] and not questions["test"] & questions["validation"]
    again = FileTask(settings).split("test")
    assert [e.prompt for e in again] == [e.prompt for e in splits["test"]]  # the seed fixes splits and shots
    assert [e.prompt for e in FileTask(FileTaskSettings(path=str(path), n_shot=2, seed=4)).split("test")] != [
        e.prompt for e in splits["test"]]
    first = splits["test"][0]
    assert first.prompt.count("Question: ") == 3 and first.prompt.endswith("Answer:")  # 2 shots + the query
    shot_questions = [q.split("\n")[0] for q in first.prompt.split("Question: ")[1:3]]
    train_questions = {r.split("\n")[0] for r in questions["train"]}
    assert all(q in train_questions for q in shot_questions)  # shots come from train only
    assert first.scoring == "gsm8k" and "####" in first.answer
    assert len(task.split("test", 3)) == 3


def test_saved_hugging_face_dataset(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(gsm8k_records(20)).save_to_disk(str(tmp_path / "saved"))
    task = FileTask(FileTaskSettings(path=str(tmp_path / "saved")))
    assert len(task.split("test")) == 4 and task.split("train")[0].prompt.startswith("Question: Tom")


def test_bad_task_files_are_named(tmp_path) -> None:
    good = gsm8k_records(10)
    path = write_jsonl(tmp_path / "t.jsonl", [*good[:3], {"query": "no question field", "answer": "#### 1"}])
    with pytest.raises(ValueError, match=r"record 4 has no field\(s\) \['question'\]"):
        FileTask(FileTaskSettings(path=str(path)))
    path.write_text(json.dumps(good[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"t.jsonl:2: not a JSON object"):
        FileTask(FileTaskSettings(path=str(path)))
    write_jsonl(path, good[:3])
    with pytest.raises(ValueError, match="validation split .* is empty"):
        FileTask(FileTaskSettings(path=str(path))).split("validation")
    with pytest.raises(ValueError, match=r"record 1 has no field\(s\) \['hint'\]"):
        FileTask(FileTaskSettings(path=str(path), prompt_template="{question} {hint}"))
    with pytest.raises(FileNotFoundError, match="task.path"):
        FileTask(FileTaskSettings(path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="allow_code_execution"):
        FileTask(FileTaskSettings(path=str(path), scoring="code"))
    with pytest.raises(ValueError, match="task.path"):
        compose_cfg(tmp_path, "task=file", "task.path=''")
    with pytest.raises(ValueError, match="allow_code_execution"):
        compose_cfg(tmp_path, "task=file", f"task.path={path}", "task.scoring=code")


def test_chat_template_wraps_prompts_when_the_model_has_one(tmp_path) -> None:
    from families import write_family_dir

    from cache_core import load_tokenizer

    write_family_dir(tmp_path / "dream", "dream")
    chat_tok, plain_tok = load_tokenizer(tmp_path / "dream"), load_tokenizer(REPO / "checkpoints" / "builtin")
    example = Example(task="t", prompt="What is 2 + 2?", answer="4")
    assert encode_prompt(plain_tok, example) == plain_tok.encode("What is 2 + 2?")  # no template: plain text
    wrapped = chat_tok.hf.decode(encode_prompt(chat_tok, example))
    assert wrapped.startswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>") and wrapped.endswith("assistant\n")
    off = Example(task="t", prompt="What is 2 + 2?", answer="4", chat=False)
    assert encode_prompt(chat_tok, off) == chat_tok.encode("What is 2 + 2?")


# --- every job on a file task ---------------------------------------------------------------------------------------
def suite_records(n: int) -> list[dict]:
    """Records a tiny char-level model can take: built-in task prompts as a user's file (normalised scoring)."""
    return [{"question": e.prompt, "answer": e.answer} for e in TaskSuite().split("train", n)]


def test_the_main_job_collects_trains_exports_and_evaluates_on_a_file_task(tmp_path) -> None:
    data = write_jsonl(tmp_path / "mine.jsonl", suite_records(30))
    model = save_tiny_checkpoint(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"paths.model={model}", *TINY_GEN,
           "task=file", f"task.path={data}", "task.name=mine", "task.scoring=normalised",
           "task.prompt_template='{question}'",
           "collect.episodes=4", "collect.n_prompts=4", "collect.progress_bar=false", "env.w_agree=0",
           "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "policy.generation_check.n_prompts=2",
           "evaluate.n_examples=3", "evaluate.batch_sizes=[3]", "evaluate.heuristics=[dual_cache]",
           "evaluate.include_oracle=false", "evaluate.thresholds=[0.5]", "evaluate.progress=false", "logger=none",
           f"evaluate.learned=[{{name: fresh_predictor, path: '{run_dir / 'predictor.onnx'}'}}]"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    assert "mine.jsonl" in json.dumps(manifest)  # the collection records where its prompts came from
    assert (run_dir / "predictor.onnx").is_file()
    results = json.loads((run_dir / "evaluate.json").read_text())
    rows = results["rows"]
    assert results["meta"]["task"]["name"] == "mine" and results["meta"]["task"]["kind"] == "file"
    assert {"full", "dual_cache", "fresh_predictor"} == {r["family"] for r in rows}
    assert all(r["n"] == 3 and r["tokens_per_s"] > 0 and r["tokens_per_forward"] > 0 for r in rows)
    table = (run_dir / "evaluate.txt").read_text()
    assert "tokens/s" in table and "tokens/forward" in table


def test_env_reads_its_prompts_from_the_task_file(tmp_path) -> None:
    from envs.block_reuse_env import BlockReuseEnv

    data = write_jsonl(tmp_path / "mine.jsonl", suite_records(20))
    model = save_tiny_checkpoint(tmp_path / "tiny")
    cfg = compose_cfg(tmp_path, f"paths.model={model}", "task=file", f"task.path={data}", "task.scoring=normalised",
                      "task.prompt_template='{question}'", *TINY_GEN)
    env = BlockReuseEnv(**cfg.env.settings())
    expected = make_task(cfg.task).split("train", cfg.env.n_prompts)
    assert [e.prompt for e in env.prompts.examples] == [e.prompt for e in expected]
    assert env.prompts.examples[0].scoring == "normalised"


# --- lm-evaluation-harness ------------------------------------------------------------------------------------------
LM_EVAL_TASK = """task: tiny_repeat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_end_to_end_offline(tmp_path) -> None:
    """`blockreuse-lm-eval run --model blockreuse ...` on a local task YAML whose data is a JSONL file written here:
    lm_eval's own results file, with the policy's FLOP fraction and throughput beside it."""
    examples = TaskSuite(["repeat"]).split("test", 4)
    data = write_jsonl(tmp_path / "data.jsonl", [{"question": e.prompt, "answer": e.answer} for e in examples])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_repeat.yaml").write_text(LM_EVAL_TASK.format(data=data))
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "cache_core.bench.lm_eval_model", "run", "--model", "blockreuse", "--model_args",
           f"pretrained={REPO / 'checkpoints' / 'builtin'},policy=dual_cache,gen_length=64,block_length=16,steps=64",
           "--tasks", "tiny_repeat", "--include_path", str(tmp_path / "tasks"), "--batch_size", "4",
           "--output_path", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    em = results["results"]["tiny_repeat"]["exact_match,none"]
    # the same prompts through our own evaluation give the same exact match
    from cache_core import generate, load_model, load_tokenizer

    model, tok = load_model(REPO / "checkpoints" / "builtin"), load_tokenizer(REPO / "checkpoints" / "builtin")
    r = generate(model, [tok.encode(e.prompt) for e in examples], gen_length=64, block_length=16, steps=64,
                 policy="dual_cache")
    ours = sum(score(tok.decode(row.tolist()).split("\n")[0], e) for row, e in zip(r.tokens, examples)) / 4
    assert em == pytest.approx(ours)
    stats = json.loads((out / "blockreuse_stats.json").read_text())
    assert stats["sequences"] == 4 and 0 < stats["flop_fraction"] < 1 and stats["tokens_per_s"] > 0
    assert stats["flop_fraction"] == pytest.approx(r.stats.flop_fraction)
    assert stats["tokens_per_forward"] == pytest.approx(1.0)  # the linear schedule: one token per step


def test_lm_eval_refuses_loglikelihood_and_bad_args() -> None:
    from cache_core.bench.lm_eval_model import BlockReuseLM

    lm = BlockReuseLM(pretrained=str(REPO / "checkpoints" / "builtin"), steps=64, gen_length=64, block_length=16,
                      device="cpu")
    with pytest.raises(NotImplementedError, match="not supported for diffusion generation"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="not supported"):
        lm.loglikelihood_rolling([])
    with pytest.raises(ValueError, match="steps=<n>.*threshold=<t>"):
        BlockReuseLM(pretrained=str(REPO / "checkpoints" / "builtin"))
    with pytest.raises(ValueError, match="unknown policy|not a registered"):
        BlockReuseLM(pretrained=str(REPO / "checkpoints" / "builtin"), steps=64, policy="no_such_policy")

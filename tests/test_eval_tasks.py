"""The local lm-eval task suites (skymoe.evaluation.tasks): every suite runs through lm-eval's
``simple_evaluate`` with test LMs, offline, with network sockets blocked.

- an oracle LM (the gold choice gets the highest log-likelihood; generations are the gold answer
  written so the task's own filters extract it) scores 100% on every suite;
- a seeded uniformly random LM scores within a binomial tolerance of chance on the
  multiple-choice suites (and ~0 on the generative ones);
- HumanEval runs the reference solutions through the local sandboxed scorer (opt-in env var);
- bad data folders, files, rows and suite names fail with errors naming the file and line.

MMLU, GSM8K, MATH, HumanEval, HellaSwag and PIQA use the bundled ``examples/bench``; C-Eval and
CMMLU (non-commercial, not bundled) come from ``../shared/data/bench`` with a small limit and are
skipped when that folder is absent.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")  # the eval extra
from lm_eval.api.model import LM  # noqa: E402

from skymoe.evaluation.task_templates import minerva_math  # noqa: E402
from skymoe.evaluation.tasks import DEFAULT_NUM_FEWSHOT, MARKER, TaskError, TaskSet, build_tasks  # noqa: E402
from skymoe.config import SUITES, SuiteConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "bench"
SHARED = REPO.parent / "shared" / "data" / "bench"
BUNDLED = ("mmlu", "gsm8k", "math", "hellaswag", "piqa")  # humaneval has its own test
MULTIPLE_CHOICE_CHANCE = {"mmlu": 0.25, "cmmlu": 0.25, "ceval": 0.25, "hellaswag": 0.25, "piqa": 0.5}


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Hugging Face offline switches, a private HF_HOME, and no internet sockets at all."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
    original_connect = socket.socket.connect

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline evaluation test")

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse()
        return original_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


class OracleLM(LM):
    """Knows the answers: reads each request's doc through its task's doc_to_target/doc_to_choice
    (multiple choice) or writes the gold answer the way the task's filters extract it."""

    def __init__(self, taskset: TaskSet):
        super().__init__()
        self.taskset = taskset
        self.tasks = taskset.task_manager().load(taskset.names)["tasks"]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        scores = []
        for request in requests:
            task = self.tasks[request.task_name]
            gold = task.doc_to_target(request.doc)
            if not isinstance(gold, int):
                gold = task.doc_to_choice(request.doc).index(gold)
            scores.append((0.0, True) if request.idx == gold else (-10.0, False))
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm: bool = False):
        return [self.answer(request) for request in requests]

    def answer(self, request) -> str:
        suite, doc = self.taskset.suite_of(request.task_name), request.doc
        if suite == "gsm8k":  # the reference solution, ending in "#### <number>"
            return " " + doc["answer"]
        if suite == "math":  # Minerva's answer sentence around the solution's boxed answer
            boxed = minerva_math.remove_boxed(minerva_math.last_boxed_only_string(doc["solution"]))
            return f" Final Answer: The final answer is {boxed.replace(chr(10), ' ')}. I hope it is correct."
        if suite == "humaneval":
            return doc["canonical_solution"]
        raise AssertionError(f"no generation expected for {request.task_name}")


class RandomLM(LM):
    """Guesses: uniform random log-likelihoods (seeded), a random number as every generation."""

    def __init__(self, seed: int):
        super().__init__()
        self.rng = random.Random(seed)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return [(-self.rng.uniform(1.0, 20.0), False) for _ in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm: bool = False):
        return [f" The answer is {self.rng.randrange(10**6)}.\n#### {self.rng.randrange(10**6)}" for _ in requests]


def _run(taskset: TaskSet, lm: LM, **kwargs) -> dict:
    return taskset.evaluate(lm, bootstrap_iters=0, log_samples=False, **kwargs)["results"]


def _within_chance(accuracy: float, chance: float, n: int) -> bool:
    return abs(accuracy - chance) <= 4 * math.sqrt(chance * (1 - chance) / n)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory) -> TaskSet:
    return build_tasks(str(EXAMPLES), {name: SuiteConfig() for name in BUNDLED}, tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def chinese(tmp_path_factory) -> TaskSet:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: C-Eval and CMMLU are not bundled (CC BY-NC-SA)")
    return build_tasks(str(SHARED), {"ceval": SuiteConfig(limit=4), "cmmlu": SuiteConfig(limit=4)},
                       tmp_path_factory.mktemp("tasks_zh"))


# -------------------------------------------------------------------------------- scores
def test_network_is_blocked_here():
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(OSError, match="network access attempted"):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("127.0.0.1", 9))


def _assert_perfect(taskset: TaskSet, results: dict) -> None:
    for suite in taskset.suites.values():
        for name in (suite.name, *suite.tasks):
            for metric in suite.metrics:
                assert results[name][metric] == 1.0, (name, metric, results[name])


def test_oracle_scores_100_on_bundled_suites(bundled):
    assert bundled.names == ["skymoe_mmlu", "skymoe_gsm8k", "skymoe_math", "skymoe_hellaswag", "skymoe_piqa"]
    results = _run(bundled, OracleLM(bundled))
    _assert_perfect(bundled, results)
    assert results["skymoe_mmlu"]["sample_len"] == 100 and results["skymoe_math"]["sample_len"] == 45


def test_random_scores_near_chance_on_bundled_suites(bundled):
    results = _run(bundled, RandomLM(seed=1234))
    for name, chance in MULTIPLE_CHOICE_CHANCE.items():
        if name in bundled.suites:
            suite = bundled.suites[name]
            n = sum(suite.items.values())
            assert _within_chance(results[suite.name]["acc,none"], chance, n), (name, results[suite.name])
    assert results["skymoe_gsm8k"]["exact_match,strict-match"] <= 0.05
    assert results["skymoe_gsm8k"]["exact_match,flexible-extract"] <= 0.05
    assert results["skymoe_math"]["exact_match,none"] <= 0.05


def test_oracle_and_random_on_ceval_and_cmmlu(chinese):
    assert chinese.names == ["skymoe_ceval", "skymoe_cmmlu"]
    assert len(chinese.suites["ceval"].tasks) == 52 and len(chinese.suites["cmmlu"].tasks) == 67
    assert set(chinese.suites["cmmlu"].items.values()) == {4}  # limit = items per subject
    _assert_perfect(chinese, _run(chinese, OracleLM(chinese)))
    results = _run(chinese, RandomLM(seed=7))
    for name in ("ceval", "cmmlu"):
        suite = chinese.suites[name]
        assert _within_chance(results[suite.name]["acc,none"], 0.25, sum(suite.items.values())), results[suite.name]


class HalfRightLM(OracleLM):
    """The reference solution for even documents, a wrong body for odd ones."""

    def answer(self, request) -> str:
        return super().answer(request) if request.doc_id % 2 == 0 else "    return None\n"


def test_humaneval_runs_reference_solutions_through_local_scorer(tmp_path, monkeypatch):
    from skymoe.evaluation.humaneval import OPT_IN_ENV, UNSAFE_ENV, UnsafeCodeRefused

    taskset = build_tasks(str(EXAMPLES), {"humaneval": SuiteConfig()}, tmp_path / "tasks")
    assert taskset.unsafe_code and taskset.suites["humaneval"].items == {"skymoe_humaneval": 164}
    monkeypatch.delenv(OPT_IN_ENV, raising=False)
    with pytest.raises(ValueError, match="unsafe"):  # lm-eval's own guard
        _run(taskset, OracleLM(taskset))
    with pytest.raises(UnsafeCodeRefused):  # the scorer's guard: no opt-in, no execution
        _run(taskset, OracleLM(taskset), confirm_run_unsafe_code=True)
    monkeypatch.setenv(OPT_IN_ENV, "1")  # the reference solutions are trusted code
    monkeypatch.setenv(UNSAFE_ENV, "1")  # ... so they may run where no OS sandbox can be made
    results = _run(taskset, HalfRightLM(taskset), confirm_run_unsafe_code=True)
    assert results["skymoe_humaneval"]["pass@1,create_test"] == 0.5  # exactly the 82 even problems


# ---------------------------------------------------------------- generated YAMLs and settings
def test_tasks_reuse_builtin_prompts_and_take_fewshot_and_limit_from_config(tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    suites = {"mmlu": SuiteConfig(num_fewshot=2, limit=3), "gsm8k": SuiteConfig(limit=7), "hellaswag": SuiteConfig(),
              "piqa": SuiteConfig(num_fewshot=1, limit=5), "math": SuiteConfig(num_fewshot=0, limit=2)}
    taskset = build_tasks(str(EXAMPLES), suites, tmp_path / "tasks")
    assert set(taskset.groups) == {"skymoe_mmlu", "skymoe_math"}
    assert taskset.num_fewshot["skymoe_mmlu_anatomy"] == 2 and taskset.num_fewshot["skymoe_gsm8k"] == 5
    assert taskset.limit["skymoe_gsm8k"] == 7 and taskset.limit["skymoe_hellaswag"] is None
    assert set(taskset.suites["mmlu"].items.values()) == {3} and taskset.suites["piqa"].items == {"skymoe_piqa": 5}
    loaded = taskset.task_manager().load(taskset.names)["tasks"]
    builtin = Path(lm_eval.__file__).parent / "tasks"
    for name, reference in (("skymoe_mmlu_anatomy", "mmlu/default/mmlu_anatomy.yaml"),
                            ("skymoe_gsm8k", "gsm8k/gsm8k.yaml"), ("skymoe_hellaswag", "hellaswag/hellaswag.yaml"),
                            ("skymoe_piqa", "piqa/piqa.yaml")):
        ours, theirs = loaded[name].config, load_yaml(builtin / reference, resolve_func=False)
        assert ours.doc_to_text == theirs["doc_to_text"] and ours.doc_to_choice == theirs.get("doc_to_choice")
        assert ours.num_fewshot == taskset.num_fewshot[name]
        assert len(loaded[name].eval_docs) == taskset.suites[taskset.suite_of(name)].items[name]
    assert loaded["skymoe_mmlu_anatomy"].config.description.startswith("The following are multiple choice questions")
    assert loaded["skymoe_gsm8k"].config.filter_list[0]["name"] == "strict-match"
    # the CSV row became cais/mmlu's schema
    doc = loaded["skymoe_mmlu_anatomy"].eval_docs[0]
    assert set(doc) == {"question", "subject", "choices", "answer"} and doc["answer"] == 0 and len(doc["choices"]) == 4
    # a rebuild into the same folder replaces the old tasks
    again = build_tasks(str(EXAMPLES), {"piqa": SuiteConfig()}, tmp_path / "tasks")
    assert not (tmp_path / "tasks" / "mmlu").exists() and again.names == ["skymoe_piqa"]


def test_default_fewshot_counts():
    assert DEFAULT_NUM_FEWSHOT == {"ceval": 5, "cmmlu": 5, "mmlu": 5, "gsm8k": 5, "math": 4, "humaneval": 0,
                                   "hellaswag": 0, "piqa": 0}
    assert set(DEFAULT_NUM_FEWSHOT) == set(SUITES)


# --------------------------------------------------------------------------------- bad inputs
def _copy_examples(tmp_path: Path, *suites: str) -> Path:
    data = tmp_path / "bench"
    for suite in suites:
        shutil.copytree(EXAMPLES / suite, data / suite)
    return data


def _build(data: Path, tmp_path: Path, **suites: SuiteConfig) -> TaskSet:
    return build_tasks(str(data), suites or {"mmlu": SuiteConfig()}, tmp_path / "out")


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(TaskError, match=f"evaluate.data_dir {tmp_path / 'nowhere'}: no such folder"):
        build_tasks(str(tmp_path / "nowhere"), {"mmlu": SuiteConfig()}, tmp_path / "out")
    with pytest.raises(TaskError, match="copy it there first"):
        build_tasks("s3://bucket/bench", {"mmlu": SuiteConfig()}, tmp_path / "out")


def test_missing_suite_folder_and_files_are_named(tmp_path):
    data = _copy_examples(tmp_path, "mmlu", "gsm8k", "piqa")
    with pytest.raises(TaskError, match=r"cmmlu: no folder .*bench/cmmlu"):
        _build(data, tmp_path, cmmlu=SuiteConfig())
    (data / "mmlu" / "dev" / "marketing_dev.csv").unlink()
    with pytest.raises(TaskError, match=r"mmlu: missing file .*mmlu/dev/marketing_dev\.csv"):
        _build(data, tmp_path)
    assert _build(data, tmp_path, mmlu=SuiteConfig(num_fewshot=0)).num_fewshot["skymoe_mmlu_marketing"] == 0
    (data / "gsm8k" / "test.jsonl").unlink()
    with pytest.raises(TaskError, match=r"gsm8k: missing file .*gsm8k/test\.jsonl"):
        _build(data, tmp_path, gsm8k=SuiteConfig())
    (data / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(TaskError, match=r"valid-labels\.lst: 2 labels but .*valid\.jsonl has 200 questions"):
        _build(data, tmp_path, piqa=SuiteConfig())


def test_unknown_suite_lists_the_known_ones(tmp_path):
    with pytest.raises(TaskError, match="unknown suite 'arc': known suites are ceval, cmmlu, mmlu, gsm8k, math, "
                                        "humaneval, hellaswag, piqa"):
        build_tasks(str(EXAMPLES), {"arc": SuiteConfig(), "mmlu": SuiteConfig()}, tmp_path / "out")
    with pytest.raises(TaskError, match="no suites chosen"):
        build_tasks(str(EXAMPLES), {}, tmp_path / "out")


def _mutate_line(path: Path, line: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[line - 1] = text
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.mark.parametrize("line, text, message", [
    (3, "What is it?,a,b,c,d",
     r"anatomy_test\.csv:3: expected 6 columns \(question,choice0,choice1,choice2,choice3,answer\), got 5"),
    (4, "What is it?,a,b,c,d,E", r"anatomy_test\.csv:4: answer 'E' is not one of 0-3"),
    (5, "What is it?,a,b,c,d,4", r"anatomy_test\.csv:5: answer '4' is not one of 0-3"),
    (1, "question,choice0,choice1,choice2,answer",
     r"anatomy_test\.csv:1: header 'question,choice0,choice1,choice2,answer' is not"),
    (2, '"unterminated,a,b,c,d,0', r"anatomy_test\.csv: malformed CSV"),
])
def test_malformed_mmlu_csv_row_is_named(tmp_path, line, text, message):
    data = _copy_examples(tmp_path, "mmlu")
    _mutate_line(data / "mmlu" / "test" / "anatomy_test.csv", line, text)
    with pytest.raises(TaskError, match=message):
        _build(data, tmp_path)


def test_malformed_ceval_and_cmmlu_rows_are_named(tmp_path):
    data = tmp_path / "bench"
    for folder in ("ceval/val", "ceval/dev", "cmmlu/data/test", "cmmlu/data/dev"):
        (data / folder).mkdir(parents=True)
    rows = "".join(f"{i},问题{i},甲,乙,丙,丁,{'ABCD'[i % 4]}\n" for i in range(6))
    (data / "ceval/val/logic_val.csv").write_text("id,question,A,B,C,D,answer\n" + rows, encoding="utf-8")
    (data / "ceval/dev/logic_dev.csv").write_text("id,question,A,B,C,D,answer,explanation\n"
                                                  + rows.replace("\n", ",解释\n"), encoding="utf-8")
    (data / "cmmlu/data/test/logical.csv").write_text(",Question,A,B,C,D,Answer\n" + rows, encoding="utf-8")
    (data / "cmmlu/data/dev/logical.csv").write_text(",Question,A,B,C,D,Answer\n" + rows, encoding="utf-8")
    taskset = _build(data, tmp_path, ceval=SuiteConfig(), cmmlu=SuiteConfig(limit=2))
    assert taskset.suites["ceval"].items == {"skymoe_ceval_logic": 6}
    assert taskset.suites["cmmlu"].items == {"skymoe_cmmlu_logical": 2}
    _mutate_line(data / "cmmlu/data/test/logical.csv", 3, "1,问题1,甲,乙,丙,丁,E")
    with pytest.raises(TaskError, match=r"logical\.csv:3: answer 'E' is not one of A-D"):
        _build(data, tmp_path, cmmlu=SuiteConfig())
    _mutate_line(data / "ceval/val/logic_val.csv", 7, "5,问题5,甲,乙,丙,丁")
    with pytest.raises(TaskError, match=r"logic_val\.csv:7: expected 7 columns .*got 6"):
        _build(data, tmp_path, ceval=SuiteConfig())


@pytest.mark.parametrize("suite, relative, line, text, message", [
    ("gsm8k", "gsm8k/test.jsonl", 3, '{"question": "q", "answer": "4"', r"test\.jsonl:3: bad JSON"),
    ("gsm8k", "gsm8k/test.jsonl", 2, '{"question": "q", "answer": "it is 4"}',
     r"test\.jsonl:2: answer has no final '#### <number>' line"),
    ("gsm8k", "gsm8k/train.jsonl", 4, '["not", "an", "object"]', r"train\.jsonl:4: expected a JSON object, got list"),
    ("math", "math/jsonl/test_algebra.jsonl", 2, '{"problem": "p", "solution": "no box"}',
     r"test_algebra\.jsonl:2: solution has no \\boxed"),
    ("math", "math/jsonl/test_algebra.jsonl", 5, '{"problem": 3, "solution": "\\\\boxed{3}"}',
     r"test_algebra\.jsonl:5: field 'problem' should be a string"),
    ("hellaswag", "hellaswag/hellaswag_val.jsonl", 6, '{"query": "q", "choices": ["a", "b"], "gold": 2}',
     r"hellaswag_val\.jsonl:6: 'gold' 2 is not an index"),
    ("hellaswag", "hellaswag/hellaswag_val.jsonl", 7, '{"query": "q", "gold": 0}',
     r"hellaswag_val\.jsonl:7: 'choices' should be a list"),
    ("piqa", "piqa/valid.jsonl", 8, '{"goal": "g", "sol1": "a"}', r"valid\.jsonl:8: missing field 'sol2'"),
    ("piqa", "piqa/valid-labels.lst", 9, "2", r"valid-labels\.lst:9: label '2' is not 0 or 1"),
])
def test_bad_jsonl_line_is_named(tmp_path, suite, relative, line, text, message):
    data = _copy_examples(tmp_path, suite)
    _mutate_line(data / relative, line, text)
    with pytest.raises(TaskError, match=message):
        _build(data, tmp_path, **{suite: SuiteConfig()})


def test_bad_humaneval_file_is_named(tmp_path):
    import gzip

    data = tmp_path / "bench"
    (data / "humaneval").mkdir(parents=True)
    good = {"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
            "test": "def check(f):\n    assert f() == 1\n", "entry_point": "f"}
    with gzip.open(data / "humaneval" / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(TaskError, match=r"HumanEval\.jsonl\.gz:2: task_id 'T/0' appears twice"):
        _build(data, tmp_path, humaneval=SuiteConfig())
    (data / "humaneval" / "HumanEval.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(TaskError, match=r"HumanEval\.jsonl\.gz: cannot read"):
        _build(data, tmp_path, humaneval=SuiteConfig())


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(TaskError, match="math: num_fewshot 5 is more than the 4 this suite has"):
        build_tasks(str(EXAMPLES), {"math": SuiteConfig(num_fewshot=5)}, tmp_path / "out")
    with pytest.raises(TaskError, match="humaneval: num_fewshot 1 is more than the 0"):
        build_tasks(str(EXAMPLES), {"humaneval": SuiteConfig(num_fewshot=1)}, tmp_path / "out")
    with pytest.raises(TaskError, match=r"anatomy_dev\.csv: 5 rows, fewer than num_fewshot 6"):
        build_tasks(str(EXAMPLES), {"mmlu": SuiteConfig(num_fewshot=6)}, tmp_path / "out")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(TaskError, match="not empty and was not written by build_tasks"):
        build_tasks(str(EXAMPLES), {"piqa": SuiteConfig()}, foreign)
    assert (foreign / "notes.txt").exists() and not (foreign / MARKER).exists()

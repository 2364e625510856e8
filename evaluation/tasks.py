"""Local lm-evaluation-harness task suites: C-Eval (val), CMMLU, MMLU, GSM8K, MATH, HumanEval,
HellaSwag and PIQA, read from a data folder and never fetched.

:func:`build_tasks` checks a data folder laid out like ``../shared/data/bench`` (the bundled
``examples/bench`` has the same layout)::

    mmlu/{dev,test}/<subject>_{dev,test}.csv     question,choice0,choice1,choice2,choice3,answer (0-3)
    cmmlu/data/{dev,test}/<subject>.csv          ,Question,A,B,C,D,Answer (A-D)
    ceval/{dev,val}/<subject>_{dev,val}.csv      id,question,A,B,C,D,answer (A-D)[,explanation]
    gsm8k/{train,test}.jsonl                     {"question", "answer": "... #### 42"}
    math/jsonl/test_<subject>.jsonl              {"problem", "solution" with \\boxed{}, ...}
    humaneval/HumanEval.jsonl.gz                 {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    hellaswag/hellaswag_val.jsonl                {"query", "choices": [4], "gold"}
    piqa/valid.jsonl + piqa/valid-labels.lst     {"goal", "sol1", "sol2"} and one 0/1 per line

checks every row it will use (a clear :class:`TaskError` names the file, the line and the
problem), writes the rows as JSONL plus one lm-eval task YAML per task (and a group YAML per
multi-task suite) into ``out_dir``, and returns a :class:`TaskSet`: the names to pass to
``simple_evaluate``, the ``TaskManager`` include path, the few-shot count and limit of each task.

**Prompt formats are lm-eval's own.** Where the local schema matches a built-in task after
conversion, the generated YAML ``include``s the built-in file (by absolute path, from the
installed lm-eval) and overrides only the data source (``dataset_path: json``,
``dataset_name: null``, ``dataset_kwargs.data_files``), the splits, the task name and the few-shot
count: MMLU (``mmlu/default/mmlu_<subject>.yaml``; the CSVs are mapped to cais/mmlu's
``{question, subject, choices, answer}``), CMMLU (``cmmlu_<subject>.yaml``), C-Eval
(``ceval-valid_<subject>.yaml``), GSM8K (``gsm8k.yaml``: strict ``#### N`` and flexible
last-number extraction), HellaSwag (``hellaswag.yaml``; the local file already holds the built-in's
processed ``{query, choices, gold}``, so ``process_docs`` is dropped and the target is ``gold``)
and PIQA (``piqa.yaml``; ``valid.jsonl`` joined with ``valid-labels.lst`` as ``label``). Two
suites cannot include their built-in because its Python hooks fail offline, so their YAML is
written out with the same prompt: MATH (``minerva_math``'s utils need the ``lm-eval[math]``
extra; see :mod:`skymoe.evaluation.task_templates.minerva_math`) and HumanEval (the built-in calls
``evaluate.load("code_eval")`` from the hub at import; scored by :mod:`skymoe.evaluation.humaneval`).

**Task names** carry a ``skymoe_`` prefix so they never collide with lm-eval's built-ins:
groups ``skymoe_mmlu``, ``skymoe_cmmlu``, ``skymoe_ceval`` and ``skymoe_math`` (one task per
subject, ``skymoe_<suite>_<subject>``; the group score is the mean over all items, lm-eval's
``weight_by_size``, as for the built-in groups) and single tasks ``skymoe_gsm8k``,
``skymoe_humaneval``, ``skymoe_hellaswag`` and ``skymoe_piqa``.

**Few-shot counts** (``SuiteConfig.num_fewshot``, null = :data:`DEFAULT_NUM_FEWSHOT`) are written
into each task YAML, so ``simple_evaluate`` must get ``num_fewshot=None``. Defaults: the
published settings, MMLU/CMMLU/C-Eval 5 (first 5 dev rows, as the built-ins), GSM8K 5 (lm-eval's
``gsm8k`` task; 8 is the chain-of-thought variant: 5 already gives ~1,000-token contexts, far past
a small model's window, and the model wrapper keeps the right end of a long context), MATH 4 (the
fixed Minerva examples, hence at most 4), HumanEval 0 (only 0), HellaSwag and PIQA 0 (few-shot
examples, if asked for, are drawn from the validation file itself, excluding the item asked).

**Limits** (``SuiteConfig.limit``: items per task, i.e. per subject for the MMLU family and MATH)
are applied when the data is written: only the first ``limit`` rows of the evaluated split go
into ``out_dir`` (the rows lm-eval's own ``limit`` would take), so a single ``simple_evaluate``
call serves suites with different limits; pass no ``limit`` to it. Few-shot pools are kept whole.

Nothing is downloaded: the data files are local, the Hugging Face ``datasets`` cache for them is
``out_dir/hf_datasets_cache`` (given to ``load_dataset`` as ``cache_dir``), and the callers set
``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` (:data:`OFFLINE_ENV`) as a second guard.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from skymoe.config import SUITES, SuiteConfig

PREFIX = "skymoe"
DEFAULT_NUM_FEWSHOT = {"ceval": 5, "cmmlu": 5, "mmlu": 5, "gsm8k": 5, "math": 4, "humaneval": 0, "hellaswag": 0,
                       "piqa": 0}
MAX_NUM_FEWSHOT = {"math": 4, "humaneval": 0}  # the Minerva prompt has 4 examples; HumanEval is zero-shot
# lm-eval result keys ("metric,filter") each suite reports, headline first.
METRICS = {
    "ceval": ("acc,none", "acc_norm,none"),
    "cmmlu": ("acc,none", "acc_norm,none"),
    "mmlu": ("acc,none",),
    "gsm8k": ("exact_match,strict-match", "exact_match,flexible-extract"),
    "math": ("exact_match,none",),
    "humaneval": ("pass@1,create_test",),
    "hellaswag": ("acc_norm,none", "acc,none"),
    "piqa": ("acc_norm,none", "acc,none"),
}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
MARKER = ".skymoe-tasks"  # marks an out_dir written by build_tasks (and so safe to clear)
_SUBJECT = re.compile(r"^[A-Za-z0-9_\-]+$")
_GSM8K_FINAL = re.compile(r"#### (\-?[0-9\.\,]+)")  # the built-in's strict-match pattern
_HOOKS = "skymoe.evaluation.task_templates.minerva_math"


class TaskError(ValueError):
    """The task suites cannot be built: bad data folder, file, row, suite name or setting."""


# ----------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class SuiteTasks:
    """One suite as lm-eval tasks."""

    suite: str
    name: str  # the lm-eval name to request: a group (per-subject suites) or the single task
    tasks: tuple[str, ...]  # the leaf tasks
    num_fewshot: int
    limit: int | None  # items per task (None = all)
    items: dict[str, int]  # evaluated items per leaf task, after the limit
    metrics: tuple[str, ...]  # lm-eval "metric,filter" keys, headline first
    unsafe_code: bool = False  # executes model-written code (needs confirm_run_unsafe_code)
    sources: tuple[str, ...] = ()  # the data files read

    @property
    def is_group(self) -> bool:
        return self.name not in self.tasks


@dataclass(frozen=True)
class TaskSet:
    """What :func:`build_tasks` wrote: run ``simple_evaluate(tasks=names, task_manager=
    task_manager(), num_fewshot=None, limit=None)`` (or :meth:`evaluate`)."""

    include_path: Path
    suites: dict[str, SuiteTasks] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Group or task name per suite, in suite order."""
        return [suite.name for suite in self.suites.values()]

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        return {suite.name: suite.tasks for suite in self.suites.values() if suite.is_group}

    @property
    def num_fewshot(self) -> dict[str, int]:
        return {task: suite.num_fewshot for suite in self.suites.values() for task in suite.tasks}

    @property
    def limit(self) -> dict[str, int | None]:
        return {task: suite.limit for suite in self.suites.values() for task in suite.tasks}

    @property
    def unsafe_code(self) -> bool:
        return any(suite.unsafe_code for suite in self.suites.values())

    def suite_of(self, name: str) -> str | None:
        """The suite of an lm-eval task or group name (None when it is none of ours)."""
        for suite in self.suites.values():
            if name == suite.name or name in suite.tasks:
                return suite.suite
        return None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (for manifests and logs)."""
        return {name: {"lm_eval_name": s.name, "tasks": len(s.tasks), "items": sum(s.items.values()),
                       "num_fewshot": s.num_fewshot, "limit": s.limit, "metrics": list(s.metrics)}
                for name, s in self.suites.items()}

    def task_manager(self):
        """A TaskManager that indexes only these tasks (lm-eval's ~10k built-in YAMLs are skipped;
        the generated files still ``include`` built-in ones by path)."""
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=str(self.include_path), include_defaults=False)

    def evaluate(self, lm, **kwargs) -> dict[str, Any]:
        """``lm_eval.simple_evaluate`` on every suite with an LM instance; ``kwargs`` pass through.
        HumanEval needs ``confirm_run_unsafe_code=True`` here *and* ``SKYMOE_RUN_MODEL_CODE=1`` in
        the environment (:mod:`skymoe.evaluation.humaneval`)."""
        import lm_eval

        for forbidden in ("tasks", "task_manager", "num_fewshot", "limit"):
            if forbidden in kwargs:
                raise TypeError(f"TaskSet.evaluate sets {forbidden} itself")
        return lm_eval.simple_evaluate(model=lm, tasks=self.names, task_manager=self.task_manager(),
                                       num_fewshot=None, limit=None, **kwargs)


# ------------------------------------------------------------------------------------------ entry
def build_tasks(data_dir: str, suites: dict[str, SuiteConfig], out_dir: Path) -> TaskSet:
    """Validate ``data_dir`` for the chosen suites and write their lm-eval tasks into ``out_dir``
    (created; a folder written by an earlier call is cleared first, any other non-empty folder is
    refused). Raises :class:`TaskError` naming the suite, file, line and problem."""
    if not suites:
        raise TaskError(f"no suites chosen: expected some of {', '.join(SUITES)}")
    unknown = [name for name in suites if name not in SUITES]
    if unknown:
        raise TaskError(f"unknown suite{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                        f"known suites are {', '.join(SUITES)}")
    root = _data_root(data_dir)
    plan: list[tuple[str, int, int | None]] = []  # (suite, num_fewshot, limit), checked before any writing
    for name in SUITES:  # a fixed order, whatever the config's
        if name not in suites:
            continue
        config = suites[name] if suites[name] is not None else SuiteConfig()
        if isinstance(config, dict):
            config = SuiteConfig(**config)
        fewshot = DEFAULT_NUM_FEWSHOT[name] if config.num_fewshot is None else config.num_fewshot
        if name in MAX_NUM_FEWSHOT and fewshot > MAX_NUM_FEWSHOT[name]:
            raise TaskError(f"{name}: num_fewshot {fewshot} is more than the {MAX_NUM_FEWSHOT[name]} this suite has")
        if not (root / name).is_dir():
            raise TaskError(f"{name}: no folder {root / name} in the data folder {root} "
                            f"(expected the layout of ../shared/data/bench)")
        plan.append((name, fewshot, config.limit))
    out = _prepare_out(Path(out_dir))
    writer = _Writer(root, out)
    built = {name: _BUILDERS[name](writer, fewshot, limit) for name, fewshot, limit in plan}
    return TaskSet(include_path=out, suites=built)


def select_suites(configured: dict[str, SuiteConfig], names: list[str] | None = None,
                  limit: int | None = None) -> dict[str, SuiteConfig]:
    """The suites to build: ``names`` (None = the configured ones), each with its configured
    settings (the suite's defaults for one the config leaves out), and ``limit`` (when given) in
    place of every configured limit. Unknown names are left for :func:`build_tasks` to refuse."""
    chosen = {name: configured.get(name) or SuiteConfig() for name in (names or configured)}
    if limit is None:
        return chosen
    return {name: suite.model_copy(update={"limit": limit}) for name, suite in chosen.items()}


def _data_root(data_dir: str) -> Path:
    text = str(data_dir)
    if "://" in text and not text.startswith("file://"):
        raise TaskError(f"evaluate.data_dir {text}: task data is read from a local folder; copy it there first")
    root = Path(text.removeprefix("file://")).expanduser()
    if not root.exists():
        raise TaskError(f"evaluate.data_dir {root}: no such folder")
    if not root.is_dir():
        raise TaskError(f"evaluate.data_dir {root}: not a folder")
    return root.resolve()


def _prepare_out(out: Path) -> Path:
    out = out.expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise TaskError(f"{out}: task output folder is a file")
        if any(out.iterdir()):
            if not (out / MARKER).exists():
                raise TaskError(f"{out}: task output folder is not empty and was not written by build_tasks")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("lm-eval task YAMLs and data written by skymoe.evaluation.tasks.build_tasks\n")
    return out


# ----------------------------------------------------------------------------------------- output
class _FunctionRef(str):
    """A ``!function module.name`` YAML value."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_FunctionRef, lambda dumper, value: dumper.represent_scalar("!function", str(value)))
_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style='"' if "\n" in value else None))


def _lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("lm-eval is not installed (pip install 'skymoe[eval]')")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


class _Writer:
    def __init__(self, root: Path, out: Path):
        self.root = root
        self.out = out
        self.cache_dir = str(out / "hf_datasets_cache")
        self.builtin = _lm_eval_tasks_dir()

    def builtin_yaml(self, relative: str) -> Path | None:
        path = self.builtin / relative
        return path if path.is_file() else None

    def data(self, suite: str, name: str, rows: list[dict]) -> str:
        path = self.out / suite / "data" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return str(path)

    def dataset(self, data_files: dict[str, str]) -> dict[str, Any]:
        return {"dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": data_files, "cache_dir": self.cache_dir}}

    def task_yaml(self, suite: str, task: str, config: dict[str, Any]) -> None:
        path = self.out / suite / f"{task}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.dump(config, Dumper=_Dumper, allow_unicode=True, sort_keys=False, width=1000),
                        encoding="utf-8")

    def group_yaml(self, suite: str, tasks: list[str], metrics: tuple[str, ...]) -> str:
        group = f"{PREFIX}_{suite}"
        self.task_yaml(suite, f"_{group}", {
            "group": group,
            "group_alias": suite,
            "task": tasks,
            "aggregate_metric_list": [{"metric": metric.split(",")[0], "aggregation": "mean", "weight_by_size": True}
                                      for metric in metrics],
            "metadata": {"version": 1.0},
        })
        return group


# ------------------------------------------------------------------------------------------ input
def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8-sig", newline="")


def _require_file(path: Path, suite: str, what: str) -> Path:
    if not path.is_file():
        raise TaskError(f"{suite}: missing file {path} ({what})")
    return path


def _csv_rows(path: Path, header: tuple[str | None, ...], optional: tuple[str, ...] = (),
              limit: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) per record (line = where the record starts; the header is line 1), after
    checking the header against ``header`` (None = any name) plus optional trailing columns."""
    try:
        with _open_text(path) as f:
            reader = csv.reader(f, strict=True)
            try:
                found = next(reader)
            except StopIteration:
                raise TaskError(f"{path}: empty file (expected a header {','.join(h or '' for h in header)})") from None
            width = len(found)
            names = [h for h in found]
            expected = list(header)
            allowed = [expected + list(optional[:k]) for k in range(len(optional) + 1)]
            if not any(len(names) == len(option) and all(e is None or e == n for e, n in zip(option, names))
                       for option in allowed):
                raise TaskError(f"{path}:1: header {','.join(names)!r} is not the expected "
                                f"{','.join(h if h is not None else '<index>' for h in header)!r}"
                                + (f" (optionally followed by {','.join(optional)})" if optional else ""))
            start = reader.line_num + 1
            count = 0
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    start = reader.line_num + 1
                    continue  # a blank line
                if len(row) != width:
                    raise TaskError(f"{path}:{start}: expected {width} columns ({','.join(names)}), got {len(row)}")
                yield start, row
                count += 1
                start = reader.line_num + 1
                if limit is not None and count >= limit:
                    return
    except csv.Error as err:
        raise TaskError(f"{path}: malformed CSV near line {reader.line_num}: {err}") from None
    except UnicodeDecodeError as err:
        raise TaskError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (OSError, EOFError) as err:
        raise TaskError(f"{path}: cannot read ({err})") from None


def _jsonl_rows(path: Path, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    try:
        with _open_text(path) as f:
            count = 0
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise TaskError(f"{path}:{number}: bad JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(row, dict):
                    raise TaskError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                yield number, row
                count += 1
                if limit is not None and count >= limit:
                    return
    except UnicodeDecodeError as err:
        raise TaskError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (OSError, EOFError) as err:  # includes a corrupt gzip stream
        raise TaskError(f"{path}: cannot read ({err})") from None


def _check_fields(path: Path, number: int, row: dict, fields: tuple[str, ...], nonempty: tuple[str, ...] = ()) -> None:
    for name in fields:
        if name not in row:
            raise TaskError(f"{path}:{number}: missing field {name!r}")
        if not isinstance(row[name], str):
            raise TaskError(f"{path}:{number}: field {name!r} should be a string, got {type(row[name]).__name__}")
    for name in nonempty:
        if not row[name].strip():
            raise TaskError(f"{path}:{number}: field {name!r} is empty")


def _nonempty(rows: list, path: Path, what: str = "rows") -> list:
    if not rows:
        raise TaskError(f"{path}: no {what}")
    return rows


# ------------------------------------------------------------------------------- MMLU-type suites
@dataclass(frozen=True)
class _ChoiceLayout:
    """How one MMLU-type suite is stored and which built-in YAMLs format it."""

    suite: str
    eval_dir: str  # relative to the data root
    fewshot_dir: str
    eval_suffix: str  # file name = <subject><suffix>
    fewshot_suffix: str
    eval_split: str  # the split name the built-in evaluates ("test" or "val")
    split_key: str  # test_split or validation_split
    header: tuple[str | None, ...]
    optional: tuple[str, ...]
    builtin_subject: str  # relative path template of the built-in subject YAML
    builtin_default: str  # the built-in template to fall back on for an unknown subject
    convert: Callable[[list[str], str], dict]
    check_answer: Callable[[str], bool]
    answer_text: str


def _mmlu_row(row: list[str], subject: str) -> dict:
    return {"question": row[0], "subject": subject, "choices": row[1:5], "answer": int(row[5].strip())}


def _cmmlu_row(row: list[str], subject: str) -> dict:
    return {"Question": row[1], "A": row[2], "B": row[3], "C": row[4], "D": row[5], "Answer": row[6].strip()}


def _ceval_row(row: list[str], subject: str) -> dict:
    # the dev split's explanation column is dropped: the prompt does not use it, and both splits
    # of one load_dataset call then have the same columns
    return {"id": row[0], "question": row[1], "A": row[2], "B": row[3], "C": row[4], "D": row[5],
            "answer": row[6].strip()}


_LAYOUTS = {
    "mmlu": _ChoiceLayout(
        "mmlu", "mmlu/test", "mmlu/dev", "_test.csv", "_dev.csv", "test", "test_split",
        ("question", "choice0", "choice1", "choice2", "choice3", "answer"), (),
        "mmlu/default/mmlu_{subject}.yaml", "mmlu/default/_default_template_yaml", _mmlu_row,
        lambda a: a.strip() in ("0", "1", "2", "3"), "0-3"),
    "cmmlu": _ChoiceLayout(
        "cmmlu", "cmmlu/data/test", "cmmlu/data/dev", ".csv", ".csv", "test", "test_split",
        (None, "Question", "A", "B", "C", "D", "Answer"), (),
        "cmmlu/cmmlu_{subject}.yaml", "cmmlu/_default_template_yaml", _cmmlu_row,
        lambda a: a.strip() in ("A", "B", "C", "D"), "A-D"),
    "ceval": _ChoiceLayout(
        "ceval", "ceval/val", "ceval/dev", "_val.csv", "_dev.csv", "val", "validation_split",
        ("id", "question", "A", "B", "C", "D", "answer"), ("explanation",),
        "ceval/ceval-valid_{subject}.yaml", "ceval/_default_ceval_yaml", _ceval_row,
        lambda a: a.strip() in ("A", "B", "C", "D"), "A-D"),
}


def _choice_rows(layout: _ChoiceLayout, path: Path, subject: str, limit: int | None) -> list[dict]:
    question = layout.header.index("question") if "question" in layout.header else layout.header.index("Question")
    rows = []
    for number, row in _csv_rows(path, layout.header, layout.optional, limit):
        answer = row[len(layout.header) - 1]
        if not layout.check_answer(answer):
            raise TaskError(f"{path}:{number}: answer {answer!r} is not one of {layout.answer_text}")
        if not row[question].strip():
            raise TaskError(f"{path}:{number}: empty question")
        rows.append(layout.convert(row, subject))
    return _nonempty(rows, path)


def _build_choice_suite(layout: _ChoiceLayout, w: _Writer, fewshot: int, limit: int | None) -> SuiteTasks:
    suite = layout.suite
    eval_dir = w.root / layout.eval_dir
    if not eval_dir.is_dir():
        raise TaskError(f"{suite}: missing folder {eval_dir} (expected <subject>{layout.eval_suffix} files)")
    files = sorted(p for p in eval_dir.iterdir() if p.name.endswith(layout.eval_suffix) and p.is_file())
    if not files:
        raise TaskError(f"{suite}: no <subject>{layout.eval_suffix} files in {eval_dir}")
    tasks, items, sources = [], {}, []
    for path in files:
        subject = path.name[: -len(layout.eval_suffix)]
        if not _SUBJECT.match(subject):
            raise TaskError(f"{path}: subject name {subject!r} must be letters, digits, '_' or '-'")
        task = f"{PREFIX}_{suite}_{subject}"
        test_rows = _choice_rows(layout, path, subject, limit)
        data_files = {layout.eval_split: w.data(suite, f"{subject}_{layout.eval_split}", test_rows)}
        sources.append(str(path))
        if fewshot:
            dev = _require_file(w.root / layout.fewshot_dir / f"{subject}{layout.fewshot_suffix}", suite,
                                f"the few-shot examples for {subject}; num_fewshot is {fewshot}")
            dev_rows = _choice_rows(layout, dev, subject, None)
            if len(dev_rows) < fewshot:
                raise TaskError(f"{dev}: {len(dev_rows)} rows, fewer than num_fewshot {fewshot}")
            data_files["dev"] = w.data(suite, f"{subject}_dev", dev_rows)
            sources.append(str(dev))
        subject_yaml = w.builtin_yaml(layout.builtin_subject.format(subject=subject))
        config: dict[str, Any] = {"include": str(subject_yaml or w.builtin / layout.builtin_default)}
        if subject_yaml is None and suite == "mmlu":  # the built-in generator's description
            config["description"] = (f"The following are multiple choice questions (with answers) about "
                                     f"{subject.replace('_', ' ')}.\n\n")
        config |= {"task": task, "task_alias": subject, "tag": None, **w.dataset(data_files),
                   layout.split_key: layout.eval_split, "fewshot_split": "dev" if fewshot else None,
                   "num_fewshot": fewshot}
        w.task_yaml(suite, task, config)
        tasks.append(task)
        items[task] = len(test_rows)
    group = w.group_yaml(suite, tasks, METRICS[suite])
    return SuiteTasks(suite, group, tuple(tasks), fewshot, limit, items, METRICS[suite], sources=tuple(sources))


# ----------------------------------------------------------------------------------------- GSM8K
def _gsm8k_rows(path: Path, limit: int | None) -> list[dict]:
    rows = []
    for number, row in _jsonl_rows(path, limit):
        _check_fields(path, number, row, ("question", "answer"), ("question",))
        if not _GSM8K_FINAL.search(row["answer"]):
            raise TaskError(f"{path}:{number}: answer has no final '#### <number>' line")
        rows.append({"question": row["question"], "answer": row["answer"]})
    return _nonempty(rows, path)


def _build_gsm8k(w: _Writer, fewshot: int, limit: int | None) -> SuiteTasks:
    test = _require_file(w.root / "gsm8k" / "test.jsonl", "gsm8k", "the evaluated split")
    rows = _gsm8k_rows(test, limit)
    data_files = {"test": w.data("gsm8k", "test", rows)}
    sources = [str(test)]
    if fewshot:
        train = _require_file(w.root / "gsm8k" / "train.jsonl", "gsm8k", f"the few-shot pool; num_fewshot is {fewshot}")
        pool = _gsm8k_rows(train, None)
        if len(pool) < fewshot:
            raise TaskError(f"{train}: {len(pool)} rows, fewer than num_fewshot {fewshot}")
        data_files["train"] = w.data("gsm8k", "train", pool)
        sources.append(str(train))
    task = f"{PREFIX}_gsm8k"
    w.task_yaml("gsm8k", task, {
        "include": str(w.builtin / "gsm8k" / "gsm8k.yaml"), "task": task, "tag": None, **w.dataset(data_files),
        "training_split": "train" if fewshot else None, "fewshot_split": "train" if fewshot else None,
        "test_split": "test", "num_fewshot": fewshot})
    return SuiteTasks("gsm8k", task, (task,), fewshot, limit, {task: len(rows)}, METRICS["gsm8k"],
                      sources=tuple(sources))


# ------------------------------------------------------------------------------------------ MATH
def _build_math(w: _Writer, fewshot: int, limit: int | None) -> SuiteTasks:
    from skymoe.evaluation.task_templates.minerva_math import gold_answer

    folder = w.root / "math" / "jsonl"
    if not folder.is_dir():
        raise TaskError(f"math: missing folder {folder} (expected test_<subject>.jsonl files)")
    files = sorted(p for p in folder.glob("test_*.jsonl") if p.is_file())
    if not files:
        raise TaskError(f"math: no test_<subject>.jsonl files in {folder}")
    tasks, items = [], {}
    for path in files:
        subject = path.stem[len("test_"):]
        if not _SUBJECT.match(subject):
            raise TaskError(f"{path}: subject name {subject!r} must be letters, digits, '_' or '-'")
        rows = []
        for number, row in _jsonl_rows(path, limit):
            _check_fields(path, number, row, ("problem", "solution"), ("problem",))
            answer = gold_answer(row["solution"])
            if answer is None:
                raise TaskError(f"{path}:{number}: solution has no \\boxed{{...}} final answer")
            rows.append({"problem": row["problem"], "solution": row["solution"], "answer": answer,
                         "level": str(row.get("level", "")), "type": str(row.get("type", ""))})
        _nonempty(rows, path)
        task = f"{PREFIX}_math_{subject}"
        w.task_yaml("math", task, {
            "task": task, "task_alias": subject, **w.dataset({"test": w.data("math", f"test_{subject}", rows)}),
            "output_type": "generate_until", "test_split": "test",
            "doc_to_text": _FunctionRef(f"{_HOOKS}.doc_to_text"),
            "doc_to_target": "{{answer if few_shot is undefined else solution}}",
            "process_results": _FunctionRef(f"{_HOOKS}.process_results"),
            "generation_kwargs": {"until": ["Problem:"], "do_sample": False, "temperature": 0},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "num_fewshot": fewshot,
            "fewshot_config": {"sampler": "first_n", "samples": _FunctionRef(f"{_HOOKS}.list_fewshot_samples")},
            "metadata": {"version": 3.1},
        })
        tasks.append(task)
        items[task] = len(rows)
    group = w.group_yaml("math", tasks, METRICS["math"])
    return SuiteTasks("math", group, tuple(tasks), fewshot, limit, items, METRICS["math"],
                      sources=tuple(str(p) for p in files))


# ------------------------------------------------------------------------------------- HumanEval
def _build_humaneval(w: _Writer, fewshot: int, limit: int | None) -> SuiteTasks:
    path = _require_file(w.root / "humaneval" / "HumanEval.jsonl.gz", "humaneval", "the problems")
    rows, seen = [], set()
    fields = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    for number, row in _jsonl_rows(path, limit):
        _check_fields(path, number, row, fields, ("task_id", "prompt", "test", "entry_point"))
        if row["task_id"] in seen:
            raise TaskError(f"{path}:{number}: task_id {row['task_id']!r} appears twice")
        seen.add(row["task_id"])
        rows.append({name: row[name] for name in fields})
    _nonempty(rows, path, "problems")
    task = f"{PREFIX}_humaneval"
    # The built-in humaneval.yaml's prompt, stop sequences and filter; its metric needs the hub, so
    # the metric is skymoe.evaluation.humaneval's local pass@k (runs only with SKYMOE_RUN_MODEL_CODE=1).
    w.task_yaml("humaneval", task, {
        "task": task, **w.dataset({"test": w.data("humaneval", "test", rows)}),
        "unsafe_code": True, "output_type": "generate_until", "test_split": "test",
        "doc_to_text": "{{prompt}}", "doc_to_target": "{{test}}\ncheck({{entry_point}})",
        "metric_list": [{"metric": _FunctionRef("skymoe.evaluation.humaneval.pass_at_k_metric"), "aggregation": "mean",
                         "higher_is_better": True, "k": [1]}],
        "generation_kwargs": {"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_gen_toks": 1024,
                              "do_sample": False},
        "repeats": 1, "num_fewshot": 0,
        "filter_list": [{"name": "create_test", "filter": [
            {"function": "custom", "filter_fn": _FunctionRef("skymoe.evaluation.humaneval.build_predictions")}]}],
        "metadata": {"version": 1.0},
    })
    return SuiteTasks("humaneval", task, (task,), 0, limit, {task: len(rows)}, METRICS["humaneval"],
                      unsafe_code=True, sources=(str(path),))


# ------------------------------------------------------------------------------ HellaSwag, PIQA
def _fewshot_from_validation(fewshot: int, rows: int, path: Path) -> dict[str, Any]:
    if fewshot and rows < fewshot + 1:
        raise TaskError(f"{path}: {rows} rows, too few for num_fewshot {fewshot} drawn from the same file")
    return {"fewshot_split": "validation" if fewshot else None, "num_fewshot": fewshot}


def _build_hellaswag(w: _Writer, fewshot: int, limit: int | None) -> SuiteTasks:
    path = _require_file(w.root / "hellaswag" / "hellaswag_val.jsonl", "hellaswag", "the validation split")
    rows = []
    for number, row in _jsonl_rows(path, limit):
        _check_fields(path, number, row, ("query",), ("query",))
        choices, gold = row.get("choices"), row.get("gold")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"{path}:{number}: 'choices' should be a list of at least 2 strings")
        if isinstance(gold, str) and gold.strip().isdigit():
            gold = int(gold)
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise TaskError(f"{path}:{number}: 'gold' {row.get('gold')!r} is not an index into the "
                            f"{len(choices)} choices")
        rows.append({"query": row["query"], "choices": choices, "gold": gold})
    _nonempty(rows, path)
    task = f"{PREFIX}_hellaswag"
    w.task_yaml("hellaswag", task, {
        "include": str(w.builtin / "hellaswag" / "hellaswag.yaml"), "task": task, "tag": None,
        **w.dataset({"validation": w.data("hellaswag", "validation", rows)}),
        "training_split": None, "validation_split": "validation", "test_split": None,
        # the file already holds the built-in's processed docs (preprocessed query and endings)
        "process_docs": None, "doc_to_target": "{{gold}}",
        **_fewshot_from_validation(fewshot, len(rows), path)})
    return SuiteTasks("hellaswag", task, (task,), fewshot, limit, {task: len(rows)}, METRICS["hellaswag"],
                      sources=(str(path),))


def _build_piqa(w: _Writer, fewshot: int, limit: int | None) -> SuiteTasks:
    path = _require_file(w.root / "piqa" / "valid.jsonl", "piqa", "the validation questions")
    labels_path = _require_file(w.root / "piqa" / "valid-labels.lst", "piqa", "the validation answers")
    try:
        label_lines = labels_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"{labels_path}: cannot read ({err})") from None
    while label_lines and not label_lines[-1].strip():
        label_lines.pop()
    try:
        with path.open(encoding="utf-8") as f:
            questions = sum(1 for line in f if line.strip())
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"{path}: cannot read ({err})") from None
    if questions != len(label_lines):
        raise TaskError(f"{labels_path}: {len(label_lines)} labels but {path} has {questions} questions "
                        "(the files are aligned line by line)")
    rows = []
    for index, (number, row) in enumerate(_jsonl_rows(path, limit)):
        _check_fields(path, number, row, ("goal", "sol1", "sol2"), ("goal",))
        label = label_lines[index].strip()
        if label not in ("0", "1"):
            raise TaskError(f"{labels_path}:{index + 1}: label {label!r} is not 0 or 1")
        rows.append({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)})
    _nonempty(rows, path)
    task = f"{PREFIX}_piqa"
    w.task_yaml("piqa", task, {
        "include": str(w.builtin / "piqa" / "piqa.yaml"), "task": task, "tag": None,
        **w.dataset({"validation": w.data("piqa", "validation", rows)}),
        "training_split": None, "validation_split": "validation", "test_split": None,
        **_fewshot_from_validation(fewshot, len(rows), path)})
    return SuiteTasks("piqa", task, (task,), fewshot, limit, {task: len(rows)}, METRICS["piqa"],
                      sources=(str(path), str(labels_path)))


_BUILDERS: dict[str, Callable[[_Writer, int, int | None], SuiteTasks]] = {
    "ceval": lambda w, n, limit: _build_choice_suite(_LAYOUTS["ceval"], w, n, limit),
    "cmmlu": lambda w, n, limit: _build_choice_suite(_LAYOUTS["cmmlu"], w, n, limit),
    "mmlu": lambda w, n, limit: _build_choice_suite(_LAYOUTS["mmlu"], w, n, limit),
    "gsm8k": _build_gsm8k,
    "math": _build_math,
    "humaneval": _build_humaneval,
    "hellaswag": _build_hellaswag,
    "piqa": _build_piqa,
}

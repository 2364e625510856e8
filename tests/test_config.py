"""Config ergonomics: ``extends``, ``--set`` overrides, where paths resolve from, one-line errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from skymoe.config import (
    CONFIGS_DIR,
    ConfigError,
    check_paths,
    describe_path,
    load_config,
    merge_overrides,
    parse_set_overrides,
    preset_path,
    run_overrides,
)

REPO = CONFIGS_DIR.parent
TRAIN = REPO / "examples" / "quality" / "train"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------- extends
def test_partial_file_extending_a_preset_keeps_the_rest_of_it(tmp_path):
    tiny = load_config("tiny")
    user = load_config(_write(tmp_path / "user.yaml", "extends: tiny\ntrain:\n  dense:\n    steps: 7\n"))
    assert user.train.dense.steps == 7
    assert user.train.dense.lr == tiny.train.dense.lr == 3.0e-3  # the rest of the phase merges in
    assert user.train.upcycled.steps == 150 and user.train.scratch.steps == 150
    assert user.clean.classifier.enabled
    assert user.clean.classifier.languages["zh"].positive == [str(TRAIN / "zh_positive.jsonl")]
    assert user.clean.classifier.languages["en"].negative == [str(TRAIN / "en_negative.jsonl")]
    assert set(user.evaluate.suites) == {"mmlu", "gsm8k", "math", "hellaswag", "piqa"}
    assert user.evaluate.suites["hellaswag"].limit == 200
    assert user.clean.inputs == [str(REPO / "examples" / "corpus")]
    # Without extends the same partial file falls back to the bare defaults: that is what extends fixes.
    bare = load_config(_write(tmp_path / "bare.yaml", "train:\n  dense:\n    steps: 7\n"))
    assert not bare.clean.classifier.enabled and bare.train.upcycled.steps == 100


def test_a_file_that_only_extends_is_the_preset(tmp_path):
    alias = load_config(_write(tmp_path / "alias.yaml", "extends: tiny\n"))
    assert alias.model_dump() == load_config("tiny").model_dump()


def test_extends_a_relative_path_each_file_resolving_its_own_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path.resolve()
    _write(root / "team" / "base.yaml",
           "extends: tiny\n"
           "clean:\n  inputs: [corpus]\n  language: {keep: [en, zh], min_confidence: 0.5}\n"
           "tokenize:\n  tokenizer: {path: tok/tokenizer.json}\n"
           "train:\n  moe: {num_experts: 4}\n")
    mine = _write(root / "me" / "run.yaml",
                  "extends: ../team/base.yaml\n"
                  "clean:\n  language: {keep: [zh, en]}\n  classifier: {languages: {en: {positive: [good.jsonl]}}}\n"
                  "evaluate:\n  data_dir: bench\n"
                  "train:\n  upcycled: null\n  export: scratch\n")
    config = load_config(mine)
    assert config.clean.inputs == [str(root / "team" / "corpus")]  # the base file's folder
    assert config.tokenize.tokenizer.path == str(root / "team" / "tok" / "tokenizer.json")
    en = config.clean.classifier.languages["en"]
    assert en.positive == [str(root / "me" / "good.jsonl")]  # the extending file's folder
    assert config.evaluate.data_dir == str(root / "me" / "bench")
    assert en.negative == [str(TRAIN / "en_negative.jsonl")]  # tiny's
    assert config.clean.language.keep == ["zh", "en"]  # lists replace (the base's is [en, zh])
    assert config.clean.language.min_confidence == 0.5  # mappings merge
    assert config.train.moe.num_experts == 4 and config.train.moe.top_k == 2
    assert config.train.upcycled is None and config.train.scratch.steps == 150  # null replaces a mapping
    assert config.storage.root == str(root / "skymoe-out")  # tiny's root stays relative to the working directory


@pytest.mark.parametrize("self_loop", [False, True])
def test_an_extends_cycle_names_the_files(tmp_path, self_loop):
    first = tmp_path / "a.yaml"
    if self_loop:
        _write(first, "extends: ./a.yaml\n")
    else:
        _write(first, "extends: sub/b.yaml\n")
        _write(tmp_path / "sub" / "b.yaml", "extends: ../a.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(first)
    message = str(err.value)
    assert "cycle" in message and message.count("a.yaml") >= 2
    assert self_loop or "b.yaml" in message
    assert "\n" not in message


def test_extends_an_unknown_preset_or_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"no preset 'huge'.*tiny"):
        load_config(_write(tmp_path / "p.yaml", "extends: huge\n"))
    with pytest.raises(ConfigError, match=f"resolved relative to .*to {tmp_path.resolve() / 'nope.yaml'}"):
        load_config(_write(tmp_path / "q.yaml", "extends: nope.yaml\n"))
    with pytest.raises(ConfigError, match="field 'extends': expected a preset name"):
        load_config(_write(tmp_path / "r.yaml", "extends: [tiny]\n"))


def test_a_bad_field_in_a_base_file_blames_the_base_file(tmp_path):
    base = _write(tmp_path / "base.yaml", "extends: tiny\nclean:\n  language:\n    min_confidence: 1.5\n")
    user = _write(tmp_path / "user.yaml", "extends: base.yaml\ntrain:\n  dense: {steps: 7}\n")
    with pytest.raises(ConfigError) as err:
        load_config(user)
    assert str(err.value).startswith(f"{base}: field 'clean.language.min_confidence'")


# -------------------------------------------------------------------------------------------- --set
def test_set_items_become_typed_nested_overrides():
    overrides = parse_set_overrides([
        "train.dense.steps=20", "clean.inputs=[a.jsonl, b.jsonl]", "train.upcycled=null",
        "clean.heuristics.enabled=false", "train.dense.lr=1.0e-3", "tokenize.mixture.weights={en: 0.5}",
        "name=run=2", "train.dense.warmup_steps=5",
    ])
    assert overrides == {
        "train": {"dense": {"steps": 20, "lr": 1.0e-3, "warmup_steps": 5}, "upcycled": None},
        "clean": {"inputs": ["a.jsonl", "b.jsonl"], "heuristics": {"enabled": False}},
        "tokenize": {"mixture": {"weights": {"en": 0.5}}},
        "name": "run=2",
    }
    assert type(overrides["train"]["dense"]["steps"]) is int


def test_set_overrides_apply_over_the_file_with_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = merge_overrides(
        run_overrides(root="out", executor="beam"),
        parse_set_overrides(["train.dense.steps=20", "clean.inputs=[a.jsonl, b.jsonl]", "train.upcycled=null",
                             "train.export=scratch"]),
    )
    config = load_config("tiny", overrides)
    here = tmp_path.resolve()
    assert config.train.dense.steps == 20 and config.train.dense.warmup_steps == 20
    assert config.train.upcycled is None and config.train.export == "scratch"
    assert config.clean.inputs == [str(here / "a.jsonl"), str(here / "b.jsonl")]
    assert config.clean.executor.kind == "beam" and config.clean.executor.workers == 2
    assert config.storage.root == str(here / "out")


@pytest.mark.parametrize("item", ["train.dense.steps", "=3", " =3", "train..steps=3", ".steps=3", "train.dense.=3",
                                  "name=[unclosed"])
def test_a_malformed_set_item_is_named(item):
    with pytest.raises(ConfigError) as err:
        parse_set_overrides(["train.dense.steps=3", item])
    assert str(err.value).startswith(f"--set {item}: ") and "\n" not in str(err.value)


def test_an_unknown_set_field_blames_the_set_item_not_the_file(tmp_path):
    for overrides in (parse_set_overrides(["train.dense.stepz=3"]),
                      merge_overrides(run_overrides(root=str(tmp_path)), parse_set_overrides(["train.dense.stepz=3"]))):
        with pytest.raises(ConfigError) as err:
            load_config("tiny", overrides)
        assert str(err.value) == "--set train.dense.stepz=3: field 'train.dense.stepz': Extra inputs are not permitted"
    with pytest.raises(ConfigError) as err:
        load_config("tiny", parse_set_overrides(["clean.executor={kind: spark}"]))
    assert str(err.value).startswith("--set clean.executor={kind: spark}: field 'clean.executor.kind'")


def test_file_and_set_problems_each_name_their_source(tmp_path):
    user = _write(tmp_path / "user.yaml", "extends: tiny\nclean:\n  unknown_knob: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(user, parse_set_overrides(["train.moe.top_k=0"]))
    message = str(err.value)
    assert f"{user}: field 'clean.unknown_knob': Extra inputs are not permitted" in message
    assert "--set train.moe.top_k=0: field 'train.moe.top_k': Input should be greater than or equal to 1" in message
    assert str(preset_path("tiny")) not in message


# ------------------------------------------------------------------------------------------- paths
def test_describe_path_says_where_a_relative_path_resolved_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user = _write(tmp_path / "cfg" / "user.yaml",
                  "extends: tiny\nclean:\n  inputs: [data/raw, /srv/corpus]\n  heuristics:\n"
                  "    blocklist: {files: {en: lists/en.txt}}\n")
    config = load_config(user)
    tiny_file = CONFIGS_DIR / "tiny.yaml"
    assert describe_path(config, "clean.inputs") == f'"data/raw", "/srv/corpus" (relative to {user.resolve()})'
    assert describe_path(config, "clean.classifier.languages.zh.positive") == (
        f'"../examples/quality/train/zh_positive.jsonl" (relative to {tiny_file})')
    assert describe_path(config, "evaluate.data_dir") == f'"../examples/bench" (relative to {tiny_file})'
    assert describe_path(config, "storage.root") == (
        f'"./skymoe-out" (from {tiny_file}, relative to the working directory {Path.cwd()})')
    assert describe_path(config, "tokenize.tokenizer.path") == f"null (from {tiny_file})"
    assert describe_path(config, "train.dense_source") == "null (from defaults)"
    assert describe_path(config, "clean.heuristics.blocklist.files") == (
        f'en: "lists/en.txt" (relative to {user.resolve()})')

    overridden = load_config(user, parse_set_overrides(["clean.inputs=[new]"]))
    assert describe_path(overridden, "clean.inputs") == (
        f'"new" (from --set clean.inputs=[new], relative to the working directory {Path.cwd()})')
    assert overridden.clean.inputs == [str(tmp_path.resolve() / "new")]
    with pytest.raises(ValueError, match="not a path field"):
        describe_path(config, "train.dense.steps")


def test_describe_path_of_the_default_preset_and_of_a_config_built_in_code():
    config = load_config()
    default_blocklist = describe_path(config, "clean.heuristics.blocklist.files")
    assert default_blocklist == (f'en: "{CONFIGS_DIR / "blocklists" / "en.txt"}" (from defaults), '
                                 f'zh: "{CONFIGS_DIR / "blocklists" / "zh.txt"}" (from defaults)')
    built = type(config).model_validate(config.model_dump())
    assert describe_path(built, "clean.inputs") == f'"{REPO / "examples" / "corpus"}"'


# ------------------------------------------------------------------- every config error before work
@pytest.mark.parametrize("yaml_text, field", [
    ("train:\n  moe: {capacity_factor: .inf}\n", "train.moe.capacity_factor"),
    ("train:\n  dense: {lr: .nan}\n", "train.dense.lr"),
    ("tokenize:\n  mixture: {weights: {en: .inf}}\n", "tokenize.mixture.weights.en"),
    ("clean:\n  heuristics: {chinese: {top_char_ngram: {4: -.inf}}}\n", "clean.heuristics.chinese.top_char_ngram.4"),
])
def test_an_infinite_or_nan_number_is_refused_naming_the_field(tmp_path, yaml_text, field):
    user = _write(tmp_path / "user.yaml", "extends: tiny\n" + yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(user)
    assert str(err.value) == f"{user}: field '{field}': Input should be a finite number"


def test_a_duplicate_yaml_key_is_refused_naming_the_key_and_its_lines(tmp_path):
    top = _write(tmp_path / "top.yaml", "extends: tiny\ntrain:\n  dense: {steps: 7}\nname: x\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(top)
    assert str(err.value) == f"{top}: not valid YAML: duplicate key 'train' on line 5 (first on line 2)"
    nested = _write(tmp_path / "nested.yaml", "clean:\n  language:\n    min_confidence: 0.5\n    keep: [en]\n"
                                              "    min_confidence: 0.9\n")
    user = _write(tmp_path / "user.yaml", "extends: nested.yaml\n")
    with pytest.raises(ConfigError, match=rf"^{nested}: not valid YAML: duplicate key 'min_confidence' on line 5 "
                                          r"\(first on line 3\)$"):
        load_config(user)  # found in the base file, which is named
    with pytest.raises(ConfigError, match=r"^--set tokenize.mixture.weights=\{en: 1, en: 2\}: .*duplicate key 'en'"):
        parse_set_overrides(["tokenize.mixture.weights={en: 1, en: 2}"])
    # YAML's merge key is not a duplicate: a mapping may override what it merges in.
    anchors = _write(tmp_path / "anchors.yaml", "extends: tiny\ntrain:\n  dense: &phase {steps: 9, lr: 1.0e-3}\n"
                                                "  upcycled: {<<: *phase, steps: 4}\n")
    assert load_config(anchors).train.upcycled.steps == 4 and load_config(anchors).train.upcycled.lr == 1.0e-3


@pytest.mark.parametrize("overrides, message", [
    ({"storage": {"root": "gs://bucket/runs"}},
     "overrides: field 'storage.root': Value error, scheme gs:// needs a package that is not installed: "
     "Please install gcsfs to access Google Storage"),
    ({"clean": {"inputs": ["s3://bucket/raw", "az://container/raw"]}},
     "overrides: field 'clean.inputs.1': Value error, scheme az:// needs a package that is not installed: "
     "Install adlfs to access Azure Datalake Gen2 and Azure Blob Storage"),
    ({"tokenize": {"tokenizer": {"path": "s4://bucket/tok"}}},
     "overrides: field 'tokenize.tokenizer.path': Value error, unknown URI scheme s4:// (not an fsspec protocol)"),
    ({"train": {"dense_source": "simplecache::nope://x"}},
     "overrides: field 'train.dense_source': Value error, unknown URI scheme nope:// (not an fsspec protocol)"),
])
def test_a_uri_scheme_that_cannot_be_opened_is_refused_naming_the_package(overrides, message):
    for missing in ("gcsfs", "adlfs"):
        if importlib.util.find_spec(missing):
            pytest.skip(f"{missing} is installed here")
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert str(err.value) == message


def test_an_installed_scheme_is_accepted():
    config = load_config("tiny", {"storage": {"root": "s3://bucket/runs"}, "clean": {"inputs": ["memory://raw"]}})
    assert config.storage.root == "s3://bucket/runs" and config.clean.inputs == ["memory://raw"]


def test_an_empty_root_or_input_is_refused_not_replaced_by_a_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for root in ("", "  "):
        with pytest.raises(ConfigError, match=r"^--root \(storage.root\): empty"):
            run_overrides(root=root)
    with pytest.raises(ConfigError, match=r"^--input \(clean.inputs\): empty input ''"):
        run_overrides(inputs=["a.jsonl", ""])
    assert run_overrides(root=None, inputs=None) == {}  # not given: the config's values
    # In a file an empty path would resolve to the file's folder (or the working directory): refused instead.
    for text, field in (("storage:\n  root: ''\n", "storage.root"), ("clean:\n  inputs: ['']\n", "clean.inputs.0"),
                        ("evaluate:\n  data_dir: ' '\n", "evaluate.data_dir")):
        user = _write(tmp_path / "user.yaml", "extends: tiny\n" + text)
        with pytest.raises(ConfigError, match=rf"^{user}: field '{field}': Value error, empty"):
            load_config(user)


# ------------------------------------------------------------------------------------- check_paths
def test_check_paths_names_each_missing_file_with_its_field_and_what_was_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    (here / "raw").mkdir()
    (here / "raw" / "a.jsonl").write_text('{"text": "x"}\n')
    (here / "bench").mkdir()
    (here / "llama").mkdir()
    (here / "llama" / "config.json").write_text("{}")
    user = _write(here / "cfg" / "user.yaml",
                  "extends: tiny\nclean:\n  inputs: [../raw, ../absent, '../raw/*.parquet']\n"
                  "  classifier: {languages: {en: {positive: [../good.jsonl]}}}\n"
                  "  heuristics: {blocklist: {files: {en: ../spam.txt}}}\n"
                  "tokenize:\n  tokenizer: {path: ../tok}\n"
                  "train:\n  dense_source: ../llama\n"
                  "evaluate:\n  data_dir: ../bench/full\n")
    config = load_config(user)
    assert load_config(user) == config  # loading never looks at the files: show needs only the root
    with pytest.raises(ConfigError) as err:
        check_paths(config)
    assert str(err.value).split("; written as ") == [
        f"clean.inputs: no such file or folder: {here}/absent",
        f'"../absent" (relative to {user}); clean.inputs: no file matches {here}/raw/*.parquet',
        f'"../raw/*.parquet" (relative to {user}); clean.classifier.languages.en.positive: no such file: '
        f"{here}/good.jsonl",
        f'"../good.jsonl" (relative to {user}); clean.heuristics.blocklist.files.en: no such file: {here}/spam.txt',
        f'"../spam.txt" (relative to {user}); tokenize.tokenizer.path: no such file: {here}/tok/tokenizer.json',
        f'"../tok" (relative to {user}); train.dense_source: no *.safetensors weights in {here}/llama',
        f'"../llama" (relative to {user}); evaluate.data_dir: no such folder: {here}/bench/full',
        f'"../bench/full" (relative to {user})',
    ]
    # Only what the wanted stages read.
    with pytest.raises(ConfigError) as err:
        check_paths(config, ("tokenize", "train"))
    assert str(err.value).startswith("tokenize.tokenizer.path: ") and "train.dense_source" in str(err.value)
    assert "clean." not in str(err.value) and "evaluate." not in str(err.value)


def test_check_paths_passes_when_every_file_is_there(tmp_path):
    check_paths(load_config("tiny"))  # the bundled preset's inputs, example files, blocklists and benchmarks
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "llama").mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors"):
        (tmp_path / "llama" / name).write_text("{}")
    config = load_config("tiny", {"tokenize": {"tokenizer": {"path": str(tmp_path / "tok")}},
                                  "train": {"dense_source": str(tmp_path / "llama"), "dense": {"steps": 0}}})
    check_paths(config)
    check_paths(load_config("tiny", {"tokenize": {"tokenizer": {"path": str(tmp_path / "tok" / "tokenizer.json")}}}))


def test_check_paths_skips_the_files_of_steps_turned_off(tmp_path):
    off = load_config("tiny", parse_set_overrides([
        "clean.classifier.enabled=false", f"clean.classifier.languages.en.positive=[{tmp_path}/nope.jsonl]",
        "clean.heuristics.blocklist.enabled=false", f"clean.heuristics.blocklist.files={{en: {tmp_path}/nope.txt}}"]))
    check_paths(off)
    on = load_config("tiny", parse_set_overrides([f"clean.heuristics.blocklist.files={{en: {tmp_path}/nope.txt}}"]))
    with pytest.raises(ConfigError, match=r"^clean.heuristics.blocklist.files.en: no such file: .*nope.txt; written"):
        check_paths(on)


def test_check_paths_on_s3_names_the_missing_object(tmp_path, bucket):
    client, name = bucket
    client.put_object(Bucket=name, Key="checks/raw/a.jsonl", Body=b'{"text": "x"}\n')
    config = load_config("tiny", {"clean": {"inputs": [f"s3://{name}/checks/raw", f"s3://{name}/checks/gone"]},
                                  "tokenize": {"tokenizer": {"path": f"s3://{name}/checks/tok.json"}}})
    with pytest.raises(ConfigError) as err:
        check_paths(config, ("clean", "tokenize"))
    assert str(err.value) == (
        f"clean.inputs: no such file or folder: s3://{name}/checks/gone; written as \"s3://{name}/checks/gone\" "
        f"(from overrides); tokenize.tokenizer.path: no such file: s3://{name}/checks/tok.json; written as "
        f"\"s3://{name}/checks/tok.json\" (from overrides)")


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("case", ["duplicate key", "infinite number", "gs root", "empty root", "dense without weights"])
def test_skymoe_run_refuses_a_bad_config_before_any_work(tmp_path, case):
    """As a user meets it: `skymoe run` exits non-zero with one line naming the field, and writes nothing."""
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text("{}")  # a checkpoint folder without its weights
    body, flags, expected = {
        "duplicate key": ("train:\n  seed: 1\ntrain:\n  seed: 2\n", [],
                          "run.yaml: not valid YAML: duplicate key 'train' on line 5 (first on line 3)"),
        "infinite number": ("train:\n  moe: {capacity_factor: .inf}\n", [], "field 'train.moe.capacity_factor'"),
        "gs root": ("", ["--root", "gs://bucket/runs"], "field 'storage.root': Value error, scheme gs:// needs a "
                                                         "package that is not installed: Please install gcsfs"),
        "empty root": ("", ["--root", ""], "--root (storage.root): empty"),
        "dense without weights": ("train:\n  dense_source: llama\n", [],
                                  f"train.dense_source: no *.safetensors weights in {tmp_path.resolve() / 'llama'}"),
    }[case]
    config = _write(tmp_path / "run.yaml", "extends: tiny\nstorage: {root: ./out}\n" + body)
    before = sorted(tmp_path.rglob("*"))
    done = subprocess.run([sys.executable, "-m", "skymoe.flows.cli", "run", "--config", str(config), *flags],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("skymoe: error: ") and expected in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1  # one line, no traceback
    assert sorted(tmp_path.rglob("*")) == before  # no root, no stage output: not even the default ./skymoe-out

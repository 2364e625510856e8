"""Config ergonomics: ``extends``, ``--set`` overrides, where paths resolve from, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from skymoe.config import (
    CONFIGS_DIR,
    ConfigError,
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

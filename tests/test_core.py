"""Configuration, fingerprints and the CLI's start-up cost."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import write_config
from skymoe.pipelines.clean.readers import InputError
from skymoe.pipelines.clean.stage import STAGE as CLEAN
from skymoe.config import ConfigError, load_config
from skymoe.storage import Storage


def test_tiny_preset_is_the_default_and_valid():
    config = load_config()
    assert config.name == "tiny"
    assert config.clean.classifier.enabled
    assert all(p.startswith("/") for p in config.clean.inputs), "relative paths resolve against the config file"


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("clean:\n  language:\n    min_confidence: 1.5\n", "clean.language.min_confidence"),
        ("clean:\n  executor:\n    kind: spark\n", "clean.executor.kind"),
        ("clean:\n  dedup:\n    minhash:\n      num_bands: 0\n", "clean.dedup.minhash.num_bands"),
        ("clean:\n  unknown_knob: 3\n", "clean.unknown_knob"),
        ("clean:\n  classifier:\n    enabled: true\n", "clean.classifier"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, yaml_text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_missing_config_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("clean: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def _clean_plan(config, storage):
    (plan,) = CLEAN.plan(config, storage, {})
    return plan


def test_fingerprint_stable_and_sensitive(tmp_path, small_corpus):
    storage = Storage()
    config_path = write_config(tmp_path / "c.yaml", str(tmp_path / "out"), [str(small_corpus)])
    config = load_config(config_path)
    plan = _clean_plan(config, storage)
    ref = plan.ref
    assert ref.root == config.storage.root and ref.stage == "clean"
    assert _clean_plan(load_config(config_path), storage).ref == ref
    assert len(plan.work.shards) == 7

    changed = load_config(config_path, {"clean": {"language": {"min_confidence": 0.9}}})
    assert _clean_plan(changed, storage).ref.fingerprint != ref.fingerprint

    executor_only = load_config(config_path, {"clean": {"executor": {"kind": "beam"}}})
    assert _clean_plan(executor_only, storage).ref.fingerprint == ref.fingerprint

    copy = tmp_path / "corpus-copy"
    subprocess.run(["cp", "-r", str(small_corpus), str(copy)], check=True)
    moved = load_config(config_path, {"clean": {"inputs": [str(copy)]}})
    base_fp = _clean_plan(moved, storage).ref.fingerprint
    with open(copy / "c4" / "part0.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"text": "one more line of input"}\n')
    assert _clean_plan(moved, storage).ref.fingerprint != base_fp


def test_missing_input_fails_before_work(tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", str(tmp_path / "out"), [str(tmp_path / "absent")]))
    with pytest.raises(InputError, match="absent"):
        CLEAN.check(config, Storage())
    with pytest.raises(InputError, match="absent"):
        CLEAN.plan(config, Storage(), {})
    assert not (tmp_path / "out").exists()


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from skymoe.flows.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('prefect', 'datatrove', 'apache_beam', 'torch', 'pyarrow', 'pydantic') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "run the pipeline flow" in out
    assert "HEAVY []" in out

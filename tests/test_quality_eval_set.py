"""The hand-labelled quality evaluation set stays valid: fields, labels, unique ids, references that
resolve in ../shared/data (when present), no overlap with the classifier seeds (its own checker)."""

from __future__ import annotations

import sys

from conftest import REPO

EVAL = REPO / "examples" / "quality" / "eval"


def test_the_labelled_evaluation_set_passes_its_checker(capsys):
    sys.path.insert(0, str(EVAL))
    try:
        from check_eval_set import DEFAULT_SHARED, check
    finally:
        sys.path.remove(str(EVAL))
    assert check(DEFAULT_SHARED) == 0, capsys.readouterr().out[-3000:]

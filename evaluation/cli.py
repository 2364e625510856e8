"""lm-eval's own command line with skymoe's model class available: ``python -m
skymoe.evaluation.cli <lm_eval arguments>`` is ``lm_eval <lm_eval arguments>`` plus ``--model
skymoe`` (:class:`skymoe.evaluation.lm.SkyMoeLM`).

lm-eval finds a model class only in its registry, which its console script fills with its own
classes alone; this module adds ``skymoe`` and hands every argument, unchanged, to lm-eval's
``cli_evaluate``. The class is registered by name ("module:class", a lazy lm-eval placeholder), so
torch and the model code load only when ``--model skymoe`` is used and ``--help`` stays quick.

Nothing is downloaded unless asked: ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` and
``TRANSFORMERS_OFFLINE`` default to 1 (the exported model and the tasks of ``skymoe tasks
export`` are local); set one to 0 in the environment to let lm-eval fetch a hub model or dataset.
"""

from __future__ import annotations

import os
import sys

from skymoe.evaluation.tasks import OFFLINE_ENV

MODEL_NAME = "skymoe"
MODEL_TARGET = "skymoe.evaluation.lm:SkyMoeLM"  # lm-eval swaps the placeholder for the class on import
OFFLINE_DEFAULTS = {**OFFLINE_ENV, "TRANSFORMERS_OFFLINE": "1"}


def register_skymoe() -> None:
    """Put ``skymoe`` in lm-eval's model registry (a no-op where the class is already imported).
    lm-eval's own lazy entries go in first: it fills the registry only when it finds it empty."""
    import lm_eval.models  # noqa: F401  (registers lm-eval's classes)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's ``cli_evaluate`` on ``argv`` (default: this process's arguments), which it reads
    from ``sys.argv``; exits as lm-eval does."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    register_skymoe()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()

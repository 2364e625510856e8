"""The offline Prefect settings hold whichever flow module is imported first.

Prefect reads its settings once, when it is imported, so a module that imports Prefect before the
settings are applied gets Prefect's defaults: `skymoe ablate` once did, and its ephemeral API server
gave up after Prefect's 20 s on a cold database. Each import runs in a fresh interpreter, with no
Prefect variable set by the caller (the test fixtures set their own, which would hide this).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from skymoe.flows.prefect_env import OFFLINE_DEFAULTS

FLOW_MODULES = ("ablate", "cli", "incremental", "pipeline", "serve")

_READ_SETTINGS = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
from prefect.settings import get_current_settings
settings = get_current_settings()
print(json.dumps({"timeout": settings.server.ephemeral.startup_timeout_seconds,
                  "analytics": settings.server.analytics_enabled}))
"""


@pytest.mark.parametrize("module", FLOW_MODULES)
def test_offline_settings_precede_prefect_in_every_flow_module(module, tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in OFFLINE_DEFAULTS}
    env["PREFECT_HOME"] = str(tmp_path)  # no user profile can supply the values instead
    result = subprocess.run([sys.executable, "-c", _READ_SETTINGS, f"skymoe.flows.{module}"], env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    settings = json.loads(result.stdout.strip().splitlines()[-1])
    assert settings == {"timeout": int(OFFLINE_DEFAULTS["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]),
                        "analytics": False}

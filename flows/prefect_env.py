"""Prefect settings for offline use. Imported by ``flows.pipeline`` before Prefect itself, so they
hold for the CLI, for tests and for deployment runs started by a worker alike."""

from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # telemetry would try the network and log errors
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the 20 s default fails on a cold SQLite DB
    "PREFECT_LOGGING_EXTRA_LOGGERS": "skymoe",  # stage logs (progress, rates, ETA) reach the run's logs
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
}


def configure_prefect() -> None:
    """Set offline defaults without overriding what the user configured."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


configure_prefect()

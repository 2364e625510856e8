"""Prefect settings for offline use. The ``skymoe.flows`` package imports this module before any of its
modules imports Prefect, so the settings hold for the CLI, for tests and for deployment runs started by a
worker alike."""

from __future__ import annotations

import logging
import os

OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # telemetry would try the network and log errors
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the 20 s default fails on a cold SQLite DB
    "PREFECT_LOGGING_EXTRA_LOGGERS": "skymoe",  # stage logs (progress, rates, ETA) reach the run's logs
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    # skymoe logs outside flow runs too (a command's checks, crashing a killed command's runs): no warning each time
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def configure_prefect() -> None:
    """Set offline defaults without overriding what the user configured."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def forward_stage_logs() -> None:
    """Send the ``skymoe`` logger's records (progress with rate and ETA) to the Prefect run.

    ``PREFECT_LOGGING_EXTRA_LOGGERS`` does this when set before Prefect configures logging (the
    CLI); a deployment run started by a worker imports Prefect first, so attach the handler here.
    """
    from prefect.logging.handlers import APILogHandler

    stage_logger = logging.getLogger("skymoe")
    stage_logger.setLevel(logging.INFO)
    if not any(isinstance(handler, APILogHandler) for handler in stage_logger.handlers):
        stage_logger.addHandler(APILogHandler())


configure_prefect()

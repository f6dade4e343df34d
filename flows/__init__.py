"""Prefect flows that read as the pipeline, and the `modelferry` CLI.

Importing them changes nothing in the process. The entry points (the CLI, `make demo`, `make ui`)
call `process_defaults()` before Prefect is imported, and a Prefect deployment's runs get the same
variables as job variables (`deploy.py`; prefect.yaml, held to them by a test).
"""

import os

# Our modules log under "modelferry", which Prefect forwards to the run's logs in the UI only when
# this is set before Prefect configures its logging; the rest keep Prefect and the Hub from phoning
# home, and our loggers quiet when no flow runs.
PROCESS_DEFAULTS = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": "modelferry",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def process_defaults() -> None:
    """Set PROCESS_DEFAULTS where the environment doesn't say otherwise."""
    for name, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(name, value)

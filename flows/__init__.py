"""Prefect flows that read as the pipeline, and the `modelferry` CLI."""
import os

# Our modules log under "modelferry"; Prefect forwards those records to the run's logs in the UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "modelferry")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

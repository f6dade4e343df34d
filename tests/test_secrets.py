"""Secrets never land in what we produce. The suite hands distinctive keys, secret, HF token and API
key (tests/helpers.py) to what it runs, and everything the whole suite wrote, the real vLLM session's nodes,
results, job logs and Prefect database included, is scanned for them when the session ends, whatever
the test order (`no_secret_in_what_the_session_wrote` in conftest.py). What the session's launches
printed is checked in test_real_vllm.py. The test here shows that the scan finds a secret where
there is one."""

from __future__ import annotations

import os
import sqlite3

from tests.helpers import secret_findings


def test_the_scan_finds_a_planted_secret_and_names_it_without_its_value(tmp_path):
    planted = {"PLANTED_KEY": "mf-planted-" + os.urandom(4).hex()}  # in no other secret list: the session scan ignores it
    (tmp_path / "clean.log").write_text("nothing here\n")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    with sqlite3.connect(deep / "store.db") as db:  # as Prefect keeps logs and parameters
        db.execute("create table logs (message text)")
        db.execute("insert into logs values (?)", (f"connecting with {planted['PLANTED_KEY']}",))
    (tmp_path / "link.db").symlink_to(deep / "store.db")  # followed links would report it twice
    assert secret_findings([tmp_path], planted) == [f"{deep / 'store.db'} holds PLANTED_KEY"]
    assert secret_findings([tmp_path / "missing"], planted) == []

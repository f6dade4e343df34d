"""Hub failures olah can't produce (it answers 401 for anything missing and has no gating), replayed
with the real Hub's status codes and X-Error-Code headers that huggingface_hub parses."""

import pytest

from tests.helpers import HF_TOKEN, TINY
from tests.replay import replay


@pytest.mark.parametrize("status,code,message", [
    (401, "GatedRepo", "is gated"),
    (401, "RepoNotFound", "not found"),
    (404, "RevisionNotFound", "revision 'v9' does not exist"),
])
def test_hub_errors_name_the_fix(cli, s3, status, code, message):
    headers = {"X-Error-Code": code, "X-Error-Message": f"replayed {code}", "Content-Type": "application/json"}
    with replay(status, b'{"error": "replayed"}', headers) as url:
        run = cli("stage", "acme/gated", "--revision", "v9", "--json", extra_env={"HF_ENDPOINT": url})
    assert run.rc == 1, run
    assert message in run.err and "Traceback" not in run.err, run
    rows = run.json()
    assert rows == [rows[0]] and rows[0]["step"] == "resolve" and rows[0]["status"] == "failed"
    assert rows[0]["attempts"] == 1  # not worth retrying
    assert s3.listing("models/acme/gated/") == {}


def test_gated_error_with_token_says_access_not_granted(cli):
    with replay(403, b"{}", {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"}) as url:
        run = cli("stage", "acme/gated", extra_env={"HF_ENDPOINT": url, "HF_TOKEN": HF_TOKEN})
    assert run.rc == 1 and "has not been granted access" in run.err, run
    assert HF_TOKEN not in run.err + run.out


def test_hub_outage_is_retried_with_backoff_then_fails_clearly(cli):
    with replay(503, b"upstream down") as url:
        run = cli("stage", "acme/model", "--json", extra_env={"HF_ENDPOINT": url})
    assert run.rc == 1, run
    row = run.json()[-1]
    assert row["step"] == "resolve" and row["status"] == "failed" and row["attempts"] == 4
    assert "503" in run.err


def test_missing_revision_on_the_mirror(cli):
    run = cli("stage", TINY, "--revision", "no-such-branch")
    assert run.rc == 1 and "revision 'no-such-branch' does not exist" in run.err, run


def test_json_mode_keeps_stdout_pure_and_usage_errors_exit_2(cli):
    run = cli("stage", "acme/nothing-here", "--json")
    assert run.rc == 1
    import json

    json.loads(run.out)  # only JSON on stdout, even on failure
    assert cli("stage").rc == 2
    assert cli("stage", TINY, "--bogus-flag").rc == 2

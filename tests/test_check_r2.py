"""`modelferry check-r2` against the real local bucket: success and each failure's own message."""

import time

import pytest

from tests.replay import replay

R2_ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                    b'<Message>Access Denied</Message></Error>')


def test_check_r2_round_trip(cli, bucket):
    run = cli("check-r2", "--json")
    assert run.rc == 0, run
    result = run.json()
    assert result["endpoint"] == bucket.endpoint and result["bucket"] == bucket.bucket
    assert all(result[k] > 0 for k in ("put_ms", "head_ms", "get_ms", "delete_ms"))
    probes = bucket.root / bucket.bucket / ".modelferry"
    assert not probes.exists() or not any(probes.iterdir()), "probe object left behind"


@pytest.mark.parametrize("change,message", [
    ({"R2_ACCESS_KEY": "not-a-known-key"}, "does not know R2_ACCESS_KEY"),
    ({"R2_SECRET_KEY": "not-the-secret"}, "R2_SECRET_KEY does not belong"),
    ({"R2_BUCKET": "no-such-bucket"}, "bucket 'no-such-bucket' (R2_BUCKET) does not exist"),
    ({"R2_ENDPOINT": "http://127.0.0.1:9"}, "cannot connect to http://127.0.0.1:9"),
    ({"R2_ENDPOINT": "127.0.0.1:9000"}, "R2_ENDPOINT='127.0.0.1:9000' is not a URL"),
    ({"R2_SECRET_KEY": ""}, "R2_SECRET_KEY is not set"),
])
def test_check_r2_failures_are_distinct_and_prompt(cli, change, message):
    started = time.monotonic()
    run = cli("check-r2", extra_env=change)
    assert run.rc != 0, run
    assert message in run.err, run
    assert "Traceback" not in run.err
    assert time.monotonic() - started < 20


def test_check_r2_access_denied(cli):
    with replay(403, R2_ACCESS_DENIED, {"Content-Type": "application/xml"}) as url:
        run = cli("check-r2", extra_env={"R2_ENDPOINT": url})
    assert run.rc == 1, run
    assert "access denied to bucket" in run.err and "Object Read & Write" in run.err

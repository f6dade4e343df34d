"""`make ui`: the Prefect UI with modelferry's deployments, on the local stand-ins, to click through.

Starts the offline Hub (olah) and bucket (rclone) as the demo does, a Prefect server on
127.0.0.1:4200, the `local` process work pool with both deployments from prefect.yaml, and a
worker; prints what to open and run; stops everything on Ctrl-C.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from modelferry.flows import process_defaults
from modelferry.flows.demo import REPO
from modelferry.tasks.clients import processes
from modelferry.tasks.offline import embedded, tiny_llama
from modelferry.tasks.settings import read

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    process_defaults()
    root = ROOT / ".ui"
    mirror = root / "hub-mirror"
    if not (mirror / "models" / REPO).exists():
        embedded.commit_files(mirror, REPO, tiny_llama.files(), "tiny Llama, seeded")
    port = read("MODELFERRY_UI_PORT")
    with embedded.olah_mirror(mirror, root / "olah") as hub, \
            embedded.rclone_bucket(root / "bucket", "modelferry-ui", "ui-access-key", "ui-secret-key") as bucket, \
            embedded.prefect_server(root / "prefect", port) as api:
        env = dict(embedded.prefect_env(root / "prefect"), **bucket.env(), HF_ENDPOINT=hub, PREFECT_API_URL=api,
                   MODELFERRY_CACHE=str(root / "cache"), PROJECT_ROOT=str(ROOT), PREFECT_WORKER_QUERY_SECONDS="2")
        prefect = str(processes.BIN / "prefect")
        for args in (["work-pool", "create", "local", "--type", "process", "--overwrite"],
                     ["--no-prompt", "deploy", "--all"]):
            subprocess.run([prefect, *args], env=env, cwd=ROOT, check=True, capture_output=True)
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "local"], env=env, cwd=ROOT,
                                  stdout=open(root / "worker.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        ui = api.removesuffix("/api")
        print(f"""
Prefect UI:  {ui}   (deployments stage-and-launch/default and model-refresh/nightly, worker on pool `local`)
bucket:      {bucket.endpoint} (rclone serve s3, objects in {bucket.root / bucket.bucket})
offline Hub: {hub} ({REPO})

Run one from another shell:
  PREFECT_API_URL={api} .venv/bin/prefect deployment run stage-and-launch/default --watch
or press "Run" on the deployment in the UI. Ctrl-C here stops everything.""", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            processes.stop(worker, grace=10)
    return 0


def _interrupt(*_):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    raise SystemExit(main())

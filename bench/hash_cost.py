"""What the local_verify read costs next to the upload it guards, on the same file.

Baseline: `s5cmd cp` of a 1 GiB file to a loopback rclone bucket. Measured: `hash_file` (sha256,
git sha1, whole MD5 and part MD5s in one read) of the same file, page cache warm. Median of 3."""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modelferry.tasks.clients import processes
from modelferry.tasks.offline import embedded  # noqa: E402
from modelferry.tasks.records.integrity import MiB, hash_file  # noqa: E402

work = Path(tempfile.mkdtemp(prefix="mf-hash-cost-"))
src = work / "shard.bin"
with open(src, "wb") as f:
    for _ in range(1024):
        f.write(os.urandom(MiB))
with embedded.rclone_bucket(work / "data", "bench", "benchkey01", "benchsecret01") as b:
    env = dict(os.environ, AWS_ACCESS_KEY_ID=b.access_key, AWS_SECRET_ACCESS_KEY=b.secret_key, AWS_REGION="auto")
    up, hashed = [], []
    for i in range(3):
        t = time.perf_counter()
        subprocess.run([processes.which("s5cmd"), "--endpoint-url", b.endpoint, "cp", "-p", "50", str(src),
                        f"s3://bench/run{i}/shard.bin"], env=env, check=True, capture_output=True)
        up.append(time.perf_counter() - t)
        t = time.perf_counter()
        hash_file(src, 50 * MiB, git=False)
        hashed.append(time.perf_counter() - t)
shutil.rmtree(work, ignore_errors=True)
up_s, hash_s = statistics.median(up), statistics.median(hashed)
print(f"1 GiB: s5cmd cp {up_s:.2f} s ({1024 * MiB / up_s / 1e6:.0f} MB/s); hash_file {hash_s:.2f} s "
      f"({1024 * MiB / hash_s / 1e6:.0f} MB/s); hash/upload = {hash_s / up_s:.2f}")

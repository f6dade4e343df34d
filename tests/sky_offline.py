"""An offline SkyPilot that gets past its optimizer and fails for real inside provisioning.

SkyPilot downloads its catalogs at launch and only launches on clouds `sky check` enabled. Here we
plant the smallest catalog (one AWS L4 spot instance type), fake AWS credentials, and the
enabled-cloud rows, under a throwaway HOME with its own API server port. A launch then reaches
`RetryingVmProvisioner`, whose AWS identity lookup fails (no network): ResourcesUnavailableError.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from modelferry.tasks.clients.processes import free_port

CATALOG = {
    "common/accelerators.csv": "AcceleratorName,Clouds\nL4,AWS\n",
    "common/metadata.csv": "GPU,MemoryGB,Manufacturer\nL4,24,NVIDIA\n",
    "aws/vms.csv": "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,"
                   "AvailabilityZone,Arch\ng6.xlarge,L4,1,4,16,,0.8048,0.3,us-east-1,us-east-1a,x86_64\n",
    "aws/images.csv": "Tag,Region,OS,OSVersion,ImageId,CreationDate\n",
    "aws/instance_quota_mapping.csv": "InstanceType,OnDemandInstanceCode,SpotInstanceCode\n",
}

ENABLE_AWS = """
from sky import global_user_state as g
from sky.clouds.cloud import CloudCapability as C
for cap in (C.COMPUTE, C.STORAGE):
    g.set_enabled_clouds(['AWS'], cap, 'default')
g.set_allowed_clouds(['AWS'], 'default')
"""

START = """
import sky
sky.api_start()
sky.get('skypilot-server-on-boot-check')  # its `sky check` (which finds no cloud) must run first
"""


def plant(home: Path) -> dict[str, str]:
    """Plant everything under `home`; return the environment that uses it."""
    for rel, text in CATALOG.items():
        path = home / ".sky" / "catalogs" / "v8" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)  # no .meta/*.md5 beside them: SkyPilot keeps them, never downloads
    (home / ".sky" / "config.yaml").write_text("allowed_clouds: [AWS]\n")
    (home / ".aws").mkdir(exist_ok=True)
    (home / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = AKIAFAKEFAKEFAKE0000\naws_secret_access_key = fakefakefakefake\n")
    (home / ".aws" / "config").write_text("[default]\nregion = us-east-1\n")
    shim = home / "bin" / "rsync"  # SkyPilot only checks `rsync --version` before provisioning
    shim.parent.mkdir(exist_ok=True)
    shim.write_text("#!/bin/sh\nexit 0\n")
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in ("SKYPILOT_API_SERVER_ENDPOINT", "SKY_RUNTIME_DIR")}
    env.update(HOME=str(home), SKYPILOT_API_SERVER_LOCAL_PORT=str(free_port()), SKYPILOT_DISABLE_USAGE_COLLECTION="1",
               AWS_SHARED_CREDENTIALS_FILE=str(home / ".aws" / "credentials"),
               AWS_CONFIG_FILE=str(home / ".aws" / "config"), PATH=f"{shim.parent}:{os.environ['PATH']}")
    return env


def start(env: dict[str, str]) -> None:
    for code in (START, ENABLE_AWS):
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=180)


def run(env: dict[str, str], code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def stop(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-c", "import sky; sky.api_stop()"], env=env, capture_output=True, timeout=120)

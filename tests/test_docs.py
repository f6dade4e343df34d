"""The docs site builds strictly: a broken link, a missing anchor or a page left out of the nav
fails the build."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_the_docs_site_builds_strictly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env={"NO_MKDOCS_2_WARNING": "1",
                                                                                    "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "settings" / "index.html").is_file()

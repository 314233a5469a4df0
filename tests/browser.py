"""A real headless Chromium (Debian's package) for the page tests, installed with apt-get when missing and driven
by Playwright through `executable_path` (Playwright's own browser downloads need the network)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PACKAGES = ["chromium"]
# as root Chromium needs --no-sandbox; the rest keep a test browser from reaching out or using /dev/shm
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps"]


class Unavailable(Exception):
    """No Chromium here and no way to install it: the tests skip with this message (and fail in CI)."""


def chromium() -> Path:
    """The path of a Chromium binary, installing Debian's package first if there is none."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return Path(path)
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise Unavailable("chromium is not installed and installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, env=env)
    proc = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not shutil.which("chromium"):
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip()[-300:]}")
    return Path(shutil.which("chromium"))

"""Shared fixtures. The smoke pipeline runs once per session through the Makefile, into a
temporary results folder, so the tests never touch the repository's own results/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    """Run every pipeline stage at scale=smoke with papermill (via `make smoke`)."""
    root = tmp_path_factory.mktemp("results")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["make", "-C", str(REPO), "smoke", f"RESULTS_ROOT={root}"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
    assert proc.returncode == 0, "make smoke failed (output above)"
    return root / "smoke"

"""Shared fixtures. The smoke pipeline runs once per session through the Makefile, into a
temporary results folder, so the tests never touch the repository's own results/."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
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


# ----------------------------------------------------------------------------- helpers shared by tests
# Imported by the test modules (``from conftest import ...``): copying a smoke run's stages,
# running one stage in a subprocess, starting the local OpenAI-compatible server.


def copy_stages(smoke_root: Path, dst: Path, stages) -> Path:
    """Copy the named stages of a smoke run into ``dst/smoke``; returns ``dst`` (a results root)."""
    for stage in stages:
        shutil.copytree(smoke_root / stage, dst / "smoke" / stage, symlinks=True)
    return dst


def run_stage(stage_module: str, config_name: str, root: Path, extra=(), env=None, wait: bool = True,
              timeout: float = 900):
    """``fire_core.stages.<stage_module>.run`` at scale=smoke into ``root``, in a subprocess (so
    a test can kill it); with ``wait`` it must succeed."""
    code = (f"import sys; from fire_core import config; from fire_core.stages import {stage_module} as stage; "
            f"stage.run(config.load('{config_name}', sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, "scale=smoke", f"paths.results={root}", *extra]
    kw = dict(cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return subprocess.Popen(cmd, **kw)
    proc = subprocess.run(cmd, **kw, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def start_server(*args):
    """``python -m fire_core.serve`` on a free loopback port; returns (process, port) once it answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fire_core.serve", "--port", str(port), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start: " + proc.stderr.read().decode()[-2000:])

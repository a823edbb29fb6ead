"""The keeper's Python side: ``devmem._lib.keeper_binary_path()`` and the ``python -m
devmem.keeper`` wrapper that execs the bundled ``devmem-keeper`` (docs/keeper.md)."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

from conftest import BUNDLED, ROOT

import devmem._lib as lib


def _run(args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "devmem.keeper", *args], capture_output=True, text=True,
                          env=env, timeout=60, **kw)


def test_env_override_comes_first(monkeypatch):
    monkeypatch.setenv("DEVMEM_KEEPER_BINARY", "/some/where/devmem-keeper")
    assert lib.keeper_binary_path() == "/some/where/devmem-keeper"


def test_missing_binary_is_a_clear_error():
    env = dict(os.environ, DEVMEM_KEEPER_BINARY="/nonexistent/devmem-keeper")
    r = _run(["status"], env=env)
    assert r.returncode == 126
    assert "/nonexistent/devmem-keeper" in r.stderr


def _binary():
    path = lib.keeper_binary_path()
    if BUNDLED:
        # pip bundles it: the installed package must ship an executable devmem/devmem-keeper.
        assert path and "site-packages" in path and os.access(path, os.X_OK), path
    elif path is None:
        pytest.skip(f"no devmem-keeper built (cargo build -p devmem-keeper in {ROOT})")
    return path


def test_wrapper_runs_the_keeper_end_to_end():
    _binary()
    assert _run(["--help"]).returncode == 0
    assert _run(["frobnicate"]).returncode == 2
    with tempfile.TemporaryDirectory() as tmp:
        socket = os.path.join(tmp, "k", "keeper.sock")
        env = dict(os.environ, DEVMEM_KEEPER_SOCKET=socket)
        assert _run(["status"], env=env).returncode == 3  # none running
        r = _run(["serve", "--daemon"], env=env)
        assert r.returncode == 0, r.stderr
        try:
            r = _run(["status", "--json"], env=env)
            assert r.returncode == 0, r.stderr
            status = json.loads(r.stdout)
            assert status["socket"] == socket and status["bytes_held"] == 0 and status["keys"] == []
        finally:
            r = _run(["stop"], env=env)
        assert r.returncode == 0, r.stderr

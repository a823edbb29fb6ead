"""PyTorch on the real GPU (run on the H100 machine): each scenario in its own process."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.dirname(HERE)


@pytest.mark.parametrize(
    "name,extra_env",
    [
        ("tensors", {}),
        ("model", {}),
        ("graph", {}),
        ("expandable", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:256"}),
        ("profiling", {}),
        ("bad_input", {}),
        ("shared_store", {}),
        ("durable", {}),
        ("identity", {}),
    ],
)
def test_scenario(name, extra_env):
    env = dict(os.environ, PYTHONPATH=PACKAGE, PYTHONUNBUFFERED="1", **extra_env)
    out = subprocess.run([sys.executable, os.path.join(HERE, "scenarios.py"), name], env=env,
                         capture_output=True, text=True, timeout=300)
    print(out.stdout)
    print(out.stderr[-3000:], file=sys.stderr)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{name}: PASS" in out.stdout
    assert "pure virtual method called" not in out.stderr

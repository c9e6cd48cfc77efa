"""Issue 14 on 8 CPU devices: runs ``tests/multidevice`` (``check_*.py``) in a subprocess.

The main suite stays on one device (``tests/conftest.py`` keeps ``tests/multidevice`` out of its
collection); the subprocess gets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before
jax starts. What the modules there check is described in ``check_sharding.py`` and
``check_linear_ce.py`` (which also runs ``examples/sharded_lm_head.py`` in one process and in
two).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600  # seconds; the module takes about a minute on 2 loaded cores


def test_multidevice_suite_passes() -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", "python_files=check_*.py", "tests/multidevice"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{output}"
    assert " passed" in output and " failed" not in output, output

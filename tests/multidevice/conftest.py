"""8 CPU devices for the modules here (``check_*.py``), which the main suite does not collect.

``tests/conftest.py`` keeps this directory out of the main (single-device) collection, and
``tests/test_sharding.py`` runs it in a subprocess:
``python -m pytest -q -p no:cacheprovider -o python_files='check_*.py' tests/multidevice``.
XLA reads ``XLA_FLAGS`` when the CPU backend starts (at the first array or device query, not
at ``import jax``), so setting it here, before any test module runs, is in time; the modules
check the device count all the same.
"""

from __future__ import annotations

import os

DEVICES = 8
_FLAG = f"--xla_force_host_platform_device_count={DEVICES}"

if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

"""Session-wide JAX settings and shared fixtures.

Strict dtype promotion and ``rank_promotion="raise"`` hold for the whole session (as in equinox
and lineax), so an implicit promotion inside the library, or in a test, is an error rather than a
silent upcast or broadcast.

Code that is not ours may not be written for strict promotion (optax's ``scale_by_adam`` mixes
its int32 step count with Python floats, for one). A test that drives such code opts out with the
``standard_promotion`` marker (``pytestmark = pytest.mark.standard_promotion`` for a module),
which runs it under ``jax.numpy_dtype_promotion("standard")``.

The longest test (``test_sharding.py``, a subprocess of about a minute) is collected first, so
that under README's test command (two xdist workers, ``--dist worksteal``: the first worker starts
with the first half of the tests) it runs while the other worker takes the rest, instead of
alone at the end (measured: it started at 355 s of a 438 s run).
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


_FIRST = ("test_sharding.py",)  # the long subprocess, started first


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "standard_promotion: run under standard (not strict) dtype promotion, for tests that "
        "drive third-party code written for it",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in _FIRST)  # stable: the rest keep order


@pytest.fixture(autouse=True)
def _promotion_mode(request: pytest.FixtureRequest) -> Iterator[None]:
    mode = "standard" if request.node.get_closest_marker("standard_promotion") else "strict"
    with jax.numpy_dtype_promotion(mode):
        yield


@pytest.fixture
def x64() -> Iterator[None]:
    """Runs the test with ``jax_enable_x64`` on (float64 arrays and a float64 default dtype)."""
    with jax.enable_x64(True):
        yield

# tests/multidevice runs in a subprocess with 8 CPU devices (tests/test_sharding.py).
collect_ignore = ["multidevice"]

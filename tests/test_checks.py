"""Unit tests for the private argument checks and dtype policy in ``jaxlse/_checks.py``.

The public functions' errors are tested through the public API in ``test_lse.py``; here each check
is exercised on its own, including the exact wording that the public errors rely on: every
message starts with ``"<function>: `<argument>`"``. ``jit_public`` is tested on its own and through
the public functions: an eager call is one compiled program.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlse
from jaxlse import _checks

F16, BF16, F32, F64 = (jnp.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))


def test_default_float():
    assert _checks.default_float() == F32


def test_default_float_x64(x64):
    assert _checks.default_float() == F64


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (np.arange(3, dtype=np.int32), F32),
        (np.arange(3, dtype=np.int8), F32),
        (np.arange(3, dtype=np.uint8), F32),
        (np.array([True, False]), F32),
        ([1, 2, 3], F32),
        (2, F32),
        ([1.0, 2.0], F32),
        (np.ones(2, np.float16), F16),
        (jnp.ones(2, jnp.bfloat16), BF16),
        (np.ones(2, np.float32), F32),
    ],
    ids=lambda v: getattr(v, "dtype", type(v).__name__),
)
def test_as_float_array_promotes_to_float(value, dtype):
    out = _checks.as_float_array("fn", "x", value)
    assert isinstance(out, jax.Array)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, np.asarray(value).astype(np.float32))


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(np.arange(3, dtype=np.int64), F64), (np.array([True]), F64), (np.ones(2), F64),
     (np.ones(2, np.float32), F32), (np.ones(2, np.float16), F16)],
    ids=str,
)
def test_as_float_array_x64(x64, value, dtype):
    assert _checks.as_float_array("fn", "x", value).dtype == dtype


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.ones(2, np.complex64), r"^fn: `arg` must be real; complex input \(dtype complex64\)"),
        (1 + 2j, r"^fn: `arg` must be real"),
        (["spam", "eggs"], r"^fn: `arg` must be a numeric array, got list"),
        (np.asarray(["spam"]), r"^fn: `arg` must be a numeric array, got ndarray"),
        ("spam", r"^fn: `arg` must be a numeric array, got str"),
        (None, r"^fn: `arg` must be a numeric array, got NoneType"),
        (object(), r"^fn: `arg` must be a numeric array, got object"),
    ],
    ids=["complex_array", "complex_scalar", "list_of_str", "str_array", "str", "none", "object"],
)
def test_as_float_array_rejects(value, message):
    with pytest.raises(TypeError, match=message):
        _checks.as_float_array("fn", "arg", value)


@pytest.mark.parametrize(
    ("dtype", "expected"), [(F16, F32), (BF16, F32), (F32, F32), (F64, F64)], ids=str
)
def test_compute_dtype(dtype, expected):
    assert _checks.compute_dtype(dtype) == expected


@pytest.mark.parametrize(
    ("axis", "ndim", "expected"),
    [
        (None, 3, (0, 1, 2)),
        (None, 0, ()),
        ((), 2, ()),
        (0, 1, (0,)),
        (-1, 3, (2,)),
        (-3, 3, (0,)),
        ((2, 0), 3, (0, 2)),
        ([-1, 0], 3, (0, 2)),
        (np.int64(1), 2, (1,)),
        ((np.int32(-2),), 2, (0,)),
    ],
    ids=str,
)
def test_normalize_axes(axis, ndim, expected):
    out = _checks.normalize_axes("fn", axis, ndim)
    assert out == expected
    assert all(type(a) is int for a in out)


@pytest.mark.parametrize(
    ("axis", "ndim", "message"),
    [
        (2, 2, r"^fn: `axis` 2 is out of range for an input of rank 2 \(expected -2 <= axis < 2\)"),
        (-3, 2, r"^fn: `axis` -3 is out of range"),
        ((0, 5), 3, r"^fn: `axis` 5 is out of range"),
        (0, 0, r"^fn: `axis` 0 is out of range for an input of rank 0"),
        ((0, -2), 2, r"^fn: `axis` has a repeated entry: \(0, -2\)"),
        ((1, 1), 3, r"^fn: `axis` has a repeated entry"),
    ],
    ids=str,
)
def test_normalize_axes_value_errors(axis, ndim, message):
    with pytest.raises(ValueError, match=message):
        _checks.normalize_axes("fn", axis, ndim)


@pytest.mark.parametrize("axis", [1.0, "1", (0, 1.5), [None], np.float32(0)], ids=str)
def test_normalize_axes_type_errors(axis):
    with pytest.raises(TypeError, match=r"^fn: `axis` must be an int, a sequence of ints or None"):
        _checks.normalize_axes("fn", axis, 2)


@pytest.mark.parametrize(
    "shape", [(), (1,), (4,), (1, 4), (3, 1), (3, 4)], ids=str
)
def test_check_broadcasts_to_accepts(shape):
    assert _checks.check_broadcasts_to("fn", "b", jnp.zeros(shape), (3, 4)) is None


@pytest.mark.parametrize("shape", [(3,), (2, 4), (4, 3), (2, 3, 4), (1, 3, 4), (3, 4, 1)], ids=str)
def test_check_broadcasts_to_rejects(shape):
    """Shapes that do not broadcast, or that broadcast only to a larger shape, are rejected."""
    message = f"fn: `b` of shape {tuple(shape)} does not broadcast to the input's shape (3, 4)"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        _checks.check_broadcasts_to("fn", "b", jnp.zeros(shape), (3, 4))


@pytest.mark.parametrize(
    ("shape", "others", "want"),
    [
        ((3, 4), {}, (3, 4)),
        ((3, 4), {"b": np.ones(4), "where": None}, (3, 4)),
        ((4,), {"where": np.ones((2, 1), bool)}, (2, 4)),
        ((3, 1), {"b": np.ones((2, 1, 5)), "where": np.ones(5, bool)}, (2, 3, 5)),
    ],
    ids=str,
)
def test_broadcast_input(shape, others, want):
    out = _checks.broadcast_input("fn", jnp.zeros(shape), **others)
    assert out.shape == want


def test_broadcast_input_names_the_argument():
    message = "fn: `where` of shape (3,) does not broadcast with the input's shape (2, 4)"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        _checks.broadcast_input("fn", jnp.zeros((2, 4)), b=np.ones(4), where=np.ones(3))


def test_as_mask_none():
    assert _checks.as_mask("fn", None, (3, 4)) is None


@pytest.mark.parametrize(
    "where",
    [
        np.array([True, False, True, True]),
        np.array([1, 0, 2, -1]),
        np.array([0.5, 0.0, 1.0, -2.0], np.float32),
        [True, False, True, True],
    ],
    ids=["bool", "int", "float", "list"],
)
def test_as_mask_converts_to_bool(where):
    mask = _checks.as_mask("fn", where, (3, 4))
    assert mask.dtype == jnp.bool_
    np.testing.assert_array_equal(
        np.broadcast_to(mask, (3, 4)), np.broadcast_to(np.asarray(where) != 0, (3, 4))
    )


def test_as_mask_rejects_shape():
    with pytest.raises(ValueError, match=r"^fn: `where` of shape \(3,\) does not broadcast"):
        _checks.as_mask("fn", np.ones(3, bool), (3, 4))


@pytest.mark.parametrize(
    "where", [["spam", "eggs"], np.asarray(["spam"]), object()],
    ids=["list_of_str", "str_array", "object"],
)
def test_as_mask_rejects_type(where):
    with pytest.raises(TypeError, match=r"^fn: `where` must be a boolean array"):
        _checks.as_mask("fn", where, (3, 4))


# --------------------------------------------------------------------------------------------
# jit_public: each public function is one jitted program, eagerly too

_COMPILED = [0]


def _count_compiles(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILED[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def _programs(call) -> int:
    """The number of programs XLA compiles while ``call()`` runs (and its result is ready)."""
    start = _COMPILED[0]
    jax.block_until_ready(call())
    return _COMPILED[0] - start


def test_jit_public_traces_arrays_and_keeps_options_static():
    seen = []

    def concrete(v) -> bool:
        return not isinstance(v, jax.core.Tracer)

    @_checks.jit_public(("axis",), before=lambda a: seen.append(("before", a["scale"])),
                        after=lambda a: seen.append(("after", concrete(a["x"]))))
    def f(x, scale=1.0, axis=-1, flag=False):
        seen.append(("body", concrete(x), concrete(scale)))
        return jnp.sum(jnp.asarray(x) * scale, axis=axis) + (1 if flag else 0)

    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(f(x, 2.0, axis=0), [6, 10, 14])
    # traced once, with the array and the non-zero scale as tracers; the checks see values
    assert seen == [("before", 2.0), ("body", False, False), ("after", True)]
    seen.clear()
    np.testing.assert_array_equal(f(x, 3.0, axis=0), [9, 15, 21])  # same program
    assert seen == [("before", 3.0), ("after", True)]
    seen.clear()
    # a scalar 0 and a bool are static: the body sees them as Python values
    np.testing.assert_array_equal(f(x, 0.0, flag=True), [1, 1])
    assert seen[1] == ("body", False, True)
    seen.clear()
    # inside a caller's trace it is a nested jit; the checks see the caller's tracer
    np.testing.assert_array_equal(jax.jit(lambda v: f(v, 2.0))(x), [6, 24])
    assert seen == [("before", 2.0), ("body", False, False), ("after", False)]
    seen.clear()
    # a list runs the body as it is (its own conversion), with no program of its own
    np.testing.assert_array_equal(f([[1.0, 2.0]], 2.0), [6])
    assert seen == [("body", True, True)]
    # a wrong call gets Python's own message, naming the function
    with pytest.raises(TypeError, match=r"f\(\) takes from 1 to 4 positional arguments"):
        f(x, 1.0, -1, False, None)


X_EAGER = np.random.default_rng(3).standard_normal((3, 37)).astype(np.float32)
Y_EAGER = np.asarray([4, 36, 0])
Q_EAGER = np.full((3, 37), 1 / 37, np.float32)
W_EAGER = np.random.default_rng(4).standard_normal((37, 11)).astype(np.float32)
EAGER_CALLS = {
    "logsumexp": lambda x: jaxlse.logsumexp(x, axis=1, b=x - 1, return_sign=True),
    "log_softmax": lambda x: jaxlse.log_softmax(x, where=x > -1),
    "softmax": lambda x: jaxlse.softmax(x, axis=0, where=x > -1),
    "nll_loss": lambda x: jaxlse.nll_loss(x, Y_EAGER, weight=np.linspace(0.5, 1, 37),
                                          ignore_index=0, where=np.array([1, 1, 0], bool)),
    "cross_entropy": lambda x: jaxlse.cross_entropy(
        x, Y_EAGER, weight=np.linspace(0.5, 1, 37), ignore_index=0, label_smoothing=0.1,
        z_loss=1e-4, soft_cap=30.0, where=np.array([1, 1, 0], bool)),
    "cross_entropy_soft": lambda x: jaxlse.cross_entropy(x, Q_EAGER),
    "linear_cross_entropy": lambda x: jaxlse.linear_cross_entropy(
        x, W_EAGER, Y_EAGER % 11, label_smoothing=0.1, ignore_index=0, chunk_size=4),
}


@pytest.mark.parametrize("name", list(EAGER_CALLS))
def test_eager_call_is_one_program(name):
    """Called eagerly, each public function compiles one program for a new shape (jax.nn's
    logsumexp dispatches a dozen, and these losses did some twenty), and none for new values."""
    call = EAGER_CALLS[name]
    assert _programs(lambda: call(X_EAGER)) == 1
    assert _programs(lambda: call(X_EAGER + 1)) == 0


def test_eager_gradient_is_a_few_programs():
    """An eager gradient of a loss with options compiles its forward and transposed programs
    (it was eleven small programs), and none for a second call."""
    x = X_EAGER[:, :31]
    y = Y_EAGER % 31

    def grad():
        return jax.grad(lambda v: jaxlse.cross_entropy(v, y, label_smoothing=0.1, z_loss=1e-4))(x)

    assert _programs(grad) <= 3
    assert _programs(grad) == 0


def test_eager_option_values_share_a_program():
    """A new value of a float option reuses the program; 0 (the option off) has its own."""
    x = X_EAGER[:, :29]
    y = Y_EAGER % 29

    def ce(eps):
        return lambda: jaxlse.cross_entropy(x, y, label_smoothing=eps)

    assert _programs(ce(0.1)) == 1
    assert _programs(ce(0.2)) == 0
    assert _programs(ce(0.0)) == 1
    want = optax_free_smoothed_ce(x, y, 0.2)
    np.testing.assert_allclose(ce(0.2)(), want, rtol=1e-6)


def optax_free_smoothed_ce(x: np.ndarray, y: np.ndarray, eps: float) -> float:
    """PyTorch's label-smoothed mean cross-entropy, in float64 NumPy."""
    x = x.astype(np.float64)
    lsm = x - x.max(1, keepdims=True)
    lsm = lsm - np.log(np.exp(lsm).sum(1, keepdims=True))
    q = np.full(x.shape, eps / x.shape[1])
    q[np.arange(len(y)), y] += 1 - eps
    return float(np.mean(-(q * lsm).sum(1)))

"""Tests for ``jaxlse.logsumexp``, ``jaxlse.log_softmax`` and ``jaxlse.softmax``.

Sections, in the order of the issue:

1. transformations (jit, vmap, grad, jacfwd, jacrev, hessian) and ``check_grads`` in float64;
2. values against ``jax.nn``, with a tolerance table keyed by dtype;
3. extreme finite magnitudes (``1e30``, the dtype's max and min);
4. edge cases: ``-inf`` / ``+inf`` rows, ``where``, fully masked rows, ``b == 0``, NaN, empty axes;
5. accuracy in ulps against a float64 reference, including rows long enough for the blocked path;
6. memory of the compiled gradient;
7. bad arguments;
8. the worked example of the issue;
9. properties (hypothesis), the dtype policy and retracing.

Plain pytest functions only; every input is seeded.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    DISTRIBUTIONS,
    Cases,
    check_grads,
    cond_branches,
    fast_jit,
    ref_log_softmax,
    ref_logsumexp,
    ref_softmax,
    ulp,
    ulp_error,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxlse
from jaxlse import _rowstats

F16, BF16, F32, F64 = (jnp.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
NAMES = ("logsumexp", "log_softmax", "softmax")
INF = float("inf")

# Closeness to jax.nn (and between transformations of the same function), |a - e| <= atol +
# rtol * |e|. float32 / float64: jax.nn's log_softmax loses up to ~8 ulp to cancellation near 0,
# hence the atol. float16 / bfloat16: jaxlse rounds a float32 computation once, and is compared to
# jax.nn run in float32 and rounded once, so the two differ by at most one ulp (2**-10, 2**-7).
TOL = {
    F32: {"rtol": 1e-6, "atol": 1e-6},
    F64: {"rtol": 1e-14, "atol": 1e-14},
    F16: {"rtol": 2.0**-10, "atol": 2.0**-24},
    BF16: {"rtol": 2.0**-7, "atol": 2.0**-133},
}

# Accuracy against the exact answer, in ulps of the output dtype (section 5):
# float32 log_softmax in ulps of its own value, logsumexp in ulps of max(|result|, max|input|);
# float16 / bfloat16 in ulps of their own value for both (one rounding of a float32 result).
ULP_BOUND = {F32: 4.0, F16: 1.0, BF16: 1.0}
TINY32 = float(np.finfo(np.float32).tiny)  # XLA:CPU flushes float32 results below this to 0


def _fn(name: str) -> Callable[..., jax.Array]:
    return getattr(jaxlse, name)


def _normal(shape, dtype=F32, seed=0, scale=3.0) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(dtype))


def _axes(axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    return tuple(sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else axis)))


def _mask(shape, axis, seed=0, p=0.6) -> jax.Array:
    """A random mask with the first entry of every row (along ``axis``) included."""
    rng = np.random.default_rng(seed + 1000)
    w = np.asarray(rng.random(shape) < p)
    axes = _axes(axis, len(shape))
    if all(shape[a] > 0 for a in axes):
        w[tuple(0 if i in axes else slice(None) for i in range(len(shape)))] = True
    return jnp.asarray(w)


def _call(name: str, x, axis, where=None, b=None, **kw):
    if name == "logsumexp":
        return jaxlse.logsumexp(x, axis=axis, b=b, where=where, **kw)
    assert b is None
    return _fn(name)(x, axis=axis, where=where)


def _stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


# --------------------------------------------------------------------------------------------
# 1. Transformations


TRANSFORM_CASES = [((6,), -1), ((4, 7), 0), ((4, 7), -1), ((2, 3, 5), (0, 2)), ((2, 3, 5), None)]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "where"])
@pytest.mark.parametrize(("shape", "axis"), TRANSFORM_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name, shape, axis, masked):
    x = _normal(shape, seed=1)
    w = _mask(shape, axis, seed=1) if masked else None

    def f(v, m):
        return _call(name, v, axis, where=m)

    chex.assert_trees_all_close(jax.jit(f)(x, w), f(x, w), strict=True, **TOL[F32])


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "where"])
@pytest.mark.parametrize(("shape", "axis"), [((7,), -1), ((3, 4), 0), ((2, 3, 4), (0, 2))])
def test_logsumexp_b_jit_matches_eager(shape, axis, masked):
    x = _normal(shape, seed=2)
    b = jnp.asarray(np.random.default_rng(2).uniform(-1.0, 2.0, shape).astype(np.float32))
    w = _mask(shape, axis, seed=2) if masked else None

    def f(v, bb, m):
        return jaxlse.logsumexp(v, axis=axis, b=bb, where=m, return_sign=True)

    chex.assert_trees_all_close(jax.jit(f)(x, b, w), f(x, b, w), strict=True, **TOL[F32])


# Per-example shape (4, 5), batch of 3; None means that argument is shared by the batch.
VMAP_IN_AXES = [(0, None), (1, None), (2, None), (None, 0), (None, 2), (0, 0), (1, 2), (2, 1)]


def _batched(full: jax.Array, in_axis):
    return full[0] if in_axis is None else jnp.moveaxis(full, 0, in_axis)


def _example(full: jax.Array, in_axis, i: int):
    return full[0] if in_axis is None else full[i]


VMAP_CASES = [(in_axes, axis) for in_axes in VMAP_IN_AXES for axis in (-1, 0, None)]


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_x_and_where_matches_loop(name):
    """Every (in_axes, axis) case of one function: ``vmap`` equals a loop over the batch. All
    the cases are traced into one program (compiled with ``helpers.fast_jit``: the two
    sides are compared with tolerances) and each is checked, and named, on its own."""
    x = _normal((3, 4, 5), seed=3)
    w = jnp.asarray(np.random.default_rng(3).random((3, 4, 5)) < 0.6)

    @fast_jit
    def every_case(x, w):
        out = []
        for in_axes, axis in VMAP_CASES:
            def f(v, m, axis=axis):
                return _call(name, v, axis, where=m)

            got = jax.vmap(f, in_axes=in_axes)(_batched(x, in_axes[0]), _batched(w, in_axes[1]))
            # the loop: lax.map over the examples (f compiled once, not three times)
            want = jax.lax.map(lambda i, f=f, ax=in_axes: f(_example(x, ax[0], i),
                                                            _example(w, ax[1], i)),
                               jnp.arange(3))
            out.append((got, want))
        return out

    cases = Cases()
    for (in_axes, axis), (got, want) in zip(VMAP_CASES, every_case(x, w), strict=True):
        with cases.case(f"{name}-in_axes={in_axes}-axis={axis}"):
            chex.assert_trees_all_close(got, want, strict=True, **TOL[F32])
    cases.assert_all_passed(expected=len(VMAP_IN_AXES) * 3)


@pytest.mark.parametrize(
    "in_axes", [(0, None, None), (None, 0, None), (None, None, 0), (1, 0, 2), (0, 1, None)], ids=str
)
def test_vmap_logsumexp_over_b_matches_loop(in_axes):
    rng = np.random.default_rng(4)
    x = _normal((3, 4, 5), seed=4)
    b = jnp.asarray(rng.uniform(-1.0, 2.0, (3, 4, 5)).astype(np.float32)).at[:, :, 1].set(0.0)
    w = jnp.asarray(rng.random((3, 4, 5)) < 0.7)

    def f(v, bb, m):
        return jaxlse.logsumexp(v, axis=-1, b=bb, where=m, return_sign=True)

    args = (x, b, w)
    pairs = list(zip(args, in_axes, strict=True))
    got = jax.vmap(f, in_axes=in_axes)(*(_batched(a, ax) for a, ax in pairs))
    want = _stack([f(*(_example(a, ax, i) for a, ax in pairs)) for i in range(3)])
    chex.assert_trees_all_close(got, want, strict=True, **TOL[F32])


@pytest.mark.parametrize("name", NAMES)
def test_vmap_of_grad_matches_loop(name):
    x = _normal((3, 4, 5), seed=5)
    w = jnp.asarray(np.random.default_rng(5).random((3, 4, 5)) < 0.6)
    t = _normal((3,) + _out_shape(name, (4, 5), -1), seed=6)

    def g(v, m, tt):
        out = _call(name, v, -1, where=m)
        return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0) * tt)

    got = jax.vmap(jax.grad(g))(x, w, t)
    want = jnp.stack([jax.grad(g)(x[i], w[i], t[i]) for i in range(3)])
    chex.assert_trees_all_close(got, want, strict=True, **TOL[F32])


def test_vmap_keeps_the_exact_pass_conditional():
    """Under vmap log_softmax's exact pass and output still run under conditionals on the
    whole batch: vmap would otherwise turn each into a select that runs every branch (measured
    2.8x slower at (4096, 32768)). Dominated rows (which take the pass) are as accurate mapped,
    once or twice, as batched."""
    x = _dominated_batch(6, 300, 3, seed=4)
    mapped = jax.vmap(jaxlse.log_softmax)
    assert cond_branches(mapped, x), "vmap turned the conditionals into selects"
    err = ulp_error(jax.jit(mapped)(jnp.asarray(x)), ref_log_softmax(x))
    assert err.max() <= ULP_BOUND[F32], err.max()
    twice = jax.vmap(jax.vmap(jaxlse.log_softmax))(jnp.asarray(x.reshape(2, 3, 300)))
    assert ulp_error(twice.reshape(6, 300), ref_log_softmax(x)).max() <= ULP_BOUND[F32]


def _out_shape(name, shape, axis):
    if name != "logsumexp":
        return shape
    axes = _axes(axis, len(shape))
    return tuple(s for i, s in enumerate(shape) if i not in axes)


DERIV_CASES = [((5,), -1), ((3, 4), 0), ((2, 3, 4), (0, 2))]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "where"])
@pytest.mark.parametrize(("shape", "axis"), DERIV_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_derivatives_agree(name, shape, axis, masked):
    """grad, jacfwd, jacrev, hessian (and their jit) agree with each other and with jax.nn."""
    x = _normal(shape, seed=7)
    w = _mask(shape, axis, seed=7) if masked else None
    t = _normal(_out_shape(name, shape, axis), seed=8)

    def f(v):
        return _call(name, v, axis, where=w)

    def g(v):  # a scalar; masked log_softmax entries are -inf, so weight the finite ones only
        out = f(v)
        return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0) * t)

    def derivatives(v):  # one compiled function, to keep the test fast
        return {
            "value": f(v),
            "jacfwd": jax.jacfwd(f)(v),
            "jacrev": jax.jacrev(f)(v),
            "grad": jax.grad(g)(v),
            "hessian": jax.hessian(g)(v),
            "rev_fwd": jax.jacrev(jax.jacfwd(g))(v),
            "rev_rev": jax.jacrev(jax.jacrev(g))(v),
            "fwd_fwd": jax.jacfwd(jax.jacfwd(g))(v),
        }

    d = fast_jit(derivatives)(x)  # compared with tolerances
    assert all(np.all(np.isfinite(v)) for k, v in d.items() if k != "value")
    chex.assert_trees_all_close(d["jacfwd"], d["jacrev"], strict=True, **TOL[F32])
    # grad = J^T t (the -inf outputs of masked log_softmax carry no weight)
    weights = np.where(np.isfinite(d["value"]), t, np.float32(0))
    chex.assert_trees_all_close(
        d["grad"], np.tensordot(weights, d["jacrev"], axes=t.ndim), jax.grad(g)(x),  # eager
        strict=True, **TOL[F32],
    )
    hess = d["hessian"]
    chex.assert_trees_all_close(
        hess, d["rev_fwd"], d["rev_rev"], d["fwd_fwd"], strict=True, **TOL[F32]
    )
    flat = hess.reshape(x.size, x.size)
    chex.assert_trees_all_close(flat, flat.T, strict=True, **TOL[F32])
    if not masked:
        def g_nn(v):
            return jnp.sum(getattr(jax.nn, name)(v, axis=axis) * t)

        grad_nn, hess_nn = fast_jit(lambda v: (jax.grad(g_nn)(v), jax.hessian(g_nn)(v)))(x)
        chex.assert_trees_all_close(d["grad"], grad_nn, strict=True, **TOL[F32])
        chex.assert_trees_all_close(hess, hess_nn, strict=True, **TOL[F32])


def _check_grads(f, args):
    """``check_grads`` to second order in both modes, each derivative program compiled once
    (``helpers.check_grads``: ``jax.test_util.check_grads``'s checks, with ``fast_jit``)."""
    check_grads(f, args, order=2)


CHECK_GRADS_CASES = [((3, 4), -1), ((3, 4), 0), ((2, 3, 4), (0, 2))]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "where"])
@pytest.mark.parametrize(("shape", "axis"), CHECK_GRADS_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_check_grads(x64, name, shape, axis, masked):
    x = _normal(shape, dtype=F64, seed=9, scale=1.0)
    w = _mask(shape, axis, seed=9) if masked else None
    assert x.dtype == F64
    _check_grads(lambda v: _call(name, v, axis, where=w), (x,))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "where"])
@pytest.mark.parametrize(("shape", "axis"), CHECK_GRADS_CASES)
def test_check_grads_logsumexp_b(x64, shape, axis, masked):
    """Derivatives w.r.t. ``a`` and ``b``, with some ``b == 0`` entries."""
    rng = np.random.default_rng(10)
    x = _normal(shape, dtype=F64, seed=10, scale=1.0)
    b = rng.uniform(0.5, 2.0, shape)
    b.reshape(-1)[::3] = 0.0
    w = _mask(shape, axis, seed=10) if masked else None
    _check_grads(lambda v, bb: jaxlse.logsumexp(v, axis=axis, b=bb, where=w), (x, jnp.asarray(b)))


@pytest.mark.parametrize("total_sign", [1.0, -1.0])
def test_check_grads_logsumexp_signed_b(x64, total_sign):
    """With ``return_sign``, ``b`` may be negative: the value is log|sum|."""
    x = jnp.asarray([0.3, -0.2, 1.1, 0.5])
    b = total_sign * jnp.asarray([1.5, -0.5, 0.0, 0.25])
    out, sign = jaxlse.logsumexp(x, b=b, return_sign=True)
    assert float(sign) == total_sign
    _check_grads(lambda v, bb: jaxlse.logsumexp(v, b=bb, return_sign=True)[0], (x, b))


# --------------------------------------------------------------------------------------------
# 2. Values against jax.nn


VALUE_CASES = [
    ((), None),
    ((7,), None),
    ((7,), -1),
    ((5, 11), 0),
    ((5, 11), -2),
    ((5, 11), (0, 1)),
    ((3, 4, 6), 1),
    ((3, 4, 6), -1),
    ((3, 4, 6), (0, 2)),
    ((3, 4, 6), (-1, -3)),
    ((3, 4, 6), None),
    ((3, 4, 6), ()),
]


def _jax_nn_values(name, dtype, x, axis, w, b):
    """jax.nn's results; for 16-bit dtypes computed in float32 and rounded once (as jaxlse)."""
    low = dtype in (F16, BF16)
    up = (lambda a: a.astype(F32)) if low else (lambda a: a)
    fn = getattr(jax.nn, name)
    if name == "logsumexp":
        out = {
            "value": fn(up(x), axis=axis),
            "keepdims": fn(up(x), axis=axis, keepdims=True),
            "where": fn(up(x), axis=axis, where=w),
            "b": fn(up(x), axis=axis, b=up(abs(b))),
            "signed_b": fn(up(x), axis=axis, b=up(b), return_sign=True),
        }
    else:
        out = {"value": fn(up(x), axis=axis), "where": fn(up(x), axis=axis, where=w)}
    return jax.tree.map(lambda a: a.astype(dtype), out)


def _our_values(name, x, axis, w, b):
    fn = _fn(name)
    if name == "logsumexp":
        return {
            "value": fn(x, axis=axis),
            "keepdims": fn(x, axis=axis, keepdims=True),
            "where": fn(x, axis=axis, where=w),
            "b": fn(x, axis=axis, b=abs(b)),
            "signed_b": fn(x, axis=axis, b=b, return_sign=True),
        }
    return {"value": fn(x, axis=axis), "where": fn(x, axis=axis, where=w)}


# float32 runs every case, the other dtypes a subset that still has every rank and kind of axis.
VALUE_DTYPES = {
    dtype: [case for i, case in enumerate(VALUE_CASES) if dtype == F32 or i % 2 == 0]
    for dtype in (F32, F64, F16, BF16)
}


def _value_inputs(dtype, shape, axis):
    """Seeded ``x``, mask and ``b`` (with negative entries, and a zero, for return_sign)."""
    x = _normal(shape, dtype=dtype, seed=11)
    w = _mask(shape, axis, seed=11)
    b = jnp.asarray(np.random.default_rng(11).uniform(-1.0, 2.0, shape).astype(dtype))
    if b.size:
        b = b.at[(0,) * b.ndim].set(0.0)
    return x, w, b


@pytest.mark.parametrize("dtype", list(VALUE_DTYPES), ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_values_match_jax_nn(name, dtype):
    """Every (shape, axis) case of one dtype under one ``jit`` (one compilation instead of one
    per case and operation); each case is checked on its own and named if it fails."""
    with jax.enable_x64(dtype == F64):
        specs = VALUE_DTYPES[dtype]
        inputs = [_value_inputs(dtype, shape, axis) for shape, axis in specs]

        @fast_jit  # compared with tolerances
        def every_case(all_inputs):
            return [(_our_values(name, x, axis, w, b), _jax_nn_values(name, dtype, x, axis, w, b))
                    for (_, axis), (x, w, b) in zip(specs, all_inputs, strict=True)]

        cases = Cases()
        for (shape, axis), (got, want) in zip(specs, every_case(inputs), strict=True):
            with cases.case(f"{name}-{dtype}-{shape}-{axis}"):
                chex.assert_trees_all_close(got, want, strict=True, **TOL[dtype])
        cases.assert_all_passed(expected=len(specs))


def test_logsumexp_b_of_lower_rank():
    """``b`` only needs to broadcast to ``a``'s shape, as ``where`` (also under the
    ``rank_promotion="raise"`` this session runs with)."""
    x = _normal((3, 4), seed=12)
    b = jnp.asarray([1.0, 2.0, 0.0, 0.5])
    w = jnp.asarray([True, False, True, True])
    full_b, full_w = jnp.broadcast_to(b, x.shape), jnp.broadcast_to(w, x.shape)
    chex.assert_trees_all_close(
        jaxlse.logsumexp(x, axis=-1, where=w), jaxlse.logsumexp(x, axis=-1, where=full_w),
        strict=True,
    )
    chex.assert_trees_all_close(
        jaxlse.logsumexp(x, axis=-1, b=b), jaxlse.logsumexp(x, axis=-1, b=full_b), strict=True
    )
    chex.assert_trees_all_close(
        jax.grad(lambda bb: jnp.sum(jaxlse.logsumexp(x, axis=-1, b=bb)))(b),
        jnp.sum(jax.grad(lambda bb: jnp.sum(jaxlse.logsumexp(x, axis=-1, b=bb)))(full_b), 0),
        strict=True, **TOL[F32],
    )


# --------------------------------------------------------------------------------------------
# 3. Extreme finite magnitudes


def _extreme_rows(dtype) -> dict[str, list[float]]:
    """Rows whose exact results are all representable in ``dtype`` (no -2 * max)."""
    big = float(jnp.finfo(dtype).max)
    rows = {
        "max,max": [big, big],
        "-max,-max": [-big, -big],
        "max,0": [big, 0.0],
        "0,-max": [0.0, -big],
        "max,max/2": [big, big / 2],
        "-max,-max/2": [-big, -big / 2],
        "max x1000": [big] * 1000,
        "-max x1000": [-big] * 1000,
    }
    if dtype != F16:  # 1e30 overflows float16
        rows |= {
            "1e30,1e30": [1e30, 1e30],
            "-1e30,-1e30": [-1e30, -1e30],
            "1e30,-1e30": [1e30, -1e30],
            "-1e30,0,1e30": [-1e30, 0.0, 1e30],
        }
    else:
        rows |= {"3e4,-3e4": [3e4, -3e4]}
    return rows


EXTREME_CASES = [
    pytest.param(dtype, key, values, id=f"{dtype}-{key}")
    for dtype in (F32, F16, BF16)
    for key, values in _extreme_rows(dtype).items()
]


@pytest.mark.parametrize(("dtype", "key", "values"), EXTREME_CASES)
def test_extreme_magnitudes(dtype, key, values):
    x = jnp.asarray(np.asarray(values).astype(dtype))
    xh = np.asarray(x)  # the inputs as rounded to dtype
    lse, ls, sm = jaxlse.logsumexp(x), jaxlse.log_softmax(x), jaxlse.softmax(x)
    ref_l, ref_ls, ref_sm = ref_logsumexp(xh), ref_log_softmax(xh), ref_softmax(xh)
    # One ulp, tighter than the promised 4 on purpose: every exact result here is, to far less
    # than an ulp, an input, a difference of two inputs, log(k), -log(k), 1/k or 0, which a
    # sound computation reaches in a rounding or two; more would mean that the huge
    # magnitudes leaked into the arithmetic.
    for out, ref in [(lse, ref_l), (ls, ref_ls), (sm, ref_sm)]:
        assert out.dtype == dtype
        assert np.all(np.isfinite(np.asarray(out, np.float64))), key
        assert np.all(ulp_error(out, ref) <= 1.0), (key, out, ref)
    # Gradients are finite and equal to their limits: d lse = softmax.
    grad = jax.grad(jaxlse.logsumexp)(x)
    assert np.all(ulp_error(grad, ref_sm) <= 1.0), (key, grad)
    for name in ("log_softmax", "softmax"):
        assert np.all(np.isfinite(np.asarray(jax.jacrev(_fn(name))(x[:3]), np.float64)))


# --------------------------------------------------------------------------------------------
# 4. Edge cases


@pytest.mark.parametrize("name", NAMES)
def test_all_neg_inf_row(name):
    """-inf / -inf / 0 with zero derivatives of every order (jax.nn gives NaN gradients)."""
    x = jnp.asarray([[-INF, -INF, -INF], [0.5, -1.0, 2.0]])

    def f(v):
        return _call(name, v, -1)

    out = f(x)
    want = {"logsumexp": -INF, "log_softmax": [-INF] * 3, "softmax": [0.0] * 3}[name]
    np.testing.assert_array_equal(out[0], want)
    assert np.all(np.isfinite(out[1]))
    for jac in (jax.jacfwd, jax.jacrev):
        j = jax.jit(jac(f))(x)  # out.shape + x.shape
        np.testing.assert_array_equal(j[0], np.zeros_like(j[0]))
        np.testing.assert_array_equal(j[1:][..., 0, :], np.zeros_like(j[1:][..., 0, :]))
        assert np.all(np.isfinite(j))
    hess = jax.jit(jax.hessian(f))(x[0])
    np.testing.assert_array_equal(hess, np.zeros_like(hess))
    if name == "logsumexp":
        grad = jax.grad(lambda v: jnp.sum(f(v)))(x)
        np.testing.assert_array_equal(grad[0], [0.0] * 3)
        chex.assert_trees_all_close(grad[1], jaxlse.softmax(x[1]), **TOL[F32])


@functools.cache
def _jacobians(name: str) -> Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
    """jacfwd, jacrev and hessian of ``name`` over its last axis, jitted once for every test."""
    f = _fn(name)
    return jax.jit(lambda v: (jax.jacfwd(f)(v), jax.jacrev(f)(v), jax.hessian(f)(v)))


@pytest.mark.parametrize(
    "row", [[1.0, INF, 2.0], [INF, 0.0, INF, 3.0], [-INF, INF, -1e30], [INF, INF, INF]], ids=str
)
def test_pos_inf_row(row):
    x = jnp.asarray(row)
    top = np.isposinf(row)
    k = top.sum()
    assert float(jaxlse.logsumexp(x)) == INF
    np.testing.assert_array_equal(jaxlse.softmax(x), np.where(top, 1.0 / k, 0.0).astype(np.float32))
    chex.assert_trees_all_close(
        jaxlse.log_softmax(x), jnp.asarray(np.where(top, -np.log(k), -INF), F32), strict=True
    )
    # The gradient of logsumexp is the softmax limit: 1/k at the +inf entries.
    np.testing.assert_array_equal(
        jax.grad(jaxlse.logsumexp)(x), np.where(top, 1.0 / k, 0.0).astype(np.float32)
    )
    for name in NAMES:
        jf, jr, h = _jacobians(name)(x)
        assert np.all(np.isfinite(jf)) and np.all(np.isfinite(h)), name
        chex.assert_trees_all_close(jf, jr, strict=True, **TOL[F32])


@pytest.mark.parametrize("excluded", [INF, -INF, float("nan"), 1e30], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_where_excluded_entries_take_no_part(name, excluded):
    """Values and derivatives equal those of the input with the excluded entries removed."""
    kept = jnp.asarray([[0.5, -1.0, 2.0], [3.0, 1.0, -2.0]])
    x = jnp.asarray([[0.5, excluded, -1.0, 2.0, excluded], [3.0, excluded, 1.0, -2.0, excluded]])
    w = jnp.asarray([True, False, True, True, False])
    cols, gone = np.asarray([0, 2, 3]), np.asarray([1, 4])

    def f(v):
        return _call(name, v, -1, where=jnp.broadcast_to(w, v.shape))

    def f_kept(v):
        return _call(name, v, -1)

    def pick(a):  # the kept columns of every input axis (and output axis, but for logsumexp)
        return a[..., cols] if name == "logsumexp" else a[:, cols][..., cols]

    @fast_jit  # one program; its results are compared with each other
    def run(x, kept):
        jacobians = [(jac(f)(x), jac(f_kept)(kept)) for jac in (jax.jacfwd, jax.jacrev)]
        return f(x), f_kept(kept), jacobians, jax.hessian(f)(x[0]), jax.hessian(f_kept)(kept[0])

    out, out_kept, jacobians, h, h_kept = run(x, kept)
    if name == "logsumexp":
        chex.assert_trees_all_close(out, out_kept, strict=True)
    else:
        chex.assert_trees_all_close(out[:, cols], out_kept, strict=True)
        fill = -INF if name == "log_softmax" else 0.0
        np.testing.assert_array_equal(out[:, gone], np.full((2, 2), fill, np.float32))
    for j, j_kept in jacobians:
        assert np.all(np.isfinite(j))
        np.testing.assert_array_equal(j[..., gone], np.zeros_like(j[..., gone]))
        chex.assert_trees_all_close(pick(j), j_kept, strict=True, **TOL[F32])
    assert np.all(np.isfinite(h))
    assert not np.any(h[..., gone])
    sel = np.ix_(cols, cols) if name == "logsumexp" else np.ix_(cols, cols, cols)
    chex.assert_trees_all_close(h[sel], h_kept, strict=True, **TOL[F32])


@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_row(name):
    x = jnp.asarray([[1.0, INF, float("nan")], [0.5, 2.0, -1.0]])
    w = jnp.asarray([[False, False, False], [True, True, False]])

    def f(v):
        return _call(name, v, -1, where=w)

    out = f(x)
    want = {"logsumexp": -INF, "log_softmax": [-INF] * 3, "softmax": [0.0] * 3}[name]
    np.testing.assert_array_equal(out[0], want)
    assert np.all(np.isfinite(out[1]) | (np.asarray(w[1]) == 0))
    tangent = _normal(x.shape, seed=17)
    _, jvp_out = jax.jvp(f, (x,), (tangent,))
    np.testing.assert_array_equal(jvp_out[0], np.zeros_like(jvp_out[0]))
    cot = _normal(out.shape, seed=18)
    (vjp_out,) = jax.vjp(f, x)[1](cot)
    np.testing.assert_array_equal(vjp_out[0], np.zeros(3, np.float32))
    # JVP and VJP are transposes of each other on the whole input: <cot, J t> == <J^T cot, t>.
    assert np.all(np.isfinite(jvp_out)) and np.all(np.isfinite(vjp_out))
    np.testing.assert_allclose(jnp.vdot(cot, jvp_out), jnp.vdot(vjp_out, tangent), rtol=1e-6)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "where"])
def test_grad_wrt_b_at_zero(masked):
    """d logsumexp / d b_i = exp(a_i - logsumexp), also where b_i == 0 (jax.nn gives 0)."""
    a = jnp.asarray([[0.5, 1.0, -2.0, 3.0], [2.0, -1.0, 0.0, 1.0]])
    b = jnp.asarray([[1.0, 0.0, 2.0, 0.0], [0.0, 0.5, 1.0, 3.0]])
    w = jnp.asarray([[True, True, True, False], [True, True, False, True]]) if masked else None

    def f(bb):
        return jaxlse.logsumexp(a, axis=-1, b=bb, where=w)

    lse = f(b)
    want = jnp.exp(a - lse[:, None])
    if masked:
        want = jnp.where(w, want, 0.0)
    chex.assert_trees_all_close(jax.jacrev(f)(b)[[0, 1], [0, 1]], want, strict=True,
                                **TOL[F32])
    chex.assert_trees_all_close(jax.jacfwd(f)(b)[[0, 1], [0, 1]], want, strict=True,
                                **TOL[F32])
    # the value itself ignores the b == 0 entries
    ref = ref_logsumexp(np.asarray(a), -1, b=np.asarray(b), where=None if w is None else
                        np.asarray(w))
    assert np.all(ulp_error(lse, ref, np.maximum(np.abs(ref), 3.0)) <= ULP_BOUND[F32])


EDGE_ROWS = jnp.asarray(
    [
        [-INF, -INF, -INF, -INF],
        [1.0, INF, 2.0, -INF],
        [INF, 0.0, INF, 3.0],
        [1.0, float("nan"), 2.0, 0.0],
        [1e30, -1e30, 0.0, 1e30],
        [0.5, -1.0, 2.0, -INF],
    ]
)
EDGE_MASK = jnp.asarray([[True, True, False, True]] * 3 + [[False] * 4] + [[True, False] * 2] * 2)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "where"])
@pytest.mark.parametrize("name", NAMES)
def test_edge_rows_jit_matches_eager(name, masked):
    """The edge-case conventions survive XLA's fusion: jit gives the same values and gradient
    (the same infinities and NaNs in the same places)."""
    w = EDGE_MASK if masked else None

    def f(v):
        return _call(name, v, -1, where=w)

    def vjp(v):
        out, pullback = jax.vjp(f, v)
        return pullback(jnp.ones_like(out))[0]

    for fn in (f, vjp):
        eager, jitted = fn(EDGE_ROWS), jax.jit(fn)(EDGE_ROWS)
        np.testing.assert_array_equal(np.isnan(jitted), np.isnan(eager))
        chex.assert_trees_all_close(jitted, eager, strict=True, **TOL[F32])


@pytest.mark.parametrize(("shape", "axis"), [((3, 4), -1), ((4, 3), 0), ((3, 2, 4), (0, 2))])
@pytest.mark.parametrize("name", NAMES)
def test_nan_stays_in_its_row(name, shape, axis):
    x = np.asarray(_normal(shape, seed=13))
    axes = _axes(axis, len(shape))
    nan_at = tuple(1 if i in axes else 0 for i in range(len(shape)))  # in row "0"
    x_nan = x.copy()
    x_nan[nan_at] = np.nan
    row0 = tuple(slice(None) if i in axes else 0 for i in range(len(shape)))
    t = _normal(_out_shape(name, shape, axis), seed=14)

    def g(v):
        return jnp.sum(_call(name, v, axis) * t)

    out, out_clean = np.asarray(_call(name, x_nan, axis)), np.asarray(_call(name, x, axis))
    grad_fn = fast_jit(jax.grad(g))  # NaN or not, and equality: helpers.fast_jit suffices
    grad, grad_clean = np.asarray(grad_fn(x_nan)), np.asarray(grad_fn(x))
    bad_out = np.zeros(out.shape, bool)
    bad_out[row0 if name != "logsumexp" else
            tuple(0 for i in range(len(shape)) if i not in axes)] = True
    bad_in = np.zeros(x.shape, bool)
    bad_in[row0] = True
    assert np.all(np.isnan(out[bad_out]))
    np.testing.assert_array_equal(out[~bad_out], out_clean[~bad_out])
    assert np.all(np.isnan(grad[bad_in]))
    np.testing.assert_array_equal(grad[~bad_in], grad_clean[~bad_in])
    for jac in (jax.jacfwd, jax.jacrev):
        j = np.asarray(fast_jit(jac(lambda v: _call(name, v, axis)))(x_nan))
        j = j.reshape(out.size, x.size)
        # d(other rows) / d(other rows) is NaN-free. (d(other rows) / d(NaN row) is 0 * NaN:
        # the NaN row's gradient is NaN, as it must be.)
        assert not np.any(np.isnan(j[np.ix_(~bad_out.reshape(-1), ~bad_in.reshape(-1))]))


def test_empty_reduction_axis():
    x = jnp.zeros((3, 0))
    lse = jaxlse.logsumexp(x, axis=1)
    assert lse.shape == (3,) and lse.dtype == F32
    np.testing.assert_array_equal(lse, [-INF] * 3)
    assert float(jaxlse.logsumexp(jnp.zeros((0,)))) == -INF
    np.testing.assert_array_equal(jaxlse.logsumexp(x, axis=1, keepdims=True), [[-INF]] * 3)
    for name in ("log_softmax", "softmax"):
        out = _fn(name)(x)
        assert out.shape == (3, 0) and out.dtype == F32
        assert jax.grad(lambda v, n=name: jnp.sum(_fn(n)(v)))(x).shape == (3, 0)
    assert jax.grad(lambda v: jnp.sum(jaxlse.logsumexp(v, axis=1)))(x).shape == (3, 0)
    # Empty non-reduced axes: nothing to compute.
    assert jaxlse.logsumexp(jnp.zeros((0, 5)), axis=1).shape == (0,)
    assert jaxlse.softmax(jnp.zeros((0, 5))).shape == (0, 5)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", NAMES)
def test_rows_of_one_entry(name, jit):
    """A reduction over a single entry follows the same rules as a longer one (XLA turns such
    a reduce into a reshape and drops its initial value, which made -inf rows NaN): [-inf] and
    a fully masked row give -inf / -inf / 0 with zero gradients, as in jax.nn.softmax's empty
    mask test applied to rows of length 1."""
    x = jnp.asarray([[3.0], [-INF], [INF], [2.0]])
    w = jnp.asarray([[True], [True], [True], [False]])

    def f(v):
        return _call(name, v, 1, where=w)

    f = jax.jit(f) if jit else f
    want = {
        "logsumexp": [3.0, -INF, INF, -INF],
        "log_softmax": [[0.0], [-INF], [0.0], [-INF]],
        "softmax": [[1.0], [0.0], [1.0], [0.0]],
    }[name]
    np.testing.assert_array_equal(f(x), np.asarray(want, np.float32))
    for jac in (jax.jacfwd, jax.jacrev):
        j = np.asarray(jac(f)(x))
        assert np.all(np.isfinite(j)), (name, jac)
    # the same over several axes of size 1, and for a scalar
    x3 = jnp.full((1, 1, 3), -INF)
    out3 = _call(name, x3, (0, 1))
    np.testing.assert_array_equal(out3, _call(name, x3.reshape(3, 1), 1).reshape(out3.shape))
    if name == "logsumexp":
        assert float(jaxlse.logsumexp(-INF)) == -INF
        chex.assert_trees_all_equal(jaxlse.logsumexp(jnp.asarray([-INF]), return_sign=True),
                                    (jnp.asarray(-INF), jnp.asarray(0.0)))
        assert float(jaxlse.logsumexp(jnp.asarray([-INF]), b=jnp.asarray([2.0]))) == -INF


@pytest.mark.parametrize("name", NAMES)
def test_numpy_bfloat16_input(name):
    """numpy arrays of bfloat16 (dtype kind "V" in numpy) are accepted, as by jax.nn."""
    x = np.asarray([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], dtype=jnp.bfloat16)
    out = _call(name, x, -1)
    assert out.dtype == BF16
    chex.assert_trees_all_equal(out, _call(name, jnp.asarray(x), -1))
    if name == "logsumexp":
        chex.assert_trees_all_equal(jaxlse.logsumexp(x, b=x), jaxlse.logsumexp(x, b=jnp.asarray(x)))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_debug_nans_does_not_fire_on_clean_input(jit):
    """With jax.debug_nans on, clean inputs raise nothing, also op by op (disable_jit): no NaN
    constant is made where no result is NaN (jax.nn.logsumexp's `b` path takes the same care)."""
    x = jnp.asarray([[2.0, 5.0, 3.0], [-INF, -INF, -INF]])
    w = jnp.asarray([[True, False, True], [True, True, True]])
    y = jnp.asarray([1, 2])

    def run():
        jaxlse.logsumexp(1.0, b=1.0)
        jax.grad(lambda v: jnp.sum(jaxlse.logsumexp(v, axis=1, b=jnp.ones_like(v))[:1]))(x)
        for name in NAMES:
            jax.grad(lambda v, n=name: jnp.sum(_call(n, v, -1, where=w)[:1]))(x)
        logits = x[:1].repeat(2, 0)
        jax.grad(lambda v: jaxlse.cross_entropy(v, y, label_smoothing=0.1, z_loss=0.1))(logits)
        jax.grad(lambda v: jaxlse.nll_loss(v, y))(jaxlse.log_softmax(logits))

    with jax.debug_nans(True):
        if jit:
            run()
        else:
            with jax.disable_jit():
                run()


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ([INF, 2.0], [1.0, float("nan")], (float("nan"), float("nan"))),
        ([INF, INF], [1.0, -1.0], (float("nan"), float("nan"))),
        ([INF, 1.0], [1.0, -INF], (float("nan"), float("nan"))),
        ([INF, 1.0], [-2.0, 1.0], (INF, -1.0)),
        ([INF, INF], [2.0, -1.0], (INF, 1.0)),
    ],
    ids=str,
)
def test_logsumexp_b_in_pos_inf_rows(a, b, want):
    """A +inf row is +inf with the sign of its b-weighted sum; NaN (value and sign) where that
    sum is undefined (b of both signs cancelling at the +inf entries, or a NaN b), as in
    jax.nn, never a value that contradicts its sign."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    chex.assert_trees_all_equal(jaxlse.logsumexp(a, b=b, return_sign=True),
                                tuple(jnp.asarray(v, F32) for v in want))


# --------------------------------------------------------------------------------------------
# 5. Accuracy in ulps against a float64 reference


def accuracy_input(dist: str, shape: tuple[int, ...], dtype=F32, seed: int = 0) -> np.ndarray:
    """Seeded input of ``shape`` drawn from ``DISTRIBUTIONS[dist]``, rounded to ``dtype``."""
    return DISTRIBUTIONS[dist](np.random.default_rng(seed), shape).astype(dtype)


@functools.cache
def _jitted(name: str, axis=-1) -> Callable[[jax.Array], jax.Array]:
    return jax.jit(lambda v: _fn(name)(v, axis=axis))


def lse_ulp_error(out, x: np.ndarray, axis=-1) -> np.ndarray:
    """logsumexp error in ulps of max(|result|, max|input|) over the row."""
    ref = ref_logsumexp(x, axis)
    scale = np.maximum(np.abs(ref), np.max(np.abs(x.astype(np.float64)), axis=axis))
    return ulp_error(out, ref, scale)


def log_softmax_ulp_error(out, x: np.ndarray, axis=-1) -> np.ndarray:
    """log_softmax error in ulps of its own value (subnormal results included)."""
    return ulp_error(out, ref_log_softmax(x, axis))


def softmax_error_ratio(out, x: np.ndarray, axis=-1, where=None) -> np.ndarray:
    r"""float32 softmax error over the bound of its docstring, (|x_i - m| + 3) 2^-24 y_i + 2 ulp.

    ``m`` is the row max (over ``where``). Values below float32's smallest normal number may be
    flushed to 0, so there the bound is that number instead. A ratio <= 1 meets the bound.
    """
    xf = x.astype(np.float64)
    ref = ref_softmax(x, axis, where)
    xin = xf if where is None else np.where(where, xf, -np.inf)
    z = np.abs(xf - np.max(xin, axis=axis, keepdims=True))
    bound = (z + 3) * 2.0**-24 * ref + 2 * ulp(ref, np.float32)
    bound = np.where(ref < TINY32, TINY32, bound)
    return np.abs(np.asarray(out, np.float64) - ref) / bound


@pytest.mark.parametrize("n", [1000, 32768])
@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
def test_accuracy_float32(dist, n):
    x = accuracy_input(dist, (8, n), seed=n)
    xj = jnp.asarray(x)
    lse_err = lse_ulp_error(_jitted("logsumexp")(xj), x)
    assert lse_err.max() <= ULP_BOUND[F32], lse_err.max()
    ls_err = log_softmax_ulp_error(_jitted("log_softmax")(xj), x)
    assert ls_err.max() <= ULP_BOUND[F32], ls_err.max()
    sm_ratio = softmax_error_ratio(_jitted("softmax")(xj), x)
    assert sm_ratio.max() <= 1.0, sm_ratio.max()


def _dominated_batch(rows: int, n: int, dominated: int, seed: int) -> np.ndarray:
    """Normal logits with ``dominated`` rows (spread over the batch) whose max is 12 above."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n))
    which = rng.choice(rows, dominated, replace=False)
    x[which, rng.integers(0, n, dominated)] += 12.0
    return x.astype(np.float32)


@jax.jit
@functools.partial(jax.value_and_grad, has_aux=True)
def _log_softmax_value_and_grad(v: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``sum(log_softmax(v) * t)`` (and ``log_softmax(v)`` from the custom rule) with its
    gradient; module level, so tests with the same shapes share one compilation."""
    out = jaxlse.log_softmax(v)
    return jnp.sum(out * t), out


# (rows, dominated): the exact pass sums the rows that need it one at a time when they are at
# most 1/8 of the batch (37 // 8 = 4 here) and the batch has 2**17 entries or more, and reads
# every row otherwise; row counts that 8 does not divide, and batches of fewer than 8 rows,
# which never loop.
FEW_ROWS_CASES = [(37, 1), (37, 4), (37, 5), (37, 37), (8, 1), (7, 1)]


@pytest.mark.parametrize(("rows", "dominated"), FEW_ROWS_CASES, ids=str)
@pytest.mark.parametrize("n", [300, 28400])
def test_log_softmax_exact_pass_some_rows(rows, dominated, n):
    """Dominated rows (tiny log-probability at the max) are exact whichever way the exact pass
    reads them (one at a time or all rows), as are the others; in the forward pass, in the
    custom JVP rule (value_and_grad's value), with a leading batch axis and one row at a
    time."""
    x = _dominated_batch(rows, n, dominated, seed=rows + dominated)
    ref = ref_log_softmax(x)
    # The three-way choice (no row, a few rows, every row) exists from 8 rows and 2**17 entries
    # on (_rowstats._FEW_MIN_SIZE): with n = 300 every row is read, with n = 28400 a few may be.
    few = rows >= 8 and x.size >= _rowstats._FEW_MIN_SIZE
    assert (3 in cond_branches(jaxlse.log_softmax, x)) == few
    out = jax.jit(jaxlse.log_softmax)(jnp.asarray(x))
    err = ulp_error(out, ref)
    assert err.max() <= ULP_BOUND[F32], err.max()
    t = jnp.asarray(np.random.default_rng(rows).standard_normal(x.shape), F32)
    (_, out_rule), grad = _log_softmax_value_and_grad(jnp.asarray(x), t)
    assert ulp_error(out_rule, ref).max() <= ULP_BOUND[F32]
    want = t - np.exp(ref) * np.sum(np.asarray(t, np.float64), axis=-1, keepdims=True)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)
    x3 = x.reshape(1, rows, n)
    out3 = jax.jit(jaxlse.log_softmax)(jnp.asarray(x3))
    assert ulp_error(out3[0], ref).max() <= ULP_BOUND[F32]
    for i in (0, rows - 1):
        one = jaxlse.log_softmax(jnp.asarray(x[i : i + 1]))
        assert ulp_error(one, ref_log_softmax(x[i : i + 1])).max() <= ULP_BOUND[F32]


def _coherent_rounding_value(m: float) -> np.float32:
    """A float32 ``v`` in (0.1, 0.9) whose ``v - m`` (float32) is rounded the most."""
    v = np.linspace(0.1, 0.9, 801).astype(np.float32)
    err = np.abs((v.astype(np.float64) - m) - (v - np.float32(m)).astype(np.float64))
    return v[np.argmax(err)]


@pytest.mark.parametrize("dominated", [3, 20])
def test_log_softmax_dominated_rows_among_many_get_the_corrected_sum(dominated):
    """When most rows need the exact pass (4 * normal logits), the dominated ones among them
    (``S < 1 + 2**-8``) still get their terms' rounding corrected: rows ``[40, v, ..., v]``,
    whose every ``v - 40`` is rounded the same way (17 ulp of the tiny result if left
    uncorrected). A few such rows (3 of 64) and many (20 of 64); forward pass and rule."""
    rows, n, m = 64, 1000, 40.0
    x = 4 * np.random.default_rng(dominated).standard_normal((rows, n))
    x[:dominated] = _coherent_rounding_value(m)
    x[:dominated, 0] = m
    x = x.astype(np.float32)
    ref = ref_log_softmax(x)
    assert np.mean(np.exp(ref[dominated:]).max(axis=-1) > 1 / 8) > 0.9  # most rows: S < 8
    out = jax.jit(jaxlse.log_softmax)(jnp.asarray(x))
    # The bound is the promised one (4 ulp); it still guards the correction, whose absence
    # gives 17 ulp at the dominant entries. (Measured with the correction: 1.04 ulp with jax
    # 0.10.2, 2.04 with 0.12.0.1, whose XLA sums the terms in another order.)
    assert ulp_error(out[:dominated, 0], ref[:dominated, 0]).max() <= ULP_BOUND[F32]
    assert ulp_error(out, ref).max() <= ULP_BOUND[F32]
    t = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), F32)
    (_, out_rule), _ = _log_softmax_value_and_grad(jnp.asarray(x), t)
    assert ulp_error(out_rule[:dominated, 0], ref[:dominated, 0]).max() <= ULP_BOUND[F32]


# Shapes with axes of size 1 and reduced axes that are not trailing: the single-row and
# (rows, n) paths of the sums must recognise which axes are rows.
UNIT_AXIS_CASES = [
    ((1, 40, 5), (0, 1)),
    ((1, 40, 5), (1,)),
    ((1, 40, 5), (0, 2)),
    ((40, 1, 1), 0),
    ((1, 40), None),
    ((3, 1, 40), (1, 2)),
    ((1, 1, 40), -1),
]


@pytest.mark.parametrize("name", NAMES)
def test_axes_of_size_one_match_jax_nn(name):
    """Every case of UNIT_AXIS_CASES against jax.nn, in one program (helpers.fast_jit: compared
    with tolerances), each case checked and named on its own."""
    xs = [_normal(shape, seed=11) for shape, _ in UNIT_AXIS_CASES]

    @fast_jit
    def every_case(xs):
        return [(_call(name, x, axis), getattr(jax.nn, name)(x, axis=axis))
                for x, (_, axis) in zip(xs, UNIT_AXIS_CASES, strict=True)]

    cases = Cases()
    for (shape, axis), (got, want) in zip(UNIT_AXIS_CASES, every_case(xs), strict=True):
        with cases.case(f"{name}-{shape}-{axis}"):
            assert got.shape == want.shape
            chex.assert_trees_all_close(got, want, **TOL[F32])
    cases.assert_all_passed(expected=len(UNIT_AXIS_CASES))


LAYOUTS = {
    "rows": lambda x: x,
    "one_row_at_a_time": None,
    "batches_of_one_row": "split",
    "leading_axis_of_1": lambda x: x.reshape((1,) + x.shape),
    "batch_of_batches": lambda x: x.reshape((2, -1) + x.shape[1:]),
}


@pytest.mark.parametrize("n", [1000, 8192, 8193, 32768])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_log_softmax_accuracy_in_any_layout(layout, n):
    """Rows dominated by 12 (L = log1p(t) with t from 0.02 to 2, a sum of every term) are
    within the bound however the batch is laid out: XLA:CPU sums a (1, n) batch, or a batch
    with a leading axis of size 1, in an order several ulp less accurate than a plain (N, V)
    batch (measured 12 ulp for a (1, 8192) batch), which jaxlse avoids by summing such
    batches as (rows, n) matrices and a single row in parts."""
    x = _dominated_batch(64, n, 64, seed=n)
    ref = ref_log_softmax(x)
    f = jax.jit(jaxlse.log_softmax)
    if LAYOUTS[layout] is None:
        out = np.stack([np.asarray(f(jnp.asarray(row))) for row in x])
    elif LAYOUTS[layout] == "split":
        out = np.concatenate([np.asarray(f(jnp.asarray(x[i : i + 1]))) for i in range(len(x))])
    else:
        out = np.asarray(f(jnp.asarray(LAYOUTS[layout](x)))).reshape(x.shape)
    err = ulp_error(out, ref)
    assert err.max() <= ULP_BOUND[F32], err.max()


TIE_ROWS = [
    [3.0, 3.0, 1.0],  # two max entries: S = 2 + e^-2 < 8, so the exact pass counts them
    [0.0, 0.0, 0.0, 0.0, 0.0],  # all equal: -log 5
    [2.0, 2.0, 2.0, -30.0],  # three ties and a tiny term
    [1.0, 1.0 - 1e-6, -3.0],  # a near tie (not a tie)
    [np.inf, np.inf, 1.0],  # two +inf: -log 2 at each
]


@pytest.mark.parametrize("row", TIE_ROWS, ids=str)
def test_log_softmax_ties_in_exact_pass(row):
    x = np.asarray([row, [5.0, -10.0, -20.0][: len(row)] + [-40.0] * (len(row) - 3)],
                   np.float32)
    out = np.asarray(jax.jit(jaxlse.log_softmax)(jnp.asarray(x)))
    ref = ref_log_softmax(x)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(out), finite)
    assert ulp_error(out[finite], ref[finite]).max() <= ULP_BOUND[F32], (out, ref)


def test_log_softmax_dominant_entry_float32():
    """The dominant entry's log-probability (about -1e-9 here) is accurate to a few ulp."""
    x = accuracy_input("dominant_30", (8, 1000), seed=1)
    out = np.asarray(_jitted("log_softmax")(jnp.asarray(x)))
    top = np.argmax(x, axis=-1)[:, None]
    got, ref = np.take_along_axis(out, top, -1), np.take_along_axis(ref_log_softmax(x), top, -1)
    assert np.all((-1e-8 < ref) & (ref < -1e-10))
    assert np.all(ulp_error(got, ref) <= ULP_BOUND[F32]), (got, ref)


SUBNORMAL_ROWS = [
    [0.0, -88.08],  # exp(-88.08) = 5.6e-39, just below float32's smallest normal
    [0.0, -95.0, -96.0, -200.0],  # 7.6e-42: a few thousand subnormal units
    [-3.0, -92.5, -100.0, -103.0],  # terms themselves subnormal (flushed if summed unscaled)
    [7.0, -97.0, 7.0 - 88.5, 7.0 - 90.0],  # the max is not 0
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("row", SUBNORMAL_ROWS, ids=str)
def test_log_softmax_subnormal_result(row, dtype):
    """A dominant entry whose log-probability is subnormal (below 1.2e-38) gets it to an ulp,
    not 0: XLA:CPU flushes subnormal arithmetic results, so jaxlse sums the other terms scaled
    by 2**92 and assembles the result from its bits. jax.nn returns 0 (or -0)."""
    x = np.asarray([row]).astype(dtype)
    out = np.asarray(jax.jit(jaxlse.log_softmax)(jnp.asarray(x)))
    ref = ref_log_softmax(x)
    top = int(np.argmax(x[0].astype(np.float64)))
    assert 0 < -ref[0, top] < TINY32
    assert out.dtype == dtype
    err = ulp_error(out, ref)
    assert err.max() <= ULP_BOUND[dtype], (out, ref)
    if dtype == F32:  # large enough in float32 subnormal units that 0 would fail by far
        assert out[0, top] < 0


@pytest.mark.parametrize("n", [1000, 32768, 65539])
@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_accuracy_low_precision(dtype, dist, n):
    """float16 / bfloat16: within one ulp (of the dtype) of the exact answer for the cast inputs.

    (Rows of 65539 entries near 1e4 overflow jax.nn's float16 sum; jaxlse sums in float32.)
    """
    x = accuracy_input(dist, (4, n), dtype=dtype, seed=n)
    xj = jnp.asarray(x)
    # bfloat16 shares float32's exponent range: softmax values below float32's smallest normal
    # number may be flushed to 0 (log_softmax returns subnormal results exactly).
    sm_ref = ref_softmax(x)
    slack = {
        "logsumexp": 0.0,
        "log_softmax": 0.0,
        "softmax": np.where(sm_ref < TINY32, TINY32, 0.0) if dtype == BF16 else 0.0,
    }
    for name, ref in [("logsumexp", ref_logsumexp(x)), ("log_softmax", ref_log_softmax(x)),
                      ("softmax", sm_ref)]:
        out = _jitted(name)(xj)
        assert out.dtype == dtype
        err = ulp_error(out, ref) - slack[name] / ulp(ref, dtype)
        assert err.max() <= ULP_BOUND[dtype], (name, err.max())


@pytest.mark.parametrize("n", [100, 1000, 32768])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_low_precision_log_softmax_accurate_at_every_dominance(dtype, n):
    """16-bit log_softmax takes the exact pass only for rows dominated enough that float32's
    log(S) would not do (L below 2**(p - 17)); every row is still within one ulp, swept over a
    fine grid of dominance from 0 to 40 (S from n down to 1 + 1e-17), in the forward pass and
    in the custom JVP rule."""
    rng = np.random.default_rng(n)
    lift = np.linspace(0.0, 40.0, 161)
    x = rng.standard_normal((lift.size, n))
    x[np.arange(lift.size), rng.integers(0, n, lift.size)] = x.max(axis=1) + lift
    x = x.astype(dtype)
    ref = ref_log_softmax(x)
    out = jax.jit(jaxlse.log_softmax)(jnp.asarray(x))
    assert ulp_error(out, ref).max() <= ULP_BOUND[dtype]
    out_rule, _ = jax.jit(jax.jvp, static_argnums=0)(
        jaxlse.log_softmax, (jnp.asarray(x),), (jnp.zeros_like(x),)
    )
    assert ulp_error(out_rule, ref).max() <= ULP_BOUND[dtype]


# Long rows take the library's blocked path (rows > 32768); tuple axes flatten to one row.
LONG_ROWS = [
    ((2, 32769), -1),
    ((2, 40000), -1),
    ((2, 65536), -1),
    ((2, 65539), -1),
    ((2, 131072), -1),
    ((2, 200, 200), (1, 2)),
    ((2, 256, 257), (-1, -2)),
    ((40000, 2), 0),
]


@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
@pytest.mark.parametrize(("shape", "axis"), LONG_ROWS, ids=str)
def test_accuracy_long_rows_float32(shape, axis, dist):
    x = accuracy_input(dist, shape, seed=len(shape))
    xj = jnp.asarray(x)
    assert lse_ulp_error(_jitted("logsumexp", axis)(xj), x, axis).max() <= ULP_BOUND[F32]
    ls_err = log_softmax_ulp_error(_jitted("log_softmax", axis)(xj), x, axis)
    assert ls_err.max() <= ULP_BOUND[F32], ls_err.max()
    assert softmax_error_ratio(_jitted("softmax", axis)(xj), x, axis).max() <= 1.0


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "where"])
@pytest.mark.parametrize("n", [40000, 65539])
def test_long_rows_gradient_where_and_b(n, masked):
    """The blocked path with ``where`` and ``b``, and its gradient (the softmax)."""
    rng = np.random.default_rng(15)
    x = accuracy_input("normal_x10", (2, n), seed=15)
    w = rng.random((2, n)) < 0.5 if masked else None
    b = rng.uniform(0.0, 2.0, (2, n)).astype(np.float32)
    wj = None if w is None else jnp.asarray(w)

    def lse(v, bb):
        return jaxlse.logsumexp(v, axis=-1, b=bb, where=wj)

    scale = np.max(np.abs(x), axis=-1)
    for bb in (None, b):
        ref = ref_logsumexp(x, -1, b=bb, where=w)
        out = jax.jit(lse)(jnp.asarray(x), bb)
        assert ulp_error(out, ref, np.maximum(np.abs(ref), scale)).max() <= ULP_BOUND[F32]
    grad = jax.jit(jax.grad(lambda v: jnp.sum(lse(v, None))))(jnp.asarray(x))
    assert softmax_error_ratio(grad, x, -1, w).max() <= 1.0


# --------------------------------------------------------------------------------------------
# 6. Memory


MEM_N, MEM_V = 512, 4096
ARRAY_BYTES = MEM_N * MEM_V * 4  # one (N, V) float32 array
ROW_BYTES = MEM_N * 4  # one float32 value per row


def _temp_bytes(f, *args) -> int:
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _mem_args():
    return jnp.zeros((MEM_N, MEM_V), F32), jnp.zeros((MEM_N, MEM_V), F32)


LOG_SOFTMAX_LOSSES = {
    "sum(out * t)": lambda v, tt: jnp.sum(jaxlse.log_softmax(v) * tt),
    "sum(out)": lambda v, tt: jnp.sum(jaxlse.log_softmax(v)),
    "mean(sum(out * t, -1))": lambda v, tt: jnp.mean(jnp.sum(jaxlse.log_softmax(v) * tt, -1)),
    "-mean(out[:, 3])": lambda v, tt: -jnp.mean(jaxlse.log_softmax(v)[:, 3]),
}


@pytest.mark.parametrize("loss", list(LOG_SOFTMAX_LOSSES))
def test_memory_log_softmax_value_and_grad(loss):
    """The gradient of a log_softmax loss keeps no (N, V) temporary: well under one array.

    Measured at (512, 4096) float32: at most 0.003 arrays (jax.nn: 1.0). The rule rebuilds the
    softmax from x and per-row statistics instead of keeping the output.
    """
    x, t = _mem_args()
    f = jax.value_and_grad(LOG_SOFTMAX_LOSSES[loss])
    temp = _temp_bytes(f, x, t)
    assert temp < 0.05 * ARRAY_BYTES, temp / ARRAY_BYTES


def test_memory_log_softmax_reference_keeps_output():
    """The measurement can tell the two apart: jax.nn keeps its whole output (1.0 array)."""
    x, t = _mem_args()
    f = jax.value_and_grad(lambda v, tt: jnp.sum(jax.nn.log_softmax(v) * tt))
    assert _temp_bytes(f, x, t) >= ARRAY_BYTES


def test_memory_logsumexp_and_softmax():
    """Measured at (512, 4096): logsumexp 27,248 B forward and 31,280 B value_and_grad (about
    15 per-row vectors: the statistics of its exact pass, which keeps a result near a zero row
    max accurate; 0.004 of the input); softmax forward 2,048 B, value_and_grad 1.0005 arrays
    (the output y, which its rule keeps; jax.nn's softmax gradient keeps 2.0 arrays)."""
    x, t = _mem_args()
    r = jnp.zeros((MEM_N,), F32)
    assert _temp_bytes(lambda v: jaxlse.logsumexp(v, axis=-1), x) <= 16 * ROW_BYTES
    f = jax.value_and_grad(lambda v, rr: jnp.sum(jaxlse.logsumexp(v, axis=-1) * rr))
    assert _temp_bytes(f, x, r) <= 16 * ROW_BYTES
    assert _temp_bytes(lambda v: jaxlse.softmax(v), x) <= 4 * ROW_BYTES
    f = jax.value_and_grad(lambda v, tt: jnp.sum(jaxlse.softmax(v) * tt))
    assert _temp_bytes(f, x, t) <= ARRAY_BYTES + 4 * ROW_BYTES


# --------------------------------------------------------------------------------------------
# 7. Bad arguments


def _first_arg(name: str) -> str:
    return "a" if name == "logsumexp" else "x"


X24 = np.zeros((2, 4), np.float32)

BAD_INPUTS = [
    ("list_of_str", ["spam", "eggs"], TypeError, "must be a numeric array"),
    ("array_of_str", np.asarray(["spam", "eggs"]), TypeError, "must be a numeric array"),
    ("str", "spam", TypeError, "must be a numeric array"),
    ("complex", np.ones(3, np.complex64), TypeError, "must be real"),
    ("none", None, TypeError, "must be a numeric array"),
]


@pytest.mark.parametrize(
    ("case", "value", "exc", "what"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
@pytest.mark.parametrize("name", NAMES)
def test_bad_input(name, case, value, exc, what):
    with pytest.raises(exc, match=rf"^{name}: `{_first_arg(name)}` {what}"):
        _fn(name)(value)


BAD_OPTIONS = [
    ("axis_too_big", {"axis": 2}, ValueError, "axis", "out of range"),
    ("axis_too_small", {"axis": -3}, ValueError, "axis", "out of range"),
    ("axis_repeated", {"axis": (0, -2)}, ValueError, "axis", "repeated"),
    ("axis_float", {"axis": 1.0}, TypeError, "axis", "must be an int"),
    ("axis_str", {"axis": "1"}, TypeError, "axis", "must be an int"),
    ("axis_tuple_float", {"axis": (0, 1.5)}, TypeError, "axis", "must be an int"),
    ("where_shape", {"where": np.ones(3, bool)}, ValueError, "where", "does not broadcast"),
    ("where_other", {"where": np.ones((3, 4), bool)}, ValueError, "where", "does not broad"),
    ("where_str", {"where": ["spam", "eggs"]}, TypeError, "where", "must be a boolean"),
]
BAD_B = [
    ("b_shape", {"b": np.ones(3, np.float32)}, ValueError, "b", "does not broadcast"),
    ("b_other", {"b": np.ones((2, 1, 3), np.float32)}, ValueError, "b", "does not broadcast"),
    ("b_str", {"b": ["spam", "eggs"]}, TypeError, "b", "must be a numeric array"),
    ("b_complex", {"b": np.ones(4, np.complex64)}, TypeError, "b", "must be real"),
]


def _bad_option_cases():
    for name in NAMES:
        for case in BAD_OPTIONS + (BAD_B if name == "logsumexp" else []):
            yield pytest.param(name, *case[1:], id=f"{name}-{case[0]}")


@pytest.mark.parametrize(
    ("name", "kwargs", "exc", "arg", "what"), list(_bad_option_cases())
)
def test_bad_options(name, kwargs, exc, arg, what):
    pattern = rf"^{name}: `{arg}`.*{what}"
    with pytest.raises(exc, match=pattern):
        _fn(name)(X24, **kwargs)
    # The same error at trace time under jit (array-valued arguments are traced).
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    with pytest.raises(exc, match=pattern):
        jax.jit(lambda v, kw: _fn(name)(v, **kw, **static))(X24, arrays)


# (input shape, where shape, b shape): b and where broadcast with the input, as in jax.nn, and
# the result has the common shape.
BROADCAST_CASES = [
    ((3,), (2, 3), None),
    ((2, 1, 4), (3, 4), None),
    ((4, 1, 2, 1), None, (3, 1, 5)),
    ((3,), (2, 3), (4, 1, 1)),
]


@pytest.mark.parametrize(("x_shape", "w_shape", "b_shape"), BROADCAST_CASES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_b_and_where_broadcast_with_the_input_as_in_jax_nn(name, x_shape, w_shape, b_shape):
    if b_shape is not None and name != "logsumexp":
        pytest.skip("only logsumexp takes b")
    rng = np.random.default_rng(len(x_shape))
    x = jnp.asarray(rng.standard_normal(x_shape), F32)
    kw = {}
    if w_shape is not None:
        w = rng.random(w_shape) < 0.7
        w[..., 0] = True
        kw["where"] = jnp.asarray(w)
    if b_shape is not None:
        kw["b"] = jnp.asarray(rng.random(b_shape) + 0.5, F32)
    # The reference is jax.nn on explicitly broadcast arguments (its own broadcasting of a
    # larger mask in log_softmax is wrong in jax 0.10, and the tests forbid rank promotion).
    shape = np.broadcast_shapes(x_shape, *(v.shape for v in kw.values()))
    keep = kw.get("where", True) if name != "logsumexp" else True

    def total(v, kw, broadcast):
        out = _fn(name)(jnp.broadcast_to(v, shape) if broadcast else v, **kw)
        return jnp.sum(jnp.where(keep, out, 0.0))

    @fast_jit  # one program for the case (compared with tolerances)
    def run(x, kw):
        full = {k: jnp.broadcast_to(v, shape) for k, v in kw.items()}
        values = [(_fn(name)(x, axis=axis, **kw),
                   getattr(jax.nn, name)(jnp.broadcast_to(x, shape), axis=axis, **full))
                  for axis in (-1, None)]
        grads = [jax.grad(total)(x, kw, broadcast) for broadcast in (False, True)]
        return values, grads

    values, (got_grad, want_grad) = run(x, kw)
    for got, want in values:
        assert got.shape == want.shape
        chex.assert_trees_all_close(got, want, **TOL[F32])
    # The gradient sums over the broadcast copies, as for an explicit broadcast.
    chex.assert_trees_all_close(got_grad, want_grad, **TOL[F32])
    assert np.all(np.isfinite(got_grad))


# --------------------------------------------------------------------------------------------
# 8. The worked example


def test_worked_example():
    logits = jnp.asarray([[2.0, 5.0, 3.0], [1.0, 2.0, 7.0], [6.0, 3.0, 1.0], [4.0, 3.0, 3.0]])
    out = jaxlse.log_softmax(logits)
    np.testing.assert_array_equal(np.round(np.asarray(out[0], np.float64), 4),
                                  [-3.1698, -0.1698, -2.1698])
    assert np.all(ulp_error(out, ref_log_softmax(np.asarray(logits))) <= ULP_BOUND[F32])
    chex.assert_trees_all_close(jnp.exp(out), jaxlse.softmax(logits), **TOL[F32])
    chex.assert_trees_all_close(logits - jaxlse.logsumexp(logits, axis=-1, keepdims=True), out,
                                **TOL[F32])


# --------------------------------------------------------------------------------------------
# 9. Properties, dtype policy, retracing

PROPERTY_SETTINGS = settings(max_examples=40, derandomize=True, deadline=None, database=None)

# Rows of float32 values on a grid of 2**-10 in [-1024, 1024], so x + c is exact for |c| <= 1024.
GRID = 2.0**-10
rows = hnp.arrays(
    np.float32,
    st.sampled_from([(1,), (7,), (3, 16), (2, 3, 33)]),
    elements=st.integers(-(2**20), 2**20).map(lambda k: np.float32(k * GRID)),
)
wide_rows = hnp.arrays(
    np.float32,
    st.sampled_from([(5,), (3, 16), (2, 33)]),
    elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False),
)


@PROPERTY_SETTINGS
@given(x=rows, c=st.integers(-1024, 1024))
def test_property_shift_invariance(x, c):
    lse, lse_shifted = jaxlse.logsumexp(x, axis=-1), jaxlse.logsumexp(x + np.float32(c), axis=-1)
    # Each is within ULP_BOUND ulp of exact (at its scale), and the exact values differ by c.
    scale = np.max(np.abs(x), axis=-1)
    tol = ULP_BOUND[F32] * (ulp(np.maximum(np.abs(lse), scale), np.float32)
                            + ulp(np.maximum(np.abs(lse_shifted), scale + abs(c)), np.float32))
    diff = np.asarray(lse_shifted, np.float64) - (np.asarray(lse, np.float64) + c)
    assert np.all(np.abs(diff) <= tol)


@PROPERTY_SETTINGS
@given(x=wide_rows)
def test_property_softmax_sums_to_one(x):
    y = np.asarray(jaxlse.softmax(x), np.float64)
    ref = ref_softmax(x)
    z = np.abs(x.astype(np.float64) - np.max(x, -1, keepdims=True))
    tol = np.sum((z + 3) * 2.0**-24 * ref + 2 * ulp(ref, np.float32), axis=-1)
    assert np.all(np.abs(np.sum(y, -1) - 1.0) <= tol)


@PROPERTY_SETTINGS
@given(x=wide_rows)
def test_property_logsumexp_of_log_softmax_is_zero(x):
    ls = jaxlse.log_softmax(x)
    out = np.asarray(jaxlse.logsumexp(ls, axis=-1), np.float64)
    ref_ls, p = ref_log_softmax(x), ref_softmax(x)
    n = x.shape[-1]
    # ls_i carries up to ULP_BOUND ulp of error, weighted by p_i; logsumexp adds a few ulp of its
    # largest term (|max ls| <= log n).
    tol = ULP_BOUND[F32] * (np.sum(p * ulp(ref_ls, np.float32), -1)
                            + ulp(max(1.0, math.log(n)), np.float32))
    assert np.all(np.abs(out) <= tol)


@PROPERTY_SETTINGS
@given(x=wide_rows)
def test_property_logsumexp_bounds(x):
    lse = np.asarray(jaxlse.logsumexp(x, axis=-1))
    m = np.max(x, axis=-1)
    assert np.all(lse >= m)
    assert np.all(lse <= (m + np.float32(math.log(x.shape[-1]))) + ulp(m, np.float32))


@PROPERTY_SETTINGS
@given(x=wide_rows, axis=st.sampled_from([-1, 0, None]))
def test_property_matches_float64_reference(x, axis):
    lse = jaxlse.logsumexp(x, axis=axis)
    assert np.all(lse_ulp_error(lse, x, axis) <= ULP_BOUND[F32])
    if axis is not None:
        assert np.all(log_softmax_ulp_error(jaxlse.log_softmax(x, axis), x, axis)
                      <= ULP_BOUND[F32])
        assert np.all(softmax_error_ratio(jaxlse.softmax(x, axis), x, axis) <= 1.0)


DTYPE_POLICY = [
    (np.int32, F32),
    (np.int8, F32),
    (np.uint8, F32),
    (np.bool_, F32),
    (F16, F16),
    (BF16, BF16),
    (F32, F32),
]


@pytest.mark.parametrize(("in_dtype", "out_dtype"), DTYPE_POLICY, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_dtype_policy(name, in_dtype, out_dtype):
    x = jnp.asarray(np.arange(-3, 3).reshape(2, 3).astype(in_dtype))
    out = _call(name, x, -1)
    assert out.dtype == out_dtype
    chex.assert_trees_all_close(out, _call(name, x.astype(F32), -1).astype(out_dtype),
                                strict=True)
    if name == "logsumexp":
        result, sign = jaxlse.logsumexp(x, axis=-1, b=x, return_sign=True)
        assert result.dtype == sign.dtype == out_dtype


@pytest.mark.parametrize("in_dtype", [np.int64, np.int32, np.bool_, F64], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_dtype_policy_x64(x64, name, in_dtype):
    x = jnp.asarray(np.arange(-3, 3).reshape(2, 3).astype(in_dtype))
    out = _call(name, x, -1)
    assert out.dtype == F64
    assert _call(name, jnp.zeros(3, F32), -1).dtype == F32


def test_jit_does_not_retrace():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, w, b):
        return (jaxlse.logsumexp(x, axis=-1, b=b, where=w), jaxlse.log_softmax(x, where=w),
                jaxlse.softmax(x, axis=(0, 1), where=w))

    for seed in range(3):
        x = _normal((4, 5), seed=seed)
        f(x, _mask((4, 5), -1, seed=seed), jnp.abs(x))
    with pytest.raises(AssertionError, match="retrac|trace"):
        f(_normal((4, 6)), _mask((4, 6), -1), jnp.ones((4, 6)))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "where"])
@pytest.mark.parametrize("name", NAMES)
def test_eager_calls_do_not_recompile(name, masked, caplog):
    """A repeated eager call with the same shapes compiles nothing new (op-by-op dispatch reuses
    its cached executables), nor does its gradient."""
    x = _normal((3, 5), seed=19)
    w = _mask((3, 5), -1, seed=19) if masked else None

    def run(v):
        jax.block_until_ready(_call(name, v, -1, where=w))
        jax.block_until_ready(jax.grad(lambda u: jnp.sum(_call(name, u, -1, where=w)[..., 0]))(v))

    x2 = x + 1.0
    run(x)  # warm up
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
        run(x2)
    compiled = [r.getMessage()[:80] for r in caplog.records if "Compiling" in r.getMessage()]
    assert not compiled, compiled

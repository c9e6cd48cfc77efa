"""The row statistics (jaxlse/_rowstats.py) as every public function sees them.

* Rows whose max is at an end of the finite range (the lowest and highest finite values, the
  smallest subnormal) are rows of numbers, not masks: values and derivatives of every function.
* logsumexp keeps its accuracy relative to ``max(|result|, |row max|)`` when the max is near 0
  (the exact pass), within 4 ulp in float32 and float64.
* cross_entropy's gradient at the label is as exact as its loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DISTRIBUTIONS, ref_log_softmax, ref_logsumexp, ref_softmax, ulp_error

import jaxlse

F32, F64 = np.float32, np.float64

# --------------------------------------------------------------------------------------------
# Rows at the ends of the finite range


def _end_rows(dtype: type) -> dict[str, list[float]]:
    info = np.finfo(dtype)
    big, sub = float(info.max), float(info.smallest_subnormal)
    return {
        "lowest": [-big] * 4,
        "lowest-with-inf": [-big, -big, -np.inf, -np.inf],
        "lowest-and-next": [-big, float(np.nextafter(dtype(-big), dtype(0))), -big, -big],
        "highest": [big] * 4,
        "highest-mixed": [big, 0.0, -1.0, -big],
        "subnormal": [sub] * 4,
        "subnormal-mixed": [sub, 0.0, -sub, -1.0],
        "zero-max": [0.0, -40.0, -41.0, -60.0],
    }


@functools.cache
def _end_program(label: int) -> Callable[..., tuple[jax.Array, ...]]:
    """Values and vector-jacobian products of every function over rows (last axis)."""

    def run(x, ct, labels):
        outs = {
            "logsumexp": jax.vjp(lambda v: jaxlse.logsumexp(v, axis=-1), x),
            "log_softmax": jax.vjp(jaxlse.log_softmax, x),
            "softmax": jax.vjp(jaxlse.softmax, x),
            "cross_entropy": jax.vjp(
                lambda v: jaxlse.cross_entropy(v, labels, reduction="none"), x),
            "nll_loss": jax.vjp(
                lambda v: jaxlse.nll_loss(jaxlse.log_softmax(v), labels, reduction="none"), x),
        }
        cts = {"logsumexp": ct[:, 0], "log_softmax": ct, "softmax": ct,
               "cross_entropy": ct[:, 0], "nll_loss": ct[:, 0]}
        return {k: (v, pull(cts[k])[0]) for k, (v, pull) in outs.items()}

    return jax.jit(run)


def _refs(x: np.ndarray, ct: np.ndarray, label: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Float64 values and vector-jacobian products (from the float64 softmax)."""
    s = ref_softmax(x)
    onehot = np.eye(x.shape[-1])[label]
    ls = ref_log_softmax(x)
    return {
        "logsumexp": (ref_logsumexp(x), s * ct[:, :1]),
        "log_softmax": (ls, ct - s * ct.sum(-1, keepdims=True)),
        "softmax": (s, s * (ct - (s * ct).sum(-1, keepdims=True))),
        "cross_entropy": (-ls[:, label], (s - onehot) * ct[:, :1]),
        "nll_loss": (-ls[:, label], (s - onehot) * ct[:, :1]),
    }


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_rows_at_the_ends_of_the_finite_range_are_numbers(request, dtype):
    """The lowest finite value (where a row of it was taken for a row with no entry: the
    gradient of log_softmax was wrong), the highest, and the smallest subnormal."""
    if dtype == F64:
        request.getfixturevalue("x64")
    rows = _end_rows(dtype)
    x = np.asarray(list(rows.values()), dtype)
    ct = np.tile(np.asarray([0.25, 0.5, 0.75, 1.0], dtype), (len(rows), 1))
    label = 1
    got = _end_program(label)(jnp.asarray(x), jnp.asarray(ct), jnp.full(len(rows), label))
    with np.errstate(over="ignore", invalid="ignore"):  # -big - big overflows, as it should
        refs = _refs(x, ct, label)
    for fn, (value, grad) in got.items():
        ref_value, ref_grad = refs[fn]
        for name, a, r in (("value", value, ref_value), ("gradient", grad, ref_grad)):
            a = np.asarray(a)
            if name == "value":  # in ulps of the reference rounded to dtype (it may overflow)
                with np.errstate(over="ignore"):
                    err = ulp_error(a, r.astype(dtype))
            else:  # sums of a few terms of size up to 1: in units of eps
                err = np.abs(a.astype(np.float64) - r) / np.finfo(dtype).eps
            bad = np.argwhere(~(err <= 4))
            assert bad.size == 0, (
                f"{fn} {name} wrong on rows {[list(rows)[i] for i in {int(b[0]) for b in bad}]}:"
                f" got {a[tuple(bad[0])]}, expected {r[tuple(bad[0])]}"
            )


def test_row_of_lowest_values_gradient_as_in_the_issue():
    x = jnp.full(4, -jnp.finfo(jnp.float32).max)
    ct = jnp.asarray([0.25, 0.5, 0.75, 1.0])
    y, pull = jax.vjp(jaxlse.log_softmax, x)
    np.testing.assert_allclose(y, -np.log(4.0) * np.ones(4), rtol=1e-6)
    np.testing.assert_allclose(pull(ct)[0], [-0.375, -0.125, 0.125, 0.375], rtol=1e-6)
    np.testing.assert_allclose(pull(ct)[0], jax.vjp(jax.nn.log_softmax, x)[1](ct)[0], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# logsumexp near a zero max


def _near_zero_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows whose max is 0 or near it (both signs), over a range of dominance."""
    rows = []
    for m in (0.0, 1e-30, -1e-30, 1e-10, -1e-10, 1e-3, -1e-3, 0.25, -0.25, 0.75, -2.0, 5.0):
        for gap in (0.5, 3.0, 10.0, 20.0, 40.0, 80.0):
            row = m - gap - rng.exponential(5.0, n)
            row[rng.integers(n)] = m
            rows.append(row)
    tied = np.full(n, -50.0)
    tied[:2] = 0.0
    rows.append(tied)
    return np.asarray(rows)


def _lse_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(logsumexp, max)`` per row, in extended precision (np.longdouble)."""
    x = np.asarray(x, np.longdouble)
    m = x.max(-1, keepdims=True)
    z = x - m
    top = z == 0
    t = np.where(top, 0, np.exp(z)).sum(-1) + (top.sum(-1) - 1)
    return (m[:, 0] + np.log1p(t)).astype(np.float64), m[:, 0].astype(np.float64)


@functools.cache
def _lse_jit() -> Callable[[jax.Array], jax.Array]:
    return jax.jit(lambda v: jaxlse.logsumexp(v, axis=-1))


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_logsumexp_within_4_ulp_of_the_larger_of_result_and_max(request, dtype):
    """``logsumexp([0, -40])`` is ``log1p(exp(-40)) = 4.2e-18`` in float64, not 0 (scipy
    gh-18295), and every row is within 4 ulp of ``max(|result|, |row max|)``: the accuracy
    distributions and rows whose max is 0 or near it."""
    if dtype == F64:
        request.getfixturevalue("x64")
    rng = np.random.default_rng(7)
    blocks = [_near_zero_rows(rng, 64).astype(dtype)]
    blocks += [DISTRIBUTIONS[d](rng, (16, 64)).astype(dtype) for d in DISTRIBUTIONS]
    x = np.concatenate(blocks)
    got = np.asarray(_lse_jit()(jnp.asarray(x)))
    ref, m = _lse_ref(x)
    err = ulp_error(got, ref, scale=np.maximum(np.abs(ref), np.abs(m)))
    worst = int(np.argmax(err))
    assert err.max() <= 4, f"{err.max():.2f} ulp on row {worst}: {got[worst]!r} vs {ref[worst]!r}"
    small = jaxlse.logsumexp(jnp.asarray([0.0, -40.0], dtype))
    np.testing.assert_allclose(small, np.log1p(np.exp(-40.0)), rtol=4 * np.finfo(dtype).eps)


def test_logsumexp_subnormal_result_float32():
    """``logsumexp([0, -95])`` is ``exp(-95) = 5.5e-42``, a float32 subnormal (flushed to 0 by
    XLA:CPU's arithmetic, assembled from its bits)."""
    got = np.asarray(jaxlse.logsumexp(jnp.asarray([[0.0, -95.0], [0.0, -100.0]]), axis=-1))
    np.testing.assert_allclose(got, np.exp([-95.0, -100.0]).astype(F32), rtol=2**-10)
    assert np.all(got > 0)


# --------------------------------------------------------------------------------------------
# cross_entropy's gradient at the label


def _ce_grad_ref(x: np.ndarray, labels: np.ndarray, weight: np.ndarray | None, eps: float,
                 zeta: float) -> np.ndarray:
    """Float64 gradient of the summed losses; the label's entry from expm1 (no cancellation)."""
    x = np.asarray(x, np.float64)
    n, c = x.shape
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    m = x.max(-1, keepdims=True)
    z = x - m
    top = z == 0
    t = np.where(top, 0, np.exp(z)).sum(-1, keepdims=True) + (top.sum(-1, keepdims=True) - 1)
    log_sum = np.log1p(t)
    p = np.exp(z - log_sum)
    wy = w[labels][:, None]
    coef = (1 - eps) * wy
    a = coef + eps / c * w.sum() + 2 * zeta * wy * (m + log_sum)
    g = a * p - eps / c * w
    z_y = np.take_along_axis(z, labels[:, None], -1)
    g_y = coef * np.expm1(z_y - log_sum) + (a - coef) * np.exp(z_y - log_sum) - eps / c * wy
    np.put_along_axis(g, labels[:, None], g_y, -1)
    return g


OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 1e-6},
    "weight": {"weight": True},
    "z_loss": {"z_loss": 1e-4},
    "all": {"weight": True, "label_smoothing": 1e-7, "z_loss": 1e-12},
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_cross_entropy_gradient_at_the_label_is_exact(option):
    """A confident correct prediction (label logit 30 above 999 others, float32): the loss is
    about 9e-11 and so is the gradient at the label (``p_y - 1`` rounds to 0); with smoothing,
    weights and z-loss the label's entry is as exact (``A p_y - coef`` would lose it)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 1000)).astype(F32)
    labels = rng.integers(0, 1000, 8)
    x[np.arange(8), labels] = x.max(-1) + 30.0
    kw = dict(OPTIONS[option])
    weight = rng.uniform(0.5, 2.0, 1000).astype(F32) if kw.pop("weight", False) else None
    eps, zeta = kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
    grad = jax.grad(lambda v: jaxlse.cross_entropy(
        v, jnp.asarray(labels), weight=weight, reduction="sum", **kw))(jnp.asarray(x))
    grad = np.asarray(grad)
    ref = _ce_grad_ref(x, labels, weight, eps, zeta)
    at_label = np.take_along_axis(grad, labels[:, None], -1)[:, 0]
    ref_label = np.take_along_axis(ref, labels[:, None], -1)[:, 0]
    if option == "plain":
        assert np.all((ref_label < 0) & (ref_label > -1e-9))  # p_y - 1, about -9e-11
    np.testing.assert_array_less(ulp_error(at_label, ref_label), 4.0)
    # every entry within 4 ulp of the row's largest entry
    scale = np.abs(ref).max(-1, keepdims=True)
    np.testing.assert_array_less(ulp_error(grad, ref, scale=scale), 4.0)


def test_log_softmax_second_derivatives_of_a_row_holding_inf_with_a_mask() -> None:
    """A row holding +inf (twice) keeps finite second derivatives with ``where`` as without:
    the masked rule rebuilt softmax from the -inf-scaled log-softmax form, whose factor
    1 + big reached the +inf entries' Hessian-vector product (1e38 and inf)."""
    x = jnp.array([0.5, 1.0, jnp.inf, 2.0, -1.0, jnp.inf, 0.3, 0.1])
    mask = jnp.array([True, False, True, True, True, True, False, True])
    ct = jnp.array([1.0, -0.5, 0.7, 1.2, -1.1, 0.9, 0.6, -0.8])
    t = jnp.array([0.3, 0.2, -0.4, 0.5, 0.9, -1.3, 0.1, 0.6])
    at_inf = jnp.isinf(x)

    def hvp(where):
        def f(v):
            out = jaxlse.log_softmax(v, where=where)
            return jnp.sum(jnp.where(at_inf, out, 0.0) * ct)

        return jax.jit(lambda v: jax.jvp(jax.grad(f), (v,), (t,))[1])(x)

    plain, masked = np.asarray(hvp(None)), np.asarray(hvp(mask))
    assert np.isfinite(plain).all() and np.isfinite(masked).all(), (plain, masked)
    # d2/dx_i dx_j of -log 2 + (x_i - (x_2 + x_5) / 2) at the two +inf entries: the tangent's
    # second order vanishes for the value (linear in x), and the two rules agree.
    np.testing.assert_allclose(masked, plain, rtol=1e-6, atol=1e-7)

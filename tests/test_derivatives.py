"""Derivatives of every order, in every mode, for every public function and option.

Each configuration is one function of the logits ``x`` (float64, shape (3, 5)); one jitted
program per configuration computes its value, ``jvp``, ``vjp``, ``jacfwd(jacrev)``,
``jacrev(jacfwd)``, ``jacfwd(jacfwd)`` and ``hessian``, and the values for central differences
of first and second order. Every derivative must be finite wherever the value is finite, the four
second-order modes must agree with each other, and every derivative with central differences.
A NaN or inf that a select hides in one mode would show in its transpose here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fast_jit

import jaxlse

SHAPE = (3, 5)
H1 = 1e-6  # step for first derivatives (central differences of the value)
H2 = 1e-4  # step for second derivatives (central differences of the value)


def _aux() -> dict[str, np.ndarray]:
    """The configurations' other arguments, passed to the jitted program (labels are traced, so
    a bad label takes the jitted path instead of raising)."""
    return {
        "int": np.array([1, 3, 4]),
        "ignored": np.array([1, -100, 4]),
        "bad": np.array([1, 7, 4]),
        "soft": np.random.default_rng(1).dirichlet(np.ones(SHAPE[1]), SHAPE[0]),
        "mask": np.array([True, False, True]),
        "entry_mask": np.array([[True, True, False, True, True],
                                [False, False, False, False, False],
                                [True, False, True, True, True]]),
        "weight": np.array([0.5, 1.0, 2.0, 1.5, 0.25]),
        "b": np.array([[1.0, 2.0, 0.0, 0.5, 1.0],
                       [0.5, 0.5, 0.5, 0.5, 0.5],
                       [2.0, 0.0, 1.0, 1.0, 3.0]]),
    }


ce, nll, ls = jaxlse.cross_entropy, jaxlse.nll_loss, jaxlse.log_softmax
# Every public function with each of its options; an ignored example (label -100), an example
# excluded by `where`, a row with no included entry and a bad label under jit among them.
CONFIGS: dict[str, Callable[[jax.Array, dict[str, jax.Array]], jax.Array]] = {
    "logsumexp": lambda x, d: jaxlse.logsumexp(x, axis=-1),
    "logsumexp-all": lambda x, d: jaxlse.logsumexp(x),
    "logsumexp-where": lambda x, d: jaxlse.logsumexp(x, axis=-1, where=d["entry_mask"]),
    "logsumexp-b": lambda x, d: jaxlse.logsumexp(x, axis=-1, b=d["b"]),
    "log_softmax": lambda x, d: ls(x),
    "log_softmax-where": lambda x, d: ls(x, where=d["entry_mask"]),
    "softmax": lambda x, d: jaxlse.softmax(x),
    "softmax-where": lambda x, d: jaxlse.softmax(x, where=d["entry_mask"]),
    "nll-weight-ignore": lambda x, d: nll(ls(x), d["ignored"], ignore_index=-100,
                                          weight=d["weight"]),
    "nll-where-soft": lambda x, d: nll(ls(x), d["soft"], where=d["mask"], reduction="sum"),
    "nll-bad-none": lambda x, d: nll(ls(x), d["bad"], reduction="none"),
    "ce": lambda x, d: ce(x, d["int"]),
    "ce-ignore-weight": lambda x, d: ce(x, d["ignored"], ignore_index=-100, weight=d["weight"]),
    "ce-ignore-smoothing": lambda x, d: ce(x, d["ignored"], ignore_index=-100,
                                           label_smoothing=0.1),
    "ce-smoothing-weight": lambda x, d: ce(x, d["int"], label_smoothing=0.2,
                                           weight=d["weight"], reduction="sum"),
    "ce-ignore-z_loss": lambda x, d: ce(x, d["ignored"], ignore_index=-100, z_loss=0.3),
    "ce-soft_cap": lambda x, d: ce(x, d["int"], soft_cap=2.0, reduction="none"),
    "ce-where": lambda x, d: ce(x, d["int"], where=d["mask"], weight=d["weight"]),
    "ce-soft": lambda x, d: ce(x, d["soft"], label_smoothing=0.1, z_loss=0.2),
    "ce-soft-where": lambda x, d: ce(x, d["soft"], where=d["mask"], weight=d["weight"]),
    "ce-bad-none": lambda x, d: ce(x, d["bad"], reduction="none", label_smoothing=0.1),
}



def _args() -> tuple[jax.Array, ...]:
    """``(x, aux, tangent, cotangent, steps, pairs)`` in float64: the logits, the other
    arguments, a tangent and a cotangent, and the perturbations for central differences,
    ``x +- H1 e_i`` (first derivatives) and ``x +- H2 e_i +- H2 e_j`` (second derivatives)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=SHAPE) * 2
    tangent = rng.normal(size=SHAPE)
    cotangent = rng.normal(size=SHAPE)  # the first out_size entries are used
    n = x.size
    eye = np.eye(n).reshape(n, *SHAPE)
    steps = np.concatenate([H1 * eye, -H1 * eye])
    pairs = np.stack([H2 * (a * eye[:, None] + b * eye[None, :])
                      for a, b in ((1, 1), (1, -1), (-1, 1), (-1, -1))]).reshape(-1, *SHAPE)
    aux = {k: jnp.asarray(v) for k, v in _aux().items()}
    return tuple(jnp.asarray(a) if i != 1 else a
                 for i, a in enumerate((x, aux, tangent, cotangent, steps, pairs)))


@functools.cache
def _program(name: str) -> Callable[..., tuple[jax.Array, ...]]:
    """Every derivative of configuration ``name`` and the values for central differences, in
    one compiled program (compiled once, for the float64 arguments of :func:`_args`).

    ``jax.hessian`` is ``jacfwd(jacrev)`` by definition, so that mode is computed once. The
    program is compiled with ``helpers.fast_jit`` (its checks are tolerances), in about
    half the time of the default options; no derivative changes beyond rounding.
    """
    f = CONFIGS[name]

    def run(x, aux, tangent, cotangent, steps, pairs):
        def flat(v: jax.Array) -> jax.Array:
            return jnp.reshape(f(v, aux), (-1,))

        value = flat(x)
        # The cotangent is 0 at outputs that are not finite (a bad label's example).
        cotangent = jnp.where(jnp.isfinite(value), cotangent.reshape(-1)[: value.size], 0.0)
        jvp = jax.jvp(flat, (x,), (tangent,))[1]
        vjp = jax.vjp(flat, x)[1](cotangent)[0]
        second = {
            "hessian = jacfwd(jacrev)": jax.hessian(flat)(x),
            "jacrev(jacfwd)": jax.jacrev(jax.jacfwd(flat))(x),
            "jacfwd(jacfwd)": jax.jacfwd(jax.jacfwd(flat))(x),
        }
        # f at every perturbed point, one at a time in a loop: the function itself (not its
        # batching rule), compiled once (two vmaps made the program 1.4-2x slower to compile)
        f_points = jax.lax.map(lambda s: flat(x + s), jnp.concatenate([steps, pairs]))
        f_steps, f_pairs = f_points[: len(steps)], f_points[len(steps) :]
        return value, cotangent, jvp, vjp, second, f_steps, f_pairs

    return fast_jit(run).lower(*_args()).compile()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_mode_finite_consistent_and_matches_differences(x64, name):
    args = _args()
    x, tangent = args[0], args[2]
    n = x.size
    value, cotangent, jvp, vjp, second, f_steps, f_pairs = jax.tree.map(
        np.asarray, _program(name)(*args)
    )
    finite = np.isfinite(value)  # (outputs,)
    assert finite.any(), f"{name}: no finite value to check"
    out_size = value.size
    # First order: the jacobian from central differences, (inputs, outputs).
    with np.errstate(invalid="ignore"):  # inf - inf at outputs that are not finite
        jac_fd = np.where(finite, (f_steps[:n] - f_steps[n:]) / (2 * H1), 0.0)
    t = np.asarray(tangent).reshape(-1)
    np.testing.assert_allclose(jvp[finite], (t @ jac_fd)[finite], rtol=1e-6, atol=1e-7,
                               err_msg=f"{name}: jvp")
    vjp_fd = (jac_fd @ cotangent).reshape(SHAPE)
    # With per-example outputs, an example whose value is not finite (a bad label) has a
    # non-finite gradient row; the other rows are checked.
    rows = finite if finite.size == SHAPE[0] and not finite.all() else slice(None)
    np.testing.assert_allclose(vjp[rows], vjp_fd[rows], rtol=1e-6, atol=1e-7,
                               err_msg=f"{name}: vjp")
    # Second order: (outputs, inputs, inputs) from each mode and from central differences.
    pp, pm, mp, mm = f_pairs.reshape(4, n, n, out_size)
    with np.errstate(invalid="ignore"):
        hess_fd = np.where(finite, (pp - pm - mp + mm) / (4 * H2 * H2), 0.0)
    hess_fd = np.moveaxis(hess_fd, -1, 0)
    ref = second["hessian = jacfwd(jacrev)"].reshape(out_size, n, n)[finite]
    for mode, h in second.items():
        h = h.reshape(out_size, n, n)[finite]
        assert np.isfinite(h).all(), f"{name}: {mode} is not finite where the value is"
        np.testing.assert_allclose(h, hess_fd[finite], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{name}: {mode} against central differences")
        np.testing.assert_allclose(h, ref, rtol=1e-10, atol=1e-12,
                                   err_msg=f"{name}: {mode} against jax.hessian")

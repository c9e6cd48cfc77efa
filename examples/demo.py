"""jaxlse next to jax.nn on the inputs where they differ (and one where they agree).

Each section prints the value (and, where it matters, the gradient) from ``jaxlse``, from
``jax.nn`` and, for reference, from the textbook formula or an exact float64 computation:

1. the worked example: ordinary logits, where both agree to float32 rounding;
2. a fully masked row (every logit set to ``-inf``): jax.nn gives NaN values and NaN
   gradients, jaxlse gives ``logsumexp = -inf``, ``softmax = 0`` and zero gradients;
3. a row holding ``+inf``: jax.nn gives NaN, jaxlse gives the limit;
4. one dominant logit: jaxlse keeps its log-probability of about ``-1e-9``, jax.nn rounds it
   to 0;
5. logits of size ``1e30``: both are exact, while ``log(sum(exp(x)))`` overflows.

Everything runs eagerly on the CPU in a few seconds; the inputs are fixed. Run it from the
repository root::

    python examples/demo.py
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxlse

LIBS = {"jaxlse": jaxlse, "jax.nn": jax.nn}


def fmt(x: jax.Array | np.ndarray | float, precision: int = 4) -> str:
    """A 0-d or 1-d array on one line, in fixed or (for very large or small) scientific notation."""
    a = np.asarray(x, dtype=np.float64)
    finite = np.abs(a[np.isfinite(a) & (a != 0)])
    sci = finite.size > 0 and (finite.max() >= 1e5 or finite.min() < 1e-3)
    spec = f".{precision}e" if sci else f".{precision}f"
    if a.ndim == 0:
        return format(float(a), spec)
    return "[" + ", ".join(format(float(v), spec) for v in a) + "]"


def show(label: str, value: jax.Array | np.ndarray, grad: jax.Array | None = None) -> None:
    """Prints ``value`` (and ``grad``) after ``label``, one line per row of a 2-d array."""
    values = np.atleast_2d(np.asarray(value)) if np.ndim(value) == 2 else [value]
    grads = [None] * len(values) if grad is None else np.atleast_2d(np.asarray(grad))
    if grad is not None and len(grads) != len(values):  # a row of values, a matrix of grads
        values = [value] + [None] * (len(grads) - 1)
    for i, (v, g) in enumerate(zip(values, grads, strict=True)):
        text = "" if v is None else fmt(v)
        line = f"  {label if i == 0 else '':<22} {text:<34}"
        if g is not None:
            line += f"{'grad:' if i == 0 else '':<6} {fmt(g)}"
        print(line.rstrip())


def section(title: str) -> None:
    print(f"\n{title}\n" + "-" * len(title))


def grad_of_finite_sum(f: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Gradient of the sum of the finite entries of ``f(x)`` (infinite entries are dropped)."""

    def loss(v: jax.Array) -> jax.Array:
        y = f(v)
        return jnp.sum(jnp.where(jnp.isfinite(y), y, 0.0))

    return jax.grad(loss)(x)


def worked_example() -> None:
    section("1. Worked example: log_softmax over the last axis")
    logits = jnp.array([[2.0, 5.0, 3.0], [1.0, 2.0, 7.0], [6.0, 3.0, 1.0], [4.0, 3.0, 3.0]])
    exact = logits - np.log(np.exp(np.asarray(logits, np.float64)).sum(-1, keepdims=True))
    show("logits", logits)
    for name, lib in LIBS.items():
        show(f"{name}.log_softmax", lib.log_softmax(logits))
    show("exact (float64)", exact)
    print("  row 0 is [-3.1698, -0.1698, -2.1698] in both; they agree to float32 rounding.")


def fully_masked_row() -> None:
    section("2. A fully masked row: logits set to -inf (gradient of the sum of finite values)")
    x = jnp.array([[1.0, 2.0, 3.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
    show("x", x)
    for name, lib in LIBS.items():
        show(
            f"{name}.logsumexp",
            lib.logsumexp(x, axis=-1),
            grad_of_finite_sum(lambda v, lib=lib: lib.logsumexp(v, axis=-1), x),
        )
    for name, lib in LIBS.items():
        show(f"{name}.log_softmax", lib.log_softmax(x))
    for name, lib in LIBS.items():
        show(f"{name}.softmax", lib.softmax(x))
    print("  jax.nn: NaN values and a NaN gradient, which reaches every parameter upstream.")
    print("  jaxlse: logsumexp -inf, log_softmax -inf, softmax 0, and a zero gradient.")


def plus_inf_row() -> None:
    section("3. A row holding +inf")
    x = jnp.array([1.0, jnp.inf, 2.0, jnp.inf])
    show("x", x)
    for name, lib in LIBS.items():
        show(f"{name}.log_softmax", lib.log_softmax(x))
    show("limit", np.array([-np.inf, -np.log(2), -np.inf, -np.log(2)]))
    for name, lib in LIBS.items():
        show(f"{name}.logsumexp", lib.logsumexp(x), jax.grad(lib.logsumexp)(x))
    print("  jaxlse gives the limit: probability 1/2 on each +inf entry, 0 elsewhere.")


def dominant_logit() -> None:
    section("4. One dominant logit: log-probability of the winner")
    gap = 20.723266  # exp(-gap) = 1e-9
    x = jnp.array([0.0, -gap])
    exact = -math.log1p(math.exp(-float(x[0] - x[1])))
    show("x", x)
    for name, lib in LIBS.items():
        show(f"{name}.log_softmax[0]", lib.log_softmax(x)[0])
    show("exact (float64)", np.float64(exact))
    print("  jax.nn rounds 1 + 1e-9 to 1 and returns 0 (probability exactly 1); jaxlse uses")
    print("  log1p and keeps the value to float32 precision.")


def huge_logits() -> None:
    section("5. Logits of size 1e30")
    x = jnp.array([1e30, 0.0, -1e30])
    show("x", x)
    for name, lib in LIBS.items():
        show(f"{name}.log_softmax", lib.log_softmax(x))
    show("log(softmax(x))", jnp.log(jnp.exp(x) / jnp.sum(jnp.exp(x))))
    for name, lib in LIBS.items():
        show(f"{name}.logsumexp", lib.logsumexp(x))
    show("log(sum(exp(x)))", jnp.log(jnp.sum(jnp.exp(x))))
    print("  Both libraries shift by the maximum and are exact here; the textbook formula")
    print("  overflows once a logit passes about 88.7 in float32.")


def main() -> None:
    """Prints the five comparisons."""
    print(f"jaxlse {jaxlse.__version__} and jax {jax.__version__} on {jax.devices()[0].platform}")
    worked_example()
    fully_masked_row()
    plus_inf_row()
    dominant_logit()
    huge_logits()


if __name__ == "__main__":
    main()

"""Accuracy of jaxlse against jax.nn and optax, in ulps of the output dtype.

For each input distribution, row length and dtype, prints the largest error over all entries,
measured against the exact answer for the given (rounded) inputs, computed in float64:

* ``log_softmax``: ulps of its own value;
* ``logsumexp``: ulps of ``max(|result|, max|input|)`` (the scale the inputs fix);
* ``cross_entropy`` with integer labels (per example): ulps of the loss;
* its gradient (of the summed losses, ``softmax - onehot``): ulps of each entry's own value
  (entries in the normal range; below it XLA:CPU flushes to 0), and ulps of the row's largest
  entry. The label's entry of a confident correct prediction, ``p_y - 1`` of about ``-9e-11``,
  is where ``p_y - 1`` computed as such rounds to 0.

Run: ``python benchmarks/bench_accuracy.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlse

ROWS = 64  # rows per distribution and row length (--rows)


def distributions(n: int, rng: np.random.Generator, rows: int = ROWS) -> dict[str, np.ndarray]:
    """The input distributions of the accuracy targets, ``rows`` rows of length ``n``."""
    normal = rng.standard_normal((rows, n))
    dominant = rng.standard_normal((rows, n))
    dominant[np.arange(rows), rng.integers(0, n, rows)] += 30.0
    return {
        "normal": normal,
        "normal x10": 10 * normal,
        "normal x100": 100 * normal,
        "uniform 1e4": rng.uniform(-1e4, 1e4, (rows, n)),
        "normal + 1e4": normal + 1e4,
        "nearly constant": 1 + 1e-6 * normal,
        "one logit +30": dominant,
    }


def exact_lse(x: np.ndarray) -> np.ndarray:
    """Float64 log-sum-exp of the rows of ``x`` with log1p of the non-max terms."""
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    e[np.arange(x.shape[0]), x.argmax(axis=-1)] = 0.0
    return (m + np.log1p(e.sum(axis=-1, keepdims=True)))[:, 0]


def exact_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    e[np.arange(x.shape[0]), x.argmax(axis=-1)] = 0.0
    return (x - m) - np.log1p(e.sum(axis=-1, keepdims=True))


def exact_ce_grad(log_softmax: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Float64 ``softmax - onehot`` from the exact log-softmax; the label's entry as
    ``expm1(log_softmax_y)`` (``p_y - 1`` without cancellation)."""
    g = np.exp(log_softmax)
    rows = np.arange(g.shape[0])
    g[rows, labels] = np.expm1(log_softmax[rows, labels])
    return g


def ulps(got: np.ndarray, want: np.ndarray, scale: np.ndarray, dtype: jnp.dtype) -> float:
    """Largest ``|got - want|`` in units of ``dtype``'s spacing at ``|scale|``."""
    spacing = np.spacing(np.abs(scale).astype(np.float32)).astype(np.float64)
    if dtype != jnp.float32:
        eps = float(jnp.finfo(dtype).eps)
        spacing = np.maximum(np.abs(scale), float(jnp.finfo(dtype).tiny)) * eps
        spacing = 2.0 ** np.floor(np.log2(spacing))
    err = np.abs(got.astype(np.float64) - want)
    finite = np.isfinite(want)
    return float(np.max(err[finite] / spacing[finite]))


def measure(
    dtype: jnp.dtype, n: int, seed: int, rows: int = ROWS
) -> list[tuple[str, str, float, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for name, raw in distributions(n, rng, rows).items():
        x = jnp.asarray(raw, dtype)
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
        lsm_want = exact_log_softmax(x64)
        lse_want = exact_lse(x64)
        lse_scale = np.maximum(np.abs(lse_want), np.abs(x64).max(axis=-1))

        def to_np(f: Callable[..., jax.Array], *args: object) -> np.ndarray:
            return np.asarray(jnp.asarray(f(*args)).astype(jnp.float32), np.float64)

        lsm = [to_np(f, x) for f in (jaxlse.log_softmax, jax.nn.log_softmax)]
        lse = [to_np(lambda v, f=f: f(v, axis=-1), x)
               for f in (jaxlse.logsumexp, jax.nn.logsumexp)]
        out.append((name, "log_softmax", *(ulps(v, lsm_want, lsm_want, dtype) for v in lsm)))
        out.append((name, "logsumexp", *(ulps(v, lse_want, lse_scale, dtype) for v in lse)))
        if dtype == jnp.float32:
            labels = np.asarray(x64.argmax(axis=-1) if name == "one logit +30"
                                else rng.integers(0, n, rows))
            want = -lsm_want[np.arange(rows), labels]
            y = jnp.asarray(labels)
            ce = [to_np(lambda v, y=y: jaxlse.cross_entropy(v, y, reduction="none"), x),
                  to_np(optax.softmax_cross_entropy_with_integer_labels, x, y)]
            out.append((name, "cross_entropy", *(ulps(v, want, want, dtype) for v in ce)))
            g_want = exact_ce_grad(lsm_want, labels)
            tiny = float(jnp.finfo(dtype).tiny)
            normal = np.abs(g_want) >= tiny
            row_max = np.broadcast_to(np.abs(g_want).max(axis=-1, keepdims=True), g_want.shape)
            grads = [to_np(jax.grad(lambda v, y=y: jnp.sum(
                         jaxlse.cross_entropy(v, y, reduction="none"))), x),
                     to_np(jax.grad(lambda v, y=y: jnp.sum(
                         optax.softmax_cross_entropy_with_integer_labels(v, y))), x)]
            out.append((name, "cross_entropy grad, each entry",
                        *(ulps(g[normal], g_want[normal], g_want[normal], dtype)
                          for g in grads)))
            out.append((name, "cross_entropy grad, row's largest entry",
                        *(ulps(g, g_want, row_max, dtype) for g in grads)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,32768")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=ROWS, help="rows per distribution")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform}")
    print("| dtype | n | inputs | function | jaxlse max ulp | jax.nn / optax max ulp |")
    print("|---|--:|---|---|--:|--:|")
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        for n in (int(s) for s in args.sizes.split(",")):
            for name, fn, ours, theirs in measure(jnp.dtype(dtype), n, args.seed, args.rows):
                print(f"| {jnp.dtype(dtype).name} | {n} | {name} | {fn} | {ours:.3g} "
                      f"| {theirs:.3g} |", flush=True)


if __name__ == "__main__":
    main()

"""Eager calls of jaxlse against the same calls under ``jit`` and against jax.nn / optax.

An eager call of a jaxlse function runs as one compiled program (``eager_jit`` in
``jaxlse/_checks.py``); a function whose body is not jitted would dispatch each of its
operations as a program of its own. This times, in one process and A/B interleaved (see
``bench_core.time_ab``), for standard-normal float32 logits and after a warm-up call:

* the eager call against ``jax.jit`` of the same call (ratio near 1: the eager call costs a
  program's dispatch and the label check, no more), and the same for an eager ``jax.grad`` of
  ``cross_entropy`` (two programs);
* the eager call against the eager call of the reference (``jax.nn`` for the first three,
  ``optax.softmax_cross_entropy_with_integer_labels`` with its mean for ``cross_entropy``, and
  ``-mean(take_along_axis(log_probs, labels))`` for ``nll_loss``).

Ratios are of median times; below 1 jaxlse is faster.

Run from the repository root::

    python benchmarks/bench_eager.py                      # 256x1000 and 1024x4096
    python benchmarks/bench_eager.py --shapes 64x128 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import header, log, parse_shapes, time_ab  # noqa: E402

Fn = Callable[..., Any]


def _nll_reference(lp: jax.Array, y: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=-1))


def cases() -> dict[str, tuple[Fn, Fn]]:
    """name -> (jaxlse call, reference call), each taking ``(x, y, class_weight)``."""
    return {
        "logsumexp": (lambda x, y, cw: jaxlse.logsumexp(x, axis=-1),
                      lambda x, y, cw: jax.nn.logsumexp(x, axis=-1)),
        "log_softmax": (lambda x, y, cw: jaxlse.log_softmax(x),
                        lambda x, y, cw: jax.nn.log_softmax(x)),
        "softmax": (lambda x, y, cw: jaxlse.softmax(x), lambda x, y, cw: jax.nn.softmax(x)),
        "nll_loss": (lambda x, y, cw: jaxlse.nll_loss(x, y),
                     lambda x, y, cw: _nll_reference(x, y)),
        "cross_entropy": (
            lambda x, y, cw: jaxlse.cross_entropy(x, y),
            lambda x, y, cw: optax.softmax_cross_entropy_with_integer_labels(x, y).mean(),
        ),
        "grad of cross_entropy": (
            lambda x, y, cw: jax.grad(lambda v: jaxlse.cross_entropy(v, y))(x),
            lambda x, y, cw: jax.grad(
                lambda v: optax.softmax_cross_entropy_with_integer_labels(v, y).mean())(x),
        ),
        "cross_entropy, options": (
            lambda x, y, cw: jaxlse.cross_entropy(
                x, y, weight=cw, ignore_index=0, label_smoothing=0.1, z_loss=1e-4),
            None,
        ),
    }


def run(shapes: Sequence[tuple[int, int]], rounds: int) -> str:
    lines = [
        "| function | N x V | eager / jit | eager / reference eager |",
        "|---|---|--:|--:|",
    ]
    rng = np.random.default_rng(0)
    for n, v in shapes:
        x = jnp.asarray(rng.standard_normal((n, v), dtype=np.float32))
        y = jnp.asarray(rng.integers(0, v, n, dtype=np.int32))
        cw = jnp.asarray(rng.uniform(0.5, 1.5, v).astype(np.float32))
        args = (x, y, cw)
        for name, (ours, ref) in cases().items():
            log(f"{name} {n}x{v}")
            t_eager, t_jit = time_ab(ours, jax.jit(ours), args, rounds)
            cell = "–"
            if ref is not None:
                t_ours, t_ref = time_ab(ours, ref, args, rounds)
                cell = f"{t_ours / t_ref:.2f}"
            lines.append(f"| {name} | {n}x{v} | {t_eager / t_jit:.2f} | {cell} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=parse_shapes, default="256x1000,1024x4096")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    print("## Eager calls\n\n```\n" + header() + "\n```\n")
    print(run(args.shapes, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

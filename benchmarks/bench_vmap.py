"""A/B benchmark of per-example functions under ``jax.vmap``: jaxlse against jax.nn / optax.

A per-example function (one row of logits, one label) mapped over a batch with ``jax.vmap`` is
how many training loops write their loss. Under vmap, a ``lax.cond`` whose predicate depends
on the batched input becomes a select that runs every branch; jaxlse's exact pass would then
run on every call. This compares, in one process and A/B interleaved (see
``bench_core.time_ab``), for standard-normal logits:

* ``vmap(jaxlse.log_softmax)`` with ``vmap(jax.nn.log_softmax)``;
* ``mean(vmap(jaxlse.cross_entropy)(x, y))`` with the same of
  ``optax.softmax_cross_entropy_with_integer_labels``, forward and ``value_and_grad``;

and, for reference, the batched jaxlse call on the same data. Ratios are jaxlse / reference
of median times (below 1: jaxlse is faster).

Run from the repository root::

    python benchmarks/bench_vmap.py                      # 256x1000 and 4096x32768
    python benchmarks/bench_vmap.py --shapes 1024x4096 --rounds 9
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxlse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import header, log, parse_shapes, time_ab  # noqa: E402

Fn = Callable[..., Any]


def _loss(per_example: Fn) -> Fn:
    return lambda x, y: jnp.mean(jax.vmap(per_example)(x, y))


def cases() -> list[tuple[str, Fn, Fn, Fn, bool]]:
    """(name, mapped jaxlse, mapped reference, batched jaxlse, scalar output)."""
    ref_ce = optax.softmax_cross_entropy_with_integer_labels
    return [
        (
            "log_softmax",
            lambda x, y: jax.vmap(jaxlse.log_softmax)(x),
            lambda x, y: jax.vmap(jax.nn.log_softmax)(x),
            lambda x, y: jaxlse.log_softmax(x),
            False,
        ),
        (
            "cross_entropy",
            _loss(jaxlse.cross_entropy),
            _loss(ref_ce),
            lambda x, y: jaxlse.cross_entropy(x, y),
            True,
        ),
    ]


def run(shapes: Sequence[tuple[int, int]], rounds: int) -> str:
    lines = [
        "| function | N x V | mode | vmap ratio | batched ratio |",
        "|---|---|---|--:|--:|",
    ]
    for shape in shapes:
        kx, ky = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, shape, jnp.float32)
        y = jax.random.randint(ky, shape[:1], 0, shape[1], jnp.int32)
        for name, ours, ref, batched, scalar in cases():
            modes = [("fwd", ours, ref, batched)]
            if scalar:
                modes.append(
                    ("vg", *(jax.value_and_grad(f) for f in (ours, ref, batched)))
                )
            for mode, a, b, c in modes:
                a, b, c = (jax.jit(f) for f in (a, b, c))
                log(f"{name} {shape[0]}x{shape[1]} {mode}")
                ta, tb = time_ab(a, b, (x, y), rounds)
                tc, tb2 = time_ab(c, b, (x, y), rounds)
                lines.append(
                    f"| {name} | {shape[0]}x{shape[1]} | {mode} | {ta / tb:.2f} | "
                    f"{tc / tb2:.2f} |"
                )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=parse_shapes, default="256x1000,4096x32768")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    print("## jaxlse under vmap\n\n```\n" + header() + "\n```\n")
    print(
        "Ratios are jaxlse / reference (jax.nn, optax) of median times; the reference is "
        "vmapped in both columns, jaxlse is vmapped (vmap ratio) or called on the whole "
        "batch (batched ratio). Logits are normal(0, 1).\n"
    )
    print(run(args.shapes, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

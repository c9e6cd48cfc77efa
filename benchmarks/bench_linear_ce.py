"""A/B benchmark of jaxlse.linear_cross_entropy against the materialised-logits loss.

The reference is the naive language-model head loss,
``optax.softmax_cross_entropy_with_integer_labels(x @ w + b, labels).mean()`` (logits cast to
float32 first, as a 16-bit model does), and jaxlse's is ``linear_cross_entropy(x, w, labels,
bias=b)``. For each vocabulary size and dtype it measures, with everything jitted and compiled
before timing:

* the time ratio jaxlse / naive of ``jax.value_and_grad`` with respect to ``(x, w)``: each
  round runs one call of each back to back, alternating which goes first, and the ratio is
  that of the medians over the rounds;
* the compiled temporary memory of both (``memory_analysis().temp_size_in_bytes``) in units of
  one float32 logits array, ``N * V * 4`` bytes.

Targets (the issue's): time ratio <= 0.9 and jaxlse's temp memory <= 2 % of ``N * V * 4``.

First, one shape that the naive loss cannot fit in this machine's 24 GiB (``--big``, default
32768 tokens, d=256, V=131072: float32 logits alone take 16 GiB and the naive
``value_and_grad`` needs 32 GiB of temporaries) is run with jaxlse alone: its time for one
``value_and_grad``, its compiled temp / argument / output bytes, the process's peak resident
memory (measured before anything else runs), and the naive loss's compiled memory for
comparison (compiled only, never run).

Run from the repository root (speed is never asserted in the tests; it lives here)::

    python benchmarks/bench_linear_ce.py                 # the issue's shapes, ~25 min on 2 cores
    python benchmarks/bench_linear_ce.py --quick         # small shapes, a smoke check
    python benchmarks/bench_linear_ce.py --vocab 32768 --dtypes float32 --rounds 5 --big none

Progress goes to stderr, the report (markdown) to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import optax

import jaxlse

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MAX_RATIO = 0.9
MAX_TEMP = 0.02  # of N * V * 4 bytes
GIB = 2.0**30


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def naive_loss(x: jax.Array, w: jax.Array, b: jax.Array, labels: jax.Array) -> jax.Array:
    logits = (x @ w + b[None, :]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_ours(chunk: int | None) -> Callable[..., jax.Array]:
    def ours_loss(x: jax.Array, w: jax.Array, b: jax.Array, labels: jax.Array) -> jax.Array:
        return jaxlse.linear_cross_entropy(x, w, labels, bias=b, chunk_size=chunk)

    return ours_loss


def inputs(n: int, d: int, v: int, dtype: Any, seed: int = 0) -> tuple[jax.Array, ...]:
    """Features N(0, 1), weights N(0, 4 / d): logits of standard deviation about 2."""
    kx, kw, kb, ky = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d, v), jnp.float32) * (2.0 / d**0.5)).astype(dtype)
    b = (0.1 * jax.random.normal(kb, (v,), jnp.float32)).astype(dtype)
    labels = jax.random.randint(ky, (n,), 0, v, jnp.int32)
    return x, w, b, labels


def compiled_vg(loss: Callable[..., jax.Array], args: Sequence[Any]) -> Any:
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()


def memory(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {
        "temp": int(m.temp_size_in_bytes),
        "args": int(m.argument_size_in_bytes),
        "out": int(m.output_size_in_bytes),
    }


def time_ab(a: Any, b: Any, args: Sequence[Any], rounds: int) -> tuple[float, float]:
    """Median seconds per call of ``a`` and ``b``, interleaved (the order alternates)."""
    for f in (a, b):
        jax.block_until_ready(f(*args))
    ta: list[float] = []
    tb: list[float] = []
    for r in range(rounds):
        for f, acc in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            acc.append(time.perf_counter() - start)
    log(f"    jaxlse {[round(t, 2) for t in ta]} s, naive {[round(t, 2) for t in tb]} s")
    return statistics.median(ta), statistics.median(tb)


def header() -> str:
    dev = jax.devices()[0]
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)), check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        f"jaxlse {jaxlse.__version__} (git {rev}), jax {jax.__version__}, "
        f"jaxlib {jaxlib.__version__}, optax {optax.__version__}, "
        f"Python {platform.python_version()}",
        f"device: {dev.platform} ({dev.device_kind}), {os.cpu_count()} cores, {cpu}",
        f"date: {now}",
    ])


def run_ab(args: argparse.Namespace) -> list[str]:
    n, d = args.tokens, args.dim
    rows = []
    for v in args.vocab:
        for name in args.dtypes:
            dtype = DTYPES[name]
            log(f"N={n} d={d} V={v} {name}: compiling")
            data = inputs(n, d, v, dtype)
            ours = compiled_vg(make_ours(args.chunk), data)
            naive = compiled_vg(naive_loss, data)
            mem_ours, mem_naive = memory(ours), memory(naive)
            # Same loss (within float32 rounding of the two orders of summation).
            lo, ln = float(ours(*data)[0]), float(naive(*data)[0])
            log(f"  losses: jaxlse {lo:.6f}, naive {ln:.6f}; timing {args.rounds} rounds")
            t_ours, t_naive = time_ab(ours, naive, data, args.rounds)
            logits = n * v * 4
            ratio = t_ours / t_naive
            temp_o, temp_n = mem_ours["temp"] / logits, mem_naive["temp"] / logits
            failed = []
            if ratio > MAX_RATIO:
                failed.append(f"time <= {MAX_RATIO}")
            if temp_o > MAX_TEMP:
                failed.append(f"temp <= {MAX_TEMP:.0%}")
            verdict = "PASS" if not failed else "FAIL: " + ", ".join(failed)
            rows.append(
                f"| {n}x{d}x{v} | {name} | {t_ours:.2f} | {t_naive:.2f} | {ratio:.2f} "
                f"| {temp_o:.4f} ({mem_ours['temp'] / 2**20:.1f} MiB) "
                f"| {temp_n:.2f} ({mem_naive['temp'] / GIB:.2f} GiB) | {verdict} |"
            )
            log("  " + rows[-1])
            del ours, naive, data
    return rows


def run_big(args: argparse.Namespace) -> list[str]:
    n, d, v = args.big
    name = args.big_dtype
    dtype = DTYPES[name]
    log(f"big shape N={n} d={d} V={v} {name}: compiling (naive: compile only)")
    abstract = (
        jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((v,), dtype), jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    mem_naive = memory(compiled_vg(naive_loss, abstract))
    ours = compiled_vg(make_ours(args.chunk), abstract)
    mem_ours = memory(ours)
    data = inputs(n, d, v, dtype)
    jax.block_until_ready(data)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    log("  running one value_and_grad with jaxlse")
    start = time.perf_counter()
    loss, _ = jax.block_until_ready(ours(*data))
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total_naive = sum(mem_naive.values())
    return [
        f"Shape N={n}, d={d}, V={v}, {name} (float32 logits: {n * v * 4 / GIB:.1f} GiB).",
        "",
        "| | temp | arguments | outputs | total | time of one value_and_grad |",
        "|---|--:|--:|--:|--:|--:|",
        f"| jaxlse | {mem_ours['temp'] / 2**20:.1f} MiB | {mem_ours['args'] / 2**20:.0f} MiB "
        f"| {mem_ours['out'] / 2**20:.0f} MiB | {sum(mem_ours.values()) / GIB:.2f} GiB "
        f"| {seconds:.1f} s (loss {float(loss):.4f}) |",
        f"| naive (compiled only) | {mem_naive['temp'] / GIB:.1f} GiB "
        f"| {mem_naive['args'] / 2**20:.0f} MiB | {mem_naive['out'] / 2**20:.0f} MiB "
        f"| {total_naive / GIB:.1f} GiB | "
        + ("does not fit in 24 GiB |" if total_naive > 24 * GIB else "not run |"),
        "",
        f"Peak resident memory of this process: {rss / GIB:.2f} GiB after the run "
        f"({rss_before / GIB:.2f} GiB before it, with the inputs).",
    ]


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def parse_big(text: str) -> tuple[int, int, int] | None:
    if text == "none":
        return None
    try:
        n, d, v = (int(t) for t in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxDxV or none, got {text!r}") from None
    return n, d, v


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="N (default: 2048)")
    parser.add_argument("--dim", type=int, default=512, help="d (default: 512)")
    parser.add_argument("--vocab", type=parse_ints, default=(32768, 131072),
                        help="comma-separated V (default: 32768,131072)")
    parser.add_argument("--dtypes", type=lambda t: tuple(t.split(",")),
                        default=("float32", "bfloat16"), help="float32,bfloat16 (default)")
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds (default: 5)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="chunk_size for jaxlse (default: None, its own choice)")
    parser.add_argument("--big", type=parse_big, default=(32768, 256, 131072),
                        help="NxDxV run with jaxlse alone, or none (default: 32768x256x131072)")
    parser.add_argument("--big-dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true",
                        help="small shapes (N=256, d=64, V=4096,8191), no big shape")
    args = parser.parse_args(argv)
    if any(t not in DTYPES for t in args.dtypes):
        parser.error(f"--dtypes: choose from {sorted(DTYPES)}")
    if args.quick:
        args.tokens, args.dim, args.vocab, args.big, args.rounds = 256, 64, (4096, 8191), None, 3

    print("## linear_cross_entropy vs the materialised logits\n")
    print("```\n" + header() + "\n```\n")
    print(
        f"`jax.value_and_grad` with respect to (x, w) of the mean loss; jaxlse "
        f"`linear_cross_entropy(x, w, labels, bias=b, chunk_size={args.chunk})` against "
        "`optax.softmax_cross_entropy_with_integer_labels((x @ w + b).astype(float32), "
        f"labels).mean()`. Medians of {args.rounds} interleaved rounds; ratio jaxlse / naive "
        "(below 1: jaxlse is faster). Temp: compiled temporary memory in units of one float32 "
        f"logits array N·V·4. Targets: ratio <= {MAX_RATIO}, jaxlse temp <= {MAX_TEMP:.0%}.\n"
    )
    big = run_big(args) if args.big is not None else []  # first: a clean peak memory
    print("| N x d x V | dtype | jaxlse s | naive s | ratio | temp jaxlse | temp naive | target |")
    print("|---|---|--:|--:|--:|--:|--:|---|")
    for row in run_ab(args):
        print(row, flush=True)
    if big:
        print("\n### A shape the materialised logits cannot fit\n")
        for line in big:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

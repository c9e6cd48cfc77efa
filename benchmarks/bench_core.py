"""A/B benchmark of jaxlse against jax.nn (and optax, for cross_entropy) in one process.

For each function, shape and dtype it measures, with everything jitted and compiled before
timing:

* the time ratio jaxlse / reference of the forward pass and of ``jax.value_and_grad`` of a
  scalar loss (``sum(logsumexp(x))``, ``sum(f(x) * t)`` for a fixed random ``t``; results are
  cast to float32 before summing). Each round times a batch of jaxlse calls and a batch of
  reference calls back to back (the order alternates from round to round); the ratio is that of
  the median batch times;
* the compiled temporary memory (``memory_analysis().temp_size_in_bytes``) of both, as a
  multiple of the input's size ``N * V * itemsize``;
* the forward time divided by the time of a jitted elementwise copy of the same bytes
  (``x * 1.0078125``, which reads and writes ``N * V`` elements), for both: about 1 for a
  function that reads its input once and writes a full-size output; a reduction such as
  logsumexp, which writes only ``N`` values, can go below 1.

It prints a markdown table with a PASS/FAIL verdict against the targets (see ``CORE_TARGETS``
and ``CROSS_ENTROPY_TARGETS``). Speed is never asserted in the tests; it lives here.

Run from the repository root::

    python benchmarks/bench_core.py                        # all shapes, a few minutes
    python benchmarks/bench_core.py --quick                # tiny shapes, a smoke check
    python benchmarks/bench_core.py --shapes 256x1000 --dtypes float32 --functions logsumexp

Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib

import jaxlse

DEFAULT_SHAPES = ((256, 1000), (4096, 32768), (1024, 131072))
QUICK_SHAPES = ((32, 128), (64, 4096))
CORE_FUNCTIONS = ("logsumexp", "log_softmax", "softmax")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Inputs of at least this many elements get at most BIG_ROUNDS rounds.
BIG_ELEMENTS = 1 << 26
BIG_ROUNDS = 5
# A timed batch repeats a call until it lasts about this long (small shapes).
MIN_BATCH_SECONDS = 0.02

MAX_RATIO = 1.05  # no case slower than the reference by more than this


@dataclass(frozen=True)
class Target:
    """An upper bound on a time ratio jaxlse / reference: ``fwd`` or ``vg``."""

    label: str
    kind: str  # "fwd" or "vg"
    max_ratio: float
    shape: tuple[int, int] | None = None  # None: every shape
    dtype: str | None = None  # None: every dtype
    function: str | None = None  # None: every function

    def applies(self, function: str, shape: tuple[int, int], dtype: str) -> bool:
        return (
            (self.shape is None or self.shape == shape)
            and (self.dtype is None or self.dtype == dtype)
            and (self.function is None or self.function == function)
        )


CORE_TARGETS = (
    Target("fwd <= 1.05", "fwd", MAX_RATIO),
    Target("vg <= 1.05", "vg", MAX_RATIO),
    Target("fwd >= 3x faster", "fwd", 1 / 3, (1024, 131072), "float32", "logsumexp"),
)
CROSS_ENTROPY_TARGETS = (
    Target("fwd <= 1.05", "fwd", MAX_RATIO),
    Target("vg <= 1.05", "vg", MAX_RATIO),
    Target("bf16 vg >= 1.3x faster", "vg", 1 / 1.3, None, "bfloat16"),
    Target("fwd >= 3x faster", "fwd", 1 / 3, (1024, 131072), "float32"),
)


@dataclass(frozen=True)
class Case:
    """One function to compare: forward maps and scalar losses for jaxlse and the reference.

    All four take ``(x, second)``: ``second`` is the fixed ``t`` of the core losses (unused by
    the forward maps) or the integer labels of cross_entropy.
    """

    name: str
    ours: Callable[..., jax.Array]
    ref: Callable[..., jax.Array]
    ours_loss: Callable[..., jax.Array]
    ref_loss: Callable[..., jax.Array]
    targets: tuple[Target, ...]


@dataclass
class Row:
    function: str
    shape: tuple[int, int]
    dtype: str
    fwd_ratio: float
    vg_ratio: float
    temp_fwd: tuple[float, float]  # (jaxlse, reference), multiples of N * V * itemsize
    temp_vg: tuple[float, float]
    fwd_per_copy: tuple[float, float]  # (jaxlse, reference)
    failed: list[str]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Timing


def _batch_time(fn: Callable[..., Any], args: Sequence[Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        out = fn(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - start


def _calibrate(fns: Sequence[Callable[..., Any]], args: Sequence[Any]) -> int:
    """Calls per timed batch so that the slowest of ``fns`` lasts about MIN_BATCH_SECONDS."""
    single = max(_batch_time(f, args, 1) for f in fns)
    return max(1, math.ceil(MIN_BATCH_SECONDS / max(single, 1e-7)))


def time_ab(
    a: Callable[..., Any], b: Callable[..., Any], args: Sequence[Any], rounds: int
) -> tuple[float, float]:
    """Median seconds per call of ``a`` and ``b``, interleaved A/B (order alternating)."""
    for f in (a, b):  # warm-up: anything lazy happens here, not in round 1
        jax.block_until_ready(f(*args))
    number = _calibrate((a, b), args)
    ta: list[float] = []
    tb: list[float] = []
    for r in range(rounds):
        if r % 2 == 0:
            ta.append(_batch_time(a, args, number))
            tb.append(_batch_time(b, args, number))
        else:
            tb.append(_batch_time(b, args, number))
            ta.append(_batch_time(a, args, number))
    return statistics.median(ta) / number, statistics.median(tb) / number


def time_one(f: Callable[..., Any], args: Sequence[Any], rounds: int) -> float:
    jax.block_until_ready(f(*args))
    number = _calibrate((f,), args)
    return statistics.median(_batch_time(f, args, number) for _ in range(rounds)) / number


def compile_with_temp(f: Callable[..., Any], *args: Any) -> tuple[Callable[..., Any], int]:
    """Compiles ``jax.jit(f)`` for ``args``; returns the executable and its temp bytes."""
    compiled = jax.jit(f).lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = -1 if mem is None else int(mem.temp_size_in_bytes)
    return compiled, temp


# --------------------------------------------------------------------------------------------
# Cases


def _sum32(y: jax.Array) -> jax.Array:
    return jnp.sum(y.astype(jnp.float32))


def core_cases(functions: Sequence[str]) -> list[Case]:
    """jaxlse.{logsumexp, log_softmax, softmax} against jax.nn, over the last axis."""
    cases = []
    for name in functions:
        ours = partial(getattr(jaxlse, name), axis=-1)
        ref = partial(getattr(jax.nn, name), axis=-1)
        if name == "logsumexp":

            def ours_loss(x, t, f=ours):
                return _sum32(f(x))

            def ref_loss(x, t, f=ref):
                return _sum32(f(x))
        else:

            def ours_loss(x, t, f=ours):
                return _sum32(f(x) * t)

            def ref_loss(x, t, f=ref):
                return _sum32(f(x) * t)

        cases.append(
            Case(
                name,
                lambda x, t, f=ours: f(x),
                lambda x, t, f=ref: f(x),
                ours_loss,
                ref_loss,
                CORE_TARGETS,
            )
        )
    return cases


def run_cross_entropy(args: argparse.Namespace, shapes: Sequence[tuple[int, int]]) -> list[Row]:
    """jaxlse.cross_entropy(logits, labels) against optax's integer-label cross-entropy.

    Skipped (with a note) until ``jaxlse.cross_entropy`` exists. If jaxlse returns a reduced
    (0-d) loss, the reference is the mean of optax's per-example losses.
    """
    if not hasattr(jaxlse, "cross_entropy"):
        log("cross_entropy: jaxlse.cross_entropy does not exist yet; section skipped")
        return []
    import optax

    ours = jaxlse.cross_entropy
    probe = ours(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32))
    per_example = optax.softmax_cross_entropy_with_integer_labels
    if jnp.ndim(probe) == 0:

        def ref(x: jax.Array, labels: jax.Array) -> jax.Array:
            return jnp.mean(per_example(x, labels))
    else:
        ref = per_example
    case = Case(
        "cross_entropy",
        ours,
        ref,
        lambda x, labels: _sum32(ours(x, labels)),
        lambda x, labels: _sum32(ref(x, labels)),
        CROSS_ENTROPY_TARGETS,
    )

    def make_second(key: jax.Array, shape: tuple[int, int], dtype: Any) -> jax.Array:
        return jax.random.randint(key, shape[:1], 0, shape[1], jnp.int32)

    return run_cases([case], shapes, args, make_second)


# --------------------------------------------------------------------------------------------
# Driver


@partial(jax.jit, static_argnums=(1, 2, 3))
def _make_x(key: jax.Array, shape: tuple[int, int], dtype: Any, scale: float) -> jax.Array:
    # Logits scale * normal(0, 1); the default 4 is the size a trained classifier produces.
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@partial(jax.jit, static_argnums=(1, 2))
def _make_t(key: jax.Array, shape: tuple[int, int], dtype: Any) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0).astype(dtype)


def _copy(x: jax.Array) -> jax.Array:
    # 1 + 2**-7 is exact in bfloat16 and float32, so XLA cannot simplify the product away (in
    # bfloat16, 1.0001 rounds to 1 and ``x * 1`` compiles to nothing).
    return x * jnp.asarray(1.0078125, x.dtype)


def run_cases(
    cases: Sequence[Case],
    shapes: Sequence[tuple[int, int]],
    args: argparse.Namespace,
    make_second: Callable[[jax.Array, tuple[int, int], Any], jax.Array] = _make_t,
) -> list[Row]:
    """Benchmarks every case at every shape and dtype; holds one (x, second) pair at a time."""
    rows = []
    key = jax.random.key(0)
    for shape in shapes:
        rounds = args.rounds if math.prod(shape) < BIG_ELEMENTS else min(args.rounds, BIG_ROUNDS)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            kx, kt = jax.random.split(jax.random.fold_in(key, math.prod(shape)))
            x = jax.block_until_ready(_make_x(kx, shape, dtype, args.scale))
            second = jax.block_until_ready(make_second(kt, shape, dtype))
            nbytes = x.size * x.dtype.itemsize
            copy, _ = compile_with_temp(_copy, x)
            t_copy = time_one(copy, (x,), rounds)
            del copy
            for case in cases:
                log(f"{case.name} {shape[0]}x{shape[1]} {dtype_name} ({rounds} rounds)")
                ours_f, temp_of = compile_with_temp(case.ours, x, second)
                ref_f, temp_rf = compile_with_temp(case.ref, x, second)
                t_of, t_rf = time_ab(ours_f, ref_f, (x, second), rounds)
                del ours_f, ref_f
                ours_vg, temp_ov = compile_with_temp(jax.value_and_grad(case.ours_loss), x, second)
                ref_vg, temp_rv = compile_with_temp(jax.value_and_grad(case.ref_loss), x, second)
                t_ov, t_rv = time_ab(ours_vg, ref_vg, (x, second), rounds)
                del ours_vg, ref_vg
                gc.collect()
                fwd_ratio, vg_ratio = t_of / t_rf, t_ov / t_rv
                failed = [
                    tg.label
                    for tg in case.targets
                    if tg.applies(case.name, shape, dtype_name)
                    and (fwd_ratio if tg.kind == "fwd" else vg_ratio) > tg.max_ratio
                ]
                rows.append(
                    Row(
                        case.name,
                        shape,
                        dtype_name,
                        fwd_ratio,
                        vg_ratio,
                        (temp_of / nbytes, temp_rf / nbytes),
                        (temp_ov / nbytes, temp_rv / nbytes),
                        (t_of / t_copy, t_rf / t_copy),
                        failed,
                    )
                )
                log(f"  fwd {fwd_ratio:.2f}  vg {vg_ratio:.2f}  {'FAIL' if failed else 'PASS'}")
            del x, second
            gc.collect()
    return rows


# --------------------------------------------------------------------------------------------
# Report


def header() -> str:
    dev = jax.devices()[0]
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=True,
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
    return "\n".join(
        [
            f"jaxlse {jaxlse.__version__} (git {rev}), jax {jax.__version__}, "
            f"jaxlib {jaxlib.__version__}, Python {platform.python_version()}",
            f"device: {dev.platform} ({dev.device_kind}), {os.cpu_count()} cores, {cpu}",
            f"date: {now}",
        ]
    )


def table(title: str, ref_name: str, rows: Sequence[Row]) -> str:
    lines = [
        f"### {title}",
        "",
        f"Time ratios are jaxlse / {ref_name} of median times (below 1: jaxlse is faster); "
        "vg is `jax.value_and_grad` of a scalar loss. Temp memory is the compiled temporary "
        f"buffer size in units of N·V·itemsize (jaxlse / {ref_name}). fwd / copy is the "
        "forward time over that of a jitted `x * 1.0078125` (reads and writes N·V elements).",
        "",
        "| function | N x V | dtype | fwd ratio | vg ratio | temp fwd | temp vg "
        "| fwd / copy jaxlse | fwd / copy " + ref_name + " | target |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        verdict = "PASS" if not r.failed else "FAIL: " + ", ".join(r.failed)
        lines.append(
            f"| {r.function} | {r.shape[0]}x{r.shape[1]} | {r.dtype} | {r.fwd_ratio:.2f} "
            f"| {r.vg_ratio:.2f} | {r.temp_fwd[0]:.2f} / {r.temp_fwd[1]:.2f} "
            f"| {r.temp_vg[0]:.2f} / {r.temp_vg[1]:.2f} | {r.fwd_per_copy[0]:.2f} "
            f"| {r.fwd_per_copy[1]:.2f} | {verdict} |"
        )
    return "\n".join(lines)


def targets_text(targets: Sequence[Target]) -> str:
    parts = []
    for tg in targets:
        where = [
            s for s in (tg.function, tg.dtype, tg.shape and f"{tg.shape[0]}x{tg.shape[1]}") if s
        ]
        parts.append(f"{tg.label} ({', '.join(where) or 'every case'})")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Command line


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(","))
    except ValueError:
        shapes = ()
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes like 256x1000,4096x32768, got {text!r}")
    return shapes  # type: ignore[return-value]


def parse_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}"
            )
        return items

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=DEFAULT_SHAPES,
        help="comma-separated NxV (default: 256x1000,4096x32768,1024x131072)",
    )
    parser.add_argument(
        "--dtypes",
        type=parse_list(tuple(DTYPES)),
        default=tuple(DTYPES),
        help="comma-separated subset of float32,bfloat16 (default: both)",
    )
    parser.add_argument(
        "--functions",
        type=parse_list(CORE_FUNCTIONS + ("cross_entropy",)),
        default=CORE_FUNCTIONS + ("cross_entropy",),
        help="comma-separated subset of logsumexp,log_softmax,softmax,"
        "cross_entropy (default: all; cross_entropy once it exists)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=7,
        help=f"timed rounds per case; at most {BIG_ROUNDS} for inputs of "
        f"{BIG_ELEMENTS} elements or more (default: 7)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=4.0,
        help="logits are scale * normal(0, 1) (default: 4)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes and 3 rounds: a smoke check, not a measurement",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    shapes = args.shapes
    if args.quick:
        shapes, args.rounds = QUICK_SHAPES, min(args.rounds, 3)

    print("## jaxlse benchmark\n")
    print("```")
    print(header())
    print("```\n")
    print(f"Inputs: logits {args.scale:g} * normal(0, 1).\n")
    core = [f for f in args.functions if f in CORE_FUNCTIONS]
    if core:
        rows = run_cases(core_cases(core), shapes, args)
        print(table("logsumexp / log_softmax / softmax vs jax.nn", "jax.nn", rows))
        print(f"\nTargets: {targets_text(CORE_TARGETS)}.\n")
    if "cross_entropy" in args.functions:
        ce_rows = run_cross_entropy(args, shapes)
        if ce_rows:
            print(
                table(
                    "cross_entropy vs optax.softmax_cross_entropy_with_integer_labels",
                    "optax",
                    ce_rows,
                )
            )
            print(f"\nTargets: {targets_text(CROSS_ENTROPY_TARGETS)}.\n")
        else:
            print("cross_entropy: not benchmarked (jaxlse.cross_entropy does not exist yet).\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A tensor-parallel LM-head loss step with ``jaxlse.linear_cross_entropy`` on 8 CPU devices.

The output layer of a language model, ``w`` of shape (d, V), is split over the ``model`` axis of
a (data, model) mesh by its vocabulary (each device holds ``V / model`` columns, Megatron's
"vocab-parallel" layout), and the tokens over ``data``. Inside ``jax.shard_map``,
``linear_cross_entropy(..., axis_name="model")`` computes each device's slice of the logits
chunk by chunk (never the whole (tokens, V) block, not even the device's part of it) and joins the
per-token statistics across ``model``: only a few numbers per token cross devices. The step's
loss is the mean over every token (a ``psum`` over ``data`` as well), and its gradients with
respect to the hidden states and to ``w`` come back with the same shardings as the inputs.

The script prints what each device holds, then the loss and the gradient norms next to those
of the same loss computed on one device without any sharding, and exits with status 1 if they
disagree.

Run from the repository root::

    python examples/sharded_lm_head.py                       # one process, 8 CPU devices
    python examples/sharded_lm_head.py --processes 2         # 2 processes x 4 CPU devices

With ``--processes 2`` the script starts two copies of itself, each with 4 CPU devices, which
join through ``jax.distributed.initialize`` on 127.0.0.1 (CPU collectives over gloo) into one
8-device mesh; each reports its own devices' shards, process 0 the comparison, and the launcher
prints their reports one after the other.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

DEVICES = 8


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="A vocab-parallel LM-head loss step (jaxlse.linear_cross_entropy with "
        "axis_name) on a (data, model) mesh of 8 CPU devices.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tokens", type=_positive, default=512, help="tokens in the batch")
    parser.add_argument("--dim", type=_positive, default=64, help="hidden size d")
    parser.add_argument("--vocab", type=_positive, default=32768, help="vocabulary size V")
    parser.add_argument("--data", type=_positive, default=2, help="devices along 'data'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument(
        "--processes", type=int, choices=(1, 2), default=1,
        help="1: one process with 8 devices; 2: two processes with 4 devices each",
    )
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--timeout", type=_positive, default=300,
        help="seconds after which a multi-process run is stopped",
    )
    return parser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Starts ``--processes`` copies of this script (4 devices each), waits for them, then prints
    each one's standard output whole, in process order.

    The copies write to files of their own rather than to this process's stdout: two processes
    writing to one pipe interleave their text mid-line.
    """
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // 2}")
    outs = [tempfile.TemporaryFile(mode="w+") for _ in range(args.processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *argv, "--process-id", str(i), "--port", str(port)],
            env=env, stdout=out,
        )
        for i, out in enumerate(outs)
    ]
    deadline = time.monotonic() + args.timeout
    status = 0
    try:
        for p in procs:
            try:
                status = status or p.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                print(f"error: stopped after {args.timeout} s", file=sys.stderr)
                for q in procs:
                    q.kill()
                status = 1
                break
    finally:
        for out in outs:
            out.seek(0)
            sys.stdout.write(out.read())
            out.close()
        sys.stdout.flush()
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if DEVICES % args.data:
        parser.error(f"--data {args.data} must divide the {DEVICES} devices")
    model = DEVICES // args.data
    if args.vocab % model:
        parser.error(f"--vocab {args.vocab} must be a multiple of the {model} 'model' devices")
    if args.tokens % args.data:
        parser.error(f"--tokens {args.tokens} must be a multiple of --data {args.data}")
    if args.processes > 1 and args.process_id is None:
        return _launch(args, argv)

    multi = args.process_id is not None
    if not multi:
        os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={DEVICES}")
    import jax  # noqa: PLC0415 - after XLA_FLAGS, which sets the number of CPU devices

    if multi:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{args.port}", num_processes=args.processes, process_id=args.process_id,
            initialization_timeout=args.timeout,
        )
    return run(args, model)


def run(args: argparse.Namespace, model: int) -> int:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    import jaxlse  # noqa: PLC0415

    if jax.device_count() != DEVICES:
        print(f"error: {jax.device_count()} devices, need {DEVICES}", file=sys.stderr)
        return 2
    me = jax.process_index()
    say = print if me == 0 else (lambda *a, **k: None)
    mesh = jax.make_mesh(
        (args.data, model), ("data", "model"),
        axis_types=(jax.sharding.AxisType.Explicit,) * 2,
    )
    n, d, v = args.tokens, args.dim, args.vocab
    # The same global inputs on every process (from the seed), each process placing its part.
    rng = np.random.default_rng(args.seed)
    h_np = rng.standard_normal((n, d), dtype=np.float32)
    w_np = (rng.standard_normal((d, v), dtype=np.float32) * (2 / d**0.5)).astype(np.float32)
    b_np = (rng.standard_normal(v, dtype=np.float32) * 0.1).astype(np.float32)
    y_np = rng.integers(0, v, n).astype(np.int32)
    y_np[::17] = -100  # padding tokens, ignored

    def put(a: np.ndarray, spec: P) -> jax.Array:
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    h, w = put(h_np, P("data", None)), put(w_np, P(None, "model"))
    b, y = put(b_np, P("model")), put(y_np, P("data"))

    def local_loss(h: jax.Array, w: jax.Array, b: jax.Array, y: jax.Array) -> jax.Array:
        # This device's tokens against its slice of the vocabulary; the statistics of each
        # token are joined over 'model' inside linear_cross_entropy, and the token sum over
        # 'data' here. Labels are global vocabulary indices.
        total = jaxlse.linear_cross_entropy(
            h, w, y, bias=b, ignore_index=-100, z_loss=1e-4, reduction="sum",
            axis_name="model",
        )
        count = jnp.sum(y != -100)
        return jax.lax.psum(total, "data") / jax.lax.psum(count, "data")

    sharded = jax.shard_map(
        local_loss, mesh=mesh,
        in_specs=(P("data", None), P(None, "model"), P("model"), P("data")), out_specs=P(),
    )
    step = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))

    say(f"mesh: {dict(mesh.shape)} over {jax.process_count()} process(es); "
        f"tokens {n}, d {d}, vocabulary {v}")
    for name, arr in (("hidden", h), ("w", w), ("bias", b), ("labels", y)):
        for shard in arr.addressable_shards:
            rows = ", ".join(f"{s.start or 0}:{s.stop if s.stop is not None else dim}"
                             for s, dim in zip(shard.index, arr.shape, strict=True))
            print(f"process {me} {shard.device}: {name}[{rows}] {shard.data.shape}")

    loss, (gh, gw) = step(h, w, b, y)
    norms = jax.jit(lambda a, c: (jnp.linalg.norm(a), jnp.linalg.norm(c)))(gh, gw)
    sharded_vals = (float(loss), float(norms[0]), float(norms[1]))
    say(f"gradient shardings: hidden {gh.sharding.spec}, w {gw.sharding.spec}")

    # The same loss on one device, unsharded (each process computes it from the same inputs).
    dev = jax.local_devices()[0]
    h1, w1, b1, y1 = (jax.device_put(a, dev) for a in (h_np, w_np, b_np, y_np))

    def single(h: jax.Array, w: jax.Array) -> jax.Array:
        return jaxlse.linear_cross_entropy(h, w, y1, bias=b1, ignore_index=-100, z_loss=1e-4)

    loss1, (gh1, gw1) = jax.jit(jax.value_and_grad(single, argnums=(0, 1)))(h1, w1)
    single_vals = (float(loss1), float(jnp.linalg.norm(gh1)), float(jnp.linalg.norm(gw1)))
    say(f"{'':14}{'loss':>14}{'|grad hidden|':>16}{'|grad w|':>14}")
    say(f"{'8 devices':14}" + "".join(f"{x:>{k}.8g}" for x, k in zip(sharded_vals, (14, 16, 14),
                                                                   strict=True)))
    say(f"{'one device':14}" + "".join(f"{x:>{k}.8g}" for x, k in zip(single_vals, (14, 16, 14),
                                                                    strict=True)))
    close = np.allclose(sharded_vals, single_vals, rtol=2e-5, atol=0)
    say("agree" if close else "DISAGREE")
    return 0 if close else 1


if __name__ == "__main__":
    sys.exit(main())

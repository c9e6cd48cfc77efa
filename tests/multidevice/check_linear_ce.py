"""Issue 14 for ``linear_cross_entropy`` on 8 CPU devices (see ``check_sharding.py``).

1. Under ``jax.jit`` with the tokens sharded over ``data`` and ``w`` (and the bias and class
   weights) over the vocabulary on ``model``, on meshes of ``Auto`` and ``Explicit`` axes: the
   value and the gradients in ``x``, ``w`` and the bias equal the single-device ones, and the
   gradients keep their inputs' shardings.
2. The compiled programs move no (tokens, vocabulary) block between devices.
3. Inside ``jax.shard_map`` with ``axis_name="model"`` (each device holds a slice of the
   vocabulary, labels are global): every option's per-token losses and their derivatives
   (reverse in x, w and the bias, forward in x, a Hessian-vector product) equal the
   single-device ones, with chunk sizes that do and do not divide the slice; a gradient taken
   inside the ``shard_map`` equals the one outside.
4. The example ``examples/sharded_lm_head.py`` agrees with one device in one process of 8
   devices and in two processes of 4 (``jax.distributed`` on 127.0.0.1).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from check_sharding import assert_close, collectives, make_mesh
from helpers import Cases, fast_jit
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlse

ROOT = Path(__file__).resolve().parents[2]
N, D, V = 16, 8, 64  # 8 tokens per data device, 16 classes per model device
IGNORE = -100
TOL = dict(rtol=2e-5, atol=2e-6)


def _inputs() -> dict[str, jax.Array]:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, V, N)
    labels[3] = IGNORE
    labels[5] = 17  # on model device 1
    x = rng.normal(size=(N, D))
    x[7] = 0.0
    x[7, 0] = 60.0  # a dominated token: its label holds the max by far
    w = rng.normal(size=(D, V)) / 2
    w[0] /= 50
    w[0, labels[7]] = 1.0
    return {
        "x": jnp.asarray(x, jnp.float32),
        "w": jnp.asarray(w, jnp.float32),
        "b": jnp.asarray(rng.normal(size=V) / 4, jnp.float32),
        "y": jnp.asarray(labels, jnp.int32),
        "cw": jnp.asarray(rng.uniform(0.5, 1.5, V), jnp.float32),
        "keep": jnp.asarray(np.arange(N) != 9),
    }


# name -> keyword options of linear_cross_entropy (weight and where come from the inputs)
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "weight_ignore": dict(weight=True, ignore_index=IGNORE),
    "smoothing": dict(label_smoothing=0.1, ignore_index=IGNORE),
    "smoothing_weight": dict(label_smoothing=0.2, weight=True, ignore_index=IGNORE),
    "z_loss_cap": dict(z_loss=1e-3, soft_cap=8.0, ignore_index=IGNORE),
    "where_chunk": dict(where=True, ignore_index=IGNORE, chunk_size=6),
}


def _loss(x, w, b, y, cw, keep, opts: dict[str, Any], **extra: Any) -> jax.Array:
    kw = dict(opts)
    if "ignore_index" not in kw:
        y = jnp.where(y == IGNORE, 0, y)  # every token counts
    if kw.pop("weight", False):
        kw["weight"] = cw
    if kw.pop("where", False):
        kw["where"] = keep
    return jaxlse.linear_cross_entropy(x, w, y, bias=b, **kw, **extra)


def _derivatives(f, x, w, b, t, ct):
    """value, reverse-mode gradients in (x, w, b) of <f, ct>, jvp in x, and an HVP in x."""
    def obj(x, w, b):
        return jnp.sum(f(x, w, b) * ct)

    value = f(x, w, b)
    grads = jax.grad(obj, argnums=(0, 1, 2))(x, w, b)
    jvp = jax.jvp(lambda x: f(x, w, b), (x,), (t,))[1]
    hvp = jax.jvp(lambda x: jax.grad(obj)(x, w, b), (x,), (t,))[1]
    return {"value": value, "grad": grads, "jvp": jvp, "hvp": hvp}


@pytest.fixture(scope="module")
def smap_results() -> tuple[dict[str, Any], dict[str, Any]]:
    mesh = make_mesh(AxisType.Auto)
    a = _inputs()
    t = jnp.asarray(np.random.default_rng(5).normal(size=(N, D)), jnp.float32)
    ct = jnp.asarray(np.random.default_rng(6).uniform(0.5, 1.5, N), jnp.float32)
    specs = (P("data"), P(None, "model"), P("model"), P("data"), P("model"), P("data"))

    def sharded_all(x, w, b, t, ct):
        out = {}
        for name, opts in OPTIONS.items():
            f = jax.shard_map(
                lambda x, w, b, y, cw, keep, opts=opts: _loss(
                    x, w, b, y, cw, keep, dict(opts, reduction="none"), axis_name="model"),
                mesh=mesh, in_specs=specs, out_specs=P("data"))
            out[name] = _derivatives(
                lambda x, w, b, f=f: f(x, w, b, a["y"], a["cw"], a["keep"]), x, w, b, t, ct)
        return out

    def single_all(x, w, b, t, ct):
        return {
            name: _derivatives(
                lambda x, w, b, opts=opts: _loss(x, w, b, a["y"], a["cw"], a["keep"],
                                                 dict(opts, reduction="none")),
                x, w, b, t, ct)
            for name, opts in OPTIONS.items()
        }

    args = (a["x"], a["w"], a["b"], t, ct)
    # compared with tolerances: compiled with helpers.fast_jit
    return fast_jit(sharded_all)(*args), fast_jit(single_all)(*args)


def test_shard_map_axis_name_equals_single_device(smap_results) -> None:
    got, want = smap_results
    cases = Cases()
    for name in OPTIONS:
        for mode in want[name]:
            with cases.case(f"{name}:{mode}"):
                for g, w in zip(jax.tree.leaves(got[name][mode]),
                                jax.tree.leaves(want[name][mode]), strict=True):
                    assert np.isfinite(np.asarray(g)).all()
                    assert_close(g, w, **TOL, what=mode)
    cases.assert_all_passed(4 * len(OPTIONS))


def test_shard_map_dominated_token_keeps_relative_accuracy(smap_results) -> None:
    got, want = smap_results
    value, ref = got["plain"]["value"][7], want["plain"]["value"][7]
    assert 0 < float(ref) < 1e-20
    assert_close(value, ref, 1e-5, 0.0, "tiny loss")


def test_gradient_inside_shard_map_equals_outside() -> None:
    """A mean loss differentiated inside the shard_map (psum over data for the mean) gives the
    single-device gradients, sharded like their inputs."""
    mesh = make_mesh(AxisType.Auto)
    a = _inputs()
    opts = dict(label_smoothing=0.1, weight=True, ignore_index=IGNORE, chunk_size=6)

    def local(x, w, b, y, cw, keep):
        def total(x, w, b):
            s = _loss(x, w, b, y, cw, keep, dict(opts, reduction="sum"), axis_name="model")
            return jax.lax.psum(s, "data")

        return jax.grad(total, argnums=(0, 1, 2))(x, w, b)

    f = jax.jit(jax.shard_map(
        local, mesh=mesh,
        in_specs=(P("data"), P(None, "model"), P("model"), P("data"), P("model"), P("data")),
        out_specs=(P("data"), P(None, "model"), P("model"))))
    got = f(a["x"], a["w"], a["b"], a["y"], a["cw"], a["keep"])
    want = jax.grad(
        lambda x, w, b: _loss(x, w, b, a["y"], a["cw"], a["keep"], dict(opts, reduction="sum")),
        argnums=(0, 1, 2))(a["x"], a["w"], a["b"])
    # The w and bias gradients are summed over the data devices by the psum's transpose.
    for g, w_ in zip(got, want, strict=True):
        assert_close(g, w_, **TOL, what="inside")


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_jit_sharded_equals_single_device_and_moves_no_block(kind: AxisType) -> None:
    mesh = make_mesh(kind)
    a = _inputs()
    specs = {"x": P("data"), "w": P(None, "model"), "b": P("model"), "y": P("data"),
             "cw": P("model"), "keep": P("data")}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in a.items()}
    opts = dict(label_smoothing=0.1, weight=True, ignore_index=IGNORE, z_loss=1e-4)

    def vg(x, w, b, y, cw, keep):
        return jax.value_and_grad(
            lambda x, w, b: _loss(x, w, b, y, cw, keep, opts), argnums=(0, 1, 2))(x, w, b)

    args = [a[k] for k in ("x", "w", "b", "y", "cw", "keep")]
    sargs = [sharded[k] for k in ("x", "w", "b", "y", "cw", "keep")]
    want = jax.jit(vg)(*args)
    with jax.set_mesh(mesh):
        step = jax.jit(vg)
        got = step(*sargs)
        hlo = step.lower(*sargs).compile().as_text()
    for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, w_, **TOL, what=str(kind))
    gx, gw, gb = got[1]
    assert tuple(gx.sharding.spec)[:1] == ("data",), gx.sharding.spec
    assert tuple(gw.sharding.spec)[1:2] == ("model",), gw.sharding.spec
    block = N * V // 4  # one model device's part of the (N, V) logits
    big = [c for c in collectives(hlo) if c[1] >= block]
    assert not big, big


@pytest.mark.parametrize("processes", [1, 2])
def test_sharded_lm_head_example(processes: int) -> None:
    """examples/sharded_lm_head.py: 8 devices in one process, or 2 processes x 4 devices
    joined by jax.distributed on 127.0.0.1; the losses and gradient norms agree with one
    device."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, str(ROOT / "examples" / "sharded_lm_head.py"), "--tokens", "64",
           "--dim", "16", "--vocab", "1024", "--processes", str(processes), "--timeout", "120"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "agree" in proc.stdout and "DISAGREE" not in proc.stdout, out
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("8 devices", "one device"))]
    assert len(lines) == 2, out
    assert lines[0].split()[-3:] == lines[1].split()[-3:] or "agree" in proc.stdout
    # Every device reports its slice of w on a line of its own (the launcher relays each
    # process's output whole, so the two processes' lines never run into each other).
    held = [ln for ln in proc.stdout.splitlines() if ": w[" in ln]
    assert len(held) == 8, out
    assert all(re.fullmatch(r"process \d cpu:\d+: w\[0:16, \d+:\d+\] \(16, 256\)", ln)
               for ln in held), out
    assert len({ln.split()[2] for ln in held}) == 8, out  # eight distinct devices

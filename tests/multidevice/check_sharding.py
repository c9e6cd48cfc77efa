"""Issue 14, points 1-3, on 8 CPU devices: sharded inputs under ``jit`` and ``axis_name=``.

Run by ``tests/test_sharding.py`` in a subprocess (this directory's conftest sets ``XLA_FLAGS``
for 8 devices); by hand:
``python -m pytest -q -p no:cacheprovider -o python_files='check_*.py' tests/multidevice``.

1. Under ``jax.jit`` with ``NamedSharding`` inputs on a (data=2, model=4) mesh of ``Auto`` and of
   ``Explicit`` axes (batch over ``data``, classes over ``model``), every function with every
   option gives the single-device value and gradient, and its outputs keep the batch over
   ``data`` (and the classes over ``model`` for (N, V) outputs).
2. With the classes sharded, the compiled value, gradient and JVP programs move no block of
   the logits between devices: no collective's result is as large as one device's block.
3. Inside ``jax.shard_map`` with ``axis_name="model"`` (and a tuple of mesh axes), values equal
   the unsharded ones, and so do derivatives taken inside or outside the ``shard_map``, forward
   and reverse, a Hessian-vector product included, on rows whose edge cases (``-inf``, ``+inf``,
   NaN, a dominated row, masked rows) sit on one device.

Every reference is jaxlse on one device, in this process; one test compares with optax/jax.nn.
The cases of a configuration share one compiled function (``Cases`` names each failure).

``linear_cross_entropy`` is checked in ``check_linear_ce.py``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import Cases, fast_jit
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlse

if jax.device_count() != 8:  # pragma: no cover - the conftest sets XLA_FLAGS
    raise RuntimeError(
        f"check_sharding needs 8 CPU devices, got {jax.device_count()}: XLA_FLAGS was set too "
        "late (after the backend started); run it as tests/test_sharding.py does"
    )

F32, F64 = jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)
INF, NAN = float("inf"), float("nan")
DATA, MODEL = 2, 4
N, V = 8, 16  # 4 classes per device along model, 4 examples per device along data
IGNORE = -100


def make_mesh(kind: AxisType) -> jax.sharding.Mesh:
    return jax.make_mesh((DATA, MODEL), ("data", "model"), axis_types=(kind, kind))


def cotangent(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> jax.Array:
    """A fixed, seeded cotangent (or tangent) with no zero entries."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape), dtype)


def assert_close(got: Any, want: Any, rtol: float, atol: float, what: str) -> None:
    """Equal NaN and inf positions (and signs), the rest within ``atol + rtol * |want|``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


# --------------------------------------------------------------------------------------------
# The cases: every public function with every option. A case is f(x, y, w, q, keep, mask) with
# x the (N, V) logits, y integer labels (IGNORE at example 1), w per-class weights, q soft
# labels, keep an (N,) example mask (example 2 excluded) and mask an (N, V) entry mask. Each
# case says whether its output is per row ("rows"), (N, V) ("block") or a scalar.


def _cases(axis_name: Any = None) -> dict[str, tuple[str, Callable[..., jax.Array]]]:
    k = {} if axis_name is None else {"axis_name": axis_name}
    L, CE, NLL = jaxlse.log_softmax, jaxlse.cross_entropy, jaxlse.nll_loss

    def lse_keepdims(x, y, w, q, keep, mask):
        out, sign = jaxlse.logsumexp(x, axis=-1, keepdims=True, return_sign=True, **k)
        return (out * sign)[:, 0]

    cases = {
        "logsumexp": ("rows", lambda x, y, w, q, keep, mask: jaxlse.logsumexp(x, axis=-1, **k)),
        "logsumexp_where": (
            "rows", lambda x, y, w, q, keep, mask: jaxlse.logsumexp(x, -1, where=mask, **k)),
        "logsumexp_keepdims_sign": ("rows", lse_keepdims),
        "log_softmax": ("block", lambda x, y, w, q, keep, mask: L(x, **k)),
        "log_softmax_where": ("block", lambda x, y, w, q, keep, mask: L(x, where=mask, **k)),
        "softmax": ("block", lambda x, y, w, q, keep, mask: jaxlse.softmax(x, **k)),
        "softmax_where": (
            "block", lambda x, y, w, q, keep, mask: jaxlse.softmax(x, where=mask, **k)),
        "nll": ("scalar", lambda x, y, w, q, keep, mask: NLL(
            L(x, **k), y, ignore_index=IGNORE, **k)),
        "nll_weight_where_none": ("rows", lambda x, y, w, q, keep, mask: NLL(
            L(x, **k), y, weight=w, ignore_index=IGNORE, where=keep, reduction="none", **k)),
        "nll_weight_mean": ("scalar", lambda x, y, w, q, keep, mask: NLL(
            L(x, **k), y, weight=w, ignore_index=IGNORE, **k)),
        "nll_soft_sum": ("scalar", lambda x, y, w, q, keep, mask: NLL(
            L(x, **k), q, weight=w, reduction="sum", **k)),
        "ce": ("scalar", lambda x, y, w, q, keep, mask: CE(x, y, ignore_index=IGNORE, **k)),
        "ce_weight_mean": ("scalar", lambda x, y, w, q, keep, mask: CE(
            x, y, weight=w, ignore_index=IGNORE, **k)),
        "ce_smoothing_none": ("rows", lambda x, y, w, q, keep, mask: CE(
            x, y, ignore_index=IGNORE, label_smoothing=0.1, reduction="none", **k)),
        "ce_smoothing_weight_sum": ("scalar", lambda x, y, w, q, keep, mask: CE(
            x, y, weight=w, ignore_index=IGNORE, label_smoothing=0.2, reduction="sum", **k)),
        "ce_z_loss_none": ("rows", lambda x, y, w, q, keep, mask: CE(
            x, y, ignore_index=IGNORE, z_loss=1e-2, reduction="none", **k)),
        "ce_soft_cap_none": ("rows", lambda x, y, w, q, keep, mask: CE(
            x, y, ignore_index=IGNORE, soft_cap=2.0, reduction="none", **k)),
        "ce_where_mean": ("scalar", lambda x, y, w, q, keep, mask: CE(
            x, y, ignore_index=IGNORE, where=keep, **k)),
        "ce_soft_none": ("rows", lambda x, y, w, q, keep, mask: CE(
            x, q, weight=w, label_smoothing=0.1, reduction="none", **k)),
        "ce_soft_where_mean": ("scalar", lambda x, y, w, q, keep, mask: CE(
            x, q, z_loss=1e-2, where=keep, **k)),
        "ce_everything_mean": ("scalar", lambda x, y, w, q, keep, mask: CE(
            x, y, weight=w, ignore_index=IGNORE, label_smoothing=0.2, z_loss=1e-2,
            soft_cap=3.0, where=keep, **k)),
    }
    return cases


KINDS = {name: kind for name, (kind, _) in _cases().items()}


def _inputs(dtype: Any, edge: bool = False, n: int = N, v: int = V) -> dict[str, jax.Array]:
    """Seeded (n, v) inputs. With ``edge``, rows whose edge cases sit on one device's slice of 4
    classes (device d along model holds classes [4d, 4d + 4)):

    row 0: ordinary, label 1 (device 0) with the max on device 2;
    row 1: all -inf on device 1's slice (ignored example, label IGNORE);
    row 2: +inf at class 10 (device 2), example excluded by ``keep``; label 10;
    row 3: NaN at class 13 (device 3), label 0;
    row 4: dominated: every logit -40 but class 13 (device 3) at 0, label 13 (a loss of
           about 15 e^-40 = 6e-17: compared with a relative tolerance);
    row 5: all -inf (and all excluded by ``mask``), label 5;
    row 6: +inf at classes 2 and 9 (devices 0 and 2), label 6 off them (an infinite loss);
    row 7: ordinary, label 15 (device 3), max on device 0; all its entries but class 15
           excluded by ``mask``.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, v)) * 2.0
    y = rng.integers(0, v, n)
    y[1] = IGNORE
    keep = np.ones(n, bool)
    keep[2] = False
    mask = rng.uniform(size=(n, v)) < 0.8
    if edge:
        x[0, 9] = 8.0
        y[0] = 1
        x[1, 4:8] = -INF
        x[2, 10] = INF
        y[2] = 10
        x[3, 13] = NAN
        y[3] = 0
        x[4] = -40.0
        x[4, 13] = 0.0
        y[4] = 13
        x[5] = -INF
        mask[5] = False
        y[5] = 5
        x[6, [2, 9]] = INF
        y[6] = 6
        x[7, 0] = 8.0
        y[7] = 15
        mask[7] = False
        mask[7, 15] = True
    w = rng.uniform(0.5, 2.0, v)
    q = rng.dirichlet(np.ones(v), n)
    return {
        "x": jnp.asarray(x, dtype), "y": jnp.asarray(y, jnp.int32), "w": jnp.asarray(w, dtype),
        "q": jnp.asarray(q, dtype), "keep": jnp.asarray(keep), "mask": jnp.asarray(mask),
    }


ARGS = ("x", "y", "w", "q", "keep", "mask")
SPECS = {
    "x": P("data", "model"), "y": P("data"), "w": P("model"), "q": P("data", "model"),
    "keep": P("data"), "mask": P("data", "model"),
}
OUT_SPECS = {"rows": P("data"), "block": P("data", "model"), "scalar": P()}
# Tolerances, |got - want| <= atol + rtol |want|: a few ulps (the sharded reductions add in
# another order). Values have no absolute slack, so that tiny results (a dominated row's loss)
# must keep their relative accuracy; derivatives, whose entries are differences such as
# p - q, have an absolute accuracy of a few ulps of 1.
TOL = {F32: dict(rtol=4e-6, atol=4e-7), F64: dict(rtol=1e-13, atol=1e-15)}


def _objective(f: Callable[..., jax.Array], ct: jax.Array) -> Callable[..., jax.Array]:
    """``sum(f(...) * ct)`` as a function of ``(x, w, q)`` (the differentiable inputs)."""

    def obj(x, w, q, y, keep, mask):
        return jnp.sum(f(x, y, w, q, keep, mask) * ct)

    return obj


def _cotangents(dtype: Any, n: int = N, v: int = V, scalars: int = 1) -> dict[str, jax.Array]:
    """Cotangents for each kind of output; ``scalars`` > 1: one scalar per batch part."""
    shapes = {"rows": (n,), "block": (n, v), "scalar": (scalars,) if scalars > 1 else ()}
    return {kind: cotangent(shape, dtype, seed=i) for i, (kind, shape) in enumerate(shapes.items())}


# --------------------------------------------------------------------------------------------
# 1. jit over NamedSharding inputs, Auto and Explicit mesh axes (and 2., on the same programs)

# Large enough for the HLO check of point 2: one device's block of the logits is
# (N1 / 2) x (V1 / 4) = 1024 numbers; per-example statistics are N1 = 16, a per-class vector
# (the weight's gradient, summed over data) V1 / 4 = 128.
N1, V1 = 16, 512
BLOCK1 = (N1 // DATA) * (V1 // MODEL)


def _values_and_grads(a: dict[str, jax.Array], names: tuple[str, ...]) -> dict[str, Any]:
    """The cases' values and gradients with respect to (x, w, q), in one program."""
    cts = _cotangents(a["x"].dtype, N1, V1)
    cases = _cases()
    out = {}
    for name in names:
        kind, f = cases[name]
        grads = jax.grad(_objective(f, cts[kind]), argnums=(0, 1, 2))(
            a["x"], a["w"], a["q"], a["y"], a["keep"], a["mask"])
        out[name] = (f(*(a[n] for n in ARGS)), grads)
    return out


def _tangents(a: dict[str, jax.Array], names: tuple[str, ...]) -> dict[str, Any]:
    """The cases' JVPs along a tangent of x (and the values), in one program."""
    cases = _cases()
    t = jnp.sin(a["x"])
    return {name: jax.jvp(lambda x, f=cases[name][1]: f(x, *(a[n] for n in ARGS[1:])),
                          (a["x"],), (t,)) for name in names}


def _shard(a: dict[str, jax.Array], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    return {n: jax.device_put(v, NamedSharding(mesh, SPECS[n])) for n, v in a.items()}


def _spec(v: jax.Array) -> tuple[Any, ...]:
    spec = tuple(v.sharding.spec)
    return spec + (None,) * (v.ndim - len(spec))


@functools.cache
def _point1(kind: AxisType | None, program: str, dtype: Any = F32) -> tuple[Any, str]:
    """``(outputs, compiled HLO text)`` of one program (``"grad"``: values and gradients,
    ``"jvp"``: values and JVPs) on one device (``kind`` None) or on a mesh of ``kind`` axes.
    float64 runs a few cases only."""
    names = tuple(KINDS) if dtype == F32 else (
        "logsumexp_where", "log_softmax", "softmax", "nll_soft_sum", "ce_everything_mean")
    fn = {"grad": _values_and_grads, "jvp": _tangents}[program]
    # The outputs are compared with tolerances and the HLO for collectives (which the SPMD
    # partitioner places, whatever LLVM does later): compiled with helpers.fast_jit.
    with jax.enable_x64(dtype == F64):
        a = _inputs(dtype, n=N1, v=V1)
        if kind is None:
            compiled = fast_jit(fn, static_argnums=1).lower(a, names).compile()
            return compiled(a), compiled.as_text()
        mesh = make_mesh(kind)
        with jax.set_mesh(mesh):
            a = _shard(a, mesh)
            compiled = fast_jit(fn, static_argnums=1).lower(a, names).compile()
            return compiled(a), compiled.as_text()


MESH_KINDS = pytest.mark.parametrize(
    "kind", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])


@MESH_KINDS
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_jit_sharded_value_and_grad_equal_single_device(kind: AxisType, dtype: Any) -> None:
    got, _ = _point1(kind, "grad", dtype)
    want, _ = _point1(None, "grad", dtype)
    tol = TOL[dtype]
    cases = Cases()
    for name, (value, grads) in got.items():
        want_value, want_grads = want[name]
        with cases.case(name):
            assert value.dtype == dtype
            assert_close(value, want_value, tol["rtol"], 0.0, "value")
            for what, g, w in zip(("d/dx", "d/dw", "d/dq"), grads, want_grads, strict=True):
                assert_close(g, w, **tol, what=what)
            out = tuple(OUT_SPECS[KINDS[name]])
            expect = out + (None,) * (value.ndim - len(out))
            assert _spec(value) == expect, f"value sharding {_spec(value)}, expected {expect}"
            assert _spec(grads[0]) == ("data", "model"), f"d/dx sharding {_spec(grads[0])}"
    cases.assert_all_passed(len(got))


@MESH_KINDS
def test_jit_sharded_jvp_equal_single_device(kind: AxisType) -> None:
    got, _ = _point1(kind, "jvp")
    want, _ = _point1(None, "jvp")
    cases = Cases()
    for name, (value, tangent) in got.items():
        with cases.case(name):
            assert_close(value, want[name][0], TOL[F32]["rtol"], 0.0, "value")
            assert_close(tangent, want[name][1], **TOL[F32], what="jvp")
            out = tuple(OUT_SPECS[KINDS[name]])
            assert _spec(tangent) == out + (None,) * (tangent.ndim - len(out)), _spec(tangent)
    cases.assert_all_passed(len(KINDS))


def test_jit_sharded_agrees_with_optax_and_jax_nn() -> None:
    """A sanity check against other libraries on the explicit mesh: optax's cross-entropy
    (value and gradient) and jax.nn's log_softmax."""
    mesh = make_mesh(AxisType.Explicit)
    a = _inputs(F32)
    y = jnp.where(a["y"] < 0, 0, a["y"])
    xs = jax.device_put(a["x"], NamedSharding(mesh, SPECS["x"]))
    ys = jax.device_put(y, NamedSharding(mesh, SPECS["y"]))

    @jax.jit
    def ours(x, y):
        return jax.value_and_grad(lambda v: jaxlse.cross_entropy(v, y))(x), jaxlse.log_softmax(x)

    with jax.set_mesh(mesh):
        (loss, grad), lsm = ours(xs, ys)
    ref_loss, ref_grad = jax.value_and_grad(
        lambda v: optax.softmax_cross_entropy_with_integer_labels(v, y).mean())(a["x"])
    assert_close(loss, ref_loss, 1e-6, 0.0, "loss")
    assert_close(grad, ref_grad, 1e-6, 1e-7, "gradient")
    assert_close(lsm, jax.nn.log_softmax(a["x"]), 1e-6, 1e-6, "log_softmax")


# --------------------------------------------------------------------------------------------
# 2. The compiled programs move no block of the logits between devices

_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>all-gather|all-gather-start|all-to-all|all-reduce|all-reduce-start|"
    r"reduce-scatter|collective-permute|collective-permute-start|collective-broadcast)\("
)
_ARRAY = re.compile(r"\w+\[([\d,]*)\]")


def collectives(hlo: str) -> list[tuple[str, int, str]]:
    """``(op, elements, line)`` of each collective in compiled HLO text; a tuple-shaped
    result (an async start, or combined all-reduces) counts its largest array."""
    found = []
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if match:
            sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                     for dims in _ARRAY.findall(match.group("shape"))]
            found.append((match.group("op"), max(sizes), line.strip()[:300]))
    return found


def test_hlo_check_sees_a_gathered_block() -> None:
    """The HLO check can fail: a program that gathers the classes is caught."""
    mesh = make_mesh(AxisType.Auto)
    x = _shard(_inputs(F32, n=N1, v=V1), mesh)["x"]

    def gathers(x):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data", None))) * 2

    found = collectives(jax.jit(gathers).lower(x).compile().as_text())
    assert any(n >= BLOCK1 for _, n, _ in found), found


@MESH_KINDS
@pytest.mark.parametrize("program", ["grad", "jvp"], ids=["value_and_grad", "value_and_jvp"])
def test_hlo_no_block_crosses_devices(kind: AxisType, program: str) -> None:
    """Every case's value with its gradient (one program), and with its JVP (another)."""
    _, hlo = _point1(kind, program)
    found = collectives(hlo)
    assert found, "no collective at all: the classes were not reduced across devices"
    big = [line for _, n, line in found if n >= BLOCK1]
    assert not big, f"{len(big)} collectives of a block or more (>= {BLOCK1} numbers):\n" + (
        "\n".join(big))


# --------------------------------------------------------------------------------------------
# 3. axis_name= inside shard_map

SMAP_CASES = (
    "logsumexp", "logsumexp_where", "log_softmax", "log_softmax_where", "softmax_where",
    "nll_weight_where_none", "nll_soft_sum", "ce_weight_mean", "ce_smoothing_weight_sum",
    "ce_z_loss_none", "ce_soft_cap_none", "ce_soft_none", "ce_everything_mean",
)
MODES = ("value", "grad", "jvp", "hvp", "grad_inside", "jvp_inside", "hvp_inside")


def _smap_programs(
    mesh: jax.sharding.Mesh, axis_name: Any, specs: dict[str, P], shards: int,
    names: tuple[str, ...], modes: tuple[str, ...],
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(sharded, reference)``: jitted functions of the inputs ``a``, a tangent ``t`` of x and
    the cotangents, giving each case's ``modes``: value; gradient with respect to (x, w, q),
    JVP and Hessian-vector product of x, from outside the shard_map and (``*_inside``)
    differentiated inside it. The reference computes them on one device.

    With the batch split into ``shards`` parts, the sharded scalars (sums and means of the
    part's examples) are one per part, and the reference computes each case on each part."""
    sharded_cases, plain_cases = _cases(axis_name), _cases()
    batch = specs["x"][0]
    out_specs = {"rows": P(batch), "block": P(batch, specs["x"][1]),
                 "scalar": P(batch) if shards > 1 else P()}
    in_specs = tuple(specs[n] for n in ARGS)

    def per_part(f, kind):
        if kind == "scalar" and shards > 1:
            return lambda *args: f(*args).reshape(1)
        return f

    def derivatives(full, ct, a, t, inside):
        x, w, q, rest = a["x"], a["w"], a["q"], (a["y"], a["keep"], a["mask"])
        grad = jax.grad(_objective(full, ct), argnums=(0, 1, 2))
        out = {}
        if "value" in modes and not inside:
            out["value"] = full(x, a["y"], w, q, a["keep"], a["mask"])
        if "grad" in modes:
            if inside:  # reverse mode by vjp, inside
                pull = jax.vjp(lambda x, w, q: full(x, a["y"], w, q, a["keep"], a["mask"]),
                               x, w, q)[1]
                out["grad"] = pull(ct)
            else:
                out["grad"] = grad(x, w, q, *rest)
        if "jvp" in modes:
            out["jvp"] = jax.jvp(lambda x: full(x, a["y"], w, q, a["keep"], a["mask"]),
                                 (x,), (t,))[1]
        if "hvp" in modes:
            out["hvp"] = jax.jvp(lambda x: grad(x, w, q, *rest)[0], (x,), (t,))[1]
        return out

    def sharded(a, t, cts):
        out = {}
        for name in names:
            kind, f = sharded_cases[name]
            ct, f_part = cts[kind], per_part(f, kind)
            full = jax.shard_map(f_part, mesh=mesh, in_specs=in_specs, out_specs=out_specs[kind])
            out[name] = derivatives(full, ct, a, t, inside=False)
            if any(m.endswith("_inside") for m in modes):

                def inside(args, t, ct, f_part=f_part):
                    local = dict(zip(ARGS, args, strict=True))
                    return derivatives(f_part, ct, local, t, inside=True)

                res = jax.shard_map(
                    inside, mesh=mesh, in_specs=(in_specs, specs["x"], out_specs[kind]),
                    out_specs={m: {"grad": (specs["x"], specs["w"], specs["q"]),
                                   "jvp": out_specs[kind], "hvp": specs["x"]}[m]
                               for m in ("grad", "jvp", "hvp") if f"{m}_inside" in modes},
                )(tuple(a[n] for n in ARGS), t, ct)
                out[name].update({f"{m}_inside": v for m, v in res.items()})
        return out

    def reference(a, t, cts):
        out = {}
        size = N // shards
        for name in names:
            kind, f = plain_cases[name]

            def full(x, y, w, q, keep, mask, f=f, kind=kind):
                parts = [f(x[r], y[r], w, q[r], keep[r], mask[r])
                         for r in (slice(i * size, (i + 1) * size) for i in range(shards))]
                if kind == "scalar":
                    return jnp.stack(parts) if shards > 1 else parts[0]
                return jnp.concatenate(parts)

            res = derivatives(full, cts[kind], a, t, inside=False)
            out[name] = {**res, **{f"{m}_inside": v for m, v in res.items() if m != "value"}}
        return out

    # compared with tolerances: compiled with helpers.fast_jit
    return fast_jit(sharded), fast_jit(reference)


# Where the single-device derivatives are not finite (NaN) on the +inf rows of the edge inputs
# and the sharded ones are clean: (case, mode) -> the rows. The second derivatives of a
# +inf row with the +inf at the label (row 2) and the
# derivatives of a z-loss whose value is +inf (rows 2, 5 and 6).
# Checked by test_shard_map_axis_name_cleaner_than_one_device.
KNOWN = {
    **{(c, m): {2} for c in ("ce_weight_mean", "ce_smoothing_weight_sum")
       for m in ("hvp", "hvp_inside")},
    **{("ce_z_loss_none", m): {2, 5, 6} for m in MODES if m != "value"},
}


def _rows(v: np.ndarray, rows: Any, keep_known: bool) -> np.ndarray:
    """The rows of ``v`` (of N rows) outside (or, with ``keep_known``, in) ``rows``."""
    if v.ndim == 0 or v.shape[0] != N:
        return v if keep_known else v[:0]
    sel = np.zeros(N, bool)
    sel[list(range(N)) if rows == "*" else sorted(rows)] = True
    return v[sel] if keep_known else v[~sel]


@functools.cache
def _smap_results(dtype: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    modes = MODES if dtype == F32 else ("value", "grad")
    with jax.enable_x64(dtype == F64):
        sharded, reference = _smap_programs(
            make_mesh(AxisType.Auto), "model", SPECS, DATA, SMAP_CASES, modes)
        a = _inputs(dtype, edge=True)
        t = cotangent((N, V), dtype, seed=7)
        cts = _cotangents(dtype, scalars=DATA)
        return sharded(a, t, cts), reference(a, t, cts)


def _compare_smap(got, want, dtype, known: bool) -> Cases:
    cases = Cases()
    for name in SMAP_CASES:
        for mode, g_tree in got[name].items():
            rows = KNOWN.get((name, mode))
            if known and rows is None:
                continue
            with cases.case(f"{name}:{mode}"):
                tol = TOL[dtype] if mode != "value" else dict(rtol=TOL[dtype]["rtol"], atol=0.0)
                leaves = zip(jax.tree.leaves(g_tree), jax.tree.leaves(want[name][mode]),
                             strict=True)
                for i, (g, w) in enumerate(leaves):
                    g, w = np.asarray(g), np.asarray(w)
                    if rows is not None:
                        if i > 0 and not known:
                            continue  # d/dw and d/dq sum over the rows
                        g, w = _rows(g, rows, known), _rows(w, rows, known)
                    assert_close(g, w, **tol, what=f"{mode} leaf {i}")
    return cases


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_shard_map_axis_name(dtype: Any) -> None:
    """Every value and derivative (float32: inside and outside the shard_map, forward and
    reverse, a Hessian-vector product; float64: value and gradient) equals the single-device
    one on the edge rows, but for the KNOWN disagreements (tested below)."""
    got, want = _smap_results(dtype)
    cases = _compare_smap(got, want, dtype, known=False)
    cases.assert_all_passed(len(SMAP_CASES) * len(next(iter(got.values()))))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_shard_map_axis_name_cleaner_than_one_device(dtype: Any) -> None:
    """On the KNOWN rows the sharded derivatives have no NaN, and no more infinite entries
    than the single-device ones (which are not finite there)."""
    got, want = _smap_results(dtype)
    cases = Cases()
    checked = 0
    for (name, mode), rows in KNOWN.items():
        if mode not in got[name]:
            continue
        checked += 1
        with cases.case(f"{name}:{mode}"):
            g = _rows(np.asarray(jax.tree.leaves(got[name][mode])[0]), rows, True)
            w = _rows(np.asarray(jax.tree.leaves(want[name][mode])[0]), rows, True)
            assert not np.isfinite(w).all() or np.abs(w).max() > 1e30, "one device is clean"
            if name.startswith("ce_z_loss"):
                # The loss itself is +inf on these rows (on one device and sharded): its
                # derivatives are not compared, the values are.
                for res in (got, want):
                    value = _rows(np.asarray(res[name]["value"]), rows, True)
                    assert np.isposinf(value).all(), value
                continue
            assert (~np.isfinite(g)).sum() <= (~np.isfinite(w)).sum(), g
            assert not np.isnan(g).any(), g
    cases.assert_all_passed(checked)


def test_shard_map_axis_name_tuple() -> None:
    """axis_name=('data', 'model'): the classes in 8 slices of 2 over both mesh axes, the batch
    unsplit; values and gradients (outside and inside) on ordinary rows."""
    classes = ("data", "model")
    specs = {
        "x": P(None, classes), "y": P(), "w": P(classes), "q": P(None, classes),
        "keep": P(), "mask": P(None, classes),
    }
    names = ("logsumexp", "softmax_where", "nll_weight_where_none", "ce_everything_mean")
    sharded, reference = _smap_programs(
        make_mesh(AxisType.Auto), classes, specs, 1, names, ("value", "grad", "grad_inside"))
    a, t, cts = _inputs(F32), cotangent((N, V), F32, seed=7), _cotangents(F32)
    got, want = sharded(a, t, cts), reference(a, t, cts)
    cases = Cases()
    for name in names:
        for mode in got[name]:
            with cases.case(f"{name}:{mode}"):
                tol = TOL[F32] if mode != "value" else dict(rtol=TOL[F32]["rtol"], atol=0.0)
                for g, w in zip(jax.tree.leaves(got[name][mode]),
                                jax.tree.leaves(want[name][mode]), strict=True):
                    assert_close(g, w, **tol, what=mode)
    cases.assert_all_passed(3 * len(names))


def test_shard_map_dominated_row_keeps_relative_accuracy() -> None:
    """Edge row 4 (one logit 40 above the rest, on device 3 of model): its loss, about
    15 e^-40, and the dominant log-probability are tiny and must not round to 0."""
    got, _ = _smap_results(F32)
    exact = 15 * np.exp(-40.0)
    w13 = float(_inputs(F32)["w"][13])
    assert_close(got["logsumexp"]["value"][4], exact, 1e-5, 0.0, "logsumexp")
    assert_close(got["log_softmax"]["value"][4, 13], -exact, 1e-5, 0.0, "log_softmax")
    assert_close(got["nll_weight_where_none"]["value"][4], w13 * exact, 1e-5, 0.0, "nll")

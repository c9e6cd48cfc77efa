"""Tests for ``jaxlse.nll_loss`` and ``jaxlse.cross_entropy``.

Sections, in the order of the issue:

1. the worked example;
2. agreement with PyTorch: the golden file ``tests/data/torch_golden.npz`` (every case, float64,
   values and gradients) and, when torch is importable, a live comparison;
3. agreement with optax where the options overlap;
4. derivatives: ``check_grads`` to second order, hessians against a plain autodiff formula, and
   the custom JVP rule in the jaxpr;
5. accuracy in ulps against an exact float64 reference (float32, float16, bfloat16);
6. ``-inf``, NaN and excluded rows;
7. bad arguments and out-of-range labels;
8. memory of the compiled ``value_and_grad``;
9. transformations (jit, vmap, grad), retracing, traced options, the class axis, dtypes.

Plain pytest functions only; every input is seeded. The conftest turns on strict dtype
promotion and ``rank_promotion="raise"``. Almost everything runs under ``jax.jit``: on
XLA:CPU each new shape costs a compilation per operation when run eagerly.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import DISTRIBUTIONS as SHARED_DISTRIBUTIONS
from helpers import (
    Cases,
    check_grads,
    cond_branches,
    fast_compile_options,
    fast_jit,
    ref_log_softmax,
    ref_logsumexp,
    ref_softmax,
    ulp,
    ulp_error,
)
from jax import lax

import jaxlse
from jaxlse import _rowstats

F16, BF16, F32, F64 = (jnp.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
INF = float("inf")
NAN = float("nan")
TINY32 = float(np.finfo(np.float32).tiny)  # XLA:CPU flushes float32 results below this to 0

# Closeness of jaxlse to optax, |a - e| <= atol + rtol * |e|: a few ulps of the loss, and of 1
# for the gradient, whose entries p_c - q_c lie in [-1, 1] (an entry near 0 has only an
# absolute accuracy). Measured: float32 2.5e-7 relative (loss), 1.2e-7 absolute (gradient);
# float64 3.4e-16 and 2.2e-16.
TOL = {
    F32: {"rtol": 1e-6, "atol": 3e-7},
    F64: {"rtol": 2e-15, "atol": 1e-15},
}
# Accuracy bound in float32 ulps of the loss (the requirement).
ULP_BOUND = 4.0


# For the 342 golden cases, whose compilation dominates their run time: helpers.fast_jit's
# options (LLVM's expensive passes off, and with jax 0.10.2 XLA:CPU's elemental emitters), which
# leave every value and gradient unchanged. Measured, the 24 shapes' programs compiled one after
# the other in one process: jax 0.10.2 15.6 s, against 18.6 s with the fusion emitters kept.


def loss_and_grad_traced(f: Callable[[jax.Array], jax.Array], x: Any) -> tuple[Any, Any]:
    """``f(x)`` and the gradient of its sum with respect to ``x`` (for use inside a jit)."""
    loss, vjp = jax.vjp(f, jnp.asarray(x))
    return loss, vjp(jnp.ones_like(loss))[0]


def loss_and_grad(
    f: Callable[..., jax.Array], x: Any, *args: Any, compiler_options: dict | None = None
) -> tuple[jax.Array, jax.Array]:
    """``f(x, *args)`` and the gradient of its sum with respect to ``x``, under one ``jit``."""

    def value_and_grad(v, *a):
        return loss_and_grad_traced(lambda u: f(u, *a), v)

    lowered = jax.jit(value_and_grad).lower(x, *args)
    return lowered.compile(compiler_options=compiler_options)(x, *args)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _logits(shape, dtype=F32, seed=0, scale=2.0) -> np.ndarray:
    return (scale * _rng(seed).standard_normal(shape)).astype(dtype)


def _int_labels(batch, num_classes, seed=0) -> np.ndarray:
    """int64, which becomes JAX's default integer dtype (int32 unless x64 is on)."""
    return _rng(seed + 1).integers(0, num_classes, batch)


def _soft_labels(shape, dtype=F32, seed=0) -> np.ndarray:
    """Rows of probabilities (classes last), some of them with zero entries."""
    rng = _rng(seed + 2)
    q = rng.dirichlet(np.full(shape[-1], 0.5), size=shape[:-1])
    q = np.where(rng.random(shape) < 0.2, 0.0, q)
    q[..., 0] += 1e-3  # no all-zero row
    return (q / q.sum(-1, keepdims=True)).astype(dtype)


# --------------------------------------------------------------------------------------------
# float64 references (numpy, classes last)


def ref_cross_entropy(
    x: Any,
    labels: Any,
    *,
    weight: Any = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    soft_cap: float | None = None,
    reduction: str = "mean",
    where: Any = None,
) -> np.ndarray:
    """The documented loss, written out in float64 NumPy from the float64 log_softmax reference.

    Terms whose weighted target is 0 are 0 (even against a ``-inf`` log-probability); rows that do
    not count are 0; "mean" divides by the summed weights of the counted rows (0 if there are
    none).
    """
    x = np.asarray(x).astype(np.float64)
    if soft_cap is not None:
        x = soft_cap * np.tanh(x / soft_cap)
    batch, c = x.shape[:-1], x.shape[-1]
    w = np.ones(c) if weight is None else np.asarray(weight).astype(np.float64)
    labels = np.asarray(labels)
    counted = np.ones(batch, bool)
    if where is not None:
        counted = counted & np.broadcast_to(np.asarray(where, bool), batch)
    eps = label_smoothing
    if np.issubdtype(labels.dtype, np.floating):
        b = (labels.astype(np.float64) * (1 - eps) + eps / c) * w
        scale = np.ones(batch)
    else:
        if ignore_index is not None:
            counted = counted & (labels != ignore_index)
        idx = np.where(counted, labels, 0)
        scale = w[idx]
        b = (1 - eps) * scale[..., None] * np.eye(c)[idx] + eps / c * w
    logp = ref_log_softmax(x)
    with np.errstate(invalid="ignore"):
        loss = np.sum(np.where(b == 0, 0.0, -b * logp), axis=-1)
    if z_loss:
        loss = loss + z_loss * scale * ref_logsumexp(x) ** 2
    loss = np.where(counted, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return np.asarray(loss.sum())
    denom = np.sum(np.where(counted, scale, 0.0))
    return np.asarray(loss.sum() / denom if denom > 0 else 0.0)


def ref_grad_sum(x: Any, labels: Any, **kw: Any) -> np.ndarray:
    """float64 gradient of the summed per-example loss, classes last: ``sum(b) p - b``.

    For integer or soft labels with ``weight`` only (no smoothing, z-loss, soft cap or masks).
    """
    x = np.asarray(x).astype(np.float64)
    c = x.shape[-1]
    w = np.ones(c) if kw.get("weight") is None else np.asarray(kw["weight"], np.float64)
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.floating):
        b = labels.astype(np.float64) * w
    else:
        b = w[labels][..., None] * np.eye(c)[labels]
    return np.sum(b, axis=-1, keepdims=True) * ref_softmax(x) - b


def careful_ce_f64(x: Any, labels: Any) -> np.ndarray:
    """Exact per-example loss in float64: ``log1p(sum_{j != argmax} exp(x_j - m)) + (m - x_y)``.

    The dominant entry's 1 is never added to the small terms, so a tiny loss (a confident,
    correct prediction) keeps its full relative accuracy.
    """
    x = np.asarray(x).astype(np.float64)
    k = np.argmax(x, axis=-1)[..., None]
    m = np.take_along_axis(x, k, -1)
    e = np.exp(x - m)
    np.put_along_axis(e, k, 0.0, -1)
    x_y = np.take_along_axis(x, np.asarray(labels)[..., None], -1)
    return (np.log1p(np.sum(e, axis=-1, keepdims=True)) + (m - x_y))[..., 0]


def plain_cross_entropy(
    x: jax.Array,
    labels: jax.Array,
    *,
    weight: Any = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    soft_cap: float | None = None,
    reduction: str = "mean",
    where: Any = None,
) -> jax.Array:
    """The same loss written with plain ``jax.numpy`` (ordinary autodiff, no custom rule)."""
    if soft_cap is not None:
        x = soft_cap * jnp.tanh(x / soft_cap)
    batch, c = x.shape[:-1], x.shape[-1]
    w = jnp.ones(c, x.dtype) if weight is None else jnp.asarray(weight, x.dtype)
    m = lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    lse = jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True)) + m
    logp = x - lse
    counted = jnp.ones(batch, bool) if where is None else jnp.broadcast_to(where, batch)
    eps = label_smoothing
    if jnp.issubdtype(labels.dtype, jnp.floating):
        b = (labels * (1 - eps) + eps / c) * jnp.broadcast_to(w, x.shape)
        scale = jnp.ones(batch, x.dtype)
    else:
        if ignore_index is not None:
            counted = counted & (labels != ignore_index)
        idx = jnp.where(counted, labels, 0)
        scale = w[idx]
        onehot = jax.nn.one_hot(idx, c, dtype=x.dtype)
        b = (1 - eps) * scale[..., None] * onehot + eps / c * jnp.broadcast_to(w, x.shape)
    loss = -jnp.sum(b * logp, axis=-1) + z_loss * scale * lse[..., 0] ** 2
    loss = jnp.where(counted, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    return jnp.sum(loss) / jnp.sum(jnp.where(counted, scale, 0.0))


def _assert_close(actual: Any, expected: Any, dtype, err_msg: str = "") -> None:
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), err_msg=err_msg,
        **TOL[jnp.dtype(dtype)]
    )


# --------------------------------------------------------------------------------------------
# 1. The worked example


WORKED_LOGITS = [[2.0, 5.0, 3.0], [1.0, 2.0, 7.0], [6.0, 3.0, 1.0], [4.0, 3.0, 3.0]]
WORKED_LABELS = [1, 2, 1, 0]


@pytest.mark.parametrize("fn", ["nll_loss", "cross_entropy"])
def test_worked_example(fn):
    logits, labels = jnp.asarray(WORKED_LOGITS), jnp.asarray(WORKED_LABELS)
    if fn == "nll_loss":
        loss = jaxlse.nll_loss(jaxlse.log_softmax(logits), labels)
    else:
        loss = jaxlse.cross_entropy(logits, labels)
    assert loss.dtype == F32 and loss.shape == ()
    assert round(float(loss), 4) == 0.9464
    ref = ref_cross_entropy(np.asarray(WORKED_LOGITS), np.asarray(WORKED_LABELS))
    assert ulp_error(loss, ref) <= ULP_BOUND


# --------------------------------------------------------------------------------------------
# 2. Agreement with PyTorch

GOLDEN_PATH = Path(__file__).resolve().parent / "data" / "torch_golden.npz"


def _load_golden() -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    with np.load(GOLDEN_PATH, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


GOLDEN_META, GOLDEN = _load_golden()


def _golden_id(i: int, case: dict[str, Any]) -> str:
    parts = [
        f"{i}",
        case["fn"],
        case["tag"],
        "soft" if case["soft"] else "int",
        case["reduction"],
        f"ls{case['label_smoothing']}",
        f"ign{case['ignore_index']}",
        "w" if case["has_weight"] else "now",
    ]
    return "-".join(parts)


# Relative tolerance to torch in float64, and an absolute one (about 4 ulp of 1) for entries
# that are 0 up to round-off: gradients of classes with tiny probability, and the tiny losses
# of confident predictions, which torch computes as x_y - logsumexp(x) (measured: 1.5e-16).
GOLDEN_TOL = {"rtol": 1e-10, "atol": 1e-15}


def _golden_loss(case: dict[str, Any]) -> Callable[..., jax.Array]:
    """``f(logits, labels, weight)``: the case's loss, as the case's options say."""
    kw = {"ignore_index": case["ignore_index"], "reduction": case["reduction"]}
    if case["fn"] == "cross_entropy":

        def f(v, labels, weight):
            return jaxlse.cross_entropy(v, labels, weight=weight,
                                        label_smoothing=case["label_smoothing"], **kw)

    else:
        assert case["label_smoothing"] == 0.0 and not case["soft"]

        def f(v, labels, weight):
            return jaxlse.nll_loss(jaxlse.log_softmax(v), labels, weight=weight, **kw)

    return f


# The golden cases by logits shape (24 shapes, 14 or 15 option sets each). One compilation per
# shape evaluates all of its cases: the cases' options are all static, so one compilation per
# case would be 342 of them (155 s of the suite's 578 s on 2 cores, for programs of a few ms).
GOLDEN_SHAPES: dict[tuple[int, ...], list[int]] = {}
for _i, _case in enumerate(GOLDEN_META):
    GOLDEN_SHAPES.setdefault(tuple(_case["shape"]), []).append(_i)


@pytest.mark.parametrize("shape", list(GOLDEN_SHAPES), ids=str)
def test_matches_torch_golden(x64, shape):
    """Every golden case of one logits shape: loss and gradient equal PyTorch's (float64).

    Each case keeps its own loss function and options; they are traced together under one
    ``jit``, and each is checked on its own: a failure names every failing case (its
    ``_golden_id``) with its message.
    """
    ids = GOLDEN_SHAPES[shape]
    losses = [_golden_loss(GOLDEN_META[i]) for i in ids]
    args = [(GOLDEN[f"case{i}_logits"], GOLDEN[f"case{i}_labels"], GOLDEN.get(f"case{i}_weight"))
            for i in ids]

    def every_case(all_args):
        return [loss_and_grad_traced(lambda u, f=f, a=a: f(u, a[1], a[2]), a[0])
                for f, a in zip(losses, all_args, strict=True)]

    cases = Cases()
    for i, (loss, grad) in zip(ids, fast_jit(every_case)(args), strict=True):
        with cases.case(_golden_id(i, GOLDEN_META[i])):
            assert GOLDEN[f"case{i}_logits"].shape == shape
            assert loss.dtype == grad.dtype == F64, (loss.dtype, grad.dtype)
            np.testing.assert_allclose(loss, GOLDEN[f"case{i}_loss"], err_msg="loss",
                                       **GOLDEN_TOL)
            np.testing.assert_allclose(grad, GOLDEN[f"case{i}_grad"], err_msg="gradient",
                                       **GOLDEN_TOL)
    cases.assert_all_passed(expected=len(ids))


def test_golden_file_covers_the_options():
    """The golden file has what the issue asks for (a guard against a truncated file)."""
    seen = {(c["fn"], c["soft"], c["reduction"], c["has_weight"]) for c in GOLDEN_META}
    for red in ("none", "sum", "mean"):
        for hw in (False, True):
            assert ("cross_entropy", False, red, hw) in seen
            assert ("cross_entropy", True, red, hw) in seen
            assert ("nll_loss", False, red, hw) in seen
    tags = {c["tag"] for c in GOLDEN_META}
    assert tags == {"grid", "scaled", "neginf", "all_ignored"}
    assert {c["label_smoothing"] for c in GOLDEN_META} == {0.0, 0.1, 0.37, 1.0}
    assert any(len(c["shape"]) > 2 for c in GOLDEN_META)
    # weight + ignore_index + mean, the torch definition of the weighted mean
    assert any(c["has_weight"] and c["ignore_index"] is not None and c["reduction"] == "mean"
               for c in GOLDEN_META)


# Fresh random cases in torch layout (N, C, ...); ours runs with axis=1.
TORCH_LIVE = [
    {"shape": (5, 7), "soft": False},
    {"shape": (4, 6, 3), "soft": False, "weight": True, "ignore_index": 2, "ls": 0.2},
    {"shape": (3, 5, 2, 4), "soft": False, "ignore_index": -100, "reduction": "sum"},
    {"shape": (4, 6, 3), "soft": True, "weight": True, "ls": 0.3},
    {"shape": (2, 9, 5), "soft": True, "reduction": "none"},
    {"shape": (6, 4, 5), "soft": False, "weight": True, "ignore_index": 0, "reduction": "none",
     "nll": True},
]


@pytest.mark.parametrize("k", range(len(TORCH_LIVE)))
def test_matches_torch_live(x64, k):
    torch = pytest.importorskip("torch")
    spec = TORCH_LIVE[k]
    shape = spec["shape"]
    c = shape[1]
    rng = _rng(100 + k)
    x = 3.0 * rng.standard_normal(shape)
    if spec["soft"]:
        labels = np.moveaxis(_soft_labels(np.moveaxis(x, 1, -1).shape, F64, seed=k), -1, 1)
    else:
        labels = rng.integers(0, c, (shape[0],) + shape[2:])
        if "ignore_index" in spec:
            labels = np.where(rng.random(labels.shape) < 0.3, spec["ignore_index"], labels)
    weight = rng.uniform(0.2, 2.0, c) if spec.get("weight") else None
    ignore = spec.get("ignore_index")
    ls, red = spec.get("ls", 0.0), spec.get("reduction", "mean")

    xt = torch.tensor(x, requires_grad=True)
    kw_t = {
        "weight": None if weight is None else torch.tensor(weight),
        "ignore_index": -100 if ignore is None else ignore,
        "reduction": red,
    }
    if spec.get("nll"):
        loss_t = torch.nn.functional.nll_loss(
            torch.log_softmax(xt, 1), torch.tensor(labels), **kw_t
        )
    else:
        loss_t = torch.nn.functional.cross_entropy(
            xt, torch.tensor(labels), label_smoothing=ls, **kw_t
        )
    loss_t.sum().backward()

    kw = {"axis": 1, "ignore_index": ignore, "reduction": red}

    def f(v, y, w):
        if spec.get("nll"):
            return jaxlse.nll_loss(jaxlse.log_softmax(v, axis=1), y, weight=w, **kw)
        return jaxlse.cross_entropy(v, y, weight=w, label_smoothing=ls, **kw)

    loss, grad = loss_and_grad(f, x, labels, weight)
    np.testing.assert_allclose(loss, loss_t.detach().numpy(), **GOLDEN_TOL)
    np.testing.assert_allclose(grad, xt.grad.numpy(), **GOLDEN_TOL)


# --------------------------------------------------------------------------------------------
# 3. Agreement with optax (no weight, smoothing or ignore_index: optax has none of them)

OPTAX_SHAPES = [(1, 5), (8, 10), (4, 3, 17), (2, 1000)]


@pytest.mark.parametrize("soft", [False, True], ids=["int", "soft"])
@pytest.mark.parametrize("shape", OPTAX_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_matches_optax(request, dtype, shape, soft):
    if dtype == F64:
        request.getfixturevalue("x64")
    x = _logits(shape, dtype, seed=len(shape) + shape[-1], scale=3.0)
    if soft:
        labels = _soft_labels(shape, dtype, seed=shape[-1])
        ref_fn = optax.softmax_cross_entropy
    else:
        labels = _int_labels(shape[:-1], shape[-1], seed=shape[-1])
        ref_fn = optax.softmax_cross_entropy_with_integer_labels

    @fast_jit  # compared with tolerances
    def both(v, y):
        ours = loss_and_grad_traced(lambda u: jaxlse.cross_entropy(u, y, reduction="none"), v)
        theirs = loss_and_grad_traced(lambda u: ref_fn(u, y), v)
        return ours, theirs, jaxlse.cross_entropy(v, y)

    (loss, grad), (loss_o, grad_o), mean = both(x, labels)
    assert loss.dtype == grad.dtype == loss_o.dtype == mean.dtype == dtype
    _assert_close(loss, loss_o, dtype)
    _assert_close(grad, grad_o, dtype)
    _assert_close(mean, jnp.mean(loss_o), dtype)  # the plain mean: no weight, nothing ignored


# --------------------------------------------------------------------------------------------
# 4. Derivatives

GRAD_CASES = {
    "plain": {},
    "weight_ignore_smoothing": {"weight": True, "ignore_index": 1, "label_smoothing": 0.1},
    "z_loss_soft_cap_where": {"z_loss": 0.05, "soft_cap": 2.5, "where": True},
    "all": {"weight": True, "label_smoothing": 0.3, "z_loss": 0.1, "soft_cap": 3.0,
            "where": True, "ignore_index": 2},
    "soft": {"soft": True},
    "soft_weight_smoothing": {"soft": True, "weight": True, "label_smoothing": 0.25},
    "soft_all": {"soft": True, "weight": True, "label_smoothing": 0.1, "z_loss": 0.2,
                 "soft_cap": 2.0, "where": True},
}
GRAD_SHAPE = (5, 4)


def _grad_case(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """float64 logits, labels and keyword arguments for ``GRAD_CASES[name]``."""
    spec = dict(GRAD_CASES[name])
    x = _logits(GRAD_SHAPE, F64, seed=seed)
    if spec.pop("soft", False):
        labels = _soft_labels(GRAD_SHAPE, F64, seed=seed)
    else:
        labels = np.asarray([0, 1, 2, 3, 1])  # ignore_index=1 drops two rows, =2 one
    if spec.pop("weight", False):
        spec["weight"] = np.linspace(0.5, 2.0, GRAD_SHAPE[1])
    if spec.pop("where", False):
        spec["where"] = np.asarray([True, True, False, True, True])
    return x, labels, spec


# check_grads compiles about twelve programs per function, so the cases are checked in two
# groups, each as one function returning every member's loss (case, reduction).
GRAD_GROUPS = {
    "int": [("plain", "mean"), ("weight_ignore_smoothing", "mean"),
            ("z_loss_soft_cap_where", "sum"), ("all", "mean"), ("all", "none")],
    "soft": [("soft", "mean"), ("soft_weight_smoothing", "sum"), ("soft_all", "mean"),
             ("soft_all", "none")],
}


def _group_losses(group: str, seed: int) -> tuple[np.ndarray, Callable[[jax.Array], jax.Array]]:
    """The shared float64 logits and ``f(x)``: the group's losses, concatenated."""
    members = [(_grad_case(name, seed), red) for name, red in GRAD_GROUPS[group]]

    def f(v):
        return jnp.concatenate([
            jnp.reshape(jaxlse.cross_entropy(v, labels, reduction=red, **kw), (-1,))
            for (_, labels, kw), red in members
        ])

    return members[0][0][0], f


@pytest.mark.parametrize("group", list(GRAD_GROUPS))
def test_check_grads(x64, group):
    x, f = _group_losses(group, seed=0)
    check_grads(f, (jnp.asarray(x),), order=2)


@pytest.mark.parametrize("group", list(GRAD_GROUPS))
def test_hessian_matches_plain_autodiff(x64, group):
    names = list(dict.fromkeys(name for name, _ in GRAD_GROUPS[group]))
    cases = {name: _grad_case(name, seed=1) for name in names}
    x = cases[names[0]][0]

    @fast_jit  # compared with tolerances
    def derivatives(v):
        out = {}
        for name, (_, labels, kw) in cases.items():
            def ours(u, labels=labels, kw=kw):
                return jaxlse.cross_entropy(u, labels, **kw)

            def plain(u, labels=labels, kw=kw):
                return plain_cross_entropy(u, jnp.asarray(labels), **kw)

            out[name] = [(f(v), jax.grad(f)(v), jax.hessian(f)(v)) for f in (ours, plain)]
        return out

    for name, ((loss, grad, hess), (p_loss, p_grad, p_hess)) in derivatives(x).items():
        assert hess.shape == GRAD_SHAPE + GRAD_SHAPE
        assert np.count_nonzero(p_hess) > 20, name  # the reference is not trivially zero
        np.testing.assert_allclose(hess, p_hess, rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(grad, p_grad, rtol=1e-13, atol=1e-15, err_msg=name)
        # both formulas against the numpy reference value
        ref = ref_cross_entropy(x, cases[name][1], **cases[name][2])
        np.testing.assert_allclose(loss, ref, rtol=1e-14, err_msg=name)
        np.testing.assert_allclose(p_loss, ref, rtol=1e-14, err_msg=name)


def test_check_grads_nll_loss(x64):
    x = _logits(GRAD_SHAPE, F64, seed=3)
    kw = {"weight": np.linspace(0.5, 2.0, GRAD_SHAPE[1]),
          "where": np.asarray([True, True, False, True, True])}
    all_labels = (np.asarray([0, 1, 2, 3, 1]), _soft_labels(GRAD_SHAPE, F64, seed=3))

    def f(v):  # nll_loss of the log-probabilities v, int and soft labels
        return jnp.stack([jaxlse.nll_loss(v, labels, **kw) for labels in all_labels])

    check_grads(f, (jnp.asarray(ref_log_softmax(x)),), order=2)
    # the composition with log_softmax, as the issue writes it
    check_grads(lambda v: f(jaxlse.log_softmax(v)), (jnp.asarray(x),), order=2)


@pytest.mark.parametrize("soft", [False, True], ids=["int", "soft"])
def test_forward_pass_uses_the_custom_rule(soft):
    x = jnp.asarray(WORKED_LOGITS)
    labels = jnp.asarray(_soft_labels((4, 3)) if soft else WORKED_LABELS)
    jaxpr = jax.make_jaxpr(lambda v, y: jaxlse.cross_entropy(v, y))(x, labels)

    def primitives(jx) -> list[str]:  # every primitive, inside nested jaxprs (jit) too
        out = []
        for eqn in jx.eqns:
            out.append(eqn.primitive.name)
            if eqn.primitive.name in ("jit", "pjit"):
                out += primitives(eqn.params["jaxpr"].jaxpr)
        return out

    names = primitives(jaxpr.jaxpr)
    assert names.count("custom_jvp_call") == 1, names


# --------------------------------------------------------------------------------------------
# 5. Accuracy in ulps


# The shared distributions, with the dominant one twice: the label on the dominant logit (a tiny
# loss) and elsewhere.
DISTRIBUTIONS: dict[str, Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]] = {
    **{k: v for k, v in SHARED_DISTRIBUTIONS.items() if k != "dominant_30"},
    "dominant_label_on_it": SHARED_DISTRIBUTIONS["dominant_30"],
    "dominant_label_elsewhere": SHARED_DISTRIBUTIONS["dominant_30"],
}
ROWS = {1000: 16, 32768: 4}


def accuracy_case(dist: str, n: int, dtype=F32) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(ROWS[n], n)`` logits of ``dtype`` drawn from ``dist``, and labels."""
    rng = _rng(n + len(dist))
    x = DISTRIBUTIONS[dist](rng, (ROWS[n], n)).astype(dtype)
    top = np.argmax(x.astype(np.float64), axis=-1)
    if dist == "dominant_label_on_it":
        labels = top
    else:
        labels = rng.integers(0, n, ROWS[n])
        if dist == "dominant_label_elsewhere":
            labels = np.where(labels == top, (labels + 1) % n, labels)
    return x, labels.astype(np.int32)


_ce_none = jax.jit(lambda v, y: jaxlse.cross_entropy(v, y, reduction="none"))
_optax_int = jax.jit(optax.softmax_cross_entropy_with_integer_labels)


@pytest.mark.parametrize("n", [1000, 32768])
@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
def test_accuracy_float32(record_property, dist, n):
    x, labels = accuracy_case(dist, n)
    ref = careful_ce_f64(x, labels)
    if dist == "dominant_label_on_it":  # the tiny loss of a confident, correct prediction
        assert np.all((1e-11 < ref) & (ref < 1e-8)), ref
    out = _ce_none(x, labels)
    assert out.dtype == F32
    err = ulp_error(out, ref)
    optax_err = ulp_error(_optax_int(x, labels), ref)
    record_property("max_ulp_jaxlse", float(err.max()))
    record_property("max_ulp_optax", float(optax_err.max()))
    print(f"{dist} n={n}: max ulp jaxlse {err.max():.3g}, optax {optax_err.max():.3g}")
    assert err.max() <= ULP_BOUND, err.max()


@pytest.mark.parametrize("on_max", [1, 4, 5, 37])
@pytest.mark.parametrize("n", [300, 4000])
def test_exact_pass_only_rows_that_need_it(on_max, n):
    """Rows whose label is the (dominant) max have tiny losses and take the exact pass, which
    sums just those rows one at a time when they are at most 1/8 of the batch (37 // 8 = 4) and
    the batch has 2**17 entries or more (n = 4000), and every row otherwise. Every loss is
    within the ulp bound either way, in the forward pass and in the custom JVP rule
    (value_and_grad's value), in a batch whose size 8 does not divide."""
    rng = _rng(on_max)
    rows = 37
    x = rng.standard_normal((rows, n))
    top = rng.integers(0, n, rows)
    x[np.arange(rows), top] += 25.0
    labels = rng.integers(0, n, rows)
    labels = np.where(labels == top, (labels + 1) % n, labels)
    which = rng.choice(rows, on_max, replace=False)
    labels[which] = top[which]
    x = x.astype(F32)
    labels = labels.astype(np.int32)
    branches = cond_branches(lambda v, y: jaxlse.cross_entropy(v, y, reduction="none"), x, labels)
    # no row, a few rows, every row; or, below _FEW_MIN_SIZE entries, no row or every row
    assert (3 in branches) == (x.size >= _rowstats._FEW_MIN_SIZE), branches
    out = _ce_none(x, labels)
    ref = careful_ce_f64(x, labels)
    assert np.all(ref[which] < 1e-5)
    err = ulp_error(out, ref)
    assert err.max() <= ULP_BOUND, err.max()

    def total(v):
        out = jaxlse.cross_entropy(v, labels, reduction="none")
        return jnp.sum(out), out

    (_, out_rule), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(x)
    assert ulp_error(out_rule, ref).max() <= ULP_BOUND
    onehot = np.eye(n)[labels]
    np.testing.assert_allclose(grad, np.exp(ref_log_softmax(x)) - onehot, atol=1e-6)


@pytest.mark.parametrize("n", [1000, 8192, 8193, 32768])
@pytest.mark.parametrize(
    "layout", ["rows", "one_example_at_a_time", "batches_of_one", "leading_axis_of_1"]
)
def test_small_losses_accurate_in_any_layout(layout, n):
    """Correct predictions that dominate by 12 (losses from 0.02 to 1, sums of every term) are
    within the bound for a plain batch, one example at a time (1-d logits and a scalar label,
    or a batch of one) and a batch with a leading axis of size 1: XLA:CPU sums the last two in
    a less accurate order, which jaxlse avoids (see test_lse's
    test_log_softmax_accuracy_in_any_layout)."""
    rng = _rng(n)
    x = rng.standard_normal((64, n))
    labels = rng.integers(0, n, 64).astype(np.int32)
    x[np.arange(64), labels] = x.max(axis=1) + 12.0
    x = x.astype(F32)
    ref = careful_ce_f64(x, labels)
    f = jax.jit(lambda v, y: jaxlse.cross_entropy(v, y, reduction="none"))
    if layout == "rows":
        out = np.asarray(f(x, labels))
    elif layout == "one_example_at_a_time":
        out = np.stack([np.asarray(f(x[i], labels[i])) for i in range(64)])
    elif layout == "batches_of_one":
        out = np.concatenate([np.asarray(f(x[i : i + 1], labels[i : i + 1])) for i in range(64)])
    else:
        out = np.asarray(f(x[None], labels[None]))[0]
    assert out.shape == (64,)
    err = ulp_error(out, ref)
    assert err.max() <= ULP_BOUND, err.max()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("with_weight", [False, True])
def test_subnormal_loss_of_confident_prediction(dtype, with_weight):
    """A loss below float32's smallest normal (a label that dominates by 88 to 103) is returned
    to an ulp of its exact subnormal value, not flushed to 0 (optax returns 0)."""
    x = np.asarray([[0.0, -88.08, -90.0], [5.0, 5.0 - 95.0, 5.0 - 96.0], [0.0, -93.0, -1.0]],
                   dtype)
    labels = np.asarray([0, 0, 0], np.int32)
    weight = np.asarray([0.5, 1.0, 2.0], F32) if with_weight else None
    out = jax.jit(lambda v, y: jaxlse.cross_entropy(v, y, weight=weight, reduction="none"))(
        x, labels)
    w = 1.0 if weight is None else weight[labels]
    ref = w * careful_ce_f64(x, labels)
    assert np.all(ref[:2] < TINY32) and ref[2] > 0.1
    err = ulp_error(out, ref)
    assert err.max() <= ULP_BOUND, (out, ref)
    assert np.all(np.asarray(out)[:2] > 0)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("big", ["1e30", "max"])
def test_two_huge_equal_logits(request, dtype, big):
    if dtype == F64:
        request.getfixturevalue("x64")
    v = 1e30 if big == "1e30" else float(np.finfo(dtype).max)
    x = np.asarray([v, 0.0, 0.0, v], dtype)
    # as the issue writes it (eager, one example)
    assert float(jaxlse.cross_entropy(x, 0)) == float(np.asarray(math.log(2), dtype))
    # in a batch, with the label on either huge logit or on a 0, and the gradient
    labels = np.asarray([0, 3, 1])
    loss, grad = loss_and_grad(
        lambda u, y: jaxlse.cross_entropy(u, y, reduction="none"), np.stack([x, x, x]), labels)
    assert loss.dtype == grad.dtype == dtype
    assert float(loss[0]) == float(loss[1]) == float(np.asarray(math.log(2), dtype))
    assert ulp_error(loss[2], careful_ce_f64(x, 1)) <= 1  # v + log 2, rounded: v
    half = np.asarray([0.5, 0.0, 0.0, 0.5], dtype)
    np.testing.assert_array_equal(grad, half - np.eye(4, dtype=dtype)[labels])


@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_accuracy_low_precision(dtype, dist):
    """16-bit logits: a float32 loss within a few float32 ulp of the exact loss of the (upcast)
    16-bit logits, and a gradient of the logits' dtype within one of its ulps of the exact one
    plus float32 round-off of ``p`` and the one-hot (or of float32's smallest normal number,
    below which XLA:CPU flushes to 0)."""
    x, labels = accuracy_case(dist, 1000, dtype)
    loss, grad = loss_and_grad(lambda v, y: jaxlse.cross_entropy(v, y, reduction="none"),
                               x, labels)
    assert loss.dtype == F32 and grad.dtype == dtype
    err = ulp_error(loss, careful_ce_f64(x, labels))
    assert err.max() <= ULP_BOUND, err.max()
    # p - onehot is a difference: the gradient can be off by float32 round-off of its terms,
    # (e.g. at a label with p = 1 - 1e-10), plus one rounding to the logits' dtype.
    ref = ref_grad_sum(x, labels)
    terms = ref_softmax(x) + np.eye(x.shape[-1])[labels]
    bound = ulp(ref, dtype) + 2.0**-22 * terms
    bound = np.maximum(bound, np.where(np.abs(ref) < TINY32, TINY32, 0.0))
    ratio = np.abs(np.asarray(grad, np.float64) - ref) / bound
    assert ratio.max() <= 1.0, ratio.max()


# --------------------------------------------------------------------------------------------
# 6. -inf, NaN and excluded rows


@pytest.mark.parametrize("z_loss", [0.0, 0.1])
@pytest.mark.parametrize("with_weight", [False, True])
def test_soft_targets_neg_inf_logit_at_zero_target(with_weight, z_loss):
    x = _logits((3, 5), seed=7)
    q = _soft_labels((3, 5), seed=7)
    x[0, 2], q[0, 2] = -INF, 0.0
    x[2, [0, 4]], q[2, [0, 4]] = -INF, 0.0
    q = q / q.sum(-1, keepdims=True)
    weight = np.linspace(0.5, 2.0, 5, dtype=F32) if with_weight else None
    kw = {"z_loss": z_loss, "reduction": "none"}
    loss, grad = loss_and_grad(
        lambda v, y, w: jaxlse.cross_entropy(v, y, weight=w, **kw), x, q, weight)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    assert grad[0, 2] == grad[2, 0] == grad[2, 4] == 0
    np.testing.assert_allclose(loss, ref_cross_entropy(x, q, weight=weight, **kw), rtol=2e-6)
    if z_loss == 0:
        np.testing.assert_allclose(grad, ref_grad_sum(x, q, weight=weight), rtol=2e-6,
                                   atol=2e-7)


def test_nll_loss_neg_inf_log_prob_at_zero_target():
    with np.errstate(divide="ignore"):
        lp = np.log(np.asarray([[0.5, 0.0, 0.5], [0.25, 0.75, 0.0]], np.float32))
    q = np.asarray([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]], np.float32)
    loss, grad = loss_and_grad(lambda v, y: jaxlse.nll_loss(v, y, reduction="none"), lp, q)
    np.testing.assert_allclose(loss, [math.log(2), -math.log(0.75)], rtol=1e-7)
    np.testing.assert_array_equal(grad, -q)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_int_labels_neg_inf_logit_elsewhere(with_weight, fn):
    x = _logits((4, 6), seed=8)
    labels = np.asarray([0, 5, 2, 3])
    x[0, 1] = x[1, 0] = x[1, 2] = x[3, 5] = -INF
    weight = np.linspace(0.5, 2.0, 6, dtype=F32) if with_weight else None

    def f(v, y, w):
        if fn == "nll_loss":
            return jaxlse.nll_loss(jaxlse.log_softmax(v), y, weight=w, reduction="none")
        return jaxlse.cross_entropy(v, y, weight=w, reduction="none")

    loss, grad = loss_and_grad(f, x, labels, weight)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    assert grad[0, 1] == grad[1, 0] == grad[1, 2] == grad[3, 5] == 0
    np.testing.assert_allclose(loss, ref_cross_entropy(x, labels, weight=weight,
                                                       reduction="none"), rtol=2e-6)
    np.testing.assert_allclose(grad, ref_grad_sum(x, labels, weight=weight), rtol=2e-6,
                               atol=2e-7)


BAD_ROWS = ["all_neg_inf", "nan", "pos_inf"]
EXCLUSIONS = [("int", "where"), ("int", "ignore_index"), ("soft", "where")]
REDUCTIONS = ("none", "sum", "mean")


def _excluded_case(labels_kind: str, exclude: str, n: int, c: int, rows: list[int], seed: int):
    """Labels and keyword arguments that exclude ``rows`` of an ``(n, c)`` batch."""
    labels = _int_labels((n,), c, seed) if labels_kind == "int" else _soft_labels((n, c),
                                                                                  seed=seed)
    kw: dict[str, Any] = {"weight": np.linspace(0.5, 2.0, c, dtype=F32)}
    if exclude == "where":
        kw["where"] = ~np.isin(np.arange(n), rows)
    else:
        labels[rows] = -100
        kw["ignore_index"] = -100
    return labels, kw


CE_DEFAULTS = {"label_smoothing": 0.1, "z_loss": 0.01}
# The loss functions under test, as functions of the scores v: cross_entropy(v), nll_loss(v)
# (v as log-probabilities) and nll_loss(log_softmax(v)) (as the issue writes it).
LOSSES = ["cross_entropy", "nll_loss", "nll_of_log_softmax"]


def _loss(fn: str, v: Any, y: Any, **kw: Any) -> jax.Array:
    """``LOSSES[fn]``; ``cross_entropy`` gets ``CE_DEFAULTS`` unless ``kw`` sets them."""
    if fn == "cross_entropy":
        return jaxlse.cross_entropy(v, y, **(CE_DEFAULTS | kw))
    if fn == "nll_of_log_softmax":
        v = jaxlse.log_softmax(v)
    return jaxlse.nll_loss(v, y, **kw)


def _all_reductions(fn: str, **kw: Any) -> Callable[..., jax.Array]:
    """``f(v, y)``: the per-example, summed and mean losses stacked, shape ``(n + 2,)``."""

    def f(v, y):
        return jnp.concatenate([jnp.reshape(_loss(fn, v, y, reduction=r, **kw), (-1,))
                                for r in REDUCTIONS])

    return f


EXCLUSION_IDS = [f"{a}-{b}" for a, b in EXCLUSIONS]


@pytest.mark.parametrize(("labels_kind", "exclude"), EXCLUSIONS, ids=EXCLUSION_IDS)
@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("kind", BAD_ROWS)
def test_excluded_bad_row_contributes_nothing(kind, fn, labels_kind, exclude):
    """A row of all -inf, or holding NaN or +inf, that does not count: 0 loss, 0 gradient, and
    the other rows, the sum and the mean are those of a clean batch, bit for bit."""
    x = _logits((4, 5), seed=9)
    if fn == "nll_loss":  # log-probabilities
        x = ref_log_softmax(x).astype(F32)
    clean = x.copy()
    clean[1] = 0.0
    if kind == "all_neg_inf":
        x[1] = -INF
    elif kind == "nan":
        x[1, 3] = NAN
    else:
        x[1, [0, 2]] = INF
    labels, kw = _excluded_case(labels_kind, exclude, 4, 5, [1], seed=9)
    # the gradient of loss[0] + ... + loss[3] + sum + mean
    f = _all_reductions(fn, **kw)
    # the bad and the clean batch through one program (helpers.fast_jit: the checks compare
    # them with each other, and against 0 and infinity)
    vg = fast_jit(lambda v, y: loss_and_grad_traced(lambda u: f(u, y), v))
    loss, grad = (np.asarray(a) for a in vg(x, labels))
    clean_loss, clean_grad = (np.asarray(a) for a in vg(clean, labels))
    assert np.all(np.isfinite(loss)) and loss[1] == 0
    np.testing.assert_array_equal(loss, clean_loss)
    assert np.all(loss[[0, 2, 3]] > 0)
    rows = [0, 1, 2, 3]
    if fn == "nll_of_log_softmax" and kind == "nan":
        # log_softmax is NaN on a row holding NaN, and so (as documented) is its derivative,
        # whatever the cotangent: only the other rows are checked here. nll_loss itself gives
        # that row a zero gradient (fn="nll_loss").
        rows = [0, 2, 3]
    assert np.all(np.isfinite(grad[rows]))
    np.testing.assert_array_equal(grad[rows], clean_grad[rows])
    if 1 in rows:
        np.testing.assert_array_equal(grad[1], np.zeros(5, F32))


@pytest.mark.parametrize(("labels_kind", "exclude"), EXCLUSIONS, ids=EXCLUSION_IDS)
@pytest.mark.parametrize("fn", LOSSES)
def test_all_examples_excluded(fn, labels_kind, exclude):
    """Nothing counts: every loss, the sum and the mean are 0, and so is the gradient."""
    x = _logits((3, 4), seed=10)
    labels, kw = _excluded_case(labels_kind, exclude, 3, 4, [0, 1, 2], seed=10)
    loss, grad = loss_and_grad(_all_reductions(fn, **kw), x, labels)
    np.testing.assert_array_equal(loss, np.zeros(5, F32))
    np.testing.assert_array_equal(grad, np.zeros((3, 4), F32))


# --------------------------------------------------------------------------------------------
# 7. Bad arguments and out-of-range labels

X34 = np.zeros((3, 4), np.float32)
Y3 = np.asarray([0, 1, 2], np.int32)
FNS = ["cross_entropy", "nll_loss"]


def _call(fn: str, x: Any, labels: Any, **kw: Any) -> jax.Array:
    return getattr(jaxlse, fn)(x, labels, **kw)


@pytest.mark.parametrize("labels", [np.asarray([True, False, True]),
                                    np.asarray([0, 1, 2], np.complex64),
                                    np.ones((3, 4), np.complex64)],
                         ids=["bool", "complex", "complex_soft_shape"])
@pytest.mark.parametrize("fn", FNS)
def test_bad_label_dtype(fn, labels):
    with pytest.raises(TypeError, match=rf"^{fn}: `labels`.*{labels.dtype}"):
        _call(fn, X34, labels)


@pytest.mark.parametrize("shape", [(4,), (3, 1), (1, 3), ()], ids=str)
@pytest.mark.parametrize("fn", FNS)
def test_int_labels_wrong_shape(fn, shape):
    with pytest.raises(ValueError, match=rf"^{fn}: integer `labels`") as info:
        _call(fn, X34, np.zeros(shape, np.int32))
    assert str(shape) in str(info.value) and "(3, 4)" in str(info.value), info.value


@pytest.mark.parametrize("shape", [(3,), (3, 5), (4, 4), (1, 4)], ids=str)
@pytest.mark.parametrize("fn", FNS)
def test_soft_labels_wrong_shape(fn, shape):
    with pytest.raises(ValueError, match=rf"^{fn}: floating \(soft\) `labels`") as info:
        _call(fn, X34, np.zeros(shape, np.float32))
    assert str(shape) in str(info.value) and "(3, 4)" in str(info.value), info.value


@pytest.mark.parametrize("shape", [(3,), (5,), (1, 4), ()], ids=str)
@pytest.mark.parametrize("fn", FNS)
def test_weight_wrong_shape(fn, shape):
    with pytest.raises(ValueError, match=rf"^{fn}: `weight`.*\(4,\).*got {re.escape(str(shape))}"):
        _call(fn, X34, Y3, weight=np.ones(shape, np.float32))


BAD_OPTIONS = [
    ("label_smoothing", -0.1),
    ("label_smoothing", 1.5),
    ("label_smoothing", NAN),
    ("z_loss", -1.0),
    ("soft_cap", 0.0),
    ("soft_cap", -2.0),
    ("reduction", "avg"),
    ("reduction", None),
]


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS, ids=str)
@pytest.mark.parametrize("labels", ["int", "soft"])
def test_bad_options_cross_entropy(name, value, labels):
    lab = Y3 if labels == "int" else np.full((3, 4), 0.25, np.float32)
    with pytest.raises(ValueError, match=rf"^cross_entropy: `{name}`"):
        jaxlse.cross_entropy(X34, lab, **{name: value})


def test_bad_reduction_nll_loss():
    with pytest.raises(ValueError, match=r"^nll_loss: `reduction`.*'avg'"):
        jaxlse.nll_loss(X34, Y3, reduction="avg")


@pytest.mark.parametrize("bad", [-1, -100, 4])
@pytest.mark.parametrize("fn", FNS)
def test_out_of_range_label_raises(fn, bad):
    labels = np.zeros((2, 3), np.int32)
    labels[1, 2] = bad
    x = np.zeros((2, 3, 4), np.float32)
    message = rf"^{fn}: label {bad} at position \(1, 2\)"
    with pytest.raises(ValueError, match=message):
        _call(fn, x, labels)
    # an ignore_index other than the bad label does not excuse it ...
    with pytest.raises(ValueError, match=message):
        _call(fn, x, labels, ignore_index=-7)
    # ... and neither does excluding another example with `where`
    where = np.ones((2, 3), bool)
    where[0, 0] = False
    with pytest.raises(ValueError, match=message):
        _call(fn, x, labels, where=where)
    # the same label is fine when it is ignore_index, or excluded by `where`
    where[0, 0], where[1, 2] = True, False
    for kw in ({"ignore_index": bad}, {"where": where}):
        ok = _call(fn, x, labels, reduction="none", **kw)
        assert ok[1, 2] == 0 and np.all(np.isfinite(ok)), kw


def _bad_label_case(bad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(4, 5) logits, good labels, and the same labels with ``bad`` at position 1."""
    good = np.asarray([1, 4, 3, 0])
    labels = good.copy()
    labels[1] = bad
    return _logits((4, 5), seed=11), good, labels


@pytest.mark.parametrize("bad", [-1, -2, -100, 5, 6])
@pytest.mark.parametrize("fn", LOSSES)
def test_out_of_range_label_under_jit_loss_is_nan(fn, bad):
    """Under jit a bad label (not ignore_index) makes its example's loss NaN, and the sum and
    the mean (never silently dropped); the other rows and their gradients are unaffected, and
    a negative label never wraps around."""
    x, good, labels = _bad_label_case(bad)
    f = _all_reductions(fn, ignore_index=-7)
    vg = fast_jit(lambda v, y: loss_and_grad_traced(lambda u: f(u, y)[:4], v))  # NaN or equal
    loss, grad = (np.asarray(a) for a in vg(x, labels))
    good_loss, good_grad = (np.asarray(a) for a in vg(x, good))
    assert np.isnan(loss[1])
    rest = [0, 2, 3]
    np.testing.assert_array_equal(loss[rest], good_loss[rest])
    np.testing.assert_array_equal(grad[rest], good_grad[rest])
    assert np.all(np.isfinite(good_loss)) and np.all(np.isfinite(good_grad))
    assert np.all(np.isnan(fast_jit(f)(x, labels)[4:]))  # sum and mean
    if -5 <= bad < 0:  # where wrapping around would land: a finite loss
        wrapped = labels.copy()
        wrapped[1] = 5 + bad
        assert np.isfinite(vg(x, wrapped)[0][1])


@pytest.mark.parametrize("bad", [-1, 5])
@pytest.mark.parametrize("fn", LOSSES)
def test_out_of_range_label_under_jit_adds_nothing_to_derivatives(fn, bad):
    """A bad label's example has a NaN loss and a zero gradient row: a NaN row would come back
    as 0 * NaN in the reverse-mode jacobian of the other examples' losses, where forward mode
    gives 0."""
    x, _, labels = _bad_label_case(bad)
    loss, grad = fast_jit(lambda v, y: loss_and_grad_traced(
        lambda u: _loss(fn, u, y, reduction="none", ignore_index=-7), v))(x, labels)
    assert np.isnan(loss[1])
    np.testing.assert_array_equal(np.asarray(grad)[1], 0.0)
    assert np.all(np.isfinite(np.asarray(grad)[[0, 2, 3]]))
    per_example = fast_jit(lambda v, y: (
        jax.jacrev(lambda u: _loss(fn, u, y, reduction="none", ignore_index=-7))(v),
        jax.jacfwd(lambda u: _loss(fn, u, y, reduction="none", ignore_index=-7))(v)))
    rev, fwd = (np.asarray(a)[[0, 2, 3]] for a in per_example(x, labels))
    assert np.all(np.isfinite(rev))
    np.testing.assert_allclose(rev, fwd, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# 8. Memory of the compiled value_and_grad (compiled only, never run)

MEM_SHAPES = [(512, 8192), (1000, 4097)]
# Measured with jax 0.10.2 on XLA:CPU, temp_size / (N * V * itemsize), i.e. in units of one
# (N, V) array of the logits' dtype, at (512, 8192):
#   float32:  jaxlse 0.001 (every option set below); optax 0.001
#   bfloat16: jaxlse 0.001 (every option set below); optax 4.0 (two float32 copies)
# The targets: near zero for float32, under 1.0 for bfloat16. The statistics, the
# smoothing sum and the backward kernel each read the logits through their own optimization
# barrier, so XLA shares no converted or broadcast (N, V) intermediate between them.
MEM_TARGET = {F32: 0.05, BF16: 0.5}
MEM_OPTIONS = {
    "default": {},
    "sum_none": {"reduction": "none"},
    "smoothing_zloss": {"label_smoothing": 0.1, "z_loss": 1e-4},
    "ignore_index": {"ignore_index": 0},
}


def _temp_arrays(shape: tuple[int, int], dtype, which: str, **kw: Any) -> float:
    x = jax.ShapeDtypeStruct(shape, dtype)
    y = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    if which == "jaxlse":
        def loss(v, t):
            return jnp.sum(jaxlse.cross_entropy(v, t, **kw))
    else:
        def loss(v, t):
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(v, t))
    f = jax.value_and_grad(loss)
    temp = jax.jit(f).lower(x, y).compile().memory_analysis().temp_size_in_bytes
    return temp / (shape[0] * shape[1] * jnp.dtype(dtype).itemsize)


@pytest.mark.parametrize("options", list(MEM_OPTIONS))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("shape", MEM_SHAPES, ids=str)
def test_memory_value_and_grad_target(record_property, shape, dtype, options):
    """The issue's targets: float32 keeps nothing of size (N, V) beyond the gradient;
    bfloat16 keeps less than one bfloat16 (N, V) array (optax: 4.0, two float32 copies)."""
    ours = _temp_arrays(shape, dtype, "jaxlse", **MEM_OPTIONS[options])
    record_property("temp_arrays_jaxlse", ours)
    assert ours < MEM_TARGET[dtype], ours


@pytest.mark.parametrize("shape", MEM_SHAPES, ids=str)
def test_memory_bfloat16_optax_reference(shape):
    """The measurement tells the two apart: optax keeps float32 copies of bfloat16 logits."""
    assert _temp_arrays(shape, BF16, "optax") >= 1.0


# --------------------------------------------------------------------------------------------
# 9. Transformations, retracing, traced options, the class axis, dtypes

JIT_CASES = {
    "weight_ignore_smoothing": {"weight": True, "ignore_index": 1, "label_smoothing": 0.1},
    "soft_all": {"soft": True, "weight": True, "label_smoothing": 0.1, "z_loss": 0.2,
                 "soft_cap": 2.0, "where": True},
}


def _f32_case(name: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    spec = dict(JIT_CASES[name])
    x = _logits((6, 5), seed=12)
    soft = spec.pop("soft", False)
    labels = _soft_labels((6, 5), seed=12) if soft else np.asarray([0, 1, 2, 3, 4, 1])
    if spec.pop("weight", False):
        spec["weight"] = np.linspace(0.5, 2.0, 5, dtype=F32)
    if spec.pop("where", False):
        spec["where"] = np.asarray([True, False, True, True, False, True])
    return x, labels, spec


@pytest.mark.parametrize("name", list(JIT_CASES))
def test_jit_matches_eager(name):
    x, labels, kw = _f32_case(name)
    f = _all_reductions("cross_entropy", **kw)
    eager = loss_and_grad_traced(lambda v: f(v, labels), jnp.asarray(x))
    jitted = loss_and_grad(f, x, labels)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-7)
    ref = [ref_cross_entropy(x, labels, reduction=r, **(CE_DEFAULTS | kw)).reshape(-1)
           for r in REDUCTIONS]
    np.testing.assert_allclose(jitted[0], np.concatenate(ref), rtol=2e-6)


def test_vmap_int_labels_equals_reduction_none():
    x = _logits((7, 3, 6), seed=13)
    labels = _int_labels((7, 3), 6, seed=13)

    @jax.jit
    def run(v, y):
        def per_example(u, t):
            return jaxlse.cross_entropy(u, t)

        return (
            jax.vmap(jax.vmap(per_example))(v, y),
            jaxlse.cross_entropy(v, y, reduction="none"),
            jax.vmap(lambda u, t: jaxlse.cross_entropy(u, t, reduction="none"))(v, y),
            jax.vmap(jax.vmap(jax.grad(per_example)))(v, y),
            jax.grad(lambda u: jaxlse.cross_entropy(u, y, reduction="sum"))(v),
        )

    per_example, none, mapped, g, g_sum = run(x, labels)
    chex.assert_trees_all_close(per_example, none, rtol=1e-6, atol=0)
    chex.assert_trees_all_close(mapped, none, rtol=1e-6, atol=0)
    chex.assert_trees_all_close(g, g_sum, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(none, careful_ce_f64(x, labels), rtol=2e-6)


def test_vmap_keeps_the_exact_pass_conditional():
    """vmap of a per-example loss keeps its exact pass under a conditional on the whole batch
    (a select would run every branch: measured 7x slower), and small losses stay exact."""
    rng = _rng(3)
    x = rng.standard_normal((8, 300))
    labels = rng.integers(0, 300, 8).astype(np.int32)
    x[np.arange(8), labels] += 25.0
    x = x.astype(F32)
    mapped = jax.vmap(jaxlse.cross_entropy)
    assert cond_branches(mapped, x, labels), "vmap turned the conditionals into selects"
    out = jax.jit(mapped)(x, labels)
    err = ulp_error(out, careful_ce_f64(x, labels))
    assert err.max() <= ULP_BOUND, err.max()


def test_vmap_soft_targets():
    x = _logits((8, 5), seed=14)
    q = _soft_labels((8, 5), seed=14)
    kw = {"label_smoothing": 0.1, "z_loss": 0.01}

    @jax.jit
    def run(v, t):
        def per_example(u, s):
            return jaxlse.cross_entropy(u, s, **kw)

        return (
            jax.vmap(per_example)(v, t),
            jaxlse.cross_entropy(v, t, reduction="none", **kw),
            jax.vmap(jax.grad(per_example))(v, t),
            jax.grad(lambda u: jaxlse.cross_entropy(u, t, reduction="sum", **kw))(v),
        )

    per_example, none, g, g_sum = run(x, q)
    chex.assert_trees_all_close(per_example, none, rtol=1e-6, atol=0)
    chex.assert_trees_all_close(g, g_sum, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(none, ref_cross_entropy(x, q, reduction="none", **kw),
                               rtol=2e-6)


@pytest.mark.parametrize("labels_kind", ["int", "soft"])
def test_vmap_with_where(labels_kind):
    x = _logits((6, 5), seed=15)
    labels = _soft_labels((6, 5), seed=15) if labels_kind == "soft" else _int_labels((6,), 5, 15)
    where = np.asarray([True, False, True, True, False, True])

    @jax.jit
    def run(v, y, w):
        def per_example(u, t, m):
            return jaxlse.cross_entropy(u, t, where=m)

        return (jax.vmap(per_example)(v, y, w),
                jaxlse.cross_entropy(v, y, where=w, reduction="none"),
                jax.vmap(jax.grad(per_example))(v, y, w),
                jax.grad(lambda u: jaxlse.cross_entropy(u, y, where=w, reduction="sum"))(v))

    per_example, none, g, g_sum = run(x, labels, where)
    chex.assert_trees_all_close(per_example, none, rtol=1e-6, atol=0)
    chex.assert_trees_all_close(g, g_sum, rtol=1e-6, atol=1e-7)
    assert np.all(none[~where] == 0) and np.all(g[~where] == 0)
    np.testing.assert_allclose(none, ref_cross_entropy(x, labels, where=where,
                                                       reduction="none"), rtol=2e-6)


def test_no_retrace_for_same_shapes():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, y, w, ls, z):
        return jax.value_and_grad(
            lambda v: jaxlse.cross_entropy(v, y, where=w, label_smoothing=ls, z_loss=z)
        )(x)

    for seed in range(3):
        x = _logits((4, 5), seed=seed)
        y = _int_labels((4,), 5, seed=seed)
        w = _rng(seed).random(4) < 0.7
        f(x, y, w, np.float32(0.1 * seed), np.float32(0.01 * seed))


@pytest.mark.parametrize("labels_kind", ["int", "soft"])
def test_traced_label_smoothing_and_z_loss(labels_kind):
    x = _logits((6, 5), seed=16)
    labels = _soft_labels((6, 5), seed=16) if labels_kind == "soft" else _int_labels((6,), 5, 16)
    weight = np.linspace(0.5, 2.0, 5, dtype=F32)

    @jax.jit
    def run(v, ls, z):
        kw = {"weight": weight, "label_smoothing": ls, "z_loss": z}
        ours = loss_and_grad_traced(lambda u: jaxlse.cross_entropy(u, labels, **kw), v)
        plain = loss_and_grad_traced(lambda u: plain_cross_entropy(u, jnp.asarray(labels),
                                                                   **kw), v)
        return ours, plain

    for ls, z in [(0.0, 0.0), (0.15, 0.0), (0.0, 0.05), (0.3, 0.1)]:
        (loss, grad), (p_loss, p_grad) = run(x, np.float32(ls), np.float32(z))
        np.testing.assert_allclose(loss, ref_cross_entropy(x, labels, weight=weight,
                                                           label_smoothing=ls, z_loss=z),
                                   rtol=2e-6)
        chex.assert_trees_all_close((loss, grad), (p_loss, p_grad), rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("labels_kind", ["int", "soft"])
@pytest.mark.parametrize("fn", FNS)
def test_class_axis_not_last(fn, labels_kind):
    """(N, C, d) logits with axis=1 equal moving the class axis last."""
    x = _logits((3, 5, 4), seed=17)
    if labels_kind == "soft":
        labels_last = _soft_labels((3, 4, 5), seed=17)
        labels = np.moveaxis(labels_last, -1, 1)
    else:
        labels = labels_last = _int_labels((3, 4), 5, seed=17)
    weight = np.linspace(0.5, 2.0, 5, dtype=F32)

    def f(v, y, axis):
        kw = {"axis": axis, "weight": weight, "reduction": "none"}
        if fn == "nll_loss":
            return jaxlse.nll_loss(jaxlse.log_softmax(v, axis=axis), y, **kw)
        return jaxlse.cross_entropy(v, y, label_smoothing=0.1, **kw)

    fast = {"compiler_options": fast_compile_options()}  # compared with each other
    loss, grad = loss_and_grad(lambda v, y: f(v, y, 1), x, labels, **fast)
    loss_neg, grad_neg = loss_and_grad(lambda v, y: f(v, y, -2), x, labels, **fast)
    loss_last, grad_last = loss_and_grad(lambda v, y: f(v, y, -1), np.moveaxis(x, 1, -1),
                                         labels_last, **fast)
    assert loss.shape == (3, 4) and grad.shape == x.shape
    chex.assert_trees_all_close(loss, loss_last, rtol=1e-6, atol=0)
    chex.assert_trees_all_close(grad, jnp.moveaxis(grad_last, -1, 1), rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal((loss_neg, grad_neg), (loss, grad))


@pytest.mark.parametrize("with_weight", [False, True])
def test_nll_loss_soft_targets(with_weight):
    x = _logits((6, 5), seed=18)
    q = _soft_labels((6, 5), seed=18)
    weight = np.linspace(0.5, 2.0, 5, dtype=F32) if with_weight else None
    where = np.asarray([True, True, False, True, True, True])
    kw = {"weight": weight, "where": where}
    lp = jaxlse.log_softmax(x)
    for reduction in REDUCTIONS:
        out = jax.jit(lambda v, t, r=reduction: jaxlse.nll_loss(v, t, reduction=r, **kw))(lp, q)
        np.testing.assert_allclose(out, ref_cross_entropy(x, q, reduction=reduction, **kw),
                                   rtol=2e-6)
    # gradient with respect to the log-probabilities: -weight * q on counted rows
    _, grad = loss_and_grad(lambda v, t: jaxlse.nll_loss(v, t, reduction="sum", **kw), lp, q)
    expected = -q * (1.0 if weight is None else weight) * where[:, None]
    np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_integer_logits_promote():
    xi = np.asarray([[2, 5, 3], [1, 2, 7]], np.int32)
    labels = np.asarray([1, 2])
    out = jaxlse.cross_entropy(xi, labels)
    assert out.dtype == F32
    chex.assert_trees_all_equal(out, jaxlse.cross_entropy(xi.astype(F32), labels))
    out = jaxlse.nll_loss(-xi, labels)
    assert out.dtype == F32 and float(out) == 6.0  # (5 + 7) / 2


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=str)
def test_dtype_policy(dtype):
    x = _logits((4, 6), dtype, seed=19)
    labels = _int_labels((4,), 6, seed=19)
    q = _soft_labels((4, 6), F32, seed=19)  # soft targets in float32
    kw = {"weight": np.ones(6, F32), "label_smoothing": 0.1, "z_loss": 0.1}
    for lab in (labels, q):
        loss, grad = loss_and_grad(lambda v, y: jaxlse.cross_entropy(v, y, **kw), x, lab)
        assert loss.dtype == F32 and grad.dtype == dtype
        # the same as float32 logits holding the same values
        loss32 = jax.jit(lambda v, y: jaxlse.cross_entropy(v, y, **kw))(x.astype(F32), lab)
        chex.assert_trees_all_close(loss, loss32, rtol=1e-6, atol=0)
        nll = jax.jit(lambda v, y: jaxlse.nll_loss(jaxlse.log_softmax(v), y))(x, lab)
        assert nll.dtype == F32


def test_dtype_policy_float64(x64):
    x = _logits((4, 6), F64, seed=20)
    labels = _int_labels((4,), 6, seed=20)
    loss, grad = loss_and_grad(lambda v, y: jaxlse.cross_entropy(v, y), x, labels)
    assert loss.dtype == grad.dtype == F64
    nll = jax.jit(lambda v, y: jaxlse.nll_loss(jaxlse.log_softmax(v), y))(x, labels)
    assert nll.dtype == F64
    assert jax.jit(jaxlse.cross_entropy)(x.astype(F32), labels).dtype == F32


# --------------------------------------------------------------------------------------------
# Labels of every integer dtype

LABEL_DTYPES = [np.int8, np.uint8, np.int16, np.uint32, np.int64]


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_labels_of_any_integer_dtype(label_dtype):
    """The loss and nll_loss's gradient accept any integer label dtype."""
    x = np.asarray(WORKED_LOGITS, np.float32)
    labels = np.asarray(WORKED_LABELS, label_dtype)
    ref = np.asarray(WORKED_LABELS, np.int32)
    for fn in FNS:
        chex.assert_trees_all_equal(_call(fn, x, labels), _call(fn, x, ref))
    chex.assert_trees_all_equal(loss_and_grad(jaxlse.nll_loss, x, labels),
                                loss_and_grad(jaxlse.nll_loss, x, ref))


@pytest.mark.parametrize("label_dtype", ["int8", "uint8", "int16", "uint32", "int32_x64"])
def test_grad_labels_of_any_integer_dtype(request, label_dtype):
    if label_dtype == "int32_x64":
        request.getfixturevalue("x64")
        label_dtype = "int32"
    x = np.asarray(WORKED_LOGITS, jax.dtypes.canonicalize_dtype(float))
    labels = np.asarray(WORKED_LABELS, label_dtype)
    loss, grad = loss_and_grad(jaxlse.cross_entropy, x, labels)
    # atol: the label entry is p - 1 with p near 1, which float32 cannot hold to rtol 1e-6
    np.testing.assert_allclose(grad, ref_grad_sum(x, labels) / 4, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("label_dtype", "num_classes"),
    [(np.int8, 200), (np.uint8, 300), (np.int16, 40000), (np.uint16, 70000)],
    ids=lambda v: np.dtype(v).name if isinstance(v, type) else str(v),
)
@pytest.mark.parametrize("fn", FNS)
def test_narrow_labels_do_not_wrap_around(fn, label_dtype, num_classes):
    """Labels are compared with num_classes (and ignore_index) without wrapping around in a
    dtype narrower than the class count: every label here is a valid class."""
    info = np.iinfo(label_dtype)
    x = _logits((3, num_classes), seed=30)
    labels = np.asarray([info.max, 1, 0], label_dtype)
    ref = labels.astype(np.int32)
    kw = {"reduction": "none"}
    out = jax.jit(lambda v, y: _call(fn, v, y, **kw))(x, labels)
    assert np.isfinite(out).all()
    chex.assert_trees_all_equal(out, jax.jit(lambda v, y: _call(fn, v, y, **kw))(x, ref))
    chex.assert_trees_all_equal(_call(fn, x, labels, **kw), out)  # eager: no ValueError


@pytest.mark.parametrize("fn", FNS)
def test_ignore_index_the_label_dtype_cannot_hold_ignores_nothing(fn):
    """PyTorch's -100 is not uint8 label 156 (-100 mod 256); 255 is not int8 label -1."""
    x = _logits((2, 200), seed=31)
    if fn == "nll_loss":
        x = np.asarray(jaxlse.log_softmax(x))
    labels = np.asarray([156, 1], np.uint8)
    out = _call(fn, x, labels, ignore_index=-100, reduction="none")
    chex.assert_trees_all_equal(out, _call(fn, x, labels.astype(np.int32), reduction="none"))
    assert (np.asarray(out) > 0).all()
    with pytest.raises(ValueError, match=r"label -1 at position \(0,\)"):
        _call(fn, x, np.asarray([-1, 1], np.int8), ignore_index=255)


def test_soft_targets_gradient_matches_optax():
    """The gradient with respect to soft targets is -log_softmax(x), as for optax (also at the
    classes whose target is 0), and with respect to the logits it is unchanged."""
    x = _logits((5, 7), seed=32, scale=3.0)
    t = _soft_labels((5, 7), seed=32)
    assert (t == 0).any()

    def ours(v, q):
        return jnp.sum(jaxlse.cross_entropy(v, q, reduction="none"))

    def theirs(v, q):
        return jnp.sum(optax.softmax_cross_entropy(v, q))

    g = jax.jit(jax.grad(ours, argnums=(0, 1)))(x, t)
    g_ref = jax.jit(jax.grad(theirs, argnums=(0, 1)))(x, t)
    chex.assert_trees_all_close(g, g_ref, rtol=2e-6, atol=2e-7)
    nll = jax.grad(lambda q: jnp.sum(jaxlse.nll_loss(jaxlse.log_softmax(x), q, reduction="none")))
    chex.assert_trees_all_close(nll(t), g_ref[1], rtol=2e-6, atol=2e-7)


def test_options_are_differentiable(x64):
    """Soft targets, class weights, label_smoothing and z_loss all get their derivatives (first
    and second order), equal to plain autodiff of the formula; before, the rule dropped them."""
    x = _logits((4, 6), F64, seed=33)
    t = _soft_labels((4, 6), F64, seed=33)
    y = np.asarray([0, 3, 5, 1])
    w = np.linspace(0.5, 2.0, 6)

    def soft(v, q, ww, e, z):
        return jaxlse.cross_entropy(v, q, weight=ww, label_smoothing=e, z_loss=z)

    def soft_ref(v, q, ww, e, z):
        return plain_cross_entropy(v, q, weight=ww, label_smoothing=e, z_loss=z)

    def hard(v, ww, e, z):
        return jaxlse.cross_entropy(v, y, weight=ww, label_smoothing=e, z_loss=z, ignore_index=3)

    def hard_ref(v, ww, e, z):
        return plain_cross_entropy(v, jnp.asarray(y), weight=ww, label_smoothing=e, z_loss=z,
                                   ignore_index=3)

    cases = ((soft, soft_ref, (x, t, w, 0.1, 0.01)), (hard, hard_ref, (x, w, 0.1, 0.01)))
    for f, ref, args in cases:
        check_grads(f, args, order=2)
        argnums = tuple(range(len(args)))
        chex.assert_trees_all_close(fast_jit(jax.grad(f, argnums))(*args),
                                    fast_jit(jax.grad(ref, argnums))(*args), rtol=1e-12, atol=1e-14)
        # d/dz_loss at z_loss = 0 is the mean of w_y * lse**2, not 0
        at0 = args[:-1] + (0.0,)
        chex.assert_trees_all_close(fast_jit(jax.grad(f, len(args) - 1))(*at0),
                                    fast_jit(jax.grad(ref, len(args) - 1))(*at0), rtol=1e-12)


def test_options_gradient_finite_at_neg_inf_logit():
    """A -inf logit with zero target (a masked class) leaves the gradients with respect to the
    targets and the weights finite, in both modes."""
    x = _logits((4, 6), seed=34).copy()
    x[:, 2] = -np.inf
    t = _soft_labels((4, 6), seed=34).copy()
    t[:, 2] = 0.0
    t /= t.sum(-1, keepdims=True)
    w = np.linspace(0.5, 2.0, 6, dtype=F32)

    def f(v, q, ww):
        return jaxlse.cross_entropy(v, q, weight=ww, reduction="none")

    for g in jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2)))(x, t, w):
        assert np.isfinite(g).all()
    jac = jax.jit(jax.jacfwd(f, argnums=(1, 2)))(x, t, w)
    assert all(np.isfinite(j).all() for j in jac)
    lp = jaxlse.log_softmax(x)
    g = jax.grad(lambda q: jnp.sum(jaxlse.nll_loss(lp, q, weight=w)))(t)
    assert np.isfinite(g).all() and (np.asarray(g)[:, 2] == 0).all()


@pytest.mark.parametrize("axis", [(2, 3), (3, 2), (1, 3), (-1, -3), (0,)])
@pytest.mark.parametrize("labels_kind", ["int", "soft"])
def test_tuple_axis_matches_optax(axis, labels_kind):
    """Several class axes, as in optax: a flat (C-order) class index over them, in the given
    order; the gradient has the logits' layout."""
    x = _logits((2, 3, 4, 5), seed=35)
    axes = tuple(a % 4 for a in axis)
    batch = tuple(n for i, n in enumerate(x.shape) if i not in axes)
    num_classes = math.prod(x.shape[a] for a in axes)
    if labels_kind == "int":
        labels = _rng(35).integers(0, num_classes, batch)
        optax_loss = optax.softmax_cross_entropy_with_integer_labels
    else:
        labels = np.asarray(jax.nn.softmax(_logits(x.shape, seed=36), axis=axes))
        optax_loss = optax.softmax_cross_entropy

    def ref(v, y):
        return optax_loss(v, y, axis=axis)

    w = np.linspace(0.5, 2.0, num_classes, dtype=F32)
    w_shaped = w.reshape(tuple(x.shape[a] for a in axes))
    batch_axes = tuple(i for i in range(4) if i not in axes)
    flat = x.transpose(batch_axes + axes).reshape(batch + (num_classes,))
    flat_labels = labels if labels_kind == "int" else labels.transpose(
        batch_axes + axes).reshape(batch + (num_classes,))
    kw = {"label_smoothing": 0.1}

    @fast_jit  # everything below, compiled once (compared with tolerances)
    def results(v, y, v_flat, y_flat, ww, ww_shaped):
        lp = jaxlse.log_softmax(v, axis=axes)
        return {
            "ours": loss_and_grad_traced(
                lambda u: jaxlse.cross_entropy(u, y, axis=axis, reduction="none"), v),
            "optax": loss_and_grad_traced(lambda u: ref(u, y), v),
            "flat": jaxlse.cross_entropy(v_flat, y_flat, weight=ww, **kw),
            "weight": jaxlse.cross_entropy(v, y, axis=axis, weight=ww, **kw),
            "weight_shaped": jaxlse.cross_entropy(v, y, axis=axis, weight=ww_shaped, **kw),
            "nll": jaxlse.nll_loss(lp, y, axis=axis, weight=ww),
            "nll_flat": jaxlse.nll_loss(jaxlse.log_softmax(v_flat), y_flat, weight=ww),
        }

    r = results(x, labels, flat, flat_labels, w, w_shaped)
    loss, grad = r["ours"]
    assert loss.shape == batch and grad.shape == x.shape
    chex.assert_trees_all_close(r["ours"], r["optax"], rtol=2e-6, atol=3e-7)
    # the same as flattening the class axes by hand; weights of the class axes' shape or flat
    for key in ("weight", "weight_shaped"):
        chex.assert_trees_all_close(r[key], r["flat"], rtol=1e-6)
    chex.assert_trees_all_close(r["nll"], r["nll_flat"], rtol=1e-6)


@pytest.mark.parametrize(
    ("axis", "exc", "what"),
    [((), ValueError, "at least one class axis"), ((1, 1), ValueError, "repeated"),
     ((1, 7), ValueError, "out of range"), ((1, 2.0), TypeError, "an int or a tuple of ints")],
)
@pytest.mark.parametrize("fn", FNS)
def test_bad_tuple_axis(fn, axis, exc, what):
    x = _logits((2, 3, 4), seed=37)
    with pytest.raises(exc, match=rf"^{fn}: `axis`.*{what}"):
        _call(fn, x, np.zeros((2,), np.int32), axis=axis)


@pytest.mark.parametrize("fn", FNS)
def test_soft_labels_reject_a_class_ignore_index(fn):
    """As PyTorch: ignore_index >= 0 with probability targets is an error; -100 is accepted."""
    x = _logits((2, 3), seed=38)
    q = _soft_labels((2, 3), seed=38)
    with pytest.raises(ValueError, match=rf"^{fn}: `ignore_index` 1 is not supported"):
        _call(fn, x, q, ignore_index=1)
    chex.assert_trees_all_equal(_call(fn, x, q, ignore_index=-100), _call(fn, x, q))

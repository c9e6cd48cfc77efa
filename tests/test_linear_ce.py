"""Tests for ``jaxlse.linear_cross_entropy``, in the order of the issue's requirements.

1. value and gradients with respect to x, w and bias equal those of the materialised
   ``cross_entropy(x @ w + bias, ...)`` for every option and reduction, chunk sizes that do and
   do not divide V, 1-D, 2-D and 3-D x, with and without bias (float64, tight; float32);
2. ``reduction="none"`` with random per-token cotangents (``jax.vjp``);
3. forward mode: ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``, forward-over-reverse
   Hessian-vector products, and finite differences to second order (as ``check_grads``);
4. bfloat16 inputs: a float32 loss, gradients in the inputs' dtypes, float32 accumulation;
5. memory: compiled temp bytes of ``value_and_grad`` at N=2048, d=512, V=131072 (compile only),
   and the saved residuals;
6. one trace per shape, ``jit`` and ``vmap``, bad input, and the edge cases.

Plain pytest functions; every input is seeded. Compilation dominates the run time on XLA:CPU
(about a second per program), so the comparisons of many cases are traced into one jitted
program each and reported case by case (``helpers.Cases``). Vocabularies are V=37 (prime:
chunk sizes 8 and 64 do not divide it) and V=40 (chunk 8 divides it), with N=7 tokens.
"""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import Cases, fast_compile_options, fast_jit
from jax import lax
from jax.ad_checkpoint import print_saved_residuals
from jax.test_util import check_jvp, check_vjp

import jaxlse

F32, BF16, F64 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float64)
# |ours - materialised| <= atol + rtol * |materialised|, for values and gradients. The two
# compute the same logits with differently blocked matrix products (and sums over chunks in
# another order), so they agree to a few ulps of the operands' magnitudes.
TOL = {F64: {"rtol": 1e-12, "atol": 1e-13}, F32: {"rtol": 2e-5, "atol": 2e-6}}

# Compilation dominates these tests: most programs are compiled with helpers.fast_jit
# (their checks are tolerances). Programs whose floating-point code generation matters (the
# fused multiply-add case, jit against eager, memory) are compiled as users' programs are.

# Option values for the "traced" configuration, in which every option is an array argument
# (weight, where, label_smoothing, z_loss, soft_cap; ignore_index=3), so that one compiled
# program serves them all. An option left out takes its neutral value: weight 1, where True,
# 0 for label_smoothing and z_loss, and a soft_cap of 1e30, which changes no logit.
VALUES = {
    "all": {"weight": True, "where": True, "label_smoothing": 0.1, "z_loss": 0.01,
            "soft_cap": 4.0},
    "weight": {"weight": True},
    "where": {"where": True},
    "label_smoothing": {"label_smoothing": 0.15},
    "weighted_smoothing": {"weight": True, "label_smoothing": 0.2},
    "z_loss": {"z_loss": 0.02},
    "soft_cap": {"soft_cap": 3.0},
    "ignore_index_only": {},
}
TRACED = ("weight", "where", "label_smoothing", "z_loss", "soft_cap")
# Static configurations: keyword options given as Python values (None / float), which take
# other code paths (no weight: uniform smoothing; no where: an integer "mean" denominator).
STATIC = {
    "traced": {"ignore_index": 3},
    "plain": {},
    "static_options": {"label_smoothing": 0.15, "z_loss": 0.02, "soft_cap": 3.0},
}


def _data(batch=(7,), d=5, num_classes=37, dtype=F64, seed=0, bias=True):
    """Seeded ``(x, w, bias, labels)``; logits of a few units, labels include 3 (ignored)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*batch, d))
    w = rng.standard_normal((d, num_classes)) * 1.5
    b = rng.standard_normal(num_classes) if bias else None
    labels = rng.integers(0, num_classes, batch)
    labels.reshape(-1)[:: 3] = 3  # some tokens carry the ignore_index of STATIC["traced"]
    cast = lambda v: None if v is None else jnp.asarray(v, dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), jnp.asarray(labels)


def _traced_options(values: str, batch: tuple[int, ...], num_classes: int, dtype) -> dict:
    """The array options of the traced configuration for ``VALUES[values]`` (seeded)."""
    rng = np.random.default_rng(123)
    given = VALUES[values]
    weight = rng.uniform(0.2, 2.0, num_classes) if given.get("weight") else np.ones(num_classes)
    where = rng.random(batch) < 0.7 if given.get("where") else np.ones(batch, bool)
    where.reshape(-1)[:1] = True
    scalar = {"label_smoothing": 0.0, "z_loss": 0.0, "soft_cap": 1e30}
    out = {k: jnp.asarray(given.get(k, v), dtype) for k, v in scalar.items()}
    return out | {"weight": jnp.asarray(weight, dtype), "where": jnp.asarray(where)}


def _materialised_logits(x, w, b):
    logits = x @ w
    return logits if b is None else logits + b.reshape((1,) * (logits.ndim - 1) + b.shape)


def reference(
    x, w, b, labels, *, weight=None, ignore_index=None, label_smoothing=0.0, z_loss=0.0,
    soft_cap=None, reduction="mean", where=None,
):
    """cross_entropy of the materialised logits ``x @ w + b`` in plain ``jax.numpy`` (ordinary
    autodiff; cheap to compile). ``jaxlse.cross_entropy`` itself is checked against the same
    formula in test_losses, and is the reference of a few cases here."""
    logits = _materialised_logits(x, w, b)
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    batch, c = logits.shape[:-1], logits.shape[-1]
    wt = jnp.ones(c, logits.dtype) if weight is None else weight
    m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    lse = jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)) + m
    counted = jnp.ones(batch, bool) if where is None else where
    if ignore_index is not None:
        counted = counted & (labels != ignore_index)
    idx = jnp.where(counted, labels, 0)
    scale = wt[idx]
    onehot = jax.nn.one_hot(idx, c, dtype=logits.dtype)
    wt_row = wt.reshape((1,) * len(batch) + (c,))
    target = (1 - label_smoothing) * scale[..., None] * onehot + label_smoothing / c * wt_row
    loss = -jnp.sum(target * (logits - lse), axis=-1) + z_loss * scale * lse[..., 0] ** 2
    loss = jnp.where(counted, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    return jnp.sum(loss) / jnp.sum(jnp.where(counted, scale, 0.0))


class Case(NamedTuple):
    """One comparison of linear_cross_entropy with the materialised logits' loss."""

    config: str  # a key of STATIC; "traced" takes its option arrays from VALUES
    reduction: str
    chunk: int | None
    batch: tuple[int, ...] = (7,)
    num_classes: int = 37
    bias: bool = True
    dtype: Any = F64
    seed: int = 0
    cross_entropy: bool = False  # also compare with jaxlse.cross_entropy itself

    @property
    def id(self) -> str:
        shape = "x".join(map(str, self.batch)) or "scalar"
        return (f"{self.config}/{self.reduction}/chunk={self.chunk}/V={self.num_classes}/"
                f"batch={shape}/bias={self.bias}/{jnp.dtype(self.dtype).name}")


def _inputs(case: Case, values: str) -> tuple:
    x, w, b, labels = _data(case.batch, num_classes=case.num_classes, dtype=case.dtype,
                            seed=case.seed, bias=case.bias)
    traced = {}
    if case.config == "traced":
        traced = _traced_options(values, case.batch, case.num_classes, case.dtype)
    out_dtype = F64 if case.dtype == F64 else F32
    shape = case.batch if case.reduction == "none" else ()
    ct = jnp.asarray(np.random.default_rng(case.seed + 7).standard_normal(shape), out_dtype)
    return x, w, b, labels, traced, ct


def _program(cases: tuple[Case, ...]):
    """One jitted program evaluating every case: ours and its references, value and
    cotangents of (x, w, bias) for the output cotangent ``ct``.

    Cases are traced into a single ``jax.jit`` (one compilation instead of one per case: on
    XLA:CPU each compiled program has a fixed cost of about a second), and the traced
    configuration takes its options as arguments, so that one compilation serves every set
    of VALUES. With ``reduction="none"`` the cotangent is random per token (requirement 2).
    """

    def program(inputs):
        results = []
        for case, (x, w, b, labels, traced, ct) in zip(cases, inputs, strict=True):
            kw = STATIC[case.config] | traced

            def ours(x, w, b, case=case, labels=labels, kw=kw):
                return jaxlse.linear_cross_entropy(
                    x, w, labels, bias=b, reduction=case.reduction, chunk_size=case.chunk, **kw
                )

            def plain(x, w, b, case=case, labels=labels, kw=kw):
                return reference(x, w, b, labels, reduction=case.reduction, **kw)

            def materialised(x, w, b, case=case, labels=labels, kw=kw):
                logits = _materialised_logits(x, w, b)
                return jaxlse.cross_entropy(logits, labels, reduction=case.reduction, **kw)

            fns = (ours, plain, materialised) if case.cross_entropy else (ours, plain)
            out = []
            for f in fns:
                value, vjp = jax.vjp(f, x, w, b)
                out.append((value, vjp(ct)))
            results.append(out)
        return results

    return jax.jit(program)


def _check_cases(
    cases: list[Case], values: tuple[str, ...] = ("all",), fast: bool = True
) -> None:
    """Every case against its references, once per set of VALUES; failures by case id."""
    checks = Cases()
    compiled = None
    for vals in values:
        inputs = [_inputs(case, vals) for case in cases]
        if compiled is None:
            lowered = _program(tuple(cases)).lower(inputs)
            compiled = lowered.compile(compiler_options=fast_compile_options() if fast else None)
        for case, (x, w, b, *_), (ours, *refs) in zip(
            cases, inputs, compiled(inputs), strict=True
        ):
            value, grads = ours
            with checks.case(f"{case.id}/values={vals if case.config == 'traced' else '-'}"):
                out_dtype = F64 if case.dtype == F64 else F32
                assert value.dtype == out_dtype
                assert value.shape == (case.batch if case.reduction == "none" else ())
                for g, v in zip(grads, (x, w, b), strict=True):
                    assert (g is None and v is None) or g.dtype == v.dtype
                for ref in refs:
                    chex.assert_trees_all_close(ours, ref, **TOL[jnp.dtype(case.dtype)])
    checks.assert_all_passed(len(cases) * len(values))


# --------------------------------------------------------------------------------------------
# 1, 2. values and gradients against the materialised logits


def test_every_option_and_reduction(x64):
    # Chunk 8 does not divide V = 37: four chunks and a last one that overlaps the fourth by 3
    # classes. Every option (traced: one compilation for every set of VALUES), the three
    # reductions with their "mean" denominators (token count, counted tokens, their label
    # weights), the static paths, and jaxlse.cross_entropy itself as a reference.
    cases = [Case("traced", reduction, 8, cross_entropy=reduction != "sum")
             for reduction in ("none", "mean", "sum")]
    cases += [Case("plain", "none", 8), Case("plain", "mean", 8),
              Case("static_options", "none", 8)]
    _check_cases(cases, tuple(VALUES))


def test_chunk_sizes_shapes_and_bias(x64):
    # Chunks that divide V (40/8, 37/1) and one larger than V (37/64), with 1-D, 2-D and 3-D x,
    # with and without bias.
    _check_cases([
        Case("traced", "none", 64, num_classes=37),
        Case("traced", "none", 8, num_classes=40, batch=(2, 3), bias=False),
        Case("traced", "none", 1, num_classes=37, batch=()),
        # 601 tokens: the derivative's scan takes them in two tiles of 301 rows (the second
        # overlaps the first by one token), see _auto_rows.
        Case("traced", "none", 8, num_classes=37, batch=(601,)),
        Case("plain", "mean", 8, num_classes=37, batch=(601,), bias=False),
    ])


def test_float32():
    _check_cases([Case("traced", "none", 8, dtype=F32, seed=1),
                  Case("plain", "mean", 8, dtype=F32, seed=1)])


def test_soft_cap_fused_multiply_add():
    # Capped logits over many rows and chunks, compiled as users' programs are: XLA:CPU
    # contracts cap * tanh(.) - m into a fused multiply-add, and an equality test z == 0
    # missed the max entry (L off by 0.14 in one row of seven).
    _check_cases([Case("static_options", "none", 5, batch=(64,), dtype=F32, seed=11)],
                 fast=False)


def test_none_reduction_random_cotangent_per_token(x64):
    # Requirement 2 in its own words: jax.vjp of the per-token losses with a random cotangent,
    # against the rows of the materialised Jacobian weighted by that cotangent.
    x, w, b, labels = _data(seed=5)
    ct = jnp.asarray(np.random.default_rng(9).standard_normal(labels.shape))

    def ours(x, w, b):
        return jaxlse.linear_cross_entropy(
            x, w, labels, bias=b, reduction="none", chunk_size=8, label_smoothing=0.1
        )

    def materialised(x, w, b):
        return reference(x, w, b, labels, reduction="none", label_smoothing=0.1)

    @fast_jit
    def both(x, w, b, ct):
        jac = jax.jacrev(materialised, argnums=(0, 1, 2))(x, w, b)
        expected = tuple(jnp.tensordot(ct, j, axes=1) for j in jac)
        return jax.vjp(ours, x, w, b)[1](ct), expected

    got, expected = both(x, w, b, ct)
    chex.assert_trees_all_close(got, expected, **TOL[F64])


def test_differentiable_options(x64):
    # weight, label_smoothing, z_loss and soft_cap are differentiable, as in cross_entropy.
    x, w, b, labels = _data(seed=2)
    weight = jnp.asarray(np.random.default_rng(4).uniform(0.5, 2.0, 37))

    @fast_jit
    def both(*args):
        def grad(loss):
            def f(weight, eps, zeta, cap):
                return loss(weight=weight, label_smoothing=eps, z_loss=zeta, soft_cap=cap)

            return jax.value_and_grad(f, argnums=(0, 1, 2, 3))(*args)

        return (
            grad(lambda **o: jaxlse.linear_cross_entropy(
                x, w, labels, bias=b, chunk_size=8, **o)),
            grad(lambda **o: reference(x, w, b, labels, **o)),
        )

    ours, expected = both(weight, jnp.asarray(0.1), jnp.asarray(0.02), jnp.asarray(3.5))
    chex.assert_trees_all_close(ours, expected, **TOL[F64])


# --------------------------------------------------------------------------------------------
# 3. forward mode


def test_forward_mode_matches_materialised(x64):
    # jvp in (x, w, b), the hessian in x (jacfwd of jacrev), forward-over-reverse
    # Hessian-vector products in (x, w, b), and the forward Jacobian of the per-token losses,
    # also against the reverse one.
    x, w, b, labels = _data(seed=3)
    rng = np.random.default_rng(8)
    tangents = tuple(jnp.asarray(rng.standard_normal(v.shape)) for v in (x, w, b))
    opts = {"label_smoothing": 0.1, "z_loss": 0.01, "soft_cap": 4.0}

    def ours(x, w, b, reduction="mean"):
        return jaxlse.linear_cross_entropy(
            x, w, labels, bias=b, chunk_size=8, reduction=reduction, **opts
        )

    def materialised(x, w, b, reduction="mean"):
        return reference(x, w, b, labels, reduction=reduction, **opts)

    def derivatives(f, x, w, b, tangents):
        none = partial(f, reduction="none")
        return {
            "jvp": jax.jvp(f, (x, w, b), tangents),
            "hessian": jax.hessian(f)(x, w, b),
            "hvp": jax.jvp(jax.grad(f, argnums=(0, 1, 2)), (x, w, b), tangents)[1],
            "jacfwd_none": jax.jacfwd(none, argnums=(0, 1, 2))(x, w, b),
            "jacrev_none": jax.jacrev(none, argnums=(0, 1, 2))(x, w, b),
        }

    got, expected = fast_jit(
        lambda *a: (derivatives(ours, *a), derivatives(materialised, *a))
    )(x, w, b, tangents)
    chex.assert_trees_all_close(got, expected, **TOL[F64])
    chex.assert_trees_all_close(got["jacfwd_none"], got["jacrev_none"], **TOL[F64])


def test_forward_mode_with_token_tiles(x64):
    # jvp and forward-over-reverse Hessian-vector products when the derivative's scan splits
    # the 601 tokens into two overlapping tiles.
    x, w, b, labels = _data(batch=(601,), seed=6)
    rng = np.random.default_rng(10)
    tangents = tuple(jnp.asarray(rng.standard_normal(v.shape)) for v in (x, w, b))
    opts = {"label_smoothing": 0.1, "z_loss": 0.01, "soft_cap": 4.0}

    def ours(x, w, b):
        return jaxlse.linear_cross_entropy(x, w, labels, bias=b, chunk_size=8, **opts)

    def materialised(x, w, b):
        return reference(x, w, b, labels, **opts)

    def derivatives(f, x, w, b, tangents):
        return (jax.jvp(f, (x, w, b), tangents),
                jax.jvp(jax.grad(f, argnums=(0, 1, 2)), (x, w, b), tangents)[1])

    got, expected = fast_jit(
        lambda *a: (derivatives(ours, *a), derivatives(materialised, *a))
    )(x, w, b, tangents)
    chex.assert_trees_all_close(got, expected, **TOL[F64])


def test_finite_differences_to_second_order(x64):
    # What check_grads(order=2, modes=("fwd", "rev")) checks, with jitted functions (its
    # unjitted derivatives take about ten compilations): the forward and reverse derivatives
    # against central differences, and the forward derivative of the gradient.
    x, w, b, labels = _data(batch=(3,), d=2, num_classes=5, seed=4)
    ct = jnp.asarray(np.random.default_rng(5).standard_normal(3))

    def f(x, w, b):
        return jaxlse.linear_cross_entropy(x, w, labels, bias=b, chunk_size=2, reduction="none")

    def grad(x, w, b):
        return jax.grad(lambda *a: jnp.vdot(ct, f(*a)), argnums=(0, 1, 2))(x, w, b)

    f_jit, grad_jit = jax.jit(f), fast_jit(grad)
    jvp_jit = fast_jit(lambda p, t: jax.jvp(f, p, t))
    hvp_jit = fast_jit(lambda p, t: jax.jvp(grad, p, t))
    args = (x, w, b)
    check_jvp(f_jit, jvp_jit, args)
    check_vjp(f_jit, partial(jax.vjp, f_jit), args)
    check_jvp(grad_jit, hvp_jit, args)


def test_rule_is_custom_jvp():
    x, w, _, labels = _data(dtype=F32)
    jaxpr = str(jax.make_jaxpr(lambda x: jaxlse.linear_cross_entropy(x, w, labels))(x))
    assert "custom_jvp_call" in jaxpr and "custom_vjp" not in jaxpr


# --------------------------------------------------------------------------------------------
# 4. bfloat16


def _bf16_ulp(v: np.ndarray) -> np.ndarray:
    """The spacing of bfloat16 at |v| (8 significant bits), at least that of the smallest normal."""
    e = np.floor(np.log2(np.maximum(np.abs(v), 2.0**-126)))
    return 2.0 ** (e - 7)


def test_bfloat16_dtypes_and_accuracy():
    # 38 chunks of 8 classes: the gradient of x is a sum over chunks, which must be
    # accumulated in float32 and rounded to bfloat16 once.
    rng = np.random.default_rng(21)
    n, d, v = 7, 16, 300
    x = jnp.asarray(rng.standard_normal((n, d)), BF16)
    w = jnp.asarray(rng.standard_normal((d, v)) * 0.5, BF16)
    b = jnp.asarray(rng.standard_normal(v), BF16)
    labels = jnp.asarray(rng.integers(0, v, n))

    def f(x, w, b):
        return jaxlse.linear_cross_entropy(x, w, labels, bias=b, chunk_size=8)

    loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, w, b)
    assert loss.dtype == F32
    assert [g.dtype for g in grads] == [BF16, BF16, BF16]

    # Exact reference from the bfloat16 values, in float64.
    x64_, w64, b64 = (np.asarray(a, np.float64) for a in (x, w, b))
    logits = x64_ @ w64 + b64
    lse = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
    ref_loss = np.mean(lse - logits[np.arange(n), np.asarray(labels)])
    p = np.exp(logits - lse[:, None])
    g = (p - np.eye(v)[np.asarray(labels)]) / n
    ref = (g @ w64.T, x64_.T @ g, g.sum(0))
    assert abs(float(loss) - ref_loss) <= 1e-6 * ref_loss
    def rounded_once(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
        # Half an ulp of bfloat16 plus float32's error (entries that cancel are known only
        # to float32's relative accuracy of the largest ones).
        tol = 0.51 * _bf16_ulp(exact) + 1e-6 * np.abs(exact).max()
        return np.abs(np.asarray(got, np.float64) - exact) <= tol

    for ours, exact in zip(grads, ref, strict=True):
        assert rounded_once(ours, exact).all()

    # The bound catches bfloat16 accumulation: the x gradient summed chunk by chunk in
    # bfloat16 misses it in many entries.
    acc = np.zeros((n, d), np.float32)
    for c0 in range(0, v, 8):
        part = g[:, c0:c0 + 8] @ w64[:, c0:c0 + 8].T
        acc = np.asarray(jnp.asarray(acc + part, BF16), np.float32)
    assert not rounded_once(acc, ref[0]).all()


# --------------------------------------------------------------------------------------------
# 5. memory


def _vg_temp_bytes(n: int, d: int, v: int, dtype=F32, chunk=None) -> int:
    def loss(x, w, labels):
        return jaxlse.linear_cross_entropy(x, w, labels, chunk_size=chunk)

    shapes = (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), dtype),
              jax.ShapeDtypeStruct((n,), jnp.int32))
    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return vg.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_memory_target_value_and_grad():
    # The target: at most 2 % of one float32 (N, V) logits array at N=2048, d=512,
    # V=131072, and (with the default chunk size, which keeps a block below 1/128 of the
    # logits) at V=32768 too. Compiled only (the arrays would take 1.5 GiB).
    n, d = 2048, 512
    for v in (131072, 32768, 131071):  # 131071: chunks that do not divide V
        temp = _vg_temp_bytes(n, d, v)
        assert temp <= 0.02 * n * v * 4, (v, temp / (n * v * 4))
    # No growth with V once the block reaches its 4 MiB (chunk 512 at N=2048) but the scan's
    # index per chunk, which the backward scan keeps: 4 bytes a chunk.
    big, small = _vg_temp_bytes(n, d, 262144), _vg_temp_bytes(n, d, 131072)
    assert big - small <= 4 * (262144 - 131072) // 512


def test_saved_residuals_hold_no_logits_block(capsys):
    n, d, v, chunk = 16, 8, 100, 24  # four chunks and a remainder of 4
    x, w, _, labels = _data(batch=(n,), d=d, num_classes=v, dtype=F32)
    print_saved_residuals(
        lambda x, w: jaxlse.linear_cross_entropy(x, w, labels, chunk_size=chunk, z_loss=1e-3),
        x, w,
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines
    for line in lines:
        dims = [int(s) for s in re.findall(r"\[([\d,]*)\]", line)[0].split(",") if s]
        if "from the argument" in line:
            continue
        assert math.prod(dims) <= n * d, line  # nothing of size (N, chunk) or (N, V)


# --------------------------------------------------------------------------------------------
# 6. transformations


def test_jit_equals_eager():
    x, w, b, labels = _data(dtype=F32, seed=12)
    eager = jaxlse.linear_cross_entropy(x, w, labels, bias=b, chunk_size=8, reduction="none")
    jitted = jax.jit(
        lambda x, w, b, y: jaxlse.linear_cross_entropy(
            x, w, y, bias=b, chunk_size=8, reduction="none"
        )
    )(x, w, b, labels)
    chex.assert_trees_all_close(eager, jitted, rtol=0, atol=0)


def test_vmap_equals_loop():
    rng = np.random.default_rng(13)
    xs = jnp.asarray(rng.standard_normal((3, 7, 5)), F32)
    ys = jnp.asarray(rng.integers(0, 37, (3, 7)))
    _, w, b, _ = _data(dtype=F32)

    def f(x, y):
        return jaxlse.linear_cross_entropy(x, w, y, bias=b, chunk_size=8, label_smoothing=0.1)

    vg = jax.value_and_grad(f)
    batched = fast_jit(jax.vmap(vg))(xs, ys)
    looped = [fast_jit(vg)(xs[i], ys[i]) for i in range(3)]
    expected = jax.tree.map(lambda *a: jnp.stack(a), *looped)
    chex.assert_trees_all_close(batched, expected, **TOL[F32])


def test_one_trace_per_shape():
    x, w, b, labels = _data(dtype=F32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, w, b, labels):
        return jax.value_and_grad(
            lambda x: jaxlse.linear_cross_entropy(x, w, labels, bias=b, chunk_size=8)
        )(x)

    for seed in range(3):
        f(x + seed, w, b, (labels + seed) % 37)
    chex.clear_trace_counter()


def test_eager_calls_compile_once_per_shape():
    x, w, b, labels = _data(batch=(11,), dtype=F32, seed=14)
    from jaxlse import _linear_ce

    jaxlse.linear_cross_entropy(x, w, labels, bias=b, chunk_size=6)
    size = _linear_ce._token_losses_jit._cache_size()
    for seed in range(3):
        jaxlse.linear_cross_entropy(x * seed, w, (labels + seed) % 37, bias=b, chunk_size=6)
    assert _linear_ce._token_losses_jit._cache_size() == size


def test_auto_chunk_size():
    from jaxlse._linear_ce import _auto_chunk, _auto_rows

    # A block of about 4 MiB, at most 1/128 of the logits.
    assert _auto_chunk(2048, 131072) == 512
    assert _auto_chunk(2048, 32768) == 256
    assert _auto_chunk(8192, 131072) == 128
    assert _auto_chunk(16384, 131072) == 128
    assert _auto_chunk(7, 37) == 37
    assert _auto_chunk(1, 200000) == 1536
    # Tokens are split in the derivative's tiles only where d is large against the chunk.
    assert _auto_rows(2048, 32768, 512, 256) == 512
    assert _auto_rows(2048, 131072, 512, 512) == 2048
    assert _auto_rows(8192, 131072, 512, 128) == 8192
    assert _auto_rows(601, 37, 5, 37) == 301  # at least 256 tokens a tile
    assert _auto_rows(7, 37, 5, 37) == 7


# --------------------------------------------------------------------------------------------
# edge cases


def test_confident_predictions_keep_relative_accuracy():
    # Each token's label logit is about 25 above its others: losses near 1e-9, which the
    # materialised optax loss rounds to 0 or to a multiple of float32's spacing at 1 (6e-8).
    rng = np.random.default_rng(15)
    n, v = 6, 50
    labels = rng.choice(v, n, replace=False)
    x = np.eye(n, dtype=np.float32)
    w = (0.3 * rng.standard_normal((n, v))).astype(np.float32)
    w[np.arange(n), labels] += 25.0
    loss = jaxlse.linear_cross_entropy(x, w, labels, chunk_size=16, reduction="none")
    logits = x.astype(np.float64) @ w.astype(np.float64)
    z = logits - logits[np.arange(n), labels][:, None]
    z[np.arange(n), labels] = -np.inf
    exact = np.log1p(np.sum(np.exp(z), axis=1))
    assert np.all(exact < 1e-8)
    np.testing.assert_allclose(np.asarray(loss), exact, rtol=1e-5)
    naive = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(x @ w), labels)
    assert np.max(np.abs(np.asarray(naive) - exact) / exact) > 0.5


def test_excluded_tokens_give_zero_with_zero_gradient():
    x, w, b, labels = _data(dtype=F32, seed=16)
    x = x.at[2].set(jnp.nan).at[4].set(jnp.inf)
    where = jnp.ones(7, bool).at[2].set(False).at[4].set(False)

    def f(x, w, b):
        return jaxlse.linear_cross_entropy(x, w, labels, bias=b, where=where, chunk_size=8)

    loss, grads = fast_jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, w, b)
    assert np.isfinite(loss)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert not np.any(np.asarray(grads[0])[[2, 4]])
    # Nothing counts: mean 0 with zero gradient.
    none = fast_jit(jax.value_and_grad(lambda x: jaxlse.linear_cross_entropy(
        x, w, labels, where=jnp.zeros(7, bool), chunk_size=8)))(x)
    assert float(none[0]) == 0.0 and not np.any(np.asarray(none[1]))


def test_masked_classes_by_minus_inf_bias(x64):
    # A vocabulary padded to a round size, the padding masked by a -inf bias.
    x, w, b, labels = _data(seed=17)
    b = b.at[30:].set(-jnp.inf)
    labels = labels % 30

    def run(f):
        return fast_jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)

    ours = run(lambda x, w: jaxlse.linear_cross_entropy(
        x, w, labels, bias=b, chunk_size=8, label_smoothing=0.0, z_loss=0.01))
    ref = run(lambda x, w: jaxlse.cross_entropy(
        _materialised_logits(x, w, b), labels, z_loss=0.01))
    chex.assert_trees_all_close(ours, ref, **TOL[F64])


def test_out_of_range_label_under_jit_is_nan():
    # As cross_entropy: the token's loss is NaN, its gradient row 0, and the others unaffected.
    x, w, b, labels = _data(dtype=F32)
    bad_labels = labels.at[1].set(37)

    def f(x, w, labels):
        return jaxlse.linear_cross_entropy(x, w, labels, reduction="none", chunk_size=8)

    def grads(x, w, labels):
        ct = jnp.ones(7).at[1].set(0.0)
        return jax.vjp(lambda x, w: f(x, w, labels), x, w)[1](ct)

    loss = fast_jit(f)(x, w, bad_labels)
    assert np.isnan(loss[1]) and np.all(np.isfinite(np.delete(np.asarray(loss), 1)))
    (gx, gw), (gx_ok, gw_ok) = fast_jit(
        lambda x, w: (grads(x, w, bad_labels), grads(x, w, labels.at[1].set(0)))
    )(x, w)
    assert not np.any(np.asarray(gx[1]))
    chex.assert_trees_all_close((np.delete(np.asarray(gx), 1, 0), gw),
                                (np.delete(np.asarray(gx_ok), 1, 0), gw_ok), rtol=0, atol=0)


def test_empty_batch():
    x, w, _, _ = _data(batch=(0,), dtype=F32)
    labels = jnp.zeros((0,), jnp.int32)
    assert float(jaxlse.linear_cross_entropy(x, w, labels)) == 0.0
    assert jaxlse.linear_cross_entropy(x, w, labels, reduction="none").shape == (0,)


# --------------------------------------------------------------------------------------------
# bad input


def _call(**changes: Any):
    x, w, b, labels = _data(dtype=F32)
    args = {"x": x, "w": w, "labels": labels, "bias": b} | changes
    pos = (args.pop("x"), args.pop("w"), args.pop("labels"))
    return jaxlse.linear_cross_entropy(*pos, **args)


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"x": jnp.ones((7, 5), jnp.complex64)}, TypeError, "`x` must be real"),
        ({"w": "abc"}, TypeError, "`w` must be a numeric array"),
        ({"bias": jnp.ones(37, jnp.complex64)}, TypeError, "`bias` must be real"),
        ({"labels": jnp.zeros(7)}, TypeError, "soft labels are not supported"),
        ({"labels": jnp.zeros(7, bool)}, TypeError, "`labels` must be integer"),
        ({"where": jnp.ones(7, jnp.int32)}, TypeError, "`where` must be a boolean"),
        ({"chunk_size": 2.5}, TypeError, "`chunk_size` must be an int"),
        ({"chunk_size": True}, TypeError, "`chunk_size` must be an int"),
        ({"w": jnp.ones(37)}, ValueError, r"`w` must have shape \(d, V\)"),
        ({"x": jnp.float32(1)}, ValueError, "feature axis"),
        ({"w": jnp.ones((4, 37))}, ValueError,
         r"got x of shape \(7, 5\) and w of shape \(4, 37\)"),
        ({"bias": jnp.ones(36)}, ValueError,
         r"`bias` must have shape \(V,\) = \(37,\) for w of shape \(5, 37\), got bias of "
         r"shape \(36,\)"),
        ({"w": jnp.ones((5, 0))}, ValueError, "at least one class"),
        ({"labels": jnp.zeros(6, jnp.int32)}, ValueError, "integer `labels` must have"),
        ({"weight": jnp.ones(36)}, ValueError, "`weight` must have shape"),
        ({"where": jnp.ones(6, bool)}, ValueError, "`where` of shape"),
        ({"reduction": "avg"}, ValueError, "`reduction` must be one of"),
        ({"label_smoothing": 1.5}, ValueError, r"`label_smoothing` must be in \[0, 1\]"),
        ({"z_loss": -1.0}, ValueError, "`z_loss` must be in >= 0"),
        ({"soft_cap": 0.0}, ValueError, "`soft_cap` must be a positive scalar"),
        ({"chunk_size": 0}, ValueError, "`chunk_size` must be positive"),
        ({"labels": jnp.full(7, 37)}, ValueError, "label 37 at position"),
        ({"labels": jnp.full(7, -1)}, ValueError, "label -1 at position"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input(changes, error, message):
    with pytest.raises(error, match=message) as info:
        _call(**changes)
    assert str(info.value).startswith("linear_cross_entropy: ")


def test_ignore_index_makes_out_of_range_labels_fine():
    value = _call(labels=jnp.full(7, -100).at[0].set(2), ignore_index=-100)
    assert np.isfinite(value)

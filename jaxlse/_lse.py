r"""logsumexp, log_softmax and softmax: public wrappers, private custom_jvp cores and their rules.

All three share per-row statistics. With :math:`m = \max_j x_j` over the included entries,
:math:`z_j = x_j - m` and :math:`S = \sum_j e^{z_j} \ge 1`,
:math:`\operatorname{logsumexp}(x) = m + \log S`, and
:math:`\operatorname{log\_softmax}(x)_i = z_i - \log S`. When one entry dominates,
:math:`S = 1 + t` with :math:`t` tiny and :math:`\log S` would round to 0, losing the
log-probability of about :math:`-t` at the dominant entry; there ``log1p(t)`` with :math:`t`
summed directly keeps full relative accuracy (:func:`_row_log_sum`).

Infinite maxima are handled by their limits: a row whose maximum is :math:`+\infty` puts equal
probability on its :math:`+\infty` entries, and a row with no finite or :math:`+\infty` entry (all
:math:`-\infty`, or all excluded by ``where``) has ``logsumexp = -inf``, ``log_softmax = -inf``
and ``softmax = 0`` with zero derivatives.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from ._checks import (
    Axis,
    as_float_array,
    as_mask,
    broadcast_input,
    compute_dtype,
    nan_where,
    normalize_axes,
    promoted_float,
)

# The (..., n) input is touched with arithmetic only (subtract, exp, floor, maximum, minimum):
# no selects and no operations on the reduced statistics between the reductions. XLA:CPU then
# fuses the max, the sums and the output of a row into one kernel, as it does for jax.nn's
# softmax. Infinite rows are handled by the same arithmetic (see _z); `where` masks need selects.
#
# XLA:CPU (jax 0.10) reduces rows longer than 32768 elements several times slower per byte than
# shorter ones. Such rows are cut into blocks of at most _BLOCK elements that are reduced first,
# and the block results are reduced second. The optimization barriers keep XLA from merging the two
# reductions back into one; they change no value, so the result is the same on every backend. The
# two-level sum is also more accurate than one long running sum.
_LONG_ROW = 32768
_BLOCK = 16384
_MIN_BLOCK = 1024


def _block_size(n: int) -> int | None:
    """The largest divisor of ``n`` in ``[_MIN_BLOCK, _BLOCK]`` if ``n`` is a long row."""
    if n <= _LONG_ROW:
        return None
    for count in range(-(-n // _BLOCK), n // _MIN_BLOCK + 1):
        if n % count == 0:
            return n // count
    return None


def _add(a: jax.Array, b: jax.Array) -> jax.Array:
    # A module-level function (not a lambda), so that lax.reduce's cache sees the same one.
    return a + b


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _sum(v: jax.Array, dims: tuple[int, ...]) -> jax.Array:
    """``jnp.sum(v, dims)`` as a reduce whose initial value is ``-0.0``.

    XLA shares equal constants between kernels; when the 0 that starts a user's ``jnp.sum`` of
    our per-example outputs is shared with the 0 that starts our (N, V) sums, XLA:CPU passes it
    to our kernel as a runtime value and runs that kernel several times slower. ``-0.0`` is as
    good a start for a sum and is not shared. Differentiated as ``jnp.sum``.
    """
    return lax.reduce(v, np.array(-0.0, v.dtype), _add, dims)


@_sum.defjvp
def _sum_jvp(dims, primals, tangents):
    (v,), (v_dot,) = primals, tangents
    return _sum(v, dims), jnp.sum(v_dot, axis=dims)


def _floored_max(v: jax.Array, dims: tuple[int, ...]) -> jax.Array:
    """``max(-big, max over dims of v)``, dims dropped: a row with no entry or only -inf gets
    -big (the dtype's most negative finite value); NaN propagates.

    A plain reduce with initial value -big (not jnp.max(..., initial=...), which adds a separate
    maximum op that splits XLA:CPU's fused kernel). Over a single entry XLA turns the reduce
    into a reshape and drops its initial value (measured: max(-inf) came out -inf), so there
    the floor is an explicit maximum.
    """
    big = jnp.finfo(v.dtype).max
    if math.prod(v.shape[d] for d in dims) == 1:
        return jnp.maximum(lax.squeeze(v, dims), -big)
    return lax.reduce(v, np.array(-big, v.dtype), lax.max, dims)


def _reduce(
    op: str, fn: Callable[..., jax.Array], axes: tuple[int, ...], *arrays: jax.Array
) -> jax.Array:
    """Reduces ``fn(*arrays)`` over ``axes`` with ``op`` ("max" or "sum"), keeping dims.

    ``arrays`` broadcast together; an array whose reduced axes all have size 1 holds one value per
    row. ``fn`` is elementwise, so it may be applied to blocks of the rows.
    """
    def red(v: jax.Array, axis: int | tuple[int, ...], keepdims: bool = False) -> jax.Array:
        dims = (axis,) if isinstance(axis, int) else axis
        dims = tuple(d % v.ndim for d in dims)
        if op == "sum":
            r = _sum(v, dims)
        else:
            r = _floored_max(v, dims)
        return lax.expand_dims(r, dims) if keepdims else r

    shape = tuple(np.broadcast_shapes(*(a.shape for a in arrays)))
    ndim, nred = len(shape), len(axes)
    n = math.prod(shape[a] for a in axes)
    trailing = axes == tuple(range(ndim - nred, ndim))
    k = _block_size(n) if trailing else None
    outer = shape[: ndim - nred]
    rows = math.prod(outer)
    per_row = [a.ndim == ndim and all(a.shape[i] == 1 for i in axes) for a in arrays]
    single = math.prod(shape) == n  # every axis that is not reduced has size 1
    if k is None and single and op == "sum" and n >= 2 * _SPLIT_ONE_ROW:
        return _sum_one_row(fn, arrays, per_row, shape, n).reshape((1,) * ndim)
    if k is None and (not trailing or (ndim == 2 and nred == 1)):
        return red(fn(*arrays), axis=axes, keepdims=True)
    # Trailing axes are reduced as a (rows, n) matrix: XLA:CPU sums other layouts, such as a
    # batch with a leading axis of size 1, e.g. (1, N, V), in another order, measured several
    # ulp less accurate than the same rows as (N, V). Per-row arrays become (rows, 1).
    flat = [
        jnp.broadcast_to(a, outer + (1,) * nred).reshape(rows, 1)
        if p
        else jnp.broadcast_to(a, shape).reshape(rows, n)
        for a, p in zip(arrays, per_row, strict=True)
    ]
    if k is None:
        return red(fn(*flat), axis=1).reshape(outer + (1,) * nred)
    count = n // k
    full = lax.optimization_barrier(
        tuple(a.reshape(rows * count, k) for a, p in zip(flat, per_row, strict=True) if not p)
    )
    full_iter = iter(full)
    blocks = [
        jnp.broadcast_to(a[:, None], (rows, count, 1)).reshape(rows * count, 1)
        if p
        else next(full_iter)
        for a, p in zip(flat, per_row, strict=True)
    ]
    part = lax.optimization_barrier(red(fn(*blocks), axis=1))
    part = red(part.reshape(rows, count), axis=1)
    return part.reshape(outer + (1,) * nred)


# A sum with a single result (one row) is split into this many parts, summed as rows.
_SPLIT_ONE_ROW = 8


def _sum_one_row(
    fn: Callable[..., jax.Array],
    arrays: tuple[jax.Array, ...],
    per_row: list[bool],
    shape: tuple[int, ...],
    n: int,
) -> jax.Array:
    """The sum of ``fn(*arrays)`` over every entry of a single row, as a (1,) array.

    XLA:CPU sums into a single result in an order that is measured up to 16 ulp off for 8192
    positive terms, while the same terms cut into a few rows and summed per row are within
    about 1 ulp. The row is summed as ``_SPLIT_ONE_ROW`` rows (plus a short remainder), whose
    sums are added up in a reduction of their own (behind an optimization barrier, which keeps
    XLA from merging the two back into one).
    """
    c = _SPLIT_ONE_ROW
    head_n = n - n % c
    pairs = list(zip(arrays, per_row, strict=True))
    flat = [(a.reshape(1) if p else jnp.broadcast_to(a, shape).reshape(n), p) for a, p in pairs]
    head = [a if p else a[:head_n].reshape(c, head_n // c) for a, p in flat]
    parts = [_sum(fn(*head), (1,))]
    if head_n < n:
        tail = [a if p else a[head_n:] for a, p in flat]
        parts.append(_sum(fn(*tail), (0,)).reshape(1))
    parts = lax.optimization_barrier(jnp.concatenate(parts))
    return _sum(parts, (0,)).reshape(1)


def _masked_max(axes: tuple[int, ...], x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``max(-big, max_j x_j)`` over the included entries; NaN propagates. Keeps dims.

    A row with no entry, or with only ``-inf``, gets ``-big`` (the dtype's most negative finite
    value), which keeps ``x - m`` free of ``-inf - (-inf)``; ``x`` is held constant.
    """
    x = lax.stop_gradient(x)
    if mask is None:
        return _reduce("max", lambda v: v, axes, x)
    return _reduce("max", lambda v, w: jnp.where(w, v, -jnp.inf), axes, x, mask)


@jax.custom_jvp
def _clip(x: jax.Array, c: jax.Array) -> jax.Array:
    """``min(x, c)`` for ``x <= c`` except at ``+inf``, with derivative 1 in ``x`` everywhere.

    ``c`` is a row statistic held constant, and ``x == c`` at a row's max: ``jnp.minimum``
    splits its derivative there between its operands (0.5 each), which would halve it.
    """
    return jnp.minimum(x, c)


@_clip.defjvp
def _clip_jvp(primals, tangents):
    x, c = primals
    return _clip(x, c), jnp.broadcast_to(tangents[0], np.broadcast_shapes(x.shape, c.shape))


def _z(
    x: jax.Array,
    m: jax.Array,
    mask: jax.Array | None = None,
    *,
    clip_inf: bool = True,
    above_max: bool = False,
) -> jax.Array:
    r"""``z = x - m`` for the row statistic ``m`` of :func:`_masked_max`, with ``+inf`` clipped.

    For finite rows this is ``x - m`` exactly. In a row whose max is :math:`+\infty` it is 0 at
    the :math:`+\infty` entries and :math:`\le -2\cdot 10^{31}` (float32) elsewhere, so
    ``exp(z)`` is their limit (1 and 0). In a row with no entry it is ``-inf``. Excluded entries
    are ``-inf``. 16-bit ``x`` (and ``m``, which is exact in ``x``'s dtype) is converted to
    float32 here, inside each kernel that reads it.

    ``x`` is clipped to the clipped row max ``mc = min(m, big)`` (the same as clipping it to
    ``big``, as ``x <= m`` for every included entry): no (N, V) operation takes a constant
    operand, which XLA:CPU would turn into a full-size broadcast and materialise as an input of
    its fused reduction. ``m`` is clipped before broadcasting.

    ``clip_inf=False`` leaves ``+inf`` entries as they are (``z = +inf``), for a caller whose
    result is ``+inf`` for such a row anyway (logsumexp); one operation less per entry.
    ``above_max=True`` is for entries that may exceed ``m`` (logsumexp's ``b == 0`` entries,
    which ``m`` leaves out): ``x`` is clipped to ``big`` instead.
    """
    cd = compute_dtype(x.dtype)
    x, m = x.astype(cd), m.astype(cd)
    big = jnp.finfo(cd).max
    mc = jnp.broadcast_to(jnp.minimum(m, big), np.broadcast_shapes(x.shape, m.shape))
    if above_max:
        z = jnp.minimum(x, big) - mc
    elif clip_inf:
        z = _clip(x, mc) - mc
    else:
        z = x - mc
    return z if mask is None else jnp.where(mask, z, -jnp.inf)


def _p(
    x: jax.Array,
    m: jax.Array,
    log_sum: jax.Array,
    mask: jax.Array | None = None,
    scale: jax.Array | None = None,
) -> jax.Array:
    """``softmax = exp(z - L)`` for a rule's backward pass, from ``x`` and per-row statistics.

    ``scale`` (per row) multiplies it. The per-row values (the clipped max, ``L``, ``scale``)
    are formed before an optimization barrier, so that the (N, V) kernel reads them rather
    than recomputing them for every entry (measured 3x slower at (256, 1000)), and the barrier
    keeps XLA from sharing (N, V) intermediates (``z``, a float32 copy of 16-bit ``x``,
    broadcasts of the row statistics) between the forward kernels and this backward one:
    XLA:CPU materialises any such shared intermediate, which costs a full (N, V) temporary. It
    changes no value and is differentiable, so higher derivatives stay exact. Excluded entries
    give 0 whatever they hold.
    """
    cd = compute_dtype(x.dtype)
    mc = jnp.minimum(m.astype(cd), jnp.finfo(cd).max)
    ops = (x, mc, log_sum, mask, scale)
    x, mc, log_sum, mask, scale = lax.optimization_barrier(ops)
    p = jnp.exp(_z(x, mc, mask) - log_sum)
    return p if scale is None else p * scale


def _sum_exp(
    axes: tuple[int, ...],
    x: jax.Array,
    mask: jax.Array | None,
    clip_inf: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Returns ``(m, S)`` with ``S = sum_j exp(z_j)``, reduced axes kept."""
    m = _masked_max(axes, x, mask)
    z = partial(_z, clip_inf=clip_inf)
    if mask is None:
        return m, _reduce("sum", lambda v, mm: jnp.exp(z(v, mm)), axes, x, m)
    return m, _reduce("sum", lambda v, mm, w: jnp.exp(z(v, mm, w)), axes, x, m, mask)


# A row's non-maximal sum t below float32's smallest normal (about e^-87.3) is summed again with
# its terms scaled by 2**_TINY_EXP, so that they are not flushed to zero (XLA:CPU flushes
# subnormal results) and a dominant entry's log-probability of -1e-40 can be returned exactly.
_TINY_EXP = 92


def _below(
    x: jax.Array,
    m: jax.Array,
    mask: jax.Array | None = None,
    *,
    scaled: bool = False,
    two_sum: bool = True,
) -> jax.Array:
    r"""``e^{z_j}`` for the entries below the row max, 0 at the max entries; for the exact pass.

    ``z_j = x_j - m`` is rounded when ``x_j < m / 2``, and ``exp`` turns that rounding into a
    relative error of up to :math:`|z_j| 2^{-24}` (64 ulp at :math:`z_j = -70`), which shows
    in a dominant entry's tiny log-probability. The rounding error ``r_j`` is recovered exactly
    (TwoSum) and the term is :math:`e^{\hat z_j}(1 + r_j)`.

    ``scaled``: :math:`e^{z_j} 2^{92}` as ``exp(z_j + c) * r`` with ``c`` = float32(92 log 2)
    and :math:`r = 2^{92} e^{-c}` (1 + 2e-6, rounded once), for rows whose every term has
    :math:`z_j < -55`: there ``z_j + c`` is exact (both are multiples of the spacing of
    ``z_j`` and the sum is below 64 in magnitude).

    ``two_sum=False`` leaves the rounding of ``z_j`` uncorrected (``e^{\hat z_j}``, about half
    the arithmetic). That is as accurate unless the row is dominated, when the terms that make
    up :math:`t` have large :math:`|z_j|` (see ``_TWO_SUM_BELOW``).
    """
    # Its value only corrects L (under a stop_gradient): no derivative flows through it, and
    # none is traced (the 2**k scaling below would overflow a tangent).
    x, m = lax.stop_gradient(x), lax.stop_gradient(m)
    cd = compute_dtype(x.dtype)
    info = jnp.finfo(cd)
    shape = np.broadcast_shapes(x.shape, m.shape)
    mc = jnp.minimum(jnp.broadcast_to(m.astype(cd), shape), info.max)
    # TwoSum of a = x (clamped to [mc - 2**100, mc], so that infinite entries give a finite,
    # unused error) and b = -mc; s = a + b is z_j wherever its term is not 0, and 0 at the max.
    a = jnp.minimum(x.astype(cd), mc)
    if two_sum:
        a = jnp.maximum(a, mc - 2.0**100)
    b = -mc
    s = a + b
    if two_sum:
        bb = s - a
        err = (a - (s - bb)) + (b - bb)
    if mask is not None:
        # Excluded entries may hold NaN: their term and its error are both set, to 0 and 0.
        s = jnp.where(mask, s, -jnp.inf)
        if two_sum:
            err = jnp.where(mask, err, 0.0)
    if scaled:
        shift = np.asarray(_TINY_EXP * np.log(2.0), cd)
        ratio = np.asarray(np.exp(_TINY_EXP * np.log(2.0) - np.float64(shift)), cd)
        e = jnp.exp(s + shift) * ratio
    else:
        e = jnp.exp(s)
    # 1 where s < 0, 0 at the max (s = 0): |s| >= tiny whenever s != 0 (a difference of two
    # floats that is below tiny is subnormal, which XLA:CPU flushes to 0: a tie). Arithmetic,
    # not a comparison, which would split XLA:CPU's fused reduction (measured 2.5x slower).
    if two_sum:
        e = e + e * err
    return e * jnp.minimum(s * (-1 / info.tiny), 1.0)


def _log1p(t: jax.Array) -> jax.Array:
    """``log1p`` for per-row values ``t >= 0``, within about 1.5 ulp (XLA:CPU's: 2.5 above 0.1).

    Above 1/8 it is ``log(u) + (t - (u - 1)) / u`` with ``u = 1 + t``: ``u - 1`` is exact, so the
    second term is the rounding of ``u``, to first order. ``u`` passes through an optimization
    barrier, or XLA would simplify ``(1 + t) - 1`` to ``t``.
    """
    u = lax.optimization_barrier(1 + t)
    return jnp.where(t < 0.125, jnp.log1p(t), jnp.log(u) + (t - (u - 1)) / u)


# Rows whose sum S of shifted exponentials is below this get L = log1p(t + k - 1) from the sum
# t of their non-maximal terms (k max entries) rather than log(S): float32 summation leaves S a
# few ulp off, which log(S) turns into up to ~26 ulp of a small L (measured for S in [1.1, 4]).
# Above it, L >= log(8) = 2.08 and log(S) is within about 2 ulp.
_EXACT_BELOW = 8.0
# float32 and float64 inputs of at most this many entries may keep exp(z) for the backward
# pass (the rules of log_softmax and cross_entropy): they stay in cache, where a second exp
# per entry costs more than keeping the first.
_KEEP_EXP_MAX = 1 << 20


def _keeps_exp(x: jax.Array, mask: jax.Array | None = None) -> bool:
    """Whether a rule keeps ``exp(z)`` for its backward pass (see ``_KEEP_EXP_MAX``)."""
    return mask is None and jnp.dtype(x.dtype).itemsize >= 4 and x.size <= _KEEP_EXP_MAX


def _exact_below(out_dtype: jnp.dtype) -> float:
    """The ``S`` below which a row's ``L`` needs the exact pass, for results in ``out_dtype``.

    float32 (and float64, whose sums run in float64) results need ``_EXACT_BELOW``. A 16-bit
    result with ``p`` fraction bits has an ulp of at least ``2**-(p + 1)`` of its value, far
    coarser than the few float32 ulp that ``log(S)`` is off in absolute terms (below
    ``2**-20``): only rows whose ``L`` is below ``2**(p - 17)`` (about
    ``S < 1 + 2**(p - 17)``) need it, and elsewhere the error stays under a quarter of the
    result's ulp. With bfloat16 that is ``S < 1 + 2**-10``: a row dominated by 7 or more.
    """
    dtype = jnp.dtype(out_dtype)
    if dtype.itemsize >= 4:
        return _EXACT_BELOW
    return 1.0 + 2.0 ** (jnp.finfo(dtype).nmant - 17)


# The exact pass reads only the rows that need it when they are at most 1/_FEW_FRACTION of the
# rows: with confident predictions a few rows of a batch are dominated by one logit (and the
# losses' pass is limited to rows whose label is near the max, usually none or one), and summing
# them alone saves most of a pass over the logits. Beyond that fraction every row is read.
_FEW_FRACTION = 8


def _few_budget(axes: tuple[int, ...], args: tuple[jax.Array, ...]) -> int:
    """How many rows the exact pass may read alone (0: it reads every row).

    Needs no mask, trailing reduced axes and at least ``_FEW_FRACTION`` rows.
    """
    x = args[0]
    ndim, nred = x.ndim, len(axes)
    rows = math.prod(x.shape[: ndim - nred])
    if len(args) != 2 or axes != tuple(range(ndim - nred, ndim)):
        return 0
    return rows // _FEW_FRACTION


def _sum_below(
    axes: tuple[int, ...],
    args: tuple[jax.Array, ...],
    need: jax.Array,
    budget: int,
    two_sum: bool = True,
) -> jax.Array:
    """The sum of :func:`_below` (with its ``two_sum``) over ``axes`` (kept), exact where ``need``.

    With ``budget == 0`` every row is summed. Otherwise (see :func:`_few_budget`; the caller has
    checked that at most ``budget`` rows need it) only the rows that need it are summed, and
    the others get 0. float32 and float64 rows are summed one at a time in a loop, which keeps
    no temporary, so that the rules' backward passes may use it too. 16-bit rows are gathered
    into a (budget, n) temporary (1/8 of ``x`` at most) and summed together: XLA:CPU runs a
    16-bit slice inside a loop in float32, converting the whole of ``x`` once, outside the
    loop, which would cost a full float32 copy. A single row is summed as :func:`_reduce` sums
    one, as accurately as a batch of rows.
    """
    below = partial(_below, two_sum=two_sum)
    if budget == 0:
        return _reduce("sum", below, axes, *args)
    x, m = args
    n = math.prod(x.shape[a] for a in axes)
    rows = x.size // n
    x, m, flat = x.reshape(rows, n), m.reshape(rows, 1), need.reshape(rows)
    zeros = jnp.zeros((rows, 1), compute_dtype(x.dtype))
    if jnp.dtype(x.dtype).itemsize == 2:
        idx = jnp.nonzero(flat, size=budget, fill_value=rows)[0]
        xs = x.at[idx].get(mode="fill", fill_value=0)
        ms = m.at[idx].get(mode="fill", fill_value=0)
        t = zeros.at[idx].set(_reduce("sum", below, (1,), xs, ms), mode="drop")
        return t.reshape(need.shape)
    idx = jnp.nonzero(flat, size=budget, fill_value=0)[0]

    def add_row(i: jax.Array, t: jax.Array) -> jax.Array:
        r = idx[i]
        xr, mr = lax.dynamic_slice_in_dim(x, r, 1), lax.dynamic_slice_in_dim(m, r, 1)
        return lax.dynamic_update_slice_in_dim(t, _reduce("sum", below, (1,), xr, mr), r, 0)

    count = jnp.minimum(jnp.sum(flat, dtype=jnp.int32), budget)
    return lax.fori_loop(0, count, add_row, zeros).reshape(need.shape)


@jax.custom_jvp
def _take_last(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``jnp.take_along_axis(x, idx, axis=-1)``, differentiated as it is.

    16-bit floats are gathered as unsigned integers of the same width: XLA:CPU rewrites a
    16-bit gather followed by a conversion to float32 as a gather from a float32 copy of the
    whole of ``x``, which it then shares with the other kernels that convert ``x`` and
    materialises (a full float32 copy, measured for cross_entropy's label logits).
    """
    if jnp.dtype(x.dtype).itemsize != 2:
        return jnp.take_along_axis(x, idx, axis=-1)
    bits = jnp.take_along_axis(lax.bitcast_convert_type(x, jnp.uint16), idx, axis=-1)
    return lax.bitcast_convert_type(bits, x.dtype)


@_take_last.defjvp
def _take_last_jvp(primals, tangents):
    (x, idx), (x_dot, _) = primals, tangents
    return _take_last(x, idx), jnp.take_along_axis(x_dot, idx, axis=-1)


def _three_way(
    axes: tuple[int, ...],
    args: tuple[jax.Array, ...],
    need: jax.Array,
    none: Callable[..., Any],
    some: Callable[..., Any],
    *operands: Any,
) -> Any:
    """``none(*operands)`` if no row ``need``s a pass, else ``some(budget, *operands)``.

    ``budget`` is :func:`_few_budget`'s when at most that many rows need it, else 0 (every row).
    One switch (not nested conds, which cost more at small shapes).
    """
    budget = _few_budget(axes, args)
    if not budget:
        return lax.cond(jnp.any(need), partial(some, 0), none, *operands)
    count = jnp.sum(need, dtype=jnp.int32)
    index = (count > 0).astype(jnp.int32) + (count > budget).astype(jnp.int32)
    return lax.switch(index, [none, partial(some, budget), partial(some, 0)], *operands)


# Rows with S < 1 + _TWO_SUM_BELOW (a float32 or float64 result) have their terms' rounding
# corrected in the exact pass (see _below): below it the terms that make up t have large |z_j|,
# and their uncorrected rounding shows (measured up to 3.2 ulp of L at S - 1 < 1e-6, against
# 1.6 corrected; at most 0.4 ulp apart above 1e-3). Other rows take the cheaper sum.
_TWO_SUM_BELOW = 2.0**-8


def _exact_log_sum(
    axes: tuple[int, ...],
    with_tiny: bool,
    two_sum_rows: bool,
    nargs: int,
    *ops: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``(fixed, t_tiny)`` of :func:`_row_log_sum`: the exact pass for the rows that ``need`` it.

    ``ops`` is ``(x, m[, mask], need, total, base)``; the first ``nargs`` are the reduction's
    operands. Rows that do not need it keep ``base`` (``log(S)``), and ``t_tiny`` is 0 there.
    The rounding of the terms is corrected (TwoSum) only for rows below ``_TWO_SUM_BELOW``, and
    only if ``two_sum_rows`` (16-bit results are too coarse for it to show). A few rows that
    need the pass are summed alone, with it; among more rows, a few that need the correction
    get it in a loop after the plain pass, and if more need it every row is summed with it
    (one pass either way).
    """
    args, (need, total, base) = ops[:nargs], ops[nargs:]
    tiny = jnp.finfo(total.dtype).tiny

    def every_row(args: tuple[jax.Array, ...], need: jax.Array, total: jax.Array) -> jax.Array:
        if not two_sum_rows:
            return _sum_below(axes, args, need, 0, two_sum=False)
        two = need & (total < 1 + _TWO_SUM_BELOW)

        def plain_sum(args: tuple[jax.Array, ...], two: jax.Array) -> jax.Array:
            return _sum_below(axes, args, two, 0, two_sum=False)

        def corrected(budget: int, args: tuple[jax.Array, ...], two: jax.Array) -> jax.Array:
            if not budget:
                return _sum_below(axes, args, two, 0)
            # The plain pass reads x through a barrier of its own: sharing a float32 copy of
            # 16-bit x with the gather of the rows would materialise it.
            plain = plain_sum(lax.optimization_barrier(args), two)
            return jnp.where(two, _sum_below(axes, args, two, budget), plain)

        return _three_way(axes, args, two, plain_sum, corrected, args, two)

    def exact(
        budget: int,
        args: tuple[jax.Array, ...],
        need: jax.Array,
        total: jax.Array,
        base: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        if budget:
            t = _sum_below(axes, args, need, budget, two_sum=two_sum_rows)
        else:
            t = every_row(args, need, total)
        # k max entries (k = S - t, an integer up to rounding; 0 in a row with no entry).
        k = jnp.round(total - t)
        fixed = jnp.where(need, _log1p(t + jnp.maximum(k - 1, 0.0)), base)
        if not with_tiny:
            return fixed, jnp.zeros_like(base)
        # Rows whose t is near or below the smallest normal, where flushed subnormal terms
        # could matter (each is below tiny; there are fewer than 2**22 of them): sum again,
        # scaled, in a pass of its own (its own barrier, so that it shares no (N, V)
        # intermediate with the first), then use that t and, if it is subnormal, its bits.
        # Only for a unique max (k = 1): with ties L >= log 2.
        small = need & (t < 2.0**-80) & (k == 1)

        def rescan(args: tuple[jax.Array, ...], small: jax.Array) -> jax.Array:
            args = lax.optimization_barrier(args)
            below = partial(_below, scaled=True)
            return jnp.where(small, _reduce("sum", below, axes, *args), 0.0)

        t_scaled = lax.cond(
            jnp.any(small), rescan, lambda args, small: jnp.zeros_like(base), args, small
        )
        scale = np.asarray(2.0**_TINY_EXP, t.dtype)
        fixed = jnp.where(small, jnp.log1p(t_scaled / scale), fixed)
        return fixed, jnp.where(small & (t_scaled < tiny * scale), t_scaled, 0.0)

    def plain(
        args: tuple[jax.Array, ...], need: jax.Array, total: jax.Array, base: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        return base, jnp.zeros_like(base)

    # No row needs the exact pass, a few do (a loop over them), or more do (every row).
    return _three_way(axes, args, need, plain, exact, args, need, total, base)


@functools.cache
def _batch_whole(
    fn: Callable[..., Any], axes: tuple[int, ...], *static: Any
) -> Callable[..., Any]:
    """``partial(fn, axes, *static)`` that ``jax.vmap`` batches as one larger batch.

    ``fn`` reduces over ``axes`` and treats every other axis as a row, and it decides under
    ``lax.cond`` / ``lax.switch`` whether a pass over the batch is needed at all. vmap would
    batch the predicate and turn every conditional into a select that runs all branches
    (measured 7x slower for a vmapped cross_entropy). Its vmap rule instead calls ``fn`` on
    the batched operands (unbatched ones broadcast) with ``axes`` shifted past the new
    leading axis, so the predicate covers the whole batch. custom_vmap does not support
    reverse-mode autodiff: callers pass operands held constant (stop_gradient).
    """

    @jax.custom_batching.custom_vmap
    def whole(*ops: jax.Array) -> Any:
        return fn(axes, *static, *ops)

    @whole.def_vmap
    def rule(axis_size: int, in_batched: list[bool], *ops: jax.Array) -> tuple[Any, Any]:
        ops = tuple(
            o if b else jnp.broadcast_to(o, (axis_size, *o.shape))
            for o, b in zip(ops, in_batched, strict=True)
        )
        out = _batch_whole(fn, tuple(a + 1 for a in axes), *static)(*ops)
        return out, jax.tree.map(lambda _: True, out)

    return whole


def _row_log_sum(
    axes: tuple[int, ...],
    x: jax.Array,
    mask: jax.Array | None,
    care: Callable[[jax.Array], jax.Array] | None = None,
    with_tiny: bool = False,
    keep_exp: bool = False,
    out_dtype: jnp.dtype | None = None,
) -> tuple[jax.Array, ...]:
    r"""Returns ``(m, L)`` with :math:`L = \log \sum_j e^{z_j}`, reduced axes kept.

    ``L`` keeps its relative accuracy when it is small: when one entry dominates,
    :math:`S = \sum_j e^{z_j}` is :math:`1 + t` with :math:`t` tiny, and ``log(S)`` would return
    ``t`` rounded to the float32 spacing at 1; and for :math:`S` up to about 4, the few-ulp
    rounding of the float32 sum becomes tens of ulp of ``log(S)``. For rows with
    :math:`S < 8` (``_EXACT_BELOW``), :math:`L = \operatorname{log1p}(t + k - 1)` with
    :math:`t = \sum_{j:\, z_j < 0} e^{z_j}` summed directly (see :func:`_below`) and
    :math:`k = \operatorname{round}(S - t)` the number of max entries. That second pass runs
    (under ``lax.switch``) only when some row needs it, over those rows alone when they are few
    (see :func:`_few_budget`), and it shares nothing with the first:
    XLA:CPU materialises (N, V) intermediates that two reductions share. ``care(m)``, if given,
    marks the rows (reduced axes kept) whose ``L`` needs relative accuracy; the others keep
    ``log(S)``, accurate to a few ulp of 1. ``L`` is 0 for a row with no entry. Its derivative
    is that of ``log(S)``.

    ``out_dtype`` (default: that of the sums) is the dtype of the result built from ``L``;
    16-bit results need the exact pass for far fewer rows (see :func:`_exact_below`).

    ``with_tiny`` also returns ``T``: :math:`t \\cdot 2^{92}` for the rows whose ``t`` is below the
    smallest normal float32 (there ``L = t`` is subnormal, and XLA:CPU flushes it to 0), else 0;
    :func:`_tiny_bits` turns it into the exact subnormal result.
    """
    if keep_exp:
        m = _masked_max(axes, x, mask)
        e = jnp.exp(_z(x, m, mask))
        # Summed as _sum_exp sums (_reduce: the same order in every layout).
        total = _reduce("sum", lambda v: v, axes, e)
    else:
        m, total = _sum_exp(axes, x, mask)
    args = (x, m) if mask is None else (x, m, mask)
    tiny = jnp.finfo(total.dtype).tiny
    base = jnp.log(jnp.maximum(total, tiny))
    out_dtype = total.dtype if out_dtype is None else out_dtype
    need = total < _exact_below(out_dtype)
    if care is not None:
        need = need & care(m)

    # The exact pass only corrects L (under a stop_gradient): its inputs are held constant,
    # which also keeps autodiff out of its vmap rule (see _batch_whole).
    ops = tuple(lax.stop_gradient(o) for o in (*args, need, total, base))
    two_sum_rows = jnp.dtype(out_dtype).itemsize >= 4
    fixed, t_tiny = _batch_whole(_exact_log_sum, axes, with_tiny, two_sum_rows, len(args))(*ops)
    log_sum = base + lax.stop_gradient(fixed - base)
    out = (m, log_sum, t_tiny) if with_tiny else (m, log_sum)
    return (*out, e) if keep_exp else out


def _tiny_bits(t_tiny: jax.Array, factor: jax.Array | float, dtype: jnp.dtype) -> jax.Array:
    r"""``-factor * t`` as an exact subnormal of ``dtype`` (float32 or bfloat16), from integers.

    ``t_tiny`` is :math:`t \\cdot 2^{92}` (see :func:`_row_log_sum`), positive where the result is
    subnormal and 0 elsewhere. Arithmetic cannot produce subnormals on XLA:CPU (it flushes
    them), so the result is assembled as a sign bit and an integer significand and bitcast.
    Where ``t_tiny`` is 0 it is ``-0.0``.
    """
    int_t, sign, shift = {
        jnp.dtype(jnp.float32): (jnp.int32, np.int32(-(2**31)), 149),
        jnp.dtype(jnp.bfloat16): (jnp.int16, np.int16(-(2**15)), 133),
    }[jnp.dtype(dtype)]
    units = float(2.0 ** (shift - _TINY_EXP))  # subnormal units per unit of t_tiny
    k = jnp.round(t_tiny * factor * np.float32(units)).astype(int_t)
    return lax.bitcast_convert_type(k | sign, dtype)


def _patch_tiny(
    out: jax.Array, at: jax.Array, t_tiny: jax.Array, factor: jax.Array | float = 1.0
) -> jax.Array:
    """``out`` with ``-factor * t`` (subnormal) where ``at`` and ``t_tiny > 0``.

    Only float32 and bfloat16 results need it: a float16 subnormal (about 6e-8 to 6e-5) is a
    normal float32 and converts exactly; float64 subnormals need a log-probability below
    -1e-308, which this leaves at 0.
    """
    if jnp.dtype(out.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return out
    patch = _tiny_bits(t_tiny, factor, out.dtype)
    return jnp.where(at & (t_tiny > 0), patch, out)


@functools.cache
def _jit_core(core: Callable[..., jax.Array], static: int = 1) -> Callable[..., jax.Array]:
    """``core`` under ``jax.jit`` with its first ``static`` arguments static.

    Eager calls then compile once per shape instead of dispatching op by op (the ``lax.cond``
    in :func:`_row_log_sum` would be traced anew on every eager call); inside an outer ``jit``
    it is inlined.
    """
    return jax.jit(core, static_argnums=tuple(range(static)))


def _normalize(
    fn: str, core: Callable[..., jax.Array], x: ArrayLike, axis: Axis, where: ArrayLike | None
) -> jax.Array:
    """The shared body of log_softmax and softmax: checks, the jitted core, the output dtype."""
    arr = as_float_array(fn, "x", x)
    where = as_mask(fn, where, None)
    arr = broadcast_input(fn, arr, where=where)
    mask = as_mask(fn, where, arr.shape)
    axes = normalize_axes(fn, axis, arr.ndim)
    return _jit_core(core)(axes, arr, mask).astype(arr.dtype)


def _masked(v: jax.Array, mask: jax.Array | None) -> jax.Array:
    return v if mask is None else jnp.where(mask, v, jnp.zeros_like(v))


# --------------------------------------------------------------------------------------------
# logsumexp


def _lse_value(
    axes: tuple[int, ...],
    x: jax.Array,
    mask: jax.Array | None,
    b: jax.Array | None,
    clip_inf: bool,
) -> tuple[jax.Array, jax.Array]:
    """``(logsumexp, sign)`` with reduced axes kept. ``clip_inf=False`` (the forward pass) skips
    clipping +inf entries: such a row sums to +inf, and its result is +inf either way. The rule
    clips (without ``b``), so that its sum is the one the softmax of its tangent computes, which
    XLA then shares instead of materialising an intermediate of the two."""
    if b is None:
        m, total = _sum_exp(axes, x, mask, clip_inf=clip_inf)
    else:
        counted = b != 0 if mask is None else mask & (b != 0)
        m = _masked_max(axes, x, counted)
        total = _reduce(
            "sum", lambda v, mm, w, bb: bb * jnp.exp(_z(v, mm, w)), axes, x, m, counted, b
        )
    sign = jnp.sign(total)
    cd = total.dtype
    out = jnp.minimum(m.astype(cd), jnp.finfo(cd).max) + jnp.log(jnp.abs(total))
    out = jnp.where(m == jnp.inf, jnp.inf, out)
    if b is not None:
        # A +inf row whose b-weighted sum is 0 or NaN (b of both signs at +inf entries, or a NaN
        # or infinite b) is undefined: NaN for the value and the sign, as in jax.nn.
        undefined = (m == jnp.inf) & jnp.logical_not(jnp.abs(total) > 0)
        nan = nan_where(undefined, cd)
        out, sign = jnp.where(undefined, nan, out), jnp.where(undefined, nan, sign)
    return out, sign


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _logsumexp_core(
    axes: tuple[int, ...], x: jax.Array, mask: jax.Array | None, b: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    return _lse_value(axes, x, mask, b, clip_inf=False)


@_logsumexp_core.defjvp
def _logsumexp_jvp(axes, primals, tangents):
    x, mask, b = primals
    x_dot, _, b_dot = tangents
    # With b, the primal is the core itself: differentiated again, it takes this rule (its
    # derivative in b is not that of the sum it computes, which leaves out b == 0 entries).
    if b is None:
        out, sign = _lse_value(axes, x, mask, None, clip_inf=True)
    else:
        out, sign = _logsumexp_core(axes, x, mask, b)
    x_dot = _masked(x_dot.astype(out.dtype), mask)
    if b is None:
        # d lse = sum_j softmax_j dx_j. softmax is itself a custom_jvp core, so derivatives of any
        # order stay exact; it is 0 on excluded entries and on rows with no entry, which gives
        # those a zero tangent instead of exp(-inf - (-inf)) = NaN.
        y = _softmax_core(axes, False, x, mask)
        out_dot = jnp.sum(y * x_dot, axis=axes, keepdims=True)
    else:
        # d lse = sum_j (b_j dx_j + db_j) e^{x_j - m} / s with m the max over b != 0. The db_j
        # term uses every included entry, also those with b_j == 0 (whose value is excluded from
        # the sum but whose derivative is e^{x_j - lse}, not 0). m is held constant: the ratio
        # does not depend on it, so higher derivatives stay exact. Rows with s == 0 (no entry
        # counts) have lse = -inf and get a zero tangent rather than 0 / 0.
        nonzero = b != 0 if mask is None else mask & (b != 0)
        m = lax.stop_gradient(_masked_max(axes, x, nonzero))
        e = jnp.exp(_z(x, m, mask, above_max=True))
        # e <= 1 where b != 0; elsewhere it may overflow, and is clipped where it multiplies b
        # so that 0 * inf never appears (d s / d b_j = e_j must survive at b_j = 0).
        e_fin = jnp.minimum(e, jnp.finfo(e.dtype).max)
        s = jnp.sum(_masked(b * e_fin, mask), axis=axes, keepdims=True)
        num = jnp.sum(_masked(b * e_fin * x_dot, mask), axis=axes, keepdims=True)
        num = num + jnp.sum(_masked(e * b_dot, mask), axis=axes, keepdims=True)
        ok = s != 0
        out_dot = jnp.where(ok, num / jnp.where(ok, s, 1.0), 0.0)
    return (out, sign), (out_dot.astype(out.dtype), jnp.zeros_like(sign))


@overload
def logsumexp(
    a: ArrayLike,
    axis: Axis = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: Literal[False] = False,
    where: ArrayLike | None = None,
) -> jax.Array: ...


@overload
def logsumexp(
    a: ArrayLike,
    axis: Axis = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    *,
    return_sign: Literal[True],
    where: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]: ...


def logsumexp(
    a: ArrayLike,
    axis: Axis = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Log-sum-exp reduction, stable at every magnitude, with a custom JVP rule.

    .. math::
      \operatorname{logsumexp}(a) = \log \sum_i b_i \exp a_i
      = m + \operatorname{log1p}\Big(\sum_i b_i e^{a_i - m} - 1\Big),
      \qquad m = \max_{i:\, b_i \ne 0} a_i,

    where :math:`i` ranges over the entries along ``axis`` that ``where`` includes and
    :math:`b_i = 1` when ``b`` is None. A drop-in replacement for :func:`jax.nn.logsumexp`.

    Args:
      a: input array of real numbers. Booleans and integers promote to the default float dtype.
        Complex input raises :class:`TypeError` (:func:`jax.nn.logsumexp` accepts it).
      axis: int, tuple of ints, or None (every axis) to reduce over.
      b: scale factors for :math:`e^{a_i}`, broadcast with ``a`` (as in jax.nn, a larger ``b``
        gives a result of the common shape). Entries with :math:`b_i = 0` add nothing to the
        value, but their derivative with respect to ``b`` is :math:`e^{a_i - \text{result}}`.
      keepdims: keep the reduced axes with size 1.
      return_sign: also return the sign of the sum. Without it, a negative sum gives NaN.
      where: boolean mask that broadcasts with ``a``, like ``b``; excluded entries take no
        part in the value or any derivative, even if they hold ``inf`` or NaN.

    Returns:
      The reduction, of ``a``'s shape without (or with size-1, if ``keepdims``) the reduced
      axes, in the promoted dtype of ``a`` and ``b``; or ``(result, sign)`` if ``return_sign``.
      ``-inf`` for a row with no included entry (its gradient is 0), ``+inf`` for a row holding
      ``+inf`` (its gradient is uniform over the ``+inf`` entries), NaN for a row holding NaN.
      float16 and bfloat16 are reduced in float32 and rounded once.

    Raises:
      TypeError: if ``a`` or ``b`` is not a real numeric array, or ``axis`` is not an integer.
      ValueError: if ``axis`` is out of range or repeated, or ``b`` or ``where`` does not
        broadcast with ``a``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxlse
      >>> jaxlse.logsumexp(jnp.array([1000.0, 1000.0]))
      Array(1000.6932, dtype=float32)
      >>> jaxlse.logsumexp(jnp.array([[0.0, 1.0], [2.0, -jnp.inf]]), axis=1)
      Array([1.3132616, 2.       ], dtype=float32)

    See also:
      :func:`jax.nn.logsumexp`, :func:`scipy.special.logsumexp`, :func:`torch.logsumexp`.
    """
    fn = "logsumexp"
    x = as_float_array(fn, "a", a)
    b_arr = None if b is None else as_float_array(fn, "b", b)
    where = as_mask(fn, where, None)
    x = broadcast_input(fn, x, b=b_arr, where=where)
    if b_arr is not None:
        # Promoted as jax.nn does, from the inputs as given: an integer `a` with a float16 `b`
        # gives float16.
        out_dtype = promoted_float(a, b)
        x = x.astype(out_dtype)
        b_arr = jnp.broadcast_to(b_arr.astype(compute_dtype(out_dtype)), x.shape)
    else:
        out_dtype = x.dtype
    mask = as_mask(fn, where, x.shape)
    axes = normalize_axes(fn, axis, x.ndim)
    out, sign = _jit_core(_logsumexp_core)(axes, x, mask, b_arr)
    if not keepdims:
        out, sign = jnp.squeeze(out, axes), jnp.squeeze(sign, axes)
    if b_arr is not None and not return_sign:
        negative = sign < 0
        out = jnp.where(negative, nan_where(negative, out.dtype), out)
    out, sign = out.astype(out_dtype), sign.astype(out_dtype)
    return (out, sign) if return_sign else out


# --------------------------------------------------------------------------------------------
# log_softmax


def _log_softmax_from(
    x: jax.Array, m: jax.Array, log_sum: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """``z - L`` from the row statistics of :func:`_row_log_sum`.

    In a row holding +inf, z is 0 at the +inf entries and about -big elsewhere; scaling by
    1 + big sends the latter to -inf. d is 1 for such rows and 0 otherwise. A row with no entry
    has z = -inf and L = 0.
    """
    # Per-row operands only (the clip of +inf to the row's clipped max, and the factor d):
    # a constant (N, V) operand would be a broadcast that XLA shares with the sums' kernel,
    # and so materialises.
    z = _z(x, m, mask)
    cd = z.dtype
    big = jnp.finfo(cd).max
    d = jnp.maximum(1 - jnp.exp(big - m.astype(cd)), 0.0)
    return z * (1 + d * big) - log_sum


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _log_softmax_core(
    axes: tuple[int, ...], x: jax.Array, mask: jax.Array | None
) -> jax.Array:
    m, log_sum, t_tiny = _row_log_sum(axes, x, mask, with_tiny=True, out_dtype=x.dtype)
    # The output kernel reads x and the row statistics through a barrier: sharing an (N, V)
    # intermediate (z, or a broadcast of m) with the sums' kernel would materialise it.
    xo, mo, lo = lax.optimization_barrier((x, m, log_sum))
    ops = (xo, mo, lo, t_tiny) if mask is None else (xo, mo, lo, t_tiny, mask)
    return _batch_whole(_log_softmax_out, axes)(*ops)


def _log_softmax_out(
    axes: tuple[int, ...],
    xo: jax.Array,
    mo: jax.Array,
    lo: jax.Array,
    t_tiny: jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
    """log_softmax's output from ``x`` and the row statistics of :func:`_row_log_sum`.

    ``(x - m) - L`` as it stands, two operations per entry (memory-bound at large shapes, but
    not free), unless a row holds +inf or a result is subnormal, which take the general form.
    (``axes`` is unused: the output is elementwise.)
    """

    def general(xo: jax.Array, mo: jax.Array, lo: jax.Array, t_tiny: jax.Array) -> jax.Array:
        out = _log_softmax_from(xo, mo, lo, mask).astype(xo.dtype)
        # A dominant entry whose log-probability is subnormal: -t, assembled exactly (see
        # _tiny_bits). Its z is 0 (it is the row's unique max).
        at_max = _z(xo, mo, mask) == 0
        return _patch_tiny(out, at_max, t_tiny)

    def finite(xo: jax.Array, mo: jax.Array, lo: jax.Array, t_tiny: jax.Array) -> jax.Array:
        # A row with no entry has m = -big and x = -inf there, which gives -inf.
        cd = lo.dtype
        out = (xo.astype(cd) - mo.astype(cd)) - lo
        return (out if mask is None else jnp.where(mask, out, -jnp.inf)).astype(xo.dtype)

    rare = jnp.any(mo == jnp.inf) | jnp.any(t_tiny > 0)
    return lax.cond(rare, general, finite, xo, mo, lo, t_tiny)


@_log_softmax_core.defjvp
def _log_softmax_jvp(axes, primals, tangents):
    x, mask = primals
    x_dot, _ = tangents
    # Keeps nothing of size (N, V) for the backward pass. The statistics read x through one
    # optimization barrier and the backward kernel through another, so XLA shares no (N, V)
    # intermediate between the sums, the output and the backward pass (a shared one would be
    # materialised). y = softmax(x) = exp(z - L) is rebuilt from x and the row statistics,
    # except for small float32/float64 inputs without a mask (at most _KEEP_EXP_MAX entries),
    # which keep e = exp(z) from the sums and take y = e exp(-L): one exp per entry instead of
    # two (measured 1.2-1.3x faster at (256, 1000)); e's buffer becomes the gradient's. L is
    # differentiable (m is held constant), so higher derivatives stay exact. Excluded entries
    # get a zero tangent (y is 0 there and x_dot is masked), and so does a row with no entry
    # above -inf (its max statistic is -big): its output is constant.
    keep = _keeps_exp(x, mask)
    if keep:
        m, log_sum, e = _row_log_sum(
            axes, lax.optimization_barrier(x), None, out_dtype=x.dtype, keep_exp=True
        )
    elif mask is None:
        m, log_sum = _row_log_sum(axes, lax.optimization_barrier(x), None, out_dtype=x.dtype)
    else:
        xb, maskb = lax.optimization_barrier((x, mask))
        m, log_sum = _row_log_sum(axes, xb, maskb, out_dtype=x.dtype)
    cd = log_sum.dtype
    # live = 1 for a row with an entry above -inf. m is a constant (stop_gradient after each
    # barrier, whose JVP instantiates zero tangents), so higher derivatives never form -inf * 0
    # from the +inf-row factor of _log_softmax_from.
    live = lax.stop_gradient((m > -jnp.finfo(m.dtype).max).astype(cd))
    # The output and y = softmax(x) = exp(output) each read their operands through a barrier of
    # their own: XLA would otherwise share a broadcast of the row statistics between the sums'
    # kernel, the caller's loss kernel and the backward kernel, and materialise it.
    # The mask is applied once to each, after (a select inside would cost another temporary).
    mo, lo = lax.optimization_barrier((m, log_sum))
    out = _log_softmax_from(x, lax.stop_gradient(mo), lo, None)
    if keep:
        y = e * jnp.exp(-log_sum)
    else:
        xb, mb, lb = lax.optimization_barrier((x, m, log_sum))
        y = jnp.exp(_log_softmax_from(xb, lax.stop_gradient(mb), lb, None))
    if mask is not None:
        out = jnp.where(mask, out, -jnp.inf)
        y = jnp.where(mask, y, 0.0)
    x_dot = _masked(x_dot.astype(cd), mask)
    # live scales x_dot, not the (N, V) tangent: a select on the tangent would become a masked
    # copy of the cotangent, read twice by the backward pass and so materialised.
    out_dot = live * x_dot - jnp.sum(y * x_dot, axis=axes, keepdims=True)
    return out.astype(x.dtype), _masked(out_dot, mask).astype(x.dtype)


def log_softmax(x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None) -> jax.Array:
    r"""Log-softmax, accurate for small and large results, with a custom JVP rule.

    .. math::
      \operatorname{log\_softmax}(x)_i = x_i - \operatorname{logsumexp}(x)
      = (x_i - m) - \operatorname{log1p}\Big(\sum_j e^{x_j - m} - 1\Big),
      \qquad m = \max_j x_j,

    with :math:`j` over the entries along ``axis`` that ``where`` includes. The ``log1p`` form
    keeps the relative accuracy of a dominant entry's tiny log-probability (about
    :math:`-\sum_{j \ne i} e^{x_j - x_i}`), which ``log(sum(...))`` rounds to 0. A drop-in
    replacement for :func:`jax.nn.log_softmax`; float32 results are within a few ulp of the
    exact value, also when they are subnormal (below 1.2e-38, which XLA:CPU's arithmetic
    would flush to 0: such a result is assembled from its bits).

    Args:
      x: input array of real numbers (booleans and integers promote to the default float dtype;
        complex input raises :class:`TypeError`).
      axis: int, tuple of ints, or None (every axis) along which to normalise.
      where: boolean mask that broadcasts with ``x`` (a larger one gives a result of the
        common shape, as in jax.nn). Excluded entries give ``-inf`` and take
        no part in the value or any derivative of the others.

    Returns:
      An array of ``x``'s shape and (promoted) dtype. A row with no included entry, or whose
      entries are all ``-inf``, is ``-inf`` with zero derivative. A row holding ``+inf`` gives
      ``-log(k)`` at its ``k`` ``+inf`` entries and ``-inf`` elsewhere, with finite derivatives.
      float16 and bfloat16 are computed in float32 and rounded once.

    Raises:
      TypeError: if ``x`` is not a real numeric array, or ``axis`` is not an integer.
      ValueError: if ``axis`` is out of range or repeated, or ``where`` does not broadcast.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxlse
      >>> logits = jnp.array([[2.0, 5.0, 3.0], [1.0, 2.0, 7.0]])
      >>> jaxlse.log_softmax(logits)
      Array([[-3.169846  , -0.16984601, -2.169846  ],
             [-6.0091743 , -5.0091743 , -0.00917448]], dtype=float32)

    See also:
      :func:`jax.nn.log_softmax`, :func:`torch.nn.functional.log_softmax`, :func:`softmax`.
    """
    return _normalize("log_softmax", _log_softmax_core, x, axis, where)


# --------------------------------------------------------------------------------------------
# softmax


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _softmax_core(
    axes: tuple[int, ...], clip_first: bool, x: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """``softmax(x)`` over ``axes``; excluded entries and rows with no entry give 0.

    ``clip_first=False`` builds it from :func:`_sum_exp`, the statistics that logsumexp's rule
    computes for its value, so that XLA shares the sums between the two. ``clip_first=True``
    (softmax itself) needs no +inf row flag: x is clipped to the dtype's largest finite value
    before the max, so m is finite and ``z = min(x, big) - m`` is the same z as :func:`_z`'s.
    Nothing happens to m between its reduction and its use, and XLA:CPU then fuses the max with
    ``exp(z)`` as it does for jax.nn's softmax (an operation on m in between splits them: one
    kernel more at small shapes). Long rows are not cut into blocks, as the output reads every
    entry again anyway.
    """
    if not clip_first:
        m, total = _sum_exp(axes, x, mask)
        return jnp.exp(_z(x, m, mask)) / jnp.maximum(total, 1.0)
    cd = compute_dtype(x.dtype)
    big = jnp.finfo(cd).max
    dims = tuple(axes)

    def z(v: jax.Array) -> jax.Array:
        v = jnp.minimum(v.astype(cd), big)
        return v if mask is None else jnp.where(mask, v, -jnp.inf)

    m = lax.expand_dims(_floored_max(z(x), dims), dims)
    e = jnp.exp(z(x) - m)
    # total >= 1 in any row with an entry (the max contributes e^0); a row without one has
    # total = 0 and exp(z) = 0, which max(total, 1) turns into 0 rather than 0 / 0.
    total = lax.expand_dims(_sum(e, dims), dims)
    return e / jnp.maximum(total, 1.0)


@_softmax_core.defjvp
def _softmax_jvp(axes, clip_first, primals, tangents):
    x, mask = primals
    x_dot, _ = tangents
    y = _softmax_core(axes, clip_first, x, mask)
    # Keeps y only (the output); y is 0 on excluded entries and on rows with no entry, so those
    # get a zero tangent whatever their input held.
    x_dot = _masked(x_dot.astype(y.dtype), mask)
    return y, y * (x_dot - jnp.sum(y * x_dot, axis=axes, keepdims=True))


def _softmax_clip_first(
    axes: tuple[int, ...], x: jax.Array, mask: jax.Array | None
) -> jax.Array:
    return _softmax_core(axes, True, x, mask)


def softmax(x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None) -> jax.Array:
    r"""Softmax, stable at every magnitude, with a custom JVP rule.

    .. math::
      \operatorname{softmax}(x)_i = \frac{e^{x_i - m}}{\sum_j e^{x_j - m}}, \qquad m = \max_j x_j,

    with :math:`j` over the entries along ``axis`` that ``where`` includes. A drop-in
    replacement for :func:`jax.nn.softmax`.

    Accuracy: one ``exp`` and one division per entry. The rounding of :math:`x_i - m` is
    amplified by ``exp``, so in float32 the relative error is about
    :math:`(|x_i - m| + 3)\cdot 2^{-24}` plus ``exp``'s own error (1 to 2 ulp on XLA:CPU),
    which is the floor for any method built on float32 ``exp``, plus the rounding of the
    row's float32 sum of exponentials: a few :math:`2^{-24}` relative, measured up to
    :math:`6 \cdot 2^{-24}` on rows of 1000 with one entry 12 above the rest (the sum just
    above 1, where its rounding counts double in ulps of a result just below 1).

    Args:
      x: input array of real numbers (booleans and integers promote to the default float dtype;
        complex input raises :class:`TypeError`).
      axis: int, tuple of ints, or None (every axis) along which to normalise.
      where: boolean mask that broadcasts with ``x`` (a larger one gives a result of the
        common shape, as in jax.nn). Excluded entries give 0 and take no part
        in the value or any derivative.

    Returns:
      An array of ``x``'s shape and (promoted) dtype that sums to 1 along ``axis``, except for a
      row with no included entry or whose entries are all ``-inf``, which is 0 (with zero
      derivative). A row holding ``+inf`` is split evenly among its ``+inf`` entries. float16 and
      bfloat16 are computed in float32 and rounded once.

    Raises:
      TypeError: if ``x`` is not a real numeric array, or ``axis`` is not an integer.
      ValueError: if ``axis`` is out of range or repeated, or ``where`` does not broadcast.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxlse
      >>> jaxlse.softmax(jnp.array([0.0, 0.0, 1e30]))
      Array([0., 0., 1.], dtype=float32)
      >>> jaxlse.softmax(jnp.array([1.0, 2.0, 3.0]), where=jnp.array([True, True, False]))
      Array([0.26894143, 0.7310586 , 0.        ], dtype=float32)

    See also:
      :func:`jax.nn.softmax`, :func:`torch.nn.functional.softmax`, :func:`log_softmax`.
    """
    return _normalize("softmax", _softmax_clip_first, x, axis, where)

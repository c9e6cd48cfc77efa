r"""Row statistics shared by every public function: the row max, the sum of exponentials, and
the exact pass that keeps a small :math:`L = \log \sum_j e^{x_j - m}` accurate.

For a row :math:`x` (the entries along the reduced axes that a mask includes) with
:math:`m = \max_j x_j`, :math:`z_j = x_j - m` and :math:`S = \sum_j e^{z_j} \ge 1`, every public
function is built from :math:`m` and :math:`L = \log S`: ``logsumexp = m + L``,
``log_softmax = z - L``, ``softmax = exp(z - L)`` and the losses' ``L - z_y``. What is here:

* :func:`floored_max`, :func:`masked_max`: the row max, floored at the dtype's lowest finite
  value so that ``x - m`` never forms ``-inf - (-inf)``.
* :func:`shifted`: ``z = x - m`` with ``+inf`` entries clipped to their limit.
* :func:`reduce_rows`, :func:`row_sum`: the reductions, laid out for accuracy (any batch of
  trailing axes as a (rows, n) matrix, a single row cut into parts) and for speed (long rows
  summed in blocks).
* :func:`sum_exp`, :func:`row_log_sum`: ``(m, S)`` and :class:`RowStats` (``m``, ``L``, whether the
  row has an entry, ...). ``row_log_sum`` runs the exact pass, ``L = log1p(t + k - 1)`` from the sum
  ``t`` of the non-maximal terms, for the rows where ``log(S)`` would lose relative accuracy, and
  only when some row needs it (a conditional, over those rows alone when they are few);
  :func:`batch_whole` keeps that conditional a conditional under ``vmap``.
* :func:`patch_tiny`: results below the smallest normal number, assembled from their bits.
* :func:`probs`, :func:`inv_sum`: the softmax ``exp(z) / S`` a rule's backward pass rebuilds
  from ``x`` and the statistics.
* :func:`take_last`: the gather of the label logits.

Semantics hold on every backend. Some choices are made only for XLA:CPU's speed or memory (an
optimization barrier, a threshold, a layout); each is marked ``XLA:CPU:`` with the measurement
behind it, and changes no value. The names without a leading underscore are this module's
internal API, shared by :mod:`jaxlse._lse` and :mod:`jaxlse._losses`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._checks import compute_dtype

# XLA:CPU: the (..., n) input is touched with arithmetic only (subtract, exp, floor, maximum,
# minimum), with no selects and no operation on the reduced statistics between the reductions,
# so that the max, the sums and the output of a row fuse into one kernel as jax.nn's softmax does
# (a comparison in it measured 2.5x slower). Infinite rows are handled by the same arithmetic
# (see shifted); `where` masks need selects.
#
# XLA:CPU: rows longer than _LONG_ROW are cut into blocks of at most _BLOCK elements, reduced
# first, and the block results second (jax 0.10 reduces longer rows several times slower per
# byte: logsumexp at (1024, 131072) 0.14x jax.nn's time). The optimization barriers keep XLA from
# merging the two reductions back into one; they change no value. The two-level sum is also
# more accurate than one long running sum.
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


def own_read(ops: Any) -> Any:
    """``ops`` unchanged, passed through an optimization barrier of their own.

    XLA:CPU: a kernel that reads ``x`` (and the row statistics) this way shares no (N, V)
    intermediate with the other kernels (``z``, a broadcast of ``m``, a float32 copy of 16-bit
    ``x``), which XLA:CPU would materialise (measured: bfloat16 cross_entropy value_and_grad
    keeps 0.001 of the logits in temporaries with it, optax 4.0; log_softmax's 0.003, jax.nn
    1.0). It changes no value and is differentiable, so higher derivatives stay exact.
    """
    return lax.optimization_barrier(ops)


def _add(a: jax.Array, b: jax.Array) -> jax.Array:
    # A module-level function (not a lambda), so that lax.reduce's cache sees the same one.
    return a + b


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def row_sum(v: jax.Array, dims: tuple[int, ...]) -> jax.Array:
    """``jnp.sum(v, dims)`` as a reduce whose initial value is ``-0.0``.

    XLA:CPU: XLA shares equal constants between kernels; when the 0 that starts a user's
    ``jnp.sum`` of our per-example outputs is shared with the 0 that starts our (N, V) sums,
    XLA:CPU passes it to our kernel as a runtime value and runs that kernel several times
    slower. ``-0.0`` is as good a start for a sum and is not shared. Differentiated as
    ``jnp.sum``.
    """
    return lax.reduce(v, np.array(-0.0, v.dtype), _add, dims)


@row_sum.defjvp
def _sum_jvp(dims, primals, tangents):
    (v,), (v_dot,) = primals, tangents
    return row_sum(v, dims), jnp.sum(v_dot, axis=dims)


def floored_max(v: jax.Array, dims: tuple[int, ...]) -> jax.Array:
    """``max(-big, max over dims of v)``, dims dropped: a row with no entry or only -inf gets
    -big (the dtype's most negative finite value); NaN propagates.

    XLA:CPU: a plain reduce with initial value -big, not ``jnp.max(..., initial=...)``, whose
    separate maximum op splits the fused max-and-sum kernel (one kernel more per call). Over a
    single entry XLA turns the reduce into a reshape and drops its initial value (measured:
    max(-inf) came out -inf), so there the floor is an explicit maximum.
    """
    big = jnp.finfo(v.dtype).max
    if math.prod(v.shape[d] for d in dims) == 1:
        return jnp.maximum(lax.squeeze(v, dims), -big)
    return lax.reduce(v, np.array(-big, v.dtype), lax.max, dims)


def reduce_rows(
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
            r = row_sum(v, dims)
        else:
            r = floored_max(v, dims)
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
    # XLA:CPU (accuracy): trailing axes are reduced as a (rows, n) matrix; XLA:CPU sums other
    # layouts, such as a
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

    XLA:CPU (accuracy): it sums into a single result in an order measured up to 16 ulp off for 8192
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
    parts = [row_sum(fn(*head), (1,))]
    if head_n < n:
        tail = [a if p else a[head_n:] for a, p in flat]
        parts.append(row_sum(fn(*tail), (0,)).reshape(1))
    parts = lax.optimization_barrier(jnp.concatenate(parts))
    return row_sum(parts, (0,)).reshape(1)


def masked_max(axes: tuple[int, ...], x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``max(-big, max_j x_j)`` over the included entries; NaN propagates. Keeps dims.

    A row with no entry, or with only ``-inf``, gets ``-big`` (the dtype's most negative finite
    value), which keeps ``x - m`` free of ``-inf - (-inf)``; ``x`` is held constant.
    """
    x = lax.stop_gradient(x)
    if mask is None:
        return reduce_rows("max", lambda v: v, axes, x)
    return reduce_rows("max", lambda v, w: jnp.where(w, v, -jnp.inf), axes, x, mask)


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


def shifted(
    x: jax.Array,
    m: jax.Array,
    mask: jax.Array | None = None,
    *,
    clip_inf: bool = True,
    above_max: bool = False,
) -> jax.Array:
    r"""``z = x - m`` for the row statistic ``m`` of :func:`masked_max`, with ``+inf`` clipped.

    For finite rows this is ``x - m`` exactly. In a row whose max is :math:`+\infty` it is 0 at
    the :math:`+\infty` entries and :math:`\le -2\cdot 10^{31}` (float32) elsewhere, so
    ``exp(z)`` is their limit (1 and 0). In a row with no entry it is ``-inf``. Excluded entries
    are ``-inf``. 16-bit ``x`` (and ``m``, which is exact in ``x``'s dtype) is converted to
    float32 here, inside each kernel that reads it.

    XLA:CPU: ``x`` is clipped to the clipped row max ``mc = min(m, big)`` (the same as clipping
    it to ``big``, as ``x <= m`` for every included entry), so that no (N, V) operation takes a
    constant operand, which XLA:CPU turns into a full-size broadcast and materialises as an
    input of its fused reduction (a full (N, V) temporary). ``m`` is clipped before broadcasting.

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


def probs(
    x: jax.Array,
    m: jax.Array,
    inv: jax.Array,
    mask: jax.Array | None = None,
    scale: jax.Array | None = None,
) -> jax.Array:
    """``softmax = exp(z) / S`` for a rule's backward pass, from ``x`` and per-row statistics.

    ``inv`` is :func:`inv_sum`'s ``1 / S`` and ``scale`` (per row) multiplies it. Excluded
    entries give 0 whatever they hold.

    XLA:CPU: the per-row values (the clipped max, ``1 / S``, ``scale``) are formed before a barrier
    (:func:`own_read`), so that the (N, V) kernel reads them rather than recomputing them for
    every entry (measured 3x slower at (256, 1000)), and the barrier keeps XLA from sharing
    (N, V) intermediates (``z``, a float32 copy of 16-bit ``x``, broadcasts of the row
    statistics) between the forward kernels and this backward one, which would cost a full
    (N, V) temporary.
    """
    cd = compute_dtype(x.dtype)
    mc = jnp.minimum(m.astype(cd), jnp.finfo(cd).max)
    factor = inv if scale is None else inv * scale
    x, mc, factor, mask = own_read((x, mc, factor, mask))
    return jnp.exp(shifted(x, mc, mask)) * factor


def sum_exp(
    axes: tuple[int, ...],
    x: jax.Array,
    mask: jax.Array | None,
    clip_inf: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Returns ``(m, S)`` with ``S = sum_j exp(z_j)``, reduced axes kept."""
    m = masked_max(axes, x, mask)
    z = partial(shifted, clip_inf=clip_inf)
    if mask is None:
        return m, reduce_rows("sum", lambda v, mm: jnp.exp(z(v, mm)), axes, x, m)
    return m, reduce_rows("sum", lambda v, mm, w: jnp.exp(z(v, mm, w)), axes, x, m, mask)


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
        # 2**92 * exp(-shift), rounded once (92 * log(2) itself is only good to ~30 float64 ulp)
        ratio = np.asarray(math.ldexp(math.exp(-float(shift)), _TINY_EXP), cd)
        e = jnp.exp(s + shift) * ratio
    else:
        e = jnp.exp(s)
    # 1 where s < 0, 0 at the max (s = 0): |s| >= tiny whenever s != 0 (a difference of two
    # floats that is below tiny is subnormal, which XLA:CPU flushes to 0: a tie).
    # XLA:CPU: arithmetic, not a comparison, which splits the fused reduction (2.5x slower).
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
# XLA:CPU: float32 and float64 inputs of at most this many entries may keep exp(z) for the
# backward pass (the rules of log_softmax and cross_entropy): they stay in cache, where a second
# exp per entry costs more than keeping the first (measured 1.2-1.5x faster at (256, 1000)).
_KEEP_EXP_MAX = 1 << 20


def keeps_exp(x: jax.Array, mask: jax.Array | None = None) -> bool:
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
# XLA:CPU: inputs of fewer entries always read every row: there the loop saved no time (ratio
# 0.97-1.03 of log_softmax and cross_entropy with one dominated row, at (8, 300) to (128, 1000)),
# and its branches double the compile time (log_softmax at (8, 300): 506 ms against 253 ms).
_FEW_MIN_SIZE = 1 << 17


def _few_budget(axes: tuple[int, ...], args: tuple[jax.Array, ...]) -> int:
    """How many rows the exact pass may read alone (0: it reads every row).

    Needs no mask, trailing reduced axes, at least ``_FEW_FRACTION`` rows and
    ``_FEW_MIN_SIZE`` entries.
    """
    x = args[0]
    ndim, nred = x.ndim, len(axes)
    rows = math.prod(x.shape[: ndim - nred])
    if len(args) != 2 or axes != tuple(range(ndim - nred, ndim)) or _several_devices():
        return 0
    if x.size < _FEW_MIN_SIZE:
        return 0
    return rows // _FEW_FRACTION


def _several_devices() -> bool:
    """Whether the program may be partitioned over several devices (then every row is read).

    The loop over the few rows that need the exact pass reads them by a global row index,
    which the partitioner can only serve by gathering the rows of a batch-sharded ``x`` onto
    every device (an (N, V / devices) all-gather, measured on a 2 x 4 mesh). Whether ``x``
    is sharded is not known when the function is traced, so the loop is kept for processes
    with a single device.
    """
    return jax.device_count() > 1


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
    no temporary, so that the rules' backward passes may use it too. XLA:CPU: 16-bit rows are
    gathered
    into a (budget, n) temporary (1/8 of ``x`` at most) and summed together: XLA:CPU runs a
    16-bit slice inside a loop in float32, converting the whole of ``x`` once, outside the
    loop, which would cost a full float32 copy. A single row is summed as :func:`reduce_rows` sums
    one, as accurately as a batch of rows.
    """
    below = partial(_below, two_sum=two_sum)
    if budget == 0:
        return reduce_rows("sum", below, axes, *args)
    x, m = args
    n = math.prod(x.shape[a] for a in axes)
    rows = x.size // n
    x, m, flat = x.reshape(rows, n), m.reshape(rows, 1), need.reshape(rows)
    zeros = jnp.zeros((rows, 1), compute_dtype(x.dtype))
    if jnp.dtype(x.dtype).itemsize == 2:
        idx = jnp.nonzero(flat, size=budget, fill_value=rows)[0]
        xs = x.at[idx].get(mode="fill", fill_value=0)
        ms = m.at[idx].get(mode="fill", fill_value=0)
        t = zeros.at[idx].set(reduce_rows("sum", below, (1,), xs, ms), mode="drop")
        return t.reshape(need.shape)
    idx = jnp.nonzero(flat, size=budget, fill_value=0)[0]

    def add_row(i: jax.Array, t: jax.Array) -> jax.Array:
        r = idx[i]
        xr, mr = lax.dynamic_slice_in_dim(x, r, 1), lax.dynamic_slice_in_dim(m, r, 1)
        return lax.dynamic_update_slice_in_dim(t, reduce_rows("sum", below, (1,), xr, mr), r, 0)

    count = jnp.minimum(jnp.sum(flat, dtype=jnp.int32), budget)
    return lax.fori_loop(0, count, add_row, zeros).reshape(need.shape)


@jax.custom_jvp
def take_last(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``jnp.take_along_axis(x, idx, axis=-1)``, differentiated as it is.

    XLA:CPU: 16-bit floats are gathered as unsigned integers of the same width; XLA:CPU rewrites a
    16-bit gather followed by a conversion to float32 as a gather from a float32 copy of the
    whole of ``x``, which it then shares with the other kernels that convert ``x`` and
    materialises (a full float32 copy, measured for cross_entropy's label logits).
    """
    if jnp.dtype(x.dtype).itemsize != 2:
        return jnp.take_along_axis(x, idx, axis=-1)
    bits = jnp.take_along_axis(lax.bitcast_convert_type(x, jnp.uint16), idx, axis=-1)
    return lax.bitcast_convert_type(bits, x.dtype)


@take_last.defjvp
def _take_last_jvp(primals, tangents):
    (x, idx), (x_dot, _) = primals, tangents
    return take_last(x, idx), jnp.take_along_axis(x_dot, idx, axis=-1)


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
    XLA:CPU: one switch, not nested conds (one launch more per call at small shapes).
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
    """``(fixed, t_tiny)`` of :func:`row_log_sum`: the exact pass for the rows that ``need`` it.

    ``ops`` is ``(x, m[, mask], need, total, base)``; the first ``nargs`` are the reduction's
    operands. Rows that do not need it keep ``base`` (``log(S)``), and ``t_tiny`` is 0 there.
    The rounding of the terms is corrected (TwoSum) only if ``two_sum_rows`` (16-bit results are
    too coarse for it to show), and in inputs of ``_FEW_MIN_SIZE`` entries or more only for rows
    below ``_TWO_SUM_BELOW``. A few rows that need the pass are summed alone, with it; among
    more rows, a few that need the correction get it in a loop after the plain pass, and if
    more need it every row is summed with it (one pass either way).
    """
    args, (need, total, base) = ops[:nargs], ops[nargs:]
    tiny = jnp.finfo(total.dtype).tiny

    def every_row(args: tuple[jax.Array, ...], need: jax.Array, total: jax.Array) -> jax.Array:
        if not two_sum_rows:
            return _sum_below(axes, args, need, 0, two_sum=False)
        if args[0].size < _FEW_MIN_SIZE:
            # Every row that needs the pass is corrected, as in the loop over a few rows. XLA:CPU:
            # the choice below costs 10-17 % of the compile of small programs (log_softmax at
            # (8, 300): 215 ms against 193 ms; value_and_grad of cross_entropy: 249 against 212;
            # jax 0.12) and saves no run time here (ratio 0.96-1.09 at (64, 1000), (128, 1000)).
            return _sum_below(axes, args, need, 0)
        two = need & (total < 1 + _TWO_SUM_BELOW)

        def plain_sum(args: tuple[jax.Array, ...], two: jax.Array) -> jax.Array:
            return _sum_below(axes, args, two, 0, two_sum=False)

        def corrected(budget: int, args: tuple[jax.Array, ...], two: jax.Array) -> jax.Array:
            if not budget:
                return _sum_below(axes, args, two, 0)
            # XLA:CPU: the plain pass reads x through a barrier of its own; sharing a float32
            # copy of 16-bit x with the gather of the rows materialised it (bf16 vg temp 2.0).
            plain = plain_sum(own_read(args), two)
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
        small = need & (t < tiny * 2.0**46) & (k == 1)

        def rescan(args: tuple[jax.Array, ...], small: jax.Array) -> jax.Array:
            args = own_read(args)
            below = partial(_below, scaled=True)
            return jnp.where(small, reduce_rows("sum", below, axes, *args), 0.0)

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
def batch_whole(
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
        out = batch_whole(fn, tuple(a + 1 for a in axes), *static)(*ops)
        return out, jax.tree.map(lambda _: True, out)

    return whole


class RowStats(NamedTuple):
    """What :func:`row_log_sum` returns; every array keeps the reduced axes (size 1)."""

    m: jax.Array  #: the row max, floored at -big (a row with no entry above -inf gets -big)
    log_sum: jax.Array  #: L = log(sum_j exp(x_j - m)); 0 for a row with no entry above -inf
    live: jax.Array  #: bool: the row has an entry above -inf, or NaN (-big values are live)
    t_tiny: jax.Array | None  #: with_tiny: the scaled subnormal t (see _tiny_bits), else None
    e: jax.Array | None  #: keep_exp: exp(x - m), the input's shape, else None
    total: jax.Array  #: S = sum_j exp(x_j - m), the float32 (or float64) sum; 0 with no entry


def inv_sum(stats: RowStats) -> jax.Array:
    r"""``1 / S`` per row, with the derivative of :math:`e^{-L}`; 0 in a row with no entry.

    ``softmax = exp(z) / S``: ``exp(z - L)`` would add the rounding of ``L`` (up to half an ulp
    of :math:`L`, e.g. 8 float32 ulp of every probability in a row of 32768 equal logits,
    where :math:`L = 10.4`). The float32 sum ``S`` is within a few ulp, and ``1 / S`` does not
    amplify that (``log(S)`` does for small ``L``, hence the exact pass for ``L``).
    """
    approx = jnp.exp(-stats.log_sum)
    total = lax.stop_gradient(stats.total)
    value = jnp.where(stats.live, 1 / jnp.where(total > 0, total, 1.0), 0.0)
    return approx + lax.stop_gradient(value - approx)


def row_log_sum(
    axes: tuple[int, ...],
    x: jax.Array,
    mask: jax.Array | None,
    care: Callable[[jax.Array], jax.Array] | None = None,
    with_tiny: bool = False,
    keep_exp: bool = False,
    out_dtype: jnp.dtype | None = None,
    clip_inf: bool = True,
) -> RowStats:
    r"""Returns :class:`RowStats`: ``m`` and :math:`L = \log \sum_j e^{z_j}`, reduced axes kept.

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
        m = masked_max(axes, x, mask)
        e = jnp.exp(shifted(x, m, mask))
        # Summed as sum_exp sums (reduce_rows: the same order in every layout).
        total = reduce_rows("sum", lambda v: v, axes, e)
    else:
        m, total = sum_exp(axes, x, mask, clip_inf=clip_inf)
    args = (x, m) if mask is None else (x, m, mask)
    tiny = jnp.finfo(total.dtype).tiny
    base = jnp.log(jnp.maximum(total, tiny))
    out_dtype = total.dtype if out_dtype is None else out_dtype
    need = total < _exact_below(out_dtype)
    if care is not None:
        need = need & care(m)

    # The exact pass only corrects L (under a stop_gradient): its inputs are held constant,
    # which also keeps autodiff out of its vmap rule (see batch_whole).
    ops = tuple(lax.stop_gradient(o) for o in (*args, need, total, base))
    two_sum_rows = jnp.dtype(out_dtype).itemsize >= 4
    fixed, t_tiny = batch_whole(_exact_log_sum, axes, with_tiny, two_sum_rows, len(args))(*ops)
    log_sum = base + lax.stop_gradient(fixed - base)
    # S >= 1 in a row with an entry above -inf (its max contributes e^0 = 1), 0 otherwise: the
    # floored max cannot tell a row of -big values from a row with no entry. NaN rows are live.
    live = jnp.logical_not(lax.stop_gradient(total) < 0.5)
    return RowStats(
        m, log_sum, live, t_tiny if with_tiny else None, e if keep_exp else None, total
    )


def _tiny_bits(t_tiny: jax.Array, factor: jax.Array | float, dtype: jnp.dtype) -> jax.Array:
    r"""``-factor * t`` as an exact subnormal of ``dtype`` (float32 or bfloat16), from integers.

    ``t_tiny`` is :math:`t \\cdot 2^{92}` (see :func:`row_log_sum`), positive where the result is
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


def patch_tiny(
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

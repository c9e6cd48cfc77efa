r"""logsumexp, log_softmax and softmax: public wrappers, private custom_jvp cores and their rules.

All three share per-row statistics. With :math:`m = \max_j x_j` over the included entries,
:math:`z_j = x_j - m` and :math:`S = \sum_j e^{z_j} \ge 1`,
:math:`\operatorname{logsumexp}(x) = m + \log S`, and
:math:`\operatorname{log\_softmax}(x)_i = z_i - \log S`. When one entry dominates,
:math:`S = 1 + t` with :math:`t` tiny and :math:`\log S` would round to 0, losing the
log-probability of about :math:`-t` at the dominant entry; there ``log1p(t)`` with :math:`t`
summed directly keeps full relative accuracy (:func:`row_log_sum`).

Infinite maxima are handled by their limits: a row whose maximum is :math:`+\infty` puts equal
probability on its :math:`+\infty` entries, and a row with no finite or :math:`+\infty` entry (all
:math:`-\infty`, or all excluded by ``where``) has ``logsumexp = -inf``, ``log_softmax = -inf``
and ``softmax = 0`` with zero derivatives.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal, overload

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._checks import (
    Axis,
    as_float_array,
    as_mask,
    broadcast_input,
    compute_dtype,
    jit_core,
    jit_public,
    nan_where,
    normalize_axes,
    promoted_float,
)
from ._rowstats import (
    RowStats,
    batch_whole,
    floored_max,
    inv_sum,
    keeps_exp,
    masked_max,
    own_read,
    patch_tiny,
    reduce_rows,
    row_log_sum,
    row_sum,
    shifted,
    sum_exp,
)
from ._sharding import AxisName, global_stats, on_mesh

# The arguments that shape a program (static under jit_public); the arrays are dynamic.
_STATIC = ("axis", "keepdims", "return_sign", "axis_name")


def _normalize(
    fn: str,
    core: Callable[..., jax.Array],
    x: ArrayLike,
    axis: Axis,
    where: ArrayLike | None,
    axis_name: AxisName | None = None,
) -> jax.Array:
    """The shared body of log_softmax and softmax: checks, the jitted core, the output dtype."""
    arr = as_float_array(fn, "x", x)
    where = as_mask(fn, where, None)
    arr = broadcast_input(fn, arr, where=where)
    mask = as_mask(fn, where, arr.shape)
    axes = normalize_axes(fn, axis, arr.ndim)
    if axis_name is not None:
        return _normalize_across(fn, axes, axis_name, arr, mask).astype(arr.dtype)
    return jit_core(core)(axes, arr, mask).astype(arr.dtype)


def _normalize_across(
    fn: str,
    axes: tuple[int, ...],
    axis_name: AxisName,
    x: jax.Array,
    mask: jax.Array | None,
) -> jax.Array:
    """log_softmax or softmax of rows split over the devices along ``axis_name``.

    From :func:`global_stats` (whose rule gives the derivatives): ``z - L``, with ``-inf``
    off the ``+inf`` entries of a row holding ``+inf``, or ``exp(z) / S``.
    """
    m, log_sum, inv = global_stats(axes, axis_name, x, mask)
    z = shifted(x, m, mask)
    if fn == "softmax":
        return jnp.exp(z) * inv
    # -inf (added, so that the derivative stays x_dot - L_dot as on one device) off the +inf
    # entries of a row holding +inf; -inf with zero derivative in a row with no entry.
    out = z - log_sum + jnp.where((m == jnp.inf) & (z < 0), -jnp.inf, 0.0)
    out = jnp.where(inv == 0, -jnp.inf, out)
    # Excluded entries: selected, so that nothing reaches their derivative or comes from it.
    return out if mask is None else jnp.where(mask, out, -jnp.inf)


def _dims(fn: str) -> Callable[[dict, int], tuple[int, ...]]:
    """For :func:`on_mesh`: the reduced axes of ``fn``'s first argument."""
    return lambda args, ndim: normalize_axes(fn, args["axis"], ndim)


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
    XLA then shares instead of materialising an intermediate of the two.

    Without ``b`` the result ``m + L`` keeps its accuracy relative to ``max(|result|, |m|)``
    also when ``m`` is near 0: ``L`` takes the exact pass of :func:`row_log_sum` in rows where
    ``S < 8`` and ``|m| < _SMALL_MAX``, where the absolute error of ``log(S)`` (up to about an
    ulp of 1) is not small next to an ulp of the result (``logsumexp([0, -40])`` in float64 is
    ``4.25e-18``, not 0). A float32 result below the smallest normal number (``m = 0`` and
    ``t < 1.2e-38``) is assembled from its bits (see :func:`patch_tiny`). 16-bit inputs keep
    ``log(S)`` of the float32 sum (their results are too coarse for the pass to matter, and
    XLA:CPU would keep a float32 copy of the input for the backward pass: 2.0 of the input's
    size in temporaries, measured).
    """
    if b is None and jnp.dtype(x.dtype).itemsize >= 4:
        return _lse_from(_lse_stats(axes, x, mask, clip_inf))
    if b is None:
        m, total = sum_exp(axes, x, mask, clip_inf=clip_inf)
    else:
        counted = b != 0 if mask is None else mask & (b != 0)
        m = masked_max(axes, x, counted)
        total = reduce_rows(
            "sum", lambda v, mm, w, bb: bb * jnp.exp(shifted(v, mm, w)), axes, x, m, counted, b
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


def _lse_stats(
    axes: tuple[int, ...], x: jax.Array, mask: jax.Array | None, clip_inf: bool = True
) -> RowStats:
    """The row statistics of a float32 or float64 logsumexp without ``b`` (see _lse_value)."""
    return row_log_sum(
        axes, x, mask, care=_small_max, with_tiny=True, out_dtype=x.dtype, clip_inf=clip_inf
    )


def _lse_from(stats: RowStats) -> tuple[jax.Array, jax.Array]:
    """``(logsumexp, sign)`` from :func:`_lse_stats`, reduced axes kept."""
    m, cd = stats.m, stats.log_sum.dtype
    out = jnp.minimum(m.astype(cd), jnp.finfo(cd).max) + stats.log_sum
    out = jnp.where(m == jnp.inf, jnp.inf, out)
    out = -patch_tiny(-out, m == 0, stats.t_tiny)
    # -inf for a row with no entry above -inf (whose L is 0); its sign is 0, NaN's is NaN.
    out = jnp.where(stats.live, out, -jnp.inf)
    sign = jnp.where(jnp.isnan(out), out, (out > -jnp.inf).astype(cd))
    return out, sign


def _lse_across(
    axes: tuple[int, ...], axis_name: AxisName, x: jax.Array, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """``(logsumexp, sign)`` of rows split over the devices along ``axis_name`` (see
    :func:`global_stats`, whose rule gives the derivatives), reduced axes kept."""
    m, log_sum, inv = global_stats(axes, axis_name, x, mask)
    cd = log_sum.dtype
    out = jnp.minimum(m.astype(cd), jnp.finfo(cd).max) + log_sum
    # +inf added (not selected), so that the derivative of a +inf row flows as on one device.
    out = out + jnp.where(m == jnp.inf, jnp.inf, 0.0)
    out = jnp.where(inv == 0, -jnp.inf, out)
    sign = jnp.where(jnp.isnan(out), out, (out > -jnp.inf).astype(cd))
    return out, sign


# Rows whose max is below this in magnitude (and S < 8) take logsumexp's exact pass (see
# _lse_value): from |m| = 8 on, log(S)'s absolute error (about an ulp of 1) is at most a quarter
# of an ulp of the result.
_SMALL_MAX = 8.0


def _small_max(m: jax.Array) -> jax.Array:
    return jnp.abs(m) < _SMALL_MAX


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
    exact = b is None and jnp.dtype(x.dtype).itemsize >= 4
    if exact:
        stats = _lse_stats(axes, x, mask)
        out, sign = _lse_from(stats)
    elif b is None:
        out, sign = _lse_value(axes, x, mask, None, clip_inf=True)
    else:
        out, sign = _logsumexp_core(axes, x, mask, b)
    x_dot = _masked(x_dot.astype(out.dtype), mask)
    if exact:
        # d lse = sum_j softmax_j dx_j with softmax = exp(z) / S from the same statistics (see
        # inv_sum), which are differentiable in x (m is held constant), so derivatives of any
        # order stay exact. It is 0 on excluded entries and on rows with no entry.
        y = jnp.exp(shifted(x, stats.m, mask)) * inv_sum(stats)
        out_dot = jnp.sum(y * x_dot, axis=axes, keepdims=True)
    elif b is None:
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
        m = lax.stop_gradient(masked_max(axes, x, nonzero))
        e = jnp.exp(shifted(x, m, mask, above_max=True))
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


@on_mesh(_dims("logsumexp"))
@jit_public(_STATIC)
def logsumexp(
    a: ArrayLike,
    axis: Axis = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: ArrayLike | None = None,
    *,
    axis_name: AxisName | None = None,
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
      axis_name: inside :func:`jax.shard_map`, the mesh axis (or tuple of axes) over which the
        reduced axes are split: each device holds a slice of every row, and the result is that
        of the whole rows, on every device (only per-row statistics cross devices). ``b`` is
        not supported with it.

    Returns:
      The reduction, of ``a``'s shape without (or with size-1, if ``keepdims``) the reduced
      axes, in the promoted dtype of ``a`` and ``b``; or ``(result, sign)`` if ``return_sign``.
      ``-inf`` for a row with no included entry (its gradient is 0), ``+inf`` for a row holding
      ``+inf`` (its gradient is uniform over the ``+inf`` entries), NaN for a row holding NaN.
      Without ``b``, float32 and float64 results are within a few ulp of
      ``max(|result|, |row max|)`` also when the row max is near 0 (``logsumexp([0, -40])`` is
      ``4.2e-18`` in float64, where ``log(sum(exp))`` gives 0).
      float16 and bfloat16 are reduced in float32 and rounded once.

    Raises:
      TypeError: if ``a`` or ``b`` is not a real numeric array, or ``axis`` is not an integer.
      ValueError: if ``axis`` is out of range or repeated, ``b`` or ``where`` does not
        broadcast with ``a``, or ``b`` is given with ``axis_name``.

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
    if axis_name is not None and b is not None:
        raise ValueError(f"{fn}: `b` is not supported with `axis_name`")
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
    if axis_name is not None:
        out, sign = _lse_across(axes, axis_name, x, mask)
    else:
        out, sign = jit_core(_logsumexp_core)(axes, x, mask, b_arr)
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
    """``z - L`` from the row statistics of :func:`row_log_sum`.

    In a row holding +inf, z is 0 at the +inf entries and about -big elsewhere; scaling by
    1 + big sends the latter to -inf. d is 1 for such rows and 0 otherwise. A row with no entry
    has z = -inf and L = 0.
    """
    # Per-row operands only (the clip of +inf to the row's clipped max, and the factor d):
    # a constant (N, V) operand would be a broadcast that XLA shares with the sums' kernel,
    # and so materialises.
    z = shifted(x, m, mask)
    cd = z.dtype
    big = jnp.finfo(cd).max
    d = jnp.maximum(1 - jnp.exp(big - m.astype(cd)), 0.0)
    return z * (1 + d * big) - log_sum


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _log_softmax_core(
    axes: tuple[int, ...], x: jax.Array, mask: jax.Array | None
) -> jax.Array:
    stats = row_log_sum(axes, x, mask, with_tiny=True, out_dtype=x.dtype)
    m, log_sum, t_tiny = stats.m, stats.log_sum, stats.t_tiny
    # The output kernel reads x and the row statistics through a barrier: sharing an (N, V)
    # intermediate (z, or a broadcast of m) with the sums' kernel would materialise it.
    xo, mo, lo = own_read((x, m, log_sum))
    ops = (xo, mo, lo, t_tiny) if mask is None else (xo, mo, lo, t_tiny, mask)
    return batch_whole(_log_softmax_out, axes)(*ops)


def _log_softmax_out(
    axes: tuple[int, ...],
    xo: jax.Array,
    mo: jax.Array,
    lo: jax.Array,
    t_tiny: jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
    """log_softmax's output from ``x`` and the row statistics of :func:`row_log_sum`.

    ``(x - m) - L`` as it stands, two operations per entry (memory-bound at large shapes, but
    not free), unless a row holds +inf or a result is subnormal, which take the general form.
    (``axes`` is unused: the output is elementwise.)
    """

    def general(xo: jax.Array, mo: jax.Array, lo: jax.Array, t_tiny: jax.Array) -> jax.Array:
        out = _log_softmax_from(xo, mo, lo, mask).astype(xo.dtype)
        # A dominant entry whose log-probability is subnormal: -t, assembled exactly (see
        # _tiny_bits). Its z is 0 (it is the row's unique max).
        at_max = shifted(xo, mo, mask) == 0
        return patch_tiny(out, at_max, t_tiny)

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
    # above -inf: its output is constant.
    keep = keeps_exp(x, mask)
    if mask is None:
        stats = row_log_sum(axes, own_read(x), None, out_dtype=x.dtype, keep_exp=keep)
    else:
        xb, maskb = own_read((x, mask))
        stats = row_log_sum(axes, xb, maskb, out_dtype=x.dtype)
    m, log_sum, e = stats.m, stats.log_sum, stats.e
    cd = log_sum.dtype
    # live = 1 for a row with an entry above -inf (also a row of -big values, whose floored
    # max is that of a row with none). m is a constant (stop_gradient after each barrier,
    # whose JVP instantiates zero tangents), so higher derivatives never form -inf * 0 from
    # the +inf-row factor of _log_softmax_from.
    live = stats.live.astype(cd)
    # The output and y = softmax(x) = exp(output) each read their operands through a barrier of
    # their own: XLA would otherwise share a broadcast of the row statistics between the sums'
    # kernel, the caller's loss kernel and the backward kernel, and materialise it.
    # The mask is applied once to each, after (a select inside would cost another temporary).
    mo, lo = own_read((m, log_sum))
    out = _log_softmax_from(x, lax.stop_gradient(mo), lo, None)
    # y = exp(z) / S (see inv_sum: exp(z - L) would add the rounding of L).
    inv = inv_sum(stats)
    if keep:
        y = e * inv
    else:
        xb, mb, ib = own_read((x, m, inv))
        # exp(z) with z = x - m, not the -inf-scaled log-softmax form: exp(z) is already 0
        # off the +inf entries of a +inf row (z <= -2e31 there), and the scaling's factor
        # 1 + big would reach the +inf entries' second derivatives (1e38 in an HVP).
        y = jnp.exp(shifted(xb, lax.stop_gradient(mb))) * ib
    if mask is not None:
        out = jnp.where(mask, out, -jnp.inf)
        y = jnp.where(mask, y, 0.0)
    x_dot = _masked(x_dot.astype(cd), mask)
    # live scales x_dot, not the (N, V) tangent: a select on the tangent would become a masked
    # copy of the cotangent, read twice by the backward pass and so materialised.
    out_dot = live * x_dot - jnp.sum(y * x_dot, axis=axes, keepdims=True)
    return out.astype(x.dtype), _masked(out_dot, mask).astype(x.dtype)


@on_mesh(_dims("log_softmax"))
@jit_public(_STATIC)
def log_softmax(
    x: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    axis_name: AxisName | None = None,
) -> jax.Array:
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
      axis_name: inside :func:`jax.shard_map`, the mesh axis (or tuple of axes) over which
        ``axis`` is split: each device holds a slice of every row and gets its slice of the
        result for the whole rows (only per-row statistics cross devices).

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
    return _normalize("log_softmax", _log_softmax_core, x, axis, where, axis_name)


# --------------------------------------------------------------------------------------------
# softmax


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _softmax_core(
    axes: tuple[int, ...], clip_first: bool, x: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """``softmax(x)`` over ``axes``; excluded entries and rows with no entry give 0.

    ``clip_first=False`` builds it from :func:`sum_exp`, the statistics that logsumexp's rule
    computes for its value, so that XLA shares the sums between the two. ``clip_first=True``
    (softmax itself) needs no +inf row flag: x is clipped to the dtype's largest finite value
    before the max, so m is finite and ``z = min(x, big) - m`` is the same z as :func:`shifted`'s.
    Nothing happens to m between its reduction and its use, and XLA:CPU then fuses the max with
    ``exp(z)`` as it does for jax.nn's softmax (an operation on m in between splits them: one
    kernel more at small shapes). Long rows are not cut into blocks, as the output reads every
    entry again anyway.
    """
    if not clip_first:
        m, total = sum_exp(axes, x, mask)
        return jnp.exp(shifted(x, m, mask)) / jnp.maximum(total, 1.0)
    cd = compute_dtype(x.dtype)
    big = jnp.finfo(cd).max
    dims = tuple(axes)

    def z(v: jax.Array) -> jax.Array:
        v = jnp.minimum(v.astype(cd), big)
        return v if mask is None else jnp.where(mask, v, -jnp.inf)

    m = lax.expand_dims(floored_max(z(x), dims), dims)
    e = jnp.exp(z(x) - m)
    # total >= 1 in any row with an entry (the max contributes e^0); a row without one has
    # total = 0 and exp(z) = 0, which max(total, 1) turns into 0 rather than 0 / 0.
    total = lax.expand_dims(row_sum(e, dims), dims)
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


@on_mesh(_dims("softmax"))
@jit_public(_STATIC)
def softmax(
    x: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    axis_name: AxisName | None = None,
) -> jax.Array:
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
      axis_name: inside :func:`jax.shard_map`, the mesh axis (or tuple of axes) over which
        ``axis`` is split: each device holds a slice of every row and gets its slice of the
        result for the whole rows (only per-row statistics cross devices).

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
    return _normalize("softmax", _softmax_clip_first, x, axis, where, axis_name)

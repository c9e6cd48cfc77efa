r"""nll_loss and cross_entropy: classification losses with PyTorch's options and a custom JVP.

For one example with logits :math:`x` over :math:`C` classes, the loss is written as

.. math::
  \ell = \sum_c B_c\,\big(\operatorname{logsumexp}(x) - x_c\big) + \zeta\, s\,
  \operatorname{logsumexp}(x)^2,

where :math:`B_c \ge 0` is the weighted (and smoothed) target. With :math:`m = \max_c x_c`,
:math:`z_c = x_c - m` and :math:`L = \operatorname{logsumexp}(x) - m` (computed by
:mod:`jaxlse._rowstats`, with ``log1p`` of the non-maximal terms when one entry dominates), every
term :math:`\operatorname{logsumexp}(x) - x_c = L - z_c` is a sum of two non-negative numbers, so
the loss keeps its relative accuracy at every magnitude: no large :math:`\operatorname{logsumexp}`
is subtracted from a large logit, and the tiny loss of a confident correct prediction is
:math:`\operatorname{log1p}` of a tiny sum. The derivative is
:math:`\partial\ell/\partial x_c = (A + 2\zeta s \operatorname{logsumexp}(x))\,p_c - B_c` with
:math:`A = \sum_c B_c` and :math:`p = \operatorname{softmax}(x)`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from ._checks import (
    as_float_array,
    compute_dtype,
    jit_core,
    jit_public,
    nan_where,
    normalize_axes,
)
from ._rowstats import (
    inv_sum,
    keeps_exp,
    own_read,
    patch_tiny,
    probs,
    reduce_rows,
    row_log_sum,
    shifted,
    take_last,
)
from ._sharding import AxisName, axis_size, class_offset, global_stats, local_pick, on_mesh

Reduction = Literal["none", "sum", "mean"]
_REDUCTIONS = ("none", "sum", "mean")
# The options that shape a loss's program (static under jit_public); the arrays are dynamic.
_LOSS_STATIC = ("axis", "ignore_index", "reduction", "axis_name")


# --------------------------------------------------------------------------------------------
# argument checks shared by both losses


def _class_axes(fn: str, axis: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The class axes as non-negative ints, in the given order (it orders the flat class index)."""
    if isinstance(axis, Sequence) and not axis:
        raise ValueError(f"{fn}: `axis` must name at least one class axis, got {axis!r}")
    return normalize_axes(fn, axis, ndim, keep_order=True, allow_none=False)


def _classes_last(v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``v`` with the class ``axes`` moved to the end (in their order) and flattened into one.

    A single axis is moved; several are transposed behind the others and reshaped, so that
    class ``c`` is the flat (C-order) index over ``axes``, as in optax.
    """
    if len(axes) == 1:
        return jnp.moveaxis(v, axes[0], -1)
    batch_axes = tuple(a for a in range(v.ndim) if a not in axes)
    v = v.transpose(batch_axes + axes)
    return v.reshape(v.shape[: len(batch_axes)] + (-1,))


def _class_dims(args: dict, ndim: int) -> tuple[int, ...]:
    """For :func:`on_mesh`: the class axes of a loss's scores."""
    return tuple(a % ndim for a in ((args["axis"],) if isinstance(args["axis"], int)
                                   else args["axis"]))


def _check_reduction(fn: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{fn}: `reduction` must be one of {_REDUCTIONS}, got {reduction!r}"
        )


def _row(v: jax.Array, ndim: int) -> jax.Array:
    """A (num_classes,) vector as (1, ..., 1, num_classes), for rank-explicit broadcasting."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _label_index(
    labels: jax.Array, num_classes: int, counted: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(bad, idx)``: the counted examples whose integer label is not a class, and the labels
    with those that are not classes at 0 (a safe index, never a wrapped-around class).

    Only ``bad`` examples are NaN. An example that does not count (ignored, or excluded by
    ``where``) is never bad, whatever its label: a NaN made for it and then hidden by a select
    would come back in the transpose of that select (0 * NaN), e.g. in ``jacrev(jacfwd(f))``.
    """
    valid = (labels >= 0) & (labels < num_classes)
    bad = jnp.logical_not(valid) if counted is None else counted & jnp.logical_not(valid)
    return bad, jnp.where(valid, labels, 0)


def _int_labels(lab: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """Integer labels at least 32 bits wide, so that comparing them with ``num_classes`` or
    ``ignore_index`` cannot wrap around (JAX or NumPy arrays)."""
    return lab.astype(np.int32) if lab.dtype.itemsize < 4 else lab


def _counted(
    xp: object, labels: jax.Array | np.ndarray | None, mask: ArrayLike | None,
    ignore_index: int | None, batch: tuple[int, ...],
) -> jax.Array | np.ndarray:
    """The examples that count, of shape ``batch``: inside ``mask`` (checked to broadcast) and
    with an integer label other than ``ignore_index`` (``labels`` None for soft labels). A
    value that the labels' dtype cannot hold equals no label. ``xp`` is ``jnp`` or ``np``."""
    counted = xp.ones(batch, bool)
    if mask is not None:
        counted = counted & xp.broadcast_to(mask, batch)
    if labels is not None and ignore_index is not None:
        info = np.iinfo(labels.dtype)
        if info.min <= ignore_index <= info.max:
            counted = counted & (labels != ignore_index)
    return counted


def _concrete(v: object) -> bool:
    return not isinstance(v, jax.core.Tracer)


def _prepare(
    fn: str,
    x: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...],
    weight: ArrayLike | None,
    ignore_index: int | None,
    where: ArrayLike | None,
    reduction: str,
    shards: int = 1,
) -> tuple[jax.Array, jax.Array, bool, jax.Array | None, jax.Array, jnp.dtype]:
    """Checks and converts the arguments common to both losses.

    Returns ``(x, labels, soft, weight, counted, out_dtype)`` with the classes moved to the
    last axis of ``x`` (and of soft ``labels``; several class axes flattened into one), ``x``
    in its own dtype, integer ``labels`` at least 32 bits wide (so that comparing them with
    ``num_classes`` or ``ignore_index`` cannot wrap around), and ``counted`` a boolean array
    of the batch shape: the examples that count (not ignored, not excluded by ``where``).
    ``shards`` is the number of devices the classes are split over (``axis_name``): labels
    are checked against ``shards`` times the classes of ``x``.
    """
    _check_reduction(fn, reduction)
    arr = as_float_array(fn, "logits" if fn == "cross_entropy" else "log_probs", x)
    if arr.ndim == 0:
        raise ValueError(f"{fn}: the scores must have a class axis, got a scalar")
    axes = _class_axes(fn, axis, arr.ndim)
    out_dtype = compute_dtype(arr.dtype)
    class_shape = tuple(arr.shape[a] for a in axes)
    arr = _classes_last(arr, axes)  # kept in its dtype; converted where it is read
    batch, num_classes = arr.shape[:-1], arr.shape[-1]
    try:
        lab = jnp.asarray(labels)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{fn}: `labels` must be an array ({err})") from None
    if jnp.issubdtype(lab.dtype, jnp.integer):
        soft = False
        if lab.shape != batch:
            raise ValueError(
                f"{fn}: integer `labels` must have the scores' shape without the class "
                f"axis (or axes), {batch}; got labels of shape {lab.shape} for scores of shape "
                f"{tuple(jnp.shape(x))}"
            )
        lab = _int_labels(lab)
    elif jnp.issubdtype(lab.dtype, jnp.floating):
        soft = True
        if lab.shape != tuple(jnp.shape(x)):
            raise ValueError(
                f"{fn}: floating (soft) `labels` must have the scores' shape "
                f"{tuple(jnp.shape(x))}; got {lab.shape}"
            )
        lab = _classes_last(lab, axes).astype(out_dtype)
    else:
        raise TypeError(
            f"{fn}: `labels` must be integer class indices or floating target probabilities, "
            f"got dtype {lab.dtype}"
        )
    w = None
    if weight is not None:
        w = as_float_array(fn, "weight", weight)
        if w.shape not in ((num_classes,), class_shape):
            also = f" or the class axes' shape {class_shape}" if len(axes) > 1 else ""
            raise ValueError(
                f"{fn}: `weight` must have shape (num_classes,) = ({num_classes},){also}, "
                f"got {w.shape}"
            )
        w = w.reshape(num_classes).astype(out_dtype)
    mask = None
    if where is not None:
        mask = jnp.asarray(where)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"{fn}: `where` must be a boolean array, got dtype {mask.dtype}")
        try:
            ok = np.broadcast_shapes(mask.shape, batch) == batch
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{fn}: `where` of shape {mask.shape} does not broadcast to the labels' batch "
                f"shape {batch}"
            )
    if ignore_index is not None:
        try:
            ignore_index = operator.index(ignore_index)
        except TypeError:
            raise TypeError(
                f"{fn}: `ignore_index` must be an int or None, got {ignore_index!r}"
            ) from None
        if soft and ignore_index >= 0:
            # As PyTorch: a class index cannot be ignored in probability targets (a negative
            # one, such as the usual -100, matches no class and is accepted).
            raise ValueError(
                f"{fn}: `ignore_index` {ignore_index} is not supported for floating (soft) "
                "labels; exclude examples with `where`"
            )
    counted = _counted(jnp, None if soft else lab, mask, ignore_index, batch)
    if not soft and _concrete(lab) and _concrete(counted):
        check_label_range(fn, np.asarray(lab), np.asarray(counted), num_classes * shards,
                          ignore_index)
    return arr, lab, soft, w, counted, out_dtype


def check_label_range(
    fn: str, labels: np.ndarray, counted: np.ndarray, total: int, ignore_index: int | None
) -> None:
    """Raises for the first counted integer label outside ``[0, total)`` (concrete labels)."""
    bad = counted & ((labels < 0) | (labels >= total))
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{fn}: label {int(labels[pos])} at position {pos} is out of range for "
            f"{total} classes (expected 0 <= label < {total}"
            + (f" or label == ignore_index ({ignore_index})" if ignore_index is not None
               else "")
            + ")"
        )


def label_check(
    fn: str, labels: ArrayLike, where: ArrayLike | None, ignore_index: int | None, total: int
) -> None:
    """:func:`check_label_range` on a call's own arguments, when ``labels`` and ``where`` are
    concrete (what ``_prepare`` checks when it sees them concrete).

    Under :func:`jit_public` the body sees tracers, so this runs on the arguments instead,
    once the traced body has accepted their shapes and dtypes, with ``_prepare``'s own
    conversions (:func:`_int_labels`, :func:`_counted`) in NumPy.
    """
    if not (_concrete(labels) and _concrete(where)):
        return
    lab = np.asarray(labels)
    lab = lab.astype(jax.dtypes.canonicalize_dtype(lab.dtype), copy=False)  # as jax.Array
    if not np.issubdtype(lab.dtype, np.integer):
        return  # soft labels
    lab = _int_labels(lab)
    if ignore_index is not None:
        ignore_index = operator.index(ignore_index)
    mask = None if where is None else np.asarray(where)
    check_label_range(fn, lab, _counted(np, lab, mask, ignore_index, lab.shape), total,
                      ignore_index)


def check_options(
    fn: str, label_smoothing: object, z_loss: object, soft_cap: object
) -> None:
    """Checks ``label_smoothing``, ``z_loss`` and ``soft_cap`` where they are concrete.

    Raises:
      ValueError: for a non-scalar, ``label_smoothing`` outside [0, 1], a negative ``z_loss``
        or a non-positive ``soft_cap``.
    """
    for name, value, lo, hi in (("label_smoothing", label_smoothing, 0.0, 1.0),
                                ("z_loss", z_loss, 0.0, np.inf)):
        if _concrete(value):
            v = np.asarray(value)
            if v.shape != () or not np.issubdtype(v.dtype, np.number):
                raise ValueError(f"{fn}: `{name}` must be a real scalar, got {value!r}")
            if not lo <= float(v) <= hi:
                bound = "[0, 1]" if hi == 1.0 else ">= 0"
                raise ValueError(f"{fn}: `{name}` must be in {bound}, got {float(v)}")
    if soft_cap is not None and _concrete(soft_cap):
        if np.asarray(soft_cap).shape != () or not float(soft_cap) > 0:
            raise ValueError(
                f"{fn}: `soft_cap` must be a positive scalar or None, got {soft_cap!r}"
            )


def _num_classes(args: dict) -> int:
    """The number of classes of a loss's scores, from the call's arguments (shapes checked)."""
    shape = np.shape(args[next(iter(args))])
    axes = _class_dims(args, len(shape))
    return math.prod(shape[a] for a in axes)


def _after_loss(fn: str) -> Callable[[dict], None]:
    """For :func:`jit_public`: the label check of ``nll_loss`` or ``cross_entropy``."""

    def after(args: dict) -> None:
        label_check(fn, args["labels"], args["where"], args["ignore_index"],
                    _num_classes(args))

    return after


def _reduce_loss(
    loss: jax.Array, denom: jax.Array | int, reduction: str
) -> jax.Array:
    """Applies ``reduction``; "mean" divides by ``denom`` and gives 0 when ``denom`` is 0.

    ``denom`` is the per-example weights of the mean, or their sum as a Python int when every
    example counts with weight 1 (then no kernel computes it).
    """
    if reduction == "none":
        return loss
    # XLA:CPU: the barrier keeps this small sum out of the (N, V) kernels that make the
    # per-example losses, which XLA:CPU then runs several times slower. It changes no value.
    if isinstance(denom, int):
        total = jnp.sum(lax.optimization_barrier(loss))
        if reduction == "sum":
            return total
        return total / denom if denom > 0 else jnp.zeros_like(total)
    loss, denom = lax.optimization_barrier((loss, denom))
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    d = jnp.sum(denom)
    return jnp.where(d > 0, total / jnp.where(d > 0, d, 1), jnp.zeros_like(total))


# --------------------------------------------------------------------------------------------
# nll_loss


@jax.custom_jvp
def _pick(lp: jax.Array, idx: jax.Array, bad: jax.Array) -> jax.Array:
    """``lp[..., idx]`` (classes last), NaN where ``bad``; a gather, one value per row."""
    picked = jnp.take_along_axis(lp, idx[..., None], axis=-1)[..., 0]
    return jnp.where(bad, nan_where(bad, picked.dtype), picked)


@_pick.defjvp
def _pick_jvp(primals, tangents):
    lp, idx, bad = primals
    lp_dot = tangents[0]
    # The gathered tangent; 0 for a bad label, whose value is NaN. No NaN factor: a linear
    # map with one would give 0 * NaN = NaN in every reverse-mode derivative, also in those of
    # the other examples' losses (jacrev of per-example losses), where forward mode gives 0.
    out_dot = jnp.take_along_axis(lp_dot, idx[..., None], axis=-1)[..., 0]
    return _pick(lp, idx, bad), jnp.where(bad, 0.0, out_dot)


@on_mesh(_class_dims)
@jit_public(_LOSS_STATIC, after=_after_loss("nll_loss"))
def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    weight: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Negative log-likelihood loss for log-probabilities, as in PyTorch.

    .. math::
      \ell_i = -\sum_c w_c\, q_{ic} \log p_{ic},

    with :math:`\log p` = ``log_probs``, :math:`w` = ``weight`` (1 if None) and :math:`q` the
    one-hot of integer ``labels`` or the soft ``labels`` themselves. Terms with
    :math:`q_{ic} = 0` are 0 even where :math:`\log p_{ic} = -\infty`.

    Args:
      log_probs: log-probabilities, shape ``(..., num_classes, ...)`` with classes on ``axis``
        (e.g. the output of :func:`jaxlse.log_softmax`).
      labels: integer class indices of ``log_probs``' shape without ``axis``, or floating target
        probabilities of ``log_probs``' shape.
      axis: the class axis, or a tuple of class axes: the classes are then the flat (C-order)
        index over those axes in the order given, as in optax, and ``weight`` has shape
        ``(num_classes,)`` (their product) or the class axes' shape.
      weight: per-class weights of shape ``(num_classes,)``.
      ignore_index: examples whose integer label equals it contribute nothing, to the value or
        the gradient. With soft labels only a negative value is accepted (and unused), as in
        PyTorch.
      reduction: ``"none"`` (per-example losses), ``"sum"``, or ``"mean"``: PyTorch's weighted
        mean, the sum divided by :math:`\sum_i w_{y_i}` over the counted examples for integer
        labels, and by the number of counted examples for soft labels. When no example counts,
        ``"mean"`` is 0 with zero gradient (PyTorch returns NaN).
      where: boolean mask of the batch shape; ``False`` examples are excluded like ignored ones.
      axis_name: inside :func:`jax.shard_map`, the mesh axis (or tuple of axes) over which the
        class axis is split (device ``i`` holds classes ``[i n, (i + 1) n)``): integer labels
        are global class indices, ``weight`` and soft labels are the device's slices, and the
        result is the loss of the whole rows, on every device.

    Returns:
      A float array: the per-example losses (batch shape) for ``"none"``, else a scalar. Its
      dtype is float32 for float16 / bfloat16 / float32 input and float64 for float64 input.
      A counted integer label outside ``[0, num_classes)`` gives NaN for that example's loss
      (and so for a sum or mean), and nothing to any derivative, as in :func:`cross_entropy`.

    Raises:
      TypeError: if ``log_probs`` or ``weight`` is not real, or ``labels`` is neither integer
        nor floating, or ``where`` is not boolean.
      ValueError: for mismatched shapes, a bad ``axis`` or ``reduction``, a non-negative
        ``ignore_index`` with soft labels, or (with concrete labels) an out-of-range label that
        is not ``ignore_index``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxlse
      >>> logits = jnp.array([[2.0, 5, 3], [1, 2, 7], [6, 3, 1], [4, 3, 3]])
      >>> labels = jnp.array([1, 2, 1, 0])
      >>> jaxlse.nll_loss(jaxlse.log_softmax(logits), labels)
      Array(0.9463626, dtype=float32)

    See also:
      :func:`torch.nn.functional.nll_loss`, :func:`cross_entropy`.
    """
    fn = "nll_loss"
    shards = 1 if axis_name is None else axis_size(axis_name)
    lp, lab, soft, w, counted, out_dtype = _prepare(
        fn, log_probs, labels, axis, weight, ignore_index, where, reduction, shards
    )
    num_classes = lp.shape[-1] * shards
    if soft:
        b = lab if w is None else lab * _row(w, lab.ndim)
        lp = lp.astype(out_dtype)
        # 0 * log 0 = 0, with derivative 0 in b there; elsewhere d/db = -log p.
        terms = -b * jnp.where((b == 0) & (lp == -jnp.inf), 0.0, lp)
        loss = jnp.sum(terms, axis=-1)
        if axis_name is not None:
            loss = lax.psum(loss, axis_name)
        denom = counted.astype(out_dtype)
    elif axis_name is not None:
        bad, idx = _label_index(lab, num_classes, counted)
        picked = local_pick(lp.astype(out_dtype), idx, axis_name)[0]
        picked = jnp.where(bad, nan_where(bad, out_dtype), picked)
        wy = jnp.ones_like(picked) if w is None else _pick_across(w, idx, axis_name)
        loss = -wy * picked
        denom = jnp.where(counted, wy, 0.0)
    else:
        bad, idx = _label_index(lab, num_classes, counted)
        picked = _pick(lp, idx, bad).astype(out_dtype)
        wy = jnp.ones_like(picked) if w is None else w[idx]
        loss = -wy * picked
        denom = jnp.where(counted, wy, 0.0)
    loss = jnp.where(counted, loss, 0.0)
    return _reduce_loss(loss, denom, reduction).astype(out_dtype)


# --------------------------------------------------------------------------------------------
# cross_entropy


def _ce_row(
    x: jax.Array,
    cd: jnp.dtype,
    x_y: jax.Array | None = None,
    with_tiny: bool = False,
    keep_exp: bool = False,
) -> tuple[jax.Array, ...]:
    """Per-example ``(m, L, lse)`` in dtype ``cd``, ``L = lse - m`` (see ``row_log_sum``).

    ``with_tiny`` (the forward pass) appends the scaled subnormal ``t`` of
    :func:`row_log_sum`.

    Classes are last. 16-bit ``x`` is converted inside each reduction rather than once up
    front: the max is exact in ``x``'s own dtype, and a single converted copy read by several
    kernels would be materialised. ``x_y`` (the labels' logits, one per row) limits the exact
    pass for a dominated row to rows whose loss is small: if ``z_y <= -0.5`` the loss is at
    least 0.5, and the absolute error of ``log(S)`` (a few ulp of 1) is within an ulp of it.
    With random labels the pass then almost never runs; for confident correct predictions it
    does.
    """
    care = None
    if x_y is not None:
        def care(m: jax.Array) -> jax.Array:
            return shifted(x_y, m) > -0.5

    stats = row_log_sum(
        (x.ndim - 1,), x, None, care=care, with_tiny=with_tiny, keep_exp=keep_exp
    )
    log_sum = stats.log_sum
    m = stats.m.astype(cd)
    big = jnp.finfo(cd).max
    lse = jnp.where(m == jnp.inf, jnp.inf, jnp.minimum(m, big) + log_sum)
    return m, log_sum, lse, stats


def _label_logit(x: jax.Array, labels: jax.Array, cd: jnp.dtype) -> jax.Array:
    """``x[..., y]`` in dtype ``cd`` (classes last, keeps the axis); class 0 for a bad label."""
    _, idx = _label_index(labels, x.shape[-1])
    return take_last(x, idx[..., None]).astype(cd)


def _weighted_neg_z(x: jax.Array, m: jax.Array, tw: jax.Array) -> jax.Array:
    """``sum_c tw_c * (m - x_c)`` over the classes (last axis); ``0 * inf = 0``.

    A scalar ``tw`` (smoothing without class weights) multiplies the plain sum of the
    non-negative ``m - x_c``; an array ``tw`` needs a select for ``0 * inf``. Either way the
    sum reads ``x`` and ``m`` through its own optimization barrier, so that XLA shares no (N, V)
    intermediate (a float32 copy of 16-bit ``x``, a broadcast of ``m``) with the other kernels.
    """
    x, m = own_read((x, m))
    axes = (x.ndim - 1,)
    if tw.ndim == 0:
        def neg_z(v: jax.Array, mm: jax.Array) -> jax.Array:
            return -shifted(v.astype(mm.dtype), mm)

        return tw * reduce_rows("sum", neg_z, axes, x, m)

    def term(v: jax.Array, mm: jax.Array, ww: jax.Array) -> jax.Array:
        # 0 * inf = 0 at a -inf logit with zero weight, which is also where the derivative in
        # ww is taken as 0 (the loss is infinite for any positive weight there); elsewhere it
        # is -z, so that soft targets and class weights are differentiable.
        neg_z = -shifted(v.astype(mm.dtype), mm)
        return ww * jnp.where((ww == 0) & (neg_z == jnp.inf), 0.0, neg_z)

    return reduce_rows("sum", term, axes, x, m, tw)


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _ce_core(
    soft: bool,
    smoothing: bool,
    x: jax.Array,
    labels: jax.Array,
    weight: jax.Array | None,
    eps: jax.Array,
    zeta: jax.Array,
    counted: jax.Array,
) -> jax.Array:
    """Per-example loss (batch shape, classes last); 0 where not ``counted``.

    ``smoothing`` (static) is False when ``eps`` is known to be 0, which skips a pass.
    """
    cd = eps.dtype
    if soft:
        stats = _ce_row(x, cd)[:3]
        return _ce_loss(soft, smoothing, x, labels, weight, eps, zeta, counted, *stats)
    x_y = _label_logit(x, labels, cd)
    m, log_sum, lse, stats = _ce_row(x, cd, x_y=x_y, with_tiny=True)
    t_tiny = stats.t_tiny
    loss = _ce_loss(soft, smoothing, x, labels, weight, eps, zeta, counted, m, log_sum, lse)
    # A confident correct prediction whose loss w_y * t is subnormal (flushed to 0): assembled
    # exactly from the scaled t (see _tiny_bits). Only where the loss came out 0, i.e. without
    # smoothing (whose term is far larger).
    wy = 1.0 if weight is None else weight[_label_index(labels, x.shape[-1])[1]]
    at = (loss == 0) & counted & (shifted(x_y, m)[..., 0] == 0)
    return -patch_tiny(-loss, at, t_tiny[..., 0], (1 - eps) * wy)


def _ce_loss(
    soft: bool,
    smoothing: bool,
    x: jax.Array,
    labels: jax.Array,
    weight: jax.Array | None,
    eps: jax.Array,
    zeta: jax.Array,
    counted: jax.Array,
    m: jax.Array,
    log_sum: jax.Array,
    lse: jax.Array,
    axis_name: AxisName | None = None,
) -> jax.Array:
    """The body of :func:`_ce_core`, from the per-row statistics of :func:`_ce_row`.

    With ``axis_name`` (see :func:`_ce_across`) the classes of ``x`` (and of ``weight`` and
    soft ``labels``) are this device's slice, integer labels are global, and every sum over
    the classes is completed by a ``psum``.
    """
    cd = eps.dtype
    shards = 1 if axis_name is None else axis_size(axis_name)
    num_classes = x.shape[-1] * shards

    def over_classes(v: jax.Array) -> jax.Array:
        return v if axis_name is None else lax.psum(v, axis_name)

    if soft:
        q = labels * (1 - eps) + eps / num_classes
        tw = q if weight is None else q * _row(weight, q.ndim)
        tw_total = over_classes(jnp.sum(tw, axis=-1, keepdims=True))
        loss = tw_total * log_sum + over_classes(_weighted_neg_z(x, m, tw))
        scale = jnp.asarray(1, cd)
        bad = None
    else:
        bad, idx = _label_index(labels, num_classes, counted)
        # Scalars, not arrays of ones, when there is no weight: XLA:CPU slows down a lot when a
        # constant array is shared between kernels.
        if axis_name is None:
            wy = jnp.asarray(1, cd) if weight is None else weight[idx[..., None]]
            x_y = _label_logit(x, labels, cd)
        else:
            wy = jnp.asarray(1, cd) if weight is None else _pick_across(
                weight, idx, axis_name)[..., None]
            x_y = local_pick(x.astype(cd), idx, axis_name)[0][..., None]
        bad = bad[..., None]
        # -log p_y = L - z_y: both terms >= 0. In a row holding +inf, z_y is 0 at a +inf label
        # and <= -2e31 elsewhere, where the loss is +inf, its limit (added, so that a
        # derivative taken through it stays finite).
        z_y = shifted(x_y, m)
        off = jnp.where((m == jnp.inf) & (z_y < 0), jnp.inf, 0.0)
        loss = (1 - eps) * wy * (log_sum - z_y + off)
        if smoothing:
            if weight is None:
                sw, sw_total = eps / num_classes, eps
            else:
                sw = _row(eps / num_classes * weight, x.ndim)
                sw_total = over_classes(jnp.sum(sw))
            loss = loss + sw_total * log_sum + over_classes(_weighted_neg_z(x, m, sw))
        scale = wy
    # lse is selected away (not multiplied by 0) without z-loss, in the value and in its
    # derivative: lse**2 overflows for logits near 1e20, and 2 lse * 0 is NaN at lse = inf.
    on = zeta > 0
    loss = loss + jnp.where(on, zeta * scale * jnp.square(jnp.where(on, lse, 0.0)), 0.0)
    if bad is not None:
        loss = jnp.where(bad, nan_where(bad, loss.dtype), loss)
    return jnp.where(counted, loss[..., 0], 0.0)


# --------------------------------------------------------------------------------------------
# axis_name: the classes split over the devices along a mesh axis (inside shard_map)


def _pick_across(
    vec: jax.Array, idx: jax.Array, axis_name: AxisName
) -> jax.Array:
    """``vec[idx]`` for global class indices ``idx`` and this device's slice ``vec`` of a
    (num_classes,) vector: taken on the device that holds it, summed over ``axis_name``."""
    n = vec.shape[0]
    rel = idx - class_offset(axis_name, n).astype(idx.dtype)
    inside = (rel >= 0) & (rel < n)
    return lax.psum(jnp.where(inside, vec[jnp.where(inside, rel, 0)], 0.0), axis_name)


def _ce_across(
    axis_name: AxisName,
    soft: bool,
    smoothing: bool,
    x: jax.Array,
    labels: jax.Array,
    weight: jax.Array | None,
    eps: jax.Array,
    zeta: jax.Array,
    counted: jax.Array,
) -> jax.Array:
    """Per-example cross-entropy (batch shape) of logits whose classes (last axis) are split
    over the devices along ``axis_name``: :func:`_ce_loss` with the row statistics of
    :func:`global_stats`. Labels are global class indices; ``weight`` (and soft ``labels``)
    are this device's slices. Derivatives come from :func:`global_stats`' rule and JAX's own
    of the rest."""
    cd = eps.dtype
    # Examples that do not count read zeros, so that nothing of theirs (inf, NaN) reaches a
    # derivative through the statistics.
    x = jnp.where(counted[..., None], x.astype(cd), 0.0)
    m, log_sum, _ = global_stats((x.ndim - 1,), axis_name, x, None)
    lse = jnp.minimum(m, jnp.finfo(cd).max) + log_sum + jnp.where(m == jnp.inf, jnp.inf, 0.0)
    return _ce_loss(soft, smoothing, x, labels, weight, eps, zeta, counted, m, log_sum, lse,
                    axis_name)


def _is_zero(t: object) -> bool:
    """Whether a tangent is symbolically zero (or absent, for a ``None`` argument)."""
    return t is None or isinstance(t, SymbolicZero)


def _ce_jvp(soft, smoothing, primals, tangents):
    x, labels, weight, eps, zeta, counted = primals
    x_dot, labels_dot, weight_dot, eps_dot, zeta_dot, _ = tangents
    others = (labels_dot if soft else None, weight_dot, eps_dot)
    if all(_is_zero(t) for t in (*others, zeta_dot)):
        return _ce_x_jvp(soft, smoothing, x, labels, weight, eps, zeta, counted, x_dot)
    # Soft labels, class weights, label_smoothing and z_loss are differentiable too (the loss
    # is linear in each but the weights): their tangent is that of _ce_loss with the logits'
    # statistics held constant. It is traced only when one of them has a nonzero tangent, so
    # the usual gradient with respect to the logits costs nothing more.
    out, out_dot, (m, log_sum, lse) = _ce_x_jvp(
        soft, smoothing, x, labels, weight, eps, zeta, counted, x_dot, with_stats=True
    )
    names = ("labels", "weight", "eps")
    vals = {k: v for k, v, t in zip(names, (labels, weight, eps), others, strict=True)
            if not _is_zero(t)}
    dots = {k: t for k, t in zip(names, others, strict=True) if not _is_zero(t)}

    def loss_of(vals: dict[str, jax.Array]) -> jax.Array:
        args = dict(labels=labels, weight=weight, eps=eps) | vals
        return _ce_loss(soft, smoothing, x, args["labels"], args["weight"], args["eps"],
                        zeta, counted, m, log_sum, lse)

    if vals:
        out_dot = out_dot + jax.jvp(loss_of, (vals,), (dots,))[1]
    if not _is_zero(zeta_dot):
        # d/dzeta of zeta * s * lse**2 (also at zeta = 0, where the value's select gives 0).
        wy = 1.0
        if weight is not None and not soft:
            wy = weight[_label_index(labels, x.shape[-1])[1]]
        out_dot = out_dot + jnp.where(counted, zeta_dot * wy * jnp.square(lse[..., 0]), 0.0)
    return out, out_dot


_ce_core.defjvp(_ce_jvp, symbolic_zeros=True)


def _ce_x_jvp(
    soft, smoothing, x, labels, weight, eps, zeta, counted, x_dot, with_stats=False
):
    """The primal and tangent of :func:`_ce_core` for the logits' tangent ``x_dot`` alone.

    ``with_stats`` also returns the per-row ``(m, L, lse)`` of :func:`_ce_row`.
    """
    # d loss / dx = (A + 2 zeta s lse) p - B. For large logits p = exp(z - L) is rebuilt from
    # x and the per-row statistics, so nothing of size (N, V) is kept for the backward pass.
    # The statistics read x through one optimization barrier and p (in probs) through another,
    # so XLA shares no (N, V) intermediate between their kernels (for 16-bit logits, a float32
    # copy of x, which it would materialise). Small float32 and float64 logits (at most
    # _KEEP_EXP_MAX entries, which stay in cache) instead keep e = exp(z), from which both
    # the sum and p = e exp(-L) are formed: one exp per entry instead of two (measured 1.5x
    # faster at (256, 1000)), and e's buffer becomes the gradient's, so no temporary either.
    # m is held constant and L = log(sum exp z) is differentiable, so higher derivatives stay
    # exact. Rows that do not count get exactly 0 (a select, not a product, so NaN or inf in
    # them cannot leak), and so does a counted row with a bad label (its loss is NaN; a NaN
    # factor in this linear map would come back as 0 * NaN in the reverse-mode derivatives
    # of the other examples' losses).
    num_classes, cd = x.shape[-1], eps.dtype
    x_y = None if soft else _label_logit(x, labels, cd)
    if _is_zero(x_dot):
        m, log_sum, lse, _ = _ce_row(x, cd, x_y=x_y)
        out = _ce_loss(soft, smoothing, x, labels, weight, eps, zeta, counted, m, log_sum, lse)
        zero = jnp.zeros_like(out)
        return (out, zero, (m, log_sum, lse)) if with_stats else (out, zero)
    keep = keeps_exp(x)
    m, log_sum, lse, row_stats = _ce_row(own_read(x), cd, x_y=x_y, keep_exp=keep)
    inv = inv_sum(row_stats)
    out = _ce_loss(soft, smoothing, x, labels, weight, eps, zeta, counted, m, log_sum, lse)
    stats = ((m, log_sum, lse),) if with_stats else ()

    def prob(scale: jax.Array) -> jax.Array:
        """``scale * p`` (``scale`` per row)."""
        return row_stats.e * (scale * inv) if keep else probs(x, m, inv, scale=scale)

    if soft:
        q = labels * (1 - eps) + eps / num_classes
        b = q if weight is None else q * _row(weight, q.ndim)
        a = jnp.sum(b, axis=-1, keepdims=True)
        g = prob(a + jnp.where(zeta > 0, 2 * zeta * lse, 0.0)) - b
        g = jnp.where(counted[..., None], g, 0.0)
        return (out, jnp.sum(g * x_dot.astype(cd), axis=-1).astype(out.dtype), *stats)
    # Integer labels: d loss = sum_{c != y} (A p_c - s_c) dx_c + g_y dx_y. The label's entry
    # g_y = A p_y - s_y - coef is formed per row, exactly: for a confident correct prediction
    # p_y = 1 - 9e-11, and A p_y - coef from the (N, V) kernel would round to 0 (100 %
    # relative error), so it is coef * expm1(z_y - L) + (A - coef) p_y - s_y. For float32 and
    # float64 the (N, V) kernel is exp, two subtractions and a product per entry; the label's
    # entry of the tangent is set to 0 before it (a scatter of N zeros) and its term added as
    # a gather, whose transposes set the kernel's entry to 0 and add g_y there, in place. The
    # per-example factors are formed per row.
    bad, idx = _label_index(labels, num_classes, counted)
    bad, idx = bad[..., None], idx[..., None]
    wy = jnp.asarray(1, cd) if weight is None else weight[idx]
    coef = (1 - eps) * wy
    # A = coef + extra; extra (smoothing and z-loss) is kept apart for the label's entry, where
    # it may be far below an ulp of coef.
    extra = jnp.where(zeta > 0, 2 * zeta * wy * lse, 0.0)
    smooth = None
    if smoothing:
        if weight is None:
            extra = eps + extra
            smooth = eps / num_classes
        else:
            extra = eps / num_classes * jnp.sum(weight) + extra
            smooth_w = eps / num_classes * weight
            smooth = _row(smooth_w, x.ndim)
    a = coef + extra
    g = prob(a)
    g = g if smooth is None else g - smooth
    live = counted[..., None] & jnp.logical_not(bad)
    g = jnp.where(live, g, 0.0)
    # The label's entry, per row (d is 1 in a row holding +inf, see _ce_loss).
    big = jnp.finfo(cd).max
    z_y = shifted(x_y, m) * (1 + jnp.maximum(1 - jnp.exp(big - m), 0.0) * big)
    s_y = 0.0 if smooth is None else (smooth if weight is None else smooth_w[idx])
    g_y = coef * jnp.expm1(z_y - log_sum) + extra * jnp.exp(z_y - log_sum) - s_y
    g_y = jnp.where(live, g_y, 0.0)
    if jnp.dtype(x.dtype).itemsize == 2:
        # XLA:CPU: 16-bit logits take the label's entry by a select in the (N, V) kernel: a
        # scatter into a 16-bit array runs in float32 and would materialise a float32 gradient.
        onehot = _row(jnp.arange(num_classes, dtype=idx.dtype), x.ndim) == idx
        g = jnp.where(onehot, g_y, g)
        return (out, jnp.sum(g * x_dot.astype(cd), axis=-1).astype(out.dtype), *stats)
    x_dot = x_dot.astype(cd)
    rows = jnp.indices(idx.shape[:-1], sparse=True)
    others = x_dot.at[(*rows, idx[..., 0])].set(0.0, unique_indices=True)
    label_dot = g_y[..., 0] * jnp.take_along_axis(x_dot, idx, axis=-1)[..., 0]
    return (out, (jnp.sum(g * others, axis=-1) + label_dot).astype(out.dtype), *stats)


@on_mesh(_class_dims)
@jit_public(
    _LOSS_STATIC,
    before=lambda a: check_options("cross_entropy", a["label_smoothing"], a["z_loss"],
                                   a["soft_cap"]),
    after=_after_loss("cross_entropy"),
)
def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    weight: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    z_loss: float | ArrayLike = 0.0,
    soft_cap: float | None = None,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy with PyTorch's options, z-loss and soft-capping; exact at any scale.

    For example :math:`i` with (capped) logits :math:`x_i`,

    .. math::
      \ell_i = \sum_c w_c\, q_{ic}\,\big(\operatorname{logsumexp}(x_i) - x_{ic}\big)
      + \zeta\, s_i \operatorname{logsumexp}(x_i)^2,
      \qquad q_i = (1 - \varepsilon)\,\tilde q_i + \varepsilon / C,

    where :math:`\tilde q_i` is the one-hot of an integer label (weighted by ``weight`` in
    PyTorch's way: :math:`w_{y_i}` on the label term, :math:`w_c` on the smoothing term) or the
    soft target row, :math:`\varepsilon` = ``label_smoothing``, :math:`\zeta` = ``z_loss``,
    :math:`s_i = w_{y_i}` for integer labels and 1 for soft ones, and :math:`C` the number of
    classes. With ``soft_cap`` = :math:`\kappa`, logits first become
    :math:`\kappa \tanh(x / \kappa)`.

    The loss is computed as :math:`\sum_c w_c q_{ic} (L_i - z_{ic})` with
    :math:`z = x - \max x` and :math:`L = \operatorname{log1p}(\cdot)` of the shifted sum, so it
    keeps full relative accuracy for confident predictions (losses near 1e-9, and subnormal ones
    below 1.2e-38 with ``reduction="none"``, which XLA:CPU's arithmetic would flush to 0) and for
    logits near 1e4, and ``[1e30, 0, 0, 1e30]`` with label 0 gives :math:`\log 2`. The gradient,
    :math:`(A_i + 2\zeta s_i \operatorname{logsumexp}(x_i))\operatorname{softmax}(x_i) - w\odot
    q_i` with :math:`A_i = \sum_c w_c q_{ic}`, comes from a custom JVP rule and needs no
    ``log_softmax`` array.

    Args:
      logits: scores of shape ``(..., num_classes, ...)`` with classes on ``axis``.
      labels: integer class indices of ``logits``' shape without ``axis``, or floating target
        probabilities of ``logits``' shape (soft targets).
      axis: the class axis, or a tuple of class axes: the classes are then the flat (C-order)
        index over those axes in the order given, as in optax, and ``weight`` has shape
        ``(num_classes,)`` (their product) or the class axes' shape.
      weight: per-class weights of shape ``(num_classes,)``, as in
        :func:`torch.nn.functional.cross_entropy`.
      ignore_index: examples whose integer label equals it contribute nothing, to the value or
        the gradient. With soft labels only a negative value is accepted (and unused), as in
        PyTorch.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, mixing the target with the uniform
        distribution as PyTorch does.
      z_loss: :math:`\zeta \ge 0`, the coefficient of the auxiliary
        :math:`\operatorname{logsumexp}^2` loss (PaLM, T5X).
      soft_cap: :math:`\kappa > 0` or None; caps logits with :math:`\kappa\tanh(x/\kappa)`
        (Gemma 2).
      reduction: ``"none"`` (per-example losses), ``"sum"``, or ``"mean"``: PyTorch's weighted
        mean, the sum divided by :math:`\sum_i w_{y_i}` over counted examples for integer labels
        and by the number of counted examples for soft labels. When no example counts,
        ``"mean"`` gives 0 with zero gradient, where PyTorch gives NaN.
      where: boolean mask of the batch shape; ``False`` examples are excluded like ignored ones.
      axis_name: inside :func:`jax.shard_map`, the mesh axis (or tuple of axes) over which the
        class axis is split (device ``i`` holds classes ``[i n, (i + 1) n)``): integer labels
        are global class indices, ``weight`` and soft labels are the device's slices, and the
        result is the loss of the whole rows, on every device. Only per-example statistics
        cross devices. Exact as on one device, except that a subnormal loss comes out 0.

    Returns:
      The per-example losses (batch shape) for ``"none"``, else a scalar; float32 for float16,
      bfloat16 and float32 logits (so low-precision logits do not quantise the loss), float64
      for float64 logits. The gradient has the logits' dtype. Excluded examples give 0 with a
      zero gradient whatever their logits hold. A counted integer label outside
      ``[0, num_classes)`` gives NaN for that example's loss, and so for a sum or mean (under
      ``jit``; eagerly it raises), and a negative label never wraps around. Such an example
      adds nothing to any derivative: a NaN there would spread, as ``0 * NaN``, into the
      reverse-mode derivatives of the other examples' losses.

    Raises:
      TypeError: if ``logits`` or ``weight`` is not real, ``labels`` is neither integer nor
        floating, or ``where`` is not boolean.
      ValueError: for mismatched shapes (naming both), a bad ``axis``, ``weight`` not of shape
        ``(num_classes,)``, ``label_smoothing`` outside [0, 1], a negative ``z_loss``, a
        non-positive ``soft_cap``, an unknown ``reduction``, a non-negative ``ignore_index``
        with soft labels, or (with concrete labels) an out-of-range label that is not
        ``ignore_index``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxlse
      >>> logits = jnp.array([[2.0, 5, 3], [1, 2, 7], [6, 3, 1], [4, 3, 3]])
      >>> jaxlse.cross_entropy(logits, jnp.array([1, 2, 1, 0]))
      Array(0.9463626, dtype=float32)
      >>> jaxlse.cross_entropy(jnp.array([1e30, 0, 0, 1e30]), jnp.array(0))
      Array(0.6931472, dtype=float32)

    See also:
      :func:`torch.nn.functional.cross_entropy`, :func:`optax.softmax_cross_entropy`,
      :func:`optax.softmax_cross_entropy_with_integer_labels`, :func:`nll_loss`.
    """
    fn = "cross_entropy"
    check_options(fn, label_smoothing, z_loss, soft_cap)
    shards = 1 if axis_name is None else axis_size(axis_name)
    x, lab, soft, w, counted, out_dtype = _prepare(
        fn, logits, labels, axis, weight, ignore_index, where, reduction, shards
    )
    if soft_cap is not None:
        cap = jnp.asarray(soft_cap, out_dtype)
        x = cap * jnp.tanh(x.astype(out_dtype) / cap)
    eps = jnp.asarray(label_smoothing, out_dtype)
    zeta = jnp.asarray(z_loss, out_dtype)
    counted = jnp.broadcast_to(counted, x.shape[:-1])
    smoothing = not (_concrete(label_smoothing) and float(np.asarray(label_smoothing)) == 0.0)
    if axis_name is not None:
        loss = _ce_across(axis_name, soft, smoothing, x, lab, w, eps, zeta, counted)
    else:
        loss = jit_core(_ce_core, 2)(soft, smoothing, x, lab, w, eps, zeta, counted)
    every = where is None and (soft or ignore_index is None)
    if every and (soft or w is None):
        denom: jax.Array | int = math.prod(x.shape[:-1])  # every example counts, weight 1
    elif soft or w is None:
        denom = counted.astype(out_dtype)
    elif axis_name is not None:
        idx = _label_index(lab, x.shape[-1] * shards)[1]
        denom = jnp.where(counted, _pick_across(w, idx, axis_name), 0.0)
    else:
        denom = jnp.where(counted, w[_label_index(lab, x.shape[-1])[1]], 0.0)
    return _reduce_loss(loss, denom, reduction).astype(out_dtype)

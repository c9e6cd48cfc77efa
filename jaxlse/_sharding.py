r"""Many devices: the public functions on sharded arrays and inside :func:`jax.shard_map`.

Two ways to run jaxlse on a mesh, both built on JAX's own machinery:

* ``jax.jit`` over arrays sharded with ``NamedSharding``: the partitioner splits the programs
  itself, and only per-example statistics cross devices when the class axis is sharded (the
  reductions over it become all-reduces of one number per row). On meshes of
  ``AxisType.Explicit`` axes, where every operation must resolve its output sharding while it
  is traced, :func:`on_mesh` runs the function's body under :func:`jax.sharding.auto_axes`
  with the output sharding derived from the input's, so that the partitioner decides the rest
  as on ``Auto`` axes.
* ``axis_name=``, inside ``jax.shard_map``, where each device holds a contiguous slice of the
  class axis (device ``i`` of the named axis holds classes ``[i * n, (i + 1) * n)``): the row
  statistics of each slice are computed as on one device (the exact pass included), then
  combined across the named axis by :func:`global_stats`: the max by ``pmax``, and
  :math:`L = \log \sum_d e^{m_d - m + L_d}` as
  :math:`\operatorname{log1p}(\sum_d t_d + n_\text{max} - 1)` with
  :math:`t_d = \operatorname{expm1}(L_d)` on the devices that hold the max and
  :math:`e^{m_d - m + L_d}` on the others, so that a dominated row keeps its relative
  accuracy. Its custom JVP rule sums :math:`p \cdot \dot x` on each device and ``psum`` s it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from ._rowstats import row_log_sum, shifted

AxisName = Hashable | tuple[Hashable, ...]


# --------------------------------------------------------------------------------------------
# jit over arrays sharded on a mesh of Explicit axes


def explicit_mesh(*values: object) -> Any:
    """The mesh of the first array among ``values`` sharded over ``Explicit`` mesh axes, else
    None (unsharded arrays, meshes of ``Auto`` axes, and non-arrays)."""
    for v in values:
        if not isinstance(v, jax.Array):
            continue
        try:
            sharding = jax.typeof(v).sharding
        except (AttributeError, TypeError):  # pragma: no cover - an abstract value without one
            continue
        mesh = getattr(sharding, "mesh", None)
        spec = getattr(sharding, "spec", None)
        if mesh is None or spec is None or getattr(mesh, "empty", True):
            continue
        explicit = jax.sharding.AxisType.Explicit
        if any(t == explicit for t in mesh.axis_types) and any(s is not None for s in spec):
            return mesh
    return None


def _spec_tuple(v: jax.Array) -> tuple[Any, ...]:
    """``v``'s PartitionSpec entries, one per axis (None where it is not sharded)."""
    spec = tuple(jax.typeof(v).sharding.spec) if isinstance(v, jax.Array) else ()
    return spec + (None,) * (jnp.ndim(v) - len(spec))


def _out_spec(
    shape: tuple[int, ...], main: jax.Array, dropped: tuple[int, ...]
) -> PartitionSpec:
    """The sharding of an output of ``shape`` computed from ``main`` over its ``dropped`` axes:
    ``main``'s, without (or unsharded at) those axes; unsharded if the shapes do not match."""
    spec, ndim = _spec_tuple(main), jnp.ndim(main)
    if len(shape) == ndim:
        keep = [s if n == m else None for s, n, m in zip(spec, shape, jnp.shape(main), strict=True)]
        return PartitionSpec(*keep)
    kept = [s for i, s in enumerate(spec) if i not in dropped]
    if len(kept) == len(shape):
        return PartitionSpec(*kept)
    return PartitionSpec(*([None] * len(shape)))


def on_mesh(
    dropped: Callable[[dict[str, Any], int], tuple[int, ...]],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Runs a public function under :func:`jax.sharding.auto_axes` when an array argument is
    sharded over ``Explicit`` mesh axes; otherwise calls it as it is (no cost).

    ``dropped(arguments, ndim)`` gives the axes of the first argument that an output of lower
    rank does not have (the reduced or class axes). Outputs keep the first argument's sharding
    on the axes they keep; a scalar is replicated. Non-array arguments are passed as they are.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        first = next(iter(sig.parameters))

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            mesh = explicit_mesh(*args, *kwargs.values())
            if mesh is None:
                return fn(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            names = [k for k, v in arguments.items() if isinstance(v, jax.Array)]
            values = [arguments[k] for k in names]

            def body(*vals: jax.Array) -> Any:
                return fn(**{**arguments, **dict(zip(names, vals, strict=True))})

            main = arguments[first]
            # The outputs' shapes, from unsharded stand-ins (which raise no sharding error).
            shapes = jax.eval_shape(
                body, *(jax.ShapeDtypeStruct(v.shape, v.dtype) for v in values)
            )
            axes = dropped(arguments, jnp.ndim(main))
            out = jax.tree.map(lambda s: _out_spec(s.shape, main, axes), shapes)
            with jax.sharding.use_abstract_mesh(mesh):
                return jax.sharding.auto_axes(body, out_sharding=out)(*values)

        return wrapper

    return decorate


# --------------------------------------------------------------------------------------------
# axis_name: the class axis split over a mesh axis inside shard_map


def axis_size(axis_name: AxisName) -> int:
    """The number of devices along ``axis_name`` (a name or a tuple of names)."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    size = 1
    for n in names:
        size *= lax.axis_size(n)
    return size


def class_offset(axis_name: AxisName, local: int) -> jax.Array:
    """The global index of this device's first class: ``axis_index * local``."""
    return lax.axis_index(axis_name) * local


def local_pick(
    v: jax.Array, idx: jax.Array, axis_name: AxisName
) -> tuple[jax.Array, jax.Array]:
    """``(v[..., idx - offset], inside)``: the entry of each global class index ``idx`` on the
    device that holds it, 0 on the others, summed over ``axis_name`` (one number per row
    crosses devices); ``inside`` tells whether this device holds it. ``v`` is (..., n)."""
    n = v.shape[-1]
    rel = idx - class_offset(axis_name, n).astype(idx.dtype)
    inside = (rel >= 0) & (rel < n)
    picked = jnp.take_along_axis(v, jnp.where(inside, rel, 0)[..., None], axis=-1)[..., 0]
    return lax.psum(jnp.where(inside, picked, jnp.zeros((), v.dtype)), axis_name), inside


def psum_rows(v: jax.Array, axes: tuple[int, ...], axis_name: AxisName) -> jax.Array:
    """The sum of ``v`` over ``axes`` (kept) on this device, then over ``axis_name``."""
    return lax.psum(jnp.sum(v, axis=axes, keepdims=True), axis_name)


def combine(
    axis_name: AxisName,
    m_d: jax.Array,
    log_sum_d: jax.Array,
    live_d: jax.Array,
    total_d: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    r"""Per-row ``(m, L, live, S)`` of the whole row from those of each device's slice.

    ``m_d`` (the slice's floored max, held constant), ``L_d = log S_d`` and ``live_d`` (the
    slice has an entry) are :func:`row_log_sum`'s. ``m = max_d m_d`` (NaN if any slice's is),
    and :math:`L = \operatorname{log1p}(\sum_d t_d + n_\text{max} - 1)` with
    :math:`t_d = \operatorname{expm1}(L_d)` for the :math:`n_\text{max}` live slices at the max
    and :math:`e^{m_d - m + L_d}` for the others: for a dominated row the sum is that of the
    small terms, never ``1 + tiny``. Differentiable in ``L_d`` (``m`` is constant). ``S`` is
    the sum :math:`\sum_d e^{m_d - m} S_d` of the slices' ``total_d``, if given.
    """
    cd = log_sum_d.dtype
    big = jnp.finfo(cd).max
    m_d = lax.stop_gradient(m_d.astype(cd))
    nan = lax.psum(jnp.isnan(m_d).astype(jnp.int32), axis_name) > 0
    m = lax.pmax(jnp.where(jnp.isnan(m_d), -jnp.inf, m_d), axis_name)
    m = jnp.where(nan, jnp.nan, m)
    at_max = live_d & (m_d == m)
    n_max = lax.psum(at_max.astype(cd), axis_name)
    # Both clipped to big, so that a +inf max gives e^(m_d - m) = 0 for the finite slices.
    diff = jnp.minimum(m_d, big) - jnp.minimum(m, big)
    other = jnp.where(live_d & ~at_max, jnp.exp(jnp.where(live_d, diff + log_sum_d, 0.0)), 0.0)
    safe = jnp.where(at_max, log_sum_d, 0.0)
    t = lax.psum(jnp.where(at_max, jnp.expm1(safe), other), axis_name)
    live = (n_max > 0) | nan
    u = jnp.where(live, t + (n_max - 1), 0.0)
    log_sum = jnp.where(nan, jnp.nan, jnp.log1p(u))
    total = None
    if total_d is not None:
        scale = jnp.where(live_d, jnp.exp(jnp.where(live_d, diff, 0.0)), 0.0)
        total = lax.psum(lax.stop_gradient(total_d) * scale, axis_name)
    return m, log_sum, live, total


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def global_stats(
    axes: tuple[int, ...], axis_name: AxisName, x: jax.Array, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(m, L, inv)`` of the rows of ``x`` over ``axes`` and the devices along ``axis_name``
    (reduced axes kept): the max (constant), ``L = log S`` and ``1 / S`` (0 for a row with no
    entry; its derivative is that of ``exp(-L)``). Each device's slice gets the statistics of
    :func:`row_log_sum`, exact pass included; :func:`combine` joins them."""
    stats = row_log_sum(axes, x, mask, out_dtype=x.dtype)
    m, log_sum, live, total = combine(axis_name, stats.m, stats.log_sum, stats.live, stats.total)
    inv = jnp.where(live, 1 / jnp.where(live, total, 1.0), 0.0)
    return m, log_sum, inv


@global_stats.defjvp
def _global_stats_jvp(axes, axis_name, primals, tangents):
    x, mask = primals
    x_dot = tangents[0]
    m, log_sum, inv = global_stats(axes, axis_name, x, mask)
    p = jnp.exp(shifted(x, m, mask)) * inv
    cd = log_sum.dtype
    # Excluded entries (and, through p = 0, entries of rows with no entry) add nothing, even
    # where the tangent is inf or NaN.
    # Entries with p = 0 (excluded ones, whose p is NaN in a row holding NaN, included) are
    # selected away on both sides of the product, so that neither mode multiplies by a NaN
    # or an inf there.
    keep = p != 0 if mask is None else mask & (p != 0)
    contrib = jnp.where(keep, jnp.where(keep, p, 0.0) * x_dot.astype(cd), 0.0)
    l_dot = psum_rows(contrib, axes, axis_name)
    return (m, log_sum, inv), (jnp.zeros_like(m), l_dot, -inv * l_dot)

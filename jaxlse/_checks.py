"""Private argument checks and the dtype policy shared by every public function.

Policy (written once, here):

* Boolean and integer inputs promote to JAX's default floating dtype.
* ``float16`` and ``bfloat16`` are computed in ``float32`` (:func:`compute_dtype`) and the result is
  cast back by the caller where the function returns the input dtype.
* Complex and non-numeric inputs raise :class:`TypeError`.
* Shape, axis and option problems raise :class:`ValueError`.

Every message names the public function and the argument, and gives what was expected and what
was received.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Axis = int | Sequence[int] | None
F = TypeVar("F", bound=Callable[..., Any])

_LOW_PRECISION = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def default_float() -> np.dtype:
    """JAX's default floating dtype (``float32``, or ``float64`` with ``jax_enable_x64``)."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def as_float_array(fn: str, name: str, x: ArrayLike) -> jax.Array:
    """Converts ``x`` to a real floating JAX array, promoting bool and integers.

    Raises:
      TypeError: if ``x`` is not numeric, or is complex.
    """
    if not isinstance(x, jax.Array):
        kind = np.asarray(x).dtype
        # numpy reports bfloat16 and the other ml_dtypes floats as kind "V" (void).
        if kind.kind in "OSU" or (kind.kind == "V" and not jnp.issubdtype(kind, jnp.inexact)):
            raise TypeError(
                f"{fn}: `{name}` must be a numeric array, got {type(x).__name__} of dtype {kind}"
            )
    try:
        arr = jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{fn}: `{name}` must be a numeric array, got {type(x).__name__} ({err})"
        ) from None
    dtype = arr.dtype
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{fn}: `{name}` must be real; complex input (dtype {dtype}) is not supported"
        )
    if jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer):
        return arr.astype(default_float())
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{fn}: `{name}` must be a numeric array, got dtype {dtype}")
    return arr


def promoted_float(*args: ArrayLike) -> np.dtype:
    """The floating dtype that ``args`` (already checked to be real and numeric) promote to.

    JAX's promotion of the inputs as given (weak types included), then the default floating
    dtype if that is boolean or integer, as ``jax.numpy`` promotes to an inexact dtype.
    """
    dtype = jnp.result_type(*(np.asarray(a) if isinstance(a, Sequence) else a for a in args))
    return dtype if jnp.issubdtype(dtype, jnp.floating) else default_float()


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype reductions run in: ``float32`` for 16-bit floats, else ``dtype`` itself."""
    return jnp.dtype(jnp.float32) if jnp.dtype(dtype) in _LOW_PRECISION else jnp.dtype(dtype)


def normalize_axes(
    fn: str, axis: Axis, ndim: int, *, keep_order: bool = False, allow_none: bool = True
) -> tuple[int, ...]:
    """Returns ``axis`` as a tuple of non-negative ints (``None`` means every axis).

    Sorted, unless ``keep_order`` (the losses' class axes, whose order sets the flat class
    index). ``allow_none=False`` rejects ``None`` (and the message then does not offer it).

    Raises:
      TypeError: if an axis is not an integer.
      ValueError: if an axis is out of range or repeated.
    """
    what = "an int, a sequence of ints or None" if allow_none else "an int or a tuple of ints"
    if axis is None and allow_none:
        return tuple(range(ndim))
    axes = (axis,) if not isinstance(axis, Sequence) else tuple(axis)
    out = []
    for a in axes:
        try:
            a = operator.index(a)
        except TypeError:
            raise TypeError(f"{fn}: `axis` must be {what}, got {axis!r}") from None
        if ndim == 0:
            raise ValueError(f"{fn}: `axis` {a} is out of range for an input of rank 0 (no axes)")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{fn}: `axis` {a} is out of range for an input of rank {ndim} "
                f"(expected -{ndim} <= axis < {ndim})"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{fn}: `axis` has a repeated entry: {axis!r}")
    return tuple(out) if keep_order else tuple(sorted(out))


def check_broadcasts_to(fn: str, name: str, arr: jax.Array, shape: tuple[int, ...]) -> None:
    """Checks that ``arr`` broadcasts to ``shape`` without changing it.

    Raises:
      ValueError: if it does not.
    """
    try:
        ok = np.broadcast_shapes(arr.shape, shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{fn}: `{name}` of shape {tuple(arr.shape)} does not broadcast to the input's "
            f"shape {tuple(shape)}"
        )


def broadcast_input(fn: str, x: jax.Array, **others: ArrayLike | None) -> jax.Array:
    """``x`` broadcast to its common shape with ``others`` (those that are not None).

    As in :func:`jax.nn.logsumexp` and :func:`jax.nn.softmax`, ``b`` and ``where`` broadcast
    with the input rather than to it: a ``where`` of shape (2, 3) with an input of shape (3,)
    gives a (2, 3) result.

    Raises:
      ValueError: if one of ``others`` does not broadcast with ``x``; the message names it.
    """
    shape = tuple(x.shape)
    for name, other in others.items():
        if other is None:
            continue
        try:
            shape = tuple(np.broadcast_shapes(shape, np.shape(other)))
        except ValueError:
            raise ValueError(
                f"{fn}: `{name}` of shape {tuple(np.shape(other))} does not broadcast with the "
                f"input's shape {tuple(x.shape)}"
            ) from None
    return x if shape == tuple(x.shape) else jnp.broadcast_to(x, shape)


def as_mask(
    fn: str, where: ArrayLike | None, shape: tuple[int, ...] | None
) -> jax.Array | None:
    """Converts ``where`` to a boolean array that broadcasts to ``shape`` (or keeps ``None``).

    With ``shape=None`` it only converts (for a caller that broadcasts the input with the mask
    first, see :func:`broadcast_input`); otherwise the mask gets the rank of ``shape``.

    Raises:
      TypeError: if ``where`` is not numeric or boolean.
      ValueError: if it does not broadcast to ``shape``.
    """
    if where is None:
        return None
    try:
        mask = jnp.asarray(where)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{fn}: `where` must be a boolean array ({err})") from None
    if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.number)):
        raise TypeError(f"{fn}: `where` must be a boolean array, got dtype {mask.dtype}")
    mask = mask if mask.dtype == jnp.bool_ else mask != 0
    if shape is None:
        return mask
    check_broadcasts_to(fn, "where", mask, shape)
    # Same rank as the input, so the library never relies on implicit rank promotion.
    return mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)


def nan_where(bad: jax.Array, dtype: np.dtype) -> jax.Array:
    """NaN where ``bad`` and 0 elsewhere, in ``dtype``, made without a NaN constant.

    ``d / d - 1`` with ``d = 1 - bad``: under ``jax.debug_nans`` an eager NaN constant (such
    as ``jnp.where(bad, jnp.nan, x)`` makes) raises even where nothing is bad, and so would a
    product with one in the backward pass; this raises only where an entry is bad.
    """
    d = jnp.logical_not(bad).astype(dtype)
    return d / d - 1


@functools.cache
def jit_core(core: Callable[..., jax.Array], static: int = 1) -> Callable[..., jax.Array]:
    """``core`` under ``jax.jit`` with its first ``static`` arguments static.

    Eager calls then compile once per shape instead of dispatching op by op (the ``lax.cond``
    in :func:`row_log_sum` would be traced anew on every eager call); inside an outer ``jit``
    it is inlined.
    """
    return jax.jit(core, static_argnums=tuple(range(static)))


def _is_scalar(v: object) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def jit_public(
    static: tuple[str, ...] = (),
    before: Callable[[dict[str, Any]], None] | None = None,
    after: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[F], F]:
    """A public function under :func:`jax.jit`, its options static, its checks of values kept.

    As ``jax.nn``'s functions are, each call is a ``jit`` of the function's body. Called
    eagerly, the body would otherwise run its operations one at a time (a loss with options
    dispatched some twenty small programs, and its eager gradient eleven); here it is one
    program, compiled once per shape, dtype and set of options. Inside a caller's ``jit`` the
    call is a nested ``jit``, which XLA inlines (the compiled temp bytes of the benchmarked
    programs are unchanged); under ``grad``, ``vmap`` or ``shard_map`` it is transformed as any
    ``jit`` is. The arguments are split so:

    * dynamic: arrays (JAX and NumPy, numeric), tracers, and numbers other than 0 (a new
      ``label_smoothing`` value does not recompile);
    * static: the parameters named in ``static``, ``None``, ``bool`` flags, strings, tuples,
      and a scalar 0 (the body's fast paths for an option that is off stay).

    A call with an argument of another kind (a list, a non-numeric array), or one that does not
    bind to the signature, runs the body as it is, which keeps the body's own conversions and
    error messages.

    Inside the program every array is a tracer, so the body's checks of values see none.
    ``before`` and ``after`` take the call's arguments (by name, defaults applied) and run such
    checks on those that are concrete: ``before`` ahead of tracing, ``after`` once the trace
    has passed the body's checks of shapes and types (so a shape error comes first).
    """

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)
        programs: dict[tuple[str, ...], Callable[..., Any]] = {}

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError:
                return fn(*args, **kwargs)  # Python's own message for a wrong call
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            names = []
            for name, v in arguments.items():
                if isinstance(v, jax.core.Tracer):
                    continue
                if name in static or v is None or isinstance(v, (bool, str)):
                    hashable = True
                elif isinstance(v, (jax.Array, np.ndarray)):
                    if not (jnp.issubdtype(v.dtype, jnp.number) or v.dtype == np.bool_):
                        return fn(*args, **kwargs)
                    continue
                elif _is_scalar(v):
                    if v != 0:
                        continue
                    hashable = True
                else:
                    hashable = isinstance(v, tuple)
                try:
                    hash(v)
                except TypeError:
                    hashable = False
                if not hashable:
                    return fn(*args, **kwargs)
                names.append(name)
            key = tuple(names)
            if key not in programs:
                programs[key] = jax.jit(fn, static_argnames=key)
            if before is not None:
                before(arguments)
            out = programs[key](**arguments)
            if after is not None:
                after(arguments)
            return out

        return wrapper  # type: ignore[return-value]

    return decorate

r"""linear_cross_entropy: the cross-entropy of a linear layer's logits, never materialised.

For tokens :math:`x_n \in \mathbb{R}^d`, a weight :math:`W \in \mathbb{R}^{d \times V}` and a
bias :math:`b`, the logits are :math:`\ell_{nv} = x_n \cdot W_{:,v} + b_v`. The loss is that of
:func:`jaxlse.cross_entropy` on them, computed over chunks of ``chunk`` classes (columns of
:math:`W`), so that no (N, V) array exists at any time, in the forward pass or in any derivative.

Forward pass: one scan over the chunks keeps, per token and in float32 (float64 for float64
input), the running max :math:`m`, the sum :math:`t` of the terms :math:`e^{\ell - m}` strictly
below it and the count :math:`k` of entries equal to it; when a chunk raises the max, :math:`t`
and the old max entries are rescaled by :math:`e^{m_\text{old} - m_\text{new}}`. Then
:math:`L = \operatorname{log1p}(t + k - 1)` is :math:`\operatorname{logsumexp}(\ell) - m` with full
relative accuracy when it is small, and the loss of a token is assembled as in cross_entropy
from the non-negative :math:`L - z_y` (:math:`z_y = \ell_y - m`, taken from the same chunk's
logits, so that it is exactly 0 when the label holds the max).

Derivatives: the row statistics have a custom JVP rule whose tangent is another scan over the
chunks (tiles of chunk classes by ``rows`` tokens, see ``_auto_rows``), linear in the tangents
:math:`(\dot x, \dot W, \dot b)`:
:math:`\dot L_n = \sum_v p_{nv}\,\dot\ell_{nv}` with :math:`p = \operatorname{softmax}(\ell)`
rebuilt from the statistics and
:math:`\dot\ell_{nv} = \dot x_n \cdot W_{:,v} + x_n \cdot \dot W_{:,v} + \dot b_v`. Its chunk
body is under :func:`jax.checkpoint`, so reverse mode (the transpose of that scan) saves no
logits block but recomputes it: the backward pass is, per chunk,
:math:`G = A p - B` (per-token :math:`A`, one-hot and smoothing :math:`B`) and
:math:`\bar x \mathrel{+}= G W_c^\top`, :math:`\bar W_c = x^\top G`, :math:`\bar b_c = 1^\top G`,
each chunk of :math:`\bar W` written in place (XLA turns the transpose's add of a zero-padded
chunk into an in-place update of the float32 gradient; for a 16-bit gradient XLA:CPU would
instead add a whole (d, V) array per chunk: a bare scan's gradient took 45 s at N=2048, d=512,
V=131072, where this whole value_and_grad takes about 6, which is why the tangents of 16-bit
inputs are converted to float32). 16-bit ``x`` and ``w`` enter the logits' products as they
are (exact products, float32 sums). Forward mode (``jax.jvp``, ``jax.jacfwd``, Hessians) runs
the same scans forward, and higher derivatives differentiate the rule, which calls the core again.
"""

from __future__ import annotations

import functools
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

# The jaxlse internals this module uses, all here (argument checks and reductions are those of
# cross_entropy, so that options, dtypes and error messages agree).
from ._checks import as_float_array, compute_dtype, jit_public, nan_where, promoted_float
from ._losses import (
    Reduction,
    _concrete,
    _label_index,
    _pick_across,
    _prepare,
    _reduce_loss,
    check_options,
    label_check,
)
from ._sharding import AxisName, axis_size, class_offset, combine, on_mesh

_FN = "linear_cross_entropy"

# chunk_size=None: a chunk of classes is sized so that one (N, chunk) float32 logits block is
# about _BLOCK_BYTES and at most 1/_BLOCK_SHARE of the (N, V) logits, a multiple of
# _CHUNK_ALIGN classes between _CHUNK_ALIGN and _MAX_CHUNK. The statistics' pass keeps two
# blocks at a time on XLA:CPU, and _auto_rows keeps the derivative's tiles as small, so that a
# value_and_grad's temporaries stay below 2 % of the logits.
_BLOCK_BYTES = 4 << 20
_BLOCK_SHARE = 128
_CHUNK_ALIGN = 128
_MAX_CHUNK = 8192
_MIN_ROWS = 256


def _auto_chunk(num_tokens: int, num_classes: int) -> int:
    """The chunk size that ``chunk_size=None`` picks (see the module constants)."""
    block = min(_BLOCK_BYTES, 4 * num_tokens * num_classes // _BLOCK_SHARE)
    chunk = block // (4 * max(num_tokens, 1))
    chunk = min(max(chunk // _CHUNK_ALIGN * _CHUNK_ALIGN, _CHUNK_ALIGN), _MAX_CHUNK)
    return min(chunk, num_classes)


def _auto_rows(num_tokens: int, num_classes: int, dim: int, chunk: int) -> int:
    """Tokens per tile of the derivative's scan: all N, or ``ceil(N / 2^k)`` for the least k
    whose tile fits in 2/_BLOCK_SHARE of the logits, but not below _MIN_ROWS.

    In reverse mode a tile of ``rows`` tokens keeps, on XLA:CPU, its (rows, chunk) block of
    logits, a copy of its (rows, d) slice of x and the (rows, d) product that is added to the
    gradient of x (XLA:CPU does not accumulate a product in place), and (d, chunk) slices of
    w and of its gradient. At N=2048, d=512, V=32768 (chunk 256) all the tokens at once take
    2.6 % of the logits and 512 tokens 1.6 %, about 5 % slower (measured).
    """
    budget = 2 * num_tokens * num_classes // _BLOCK_SHARE  # float32 entries
    rows, parts = num_tokens, 1
    while rows * (chunk + 2 * dim) + 2 * dim * chunk > budget:
        smaller = -(-num_tokens // (2 * parts))
        if smaller < _MIN_ROWS:
            break
        rows, parts = smaller, 2 * parts
    return rows


class _Static(NamedTuple):
    """The static configuration of the row statistics."""

    chunk: int  # classes per chunk (at most V); see _over_tiles for the last one
    rows: int  # tokens per tile of the derivative's scan (at most N); see _auto_rows
    uniform: bool  # smoothing weights: a scalar for every class (True) or a (V,) array


def _is_zero(t: object) -> bool:
    return t is None or isinstance(t, SymbolicZero)


def _chunk_logits(
    x: jax.Array, w: jax.Array, b: jax.Array | None, start: jax.Array | int, size: int
) -> tuple[jax.Array, jax.Array]:
    """``(x @ w[:, start:start + size] + b[start:start + size], w[:, start:start + size])``."""
    cd = compute_dtype(x.dtype)
    wc = lax.dynamic_slice_in_dim(w, start, size, axis=1)
    # 16-bit x and w are multiplied as they are, into float32: their products are exact in
    # float32, so these are the logits of the inputs converted to float32, and the product is
    # faster (XLA:CPU: 0.67 s against 0.95 s in float32 at 2048 x 512 x 32768).
    logits = jnp.dot(x, wc, preferred_element_type=cd)
    if b is not None:
        logits = logits + lax.dynamic_slice_in_dim(b, start, size).astype(cd)[None, :]
    return logits, wc


def _capped(logits: jax.Array, cap: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """``(cap * tanh(logits / cap), tanh(logits / cap))``, or ``(logits, None)`` without a cap."""
    if cap is None:
        return logits, None
    u = jnp.tanh(logits / cap)
    return cap * u, u


def _is_label(idx: jax.Array, start: jax.Array | int, size: int) -> jax.Array:
    """(N, size): whether class ``start + j`` is token n's label."""
    rel = idx - lax.convert_element_type(start, idx.dtype)
    return lax.broadcasted_iota(idx.dtype, (1, size), 1) == rel[:, None]


def _where(mask: jax.Array | None, v: jax.Array, other: float) -> jax.Array:
    return v if mask is None else jnp.where(mask, v, other)


def _over_tiles(step, carry, num_tokens: int, rows: int, num_classes: int, chunk: int,
                checkpoint: bool = False):
    """Runs ``carry = step(carry, start, fresh, row, fresh_rows)`` over tiles of ``rows``
    tokens by ``chunk`` classes.

    One scan, one body: tile (i, j) reads classes ``[start, start + chunk)`` with
    ``start = min(i * chunk, V - chunk)`` and tokens ``[row, row + rows)`` with
    ``row = min(j * rows, N - rows)``. When ``chunk`` does not divide V the last chunk
    overlaps the one before, and ``fresh`` (a (1, chunk) mask, else None) marks the classes
    that no earlier chunk read; ``step`` leaves the others out of every sum (no padding, and
    no class counted twice). ``fresh_rows`` ((rows, 1), else None) does the same for the
    tokens. ``checkpoint`` puts the body under :func:`jax.checkpoint`, so that reverse mode
    recomputes what it needs of a tile instead of saving it.
    """
    full, rem = divmod(num_classes, chunk)
    num_chunks = full + bool(rem)
    row_blocks = -(-num_tokens // rows) if num_tokens else 1

    def body(carry, t):
        i, j = t // row_blocks, t % row_blocks
        start = jnp.minimum(i * chunk, num_classes - chunk)
        fresh = fresh_rows = None
        if rem:
            fresh = start + lax.broadcasted_iota(jnp.int32, (1, chunk), 1) >= i * chunk
        row = jnp.minimum(j * rows, num_tokens - rows)
        if row_blocks * rows != num_tokens:
            fresh_rows = row + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) >= j * rows
        return step(carry, start, fresh, row, fresh_rows)

    if checkpoint:
        body = jax.checkpoint(body, prevent_cse=False)
    if num_chunks * row_blocks == 1:
        return step(carry, 0, None, 0, None)
    # The tile index is carried (not scanned over an arange), so that nothing in the
    # program grows with the number of tiles.
    (carry, _), _ = lax.scan(
        lambda c, _: ((body(c[0], c[1]), c[1] + 1), None),
        (carry, jnp.zeros((), jnp.int32)),
        length=num_chunks * row_blocks,
    )
    return carry


def _vma(v: object) -> frozenset:
    """The mesh axes that ``v`` varies over inside :func:`jax.shard_map` (empty elsewhere):
    ``aval.vma`` in some jax releases, ``aval.manual_axis_type.varying`` in others."""
    aval = jax.typeof(v)
    if hasattr(aval, "vma"):
        return frozenset(aval.vma)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()))


def _varying(tree: object, *refs: object) -> object:
    """``tree`` (a scan's initial carry) varying over every mesh axis that one of ``refs``
    varies over inside :func:`jax.shard_map` (a scan's carry must keep its type, and the body
    mixes x's axes with w's); unchanged elsewhere."""
    axes: list[object] = []
    for r in jax.tree.leaves(refs):
        for a in _vma(r):
            if a not in axes:
                axes.append(a)
    if not axes:
        return tree

    def cast(c: jax.Array) -> jax.Array:
        missing = tuple(a for a in axes if a not in _vma(c))
        return lax.pcast(c, missing, to="varying") if missing else c

    return jax.tree.map(cast, tree)


def _stats_pass(
    static: _Static,
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    idx: jax.Array,
    sw: jax.Array | None,
    cap: jax.Array | None,
) -> tuple[jax.Array, ...]:
    """``(m, L, l_y, r, S)`` per token: the max, ``L = logsumexp - m``, the label's logit,
    ``r = sum_v sw_v (m - l_v)`` (0 without smoothing weights ``sw``) and the sum
    ``S = sum_v exp(l_v - m)``. Every floating input is in the compute dtype (float32 or
    float64); the logits are capped if ``cap`` is given."""
    cd = compute_dtype(x.dtype)
    big = jnp.finfo(cd).max
    n, size = x.shape[0], static.chunk

    def step(carry, start, fresh, row, fresh_rows):
        del row, fresh_rows  # one block of all the tokens
        m, t, k, l_y, r, seen = carry
        logits = _capped(_chunk_logits(x, w, b, start, size)[0], cap)[0]
        logits = _where(fresh, logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        z = logits - m_new[:, None]
        # Terms strictly below the (new) max, and the entries at it. A raised max turns the old
        # max entries into terms below it: each e^(m - m_new), like the rescaled t. The entries
        # at the max are found by a comparison, not by z == 0: XLA:CPU contracts the capped
        # logits' product cap * tanh(.) with the subtraction of m into one fused multiply-add,
        # which gives the max entry a z of the product's rounding error instead of 0.
        at_max = logits >= m_new[:, None]
        t_c = jnp.sum(jnp.where(at_max, 0.0, jnp.exp(z)), axis=1)
        k_c = jnp.sum(at_max.astype(cd), axis=1)
        scale = jnp.exp(m - m_new)
        moved = m < m_new
        t = t * scale + jnp.where(moved, k * scale, 0.0) + t_c
        k = jnp.where(moved, 0.0, k) + k_c
        # The label's logit, gathered (one entry per token) from this chunk if it holds it.
        rel = idx - lax.convert_element_type(start, idx.dtype)
        inside = (rel >= 0) & (rel < size)
        rel = jnp.clip(rel, 0, size - 1)
        if fresh is not None:
            inside = inside & fresh[0, rel]
        l_y = l_y + jnp.where(inside, jnp.take_along_axis(logits, rel[:, None], axis=1)[:, 0], 0.0)
        if sw is not None:
            # r = sum over the classes so far of sw_v (m - l_v) >= 0, kept for the running max:
            # a raised max adds (m_new - m) times the weight of the classes already seen.
            raised = jnp.where(seen > 0, (m_new - m) * seen, 0.0)
            if static.uniform:
                r = r + raised + sw * jnp.sum(_where(fresh, -z, 0.0), axis=1)
                seen = seen + sw * (size if fresh is None else jnp.sum(fresh.astype(cd)))
            else:
                swc = _where(fresh, lax.dynamic_slice_in_dim(sw, start, size)[None, :], 0.0)
                # 0 * inf = 0 at a -inf logit of a class with weight 0.
                r = r + raised + jnp.sum(jnp.where(swc == 0, 0.0, swc * -z), axis=1)
                seen = seen + jnp.sum(swc)
        return m_new, t, k, l_y, r, seen

    zeros = jnp.zeros((n,), cd)
    carry = (jnp.full((n,), -big, cd), zeros, zeros, zeros, zeros, jnp.zeros((), cd))
    carry = _varying(carry, x, w, b, idx, sw, cap)
    m, t, k, l_y, r, _ = _over_tiles(step, carry, n, n, w.shape[1], size)
    # k max entries and t below them: L = log(k + t) = log1p(t + k - 1); 0 in a row whose
    # entries are all -inf (k = 0, as in cross_entropy).
    log_sum = jnp.log1p(t + jnp.maximum(k - 1, 0.0))
    return m, log_sum, l_y, r, t + k


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _row_stats(
    static: _Static,
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    idx: jax.Array,
    sw: jax.Array | None,
    cap: jax.Array | None,
) -> tuple[jax.Array, ...]:
    """:func:`_stats_pass` with the custom JVP below (``S`` has a zero tangent: it is used
    under ``stop_gradient`` only)."""
    return _stats_pass(static, x, w, b, idx, sw, cap)


def _row_stats_jvp(static, primals, tangents):
    x, w, b, idx, sw, cap = primals
    x_dot, w_dot, b_dot, _, sw_dot, cap_dot = tangents
    out = _row_stats(static, x, w, b, idx, sw, cap)
    m, log_sum, s = out[0], out[1], out[4]
    # softmax = exp(l - m) / S. The value of 1 / S is taken from the sum itself: exp(-L) would
    # carry the rounding of L (half an ulp of L = 10.4 is 8 ulp of every probability in a row
    # of 32768 equal logits), as cross_entropy's rule avoids too. The derivative is that of
    # exp(-L), so that higher derivatives stay exact. A row of -inf only has S = 0 (and p = 0).
    inv_exp = jnp.exp(-log_sum)
    inv_sum = inv_exp + lax.stop_gradient(
        jnp.where(s > 0, 1 / jnp.where(s > 0, s, 1.0), inv_exp) - inv_exp
    )
    # Kept for the backward pass: x, w, b and the per-token statistics, nothing per class. The
    # chunk body is checkpointed, so the transpose of this scan recomputes each logits block
    # (one more matmul per chunk) instead of saving it. m is held constant (zero tangent):
    # L's tangent is that of logsumexp, and every use of m is in m + L, l_y - m or m - l_v.
    dx, dw, db, dsw, dcap = (
        None if _is_zero(t) else t for t in (x_dot, w_dot, b_dot, sw_dot, cap_dot)
    )
    size = static.chunk
    # 16-bit x, w, bias: their tangents are converted to float32 here, so that the transpose
    # accumulates the gradients of x and w over the chunks in float32 and rounds them once.
    cd = m.dtype
    dx, dw, db = (None if t is None else t.astype(cd) for t in (dx, dw, db))
    x_cd = x.astype(cd) if dw is not None else None

    n, rows = x.shape[0], static.rows

    def step(acc, start, fresh, row, fresh_rows):
        # One tile: tokens [row, row + rows) (all of them unless static.rows splits them) and
        # classes [start, start + size).
        def tokens(v):
            return None if v is None else lax.dynamic_slice_in_dim(v, row, rows)

        xr, mr, idx_r, dx_r, x_cd_r = map(tokens, (x, m, idx, dx, x_cd))
        logits, wc = _chunk_logits(xr, w, b, start, size)
        capped, u = _capped(logits, cap)
        d_logits = None
        if dx is not None:
            # XLA:CPU turns the conversion of w's chunk into one float32 copy of w hoisted out
            # of the loop (4 * d * V bytes), whatever is done in the loop: an optimization
            # barrier (removed early), a conversion by integer operations on the bits or a
            # product with a value from the carry all gave the same copy (measured).
            d_logits = jnp.dot(dx_r, wc.astype(cd))
        if dw is not None:
            term = jnp.dot(x_cd_r, lax.dynamic_slice_in_dim(dw, start, size, axis=1))
            d_logits = term if d_logits is None else d_logits + term
        if db is not None:
            term = lax.dynamic_slice_in_dim(db, start, size)[None, :]
            d_logits = term if d_logits is None else d_logits + term
        if cap is not None:
            # d(cap tanh(l / cap)) = (1 - u^2) dl + (u - (l / cap)(1 - u^2)) dcap.
            slope = 1 - u * u
            d_logits = None if d_logits is None else slope * d_logits
            if dcap is not None:
                term = dcap * (u - (logits / cap) * slope)
                d_logits = term if d_logits is None else d_logits + term
        zero = jnp.zeros((rows,), cd)
        c_l = c_y = c_r = zero
        if d_logits is not None:
            # Classes read by an earlier chunk, and tokens by an earlier row block, contribute
            # nothing (p and the label mask are 0 there too, but a product with 0 would not
            # hide an inf).
            d_logits = _where(fresh, d_logits, 0.0)
            d_logits = _where(fresh_rows, d_logits, 0.0)
            p = jnp.exp(capped - mr[:, None]) * tokens(inv_sum)[:, None]
            c_l = jnp.sum(p * d_logits, axis=1)
            c_y = jnp.sum(jnp.where(_is_label(idx_r, start, size), d_logits, 0.0), axis=1)
        if sw is not None:
            if d_logits is not None:
                if static.uniform:
                    c_r = c_r - sw * jnp.sum(d_logits, axis=1)
                else:
                    swc = lax.dynamic_slice_in_dim(sw, start, size)[None, :]
                    c_r = c_r - jnp.sum(swc * d_logits, axis=1)
            if dsw is not None:
                neg_z = _where(fresh, mr[:, None] - capped, 0.0)
                neg_z = _where(fresh_rows, neg_z, 0.0)
                if static.uniform:
                    c_r = c_r + dsw * jnp.sum(neg_z, axis=1)
                else:
                    swc = lax.dynamic_slice_in_dim(sw, start, size)[None, :]
                    dswc = lax.dynamic_slice_in_dim(dsw, start, size)[None, :]
                    # The derivative in a zero weight at a -inf logit is taken as 0, as the
                    # value's 0 * inf is.
                    safe = jnp.where((swc == 0) & (neg_z == jnp.inf), 0.0, neg_z)
                    c_r = c_r + jnp.sum(dswc * safe, axis=1)
        if rows == n:
            return tuple(a + c for a, c in zip(acc, (c_l, c_y, c_r), strict=True))
        return tuple(
            lax.dynamic_update_slice_in_dim(a, tokens(a) + c, row, 0)
            for a, c in zip(acc, (c_l, c_y, c_r), strict=True)
        )

    zeros = jnp.zeros((n,), cd)
    init = _varying((zeros, zeros, zeros), primals, [t for t in tangents if not _is_zero(t)])
    dl, dy, dr = _over_tiles(step, init, n, rows, w.shape[1], size, checkpoint=True)
    return out, (jnp.zeros_like(m), dl, dy, dr, jnp.zeros_like(s))


_row_stats.defjvp(_row_stats_jvp, symbolic_zeros=True)


def _token_losses(
    static: _Static,
    smoothing: bool,
    every: bool,
    axis_name: AxisName | None,
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    labels: jax.Array,
    weight: jax.Array | None,
    eps: jax.Array,
    zeta: jax.Array,
    cap: jax.Array | None,
    counted: jax.Array,
) -> jax.Array:
    """Per-token losses for ``x`` of shape (N, d) and labels (N,); 0 where not ``counted``.

    ``every`` (static): no ``where`` and no ``ignore_index``, so that every token counts.

    With ``axis_name`` the classes (columns of ``w``, and ``b``, ``weight``) are split over the
    devices along it and ``labels`` are global class indices: each device runs
    :func:`_row_stats` over its own columns (its label index is relative to its first class,
    out of its range where another device holds the label), and the per-token statistics are
    joined by :func:`combine` (max, ``L``) and ``psum`` (the label's logit, the smoothing sum):
    a few numbers per token cross devices. Derivatives come from :func:`_row_stats`' rule on
    each device and JAX's own of the joins.
    """
    cd = eps.dtype
    local = w.shape[1]
    num_classes = local if axis_name is None else local * axis_size(axis_name)
    if not every:
        # Excluded tokens read zeros: their logits are the bias and their gradient is 0 even
        # if x holds inf or NaN there (a select, so nothing of theirs reaches dW). It copies x,
        # so it is left out when every token counts.
        x = jnp.where(counted[:, None], x, jnp.zeros((), x.dtype))
    bad, idx = _label_index(labels, num_classes, counted)
    rel = idx if axis_name is None else idx - class_offset(axis_name, local).astype(idx.dtype)
    sw = None
    if smoothing:
        sw = eps / num_classes if weight is None else eps / num_classes * weight
    m, log_sum, l_y, r, s = _row_stats(static, x, w, b, rel, sw, cap)
    if axis_name is None:
        wy = jnp.asarray(1, cd) if weight is None else weight[idx]
        sw_total = eps if weight is None or not smoothing else jnp.sum(sw)
    else:
        m_d = lax.stop_gradient(m)
        m, log_sum, _, _ = combine(axis_name, m_d, log_sum, s > 0)
        l_y = lax.psum(l_y, axis_name)  # 0 on the devices that do not hold the label
        wy = jnp.asarray(1, cd) if weight is None else _pick_across(weight, idx, axis_name)
        if smoothing:
            # r = sum over this device's classes of sw_v (m_d - l_v), moved to the global max.
            seen = sw * local if weight is None else jnp.sum(sw)
            r = lax.psum(r + (m - m_d) * seen, axis_name)
            sw_total = eps if weight is None else lax.psum(jnp.sum(sw), axis_name)
    # -log p_y = L - z_y with z_y = l_y - m <= 0: both terms >= 0.
    loss = (1 - eps) * wy * (log_sum - (l_y - m))
    if smoothing:
        loss = loss + sw_total * log_sum + r
    lse = m + log_sum
    # lse is selected away (not multiplied by 0) without z-loss, in the value and in its
    # derivative: lse**2 overflows for logits near 1e20, and 2 lse * 0 is NaN at lse = inf.
    on = zeta > 0
    loss = loss + jnp.where(on, zeta * wy * jnp.square(jnp.where(on, lse, 0.0)), 0.0)
    # A counted token with a label out of range: NaN, with a zero gradient (as in
    # cross_entropy; a select, so the NaN is not in any product of the backward pass).
    loss = jnp.where(bad, nan_where(bad, cd), loss)
    return jnp.where(counted, loss, 0.0)


_token_losses_jit = jax.jit(_token_losses, static_argnums=(0, 1, 2, 3))


def _prepared_labels(
    arrays: tuple[object, ...],
    batch: tuple[int, ...],
    num_classes: int,
    dtype: jnp.dtype,
    labels: ArrayLike,
    weight: ArrayLike | None,
    ignore_index: int | None,
    where: ArrayLike | None,
    reduction: str,
    shards: int = 1,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """``(labels, weight, counted)`` from cross_entropy's ``_prepare``, without logits.

    ``_prepare`` reads only the shape and dtype of the logits, so an abstract stand-in of shape
    ``batch + (num_classes,)`` takes their place and no (N, V) array is made. When every one of
    ``arrays`` (all the array arguments) is concrete it runs under ``jax.eval_shape`` (which
    supplies the stand-in) and ``jax.ensure_compile_time_eval`` (so that the labels stay
    concrete and an out-of-range label raises eagerly, as in cross_entropy with concrete
    logits); otherwise it runs in a ``jax.jit`` whose stand-in zeros XLA removes, as nothing
    reads them (and, as in cross_entropy under a trace, a bad label gives NaN).
    """
    shape = (*batch, num_classes)
    if all(_concrete(v) for v in arrays):
        found = []

        def trace(proxy: jax.Array) -> None:
            with jax.ensure_compile_time_eval():
                found.append(_prepare(
                    _FN, proxy, labels, -1, weight, ignore_index, where, reduction, shards
                ))

        jax.eval_shape(trace, jax.ShapeDtypeStruct(shape, dtype))
        _, lab, _, wt, counted, _ = found[0]
        return lab, wt, counted
    return _prepare_traced(shape, jnp.dtype(dtype), ignore_index, reduction, shards)(
        labels, weight, where
    )


@functools.cache
def _prepare_traced(shape, dtype, ignore_index, reduction, shards):
    def prepare(labels, weight, where):
        proxy = jnp.zeros(shape, dtype)
        _, lab, _, wt, counted, _ = _prepare(
            _FN, proxy, labels, -1, weight, ignore_index, where, reduction, shards
        )
        return lab, wt, counted

    return jax.jit(prepare)


def _label_check(args: dict) -> None:
    """For :func:`jit_public`: out-of-range labels raise when every array argument is concrete
    (as ``_prepared_labels`` does); under a trace of ``x`` or ``w`` they give NaN."""
    arrays = ("x", "w", "bias", "labels", "weight", "where")
    if all(_concrete(args[k]) for k in arrays):
        label_check(_FN, args["labels"], args["where"], args["ignore_index"],
                    np.shape(args["w"])[1])


@on_mesh(lambda args, ndim: (ndim - 1,))
@jit_public(
    ("ignore_index", "reduction", "chunk_size", "axis_name"),
    before=lambda a: check_options(_FN, a["label_smoothing"], a["z_loss"], a["soft_cap"]),
    after=_label_check,
)
def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    z_loss: float | ArrayLike = 0.0,
    soft_cap: float | ArrayLike | None = None,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
    chunk_size: int | None = None,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Cross-entropy of the logits ``x @ w + bias`` without ever forming them (an LM head's loss).

    Equal to ``cross_entropy(x @ w + bias, labels, ...)`` with the same options:

    .. math::
      \ell_n = (1 - \varepsilon)\, w_{y_n} \big(\operatorname{logsumexp}(z_n) - z_{n y_n}\big)
      + \frac{\varepsilon}{V} \sum_v w_v \big(\operatorname{logsumexp}(z_n) - z_{nv}\big)
      + \zeta\, w_{y_n} \operatorname{logsumexp}(z_n)^2,
      \qquad z_{nv} = x_n \cdot W_{:,v} + b_v,

    with :math:`W` = ``w``, :math:`b` = ``bias`` (0 if None), :math:`w_v` = ``weight`` (1 if
    None), :math:`\varepsilon` = ``label_smoothing``, :math:`\zeta` = ``z_loss`` and :math:`V`
    the number of classes; with ``soft_cap`` = :math:`\kappa` the logits first become
    :math:`\kappa \tanh(z / \kappa)`. The logits are computed ``chunk_size`` classes (columns of
    ``w``) at a time, twice in a gradient (once for the per-token statistics, once to form
    :math:`(A_n + 2\zeta w_{y_n}\operatorname{logsumexp}(z_n))\operatorname{softmax}(z_n) - B_n`
    block by block and multiply it into the gradients of ``x``, ``w`` and ``bias``), so memory
    holds a few (N, chunk_size) blocks rather than (N, V) logits, however large V is: with the
    default chunk size a float32 ``value_and_grad`` keeps less than 2 % of one (N, V) array of
    temporaries (4.1 MiB at N=2048, d=512, V=32768, 9.0 MiB at V=131072 and above), where the
    materialised logits take two (N, V) arrays. It costs four matrix
    products of N x d x V (the logits twice, the two gradients) where the materialised logits
    cost three. The loss of a confident correct prediction keeps its relative accuracy (it is
    :math:`\operatorname{log1p}` of the tiny sum of the other terms, which are summed
    directly, never as 1 + tiny). Forward mode works (``jax.jvp``, ``jax.jacfwd``,
    ``jax.hessian``, Hessian-vector products), as do ``jax.vmap`` and derivatives of any
    order.

    Args:
      x: features of shape ``(..., d)``: one token per leading index.
      w: weight of shape ``(d, V)``.
      labels: integer class indices of shape ``x.shape[:-1]`` (any integer dtype; compared in
        at least 32 bits).
      bias: ``(V,)`` or None.
      weight: per-class weights of shape ``(V,)``, as in
        :func:`torch.nn.functional.cross_entropy`.
      ignore_index: tokens whose label equals it contribute nothing, to the value or the
        gradient.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, mixing the target with the uniform
        distribution as PyTorch does.
      z_loss: :math:`\zeta \ge 0`, the coefficient of :math:`\operatorname{logsumexp}^2`.
      soft_cap: :math:`\kappa > 0` or None; caps the logits with :math:`\kappa\tanh(z/\kappa)`.
      reduction: ``"none"`` (per-token losses), ``"sum"`` or ``"mean"`` (PyTorch's weighted
        mean: the sum over counted tokens divided by the sum of their :math:`w_{y_n}`; 0 with
        zero gradient when no token counts).
      where: boolean mask of the tokens' shape ``x.shape[:-1]``; ``False`` tokens are excluded
        like ignored ones.
      chunk_size: classes per chunk, any positive int; it need not divide ``V`` (the last
        chunk then overlaps the one before and leaves out the classes already read: nothing
        is padded). None picks the multiple of 128 for which one float32 (N, chunk) block of
        the N tokens' logits takes about 4 MiB and at most 1/128 of the (N, V) logits,
        between 128 and 8192 and at most ``V``: for 2048 tokens 256 at V=32768 and 512 from
        V=65536 on, 128 from 8192 tokens on. (The derivatives also split the tokens into
        tiles of at least 256 when d is large against the chunk, to the same end.)
      axis_name: inside :func:`jax.shard_map`, the mesh axis (or tuple of axes) over which the
        vocabulary is split (Megatron's vocab-parallel head): ``w``, ``bias`` and ``weight``
        are the device's slices (device ``i`` holds classes ``[i V_d, (i + 1) V_d)``), labels
        are global class indices, and every device gets the loss of the whole vocabulary.
        Only per-token statistics cross devices; the chunk size applies to each slice.

    Returns:
      The per-token losses (shape ``x.shape[:-1]``) for ``"none"``, else a scalar; float32 for
      float16, bfloat16 and float32 inputs, float64 for float64 inputs (the logits' dtype is
      that of ``x``, ``w`` and ``bias`` promoted together). With 16-bit inputs the logits are
      the float32 products of the 16-bit ``x`` and ``w`` (exact products, summed in float32),
      and the reductions over the classes, the gradient products and the gradient of ``x``
      summed over the chunks are float32 (on XLA:CPU this keeps float32 copies of ``w`` and of
      its gradient, ``8 * d * V`` bytes); the gradients have their inputs' dtypes, rounded
      once. Excluded tokens give 0 with a zero gradient whatever ``x`` holds
      for them. A counted label outside ``[0, V)`` gives NaN for its token's loss, with a zero
      gradient (under ``jit``; eagerly it raises, as in cross_entropy).

    Raises:
      TypeError: if ``x``, ``w``, ``bias`` or ``weight`` is not real, ``labels`` is not an
        integer array (soft labels are not supported), ``where`` is not boolean, or
        ``chunk_size`` is not an int.
      ValueError: if ``w`` is not 2-D or has no column, ``x`` is a scalar, ``x.shape[-1]``
        differs from ``w.shape[0]`` or ``bias`` is not of shape ``(V,)`` (naming both shapes),
        ``chunk_size`` is not positive, and for the problems :func:`cross_entropy` reports:
        ``labels``, ``weight`` or ``where`` of the wrong shape, ``label_smoothing`` outside
        [0, 1], a negative ``z_loss``, a non-positive ``soft_cap``, an unknown ``reduction``,
        or (with concrete arguments) an out-of-range label that is not ``ignore_index``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxlse
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> w = jnp.array([[2.0, 0.0, 1.0], [0.0, 1.0, -1.0]])
      >>> labels = jnp.array([0, 1, 2])
      >>> jaxlse.linear_cross_entropy(x, w, labels, chunk_size=2)
      Array(0.98604786, dtype=float32)
      >>> jaxlse.cross_entropy(x @ w, labels)
      Array(0.98604786, dtype=float32)

    See also:
      :func:`cross_entropy`, :func:`optax.softmax_cross_entropy_with_integer_labels`,
      Cut Cross-Entropy (Wijmans et al., 2024) and Liger Kernel's fused linear cross-entropy
      for PyTorch.
    """
    check_options(_FN, label_smoothing, z_loss, soft_cap)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
            raise TypeError(f"{_FN}: `chunk_size` must be an int or None, got {chunk_size!r}")
        if chunk_size <= 0:
            raise ValueError(f"{_FN}: `chunk_size` must be positive, got {chunk_size}")
    xa = as_float_array(_FN, "x", x)
    wa = as_float_array(_FN, "w", w)
    ba = None if bias is None else as_float_array(_FN, "bias", bias)
    if wa.ndim != 2:
        raise ValueError(f"{_FN}: `w` must have shape (d, V), got shape {wa.shape}")
    if xa.ndim == 0:
        raise ValueError(f"{_FN}: `x` must have a feature axis (shape (..., d)), got a scalar")
    if xa.shape[-1] != wa.shape[0]:
        raise ValueError(
            f"{_FN}: the last axis of `x` must match the first of `w`; got x of shape "
            f"{xa.shape} and w of shape {wa.shape}"
        )
    num_classes = wa.shape[1]
    if num_classes == 0:
        raise ValueError(f"{_FN}: `w` must have at least one class (column), got shape {wa.shape}")
    if ba is not None and ba.shape != (num_classes,):
        raise ValueError(
            f"{_FN}: `bias` must have shape (V,) = ({num_classes},) for w of shape "
            f"{wa.shape}, got bias of shape {ba.shape}"
        )
    try:
        label_dtype = jnp.asarray(labels).dtype
    except (TypeError, ValueError):
        label_dtype = None  # _prepare raises its TypeError
    if label_dtype is not None and jnp.issubdtype(label_dtype, jnp.floating):
        raise TypeError(
            f"{_FN}: `labels` must be integer class indices (soft labels are not supported), "
            f"got dtype {label_dtype}"
        )
    dtype = promoted_float(*(a for a in (xa, wa, ba) if a is not None))
    batch = xa.shape[:-1]
    shards = 1 if axis_name is None else axis_size(axis_name)
    lab, wt, counted = _prepared_labels(
        (xa, wa, ba, labels, weight, where),
        batch, num_classes, dtype, labels, weight, ignore_index, where, reduction, shards,
    )
    out_dtype = compute_dtype(dtype)
    num_tokens = math.prod(batch)
    if soft_cap is not None:
        cap = jnp.asarray(soft_cap, out_dtype)
    else:
        cap = None
    eps = jnp.asarray(label_smoothing, out_dtype)
    zeta = jnp.asarray(z_loss, out_dtype)
    smoothing = not (_concrete(label_smoothing) and float(np.asarray(label_smoothing)) == 0.0)
    chunk = _auto_chunk(num_tokens, num_classes) if chunk_size is None else chunk_size
    chunk = min(int(chunk), num_classes)
    rows = _auto_rows(num_tokens, num_classes, xa.shape[-1], chunk)
    static = _Static(chunk, rows, weight is None)
    every = where is None and ignore_index is None
    loss = _token_losses_jit(
        static,
        smoothing,
        every,
        axis_name,
        xa.astype(dtype).reshape(num_tokens, xa.shape[-1]),
        wa.astype(dtype),
        None if ba is None else ba.astype(dtype),
        lab.reshape(num_tokens),
        wt,
        eps,
        zeta,
        cap,
        counted.reshape(num_tokens),
    )
    if every and wt is None:
        denom: jax.Array | int = num_tokens  # every token counts, with weight 1
    elif wt is None:
        denom = counted.reshape(num_tokens).astype(out_dtype)
    else:
        idx = _label_index(lab, num_classes * shards)[1].reshape(num_tokens)
        wy = wt[idx] if axis_name is None else _pick_across(wt, idx, axis_name)
        denom = jnp.where(counted.reshape(num_tokens), wy, 0.0)
    out = _reduce_loss(loss, denom, reduction).astype(out_dtype)
    return out.reshape(batch) if reduction == "none" else out

"""Generate PyTorch golden values for ``jaxlse.cross_entropy`` / ``jaxlse.nll_loss``.

Regenerate (needs ``torch`` and ``numpy``; torch is *not* needed to run the tests)::

    python tests/make_torch_golden.py

This writes ``tests/data/torch_golden.npz`` next to this script. The output is fully
deterministic (numpy ``default_rng`` with a fixed seed, float64 torch on CPU, and a zip
written with fixed timestamps), so re-running with the same torch version reproduces
the file byte for byte. The committed file was produced with torch 2.13.0+cpu and
numpy 2.4.6.

Every case evaluates, in float64, either

* ``F.cross_entropy(logits, target, weight, ignore_index, label_smoothing, reduction)``
  with integer labels or soft (probability) targets, or
* ``F.nll_loss(F.log_softmax(logits, 1), labels, weight, ignore_index, reduction)``,

together with the gradient of the loss (summed first when ``reduction="none"``) with
respect to the logits. Torch puts the class axis on dim 1; jaxlse puts it last, so
logits, soft targets and gradients are stored in class-last layout.

File format (loadable with ``np.load(path, allow_pickle=False)``):

* ``meta``: 0-d unicode array holding a JSON list with one dict per case ``i`` with keys
  ``fn`` ("cross_entropy" | "nll_loss"), ``soft`` (bool), ``ignore_index`` (int | None,
  jaxlse semantics: None means nothing is ignored), ``label_smoothing`` (float),
  ``reduction`` ("none" | "sum" | "mean"), ``has_weight`` (bool), ``shape`` (class-last
  logits shape), ``torch_shape`` (the same in torch layout) and ``tag`` (a short label:
  "grid", "scaled", "neginf" or "all_ignored").
* ``torch_version``: 0-d unicode array, ``torch.__version__`` used.
* ``case{i}_logits``: float64, class-last, shape ``(N, ..., C)``.
* ``case{i}_labels``: int64 of shape ``(N, ...)`` for integer labels, or float64 of
  shape ``(N, ..., C)`` (class-last, same as logits) for soft targets.
* ``case{i}_weight``: float64 ``(C,)``, present only when ``has_weight``.
* ``case{i}_loss``: float64, shape ``(N, ...)`` for reduction "none", else 0-d.
* ``case{i}_grad``: float64, class-last, same shape as ``case{i}_logits``.

Only cases where torch's loss and gradient are all finite are kept (e.g. soft targets
with a ``-inf`` logit give NaN in torch, and "mean" over all-ignored labels gives NaN;
neither is stored).

torch is imported lazily inside :func:`main` so that ``pytest --doctest-modules`` can
import this module without torch installed.
"""

from __future__ import annotations

import itertools
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

SEED = 20240611
OUT_PATH = Path(__file__).resolve().parent / "data" / "torch_golden.npz"

N_VALUES = (1, 3, 7, 16)
C_VALUES = (2, 5, 11, 32)
# Extra spatial dims, torch layout (N, C, d1[, d2]).
EXTRA_SHAPES: tuple[tuple[int, ...], ...] = (
    (2, 5, 4),
    (3, 3, 6),
    (4, 11, 3),
    (1, 7, 5),
    (2, 4, 3, 2),
    (3, 6, 2, 3),
    (1, 2, 4, 4),
    (2, 9, 2, 2),
)
LABEL_SMOOTHINGS = (0.0, 0.1, 0.37, 1.0)
REDUCTIONS = ("none", "sum", "mean")
# "none": jaxlse ignore_index=None (torch default -100, no label takes it);
# "neg100": ignore_index=-100 with some labels -100; "class": a valid class index.
IGNORE_MODES = ("none", "neg100", "class")

Case = dict[str, Any]


def _torch_shapes(rng: np.random.Generator) -> list[tuple[int, ...]]:
    """All (N, C) grid shapes plus the extra-dim shapes, in shuffled order."""
    shapes: list[tuple[int, ...]] = [(n, c) for n in N_VALUES for c in C_VALUES]
    shapes += list(EXTRA_SHAPES)
    order = rng.permutation(len(shapes))
    return [shapes[i] for i in order]


def _make_logits(rng: np.random.Generator, shape: tuple[int, ...], tag: str) -> np.ndarray:
    logits = rng.normal(0.0, 2.0, size=shape)
    if tag == "scaled":
        logits = logits * 30.0 + 1e3
    return logits


def _make_int_labels(
    rng: np.random.Generator,
    torch_shape: tuple[int, ...],
    ignore_mode: str,
    all_ignored: bool,
) -> tuple[np.ndarray, int | None]:
    """Integer labels of shape torch_shape minus dim 1, and jaxlse ignore_index."""
    c = torch_shape[1]
    lshape = (torch_shape[0],) + torch_shape[2:]
    labels = rng.integers(0, c, size=lshape).astype(np.int64)
    if ignore_mode == "none":
        return labels, None
    ignore = -100 if ignore_mode == "neg100" else int(rng.choice([0, c - 1]))
    flat = labels.reshape(-1)
    if all_ignored:
        flat[:] = ignore
        return labels, ignore
    size = flat.size
    if ignore_mode == "class":
        # Avoid accidental extra ignores, then mark a random subset as ignored.
        others = [k for k in range(c) if k != ignore]
        flat[flat == ignore] = rng.choice(others, size=int((flat == ignore).sum()))
    if size >= 2:
        n_ign = int(rng.integers(1, size))  # at least one ignored, at least one kept
        idx = rng.choice(size, size=n_ign, replace=False)
        flat[idx] = ignore
    # size == 1: keep the single label (else "mean" would be NaN); ignore is a no-op.
    return labels, ignore


def _make_soft_targets(rng: np.random.Generator, torch_shape: tuple[int, ...]) -> np.ndarray:
    """Class-last probability rows: Dirichlet rows with some one-hot rows mixed in."""
    c = torch_shape[1]
    rows_shape = (torch_shape[0],) + torch_shape[2:]
    n_rows = int(np.prod(rows_shape))
    alpha = float(rng.choice([0.3, 1.0, 3.0]))
    rows = rng.dirichlet(np.full(c, alpha), size=n_rows)
    one_hot = rng.random(n_rows) < 0.3
    hot = rng.integers(0, c, size=n_rows)
    rows[one_hot] = 0.0
    rows[one_hot, hot[one_hot]] = 1.0
    return rows.reshape(*rows_shape, c)


def _insert_neginf(
    rng: np.random.Generator, logits_cl: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Put -inf at one non-label class in some rows (class-last logits)."""
    c = logits_cl.shape[-1]
    flat = logits_cl.reshape(-1, c).copy()
    lab = labels.reshape(-1)
    for r in range(flat.shape[0]):
        if rng.random() < 0.6 or r == 0:
            choices = [k for k in range(c) if k != lab[r]]
            flat[r, int(rng.choice(choices))] = -np.inf
    return flat.reshape(logits_cl.shape)


def _run_torch(
    case: Case, logits_cl: np.ndarray, labels: np.ndarray, weight: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Torch float64 loss and d(sum loss)/d(logits) (class-last)."""
    import torch
    import torch.nn.functional as F

    x = torch.tensor(np.moveaxis(logits_cl, -1, 1), dtype=torch.float64, requires_grad=True)
    if case["soft"]:
        target = torch.tensor(np.moveaxis(labels, -1, 1), dtype=torch.float64)
    else:
        target = torch.tensor(labels, dtype=torch.int64)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    ignore = -100 if case["ignore_index"] is None else case["ignore_index"]
    if case["fn"] == "cross_entropy":
        loss = F.cross_entropy(
            x,
            target,
            weight=w,
            ignore_index=ignore,
            reduction=case["reduction"],
            label_smoothing=case["label_smoothing"],
        )
    else:
        loss = F.nll_loss(
            F.log_softmax(x, dim=1),
            target,
            weight=w,
            ignore_index=ignore,
            reduction=case["reduction"],
        )
    loss.sum().backward()
    assert x.grad is not None
    grad = np.moveaxis(x.grad.numpy(), 1, -1).copy()
    return loss.detach().numpy().copy(), grad


def _specs(rng: np.random.Generator) -> list[Case]:
    """The list of case specifications (without data)."""
    specs: list[Case] = []

    def add(fn: str, soft: bool, ignore_mode: str, ls: float, red: str, hw: bool, tag: str):
        specs.append(
            {
                "fn": fn,
                "soft": soft,
                "ignore_mode": ignore_mode,
                "label_smoothing": ls,
                "reduction": red,
                "has_weight": hw,
                "tag": tag,
            }
        )

    for _sweep in range(2):
        for hw, mode, ls, red in itertools.product(
            (False, True), IGNORE_MODES, LABEL_SMOOTHINGS, REDUCTIONS
        ):
            add("cross_entropy", False, mode, ls, red, hw, "grid")
        for hw, ls, red in itertools.product((False, True), LABEL_SMOOTHINGS, REDUCTIONS):
            add("cross_entropy", True, "none", ls, red, hw, "grid")
        for hw, mode, red in itertools.product((False, True), IGNORE_MODES, REDUCTIONS):
            add("nll_loss", False, mode, 0.0, red, hw, "grid")

    # Large scale + offset logits.
    for hw, ls, red in itertools.product((False, True), LABEL_SMOOTHINGS, REDUCTIONS):
        add("cross_entropy", False, str(rng.choice(IGNORE_MODES)), ls, red, hw, "scaled")
        add("cross_entropy", True, "none", ls, red, hw, "scaled")
    for hw, red in itertools.product((False, True), REDUCTIONS):
        add("nll_loss", False, str(rng.choice(IGNORE_MODES)), 0.0, red, hw, "scaled")

    # -inf logits at a non-label class (torch is finite only for integer labels without
    # label smoothing; the others are generated and dropped by the finiteness filter).
    for hw, mode, red in itertools.product((False, True), IGNORE_MODES, REDUCTIONS):
        add("cross_entropy", False, mode, 0.0, red, hw, "neginf")
        add("nll_loss", False, mode, 0.0, red, hw, "neginf")
    for hw, red in itertools.product((False, True), REDUCTIONS):
        add("cross_entropy", False, "none", 0.1, red, hw, "neginf")
        add("cross_entropy", True, "none", 0.0, red, hw, "neginf")

    # All labels ignored ("mean" is NaN in torch and is deliberately left out).
    for hw, mode, red in itertools.product((False, True), ("neg100", "class"), ("none", "sum")):
        for ls in (0.0, 0.37):
            add("cross_entropy", False, mode, ls, red, hw, "all_ignored")
        add("nll_loss", False, mode, 0.0, red, hw, "all_ignored")
    return specs


def main() -> None:
    import torch

    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(SEED)
    specs = _specs(rng)
    shapes = _torch_shapes(rng)

    arrays: dict[str, np.ndarray] = {}
    meta: list[dict[str, Any]] = []
    dropped = 0
    for k, spec in enumerate(specs):
        torch_shape = shapes[k % len(shapes)]
        c = torch_shape[1]
        logits_t = _make_logits(rng, torch_shape, spec["tag"])
        logits_cl = np.moveaxis(logits_t, 1, -1).copy()
        if spec["soft"]:
            labels = _make_soft_targets(rng, torch_shape)
            ignore_index: int | None = None
            if spec["tag"] == "neginf":
                # Row 0 one-hot with -inf at a class whose target is 0. Torch returns
                # NaN (0 * -inf), so the finiteness filter drops these cases.
                flat_l = logits_cl.reshape(-1, c)
                flat_t = labels.reshape(-1, c)
                flat_t[0] = 0.0
                flat_t[0, c - 1] = 1.0
                flat_l[0, 0] = -np.inf
        else:
            labels, ignore_index = _make_int_labels(
                rng, torch_shape, spec["ignore_mode"], spec["tag"] == "all_ignored"
            )
            if spec["tag"] == "neginf":
                logits_cl = _insert_neginf(rng, logits_cl, labels)
        weight = rng.uniform(0.1, 3.0, size=c) if spec["has_weight"] else None

        case: Case = {
            "fn": spec["fn"],
            "soft": spec["soft"],
            "ignore_index": ignore_index,
            "label_smoothing": spec["label_smoothing"],
            "reduction": spec["reduction"],
            "has_weight": spec["has_weight"],
            "shape": list(logits_cl.shape),
            "torch_shape": list(torch_shape),
            "tag": spec["tag"],
        }
        loss, grad = _run_torch(case, logits_cl, labels, weight)
        if not (np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))):
            dropped += 1
            continue

        i = len(meta)
        arrays[f"case{i}_logits"] = logits_cl
        arrays[f"case{i}_labels"] = labels
        if weight is not None:
            arrays[f"case{i}_weight"] = weight
        arrays[f"case{i}_loss"] = np.asarray(loss, dtype=np.float64)
        arrays[f"case{i}_grad"] = grad
        meta.append(case)

    arrays["meta"] = np.array(json.dumps(meta))
    arrays["torch_version"] = np.array(str(torch.__version__))
    _write_npz(OUT_PATH, arrays)
    print(f"wrote {len(meta)} cases ({dropped} non-finite dropped) to {OUT_PATH}")


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but byte-for-byte reproducible (fixed zip timestamps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


if __name__ == "__main__":
    main()

"""Train a small MLP on scikit-learn's handwritten digits with ``jaxlse.cross_entropy``.

What this example shows, end to end, on a laptop CPU in a few seconds:

* the loss: :func:`jaxlse.cross_entropy` used as a drop-in training objective with
  label smoothing and a small z-loss (``z_loss * logsumexp(logits) ** 2`` per example,
  which keeps the logits from drifting), and again without either as the test NLL;
* a plain-JAX MLP (no framework) whose parameters come from a seed, trained with
  ``optax.adamw`` on a warmup-cosine learning-rate schedule through one ``jax.jit``-compiled
  train step;
* ``jax.vmap`` in real use: after training, the loss and the gradient norm of *every single
  training example* are computed by vmapping a one-example loss (and its gradient) over the
  training set, and the hardest examples are reported -- the custom derivative rules of
  ``jaxlse`` batch like any other JAX function;
* a tqdm progress bar over epochs, a final summary, and a PNG of the loss and accuracy curves
  (plus the hardest training digits) written to ``--out``, with the metrics as JSON beside it.

The data set is ``sklearn.datasets.load_digits`` (1797 8x8 images, 10 classes), which ships
inside scikit-learn, so nothing is downloaded.  The train/test split is fixed (it does not
depend on ``--seed``); ``--seed`` sets the parameter initialisation and the batch order, and
the same seed gives the same numbers.

Run it from the repository root::

    python examples/train_classifier.py                 # defaults: ~0.98 test accuracy
    python examples/train_classifier.py --epochs 5 --seed 1 --out /tmp/digits.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxlse

Params = list[dict[str, jax.Array]]
Batch = tuple[jax.Array, jax.Array]

SPLIT_SEED = 0  # the train/test split is the same for every --seed
TEST_FRACTION = 0.25
PIXEL_MAX = 16.0  # load_digits pixel intensities are integers in 0..16
HIDDEN_SIZES = (256, 256)
LABEL_SMOOTHING = 0.1
Z_LOSS = 1e-4
WEIGHT_DECAY = 1e-4
WARMUP_FRACTION = 0.1
N_HARDEST = 8
PER_EXAMPLE_CHUNK = 128  # examples per vmapped chunk when computing per-example gradients


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_classifier.py",
        description=(
            "Train a small JAX MLP on scikit-learn's 8x8 handwritten digits with "
            "jaxlse.cross_entropy (label smoothing + z-loss), then report train/test accuracy, "
            "test NLL and the hardest training examples (per-example losses via jax.vmap)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=_positive_int, default=30, help="passes over the data")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for parameter init and batch order"
    )
    parser.add_argument(
        "--lr", type=_positive_float, default=1e-2, help="peak learning rate (adamw)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="minibatch size")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/train_classifier.png"),
        help="where to write the plot; the metrics go to the same path with a .json suffix",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    return parser


def _check_writable(path: Path) -> str | None:
    """Return why ``path`` cannot be written, or None if it can (leaving nothing behind)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as err:
        return err.strerror or str(err)
    return None


def _validate_out(parser: argparse.ArgumentParser, out: Path) -> Path:
    """Check the plot and JSON paths up front, so a bad path fails before any training."""
    suffix = out.suffix.lower().lstrip(".")
    supported = FigureCanvasAgg.get_supported_filetypes()
    if suffix not in supported or suffix == "json":
        choices = ", ".join(sorted(supported))
        parser.error(f"--out {str(out)!r}: need an image file name ending in one of: {choices}")
    for path in (out, out.with_suffix(".json")):
        problem = _check_writable(path)
        if problem is not None:
            parser.error(f"--out {str(out)!r}: cannot write {str(path)!r}: {problem}")
    return out


# --------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits, split with a fixed seed and scaled to [0, 1].

    The pixels are intensities in 0..16, so they are divided by that known range (fitting no
    statistics, so nothing leaks from the test set; a per-pixel standardisation blows rare
    pixels up to huge values and generalises worse here).  Returns ``x_train, y_train,
    x_test, y_test, train_index`` where ``train_index`` maps a training row back to its index
    in ``load_digits()``.
    """
    digits = load_digits()
    x = (digits.data / PIXEL_MAX).astype(np.float32)
    y = digits.target.astype(np.int32)
    index = np.arange(len(y))
    x_train, x_test, y_train, y_test, train_index, _ = train_test_split(
        x, y, index, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return x_train, y_train, x_test, y_test, train_index


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> Params:
    """He-normal weights and zero biases for a ``sizes[0] -> ... -> sizes[-1]`` MLP."""
    params: Params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (fan_in, fan_out), jnp.float32) * math.sqrt(2.0 / fan_in)
        params.append({"w": w, "b": jnp.zeros((fan_out,), jnp.float32)})
    return params


def mlp(params: Params, x: jax.Array) -> jax.Array:
    """Logits of shape ``(batch, n_classes)`` for inputs of shape ``(batch, n_features)``.

    The bias is broadcast explicitly, so this also runs under
    ``jax_numpy_rank_promotion="raise"`` (which the test-suite turns on).
    """
    for layer in params[:-1]:
        x = jax.nn.gelu(x @ layer["w"] + layer["b"][None, :])
    return x @ params[-1]["w"] + params[-1]["b"][None, :]


def training_loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """The objective: mean smoothed cross-entropy plus z-loss over a batch."""
    logits = mlp(params, x)
    return jaxlse.cross_entropy(logits, y, label_smoothing=LABEL_SMOOTHING, z_loss=Z_LOSS)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def make_train_step(
    optimizer: optax.GradientTransformation,
) -> Callable[[Params, optax.OptState, jax.Array, jax.Array], tuple[Params, Any, jax.Array]]:
    @jax.jit
    def train_step(
        params: Params, opt_state: optax.OptState, x: jax.Array, y: jax.Array
    ) -> tuple[Params, optax.OptState, jax.Array]:
        loss, grads = jax.value_and_grad(training_loss)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


@jax.jit
def evaluate(params: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Accuracy and plain (unsmoothed, no z-loss) mean negative log-likelihood."""
    logits = mlp(params, x)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return accuracy, jaxlse.cross_entropy(logits, y)


def _example_loss(params: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Training objective of ONE example (x: (n_features,), y: scalar class index).

    Also returns, as auxiliary output, the example's plain NLL ``-log p(label)``.
    """
    logits = mlp(params, x[None])
    objective = jaxlse.cross_entropy(
        logits, y[None], label_smoothing=LABEL_SMOOTHING, z_loss=Z_LOSS
    )
    return objective, jaxlse.cross_entropy(logits, y[None])


def _example_stats(
    params: Params, x: jax.Array, y: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    (objective, nll), grads = jax.value_and_grad(_example_loss, has_aux=True)(params, x, y)
    sq = sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads))
    return nll, objective, jnp.sqrt(sq)


@jax.jit
def per_example_stats(
    params: Params, x: jax.Array, y: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-example NLL, objective and objective-gradient norm, via ``jax.vmap``.

    ``jax.vmap`` turns the one-example functions above into batched ones.  Each example has
    its own full parameter-sized gradient, so the set is processed in vmapped chunks of
    ``PER_EXAMPLE_CHUNK`` examples (``lax.map`` over chunks) to bound memory.
    """
    n = x.shape[0]
    n_chunks = -(-n // PER_EXAMPLE_CHUNK)
    pad = n_chunks * PER_EXAMPLE_CHUNK - n
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(n_chunks, PER_EXAMPLE_CHUNK, -1)
    ys = jnp.pad(y, (0, pad)).reshape(n_chunks, PER_EXAMPLE_CHUNK)
    vmapped = jax.vmap(_example_stats, in_axes=(None, 0, 0))
    stats = jax.lax.map(lambda chunk: vmapped(params, *chunk), (xs, ys))
    nll, objective, grad_norm = (s.reshape(-1)[:n] for s in stats)
    return nll, objective, grad_norm


def train(
    args: argparse.Namespace,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> tuple[Params, dict[str, list[float]]]:
    n_train = x_train.shape[0]
    steps_per_epoch = n_train // args.batch_size  # the last partial batch is dropped
    total_steps = steps_per_epoch * args.epochs
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.lr,
        warmup_steps=max(1, int(WARMUP_FRACTION * total_steps)),
        decay_steps=total_steps,
        end_value=args.lr * 1e-2,
    )
    init_key, shuffle_key = jax.random.split(jax.random.key(args.seed))
    params = init_mlp(init_key, (x_train.shape[1], *HIDDEN_SIZES, 10))
    # No weight decay on biases.
    decay_mask = jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
    optimizer = optax.adamw(schedule, weight_decay=WEIGHT_DECAY, mask=decay_mask)
    opt_state = optimizer.init(params)
    train_step = make_train_step(optimizer)

    xtr, ytr = jnp.asarray(x_train), jnp.asarray(y_train)
    xte, yte = jnp.asarray(x_test), jnp.asarray(y_test)
    history: dict[str, list[float]] = {
        key: [] for key in ("train_loss", "train_acc", "train_nll", "test_acc", "test_nll")
    }
    history["step_loss"] = []

    bar = tqdm(range(1, args.epochs + 1), desc="epochs", unit="epoch", disable=args.no_progress)
    for _epoch in bar:
        shuffle_key, sub = jax.random.split(shuffle_key)
        order = jax.random.permutation(sub, n_train)
        step_losses = []
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            params, opt_state, loss = train_step(params, opt_state, xtr[idx], ytr[idx])
            step_losses.append(loss)
        losses = np.asarray(jax.device_get(jnp.stack(step_losses)), dtype=np.float64)
        train_acc, train_nll = evaluate(params, xtr, ytr)
        test_acc, test_nll = evaluate(params, xte, yte)
        history["step_loss"].extend(losses.tolist())
        history["train_loss"].append(float(losses.mean()))
        history["train_acc"].append(float(train_acc))
        history["train_nll"].append(float(train_nll))
        history["test_acc"].append(float(test_acc))
        history["test_nll"].append(float(test_nll))
        bar.set_postfix(loss=f"{losses.mean():.4f}", test_acc=f"{float(test_acc):.4f}")
    bar.close()
    return params, history


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def save_plot(
    out: Path,
    history: dict[str, list[float]],
    hardest_images: np.ndarray,
    hardest_titles: list[str],
) -> None:
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.2, 1])
    ax_loss, ax_acc = top.subplots(1, 2)
    ax_loss.plot(epochs, history["train_loss"], label="train objective (smoothed + z-loss)")
    ax_loss.plot(epochs, history["train_nll"], label="train NLL")
    ax_loss.plot(epochs, history["test_nll"], label="test NLL")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, history["train_acc"], label="train")
    ax_acc.plot(epochs, history["test_acc"], label="test")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title(f"accuracy (final test {history['test_acc'][-1]:.4f})")
    ax_acc.legend()
    bottom.suptitle("hardest training examples: lowest p(label), per-example NLL via jax.vmap")
    axes = bottom.subplots(1, max(1, len(hardest_images)), squeeze=False)[0]
    for ax, image, title in zip(axes, hardest_images, hardest_titles, strict=False):
        ax.imshow(image.reshape(8, 8), cmap="gray_r")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    fig.savefig(out, dpi=100)


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    out = _validate_out(parser, args.out)

    x_train, y_train, x_test, y_test, train_index = load_data()
    if args.batch_size > x_train.shape[0]:
        parser.error(
            f"argument --batch-size: must be at most the training-set size {x_train.shape[0]}"
        )
    print(
        f"digits: {x_train.shape[0]} train / {x_test.shape[0]} test examples, "
        f"{x_train.shape[1]} features, 10 classes; MLP {HIDDEN_SIZES}, seed {args.seed}"
    )

    params, history = train(args, x_train, y_train, x_test, y_test)

    # Per-example losses and gradient norms over the whole training set, with jax.vmap.
    nll, objective, grad_norms = jax.device_get(
        per_example_stats(params, jnp.asarray(x_train), jnp.asarray(y_train))
    )
    preds = np.asarray(jnp.argmax(mlp(params, jnp.asarray(x_train)), axis=-1))
    hardest = np.argsort(-nll, kind="stable")[:N_HARDEST]  # least p(label) first

    n_train, n_test = len(y_train), len(y_test)
    train_acc, test_acc = history["train_acc"][-1], history["test_acc"][-1]
    print(f"train accuracy : {train_acc:.4f} ({round(train_acc * n_train)}/{n_train})")
    print(f"test accuracy  : {test_acc:.4f} ({round(test_acc * n_test)}/{n_test})")
    print(f"test NLL       : {history['test_nll'][-1]:.4f}")
    print(
        f"per-example training NLL: mean {nll.mean():.4f}, max {nll.max():.4f}; "
        f"objective-gradient norm: mean {grad_norms.mean():.4f}, max {grad_norms.max():.4f}"
    )
    print(f"hardest {len(hardest)} training examples (per-example, via jax.vmap):")
    print("  digit#  label  pred  p(label)     NLL  objective  |grad|")
    titles = []
    for i in hardest:
        label, pred = int(y_train[i]), int(preds[i])
        print(
            f"  {int(train_index[i]):6d}  {label:5d}  {pred:4d}  {math.exp(-nll[i]):8.4f}"
            f"  {nll[i]:6.3f}  {objective[i]:9.3f}  {grad_norms[i]:6.3f}"
        )
        titles.append(
            f"#{int(train_index[i])}: {label}, pred {pred}\np(label)={math.exp(-nll[i]):.2f}"
        )

    save_plot(out, history, x_train[hardest], titles)
    metrics = {
        "config": {
            "epochs": args.epochs,
            "seed": args.seed,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "hidden_sizes": list(HIDDEN_SIZES),
            "label_smoothing": LABEL_SMOOTHING,
            "z_loss": Z_LOSS,
        },
        "final": {
            "train_acc": history["train_acc"][-1],
            "train_nll": history["train_nll"][-1],
            "test_acc": history["test_acc"][-1],
            "test_nll": history["test_nll"][-1],
            "per_example_train_nll_mean": float(nll.mean()),
            "per_example_train_objective_mean": float(objective.mean()),
        },
        "history": history,
        "hardest": [
            {
                "digit_index": int(train_index[i]),
                "label": int(y_train[i]),
                "pred": int(preds[i]),
                "nll": float(nll[i]),
                "objective": float(objective[i]),
                "grad_norm": float(grad_norms[i]),
            }
            for i in hardest
        ],
    }
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(metrics, indent=2) + "\n")
    elapsed = time.perf_counter() - start
    print(f"wrote {out} and {json_path} ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

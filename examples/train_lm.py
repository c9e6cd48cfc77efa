"""Train a small word-level language model on Python's standard library with
``jaxlse.linear_cross_entropy``.

What this example shows, on a laptop CPU in a few minutes:

* the loss of a language-model head, ``linear_cross_entropy(h, w, targets, bias=b)``, which
  never forms the (tokens, vocabulary) logits: with a 32768-word vocabulary the compiled
  training step's loss needs a small fraction of the temporary memory of
  ``optax.softmax_cross_entropy_with_integer_labels(h @ w + b, targets)`` (the script prints
  both, from XLA's compiled memory analysis at the example's shape);
* a small decoder-only transformer in plain JAX (token and position embeddings, pre-norm
  blocks of causal self-attention and a GELU MLP), trained with ``optax.adamw`` on a
  warmup-cosine schedule through one ``jax.jit``-compiled step, with a small z-loss;
* a tqdm progress bar with the loss and tokens per second, a PNG of the training and
  validation loss at ``--out`` (the numbers as JSON beside it), and a few lines of "Python"
  sampled from the trained model.

The text is on every machine: the source files of Python's own standard library (the
``stdlib`` path of :mod:`sysconfig`, without its test suites and ``site-packages``), split
into words (identifiers, numbers, single punctuation characters and line breaks). The
``--vocab-size`` most frequent words (32768 by default) form the vocabulary, the others become
``<unk>``; the last 5 % of the token stream is held out for validation. Nothing is downloaded.
``--seed`` sets the initialisation, the batches and the sampling: the same seed gives the same
numbers.

Run it from the repository root::

    python examples/train_lm.py                    # defaults: about 2 minutes on 2 cores
    python examples/train_lm.py --steps 400 --dim 192 --out /tmp/lm.png
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys
import sysconfig
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

import jaxlse

Params = dict[str, Any]

# Identifiers, numbers, line breaks and any other single non-space character.
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\n|[^\sA-Za-z0-9_]")
UNK = "<unk>"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
VALIDATION_FRACTION = 0.05
MIN_VOCAB = 16
Z_LOSS = 1e-4
WEIGHT_DECAY = 0.1
WARMUP_FRACTION = 0.1
EVAL_BATCHES = 8
PROMPTS = ("def __init__(self", "for i in range(", "if not isinstance(", "return self.",
           "import", "raise")
SAMPLE_TOKENS = 24
TEMPERATURE = 0.7
TOP_K = 10


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
        prog="train_lm.py",
        description=(
            "Train a small decoder-only transformer on the words of Python's standard library "
            "with jaxlse.linear_cross_entropy (the logits are never materialised), then print "
            "the validation loss, the loss step's memory against the materialised logits, and "
            "a few sampled lines."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=_positive_int, default=100, help="training steps")
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per step")
    parser.add_argument("--context", type=_positive_int, default=64, help="tokens per sequence")
    parser.add_argument("--dim", type=_positive_int, default=128, help="model width d")
    parser.add_argument("--heads", type=_positive_int, default=4, help="attention heads")
    parser.add_argument("--layers", type=_positive_int, default=2, help="transformer blocks")
    parser.add_argument(
        "--vocab-size", type=_positive_int, default=32768,
        help=f"words in the vocabulary (the most frequent; at least {MIN_VOCAB})",
    )
    parser.add_argument("--lr", type=_positive_float, default=6e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for init, batches, sampling")
    parser.add_argument(
        "--max-files", type=_positive_int, default=None,
        help="read only the first this many standard-library files (default: all)",
    )
    parser.add_argument(
        "--chunk-size", type=_positive_int, default=None,
        help="classes per chunk of linear_cross_entropy (default: its own choice)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/train_lm.png"),
        help="where to write the loss curve; the metrics go to the same path with .json",
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


def _validate_shape(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.dim % args.heads:
        parser.error(f"argument --heads: must divide --dim {args.dim}, got {args.heads}")
    if args.vocab_size < MIN_VOCAB:
        parser.error(f"argument --vocab-size: must be at least {MIN_VOCAB}, got {args.vocab_size}")
    if args.context < 2:
        parser.error(f"argument --context: must be at least 2, got {args.context}")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The standard library's ``.py`` files in a fixed (sorted) order, without test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files[:max_files]


def load_corpus(
    vocab_size: int, max_files: int | None = None
) -> tuple[list[str], np.ndarray, int]:
    """``(vocab, token_ids, n_files)``: word ids of the concatenated files (int32).

    The vocabulary is ``<unk>`` and then the most frequent words (ties by the word itself),
    ``vocab_size`` in all, or fewer if the text has fewer distinct words.
    """
    files = stdlib_files(max_files)
    words: list[str] = []
    for path in files:
        words += WORD.findall(path.read_text(encoding="utf-8", errors="replace"))
    counts = collections.Counter(words)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - 1]
    vocab = [UNK] + [w for w, _ in ranked]
    index = {w: i for i, w in enumerate(vocab)}
    ids = np.fromiter((index.get(w, 0) for w in words), dtype=np.int32, count=len(words))
    return vocab, ids, len(files)


def detokenize(words: list[str]) -> str:
    """Words back to a line of code: no space before closing brackets, commas, dots and
    colons, none after opening brackets and dots."""
    out = ""
    for word in words:
        glued = word in ")]},.:" or (word in "([" and (out[-1:].isalnum() or out[-1:] == "_"))
        if out and not (glued or out[-1] in "([{."):
            out += " "
        out += word
    return out


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def init_params(key: jax.Array, vocab: int, dim: int, layers: int, context: int) -> Params:
    """Normal(0, 0.02) weights, residual projections scaled by 1/sqrt(2 * layers) (GPT-2)."""
    keys = iter(jax.random.split(key, 4 + 4 * layers))

    def normal(shape: tuple[int, ...], scale: float = 0.02) -> jax.Array:
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    def norm() -> dict[str, jax.Array]:
        return {"g": jnp.ones((dim,), jnp.float32), "b": jnp.zeros((dim,), jnp.float32)}

    proj_scale = 0.02 / math.sqrt(2 * layers)
    blocks = [
        {
            "ln1": norm(),
            "qkv": normal((dim, 3 * dim)),
            "proj": normal((dim, dim), proj_scale),
            "ln2": norm(),
            "mlp_in": normal((dim, 4 * dim)),
            "mlp_out": normal((4 * dim, dim), proj_scale),
        }
        for _ in range(layers)
    ]
    return {
        "embed": normal((vocab, dim)),
        "pos": normal((context, dim)),
        "blocks": blocks,
        "ln_f": norm(),
        "head_w": normal((dim, vocab)),
        "head_b": jnp.zeros((vocab,), jnp.float32),
    }


def layer_norm(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    shape = (1,) * (x.ndim - 1) + (-1,)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["g"].reshape(shape) + p["b"].reshape(shape)


def hidden(params: Params, tokens: jax.Array, heads: int) -> jax.Array:
    """The final hidden states, shape ``(batch, time, dim)``, for tokens ``(batch, time)``."""
    batch, length = tokens.shape
    dim = params["pos"].shape[1]
    x = params["embed"][tokens] + params["pos"][None, :length]
    for blk in params["blocks"]:
        q, k, v = jnp.split(layer_norm(x, blk["ln1"]) @ blk["qkv"], 3, axis=-1)
        q, k, v = (t.reshape(batch, length, heads, dim // heads) for t in (q, k, v))
        att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + att.reshape(batch, length, dim) @ blk["proj"]
        x = x + jax.nn.gelu(layer_norm(x, blk["ln2"]) @ blk["mlp_in"]) @ blk["mlp_out"]
    return layer_norm(x, params["ln_f"])


def loss_fn(
    params: Params, tokens: jax.Array, targets: jax.Array, heads: int, chunk: int | None,
    z_loss: float = Z_LOSS,
) -> jax.Array:
    """Mean next-word cross-entropy (plus z-loss) from the hidden states, logits never formed."""
    h = hidden(params, tokens, heads)
    return jaxlse.linear_cross_entropy(
        h, params["head_w"], targets, bias=params["head_b"], z_loss=z_loss, chunk_size=chunk
    )


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def make_train_step(
    optimizer: optax.GradientTransformation, heads: int, chunk: int | None
) -> Callable[..., tuple[Params, Any, jax.Array]]:
    @jax.jit
    def train_step(params: Params, opt_state: Any, tokens: jax.Array, targets: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets, heads, chunk)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def batches(ids: np.ndarray, rng: np.random.Generator, batch: int, context: int) -> np.ndarray:
    """``batch`` random windows of ``context + 1`` consecutive tokens."""
    starts = rng.integers(0, len(ids) - context - 1, batch)
    return np.stack([ids[s : s + context + 1] for s in starts])


def evaluate(
    params: Params, ids: np.ndarray, args: argparse.Namespace, eval_loss: Callable[..., Any]
) -> float:
    """Mean validation cross-entropy (no z-loss) over fixed windows."""
    rng = np.random.default_rng(12345)  # the same windows at every evaluation and seed
    losses = [
        float(eval_loss(params, w[:, :-1], w[:, 1:]))
        for w in (batches(ids, rng, args.batch_size, args.context) for _ in range(EVAL_BATCHES))
    ]
    return float(np.mean(losses))


def train(
    args: argparse.Namespace, train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int
) -> tuple[Params, dict[str, list[float]]]:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.lr,
        warmup_steps=max(1, int(WARMUP_FRACTION * args.steps)),
        decay_steps=args.steps,
        end_value=args.lr * 0.1,
    )
    key = jax.random.key(args.seed)
    params = init_params(key, vocab_size, args.dim, args.layers, args.context)
    # No weight decay on biases, norms and embeddings' positions (vectors).
    decay_mask = jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=WEIGHT_DECAY, mask=decay_mask),
    )
    opt_state = optimizer.init(params)
    train_step = make_train_step(optimizer, args.heads, args.chunk_size)
    eval_loss = jax.jit(partial(loss_fn, heads=args.heads, chunk=args.chunk_size, z_loss=0.0))
    rng = np.random.default_rng(args.seed)
    history: dict[str, list[float]] = {"step_loss": [], "val_step": [], "val_loss": []}
    tokens_per_step = args.batch_size * args.context
    eval_every = max(1, args.steps // 4)

    bar = tqdm(range(1, args.steps + 1), desc="steps", unit="step", disable=args.no_progress)
    start = None
    for step in bar:
        window = batches(train_ids, rng, args.batch_size, args.context)
        params, opt_state, loss = train_step(
            params, opt_state, jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])
        )
        loss = float(loss)
        history["step_loss"].append(loss)
        if start is None:  # the first step includes compilation; rates count from here
            start, counted = time.perf_counter(), 0
        else:
            counted += tokens_per_step
        rate = counted / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        if step % eval_every == 0 or step == args.steps:
            history["val_step"].append(step)
            history["val_loss"].append(evaluate(params, val_ids, args, eval_loss))
    bar.close()
    history["tokens_per_second"] = [rate]
    return params, history


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def loss_memory(args: argparse.Namespace, vocab_size: int) -> dict[str, int]:
    """Compiled temp bytes of the head loss's value_and_grad at the example's shape, for
    linear_cross_entropy and for the materialised logits (compiled only, never run)."""
    n = args.batch_size * args.context
    shapes = (
        jax.ShapeDtypeStruct((n, args.dim), jnp.float32),
        jax.ShapeDtypeStruct((args.dim, vocab_size), jnp.float32),
        jax.ShapeDtypeStruct((vocab_size,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def ours(h, w, b, y):
        return jaxlse.linear_cross_entropy(h, w, y, bias=b, chunk_size=args.chunk_size)

    def materialised(h, w, b, y):
        return optax.softmax_cross_entropy_with_integer_labels(h @ w + b[None, :], y).mean()

    temps = {}
    for name, f in (("linear_cross_entropy", ours), ("materialised", materialised)):
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(*shapes).compile()
        temps[name] = int(compiled.memory_analysis().temp_size_in_bytes)
    return temps


def sample_lines(
    params: Params, vocab: list[str], args: argparse.Namespace
) -> list[str]:
    """One line per prompt: the prompt's words, then words sampled (temperature, top-k)
    until a line break."""
    index = {w: i for i, w in enumerate(vocab)}
    context, heads = args.context, args.heads

    @jax.jit
    def next_logits(params: Params, window: jax.Array, last: jax.Array) -> jax.Array:
        h = hidden(params, window[None], heads)[0, last]
        return h @ params["head_w"] + params["head_b"]

    key = jax.random.key(args.seed + 1)
    lines = []
    for prompt in PROMPTS:
        words = WORD.findall(prompt)
        ids = [index.get(w, 0) for w in words]
        for _ in range(SAMPLE_TOKENS):
            recent = ids[-context:]
            window = np.zeros(context, np.int32)
            window[: len(recent)] = recent
            logits = next_logits(params, jnp.asarray(window), jnp.asarray(len(recent) - 1))
            top, top_idx = jax.lax.top_k(logits / TEMPERATURE, TOP_K)
            key, sub = jax.random.split(key)
            choice = int(top_idx[jax.random.categorical(sub, top)])
            if vocab[choice] == "\n":
                break
            ids.append(choice)
            words.append(vocab[choice])
        lines.append(detokenize(words))
    return lines


def save_plot(out: Path, history: dict[str, list[float]], vocab_size: int) -> None:
    steps = np.arange(1, len(history["step_loss"]) + 1)
    losses = np.asarray(history["step_loss"])
    width = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(steps, losses, alpha=0.3, label="train (per step, with z-loss)")
    ax.plot(steps[width - 1 :], smooth, label=f"train ({width}-step mean)")
    ax.plot(history["val_step"], history["val_loss"], "o-", label="validation")
    uniform = math.log(vocab_size)
    ax.axhline(uniform, color="gray", ls=":", label=f"uniform: log V = {uniform:.1f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per word)")
    ax.set_title("word-level LM on the Python standard library, jaxlse.linear_cross_entropy")
    ax.legend()
    fig.savefig(out, dpi=100)


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate_shape(parser, args)
    out = _validate_out(parser, args.out)

    vocab, ids, n_files = load_corpus(args.vocab_size, args.max_files)
    split = int(len(ids) * (1 - VALIDATION_FRACTION))
    train_ids, val_ids = ids[:split], ids[split:]
    if len(val_ids) <= args.context + 1:
        parser.error(
            f"argument --context: must be below the validation set's {len(val_ids) - 1} "
            f"tokens, got {args.context} (read more files: --max-files)"
        )
    unk = float(np.mean(ids == 0))
    print(
        f"corpus: {n_files} standard-library files, {len(ids):,} words "
        f"({len(train_ids):,} train / {len(val_ids):,} validation), vocabulary {len(vocab):,} "
        f"({unk:.1%} of the words are <unk>)"
    )
    print(
        f"model: {args.layers} blocks, d={args.dim}, {args.heads} heads, context "
        f"{args.context}; {args.batch_size * args.context:,} tokens per step, seed {args.seed}"
    )
    temps = loss_memory(args, len(vocab))
    ours_mib, mat_mib = (temps[k] / 2**20 for k in ("linear_cross_entropy", "materialised"))
    print(
        f"loss step memory (value_and_grad of the head at {args.batch_size * args.context} "
        f"tokens x {len(vocab)} words, float32, compiled temp): linear_cross_entropy "
        f"{ours_mib:.1f} MiB, materialised logits {mat_mib:.1f} MiB "
        f"({mat_mib / max(ours_mib, 1e-9):.0f}x)"
    )

    params, history = train(args, train_ids, val_ids, len(vocab))
    lines = sample_lines(params, vocab, args)
    print(
        f"final: train loss {np.mean(history['step_loss'][-10:]):.3f} (last 10 steps), "
        f"validation {history['val_loss'][-1]:.3f} nats per word "
        f"(uniform: {math.log(len(vocab)):.3f}); {history['tokens_per_second'][0]:,.0f} tokens/s"
    )
    print("sampled lines:")
    for line in lines:
        print(f"  {line}")

    save_plot(out, history, len(vocab))
    metrics = {
        "config": {
            key: getattr(args, key)
            for key in ("steps", "batch_size", "context", "dim", "heads", "layers", "vocab_size",
                        "lr", "seed", "max_files", "chunk_size")
        },
        "corpus": {"files": n_files, "words": int(len(ids)), "vocab": len(vocab), "unk": unk},
        "loss_step_temp_bytes": temps,
        "history": history,
        "final": {"val_loss": history["val_loss"][-1],
                  "train_loss_last10": float(np.mean(history["step_loss"][-10:]))},
        "samples": lines,
    }
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {out} and {json_path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Smoke and bad-input tests for ``examples/train_classifier.py``.

The script is imported from its path and driven through ``main(argv)`` (so the pytest
warning filter, which turns warnings into errors, covers the whole training path), and run
once more as a real subprocess for the command-line entry point.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import jax
import pytest

for _dependency in ("optax", "sklearn", "tqdm", "matplotlib"):
    pytest.importorskip(_dependency, reason="the examples need the [examples] extra")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_classifier.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    if importlib.util.find_spec("jaxlse") is None:  # running from a source tree
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("train_classifier", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: ModuleType, out: Path, *extra: str) -> dict:
    # tests/conftest.py makes dtype promotion strict for the library's own tests; optax's adam
    # (bias correction: a Python float with the int32 step count) is not written for that, so
    # the example runs under JAX's default promotion, as for a user. Rank promotion stays
    # "raise", which the example and jaxlse both honour.
    argv = ["--epochs", "1", "--batch-size", "32", "--out", str(out), *extra]
    with jax.numpy_dtype_promotion("standard"):
        code = script.main(argv)
    assert code == 0
    return json.loads(out.with_suffix(".json").read_text())


def test_one_epoch_smoke(script: ModuleType, tmp_path: Path, capsys) -> None:
    out = tmp_path / "nested" / "dir" / "curves.png"  # parent directories are created
    metrics = _run(script, out, "--seed", "3")

    assert out.read_bytes()[:8] == PNG_MAGIC
    captured = capsys.readouterr()
    assert "epochs" in captured.err  # the tqdm progress bar
    assert "test accuracy" in captured.out and "test NLL" in captured.out

    # The loss falls over the epoch: 1347 // 32 = 42 steps.
    steps = metrics["history"]["step_loss"]
    assert len(steps) == 1347 // 32
    first, last = sum(steps[:5]) / 5, sum(steps[-5:]) / 5
    assert last < 0.7 * first, (first, last)

    final = metrics["final"]
    assert final["test_acc"] > 0.6  # well above chance (0.1) after one epoch
    assert 0.0 < final["test_nll"] < 2.3  # below log(10), the uniform prediction
    # The per-example NLLs from jax.vmap average to the batched train NLL.
    assert final["per_example_train_nll_mean"] == pytest.approx(final["train_nll"], rel=1e-4)
    config = metrics["config"]
    assert (config["epochs"], config["seed"], config["batch_size"]) == (1, 3, 32)
    hardest = metrics["hardest"]
    assert len(hardest) == script.N_HARDEST
    nlls = [h["nll"] for h in hardest]
    assert nlls == sorted(nlls, reverse=True)
    assert max(h["grad_norm"] for h in hardest) > 0.0


def test_same_seed_same_numbers(script: ModuleType, tmp_path: Path) -> None:
    a = _run(script, tmp_path / "a.png", "--seed", "7", "--no-progress")
    b = _run(script, tmp_path / "b.png", "--seed", "7", "--no-progress")
    c = _run(script, tmp_path / "c.png", "--seed", "8", "--no-progress")
    assert a == b
    assert a["history"]["step_loss"] != c["history"]["step_loss"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "-2"], "--epochs"),
        (["--epochs", "1.5"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-64"], "--batch-size"),
        (["--batch-size", "100000"], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-1e-3"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "fast"], "--lr"),
        (["--seed", "x"], "--seed"),
    ],
)
def test_bad_arguments(
    script: ModuleType, tmp_path: Path, capsys, monkeypatch, argv: list[str], message: str
) -> None:
    monkeypatch.setattr(script, "train", _must_not_train)
    out = tmp_path / "out" / "plot.png"
    with pytest.raises(SystemExit) as excinfo:
        script.main([*argv, "--out", str(out)])
    assert excinfo.value.code == 2
    _assert_one_line_error(capsys.readouterr().err, message)
    assert not out.exists()


def _must_not_train(*args: object, **kwargs: object) -> None:
    raise AssertionError("training started despite bad input")


def _assert_one_line_error(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("train_classifier.py: error:"), stderr
    assert message in errors[0], stderr


@pytest.mark.parametrize("case", ["parent_is_file", "out_is_directory", "bad_suffix", "json"])
def test_unwritable_output_fails_before_training(
    script: ModuleType, tmp_path: Path, capsys, monkeypatch, case: str
) -> None:
    monkeypatch.setattr(script, "train", _must_not_train)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = {
        "parent_is_file": blocker / "plot.png",
        "out_is_directory": tmp_path / "is_a_dir.png",
        "bad_suffix": tmp_path / "plot.notanimage",
        "json": tmp_path / "plot.json",
    }[case]
    if case == "out_is_directory":
        out.mkdir()
    with pytest.raises(SystemExit) as excinfo:
        script.main(["--out", str(out)])
    assert excinfo.value.code == 2
    _assert_one_line_error(capsys.readouterr().err, "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a_file"] + (["is_a_dir.png"] if case == "out_is_directory" else [])
    )


def _subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_line(tmp_path: Path) -> None:
    help_run = _subprocess("--help", cwd=tmp_path)
    assert help_run.returncode == 0, help_run.stderr
    for flag in ("--epochs", "--seed", "--lr", "--batch-size", "--out"):
        assert flag in help_run.stdout

    bad = _subprocess("--epochs", "0", cwd=tmp_path)
    assert bad.returncode == 2
    _assert_one_line_error(bad.stderr, "--epochs")
    assert "Warning" not in bad.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, not even results/


def test_train_lm_smoke(tmp_path: Path, capsys) -> None:
    """examples/train_lm.py with tiny settings: it trains, writes the curve and the metrics,
    samples lines, and stops bad input before training (with a one-line error)."""
    import math  # (this test is appended to the module; its imports stay as they were)

    if importlib.util.find_spec("jaxlse") is None:  # running from a source tree
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("train_lm", ROOT / "examples" / "train_lm.py")
    assert spec is not None and spec.loader is not None
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)

    out = tmp_path / "lm" / "curve.png"
    tiny = ["--steps", "3", "--batch-size", "2", "--context", "8", "--dim", "16", "--heads", "2",
            "--layers", "1", "--vocab-size", "512", "--max-files", "5", "--seed", "1"]
    with jax.numpy_dtype_promotion("standard"):  # optax's adamw, as in _run above
        assert lm.main([*tiny, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    metrics = json.loads(out.with_suffix(".json").read_text())
    captured = capsys.readouterr()
    assert "steps" in captured.err and "tok_s" in captured.err  # the tqdm progress bar
    assert "loss step memory" in captured.out and "materialised logits" in captured.out
    assert len(metrics["history"]["step_loss"]) == 3
    assert all(math.isfinite(v) for v in metrics["history"]["step_loss"])
    assert 0 < metrics["final"]["val_loss"] < 1.1 * math.log(512)
    assert metrics["corpus"]["vocab"] == 512 and metrics["corpus"]["files"] == 5
    temps = metrics["loss_step_temp_bytes"]
    assert temps["linear_cross_entropy"] > 0 and temps["materialised"] > 0
    samples = zip(metrics["samples"], lm.PROMPTS, strict=True)
    assert all(line.startswith(prompt.split()[0]) for line, prompt in samples)

    for argv, message in [(["--steps", "0"], "--steps"), (["--dim", "16", "--heads", "3"],
                          "--heads"), (["--vocab-size", "8"], "--vocab-size"),
                          (["--lr", "nan"], "--lr")]:
        bad = tmp_path / "bad" / "curve.png"
        with pytest.raises(SystemExit) as excinfo:
            lm.main([*argv, "--out", str(bad)])
        assert excinfo.value.code == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
        assert len(errors) == 1 and errors[0].startswith("train_lm.py: error:"), errors
        assert message in errors[0]
        assert not bad.exists()

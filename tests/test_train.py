"""Training: smoke run, kill-and-resume, atomic checkpoints, sharding, config errors."""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fractal_field as ff
import fractal_field._train as _train
from fractal_field._checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "mnist_nano.py") + ":smoke"
CIFAR_SMOKE = str(ROOT / "configs" / "cifar10_small.py") + ":smoke"


def _xla_flags(flag: str) -> str:
    """The XLA flags the tests run with (see conftest.py) plus `flag`, for a subprocess."""
    return f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def _params(model):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))]


def _steps(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_smoke_training_loss_falls(tmp_path):
    config = ff.load_config(SMOKE, ["epochs=6"])
    summary = ff.train(config, tmp_path)
    rows = _steps(tmp_path)
    assert len(rows) == 6 * (256 // 32)
    first = np.mean([r["loss"] for r in rows[:4]])
    last = np.mean([r["loss"] for r in rows[-4:]])
    assert last < 0.7 * first, (first, last)
    for key in ("fwd_steps", "fwd_residual", "bwd_steps", "step_time", "acc", "lr"):
        assert key in rows[0]
    # Every step is timed, checkpoint steps included (no near-zero artefacts).
    times = [r["step_time"] for r in rows[1:]]
    assert min(times) > 0.01 * np.median(times), (min(times), np.median(times))
    assert rows[-1]["bwd_steps"] > 0
    evals = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 6 and evals[-1]["accuracy"] > 0.5
    ckdir = tmp_path / "checkpoints"
    for name in ("last.eqx", "best.eqx", "epoch_000.eqx", "epoch_005.eqx"):
        assert (ckdir / name).exists() and (ckdir / (name + ".json")).exists()
    # Without `ema` a checkpoint holds exactly the model and the optimiser state.
    assert summary["ema_model"] is None
    model = _train.build_model(config, key=jax.random.PRNGKey(0))
    opt_state = _train.build_optimizer(config, 1)[0].init(eqx.filter(model, eqx.is_inexact_array))
    ff.load_checkpoint(ckdir / "last.eqx", (model, opt_state))
    # One-call loading rebuilds the same model.
    loaded = ff.load_model(ckdir / "last.eqx")
    for a, b in zip(_params(loaded), _params(summary["model"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cifar_smoke_planar_training_loss_falls(tmp_path):
    """The CIFAR config's path: encoder stem, batch solved in the planar layout, implicit
    gradients; with readout dropout."""
    config = ff.load_config(
        CIFAR_SMOKE,
        [
            "epochs=6",
            "data.train_size=256",
            "optim.lr=5e-2",
            "optim.warmup_epochs=0.5",
            "model.dropout=0.1",
        ],
    )
    assert config.model.batch_solve == "planar" and config.model.stem > 0
    summary = ff.train(config, tmp_path)
    rows = _steps(tmp_path)
    assert len(rows) == 6 * (256 // 32)
    first = np.mean([r["loss"] for r in rows[:3]])
    last = np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.7 * first, (first, last)
    assert rows[-1]["bwd_steps"] > 0  # implicit gradients: a backward solve ran
    assert summary["model"].batch_solve == "planar" and summary["model"].readout.dropout == 0.1


@pytest.mark.slow
def test_multiscale_training_checkpoints_and_reloads(tmp_path):
    """A multi-scale field (two coupled tori, the state a tuple of fields) with HRNet's head
    trains through the same script path, and its checkpoint rebuilds the same model in one
    call."""
    overrides = [
        "epochs=2",
        "data.train_size=256",
        "optim.lr=5e-2",
        "optim.warmup_epochs=0.5",
        "model.scales=2",
        "model.channels=4",
        "model.readout_pyramid=(2,2)",
        "model.readout_final=8",
        "model.readout_grid=4",
    ]
    summary = ff.train(ff.load_config(CIFAR_SMOKE, overrides), tmp_path)
    rows = _steps(tmp_path)
    first = np.mean([r["loss"] for r in rows[:3]])
    last = np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.7 * first, (first, last)
    loaded = ff.load_model(tmp_path / "checkpoints" / "last.eqx")
    assert isinstance(loaded.cell, ff.MultiScaleCell) and loaded.cell.channels == (4, 4)
    assert len(rows) == 2 * 256 // 32 and loaded.readout.pyramid is not None
    for a, b in zip(_params(loaded), _params(summary["model"]), strict=True):
        np.testing.assert_array_equal(a, b)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 8, 8))
    np.testing.assert_allclose(loaded.batched(x)[0], summary["model"].batched(x)[0], rtol=1e-6)


def test_real_twin_smoke_training_checkpoints_and_reloads(tmp_path):
    """The real-valued twin (`model.field=real`) trains through the script's path; its
    checkpoint rebuilds the same real model in one call."""
    config = ff.load_config(
        SMOKE,
        ["model.field=real", "model.channels=6", "epochs=1", "data.train_size=64"],
    )
    summary = ff.train(config, tmp_path, progress=False)
    rows = _steps(tmp_path)
    assert len(rows) == 64 // 32 and rows[-1]["bwd_steps"] > 0
    assert all(np.isfinite(r["loss"]) for r in rows)
    loaded = ff.load_model(tmp_path / "checkpoints" / "last.eqx")
    assert loaded.field == "real" and loaded.cell.channels == 6
    assert not any(np.iscomplexobj(a) for a in _params(loaded))
    # The same structure (static fields included) and bit-identical arrays.
    assert bool(eqx.tree_equal(loaded, summary["model"]))


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    config = ff.load_config(SMOKE, ["epochs=2"])
    full = ff.train(config, tmp_path / "full")
    # Stopped mid-epoch (step 6 of 8; the stop checkpoints), then resumed.
    out = ff.train(config, tmp_path / "split", stop_after_steps=6)
    assert out["stopped"] == "stop_after_steps"
    meta = json.loads((tmp_path / "split/checkpoints/last.eqx.json").read_text())
    assert meta["step"] == 6 and meta["epoch"] == 0 and meta["batch"] == 6
    # Ctrl-C during the evaluation that ends epoch 0 stops it at once; the resumed run
    # evaluates the same parameters again.
    evaluate = _train.evaluate

    def interrupted_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(_train, "evaluate", interrupted_evaluate)
    out = ff.train(config, tmp_path / "split")
    assert out["stopped"] == "SIGINT"
    meta = json.loads((tmp_path / "split/checkpoints/last.eqx.json").read_text())
    assert (meta["epoch"], meta["batch"], meta["step"]) == (0, 8, 8)
    assert not (tmp_path / "split/eval.jsonl").read_text()
    monkeypatch.setattr(_train, "evaluate", evaluate)
    resumed = ff.train(config, tmp_path / "split")
    assert resumed["stopped"] is None
    assert resumed["state"]["step"] == full["state"]["step"] == 16
    for a, b in zip(_params(resumed["model"]), _params(full["model"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    evals = [json.loads(x) for x in (tmp_path / "split/eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 1]


def _share_train_step(monkeypatch) -> None:
    """Every `ff.train` of the test gets the step compiled by the first (one config)."""
    make, made = _train.make_train_step, []

    def shared(*args, **kwargs):
        if not made:
            made.append(make(*args, **kwargs))
        return made[0]

    monkeypatch.setattr(_train, "make_train_step", shared)


def _prefetch_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "prefetch" and t.is_alive()]


def test_prefetching_trains_bit_identical_parameters(tmp_path, monkeypatch):
    _share_train_step(monkeypatch)
    base = ["epochs=2", "data.train_size=128"]
    runs = {}
    for ahead in (0, 2):
        config = ff.load_config(SMOKE, [*base, f"data.prefetch={ahead}"])
        runs[ahead] = ff.train(config, tmp_path / str(ahead), progress=False)
        assert not _prefetch_threads()
    for a, b in zip(_params(runs[0]["model"]), _params(runs[2]["model"]), strict=True):
        np.testing.assert_array_equal(a, b)
    losses = [[r["loss"] for r in _steps(tmp_path / str(ahead))] for ahead in (0, 2)]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    # A stop with batches prepared ahead: the thread ends, the stop saves the step it reached
    # and the resumed run trains the same parameters.
    config = ff.load_config(SMOKE, [*base, "data.prefetch=2"])
    out = ff.train(config, tmp_path / "split", stop_after_steps=3, progress=False)
    assert out["stopped"] == "stop_after_steps" and not _prefetch_threads()
    meta = json.loads((tmp_path / "split/checkpoints/last.eqx.json").read_text())
    assert (meta["epoch"], meta["batch"], meta["step"]) == (0, 3, 3)
    resumed = ff.train(config, tmp_path / "split", progress=False)
    assert resumed["state"]["step"] == 8
    for a, b in zip(_params(resumed["model"]), _params(runs[0]["model"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loop_overhead_benchmark_writes_its_results_file(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "loop_overhead", ROOT / "benchmarks" / "loop_overhead.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "loop_overhead.json"
    make = _train.make_train_step
    bench.main(["--smoke", "--out", str(out)])
    assert _train.make_train_step is make  # restored after timing it
    r = json.loads(out.read_text())
    assert r["command"] == f"python benchmarks/loop_overhead.py --smoke --out {out}"
    assert r["date"] and r["hardware"] and r["jax"] == jax.__version__
    assert (r["steps_per_run"], r["steps_compared"], r["repeats"]) == (4, 2, 1)
    # The loop with and without prefetching and the isolated steps trained the same model.
    assert r["same_parameters"] is True
    assert [row["prefetch"] for row in r["rows"]] == [0, 2]
    for row in r["rows"]:
        (rep,) = row["repeats"]
        assert row["overhead"] == rep["overhead"]
        # overhead: loop / isolated - 1 over the same steps.
        np.testing.assert_allclose(
            row["overhead"], row["loop_step_ms"] / row["isolated_step_ms"] - 1, rtol=1e-9
        )
        np.testing.assert_allclose(
            row["cpu_overhead"], row["loop_cpu_step_ms"] / row["isolated_cpu_step_ms"] - 1
        )
        assert row["isolated_step_ms"] > 0 and row["prepare_cpu_ms"] >= 0


def _inexact(model):
    return [
        np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    ]


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_label_smoothing_loss_is_the_smoothed_cross_entropy(smoothing):
    config = ff.load_config(SMOKE)
    model = _train.build_model(config, key=jax.random.PRNGKey(0))
    optimizer, _ = _train.build_optimizer(config, 8)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    ds = _train.synthetic_dataset(16)
    x, labels = np.asarray(ds.normalize(ds.images)), ds.labels
    logits = np.asarray(eqx.filter_jit(lambda m, x: m.batched(x)[0])(model, x), np.float64)
    # By hand: targets (1 - s) one_hot + s / K against the log-softmax.
    k = logits.shape[-1]
    targets = (1 - smoothing) * np.eye(k)[labels] + smoothing / k
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -(targets * logp).sum(-1).mean()
    step = _train.make_train_step(optimizer, None, label_smoothing=smoothing)
    _, _, metrics = step(jax.random.PRNGKey(1), model, opt_state, x, labels)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert float(metrics["acc"]) == np.mean(logits.argmax(-1) == labels)


def _record_params(monkeypatch) -> list:
    """Record the parameters before the first training step and after each step."""
    history = []
    make = _train.make_train_step

    def make_recording(*args, **kwargs):
        step = make(*args, **kwargs)

        def recorded(key, model, *rest):
            if not history:
                history.append(_inexact(model))  # before the step donates it
            out = step(key, model, *rest)
            history.append(_inexact(out[0]))
            return out

        return recorded

    monkeypatch.setattr(_train, "make_train_step", make_recording)
    return history


def test_ema_is_the_recurrence_resumes_exactly_and_is_evaluated(tmp_path, monkeypatch):
    decay = 0.5
    config = ff.load_config(SMOKE, ["epochs=2", "data.train_size=128", f"ema={decay}"])
    history = _record_params(monkeypatch)
    full = ff.train(config, tmp_path / "full", progress=False)
    assert len(history) == 1 + 8
    ema = history[0]
    for params in history[1:]:
        ema = [decay * e + (1 - decay) * p for e, p in zip(ema, params, strict=True)]
    got = _inexact(full["ema_model"])
    for a, b in zip(got, ema, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not all(np.array_equal(a, b) for a, b in zip(got, history[-1], strict=True))
    # The evaluations and `load_model` use the averaged model.
    ev = [json.loads(x) for x in (tmp_path / "full/eval.jsonl").read_text().splitlines()]
    test_ds = _train.load_data(config, "test")
    assert ev[-1]["accuracy"] == ff.evaluate(full["ema_model"], test_ds, batch_size=64)["accuracy"]
    for a, b in zip(
        _inexact(ff.load_model(tmp_path / "full/checkpoints/last.eqx")), got, strict=True
    ):
        np.testing.assert_array_equal(a, b)

    # Stopped mid-epoch and resumed: the same average as the uninterrupted run.
    assert ff.train(config, tmp_path / "split", stop_after_steps=3)["stopped"] is not None
    off = ff.load_config(SMOKE, ["epochs=2", "data.train_size=128"])
    with pytest.raises(ValueError, match="trained with ema=0.5 and cannot resume with ema=0"):
        ff.train(off, tmp_path / "split")
    resumed = ff.train(config, tmp_path / "split", progress=False)
    assert resumed["state"]["step"] == 8
    for a, b in zip(_inexact(resumed["ema_model"]), got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "override, match",
    [
        ("ema=1.0", r"ema=1.0 must be in \[0, 1\)"),
        ("ema=-0.1", r"ema=-0.1 must be in"),
        ("label_smoothing=1.0", r"label_smoothing=1.0 must be in \[0, 1\)"),
        ("label_smoothing=-0.2", r"label_smoothing=-0.2 must be in"),
        ("data.prefetch=-1", r"data.prefetch=-1 must be an int >= 0"),
        ("data.prefetch=1.5", r"data.prefetch=1.5 must be an int >= 0"),
    ],
)
def test_bad_recipe_values_fail_at_once(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        ff.train(ff.load_config(SMOKE, [override]), tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_bad_data_dir_fails_at_once_and_leaves_no_workdir(tmp_path, monkeypatch, capsys):
    """No tfds, no network, no workdir: through `ff.train` and `scripts/train.py` (which
    prints such errors in one line, without a traceback)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("tensorflow_datasets or the network was used")

    monkeypatch.setattr(ff.data.dataset, "load_tfds", forbidden)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    monkeypatch.setattr(socket, "create_connection", forbidden)
    monkeypatch.setattr(socket.socket, "connect", forbidden)
    missing = tmp_path / "no_such_dir"
    config = ff.load_config(str(ROOT / "configs" / "mnist_nano.py"), [f"data.data_dir={missing}"])
    with pytest.raises(ff.data.DataNotFoundError, match=f"{missing} does not exist"):
        ff.train(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "empty").mkdir()
    argv = ["--config", str(ROOT / "configs" / "mnist_nano.py"), "--workdir", str(tmp_path / "w")]
    assert script.main([*argv, "--data-dir", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: The data directory {tmp_path / 'empty'} holds no mnist")
    assert "Traceback" not in err and not (tmp_path / "w").exists()
    # A checkpoint without its metadata is reported in one line too.
    (tmp_path / "ck" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ck" / "checkpoints" / "last.eqx").write_text("not a checkpoint")
    assert script.main(["--config", SMOKE, "--workdir", str(tmp_path / "ck")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Checkpoint") and "has no metadata file last.eqx.json" in err


# Hooks run in the training process before `scripts/train.py`: a Ctrl-C right after the 6th
# step returned (its donated inputs are gone) and a second one while that stop is saved.
CTRL_C = """
import os, signal
import fractal_field._train as t
make, orig = t.make_train_step, t.save_checkpoint
def make_train_step(*args, **kwargs):
    step, calls = make(*args, **kwargs), []
    def counted(*a):
        out = step(*a)
        calls.append(1)
        if len(calls) == 6: os.kill(os.getpid(), signal.SIGINT)
        return out
    return counted
def save(path, tree, meta):
    if meta['step'] == 6: os.kill(os.getpid(), signal.SIGINT)
    orig(path, tree, meta)
t.make_train_step, t.save_checkpoint = make_train_step, save
"""
# A hard kill just before the checkpoint of step 12, after the log was flushed past the last
# checkpoint (saved every step by time here: step 11).
HARD_KILL = """
import os, signal
import fractal_field._train as t
orig = t.save_checkpoint
def save(path, tree, meta):
    if meta['step'] == 12: os.kill(os.getpid(), signal.SIGKILL)
    orig(path, tree, meta)
t.save_checkpoint = save
"""


@pytest.mark.slow
def test_ctrl_c_and_hard_kill_resume_to_the_uninterrupted_run(tmp_path):
    """`scripts/train.py` stopped by Ctrl-C (twice) exits cleanly after saving the last
    completed step; then killed with SIGKILL, it resumes from its last time-based checkpoint
    and reaches the parameters of an uninterrupted run, with each step logged once.

    Every run is a fresh process, so all see the same float32 settings (the test process may
    have float64 switched on by another test module).
    """

    def run(workdir, prefix="", *overrides):
        argv = ["train.py", "--config", SMOKE, "--workdir", str(workdir), "epochs=2", *overrides]
        code = f"{prefix}\nimport runpy, sys\nsys.argv = {argv!r}\n"
        code += "runpy.run_path('scripts/train.py', run_name='__main__')\n"
        cmd = [sys.executable, "-c", code]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)

    def meta(workdir):
        return json.loads((workdir / "checkpoints/last.eqx.json").read_text())

    work = tmp_path / "run"
    proc = run(work, CTRL_C)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "SIGINT received" in proc.stderr
    assert "resumes from step 6" in proc.stdout and "stopped (SIGINT)" in proc.stdout
    assert (meta(work)["step"], meta(work)["batch"]) == (6, 6)

    every_step = ["checkpoint_every_steps=0", "checkpoint_every_secs=1e-9"]
    proc = run(work, HARD_KILL, *every_step)
    assert proc.returncode == -9 and "Resumed from" in proc.stdout, proc.stderr[-3000:]
    assert meta(work)["step"] == 11  # by time: the step-count schedule would have given 8
    assert max(r["step"] for r in _steps(work)) == 11  # step 12's row is in the log (0-based)

    proc = run(work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: epoch 2 step 16, best test acc" in proc.stdout
    assert [r["step"] for r in _steps(work)] == list(range(16))
    evals = [json.loads(x) for x in (work / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 1]

    assert run(tmp_path / "full").returncode == 0
    resumed = ff.load_model(work / "checkpoints/last.eqx")
    full = ff.load_model(tmp_path / "full/checkpoints/last.eqx")
    assert meta(work)["step"] == 16
    for a, b in zip(_params(resumed), _params(full), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_atomic_checkpoint_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.eqx"
    good = {"w": jnp.arange(4.0)}
    save_checkpoint(path, good, {"step": 1})
    before = path.read_bytes()

    def boom(f, tree):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(eqx, "tree_serialise_leaves", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": jnp.ones(4)}, {"step": 2})
    assert path.read_bytes() == before
    assert json.loads((tmp_path / "ck.eqx.json").read_text())["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _one_line_error(excinfo):
    """The error's message is one line and carries no chained exception."""
    e = excinfo.value
    assert "\n" not in str(e) and e.__cause__ is None, repr(e)
    assert e.__context__ is None or e.__suppress_context__, repr(e)
    assert "allow_pickle" not in str(e)


def test_incompatible_or_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    config = ff.load_config(SMOKE, ["epochs=1"])
    ff.train(config, tmp_path, stop_after_steps=2)
    other = ff.load_config(SMOKE, ["epochs=1", "model.channels=6"])
    with pytest.raises(ValueError, match="different model config"):
        ff.train(other, tmp_path)
    last = tmp_path / "checkpoints/last.eqx"
    good = last.read_bytes()
    # The checkpoint's arrays do not fit the model its (edited) config builds.
    meta_path = tmp_path / "checkpoints/last.eqx.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["model"]["channels"] = 6
    (tmp_path / "edited.eqx").write_bytes(good)
    (tmp_path / "edited.eqx.json").write_text(json.dumps(meta))
    with pytest.raises(ff.CheckpointError, match=r"edited.eqx is incompatible: array 0 is") as e:
        ff.load_model(tmp_path / "edited.eqx")
    _one_line_error(e)
    # A truncated array file, and a text file renamed `.eqx` (to resume from, and to load).
    last.write_bytes(good[: len(good) // 2])
    with pytest.raises(ff.CheckpointError, match=r"last.eqx is corrupt: array \d+ cannot be read"):
        ff.load_model(last)
    last.write_text("not a checkpoint\n" * 100)
    for load in (lambda: ff.train(config, tmp_path), lambda: ff.load_model(last)):
        with pytest.raises(ff.CheckpointError, match="is corrupt: not an array file") as e:
            load()
        _one_line_error(e)
    meta_path.unlink()
    with pytest.raises(FileNotFoundError, match="last.eqx has no metadata file last.eqx.json"):
        ff.load_model(last)


@pytest.mark.parametrize(
    "stored, like, match",
    [
        (
            {"w": jnp.arange(4.0, dtype=jnp.float32)},
            {"w": jnp.zeros(5, jnp.float32)},
            r"array 0 is float32\[4\] on disk, float32\[5\]",
        ),
        (
            {"w": jnp.arange(4.0, dtype=jnp.float32)},
            {"w": jnp.zeros(4, jnp.float32), "x": jnp.zeros(2, jnp.float32)},
            "ends after 1 arrays",
        ),
        (
            {"w": jnp.arange(4.0, dtype=jnp.float32), "x": jnp.ones(2, jnp.float32)},
            {"w": jnp.zeros(4, jnp.float32)},
            "more than the 1 arrays",
        ),
    ],
)
def test_load_checkpoint_names_the_mismatch(tmp_path, stored, like, match):
    path = tmp_path / "ck.eqx"
    save_checkpoint(path, stored, {})
    with pytest.raises(ff.CheckpointError, match=f"ck.eqx is incompatible.*{match}") as e:
        ff.load_checkpoint(path, like)
    _one_line_error(e)
    assert e.value.kind == "incompatible"


def test_missing_checkpoint_and_bad_override():
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        ff.load_model("/nonexistent/ck.eqx")
    with pytest.raises(KeyError, match="unknown key"):
        ff.load_config(SMOKE, ["optim.lrr=1"])


SHARD_CODE = r"""
import os, json, sys
import jax, jax.numpy as jnp, numpy as np, equinox as eqx, jax.random as jr
import fractal_field as ff
from fractal_field._train import build_model, build_optimizer, make_train_step
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
config = ff.load_config(sys.argv[1], sys.argv[2:])
model = build_model(config, key=jr.PRNGKey(0))
opt, _ = build_optimizer(config, 8)
state = opt.init(eqx.filter(model, eqx.is_inexact_array))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(8, 1, 8, 8)), jnp.float32)
y = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
step = make_train_step(opt, False, config.jacobian_penalty)
m1, _, met1 = step(jr.PRNGKey(1), model, state, x, y)
mesh = Mesh(np.array(jax.devices()), ("data",))
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
ys = jax.device_put(y, NamedSharding(mesh, P("data")))
model2 = build_model(config, key=jr.PRNGKey(0))
state2 = opt.init(eqx.filter(model2, eqx.is_inexact_array))
m2, _, met2 = step(jr.PRNGKey(1), model2, state2, xs, ys)
assert len(xs.sharding.device_set) == jax.device_count()
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
    jax.tree_util.tree_leaves(eqx.filter(m1, eqx.is_array)),
    jax.tree_util.tree_leaves(eqx.filter(m2, eqx.is_array))))
print(json.dumps(dict(devices=jax.device_count(), diff=diff,
                      loss1=float(met1["loss"]), loss2=float(met2["loss"]))))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, overrides",
    [(SMOKE, []), (CIFAR_SMOKE, ["model.dropout=0.2", "jacobian_penalty=0.5"])],
)
def test_sharded_step_equals_single_device(tmp_path, spec, overrides):
    """MNIST's smoke config solves per sample; CIFAR's solves the batch in the planar layout
    (batch axis last, sharded over the devices) and has an encoder stem, readout dropout and
    the Jacobian penalty (the same random masks and probes on one device or four)."""
    env = dict(os.environ, XLA_FLAGS=_xla_flags("--xla_force_host_platform_device_count=4"))
    script = tmp_path / "shard.py"
    script.write_text(SHARD_CODE)
    proc = subprocess.run(
        [sys.executable, str(script), spec, *overrides],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    assert abs(out["loss1"] - out["loss2"]) < 1e-5
    assert out["diff"] < 1e-5


@pytest.mark.parametrize(
    "spec, expected",
    [
        (False, None),
        (None, None),
        (True, {}),
        ({"padding": 2, "flip": False}, {"padding": 2, "flip": False}),
    ],
)
def test_augment_options(spec, expected):
    from fractal_field._train import augment_options

    assert augment_options(spec) == expected


def test_augment_options_bad_key():
    from fractal_field._train import augment_options

    with pytest.raises(ValueError, match="unknown keys"):
        augment_options({"pad": 2})


MULTIHOST_CODE = r"""
import json, sys
import jax
pid, nproc, port, workdir, config_spec, *overrides = sys.argv[1:]
pid, nproc = int(pid), int(nproc)
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)
import fractal_field as ff
from fractal_field._train import load_data
config = ff.load_config(config_spec, overrides)
summary = ff.train(config, workdir, progress=False)
print(json.dumps(dict(devices=jax.device_count(), processes=jax.process_count(),
                      accuracy=summary["accuracy"], step=summary["state"]["step"],
                      held=len(load_data(config, "train")))))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("shards", [0, 4])
def test_multi_host_training_equals_single_process(tmp_path, shards):
    # Two processes with two CPU devices each (jax.distributed, gloo collectives) against one
    # process with four devices: the same global batches, so the same parameters and accuracy.
    # With `data.shards=4` each of the two processes loads only its half of the data.
    script = tmp_path / "multihost.py"
    script.write_text(MULTIHOST_CODE)

    def launch(pid, nproc, port, workdir, devices):
        env = dict(
            os.environ, XLA_FLAGS=_xla_flags(f"--xla_force_host_platform_device_count={devices}")
        )
        args = [sys.executable, str(script), str(pid), str(nproc), str(port), str(workdir), SMOKE]
        args += [f"data.shards={shards}"]
        return subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    port = _free_port()
    procs = [launch(i, 2, port, tmp_path / f"multi{i}", 2) for i in range(2)]
    single = launch(0, 1, port, tmp_path / "single", 4)
    outs = []
    for p in [*procs, single]:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [o["processes"] for o in outs] == [2, 2, 1]
    assert all(o["devices"] == 4 for o in outs)
    assert outs[0]["step"] == outs[2]["step"] == 16
    assert outs[0]["accuracy"] == outs[1]["accuracy"] == outs[2]["accuracy"]
    assert [o["held"] for o in outs] == ([128, 128, 256] if shards else [256] * 3)
    # Only the first process writes checkpoints and logs.
    assert (tmp_path / "multi0" / "checkpoints" / "last.eqx").exists()
    assert not (tmp_path / "multi1" / "checkpoints").exists()
    multi = ff.load_model(tmp_path / "multi0" / "checkpoints" / "last.eqx")
    ref = ff.load_model(tmp_path / "single" / "checkpoints" / "last.eqx")
    leaves = lambda m: jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_inexact_array))
    for a, b in zip(leaves(multi), leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


RESUME_CODE = r"""
import json, sys
import fractal_field as ff
workdir, stop, *overrides = sys.argv[1:]
out = ff.train(ff.load_config(SPEC, overrides), workdir, progress=False,
               stop_after_steps=int(stop) or None)
print(json.dumps(dict(step=out["state"]["step"], stopped=out["stopped"])))
"""


@pytest.mark.slow
def test_resume_with_another_device_count_continues_the_run(tmp_path):
    # Steps 0-5 on four devices, the rest on two: the same global batches, so the parameters
    # of an uninterrupted one-device run (up to the order of the reductions). All three runs
    # are subprocesses, so that they share one numerical setting.
    script = tmp_path / "resume.py"
    script.write_text(RESUME_CODE.replace("SPEC", repr(SMOKE)))

    def run(devices, workdir, stop):
        env = dict(
            os.environ, XLA_FLAGS=_xla_flags(f"--xla_force_host_platform_device_count={devices}")
        )
        args = [sys.executable, str(script), str(tmp_path / workdir), str(stop), "epochs=2"]
        proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr

    assert run(1, "full", 0)[0]["step"] == 16
    assert run(4, "split", 6)[0] == dict(step=6, stopped="stop_after_steps")
    out, log = run(2, "split", 0)
    assert "Resumed from" in log and "step 6" in log  # not a fresh start with the same seed
    assert out["step"] == 16
    split = ff.load_model(tmp_path / "split" / "checkpoints" / "last.eqx")
    full = ff.load_model(tmp_path / "full" / "checkpoints" / "last.eqx")
    leaves = lambda m: jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_inexact_array))
    for a, b in zip(leaves(split), leaves(full), strict=True):
        # Ten optimizer steps amplify reduction-order rounding to ~1e-5 (measured).
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=2e-4)


MISMATCH_CODE = r"""
import sys
import jax
pid, port, workdir, config_spec, *overrides = sys.argv[1:]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(pid))
import fractal_field as ff
try:
    ff.train(ff.load_config(config_spec, overrides), workdir, progress=False)
except ff.ConfigMismatchError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
"""


def _refusing_pair(tmp_path, overrides=((), ())) -> list[str]:
    """Start `MISMATCH_CODE` as processes 0 and 1 (workdirs `w0`, `w1`); both must refuse
    (exit 3). Returns each one's `error:` line."""
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH_CODE)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(tmp_path / f"w{i}"), SMOKE]
            + list(overrides[i]),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errs = []
    for p in procs:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 3, stderr[-3000:]
        errs.append([line for line in stderr.splitlines() if line.startswith("error:")][-1])
    return errs


def test_processes_with_different_configs_refuse_to_start(tmp_path):
    # Process 1 is started with another learning rate and its own data directory (allowed):
    # both refuse before loading data, process 1 naming the key, process 0 naming process 1.
    overrides = [[], ["optim.lr=0.5", "data.data_dir=elsewhere"]]
    errs = _refusing_pair(tmp_path, overrides)
    assert "processes [1]" in errs[0] and "different config" in errs[0]
    assert "process 1's config differs from process 0's: optim.lr: 0.5 != " in errs[1]
    assert "data_dir" not in errs[1]
    assert not (tmp_path / "w0").exists() and not (tmp_path / "w1").exists()


def test_processes_that_would_resume_from_different_steps_refuse(tmp_path):
    # Hosts without shared storage: process 0's workdir holds a checkpoint at step 3,
    # process 1's is empty. Both stop, naming the steps, instead of training apart.
    ff.train(ff.load_config(SMOKE), tmp_path / "w0", progress=False, stop_after_steps=3)
    errs = _refusing_pair(tmp_path)
    assert "processes [1] have a different checkpoint to resume from" in errs[0]
    assert "process 1's checkpoint to resume from differs from process 0's: " in errs[1]
    assert "resume step: 0 != 3" in errs[1] and "storage that every host shares" in errs[1]


def test_unreachable_coordinator_is_a_clear_error(tmp_path):
    port = _free_port()  # nothing listens there
    args = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--config", SMOKE,
        "--workdir", str(tmp_path / "w"), "--distributed", "--coordinator", f"localhost:{port}",
        "--num-processes", "2", "--process-id", "1", "--init-timeout", "2",
    ]  # fmt: skip
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-3000:]
    assert f"error: the coordinator at localhost:{port} cannot be reached" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(coordinator_address="nohost", num_processes=2, process_id=1), "host:port"),
        (dict(num_processes=2, process_id=2), r"process_id 2 is not in \[0, 2\)"),
        (dict(num_processes=0), "num_processes must be >= 1"),
    ],
)
def test_initialize_distributed_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ff.initialize_distributed(**kwargs, timeout=1)


@pytest.mark.parametrize(
    "value, error, match",
    [
        (0, ValueError, "heartbeat_timeout=0 must be > 0 seconds"),
        (-5.0, ValueError, "heartbeat_timeout=-5.0 must be > 0 seconds"),
        (float("inf"), ValueError, "heartbeat_timeout=inf must be > 0 seconds"),
        ("60", TypeError, "heartbeat_timeout='60' must be a number of seconds"),
    ],
)
def test_initialize_distributed_bad_heartbeat_timeout(value, error, match):
    with pytest.raises(error, match=match):
        ff.initialize_distributed(num_processes=2, process_id=1, heartbeat_timeout=value)


@pytest.mark.parametrize(
    "process, step, expected",
    [
        # Process 0 wrote them: its last save is on disk.
        (0, 5, 4),
        (0, 4, 4),
        # Another process: a save is on disk once a later step has completed.
        (1, 5, 4),
        (1, 4, 2),
        (1, 2, 0),
    ],
)
def test_process_watch_names_a_checkpoint_known_to_be_on_disk(monkeypatch, process, step, expected):
    from fractal_field._distributed import ProcessWatch

    monkeypatch.setattr(jax, "process_index", lambda: process)
    watch = ProcessWatch("w", {"step": step}, resumed=0, timeout=1.0)
    for s in range(2, step + 1, 2):  # checkpoints every 2 steps
        watch.saved(s)
    assert watch.last_checkpoint() == expected
    assert ProcessWatch("w", {"step": 1}).last_checkpoint() is None  # none yet


def test_config_differences_names_every_differing_key():
    from fractal_field._distributed import config_differences

    ours = {"optim": {"lr": 0.1, "clip": 1.0}, "seed": 0, "model": {"preset": "nano"}}
    theirs = {"optim": {"lr": 0.2, "clip": 1.0}, "seed": 0, "extra": 1}
    assert config_differences(ours, theirs) == [
        "extra: (missing) != 1",
        "model.preset: 'nano' != (missing)",
        "optim.lr: 0.1 != 0.2",
    ]
    assert config_differences(ours, ours) == []


def test_sharded_evaluation_equals_the_plain_one():
    # The test split in 4 shards, evaluated in padded, masked global batches of 48 (requested
    # 45): the same accuracy, confusion matrix and solver steps as the plain evaluation.
    config = ff.load_config(SMOKE, ["data.test_size=101"])
    model = _train.build_model(config, key=jax.random.PRNGKey(0))
    plain = _train.load_data(config, "test")
    sharded = _train.load_data(
        ff.load_config(SMOKE, ["data.test_size=101", "data.shards=4"]), "test"
    )
    assert isinstance(sharded, ff.data.ShardedDataset) and sharded.size == len(plain) == 101
    a = _train.evaluate(model, plain, batch_size=45)
    b = _train.evaluate(model, sharded, batch_size=45)
    assert sharded.eval_batch_size(45) == 48
    assert a["n"] == b["n"] == 101 and a["confusion"] == b["confusion"]
    assert a["accuracy"] == b["accuracy"] and a["failed"] == b["failed"]
    np.testing.assert_allclose(b["mean_steps"], a["mean_steps"], rtol=1e-6)
    np.testing.assert_allclose(b["mean_residual"], a["mean_residual"], rtol=1e-5)


def test_pretraining_step_is_the_unrolled_cell():
    # `unrolled_solve(3)` is the cell applied three times from zero (checked against a loop
    # written here), and a pretraining step equals a step of the model configured with that
    # solve (Naive, unrolled adjoint, three steps, no stopping test).
    config = ff.load_config(SMOKE)
    model = _train.build_model(config, key=jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 1, 8, 8)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 3], jnp.int32)
    logits, sol = _train._forward(model, x, None, None, **_train.unrolled_solve(3))

    def by_hand(xi):
        inj = model.encoder(xi)
        z, op = model.cell.init_state(inj), model.cell.operator(*inj.shape[1:])
        for _ in range(3):
            z = model.cell.step_with(op, z, inj)
        return model.readout(z)

    np.testing.assert_allclose(logits, jax.vmap(by_hand)(x), rtol=1e-6, atol=1e-6)
    assert sol.stats.num_steps.tolist() == [3] * 4
    unrolled = ["solver.name=naive", "solver.history=None", "adjoint.name=unrolled"]
    unrolled += ["adjoint.max_steps=None", "adjoint.rtol=None", "adjoint.throw=None"]
    unrolled += ["model.max_steps=3", "model.rtol=0.0", "model.atol=0.0"]
    twin = _train.build_model(ff.load_config(SMOKE, unrolled), key=jax.random.PRNGKey(0))
    optimizer, _ = _train.build_optimizer(config, 10)
    outs = []
    for m, kwargs in ((model, _train.unrolled_solve(3)), (twin, None)):
        step = _train.make_train_step(optimizer, None, solve_kwargs=kwargs)
        opt_state = optimizer.init(eqx.filter(m, eqx.is_inexact_array))
        new, _, metrics = step(jax.random.PRNGKey(1), m, opt_state, x, y)
        outs.append((eqx.filter(new, eqx.is_inexact_array), float(metrics["loss"])))
    assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-6)
    for a, b in zip(*(jax.tree_util.tree_leaves(o[0]) for o in outs), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_pretraining_steps_then_the_solver_and_resume_across_the_switch(tmp_path):
    overrides = ["pretrain_steps=2", "pretrain_unroll=3", "epochs=1"]
    config = ff.load_config(SMOKE, overrides)
    full = ff.train(config, tmp_path / "full", progress=False, stop_after_steps=4)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").open()]
    assert [r["fwd_steps"] for r in rows[:2]] == [3.0, 3.0]  # unrolled: exactly 3 steps
    assert [r["fwd_failed"] for r in rows] == [1.0, 1.0, 0.0, 0.0]  # then the solver converges
    ff.train(config, tmp_path / "split", progress=False, stop_after_steps=1)
    split = ff.train(config, tmp_path / "split", progress=False, stop_after_steps=4)
    leaves = lambda out: jax.tree_util.tree_leaves(eqx.filter(out["model"], eqx.is_inexact_array))
    for a, b in zip(leaves(full), leaves(split), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="pretrain_unroll=0 must be a positive integer"):
        ff.train(ff.load_config(SMOKE, ["pretrain_unroll=0"]), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("old", "new", "same"),
    [
        ({"preset": "nano"}, {"preset": "nano", "precision": "float32"}, True),  # a new default
        ({"preset": "nano", "field_dropout": 0.0}, {"preset": "nano"}, True),
        ({"preset": "nano"}, {"preset": "nano", "field": "complex"}, True),
        ({"preset": "nano"}, {"preset": "nano", "field": "real"}, False),
        ({"preset": "nano"}, {"preset": "nano", "precision": "bfloat16"}, False),
        ({"preset": "nano", "stem": 8}, {"preset": "nano"}, False),
        ({"preset": "nano"}, {"preset": "nano", "no_such_option": 1}, False),
        ({}, {"preset": "nano"}, False),  # `preset` has no default to fall back on
        ({"readout_pyramid": [16]}, {"readout_pyramid": (16,)}, True),  # JSON stores lists
        ({"preset": "nano", "readout_pyramid": []}, {"preset": "nano"}, True),
        ({"channels": [4, 6]}, {"channels": (4, 8)}, False),
    ],
)
def test_resume_compares_model_configs_up_to_defaults(old, new, same):
    assert _train.same_model_config(old, new) is same
    assert _train.same_model_config(new, old) is same


def test_non_finite_loss_stops_before_checkpointing_it(tmp_path):
    # A learning rate of 1e30 blows the parameters up within a few updates; training raises
    # (non-finite parameters or loss) and the checkpoint on disk is the last finite model.
    config = ff.load_config(SMOKE, ["optim.lr=1e30", "checkpoint_every_steps=1"])
    with pytest.raises(FloatingPointError, match="non-finite|loss became"):
        ff.train(config, tmp_path, progress=False)
    meta = json.loads((tmp_path / "checkpoints" / "last.eqx.json").read_text())
    assert meta["step"] == 1  # step 1 was finite and saved; step 2's update was not
    model = ff.load_model(tmp_path / "checkpoints" / "last.eqx")
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def test_build_solver_and_adjoint_from_config():
    from fractal_field._train import build_adjoint, build_solver

    assert build_solver({"name": "anderson", "history": 3, "ridge": None}).history == 3
    adj = build_adjoint({"name": "implicit", "solver": {"name": "naive"}, "max_steps": 7})
    assert isinstance(adj.solver, ff.Naive) and adj.max_steps == 7
    assert build_solver({"name": "reversible", "beta": 0.3}) == ff.Reversible(0.3)
    broyden = {"name": "broyden", "memory": 4, "inner_product": "real"}
    assert build_solver(broyden) == ff.Broyden(memory=4, inner_product="real")
    assert build_adjoint({"name": "implicit", "solver": broyden}).solver.memory == 4
    assert isinstance(build_adjoint({"name": "reversible"}), ff.ReversibleAdjoint)
    ep = build_adjoint({"name": "ep", "beta": 0.2, "solver": {"name": "naive"}})
    assert ep.beta == 0.2 and isinstance(ep.solver, ff.Naive)
    with pytest.raises(ValueError, match="Unknown solver 'newton'"):
        build_solver({"name": "newton"})
    with pytest.raises(ValueError, match="Unknown adjoint 'exact'"):
        build_adjoint({"name": "exact"})


@pytest.mark.parametrize(
    "spec, budget",
    [
        ("mnist_nano.py", 20_000),
        ("mnist_nano.py:short_reversible", 20_000),
        ("mnist_nano.py:short_ep", 20_000),
        ("cifar10_small.py", 170_000),
        ("cifar10_small.py:multiscale", 170_000),
        ("cifar10_small.py:expanded", 170_000),
        ("cifar10_small.py:mdeq", 170_000),
        ("mnist_nano.py:real", 20_000),
        ("mnist_nano.py:pyramid", 20_000),
        ("cifar10_small.py:real", 170_000),
    ],
)
def test_config_models_stay_within_their_parameter_budget(spec, budget):
    from fractal_field._train import build_model

    config = ff.load_config(str(ROOT / "configs" / spec))
    shapes = eqx.filter_eval_shape(build_model, config, key=jax.random.PRNGKey(0))
    n = ff.count_params(shapes)
    assert 0.5 * budget < n < budget


@pytest.mark.parametrize("name, real_channels", [("mnist_nano.py", 38), ("cifar10_small.py", 96)])
def test_real_config_is_the_default_at_equal_parameters(name, real_channels):
    """`:real` changes only the field, its channels (`ff.equal_params_channels`) and, where
    the default solves in the planar layout, the batch solve; counts within 2%."""
    from fractal_field._train import build_model

    default = ff.load_config(str(ROOT / "configs" / name))
    real = ff.load_config(str(ROOT / "configs" / name) + ":real")
    d, r = default.to_dict(), real.to_dict()
    dm, rm = d.pop("model"), r.pop("model")
    assert d == r
    assert {k for k in set(dm) | set(rm) if dm.get(k) != rm.get(k)} <= {
        "field",
        "channels",
        "batch_solve",
    }
    assert rm["field"] == "real" and rm["channels"] == real_channels
    assert ff.equal_params_channels(dm) == real_channels
    n_complex, n_real = (
        ff.count_params(eqx.filter_eval_shape(build_model, c, key=jax.random.PRNGKey(0)))
        for c in (default, real)
    )
    assert abs(n_real / n_complex - 1) < 0.02


@pytest.mark.slow
def test_sweep_trains_runs_side_by_side_and_summarises(tmp_path):
    """`scripts/sweep.py`: each run trains in its own process with its own overrides plus the
    shared ones; the summary holds each run's evaluations and parameter count."""
    sweep = ROOT / "scripts" / "sweep.py"
    spec = importlib.util.spec_from_file_location("sweep", sweep)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runs = module.parse_runs(["a=c.py", "b=c.py:v x.y=(1, 2) z=3"])
    assert runs == {"a": ["c.py"], "b": ["c.py:v", "x.y=(1,", "2)", "z=3"]}
    for bad in (["oops"], ["a=c.py", "a=d.py"], ["a b=c.py"]):
        with pytest.raises(SystemExit, match="given twice|expected NAME=CONFIG"):
            module.parse_runs(bad)
    cmd = [sys.executable, sweep, "--workdir", tmp_path / "sw", "--time-limit", "600"]
    cmd += ["small=configs/mnist_nano.py:smoke model.channels=2", "--all", "epochs=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    run = summary["small"]
    assert run["config"]["epochs"] == 1 and run["config"]["model"]["channels"] == 2
    assert len(run["epochs"]) == 1 and 0 <= run["epochs"][0]["accuracy"] <= 1
    model = ff.load_model(tmp_path / "sw" / "small")
    assert run["params"] == ff.count_params(model)
    assert "small (" in proc.stdout and (tmp_path / "sw" / "small.log").exists()


# Run before `scripts/train.py` by one process of a run: SIGKILL right after global step
# STEP returns (counted from the checkpoint the run resumes from).
KILL_AT = """
import json, os, signal
from pathlib import Path
import fractal_field._train as t
meta = Path(WORKDIR) / "checkpoints" / "last.eqx.json"
done = [json.loads(meta.read_text())["step"] if meta.exists() else 0]
make = t.make_train_step
def make_train_step(*args, **kwargs):
    step = make(*args, **kwargs)
    def killed(*a):
        out = step(*a)
        done[0] += 1
        if done[0] == STEP: os.kill(os.getpid(), signal.SIGKILL)
        return out
    return killed
t.make_train_step = make_train_step
"""


@pytest.mark.slow
def test_lost_process_stops_the_others_and_a_restart_resumes(tmp_path):
    """Two processes (`scripts/train.py --distributed`); one is SIGKILLed at a random step,
    twice in a row, each process once. When process 1 is lost, process 0 exits
    within the heartbeat timeout with a one-line error naming it and the checkpoint a restart
    resumes from; when process 0 (the coordinator) is lost, JAX may abort process 1 before
    that line is written (its own message then blames the leader). Starting both again
    resumes, and the run ends with the parameters of an uninterrupted one."""
    rng = np.random.default_rng(27)
    kills = np.sort(rng.choice(np.arange(1, 8), 2, replace=False))  # global steps, of 8
    victims = list(rng.permutation(2))
    timeout = 5
    overrides = ["data.train_size=128", "checkpoint_every_steps=2"]  # 4 steps an epoch
    env = dict(
        os.environ,
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        # Every program (the small ones too) compiled once and loaded by the restarts.
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )

    started = []

    def launch(workdir, nproc=2, victim=None, step=None):
        port = _free_port()
        devices = _xla_flags(f"--xla_force_host_platform_device_count={4 // nproc}")
        procs = []
        for i in range(nproc):
            argv = ["train.py", "--config", SMOKE, "--workdir", str(workdir), *overrides]
            if nproc > 1:
                argv += ["--distributed", "--coordinator", f"localhost:{port}",
                         "--num-processes", str(nproc), "--process-id", str(i),
                         "--heartbeat-timeout", str(timeout)]  # fmt: skip
            code = "" if i != victim else KILL_AT.replace("WORKDIR", repr(str(workdir)))
            code = code.replace("STEP", str(step))
            code += f"\nimport runpy, sys\nsys.argv = {argv!r}\n"
            code += "runpy.run_path('scripts/train.py', run_name='__main__')\n"
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code],
                    cwd=ROOT,
                    env=dict(env, XLA_FLAGS=devices),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        started.extend(procs)
        return procs

    def resumed_from(stdout) -> int:
        found = re.findall(r"Resumed from .* at epoch \d+ step (\d+)\.", stdout)
        return int(found[0]) if found else 0

    try:
        # The uninterrupted reference: one process of four devices (as in the multi-host test).
        (full,) = launch(tmp_path / "full", nproc=1)
        work = tmp_path / "run"
        reported = None
        for victim, step in zip(victims, kills, strict=True):
            procs = launch(work, victim=victim, step=step)
            killed, survivor = procs[victim], procs[1 - victim]
            killed.communicate(timeout=300)
            assert killed.returncode == -signal.SIGKILL
            out, err = survivor.communicate(timeout=timeout + 60)  # never hangs
            assert survivor.returncode != 0, err[-3000:]
            # This run resumed from the checkpoint the last error named.
            assert reported is None or resumed_from(out) == reported, out
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            if victim == 1:
                assert survivor.returncode == ff.EXIT_PROCESS_LOST, err[-3000:]
            else:
                # JAX's client aborts on the closed connection too: whichever comes first.
                assert survivor.returncode in (ff.EXIT_PROCESS_LOST, -signal.SIGABRT), err[-3000:]
                if not lines:
                    assert "the leader task was preempted/died" in err, err[-3000:]
                    reported = None
                    continue
            assert len(lines) == 1, err[-3000:]
            who = "process 1 of 2" if victim == 1 else "process 0 of 2 (the coordinator)"
            assert lines[0].startswith(f"error: {who} stopped responding at step {step} ("), lines
            found = re.findall(r"the last checkpoint is step (\d+) \((.*)\); start all", lines[0])
            if found:
                reported = int(found[0][0])
                assert found[0][1] == str(work / "checkpoints" / "last.eqx")
                assert step - 2 <= reported <= step  # checkpoints every 2 steps
            else:
                assert "there is no checkpoint" in lines[0] and step < 2, lines
                reported = 0
        procs = launch(work)
        outs = []
        for p in [*procs, full]:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
        assert reported is None or resumed_from(outs[0]) == resumed_from(outs[1]) == reported
    finally:  # nothing left running after a failure
        for p in started:
            p.kill()
    # Each step is logged once, and the run ends where an uninterrupted one does.
    assert [r["step"] for r in _steps(work)] == list(range(8))
    assert "done: epoch 2 step 8" in outs[0]
    leaves = lambda m: jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_inexact_array))
    ref = ff.load_model(tmp_path / "full" / "checkpoints" / "last.eqx")
    got = ff.load_model(work / "checkpoints" / "last.eqx")
    for a, b in zip(leaves(got), leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

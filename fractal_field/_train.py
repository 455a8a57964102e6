"""Training, evaluation and checkpoint loading for the image classifiers."""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._adjoint import (
    ImplicitAdjoint,
    JacobianFreeAdjoint,
    PhantomAdjoint,
    ReversibleAdjoint,
    UnrolledAdjoint,
    backward_stats_probe,
)
from ._checkpoint import (
    CheckpointError,
    _atomic_write,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from ._complex_opt import complex_safe
from ._distributed import ProcessWatch, check_processes_agree
from ._equilibrium import EquilibriumPropagation
from ._model import FieldClassifier, count_params, make_model, param_summary
from ._solution import RESULTS
from ._solver import Anderson, Broyden, Naive, Reversible
from .data import (
    ArrayDataset,
    ShardedDataset,
    augment,
    load_dataset,
    load_sharded,
    prefetch,
    process_shards,
)

# ---------------------------------------------------------------------------------------------
# Building blocks from a config


def _multigrid(**kwargs):
    from ._solver.multigrid import Multigrid

    return Multigrid(**kwargs)


_SOLVERS = {
    "anderson": Anderson,
    "broyden": Broyden,
    "naive": Naive,
    "multigrid": _multigrid,
    "reversible": Reversible,
}
_ADJOINTS = {
    "implicit": ImplicitAdjoint,
    "phantom": PhantomAdjoint,
    "jfb": JacobianFreeAdjoint,
    "unrolled": UnrolledAdjoint,
    "reversible": ReversibleAdjoint,
    "ep": EquilibriumPropagation,
}


def _build(kind: str, table: dict, cfg):
    # Keys set to `None` are dropped (so an override `solver.history=None` removes one).
    cfg = {k: v for k, v in dict(cfg).items() if v is not None}
    name = cfg.pop("name")
    if name not in table:
        raise ValueError(f"Unknown {kind} {name!r}: use one of {sorted(table)}.")
    return name, cfg


def build_solver(cfg) -> Any:
    """`{"name": "anderson" | "broyden" | "naive" | "multigrid" | "reversible",
    **hyperparameters}` -> a solver."""
    name, kwargs = _build("solver", _SOLVERS, cfg)
    return _SOLVERS[name](**kwargs)


def build_adjoint(cfg) -> Any:
    """`{"name": "implicit" | "phantom" | "jfb" | "unrolled" | "reversible" | "ep",
    **hyperparameters}`; an implicit (or ep) adjoint's `solver` is itself a solver config.
    `"reversible"` needs the `"reversible"` solver, `"ep"` (`ff.EquilibriumPropagation`) a
    model with `symmetric=True`."""
    name, kwargs = _build("adjoint", _ADJOINTS, cfg)
    if "solver" in kwargs:
        kwargs["solver"] = build_solver(kwargs["solver"])
    return _ADJOINTS[name](**kwargs)


def _plain(cfg) -> dict:
    return cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)


def build_model(config, *, key) -> FieldClassifier:
    """The model described by `config.model`, `config.solver` and `config.adjoint`."""
    model_cfg = _plain(config.model)
    preset = model_cfg.pop("preset", None)
    return make_model(
        preset,
        key=key,
        solver=build_solver(_plain(config.solver)),
        adjoint=build_adjoint(_plain(config.adjoint)),
        **model_cfg,
    )


def same_model_config(a: dict, b: dict) -> bool:
    """Whether two `config.model` dicts build the same model: equal, up to keys that one
    leaves out and the other sets to `ff.FieldClassifier`'s default (so that a run resumes
    after a new model option was added to the configs with its default value)."""
    defaults = {
        k: v.default
        for k, v in inspect.signature(FieldClassifier.__init__).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    missing = object()
    for key in set(a) | set(b):
        x, y = a.get(key, missing), b.get(key, missing)
        if x is missing:
            x = defaults.get(key, missing)
        if y is missing:
            y = defaults.get(key, missing)
        if x is missing or _as_lists(x) != _as_lists(y):
            return False
    return True


def _as_lists(value):
    """`value` with tuples as lists, as a checkpoint's JSON metadata stores them."""
    if isinstance(value, (tuple, list)):
        return [_as_lists(v) for v in value]
    return value


def build_optimizer(config, steps_per_epoch: int):
    o = config.optim
    total = max(1, config.epochs * steps_per_epoch)
    warmup = max(1, min(int(o.warmup_epochs * steps_per_epoch), total - 1))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=o.lr * 1e-2,
        peak_value=o.lr,
        warmup_steps=warmup,
        decay_steps=max(total, warmup + 2),
        end_value=o.lr * o.get("final_lr_ratio", 1e-2),
    )
    opt = optax.chain(
        optax.clip_by_global_norm(o.clip),
        optax.adamw(schedule, weight_decay=o.weight_decay),
    )
    return complex_safe(opt), schedule


def synthetic_dataset(
    n: int, *, image_size: int = 8, channels: int = 1, num_classes: int = 10, seed: int = 0
) -> ArrayDataset:
    """A small learnable dataset for smoke runs: a class-dependent pattern plus noise."""
    # The class prototypes are shared by every split; `seed` draws the examples.
    protos = np.random.default_rng(1234).uniform(
        0, 255, (num_classes, image_size, image_size, channels)
    )
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    noise = rng.normal(0, 40, (n, image_size, image_size, channels))
    images = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8)
    names = tuple(str(i) for i in range(num_classes))
    return ArrayDataset(images, labels, names, (0.5,) * channels, (0.25,) * channels, "synthetic")


def load_data(config, split: str) -> ArrayDataset | ShardedDataset:
    """The split `config.data` describes; with `data.shards > 0`, only this process's shards
    of it (`ff.data.ShardedDataset`)."""
    d = config.data
    limit = d.get(f"{split}_size")
    if d.name == "synthetic":
        n = d.get("train_size", 256) if split == "train" else d.get("test_size", 128)
        full = synthetic_dataset(
            n,
            image_size=d.get("image_size", 8),
            channels=d.get("channels", 1),
            seed=0 if split == "train" else 1,
        )
        load = lambda select=None: full if select is None else full.subset_of(select)  # noqa: E731
        limit = 0
    else:
        load = functools.partial(
            load_dataset, d.name, split, data_dir=d.get("data_dir"), source=d.get("source", "auto")
        )
    shards = d.get("shards", 0)
    if shards:
        first, count = process_shards(shards, jax.process_index(), jax.process_count())
        return load_sharded(load, num_shards=shards, first=first, count=count, limit=limit or 0)
    ds = load()
    # A random (seeded) subset: files are often sorted by class.
    return ds.subset(limit, seed=0) if limit else ds


# ---------------------------------------------------------------------------------------------
# Steps


def _forward(model: FieldClassifier, x, probe, key=None, **solve_kwargs):
    return model.batched(x, key=key, stats_probe=probe, **solve_kwargs)


def unrolled_solve(steps: int) -> dict:
    """`fixed_point` keywords that replace a model's solve by `steps` plain iterations of its
    cell from the zero field, differentiated by backpropagation through them (MDEQ's
    pretraining before its implicit solves)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"pretrain_unroll={steps!r} must be a positive integer.")
    return dict(solver=Naive(), adjoint=UnrolledAdjoint(), max_steps=steps, rtol=0.0, atol=0.0)


def _metrics(logits, labels, sol):
    return dict(
        acc=jnp.mean(jnp.argmax(logits, -1) == labels),
        fwd_steps=jnp.mean(sol.stats.num_steps.astype(jnp.float32)),
        fwd_residual=jnp.mean(sol.stats.relative_residual),
        fwd_failed=jnp.mean((sol.result != RESULTS.successful).astype(jnp.float32)),
    )


def augment_options(spec) -> dict | None:
    """`config.data.augment` -> keyword arguments of `ff.data.augment`, or `None` for none.

    `False`/`None`: no augmentation; `True`: random crop with 4 pixels of padding and random
    horizontal flip (CIFAR); a dict such as `{"padding": 2, "flip": False}` (MNIST shifts)."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return {}
    opts = _plain(spec)
    unknown = set(opts) - {"padding", "flip"}
    if unknown:
        raise ValueError(f"data.augment: unknown keys {sorted(unknown)}; use 'padding', 'flip'.")
    return opts


def _check_unit_interval(name: str, value) -> float:
    """`value` as a float in [0, 1), or a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a float in [0, 1).")
    if not 0 <= value < 1:
        raise ValueError(f"{name}={value} must be in [0, 1) (0 turns it off).")
    return float(value)


def make_train_step(
    optimizer,
    augment_data: bool | dict | None,
    jacobian_penalty: float = 0.0,
    label_smoothing: float = 0.0,
    solve_kwargs: dict | None = None,
):
    """A jitted `(key, model, opt_state, images, labels) -> (model, opt_state, metrics)`.

    `augment_data`: `None`/`False` (none), `True` (crop + flip) or `augment`'s keywords.
    `jacobian_penalty > 0` adds that multiple of `FieldClassifier.jacobian_penalty` (one probe)
    to the cross-entropy; the metrics then carry it as `jac` (`loss` stays the cross-entropy).
    `label_smoothing` in [0, 1): the cross-entropy (and `loss`) is against targets
    `(1 - label_smoothing) * one_hot + label_smoothing / num_classes` (`acc` is unchanged).
    `solve_kwargs` override the model's `fixed_point` keywords in the forward pass (e.g.
    `unrolled_solve(10)`).
    """
    aug = augment_options(augment_data)
    if jacobian_penalty < 0:
        raise ValueError(f"jacobian_penalty={jacobian_penalty} must be >= 0.")
    label_smoothing = _check_unit_interval("label_smoothing", label_smoothing)

    @eqx.filter_jit(donate="all-except-first")
    def train_step(key, model, opt_state, images, labels):
        x = images
        if aug is not None:
            x = augment(key, x, **aug)
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss_fn(diff):
            params, probe = diff
            m = eqx.combine(params, static)
            # Dropout's key is derived from the step's (augmentation keeps the key it had).
            logits, sol = _forward(m, x, probe, jr.fold_in(key, 1), **(solve_kwargs or {}))
            if label_smoothing:
                targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
                targets = optax.smooth_labels(targets, label_smoothing)
                loss = optax.softmax_cross_entropy(logits, targets).mean()
            else:
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            metrics = dict(_metrics(logits, labels, sol), loss=loss)
            if jacobian_penalty:
                jac = m.jacobian_penalty(x, sol.value, key=jr.fold_in(key, 2))
                metrics["jac"] = jac
                loss = loss + jacobian_penalty * jac
            return loss, metrics

        (_, metrics), (grads, probe_grad) = jax.value_and_grad(loss_fn, has_aux=True)(
            (params, backward_stats_probe())
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        n = x.shape[0]
        metrics = dict(
            metrics,
            bwd_steps=probe_grad[0] / n,
            bwd_residual=probe_grad[1] / n,
            bwd_failed=probe_grad[2] / n,
            grad_norm=optax.tree.norm(grads),
        )
        return model, opt_state, metrics

    return train_step


@eqx.filter_jit
def ema_update(ema, model, decay: float):
    """One step of an exponential moving average of `model`'s parameters:
    `decay * ema + (1 - decay) * params` for each inexact array (`ema` is
    `eqx.filter(model, eqx.is_inexact_array)`-shaped; `ema_model` rebuilds a model from it)."""
    params = eqx.filter(model, eqx.is_inexact_array)
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


def ema_model(ema, model):
    """`model` with its parameters replaced by the moving averages `ema`."""
    return eqx.combine(ema, eqx.filter(model, eqx.is_inexact_array, inverse=True))


@eqx.filter_jit
def eval_step(model, images, labels, mask=None):
    """Sums over the batch (replicated scalars and a confusion matrix, so the step also runs on
    a batch sharded over several hosts); `mask` (bool, per example) leaves out padding."""
    logits, sol = _forward(model, images, None)
    pred = jnp.argmax(logits, -1)
    k = logits.shape[-1]
    w = jnp.ones(labels.shape, jnp.int32) if mask is None else mask.astype(jnp.int32)

    def total(v):
        return jnp.sum(jnp.where(w > 0, v, 0))

    return dict(
        correct=total(pred == labels),
        steps=total(sol.stats.num_steps),
        residual=total(sol.stats.relative_residual),
        failed=total(sol.result != RESULTS.successful),
        confusion=jnp.zeros((k, k), jnp.int32).at[labels, pred].add(w),
    )


def evaluate(
    model,
    dataset: ArrayDataset | ShardedDataset,
    *,
    batch_size: int = 500,
    sharding=None,
    progress: bool = False,
) -> dict:
    """Accuracy, mean forward solver steps and relative residual, and confusion matrix.

    A `ShardedDataset` is evaluated in global batches of `batch_size` rounded up to a multiple
    of the shards and devices, each process giving its shards' slices (padding masked out).
    `progress=True` shows a progress bar (tqdm, on stderr).
    """
    k = dataset.num_classes
    conf = np.zeros((k, k), np.int64)
    totals = dict(correct=0, steps=0.0, residual=0.0, failed=0)
    multi = jax.process_count() > 1
    if isinstance(dataset, ShardedDataset):
        if multi and sharding is None:
            raise ValueError("Multi-host evaluation of a ShardedDataset needs a `sharding`.")
        devices = 1 if sharding is None else sharding.mesh.size
        batches = dataset.eval_batches(batch_size, devices)
        num_batches = -(-dataset.size // dataset.eval_batch_size(batch_size, devices))
        n = dataset.size
    else:
        batches = dataset.batches(batch_size, seed=0, epoch=0, shuffle=False, drop_last=False)
        num_batches = dataset.num_batches(batch_size, drop_last=False)
        n = len(dataset)
    if progress:
        from tqdm import tqdm

        batches = tqdm(
            batches,
            total=num_batches,
            desc=f"evaluating {dataset.name} {dataset.split}".rstrip(),
            unit="batch",
        )
    for images, labels, *mask in batches:
        arrays = [np.asarray(dataset.normalize(images)), np.asarray(labels, np.int32), *mask]
        if mask and sharding is not None:  # a ShardedDataset's slice of each global batch
            arrays = [_local_batch_to_global(a, sharding) for a in arrays]
        elif sharding is not None and len(images) % sharding.mesh.size == 0:
            arrays = [_host_batch_to_global(a, sharding) for a in arrays]
        elif multi:
            raise ValueError(
                f"Multi-host evaluation needs a `sharding` and batches divisible by the "
                f"{jax.device_count()} devices (a batch of {dataset} has {len(images)} examples)."
            )
        out = eval_step(model, *arrays)
        for name in totals:
            totals[name] += float(out[name])
        conf += np.asarray(out["confusion"], np.int64)
    return dict(
        accuracy=totals["correct"] / n,
        mean_steps=totals["steps"] / n,
        mean_residual=totals["residual"] / n,
        failed=int(totals["failed"]),
        n=n,
        confusion=conf.tolist(),
    )


# ---------------------------------------------------------------------------------------------
# The training loop


def _mesh():
    devices = np.array(jax.devices())
    return Mesh(devices, ("data",))


def _local_batch_to_global(x, sharding):
    """This process's consecutive slice `x` of a global batch -> the global array."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, x, shape)


def _host_batch_to_global(x, sharding):
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Multi-host: every process holds the same global batch; each contributes its slice.
    per = x.shape[0] // jax.process_count()
    local = x[jax.process_index() * per : (jax.process_index() + 1) * per]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)


class _Stop(Exception):
    """Raised by `_Interrupt` to leave an evaluation early (no parameters change there)."""


class _Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM -> a clean stop at the next step boundary.

    The handler only records the signal, so a training step (which donates its input buffers)
    always completes and the loop saves the last completed step. During an evaluation
    (`immediate`) it stops at once; during a save (`saving`) it waits for the save. A third
    Ctrl-C outside a save aborts without saving (`KeyboardInterrupt`).
    """

    def __init__(self):
        self.signum: int | None = None
        self.count = 0
        self.saving = False
        self.immediate = False
        self.old: dict = {}

    def __enter__(self):
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handler)
        return self

    @staticmethod
    def _say(msg: str) -> None:
        # Unbuffered: a print() here could re-enter a stream the loop is writing to.
        os.write(2, f"\n{msg}\n".encode())

    def _handler(self, signum, _frame):
        self.count += 1
        if self.signum is None:
            self.signum = signum
            self._say(
                f"{signal.Signals(signum).name} received: stopping after the current step "
                "and saving a checkpoint (Ctrl-C twice more aborts without saving)."
            )
        if self.saving:
            return
        if self.count >= 3 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.immediate:
            raise _Stop

    @property
    def flag(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc):
        for s, old in self.old.items():
            signal.signal(s, old)


def _truncate_jsonl(path: Path, keep) -> None:
    """Drop the rows of a JSON-lines log for which `keep(row)` is false (and torn lines)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if keep(row):
            rows.append(line)
    if len(rows) != len(lines):
        text = "".join(r + "\n" for r in rows)
        _atomic_write(path, lambda f: f.write(text.encode()))


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _ckpt_meta(config, **extra) -> dict:
    return dict(config=config.to_dict(), **extra)


def _describe(ds: ArrayDataset | ShardedDataset, split: str) -> str:
    where = f"from {ds.origin}" if ds.origin else "generated in memory"
    if isinstance(ds, ShardedDataset):
        return (
            f"{ds.name} {split} ({ds.size} examples in {ds.num_shards} shards; this process "
            f"holds shards {ds.first}-{ds.first + ds.count - 1}: {len(ds)} examples) {where}"
        )
    return f"{ds.name} {split} ({len(ds)} examples) {where}"


def train(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    stop_after_steps: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Train `config` in `workdir`, resuming from `workdir/checkpoints/last.eqx` if present.

    Writes `metrics.jsonl` (per step), `eval.jsonl` (per epoch) and checkpoints `last`,
    `best` and `epoch_NNN` (each with a JSON of the config and progress). `last` is also
    saved every `config.checkpoint_every_steps` steps and `config.checkpoint_every_secs`
    seconds. Stops after `stop_after_steps` global steps if given, or at the next step
    boundary on SIGINT (Ctrl-C) or SIGTERM, after saving `last`. Returns a summary dict;
    its `stopped` is `None` for a finished run, else `"stop_after_steps"` or the signal's
    name (`"SIGINT"`, `"SIGTERM"`). With several processes, the loss of one makes the others
    exit at once, naming it (see `initialize_distributed`).

    `config.label_smoothing` in [0, 1) smooths the training targets (see `make_train_step`).
    `config.pretrain_steps > 0`: the first that many steps train the cell iterated
    `config.pretrain_unroll` times from the zero field and backpropagated through
    (`unrolled_solve`), as MDEQ does before its implicit solves; then the configured solve.
    `config.ema` in [0, 1), if > 0, keeps an exponential moving average of the parameters
    with that decay, updated after every step and saved in every checkpoint beside the model
    and optimiser state; the evaluations (so `best`) and `load_model` then use the averaged
    model, which the summary also returns as `ema_model`.
    """
    workdir = Path(workdir)
    label_smoothing = _check_unit_interval("label_smoothing", config.get("label_smoothing", 0.0))
    decay = _check_unit_interval("ema", config.get("ema", 0.0))
    pretrain_steps = config.get("pretrain_steps", 0)
    if (
        isinstance(pretrain_steps, bool)
        or not isinstance(pretrain_steps, int)
        or pretrain_steps < 0
    ):
        raise ValueError(f"pretrain_steps={pretrain_steps!r} must be an integer >= 0.")
    pretrain_solve = unrolled_solve(config.get("pretrain_unroll", 10))
    ahead = config.data.get("prefetch", 2)
    if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 0:
        raise ValueError(f"data.prefetch={ahead!r} must be an int >= 0 (0: no prefetching).")
    ckdir = workdir / "checkpoints"
    if progress is None:
        progress = sys.stderr.isatty()
    # Processes started with different configs would train different models in lockstep.
    check_processes_agree(config.to_dict())

    # Data first: a run that cannot start leaves no workdir behind.
    train_ds = load_data(config, "train")
    test_ds = load_data(config, "test")
    bs = config.batch_size
    n_dev = jax.device_count()
    if bs % n_dev:
        raise ValueError(f"batch_size {bs} must be divisible by the {n_dev} devices.")
    steps_per_epoch = train_ds.num_batches(bs)
    if steps_per_epoch == 0:
        n_train = train_ds.size if isinstance(train_ds, ShardedDataset) else len(train_ds)
        raise ValueError(f"batch_size {bs} exceeds the {n_train} training examples.")

    # Every process runs this function; only the first writes logs and checkpoints.
    main = jax.process_index() == 0
    key = jr.PRNGKey(config.seed)
    model_key, aug_key = jr.split(key)
    model = build_model(config, key=model_key)
    optimizer, schedule = build_optimizer(config, steps_per_epoch)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    state = dict(epoch=0, batch=0, step=0, best_acc=-1.0)

    last = ckdir / "last.eqx"
    if last.exists():
        meta = read_meta(last)
        if not same_model_config(meta["config"].get("model") or {}, config.model.to_dict()):
            raise ValueError(
                f"The checkpoint in {ckdir} was trained with a different model config "
                f"({meta['config'].get('model')}) than the one given ({config.model.to_dict()}). "
                "Use a new --workdir or the original config."
            )
        if bool(meta["config"].get("ema", 0.0)) != bool(decay):
            raise ValueError(
                f"The checkpoint in {ckdir} was trained with ema={meta['config'].get('ema', 0.0)} "
                f"and cannot resume with ema={decay} (an average is kept only with ema > 0). "
                "Use a new --workdir or the original setting."
            )
        if decay:
            like = (model, opt_state, eqx.filter(model, eqx.is_inexact_array))
            model, opt_state, ema = load_checkpoint(last, like)
        else:
            model, opt_state = load_checkpoint(last, (model, opt_state))
        state = {k: meta[k] for k in state}
        print(f"Resumed from {last} at epoch {state['epoch']} step {state['step']}.", flush=True)
    # Without storage every host shares, only process 0 finds the checkpoint it wrote.
    check_processes_agree(
        {"resume step": state["step"]},
        subject="checkpoint to resume from",
        hint=f"put the workdir ({workdir}) on storage that every host shares, or copy "
        "process 0's checkpoints/last.eqx to every host",
    )
    if main and not last.exists():
        print(param_summary(model), flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if main:
        print(f"Data: {_describe(train_ds, 'train')}; {_describe(test_ds, 'test')}.", flush=True)
        # Rows past the checkpoint (written before a kill) are trained again: drop them, so
        # that the logs hold each step and epoch once.
        _truncate_jsonl(workdir / "metrics.jsonl", lambda r: r.get("step", 0) < state["step"])
        _truncate_jsonl(workdir / "eval.jsonl", lambda r: r.get("epoch", 0) < state["epoch"])

    mesh = _mesh()
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    model, opt_state = eqx.filter_shard((model, opt_state), replicated)
    if not decay:
        ema = None
    elif not last.exists():
        # A copy: the training step donates the model's buffers.
        ema = jax.tree_util.tree_map(jnp.copy, eqx.filter(model, eqx.is_inexact_array))
    ema = eqx.filter_shard(ema, replicated)
    # Sharded data: each process holds its consecutive slice of every global batch.
    to_global = (
        _local_batch_to_global if isinstance(train_ds, ShardedDataset) else _host_batch_to_global
    )
    train_step, pretrain_step = (
        make_train_step(
            optimizer,
            config.data.get("augment", False),
            config.get("jacobian_penalty", 0.0),
            label_smoothing,
            solve_kwargs,
        )
        for solve_kwargs in (None, pretrain_solve)
    )
    interrupt = _Interrupt()
    # Several processes: a lost one stops the others at once, with a message naming it.
    watch = ProcessWatch(workdir, state, resumed=state["step"] if last.exists() else None)
    last_save = time.monotonic()

    def save(path, **extra):
        nonlocal last_save
        # Never replace a good checkpoint by a broken model.
        if not bool(_all_finite(eqx.filter((model, ema), eqx.is_inexact_array))):
            raise FloatingPointError(
                f"Parameters became non-finite by step {state['step']}; not saving {path.name} "
                f"(the last good checkpoint stays in {ckdir})."
            )
        if main:
            interrupt.saving = True  # a signal now waits for the save
            try:
                save_checkpoint(
                    path,
                    (model, opt_state) if ema is None else (model, opt_state, ema),
                    _ckpt_meta(config, **state, num_params=count_params(model), **extra),
                )
            finally:
                interrupt.saving = False
        if path == last:
            watch.saved(state["step"])
        last_save = time.monotonic()

    log = open(workdir / "metrics.jsonl" if main else os.devnull, "a")  # noqa: SIM115
    eval_log = open(workdir / "eval.jsonl" if main else os.devnull, "a")  # noqa: SIM115
    ckpt_every = config.get("checkpoint_every_steps", 0)
    # By time only in a single process: each process's clock would decide differently, and
    # every process must take part in a save (its finiteness check is a global computation).
    ckpt_secs = config.get("checkpoint_every_secs", 0) if jax.process_count() == 1 else 0
    # The schedule evaluated once for all steps (not one small device computation per step).
    total_steps = config.epochs * steps_per_epoch
    lrs = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(max(total_steps, 1))))

    def lr_at(step: int) -> float:
        return float(lrs[min(step, len(lrs) - 1)])

    def report(m, step, epoch, step_time):
        """Log one step's metrics (waits for that step); raise if its loss is not finite."""
        m = {k: float(v) for k, v in jax.device_get(m).items()}  # one transfer
        m.update(step=step, epoch=epoch, step_time=step_time, lr=lr_at(step))
        log.write(json.dumps(m) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{m['loss']:.3f}",
                acc=f"{m['acc']:.3f}",
                fwd=f"{m['fwd_steps']:.1f}",
                bwd=f"{m['bwd_steps']:.1f}",
            )
        elif (step + 1) % config.get("log_every", 50) == 0:
            print(
                f"epoch {epoch} step {step + 1} loss {m['loss']:.4f} "
                f"acc {m['acc']:.3f} fwd {m['fwd_steps']:.1f} bwd {m['bwd_steps']:.1f} "
                f"{m['step_time']:.3f}s",
                flush=True,
            )
        for name in ("loss", "jac"):
            if not math.isfinite(m.get(name, 0.0)):
                raise FloatingPointError(f"{name} became {m[name]} at step {step + 1}.")

    def to_device(batch):
        images, labels = batch
        x = to_global(np.asarray(train_ds.normalize(images)), data_sharding)
        return x, to_global(labels, data_sharding)

    stopped = None
    summary: dict = {}
    bar = None
    feed = None
    try:
        with interrupt, watch:
            while state["epoch"] < config.epochs and stopped is None:
                epoch = state["epoch"]
                t_epoch = t_prev = time.time()
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(total=steps_per_epoch, initial=state["batch"], desc=f"epoch {epoch}")
                batches = train_ds.batches(
                    bs, seed=config.seed, epoch=epoch, start_batch=state["batch"]
                )
                # The next batches are drawn, normalised and put on the devices in a
                # background thread while the current step runs (`data.prefetch` ahead).
                feed = prefetch(map(to_device, batches), size=ahead)
                # The host reads step k's metrics after dispatching step k + 1, so that it
                # prepares the next batch while the device computes (no per-step stall). A
                # checkpoint or a stop first reads the pending metrics, so a model whose loss
                # was non-finite is never saved.
                pending = None
                for x, y in feed:
                    if interrupt.flag:  # e.g. a signal during the last epoch's checkpoints
                        stopped = signal.Signals(interrupt.signum).name
                        break
                    step_key = jr.fold_in(aug_key, state["step"])
                    # Phase-flow probe (`ff.fractal.log_phase_flow`), before the step donates x, y.
                    every = config.get("fractal_probe_every", 0)
                    if every and state["step"] % every == 0:
                        from .fractal import log_phase_flow

                        out = workdir / "fractal.jsonl" if main else os.devnull
                        log_phase_flow(out, model, x, y, step=state["step"], epoch=epoch)
                    step_fn = pretrain_step if state["step"] < pretrain_steps else train_step
                    model, opt_state, m = step_fn(step_key, model, opt_state, x, y)
                    if ema is not None:
                        ema = ema_update(ema, model, decay)
                    # Step time: between consecutive dispatches. In steady state the loop is
                    # paced by the device (asynchronous dispatch waits on the metrics read
                    # below; synchronous CPU execution returns when the step is done).
                    now = time.time()
                    step_time, t_prev = now - t_prev, now
                    if pending is not None:
                        report(*pending)
                    pending = (m, state["step"], epoch, step_time)
                    state["step"] += 1
                    state["batch"] += 1
                    ckpt_due = (bool(ckpt_every) and state["step"] % ckpt_every == 0) or (
                        bool(ckpt_secs) and time.monotonic() - last_save >= ckpt_secs
                    )
                    if interrupt.flag:
                        stopped = signal.Signals(interrupt.signum).name
                    elif stop_after_steps is not None and state["step"] >= stop_after_steps:
                        stopped = "stop_after_steps"
                    if ckpt_due or stopped:
                        report(*pending)
                        pending = None
                    if ckpt_due and not stopped:
                        log.flush()
                        save(last)
                    if stopped:
                        break
                feed.close()  # after a `break`: stops the thread, drops prepared batches
                if pending is not None:
                    report(*pending)
                if bar is not None:
                    bar.close()
                    bar = None
                if stopped:
                    break
                epoch_time = time.time() - t_epoch
                # A signal during the evaluation stops it at once (the parameters are those
                # of the epoch's last step; a resumed run evaluates them again).
                interrupt.immediate = True
                try:
                    if interrupt.flag:
                        raise _Stop
                    ev = evaluate(
                        model if ema is None else ema_model(ema, model),
                        test_ds,
                        batch_size=config.get("eval_batch_size", 500),
                        sharding=data_sharding,
                        progress=progress,
                    )
                except _Stop:
                    stopped = signal.Signals(interrupt.signum).name
                    break
                finally:
                    interrupt.immediate = False
                ev_row = dict(
                    epoch=epoch,
                    step=state["step"],
                    epoch_time=epoch_time,
                    **{k: v for k, v in ev.items() if k != "confusion"},
                )
                eval_log.write(json.dumps(ev_row) + "\n")
                eval_log.flush()
                log.flush()
                print(
                    f"epoch {epoch}: test acc {ev['accuracy']:.4f}, "
                    f"mean steps {ev['mean_steps']:.1f}, epoch time {epoch_time:.0f}s",
                    flush=True,
                )
                state["epoch"] += 1
                state["batch"] = 0
                improved = ev["accuracy"] > state["best_acc"]
                if improved:
                    state["best_acc"] = ev["accuracy"]
                save(ckdir / f"epoch_{epoch:03d}.eqx", test_accuracy=ev["accuracy"])
                if improved:
                    save(ckdir / "best.eqx", test_accuracy=ev["accuracy"])
                save(last, test_accuracy=ev["accuracy"])
                summary = dict(ev_row)
            if stopped is not None:
                log.flush()
                save(last)
                if stopped != "stop_after_steps":
                    print(
                        f"Stopped by {stopped} at epoch {state['epoch']} step {state['step']}: "
                        f"saved {last}; training in the same workdir resumes from step "
                        f"{state['step']}.",
                        flush=True,
                    )
    finally:
        if feed is not None:
            feed.close()
        if bar is not None:
            bar.close()
        log.close()
        eval_log.close()
    summary.update(
        state=state,
        model=model,
        ema_model=None if ema is None else ema_model(ema, model),
        stopped=stopped,
    )
    return summary


def load_model(path: str | os.PathLike, *, with_meta: bool = False):
    """Rebuild a trained model from a checkpoint written by `train` (one call).

    `path` is a `.eqx` checkpoint (with its `.json` beside it) or a training workdir (its best
    checkpoint is used). Returns the model, or `(model, meta)` with `with_meta=True`; for a
    run with `config.ema > 0`, the model with the averaged parameters (the one evaluated).
    """
    path = Path(path)
    if path.is_dir():
        for cand in (path / "checkpoints" / "best.eqx", path / "best.eqx", path / "last.eqx"):
            if cand.exists():
                path = cand
                break
    meta = read_meta(path)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(
            f"Checkpoint metadata {path}.json has no training config; load the arrays with "
            "`ff.load_checkpoint(path, like)` instead."
        )
    config = ml_collections.ConfigDict(meta["config"])
    model = build_model(config, key=jr.PRNGKey(0))
    optimizer, _ = build_optimizer(config, 1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    try:
        if config.get("ema", 0.0):
            like = (model, opt_state, eqx.filter(model, eqx.is_inexact_array))
            model, _, ema = load_checkpoint(path, like)
            model = ema_model(ema, model)
        else:
            model, _ = load_checkpoint(path, (model, opt_state))
    except CheckpointError as full:
        if full.kind == "corrupt":
            raise
        # Model-only checkpoints (e.g. the shipped one) hold just the model.
        try:
            model = load_checkpoint(path, model)
        except CheckpointError:
            raise full from None
    return (model, meta) if with_meta else model


def export_model(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Write a model-only copy of checkpoint `src` (no optimiser state) to `dst`."""
    model, meta = load_model(src, with_meta=True)
    save_checkpoint(dst, model, meta)


def run_summary(workdir: str | os.PathLike) -> dict:
    """What a training workdir reached: its config, real parameter count (from the config,
    without initialising weights) and per-epoch evaluations from `eval.jsonl`."""
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{workdir} is not a training workdir (no config.json).")
    config = json.loads(config_path.read_text())
    shapes = eqx.filter_eval_shape(
        build_model, ml_collections.ConfigDict(config), key=jr.PRNGKey(0)
    )
    eval_path = workdir / "eval.jsonl"
    lines = eval_path.read_text().splitlines() if eval_path.exists() else []
    epochs = [json.loads(line) for line in lines if line.strip()]
    keep = ("epoch", "step", "accuracy", "mean_steps", "mean_residual", "failed", "n")
    return dict(
        workdir=str(workdir),
        config=config,
        params=count_params(shapes),
        epochs=[
            {k: e[k] for k in keep if k in e} | {"epoch_time_s": round(e["epoch_time"], 1)}
            for e in epochs
        ],
    )

"""Fractal Atlas: encodings, kernel, master/key split, lossless codec, training, script."""

import importlib.util
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import fractal_field as ff
from fractal_field import atlas
from fractal_field.atlas import _codec

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "atlas_kjv.py") + ":smoke"
TEXT = (
    b"In the beginning God created the heaven and the earth.\n"
    b"And the earth was without form, and void; and darkness was upon the face of the deep.\n"
) * 6
TINY = dict(
    context=4, embed_dim=4, width=16, octaves=4, grid_levels=3, table_size=32, key_size=6, steps=3
)


@pytest.fixture
def x64():
    # Restores the previous setting (another module may run with x64 on in this process).
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def master():
    return atlas.AtlasMaster(atlas.build_alphabet([TEXT]), key=jr.PRNGKey(0), **TINY)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))]


# ---------------------------------------------------------------------------------------------
# Encodings


@pytest.mark.parametrize("octaves", [1, 5])
def test_fourier_features_formula(octaves):
    x = np.array([0.0, 0.137, 0.5, 0.999])
    got = jax.vmap(atlas.FourierFeatures(octaves))(jnp.asarray(x, jnp.float32))
    f = np.pi * 2.0 ** np.arange(octaves)
    want = np.concatenate([np.sin(x[:, None] * f), np.cos(x[:, None] * f)], axis=1)
    np.testing.assert_allclose(got, want, atol=2e-5)


def _grid_reference(tables, resolutions, x):
    """Independent numpy hash grid: hash, gather and lerp per level."""
    out = []
    size = tables.shape[1]
    for level, res in enumerate(resolutions):
        s = min(max(x, 0.0), 1.0) * res
        v0 = min(int(np.floor(s)), res - 1)
        w = s - v0

        def slot(v, res=res):
            return v if res + 1 <= size else (v * 2654435761) % 2**32 % size

        out.append((1 - w) * tables[level, slot(v0)] + w * tables[level, slot(v0 + 1)])
    return np.concatenate(out)


@pytest.mark.parametrize("table_size", [8, 64])
def test_hash_grid_matches_direct_formula(table_size):
    grid = atlas.HashGrid1D(4, table_size, 3, base_resolution=4, growth=2.0, key=jr.PRNGKey(1))
    grid = eqx.tree_at(lambda g: g.tables, grid, jr.normal(jr.PRNGKey(2), grid.tables.shape))
    assert grid.resolutions == (4, 8, 16, 32)
    xs = np.array([0.0, 0.01, 0.3, 0.55, 0.7777, 1.0], np.float32)
    got = np.asarray(jax.jit(lambda x: jax.vmap(grid)(x))(jnp.asarray(xs)))
    tables = np.asarray(grid.tables, np.float64)
    for x, row in zip(xs, got, strict=True):
        np.testing.assert_allclose(
            row, _grid_reference(tables, grid.resolutions, float(x)), atol=1e-5
        )


def test_hash_grid_interpolates_linearly_between_vertices():
    grid = atlas.HashGrid1D(1, 64, 2, base_resolution=10, key=jr.PRNGKey(0))
    grid = eqx.tree_at(lambda g: g.tables, grid, jr.normal(jr.PRNGKey(3), grid.tables.shape))
    t = np.asarray(grid.tables[0])
    # At vertices: the table entries; inside a cell: a straight line between them.
    ws = np.array([0.0, 0.25, 0.5, 0.9])
    got = jax.jit(lambda x: jax.vmap(grid)(x))(jnp.asarray((3 + ws) / 10, jnp.float32))
    np.testing.assert_allclose(got[0], t[3], atol=1e-6)
    np.testing.assert_allclose(got, (1 - ws[:, None]) * t[3] + ws[:, None] * t[4], atol=1e-5)
    # Constant derivative inside the cell.
    d = jax.jit(lambda x: jax.vmap(jax.jacfwd(grid))(x))(jnp.array([0.31, 0.35, 0.39]))
    np.testing.assert_allclose(d, np.broadcast_to(10 * (t[4] - t[3]), d.shape), rtol=1e-4)


@pytest.mark.parametrize("res, size", [(15, 16), (100, 16), (1000, 64)])
def test_hash_grid_collisions(res, size):
    slots = np.asarray(atlas.hash_index(np.arange(res + 1), res, size))
    assert slots.min() >= 0 and slots.max() < size
    expected = (
        0
        if res + 1 <= size
        else res + 1 - len(set(((np.arange(res + 1) * 2654435761) % 2**32 % size).tolist()))
    )
    assert atlas.collision_count(res, size) == expected
    if res + 1 > size:
        assert expected > 0
        # Colliding vertices read the same table row: equal features there.
        grid = atlas.HashGrid1D(1, size, 2, base_resolution=res, key=jr.PRNGKey(0))
        grid = eqx.tree_at(lambda g: g.tables, grid, jr.normal(jr.PRNGKey(4), grid.tables.shape))
        a = int(np.flatnonzero(slots == slots[np.argmax(np.bincount(slots))])[0])
        b = int(np.flatnonzero(slots == slots[a])[1])
        np.testing.assert_allclose(
            grid(jnp.float32(a / res)), grid(jnp.float32(b / res)), atol=1e-5
        )


def test_encoding_errors():
    with pytest.raises(ValueError, match="octaves"):
        atlas.FourierFeatures(0)
    with pytest.raises(ValueError, match="table_size"):
        atlas.HashGrid1D(2, 1, key=jr.PRNGKey(0))


# ---------------------------------------------------------------------------------------------
# Kernel


def test_kernel_is_contractive_and_iterates_with_shared_weights():
    k = atlas.AtlasKernel(8, rho=0.5, key=jr.PRNGKey(0))
    k = eqx.tree_at(lambda m: m.weight, k, 3 * jr.normal(jr.PRNGKey(1), (8, 8)))
    w = np.asarray(k.matrix(), np.float64)
    assert np.linalg.norm(w, 2) <= 0.5 + 1e-6
    u = np.asarray(jr.normal(jr.PRNGKey(2), (8,)), np.float64)
    h, hist = np.zeros(8), []
    for _ in range(5):
        h = np.tanh(w @ h + u)
        hist.append(h)
    np.testing.assert_allclose(atlas.iterate(k, jnp.asarray(u, jnp.float32), 5), h, atol=1e-5)
    rec = atlas.iterate(k, jnp.asarray(u, jnp.float32), 5, record=True)
    np.testing.assert_allclose(rec, np.stack(hist), atol=1e-5)


@pytest.mark.parametrize("blocks", [2, 4])
def test_sparse_updates_touch_one_block_per_step(blocks):
    k = atlas.AtlasKernel(8, key=jr.PRNGKey(0))
    u = jr.normal(jr.PRNGKey(2), (8,))
    rec = np.asarray(atlas.iterate(k, u, 2 * blocks, blocks=blocks, record=True))
    w, size = np.asarray(k.matrix()), 8 // blocks
    h = np.zeros(8)
    for t in range(2 * blocks):
        b = slice((t % blocks) * size, (t % blocks + 1) * size)
        prev = h.copy()
        h[b] = np.tanh(w[b] @ prev + np.asarray(u)[b])
        np.testing.assert_allclose(rec[t], h, atol=1e-5)
        # Every unit outside the step's block is static (bitwise).
        before = rec[t - 1] if t else np.zeros(8, np.float32)
        outside = np.delete(np.arange(8), np.arange(8)[b])
        np.testing.assert_array_equal(rec[t][outside], before[outside])
    with pytest.raises(ValueError, match="divide"):
        atlas.iterate(k, u, 4, blocks=3)


def test_fixed_point_solve_and_implicit_gradient(x64):
    k = atlas.AtlasKernel(6, rho=0.8, key=jr.PRNGKey(0))
    k = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, k)
    u = jr.normal(jr.PRNGKey(2), (6,), jnp.float64)
    adjoint = ff.ImplicitAdjoint(solver=ff.Naive(), max_steps=80, rtol=1e-12)

    @jax.jit
    def fp(u):
        h = atlas.solve(
            k, u, max_steps=80, rtol=1e-12, atol=0.0, solver=ff.Naive(), adjoint=adjoint
        ).value
        return jnp.sum(jnp.sin(h)), h

    @jax.jit
    def unrolled(u):
        h = atlas.iterate(k, u, 120)
        return jnp.sum(jnp.sin(h)), h

    (_, h), g_fp = jax.value_and_grad(fp, has_aux=True)(u)
    (_, h_un), g_un = jax.value_and_grad(unrolled, has_aux=True)(u)
    np.testing.assert_allclose(h, k(h, u), atol=1e-10)
    np.testing.assert_allclose(h, h_un, atol=1e-10)
    # Implicit gradient vs the derivative of a long unrolled iteration.
    np.testing.assert_allclose(g_fp, g_un, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Master / key


def test_master_modes_and_errors(master):
    ctx, key = jnp.array([1, 2, 3, master.pad]), jnp.zeros(6)
    assert master(ctx, 0.3, key).shape == (master.num_symbols,)
    it = master.iterates(ctx, 0.3, key)
    np.testing.assert_allclose(it[-1], master(ctx, 0.3, key), atol=1e-6)
    fp = atlas.with_iterations(master, fixed_point=True)
    long = atlas.with_iterations(master, 60)
    np.testing.assert_allclose(fp(ctx, 0.3, key), long(ctx, 0.3, key), atol=1e-4)
    with pytest.raises(ValueError, match="divide"):
        atlas.with_iterations(master, blocks=5)
    with pytest.raises(ValueError, match="context"):
        atlas.AtlasMaster(b"ab", context=-1, key=jr.PRNGKey(0))


def test_fit_key_changes_only_the_key(master):
    before = _leaves(master)
    corpus = atlas.Corpus(master.alphabet, {"b": TEXT})
    batch = corpus.batch(np.random.default_rng(0), 256, master.context)
    zero = jnp.zeros((1, master.key_size))
    key = atlas.fit_key(master, TEXT, steps=20, batch_size=64, lr=5e-2)
    for a, b in zip(_leaves(master), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(key)).max() > 0
    loss0 = atlas.bits_per_char(master, zero, *batch)
    loss1 = atlas.bits_per_char(master, key[None], *batch)
    assert loss1 < loss0 - 0.01, (loss0, loss1)
    # The frozen step returns the very master it was given, and only the keys' optimiser state.
    import optax

    opt = optax.sgd(0.1)
    step = atlas.make_step(opt, freeze_master=True)
    m2, k2, _, _ = step(master, zero, opt.init(zero), *batch)
    for a, b in zip(_leaves(m2), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(k2, zero)


# ---------------------------------------------------------------------------------------------
# Codec


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(_codec, "MIN_CHUNK", 100)


def test_round_trip_with_unseen_bytes_and_chunks(master, small_chunks):
    key = jr.normal(jr.PRNGKey(5), (master.key_size,))
    book = TEXT[:300] + b"Zebra \xc3\xa9 {~}\x00" + TEXT[300:]  # bytes the alphabet lacks
    assert atlas.layout(len(book))[0] > 1
    blob, stats = atlas.encode(master, key, book, return_stats=True)
    assert stats["escapes"] == 7
    assert atlas.decode(master, blob) == book
    assert atlas.encode(master, key, book) == blob  # deterministic
    np.testing.assert_array_equal(atlas.stream_key(blob), np.asarray(key, np.float16))
    assert atlas.decode(master, atlas.encode(master, key, b"")) == b""
    assert atlas.decode(master, atlas.encode(master, key, b"Q")) == b"Q"


def test_stream_length_matches_model_cross_entropy(master, small_chunks):
    m = master
    key = jnp.zeros(master.key_size)
    n = len(TEXT)
    chunks, length = atlas.layout(n)
    counts, grid = atlas.model_counts(
        atlas.round_to_storage(m), key, atlas.to_ids(m.alphabet, TEXT), chunks, length
    )
    flat = counts.reshape(-1, m.num_symbols)[:n]
    ideal = atlas.ideal_bits(flat, grid.reshape(-1)[:n])
    # The same cross-entropy from the float model (no quantisation) in a plain vmap.
    ids = atlas.to_ids(m.alphabet, TEXT)
    ctx = np.full((n, m.context), m.pad)
    pos = np.arange(n) % length
    for j in range(m.context):
        ok = pos - m.context + j >= 0
        ctx[ok, j] = ids[np.arange(n)[ok] - m.context + j]
    xs = (np.arange(n) / n).astype(np.float32)
    ce = float(
        n
        * atlas.bits_per_char(
            atlas.round_to_storage(m),
            key[None],
            jnp.asarray(ctx),
            jnp.asarray(xs),
            jnp.zeros(n, int),
            jnp.asarray(ids),
        )
    )
    assert abs(ideal - ce) < 1e-3 * ce, (ideal, ce)
    blob, stats = atlas.encode(m, key, TEXT, return_stats=True)
    assert stats["ideal_bits"] == pytest.approx(ideal)
    assert ideal <= stats["stream_bits"] <= ideal + 64 + 1e-3 * ideal


def test_frequencies_are_reproducible_after_recompiling(master):
    ctx = jnp.asarray(np.random.default_rng(0).integers(0, master.pad + 1, (7, master.context)))
    xs = jnp.linspace(0, 1, 7)
    key = jnp.ones(master.key_size)
    a = np.asarray(atlas.step_counts(master, key, ctx, xs))
    eqx.clear_caches()
    jax.clear_caches()
    b = np.asarray(atlas.step_counts(master, key, ctx, xs))
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 1 and a.sum(-1).max() <= 2**atlas.PRECISION


def test_corrupt_streams_and_foreign_masters_are_rejected(master, tmp_path):
    key = jnp.zeros(master.key_size)
    blob = bytearray(atlas.encode(master, key, TEXT[:200]))
    bad = blob.copy()
    bad[len(bad) // 2] ^= 0x10
    with pytest.raises(atlas.AtlasFormatError, match="corrupt"):
        atlas.decode(master, bytes(bad))
    with pytest.raises(atlas.AtlasFormatError, match="magic"):
        atlas.decode(master, b"GARBAGE" + bytes(blob))
    with pytest.raises(atlas.AtlasFormatError, match="checksum"):
        atlas.decode(master, bytes(blob[:-9]))
    other = atlas.AtlasMaster(master.alphabet, key=jr.PRNGKey(9), **TINY)
    with pytest.raises(atlas.AtlasFormatError, match="another master"):
        atlas.decode(other, bytes(blob))
    atlas.save_key(tmp_path / "k.key", master, key)
    with pytest.raises(atlas.AtlasFormatError, match="another master"):
        atlas.load_key(tmp_path / "k.key", other)
    with pytest.raises(ValueError, match="shape"):
        atlas.encode(master, jnp.zeros(3), TEXT)
    with pytest.raises(TypeError, match="bytes"):
        atlas.encode(master, key, TEXT.decode())


@pytest.mark.parametrize("shape", [(40, 30), (3, 64, 2), (7,)])
def test_storage_rounding_is_idempotent_and_close(shape):
    rng = np.random.default_rng(0)
    scale = rng.uniform(1e-3, 5, (shape[0],) + (1,) * (len(shape) - 1))
    x = jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
    once = atlas.round_to_storage(x)
    np.testing.assert_array_equal(atlas.round_to_storage(once), once)
    if len(shape) >= 2:  # int8 rows: error at most half a step of 2**e <= amax / 63.5
        amax = np.abs(np.asarray(x)).reshape(shape[0], -1).max(1)
        err = np.abs(np.asarray(once - x)).reshape(shape[0], -1).max(1)
        assert np.all(err <= 0.5 * amax / 63.5 + 1e-12)
    else:
        np.testing.assert_array_equal(once, np.asarray(x, np.float16).astype(np.float32))


def test_master_and_key_files_round_trip(master, tmp_path):
    atlas.save_master(tmp_path / "m.eqx", master)
    loaded = atlas.load_master(tmp_path / "m.eqx")
    assert atlas.master_hash(loaded) == atlas.master_hash(atlas.round_to_storage(master))
    assert atlas.packed_bytes(master) < 1.2 * atlas.master_size(master)
    assert atlas.master_bytes(tmp_path / "m.eqx") < atlas.packed_bytes(master) + 8000
    key = jr.normal(jr.PRNGKey(1), (master.key_size,))
    atlas.save_key(tmp_path / "k.key", loaded, key)
    np.testing.assert_array_equal(
        atlas.load_key(tmp_path / "k.key", loaded), np.asarray(key, np.float16).astype(np.float32)
    )
    raw = bytearray((tmp_path / "k.key").read_bytes())
    raw[-6] ^= 1
    (tmp_path / "k.key").write_bytes(bytes(raw))
    with pytest.raises(atlas.AtlasFormatError, match="corrupt"):
        atlas.load_key(tmp_path / "k.key", loaded)


# ---------------------------------------------------------------------------------------------
# Training and the script


def _script():
    spec = importlib.util.spec_from_file_location("atlas_script", ROOT / "scripts" / "atlas.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(tmp_path, monkeypatch):
    from fractal_field.atlas import _train

    config = ff.load_config(SMOKE)
    books = atlas.synthetic_books(2, 2000)
    orig = _train.save_checkpoint

    def dies_after_step_8(path, tree, meta):
        orig(path, tree, meta)
        if meta["step"] == 8:
            raise KeyboardInterrupt  # killed right after the periodic checkpoint

    monkeypatch.setattr(_train, "save_checkpoint", dies_after_step_8)
    with pytest.raises(KeyboardInterrupt):
        atlas.train_master(config, tmp_path / "run", books)
    monkeypatch.setattr(_train, "save_checkpoint", orig)
    meta = json.loads((tmp_path / "run/checkpoints/last.eqx.json").read_text())
    assert meta["step"] == 8
    resumed = atlas.train_master(config, tmp_path / "run", books)
    full = atlas.train_master(config, tmp_path / "full", books)
    assert resumed["step"] == full["step"] == config.train_steps
    for a, b in zip(
        _leaves((resumed["master"], resumed["keys"])),
        _leaves((full["master"], full["keys"])),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    rows = [json.loads(r) for r in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12]
    with pytest.raises(ValueError, match="another config"):
        atlas.train_master(ff.load_config(SMOKE, ["model.width=8"]), tmp_path / "run", books)


def test_script_train_fit_encode_decode_sample(tmp_path, capsys):
    script = _script()
    wd = tmp_path / "wd"
    script.main(["train", "--config", SMOKE, "--workdir", str(wd)])
    master_path = wd / "master.eqx"
    assert (wd / "keys" / "00_Synthetic.key").exists()
    assert not (wd / "keys" / "02_Synthetic.key").exists()  # held out
    book = tmp_path / "book.txt"
    book.write_bytes(atlas.synthetic_books(3, 600)["02_Synthetic"] + b"\xff unseen")
    script.main(
        [
            "fit-key",
            "--master",
            str(master_path),
            "--book",
            str(book),
            "--out",
            str(tmp_path / "b.key"),
            "--steps",
            "3",
        ]
    )
    script.main(
        [
            "encode",
            "--master",
            str(master_path),
            "--key",
            str(tmp_path / "b.key"),
            "--book",
            str(book),
            "--out",
            str(tmp_path / "b.atlas"),
        ]
    )
    script.main(
        [
            "decode",
            "--master",
            str(master_path),
            "--stream",
            str(tmp_path / "b.atlas"),
            "--out",
            str(tmp_path / "back.txt"),
        ]
    )
    assert (tmp_path / "back.txt").read_bytes() == book.read_bytes()
    capsys.readouterr()
    script.main(
        [
            "sample",
            "--master",
            str(master_path),
            "--key",
            str(tmp_path / "b.key"),
            "--length",
            "600",
            "--start",
            "0.5",
            "--end",
            "0.55",
        ]
    )
    assert len(capsys.readouterr().out) == 30 + 1
    other = atlas.AtlasMaster(
        atlas.load_master(master_path).alphabet,
        key=jr.PRNGKey(7),
        **ff.load_config(SMOKE).model.to_dict(),
    )
    atlas.save_master(tmp_path / "other.eqx", other)
    with pytest.raises(SystemExit, match="another master"):
        script.main(
            [
                "decode",
                "--master",
                str(tmp_path / "other.eqx"),
                "--stream",
                str(tmp_path / "b.atlas"),
                "--out",
                str(tmp_path / "x.txt"),
            ]
        )

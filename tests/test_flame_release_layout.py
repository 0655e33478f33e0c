"""The procedural head in the FLAME release layout (issue 16, part 3).

The release ``generic_model.pkl`` keeps identity in shapedirs columns 0..299 and expression
from column 300, and FLAME layers (the official one included) slice ``[300:300 + n_exp]``
without reading any column count. These tests check that layout, that the pickle is plain
numpy (plain ``pickle``, the project's restricted unpicklers, numpy-1 module names), that a
file without ``n_shape_total`` keeps its expressions, and that nothing built on the head
changes numerically.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

from gpavatar.data.safe_pickle import safe_load_path
from gpavatar.flame import FLAME, load_flame_model
from gpavatar.flame.procedural import (EXPRESSION_NAMES, MODEL_KEYS, make_procedural_head, procedural_head_path,
                                       save_procedural_head)
from gpavatar.flame.release import flame_pickle_bytes, to_release_layout, write_flame_pickle

SMALL = dict(n_shape=14, n_exp=17)  # the named columns and a few random ones: fast to build


@pytest.fixture(scope="module")
def heads():
    return make_procedural_head(**SMALL), make_procedural_head(layout="compact", **SMALL)


def official_style_vertices(fields, shape, expression):
    """v_template + shape · S[:, :, :n] + expression · S[:, :, 300:300 + m], the slicing FLAME layers
    written for the release file do (no n_shape_total read): float64, no pose."""
    S = np.asarray(fields["shapedirs"], np.float64)
    return (fields["v_template"] + S[:, :, :len(shape)] @ shape
            + S[:, :, 300:300 + len(expression)] @ expression)


def test_release_columns(heads):
    release, compact = heads
    S, E = SMALL["n_shape"], SMALL["n_exp"]
    assert compact["shapedirs"].shape[2] == S + E and int(compact["n_shape_total"]) == S
    assert release["shapedirs"].shape == (5023, 3, 300 + E) and int(release["n_shape_total"]) == 300
    np.testing.assert_array_equal(release["shapedirs"][:, :, :S], compact["shapedirs"][:, :, :S])
    assert not release["shapedirs"][:, :, S:300].any()  # identity padding: zeros
    np.testing.assert_array_equal(release["shapedirs"][:, :, 300:], compact["shapedirs"][:, :, S:])
    for key in set(release) - {"shapedirs", "n_shape_total"}:
        np.testing.assert_array_equal(release[key], compact[key], err_msg=key)


def test_official_slicing_reads_the_expressions(heads):
    """A reader that only knows 'expression starts at 300' moves the mouth with 'smile' on the release
    file, and sees the compact file's expression columns as (zero-effect) identity padding."""
    release, compact = heads
    expression = np.zeros(SMALL["n_exp"])
    expression[EXPRESSION_NAMES.index("smile")] = 2.0
    shape = np.zeros(SMALL["n_shape"])
    moved = official_style_vertices(release, shape, expression) - release["v_template"]
    assert np.abs(moved).max() > 0.005  # 2 units of smile: millimetres
    np.testing.assert_allclose(moved, compact["shapedirs"][:, :, SMALL["n_shape"]:] @ expression, atol=1e-9)


def test_flame_layer_gives_identical_vertices_for_both_layouts(heads):
    release, compact = heads
    S, E = SMALL["n_shape"], SMALL["n_exp"]
    layers = [FLAME.clamped(fields, n_shape=S, n_exp=E) for fields in (release, compact)]
    assert [(f.n_shape, f.n_exp) for f in layers] == [(S, E), (S, E)]
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(3, S, generator=g), torch.randn(3, E, generator=g), 0.2 * torch.randn(3, 6, generator=g))
    assert torch.equal(layers[0].shapedirs, layers[1].shapedirs)
    assert torch.equal(layers[0](*args), layers[1](*args))  # bit for bit


def test_default_cached_head_feeds_the_demo_and_datasets_unchanged(tmp_path):
    """The cached release-layout file gives the FLAME layer every consumer uses (100 identity + 50
    expression) with the same buffers as the compact layout: the bundled tiny model's inputs, hence its
    renders, are unchanged."""
    from gpavatar.data.official import dataset_flame

    layer = dataset_flame(tmp_path)  # no FLAME file there: the (cached) procedural head
    assert (layer.n_shape, layer.n_exp) == (100, 50)
    compact = FLAME.clamped(make_procedural_head(layout="compact"))
    assert torch.equal(layer.shapedirs, compact.shapedirs) and torch.equal(layer.posedirs, compact.posedirs)
    with np.load(procedural_head_path(), allow_pickle=False) as archive:
        assert archive["shapedirs"].shape == (5023, 3, 350) and int(archive["n_shape_total"]) == 300


def test_pickle_is_plain_numpy_and_loads_everywhere(tmp_path, heads):
    release, _ = heads
    path = save_procedural_head(tmp_path / "generic_model.pkl", **SMALL)
    data = path.read_bytes()
    assert b"numpy._core" not in data and b"numpy.core.multiarray" in data  # numpy 1.x can import these names
    assert data[:2] == b"\x80\x04"  # protocol 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2 resolves numpy.core.* for old pickles without a deprecation
        with open(path, "rb") as handle:
            plain = pickle.load(handle, encoding="latin1")  # what the official FLAME layer does
    safe = safe_load_path(path)
    assert set(plain) == set(safe) == set(release)
    for key, value in release.items():
        for loaded in (plain, safe):
            assert type(loaded[key]) is np.ndarray and loaded[key].dtype == value.dtype, key
            assert loaded[key].shape == value.shape, key  # 0-d n_shape_total stays 0-d
            np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    from_pkl, from_npz = load_flame_model(path), load_flame_model(save_procedural_head(tmp_path / "h.npz", **SMALL))
    for key in from_npz:
        np.testing.assert_array_equal(from_pkl[key], from_npz[key], err_msg=key)


def test_without_n_shape_total_the_expressions_stay(tmp_path, heads):
    release, _ = heads
    fields = {k: v for k, v in release.items() if k != "n_shape_total"}
    path = write_flame_pickle(tmp_path / "no_count.pkl", fields)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the release layout needs no warning
        model = load_flame_model(path)
    assert int(model["n_shape_total"]) == 300
    with_key = FLAME.clamped(release, n_shape=SMALL["n_shape"], n_exp=SMALL["n_exp"])
    without = FLAME.clamped(model, n_shape=SMALL["n_shape"], n_exp=SMALL["n_exp"])
    assert without.n_exp == SMALL["n_exp"]
    expression = torch.zeros(1, SMALL["n_exp"])
    expression[0, EXPRESSION_NAMES.index("lips_part")] = 2.0
    args = (torch.zeros(1, SMALL["n_shape"]), expression, torch.zeros(1, 6))
    assert torch.equal(without(*args), with_key(*args))
    assert (without(*args) - without(args[0], torch.zeros_like(expression), args[2])).abs().max() > 0.01


def test_old_compact_files_still_load(tmp_path, heads):
    """A compact file (expression right after identity) written before the release layout loads with its
    n_shape_total and gives the same vertices; without the key it is read as identity only, with a warning
    saying so instead of silently dropping the expressions."""
    release, compact = heads
    np.savez(tmp_path / "old.npz", **compact)
    old = FLAME.clamped(tmp_path / "old.npz", n_shape=SMALL["n_shape"], n_exp=SMALL["n_exp"])
    new = FLAME.clamped(release, n_shape=SMALL["n_shape"], n_exp=SMALL["n_exp"])
    assert torch.equal(old.shapedirs, new.shapedirs)
    fields = {k: v for k, v in compact.items() if k != "n_shape_total"}
    with pytest.warns(UserWarning, match="no expression"):
        model = load_flame_model(write_flame_pickle(tmp_path / "old.pkl", fields))
    assert int(model["n_shape_total"]) == SMALL["n_shape"] + SMALL["n_exp"]


def test_release_layout_of_other_models():
    fields = {"shapedirs": np.arange(2 * 3 * 7, dtype=np.float32).reshape(2, 3, 7), "n_shape_total": np.int64(4)}
    out = to_release_layout(fields)
    assert out["shapedirs"].shape == (2, 3, 303) and int(out["n_shape_total"]) == 300
    np.testing.assert_array_equal(out["shapedirs"][:, :, 300:], fields["shapedirs"][:, :, 4:])
    np.testing.assert_array_equal(out["shapedirs"][:, :, :4], fields["shapedirs"][:, :, :4])
    assert to_release_layout(out)["shapedirs"].shape == (2, 3, 303)  # idempotent
    with pytest.raises(ValueError, match="n_shape_total must be in"):
        to_release_layout({"shapedirs": np.zeros((2, 3, 310)), "n_shape_total": np.int64(305)})
    with pytest.raises(ValueError, match="no n_shape_total"):
        to_release_layout({"shapedirs": np.zeros((2, 3, 150))})


@pytest.mark.parametrize("call, error, match", [
    (lambda tmp: make_procedural_head(n_shape=301), ValueError, "n_shape must be <= 300"),
    (lambda tmp: make_procedural_head(layout="official", **SMALL), ValueError, "layout must be one of"),
    (lambda tmp: save_procedural_head(tmp / "head.txt", **SMALL), ValueError, r"must end in \.npz or \.pkl"),
    (lambda tmp: procedural_head_path(directory=tmp, suffix=".zip", **SMALL), ValueError, "suffix must be"),
    (lambda tmp: flame_pickle_bytes({"f": np.array(["a"])}), TypeError, "field 'f' must be a numeric"),
])
def test_bad_arguments(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cached_pickle_and_atomic_write(tmp_path):
    path = procedural_head_path(directory=tmp_path, suffix=".pkl", **SMALL)
    assert path.suffix == ".pkl" and path.parent == tmp_path
    assert set(load_flame_model(path)) >= set(MODEL_KEYS) - {"vc"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    path.write_bytes(b"old")

    class Unpicklable:
        pass

    with pytest.raises(TypeError):
        write_flame_pickle(path, {"v_template": Unpicklable()})
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]

"""FLAME layer and chumpy-free loader on small synthetic FLAME-format models (no real asset needed).

Oracle: an independent float64 NumPy FLAME (own Rodrigues, kinematic chain in
rotation + joint form instead of 4x4 matrices). Tolerances: float64 1e-10
(rounding only); float32 1e-5 on coordinates of size ~1 (after the x5 scale),
i.e. ~100 ulp of accumulated rounding through the chain and the skinning sums.
"""

import collections
import contextlib
import copyreg
import io
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from gpavatar.flame import FLAME, load_flame_model, load_landmark_embedding, save_flame_model
from gpavatar.flame.loader import FlameUnpickler, normalize_flame_model, read_flame_pickle

PARENTS = [-1, 0, 1, 1, 1]  # root, neck, jaw, left eye, right eye
JAW = 2
N_SHAPE_TOTAL, N_EXP_TOTAL = 8, 5


def make_fields(V=50, F=60, seed=0, n_shape_total=N_SHAPE_TOTAL, n_exp_total=N_EXP_TOTAL):
    """Raw float64 FLAME fields as the official file lays them out (posedirs (V, 3, 36))."""
    rng = np.random.default_rng(seed)
    J = len(PARENTS)
    weights = rng.random((V, J)) ** 3
    weights[: V // 2, JAW] = 0.0  # first half of the vertices ignores the jaw
    weights /= weights.sum(axis=1, keepdims=True)
    J_regressor = rng.random((J, V)) * (rng.random((J, V)) < 0.3)
    J_regressor[:, 0] += 1e-3  # no empty row
    J_regressor /= J_regressor.sum(axis=1, keepdims=True)
    posedirs = rng.normal(0.0, 0.01, (V, 3, 9 * (J - 1)))
    posedirs[weights[:, JAW] == 0, :, 9:18] = 0.0  # jaw correctives only where the jaw skins
    return {
        "v_template": rng.normal(0.0, 0.1, (V, 3)),
        "f": rng.integers(0, V, (F, 3)).astype(np.uint32),
        "shapedirs": rng.normal(0.0, 0.01, (V, 3, n_shape_total + n_exp_total)),
        "n_shape_total": np.int64(n_shape_total),
        "posedirs": posedirs,
        "J_regressor": J_regressor,
        "weights": weights,
        "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], list(range(J))], dtype=np.uint32),
        "bs_style": "lbs",  # extra keys are ignored
    }


def make_embedding(num_faces, seed=0):
    rng = np.random.default_rng(seed)

    def bary(*shape):
        b = rng.random(shape + (3,)) + 0.1
        return b / b.sum(-1, keepdims=True)

    return {
        "static_lmk_faces_idx": rng.integers(0, num_faces, 51), "static_lmk_bary_coords": bary(51),
        "dynamic_lmk_faces_idx": rng.integers(0, num_faces, (79, 17)), "dynamic_lmk_bary_coords": bary(79, 17),
        "full_lmk_faces_idx": rng.integers(0, num_faces, (1, 68)), "full_lmk_bary_coords": bary(1, 68),
    }


def rodrigues_np(r):
    phi = np.linalg.norm(r + 1e-8)
    k = r / phi
    K = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(phi) * K + (1.0 - np.cos(phi)) * K @ K


def reference_flame(fields, n_shape, n_exp, shape, expression, full_pose, scale):
    """float64 NumPy FLAME, one batch element at a time: (B, V, 3)."""
    nst = int(fields["n_shape_total"])
    S = np.concatenate([fields["shapedirs"][:, :, :n_shape], fields["shapedirs"][:, :, nst:nst + n_exp]], axis=2)
    out = []
    for beta, pose in zip(np.concatenate([shape, expression], axis=1), full_pose):
        v_shaped = fields["v_template"] + S @ beta
        joints = fields["J_regressor"] @ v_shaped
        R = [rodrigues_np(pose[3 * j:3 * j + 3]) for j in range(5)]
        feature = np.concatenate([(R[j] - np.eye(3)).ravel() for j in range(1, 5)])
        v_posed = v_shaped + fields["posedirs"] @ feature
        R_world, J_posed = [None] * 5, [None] * 5
        for j, p in enumerate(PARENTS):
            if p < 0:
                R_world[j], J_posed[j] = R[j], joints[j]
            else:
                R_world[j] = R_world[p] @ R[j]
                J_posed[j] = J_posed[p] + R_world[p] @ (joints[j] - joints[p])
        verts = sum(fields["weights"][:, j:j + 1] * ((v_posed - joints[j]) @ R_world[j].T + J_posed[j])
                    for j in range(5))
        out.append(verts * scale)
    return np.stack(out)


def random_inputs(B, n_shape, n_exp, pose_width=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, n_shape, generator=g, dtype=dtype), torch.randn(B, n_exp, generator=g, dtype=dtype),
            0.3 * torch.randn(B, pose_width, generator=g, dtype=dtype))


def full_pose_np(pose):
    pose = pose.numpy()
    if pose.shape[1] == 15:
        return pose
    zeros = np.zeros((pose.shape[0], 3))
    return np.concatenate([pose[:, :3], zeros, pose[:, 3:], zeros, zeros], axis=1)


# ----------------------------------------------------------------------------------------------- layer


def test_output_shapes_and_buffers():
    fields = make_fields()
    flame = FLAME(fields, n_shape=6, n_exp=4, landmark_embedding=make_embedding(60))
    assert flame.shapedirs.shape == (50, 3, 10) and flame.posedirs.shape == (36, 150)
    assert flame.faces.dtype == torch.int64 and flame.parents.tolist() == PARENTS
    assert flame.state_dict() == {}  # assets come from the model file, not checkpoints
    out = flame.full_output(*random_inputs(3, 6, 4, dtype=torch.float32))
    assert out.vertices.shape == (3, 50, 3) and out.joints.shape == (3, 5, 3)
    assert out.landmarks2d.shape == (3, 68, 3) and out.landmarks3d.shape == (3, 68, 3)
    assert flame(*random_inputs(3, 6, 4, dtype=torch.float32)).shape == (3, 50, 3)
    assert flame(*random_inputs(0, 6, 4, dtype=torch.float32)).shape == (0, 50, 3)


def test_zero_parameters_give_the_scaled_template():
    fields = make_fields()
    flame = FLAME(fields, n_shape=6, n_exp=4, scale=5.0).double()
    verts = flame(torch.zeros(2, 6, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64),
                  torch.zeros(2, 6, dtype=torch.float64))
    # exact up to float64 rounding once the float32-stored weights' row sums (1 +- 1e-7) are accounted for
    expected = 5.0 * flame.v_template * flame.lbs_weights.sum(dim=1, keepdim=True)
    torch.testing.assert_close(verts, expected.expand(2, -1, -1), rtol=0, atol=1e-13)
    torch.testing.assert_close(verts[0], 5.0 * torch.from_numpy(fields["v_template"]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("pose_width", [6, 15])
def test_matches_numpy_reference(dtype, tol, pose_width):
    fields = make_fields(V=37, seed=1)
    flame = FLAME(fields, n_shape=5, n_exp=3, scale=5.0).to(dtype)
    shape, expression, pose = random_inputs(4, 5, 3, pose_width, dtype=torch.float64, seed=2)
    # the layer stores float32 assets; the oracle uses the same rounded values
    rounded = {k: (v.astype(np.float32).astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                   else v) for k, v in fields.items()}
    expected = reference_flame(rounded, 5, 3, shape.numpy(), expression.numpy(), full_pose_np(pose), 5.0)
    verts = flame(shape.to(dtype), expression.to(dtype), pose.to(dtype))
    assert verts.dtype == dtype
    torch.testing.assert_close(verts.double(), torch.from_numpy(expected), rtol=tol, atol=tol)


def test_eye_and_neck_pose_are_placed_in_the_full_pose():
    flame = FLAME(make_fields(), n_shape=6, n_exp=4).double()
    shape, expression, full = random_inputs(2, 6, 4, 15, seed=3)
    split = flame(shape, expression, torch.cat([full[:, :3], full[:, 6:9]], 1),
                  eye_pose=full[:, 9:], neck_pose=full[:, 3:6])
    torch.testing.assert_close(split, flame(shape, expression, full), rtol=0, atol=0)


def test_jaw_moves_only_jaw_skinned_vertices():
    fields = make_fields()
    flame = FLAME(fields, n_shape=6, n_exp=4).double()
    shape, expression, pose = random_inputs(2, 6, 4, seed=4)
    pose[:, 3:] = 0.0
    rest = flame(shape, expression, pose)
    pose[:, 3:] = torch.tensor([0.4, 0.05, -0.1], dtype=torch.float64)
    opened = flame(shape, expression, pose)
    moved = (opened - rest).norm(dim=-1)  # (B, V)
    free = torch.from_numpy(fields["weights"][:, JAW] == 0)
    assert bool(moved[:, free].max() < 1e-14)
    assert bool(moved[:, ~free].min() > 0)


def test_gradients_reach_shape_expression_and_pose():
    flame = FLAME(make_fields(V=6, F=4), n_shape=3, n_exp=2, landmark_embedding=make_embedding(4)).double()
    inputs = [t.requires_grad_() for t in random_inputs(1, 3, 2, seed=5)]  # full Jacobian: 18 outputs x 11 inputs
    assert torch.autograd.gradcheck(lambda s, e, p: flame(s, e, p), inputs)
    flame(*inputs).pow(2).sum().backward()
    assert all(bool(t.grad.abs().min() > 0) for t in inputs)  # every component matters
    inputs = [t.requires_grad_() for t in random_inputs(2, 3, 2, seed=6)]  # batched: random projections only
    assert torch.autograd.gradcheck(lambda s, e, p: flame.full_output(s, e, p).landmarks3d, inputs, fast_mode=True)


def test_buffers_follow_dtype_and_integers_stay_int64():
    flame = FLAME(make_fields(), n_shape=6, n_exp=4, landmark_embedding=make_embedding(60)).to(torch.float64)
    assert flame.v_template.dtype == flame.posedirs.dtype == flame.static_lmk_bary_coords.dtype == torch.float64
    assert flame.faces.dtype == flame.parents.dtype == flame.full_lmk_faces_idx.dtype == torch.int64


def _yaw(degrees):
    return torch.tensor([[0.0, np.deg2rad(degrees), 0.0] + [0.0] * 12], dtype=torch.float64)


@pytest.mark.parametrize("degrees,row", [(0, 0), (20, 20), (50, 39), (-20, 59), (-39, 78), (-50, 78)])
def test_dynamic_contour_row(degrees, row):
    assert FLAME.dynamic_row(_yaw(degrees)).tolist() == [row]


def test_landmarks_are_barycentric_on_the_scaled_mesh():
    emb = make_embedding(60, seed=6)
    flame = FLAME(make_fields(), n_shape=6, n_exp=4, landmark_embedding=emb).double()
    shape, expression, _ = random_inputs(1, 6, 4, seed=7)
    out = flame.full_output(shape, expression, _yaw(-20))
    tri = out.vertices[0][flame.faces]  # (F, 3 corners, 3)

    def interpolate(faces, bary):
        return torch.einsum("lcx,lc->lx", tri[torch.as_tensor(faces)], torch.as_tensor(bary))

    expected3d = interpolate(emb["full_lmk_faces_idx"][0], emb["full_lmk_bary_coords"][0])
    torch.testing.assert_close(out.landmarks3d[0], expected3d)
    expected2d = torch.cat([interpolate(emb["dynamic_lmk_faces_idx"][59], emb["dynamic_lmk_bary_coords"][59]),
                            interpolate(emb["static_lmk_faces_idx"], emb["static_lmk_bary_coords"])])
    torch.testing.assert_close(out.landmarks2d[0], expected2d)


def test_bad_inputs_name_the_argument():
    flame = FLAME(make_fields(), n_shape=6, n_exp=4)
    s, e, p = random_inputs(2, 6, 4, dtype=torch.float32)
    cases = [((s[:, :5], e, p), {}, ValueError, "shape must have shape"),
             ((s, e[:, :3], p), {}, ValueError, "expression"),
             ((s, e, p[:, :5]), {}, ValueError, "pose"),
             ((s, e[:1], p), {}, ValueError, "expression"),
             ((s, e, p), {"eye_pose": p[:, :3]}, ValueError, "eye_pose"),
             ((s, e, torch.zeros(2, 15)), {"neck_pose": torch.zeros(2, 3)}, ValueError, "neck_pose"),
             ((s.double(), e, p), {}, TypeError, "shape must have dtype float32"),
             ((s, e.numpy(), p), {}, TypeError, "expression must be a torch.Tensor")]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            flame(*args, **kwargs)


def test_bad_construction_arguments():
    fields = make_fields()
    with pytest.raises(ValueError, match="n_shape must be in"):
        FLAME(fields, n_shape=N_SHAPE_TOTAL + 1, n_exp=4)
    with pytest.raises(ValueError, match="n_exp must be in"):
        FLAME(fields, n_shape=6, n_exp=N_EXP_TOTAL + 1)
    with pytest.raises(ValueError, match="'weights'"):
        FLAME({**fields, "weights": fields["weights"][:, :4]}, n_shape=6, n_exp=4)
    with pytest.raises(ValueError, match="missing fields"):
        FLAME({k: v for k, v in fields.items() if k != "posedirs"}, n_shape=6, n_exp=4)
    with pytest.raises(ValueError, match="dynamic_lmk_bary_coords"):
        emb = make_embedding(60)
        FLAME(fields, n_shape=6, n_exp=4, landmark_embedding={**emb, "dynamic_lmk_bary_coords": np.ones((79, 16, 3))})


# ---------------------------------------------------------------------------------------------- loader


def test_landmark_embedding_files(tmp_path):
    emb = make_embedding(60)
    np.savez(tmp_path / "lmk.npz", **emb)
    loaded = load_landmark_embedding(tmp_path / "lmk.npz")
    assert loaded["full_lmk_faces_idx"].shape == (68,) and loaded["full_lmk_bary_coords"].shape == (68, 3)
    assert loaded["dynamic_lmk_faces_idx"].dtype == np.int64 and loaded["static_lmk_bary_coords"].dtype == np.float32
    assert FLAME(make_fields(), n_shape=6, n_exp=4, landmark_embedding=tmp_path / "lmk.npz").has_landmarks
    np.save(tmp_path / "lmk.npy", np.array(emb, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="trusted=True"):
        load_landmark_embedding(tmp_path / "lmk.npy")
    trusted = load_landmark_embedding(tmp_path / "lmk.npy", trusted=True)
    np.testing.assert_array_equal(trusted["dynamic_lmk_faces_idx"], loaded["dynamic_lmk_faces_idx"])


def test_posedirs_layouts_are_normalized():
    fields = make_fields(V=40)
    V, P = 40, 36
    base = normalize_flame_model(fields)
    assert base["posedirs"].shape == (V, 3, P)
    for layout in (fields["posedirs"].reshape(V * 3, P), fields["posedirs"].reshape(V * 3, P).T):
        np.testing.assert_array_equal(normalize_flame_model({**fields, "posedirs": layout})["posedirs"],
                                      base["posedirs"])
    with pytest.raises(ValueError, match="posedirs"):
        normalize_flame_model({**fields, "posedirs": fields["posedirs"][:, :, :35]})


def test_official_default_split_is_300_identity_columns():
    fields = make_fields(V=6, F=4, n_shape_total=300, n_exp_total=3)
    del fields["n_shape_total"]
    model = normalize_flame_model(fields)
    assert int(model["n_shape_total"]) == 300
    FLAME(model, n_shape=100, n_exp=3)


def test_npz_round_trip(tmp_path):
    fields = make_fields()
    save_flame_model(tmp_path / "flame.npz", fields)
    model = load_flame_model(tmp_path / "flame.npz")
    expected = normalize_flame_model(fields)
    assert model.keys() == expected.keys()
    for key, value in expected.items():
        assert model[key].dtype == value.dtype and model[key].shape == value.shape, key
        np.testing.assert_array_equal(model[key], value)
    assert model["f"].dtype == np.int64 and model["shapedirs"].dtype == np.float32
    assert model["kintree_table"][0].tolist() == [2**32 - 1, 0, 1, 1, 1]


def _fake_class(module, name):
    """Plain class that pickles as module.name with its __dict__ as state (like chumpy.Ch / csc_matrix)."""
    cls = type(name, (), {"__init__": lambda self, **state: self.__dict__.update(state)})
    cls.__module__, cls.__qualname__ = module, name
    return cls


@contextlib.contextmanager
def fake_modules(monkeypatch, classes):
    """Register each class under its module (and parents) in sys.modules while pickling, then remove them."""
    with monkeypatch.context() as patch:
        for cls in classes:
            parts = cls.__module__.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if not isinstance(sys.modules.get(name), types.ModuleType) or not getattr(
                        sys.modules[name], "__fake__", False):
                    module = types.ModuleType(name)
                    module.__fake__ = True
                    patch.setitem(sys.modules, name, module)
            setattr(sys.modules[cls.__module__], cls.__name__, cls)
        yield


class Py2StyleArray:
    """Pickles an array the way Python 2 numpy did: raw data as a (latin-1 decoded) str, dtype arg 'b'."""

    def __init__(self, array):
        self.array = np.ascontiguousarray(array)

    def __reduce__(self):
        a = self.array
        reconstruct = np.ndarray.__reduce__(a)[0]
        return reconstruct, (np.ndarray, (0,), "b"), (1, a.shape, a.dtype, False, a.tobytes().decode("latin1"))


def to_csc_state(dense):
    cols = [np.nonzero(dense[:, j])[0] for j in range(dense.shape[1])]
    return {"_shape": dense.shape, "maxprint": 50, "data": np.concatenate([dense[r, j] for j, r in enumerate(cols)]),
            "indices": np.concatenate(cols).astype(np.int32),
            "indptr": np.concatenate([[0], np.cumsum([len(r) for r in cols])]).astype(np.int32)}


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("sparse_module", ["scipy.sparse.csc", "scipy.sparse._csc"])
def test_pickle_with_chumpy_and_scipy_sparse_loads_without_them(tmp_path, monkeypatch, protocol, sparse_module):
    fields = make_fields(seed=8)
    Ch = _fake_class("chumpy.ch", "Ch")
    csc = _fake_class(sparse_module, "csc_matrix")
    raw = dict(fields)
    raw["shapedirs"] = Ch(x=fields["shapedirs"], _dirty_vars=set(), _itr=None)
    raw["v_template"] = Ch(x=Py2StyleArray(fields["v_template"]))
    raw["posedirs"] = Ch(x=fields["posedirs"].reshape(-1, 36))
    raw["J_regressor"] = csc(**to_csc_state(fields["J_regressor"]))
    raw["extra"] = collections.OrderedDict(a=np.float64(1.5), b=b"", c=frozenset({1}))
    with fake_modules(monkeypatch, [Ch, csc]):
        payload = pickle.dumps(raw, protocol=protocol)
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(payload)
    assert b"chumpy" in payload and sparse_module.encode() in payload
    for name in ("chumpy", "chumpy.ch", "scipy", "scipy.sparse", sparse_module):
        monkeypatch.setitem(sys.modules, name, None)  # any import attempt would raise ImportError
    model = load_flame_model(path)
    expected = normalize_flame_model(fields)
    for key, value in expected.items():
        np.testing.assert_array_equal(model[key], value, err_msg=key)
        assert model[key].dtype == value.dtype, key


@pytest.mark.parametrize("name", ["csc_matrix", "csr_matrix", "coo_matrix"])
def test_sparse_stub_densifies_with_numpy(name):
    dense = np.zeros((4, 7))
    dense[[0, 1, 3, 3], [2, 6, 0, 5]] = [1.5, -2.0, 3.0, 0.25]
    stub = FlameUnpickler(io.BytesIO(b"")).find_class("scipy.sparse." + name[:3], name)()
    rows, cols = np.nonzero(dense)  # row-major order: CSR layout
    if name == "csc_matrix":
        state = to_csc_state(dense)
    elif name == "csr_matrix":
        state = {"_shape": dense.shape, "data": dense[rows, cols], "indices": cols,
                 "indptr": np.searchsorted(rows, np.arange(5))}
    else:
        state = {"shape": dense.shape, "data": dense[rows, cols], "row": rows, "col": cols}
    stub.__setstate__(state)
    np.testing.assert_array_equal(stub.toarray(), dense)


def test_legacy_numpy_core_spellings_resolve():
    unpickler = FlameUnpickler(io.BytesIO(b""))
    new = unpickler.find_class("numpy._core.multiarray", "_reconstruct")
    assert unpickler.find_class("numpy.core.multiarray", "_reconstruct") is new
    assert unpickler.find_class("numpy.core.multiarray", "scalar") is unpickler.find_class("numpy._core.multiarray",
                                                                                          "scalar")
    assert unpickler.find_class("copy_reg", "_reconstructor") is unpickler.find_class("copyreg", "_reconstructor")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvilReconstructor:
    def __reduce__(self):  # allowed globals, forbidden combination: not a stub over object
        return copyreg._reconstructor, (collections.OrderedDict, object, None)


def test_malicious_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    attacks = [
        (_Evil(marker), f"{os.system.__module__}.system"),
        (eval, "builtins.eval"),
        (np.load, "numpy.load"),
        (_EvilReconstructor(), "copyreg._reconstructor"),
        (pickle.loads, "pickle.loads")  # written as pickle.loads or _pickle.loads,
    ]
    for obj, name in attacks:
        payload = pickle.dumps({"v_template": obj}, protocol=2)
        with pytest.raises(pickle.UnpicklingError, match=name.replace(".", r"\.")):
            read_flame_pickle(payload)
        (tmp_path / "evil.pkl").write_bytes(payload)
        with pytest.raises(pickle.UnpicklingError):
            load_flame_model(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_unknown_chumpy_expression_is_a_clear_error(tmp_path, monkeypatch):
    fields = make_fields()
    add = _fake_class("chumpy.ch_ops", "add")
    with fake_modules(monkeypatch, [add]):
        payload = pickle.dumps({**fields, "shapedirs": add(a=1, b=2)}, protocol=2)
    (tmp_path / "m.pkl").write_bytes(payload)
    with pytest.raises(ValueError, match="'shapedirs' is a chumpy chumpy.ch_ops.add without an 'x' payload"):
        load_flame_model(tmp_path / "m.pkl")

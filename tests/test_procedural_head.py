"""The procedural FLAME-format head (gpavatar/flame/procedural.py): layout, mesh, skinning, directions.

A minimal float64 numpy LBS written from SPEC pipeline.md 1.4 checks the posing semantics
independently of the torch FLAME layer; one test then runs the cached file through that layer.
"""

import numpy as np
import pytest

from gpavatar.flame import procedural
from gpavatar.flame.procedural import (EXPRESSION_NAMES, LANDMARK_KEYS, MODEL_KEYS, NUM_VERTICES, PARENTS,
                                       SHAPE_NAMES, UNIT, make_procedural_head, procedural_head_path)

N_HEAD = 2 + procedural.HEAD_ROWS * procedural.HEAD_COLUMNS  # head-surface vertices; the eyeballs follow
N_EYE = 2 + procedural.EYE_RINGS * procedural.EYE_SEGMENTS
SMALL = dict(n_shape=len(SHAPE_NAMES) + 2, n_exp=len(EXPRESSION_NAMES) + 2)  # named columns + 2 random each


@pytest.fixture(scope="module")
def head():
    return make_procedural_head()


# --- a minimal LBS (SPEC 1.4), float64 ---------------------------------------------------------------------------
def rodrigues(r):
    angle = np.linalg.norm(r + 1e-8)
    k = r / angle
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def lbs(head, betas=None, pose=None):
    """betas: (S + E,) over all shapedirs columns; pose: (15,) axis-angle for root, neck, jaw, eyes."""
    V, n_dirs = len(head["v_template"]), head["shapedirs"].shape[2]
    betas = np.zeros(n_dirs) if betas is None else betas
    pose = np.zeros(15) if pose is None else pose
    v_shaped = head["v_template"] + head["shapedirs"].astype(np.float64) @ betas
    joints = head["J_regressor"] @ v_shaped
    R = np.stack([rodrigues(pose[3 * j:3 * j + 3]) for j in range(5)])
    v_posed = v_shaped + (head["posedirs"].reshape(V * 3, 36) @ (R[1:] - np.eye(3)).reshape(36)).reshape(V, 3)
    parents = [-1] + list(head["kintree_table"][0, 1:])
    world = []
    for j in range(5):
        local = np.eye(4)
        local[:3, :3], local[:3, 3] = R[j], joints[j] - (joints[parents[j]] if j else 0)
        world.append(local if j == 0 else world[parents[j]] @ local)
    A = np.stack(world)
    A[:, :3, 3] -= np.einsum("jab,jb->ja", A[:, :3, :3], joints)
    T = np.einsum("vj,jab->vab", head["weights"], A)
    return np.einsum("vab,vb->va", T[:, :3, :3], v_posed) + T[:, :3, 3]


def jaw_pose(angle):
    pose = np.zeros(15)
    pose[6] = angle
    return pose


def landmarks(head, vertices):
    corners = vertices[head["f"][head["full_lmk_faces_idx"]]]  # (68, 3, 3)
    return np.einsum("lcx,lc->lx", corners, head["full_lmk_bary_coords"])


def expression(head, name, value):
    betas = np.zeros(head["shapedirs"].shape[2])
    betas[int(head["n_shape_total"]) + EXPRESSION_NAMES.index(name)] = value
    return betas


# --- format ------------------------------------------------------------------------------------------------------
def test_keys_shapes_dtypes(head):
    expected = {
        "v_template": ((NUM_VERTICES, 3), np.float32), "f": ((len(head["f"]), 3), np.int64),
        "shapedirs": ((NUM_VERTICES, 3, 350), np.float32), "n_shape_total": ((), np.int64),
        "posedirs": ((NUM_VERTICES, 3, 36), np.float32), "J_regressor": ((5, NUM_VERTICES), np.float32),
        "weights": ((NUM_VERTICES, 5), np.float32), "kintree_table": ((2, 5), np.int64),
        "vc": ((NUM_VERTICES, 3), np.float32),
        "static_lmk_faces_idx": ((51,), np.int64), "static_lmk_bary_coords": ((51, 3), np.float32),
        "dynamic_lmk_faces_idx": ((79, 17), np.int64), "dynamic_lmk_bary_coords": ((79, 17, 3), np.float32),
        "full_lmk_faces_idx": ((68,), np.int64), "full_lmk_bary_coords": ((68, 3), np.float32),
    }
    assert set(head) == set(MODEL_KEYS) | set(LANDMARK_KEYS) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert head[key].shape == shape and head[key].dtype == dtype, key
        assert head[key].flags.c_contiguous, key
        assert np.isfinite(head[key]).all(), key
    assert int(head["n_shape_total"]) == 300  # the FLAME release layout: expression from column 300
    assert len(head["f"]) == 2 * N_HEAD - 4 + 2 * (2 * N_EYE - 4)  # three closed genus-0 surfaces


def test_kintree_table_as_official_file(head):
    assert head["kintree_table"][0, 0] == 2**32 - 1
    assert head["kintree_table"][0, 1:].tolist() == list(PARENTS[1:]) == [0, 1, 1, 1]
    assert head["kintree_table"][1].tolist() == [0, 1, 2, 3, 4]


def test_deterministic_and_seeded(head):
    again = make_procedural_head(seed=0)
    for key in head:
        np.testing.assert_array_equal(again[key], head[key], err_msg=key)
    small, other = make_procedural_head(seed=0, **SMALL), make_procedural_head(seed=1, **SMALL)
    S, E = SMALL["n_shape"], SMALL["n_exp"]
    # fewer columns = a prefix of the default columns, random ones included (release layout: expression at 300)
    np.testing.assert_array_equal(small["shapedirs"][:, :, :S], head["shapedirs"][:, :, :S])
    np.testing.assert_array_equal(small["shapedirs"][:, :, 300:], head["shapedirs"][:, :, 300:300 + E])
    # the seed changes only the random columns and posedirs' random part
    for key in set(head) - {"shapedirs", "posedirs", "n_shape_total"}:
        np.testing.assert_array_equal(other[key], head[key], err_msg=key)
    named = list(range(len(SHAPE_NAMES))) + list(range(300, 300 + len(EXPRESSION_NAMES)))
    np.testing.assert_array_equal(other["shapedirs"][:, :, named], small["shapedirs"][:, :, named])
    for column in (S - 1, 300 + E - 1):
        assert not np.allclose(other["shapedirs"][:, :, column], small["shapedirs"][:, :, column])
    assert not np.allclose(other["posedirs"], head["posedirs"])


@pytest.mark.parametrize("bad, error", [(1.5, TypeError), (True, TypeError), (-1, ValueError)])
def test_rejects_bad_arguments(bad, error):
    with pytest.raises(error):
        make_procedural_head(n_exp=bad)


# --- mesh --------------------------------------------------------------------------------------------------------
def test_mesh_closed_and_outward(head):
    V, F = head["v_template"].astype(np.float64), head["f"]
    assert F.min() == 0 and F.max() == NUM_VERTICES - 1
    assert (F[:, 0] != F[:, 1]).all() and (F[:, 1] != F[:, 2]).all() and (F[:, 2] != F[:, 0]).all()
    edges = np.concatenate([F[:, [0, 1]], F[:, [1, 2]], F[:, [2, 0]]])
    keys = edges[:, 0] * NUM_VERTICES + edges[:, 1]
    assert len(np.unique(keys)) == len(keys), "a directed edge is used twice (inconsistent orientation)"
    assert np.isin(edges[:, 1] * NUM_VERTICES + edges[:, 0], keys).all(), "an edge has a single face (hole)"
    cross = np.cross(V[F[:, 1]] - V[F[:, 0]], V[F[:, 2]] - V[F[:, 0]])
    assert (np.linalg.norm(cross, axis=1) > 1e-9).all(), "degenerate triangle"
    for lo, hi in ((0, N_HEAD), (N_HEAD, N_HEAD + N_EYE), (N_HEAD + N_EYE, NUM_VERTICES)):  # per closed surface
        part = F[(F >= lo).all(1) & (F < hi).all(1)]
        volume = np.einsum("ij,ij->i", V[part[:, 0]], np.cross(V[part[:, 1]], V[part[:, 2]])).sum() / 6
        assert volume > 0, f"surface {lo}:{hi} is wound inwards"
    assert ((F < N_HEAD).all(1) | (F >= N_HEAD).all(1)).all()


def test_frame_and_scale(head):
    V = head["v_template"]
    lo, hi = V.min(0), V.max(0)
    assert 0.2 < hi[1] - lo[1] < 0.32 and 0.14 < hi[0] - lo[0] < 0.2  # metres, head + neck stump
    np.testing.assert_allclose(V[:, 0].mean(), 0, atol=1e-6)  # mirror symmetric
    lmk = landmarks(head, V)
    assert lmk[30, 2] == lmk[:, 2].max()  # nose tip is the most forward landmark: face towards +z
    assert lmk[8, 1] < lmk[57, 1] < lmk[33, 1] < lmk[36, 1] < lmk[19, 1]  # chin < lip < nose < eye < brow: y up
    assert (lmk[42:48, 0] > 0).all() and (lmk[36:42, 0] < 0).all()  # iBUG 42..47 is the subject's left (+x)
    posed = lbs(head, expression(head, "smile", 2) + expression(head, "brow_raise", 2), jaw_pose(0.4))
    assert np.abs(5.0 * posed).max() < 0.9  # times flame_scale it stays inside the render cube [-1, 1]^3


def test_colours(head):
    vc = head["vc"]
    assert vc.min() >= 0 and vc.max() <= 1
    eyes = vc[N_HEAD:]
    assert eyes.sum(1).min() < 0.2 and eyes.sum(1).max() > 2.5  # pupils and sclera
    assert 0.4 < vc[:N_HEAD].mean() < 0.8


# --- joints and skinning -----------------------------------------------------------------------------------------
def test_weights_and_regressor_rows(head):
    W, JR = head["weights"], head["J_regressor"]
    assert W.min() >= 0 and JR.min() >= 0
    np.testing.assert_allclose(W.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(JR.sum(1), 1, atol=1e-6)
    for joint, lo in ((3, N_HEAD), (4, N_HEAD + N_EYE)):  # eyeballs: rigid on their joint, regressed from themselves
        np.testing.assert_array_equal(W[lo:lo + N_EYE, joint], 1)
        assert JR[joint, :lo].sum() == 0 and JR[joint, lo + N_EYE:].sum() == 0
    root, neck, jaw, left, right = JR @ head["v_template"].astype(np.float64)
    assert root[1] < neck[1] < jaw[1] < left[1]
    np.testing.assert_allclose([root[0], neck[0], jaw[0]], 0, atol=1e-6)
    assert left[0] > 0 and np.allclose(right, left * [-1, 1, 1], atol=1e-6)
    eyeball = head["v_template"][N_HEAD:N_HEAD + N_EYE]
    np.testing.assert_allclose(np.linalg.norm(eyeball - left, axis=1), procedural.EYE_RADIUS, atol=1e-6)


def test_jaw_weights_on_lower_face(head):
    V, w_jaw = head["v_template"], head["weights"][:, 2]
    lmk = landmarks(head, V)
    jaw_joint = head["J_regressor"][2] @ V
    moving = V[w_jaw > 0.5]
    assert len(moving) > 300
    assert moving[:, 1].max() < lmk[33, 1]  # below the nose
    assert moving[:, 2].min() > jaw_joint[2]  # in front of the hinge
    assert (w_jaw[V[:, 1] > lmk[33, 1]] == 0).all()
    upper, lower = head["f"][head["full_lmk_faces_idx"][[51, 62]]], head["f"][head["full_lmk_faces_idx"][[57, 66]]]
    assert w_jaw[upper].max() < 0.05 and w_jaw[lower].min() > 0.95  # the slit separates head and jaw


def test_jaw_rotation_opens_mouth(head):
    V = head["v_template"].astype(np.float64)
    np.testing.assert_allclose(lbs(head), V, atol=1e-7)
    opened = lbs(head, pose=jaw_pose(0.3))
    before, after = landmarks(head, V), landmarks(head, opened)
    assert after[57, 1] < before[57, 1] - 0.015  # lower lip down by more than 1.5 cm
    assert after[8, 1] < before[8, 1] - 0.015  # chin too
    assert np.linalg.norm(after[51] - before[51]) < 0.001  # upper lip stays
    gap = np.linalg.norm(after[66] - after[62]) - np.linalg.norm(before[66] - before[62])
    assert gap > 0.015
    still = (V[:, 1] > 0.02) | (V[:, 2] < -0.03)  # forehead, eyes, top and back of the head
    assert np.abs(opened[still] - V[still]).max() < 1e-7
    assert lbs(head, pose=jaw_pose(-0.3))[:, 1].min() >= V[:, 1].min() - 1e-7  # closing moves the chin up


def test_eye_and_neck_rotation(head):
    V, rest = head["v_template"].astype(np.float64), lbs(head)  # rest differs from V by float32 rounding only
    pose = np.zeros(15)
    pose[10] = 0.4  # left eye about y
    turned = lbs(head, pose=pose)
    moved = np.abs(turned - rest).max(1) > 1e-9
    assert moved[N_HEAD:N_HEAD + N_EYE].sum() == N_EYE - 2  # all but the two on the rotation axis
    assert not moved[:N_HEAD].any() and not moved[N_HEAD + N_EYE:].any()
    pose = np.zeros(15)
    pose[4] = 0.5  # neck about y: the head turns, the neck base does not
    turned = lbs(head, pose=pose)
    base = V[:, 1] < -0.16
    assert np.abs(turned[base] - V[base]).max() < 1e-3  # only the (sub-millimetre) pose correctives move it
    nose = landmarks(head, turned)[30]
    assert nose[0] > 0.04


# --- directions --------------------------------------------------------------------------------------------------
def test_direction_magnitudes_and_rigid_eyes(head):
    S = 100  # identity columns in use; 100..299 are the release layout's zero padding
    assert (head["shapedirs"][:, :, S:int(head["n_shape_total"])] == 0).all()
    dirs = np.concatenate([head["shapedirs"][:, :, :S], head["shapedirs"][:, :, int(head["n_shape_total"]):]], 2)
    peaks = np.abs(dirs).max(axis=(0, 1))
    named_exp = [S + i for i, name in enumerate(EXPRESSION_NAMES) if name != "blink"]
    np.testing.assert_allclose(peaks[list(range(len(SHAPE_NAMES))) + named_exp], UNIT, rtol=1e-5)
    assert peaks.max() <= UNIT * 1.2 and peaks.min() > UNIT / 20
    assert (dirs[N_HEAD:, :, S:] == 0).all()  # expressions never move the eyeballs
    for lo in (N_HEAD, N_HEAD + N_EYE):  # identity moves each eyeball rigidly
        eyeball = dirs[lo:lo + N_EYE, :, :S]
        np.testing.assert_array_equal(eyeball, np.broadcast_to(eyeball[:1], eyeball.shape))
    flat = dirs.reshape(-1, dirs.shape[2]).astype(np.float64)
    flat /= np.linalg.norm(flat, axis=0)
    gram = np.abs(flat.T @ flat) - np.eye(dirs.shape[2])
    assert gram[:S, :S].max() < 0.7 and gram[S:, S:].max() < 0.7  # nearly orthogonal within each group
    assert gram[len(SHAPE_NAMES):S, :S].max() < 1e-4  # random identity columns are orthogonal to all before them


def test_expressions_move_their_regions(head):
    V = head["v_template"].astype(np.float64)
    lmk0 = landmarks(head, V)
    smile = landmarks(head, lbs(head, expression(head, "smile", 2)))
    assert smile[48, 1] > lmk0[48, 1] + 0.004 and smile[54, 1] > lmk0[54, 1] + 0.004  # mouth corners up
    brows = landmarks(head, lbs(head, expression(head, "brow_raise", 2)))
    assert (brows[17:27, 1] > lmk0[17:27, 1] + 0.003).all()
    parted = landmarks(head, lbs(head, expression(head, "lips_part", 2)))
    assert parted[62, 1] > lmk0[62, 1] + 0.003 and parted[66, 1] < lmk0[66, 1] - 0.003


def test_blink_closes_the_eye_openings(head):
    V = head["v_template"].astype(np.float64)
    closed = lbs(head, expression(head, "blink", 2))
    surface, eyeball = np.arange(N_HEAD), np.arange(N_HEAD, N_HEAD + N_EYE)
    centre = procedural.CENTRE

    def outside(vertices):  # how far the left eyeball pokes out of the head surface, along rays from CENTRE
        lid = vertices[surface] - centre
        lid_dir = lid / np.linalg.norm(lid, axis=1, keepdims=True)
        ball = vertices[eyeball] - centre
        ball_dir = ball / np.linalg.norm(ball, axis=1, keepdims=True)
        nearest = np.argmax(ball_dir @ lid_dir.T, axis=1)  # the surface vertex in (almost) the same direction
        return (np.linalg.norm(ball, axis=1) - np.linalg.norm(lid[nearest], axis=1)).max()

    assert outside(V) > 0.003  # open: the eyeball shows through the opening
    assert outside(closed) < 0.0005  # closed lids cover it


def test_pose_correctives_layout(head):
    posedirs = head["posedirs"]
    assert (posedirs[:, :, 18:] == 0).all()  # eyeball rotations have no correctives
    assert (posedirs[N_HEAD:] == 0).all()
    jaw_open = posedirs[:, :, 9 + 3 * 2 + 1]  # (R_jaw - I)[2, 1] = sin(angle) for a rotation about x
    assert 0.0005 < np.abs(jaw_open).max() < 0.005
    forehead = head["v_template"][:, 1] > 0.02
    assert (posedirs[forehead] == 0).all()


# --- landmarks ---------------------------------------------------------------------------------------------------
def test_landmark_embedding(head):
    head_faces = 2 * N_HEAD - 4
    for key in ("static", "dynamic", "full"):
        idx, bary = head[f"{key}_lmk_faces_idx"], head[f"{key}_lmk_bary_coords"]
        assert idx.min() >= 0 and idx.max() < head_faces
        assert bary.min() >= -1e-6
        np.testing.assert_allclose(bary.sum(-1), 1, atol=1e-5)
    np.testing.assert_array_equal(head["static_lmk_faces_idx"], head["full_lmk_faces_idx"][17:])
    np.testing.assert_array_equal(head["dynamic_lmk_faces_idx"], np.tile(head["full_lmk_faces_idx"][:17], (79, 1)))
    assert set(procedural.landmark_embedding(head)) == set(LANDMARK_KEYS)


# --- files -------------------------------------------------------------------------------------------------------
def test_cache_file_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("GPAVATAR_CACHE_DIR", str(tmp_path / "cache"))
    assert procedural.cache_dir() == tmp_path / "cache"
    path = procedural_head_path(seed=3, **SMALL)
    assert path.parent == tmp_path / "cache" and path.suffix == ".npz"
    assert path.stat().st_mode & 0o777 == 0o644
    stamp = path.stat().st_mtime_ns
    assert procedural_head_path(seed=3, **SMALL) == path and path.stat().st_mtime_ns == stamp  # reused
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    fresh = make_procedural_head(seed=3, **SMALL)
    with np.load(path, allow_pickle=False) as archive:
        assert set(archive.files) == set(fresh)
        for key in fresh:
            np.testing.assert_array_equal(archive[key], fresh[key], err_msg=key)


def test_flame_layer_reads_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    from gpavatar.flame import FLAME, load_landmark_embedding

    path = procedural.save_procedural_head(tmp_path / "head.npz", **SMALL)
    head = make_procedural_head(**SMALL)
    S, E = SMALL["n_shape"], SMALL["n_exp"]
    flame = FLAME(path, n_shape=S, n_exp=E, scale=1.0, landmark_embedding=load_landmark_embedding(path))
    rng = np.random.default_rng(0)
    betas, pose = rng.normal(size=S + E), np.zeros(15)
    pose[[0, 1, 6]] = [0.1, -0.2, 0.25]
    as_torch = lambda a: torch.tensor(a[None], dtype=torch.float32)  # noqa: E731
    out = flame.full_output(as_torch(betas[:S]), as_torch(betas[S:]), as_torch(np.r_[pose[:3], pose[6:9]]))
    columns = np.zeros(head["shapedirs"].shape[2])  # the release layout: identity 0..S-1, expression from 300
    columns[:S], columns[300:300 + E] = betas[:S], betas[S:]
    expected = lbs(head, columns, pose)
    np.testing.assert_allclose(out.vertices[0].numpy(), expected, atol=2e-6)  # float32 vs float64 LBS
    np.testing.assert_allclose(out.landmarks3d[0].numpy(), landmarks(head, expected), atol=2e-6)

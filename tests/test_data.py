"""gpavatar.data: rasterizer camera, synthetic dataset round trip, official sampling rules, bad data, CLI."""

import io
import os
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from gpavatar.cli import main
from gpavatar.data import (OfficialDataset, check_dataset, make_synthetic_dataset, perspective_warp, project,
                           rasterize, render_mesh, source_positions, synthetic_frames)
from gpavatar.data.official import decode_image, load_dataset_pkl, parse_key
from gpavatar.data.raster import look_at_front
from gpavatar.data.synthetic import CAMERA, encode_image, split_videos, write_lmdb
from gpavatar.flame import FLAME
from gpavatar.flame.procedural import procedural_head_path
from gpavatar.model.renderer import VolumeRenderer, camera_rays, inside_box

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_identities=2, frames_per_identity=3, size=64, seed=0, samples=1)


def rotation(yaw, pitch, roll):
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    return (np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]) @ np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
            @ np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]]))


def uv_sphere(centre, radius, rows=24, cols=32):
    """Closed UV sphere, counter-clockwise (outward) faces."""
    theta = np.linspace(0, np.pi, rows + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, cols, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.cos(t), np.sin(t) * np.sin(p)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]]) * radius + centre
    idx = lambda r, c: 1 + r * cols + c % cols  # noqa: E731
    faces = [(0, idx(0, c + 1), idx(0, c)) for c in range(cols)]
    for r in range(rows - 2):
        for c in range(cols):
            faces += [(idx(r, c), idx(r, c + 1), idx(r + 1, c)), (idx(r, c + 1), idx(r + 1, c + 1), idx(r + 1, c))]
    last = len(verts) - 1
    faces += [(last, idx(rows - 2, c), idx(rows - 2, c + 1)) for c in range(cols)]
    return verts, np.array(faces)


# --- rasterizer -------------------------------------------------------------------------------------


def test_front_triangle_covers_the_pixel_centres_inside_it():
    """Camera at z = 12 with f = 12: a point (X, Y, 0) lands at NDC (-X, Y); brute-force the centres."""
    S = 33
    tri = np.array([[-0.61, -0.53, 0.0], [0.47, -0.71, 0.0], [0.13, 0.58, 0.0]])  # counter-clockwise from +z
    frags = rasterize(tri, np.array([[0, 1, 2]]), look_at_front(12.0), 12.0, S)
    x = np.linspace(1, -1, S)
    X, Y = np.meshgrid(-x, x, indexing="xy")  # world coordinates of each pixel centre on z = 0
    a, b, c = tri[:, :2]
    def side(p, q):  # noqa: E306
        return (q[0] - p[0]) * (Y - p[1]) - (q[1] - p[1]) * (X - p[0])
    expected = (side(a, b) > 0) & (side(b, c) > 0) & (side(c, a) > 0)
    assert expected.sum() > 50
    np.testing.assert_array_equal(frags.face_index >= 0, expected)
    np.testing.assert_allclose(frags.depth[expected], 12.0)
    np.testing.assert_allclose(frags.bary[expected].sum(-1), 1.0)
    # the subject's left (+x) shows on the image's right: the rightmost vertex (x = 0.47) is the lowest
    cols = np.flatnonzero(expected.any(0))
    assert cols.min() > S // 4 - 2 and cols.max() > 2 * S // 3

    back = rasterize(tri[[0, 2, 1]], np.array([[0, 1, 2]]), look_at_front(12.0), 12.0, S)
    assert (back.face_index < 0).all()  # clockwise from the camera: culled
    both = rasterize(tri[[0, 2, 1]], np.array([[0, 1, 2]]), look_at_front(12.0), 12.0, S, cull_backfaces=False)
    np.testing.assert_array_equal(both.face_index >= 0, expected)


def test_nearest_triangle_wins_whatever_the_order():
    square = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    near = np.c_[square, np.full(4, 0.5)]
    far = np.c_[square * 1.5, np.zeros(4)]
    verts = np.concatenate([far, near])
    colors = np.repeat([[1.0, 0, 0], [0, 0, 1.0]], 4, axis=0)
    quads = np.array([[0, 1, 2], [0, 2, 3]])
    for faces in (np.concatenate([quads, quads + 4]), np.concatenate([quads + 4, quads])):
        image, mask = render_mesh(verts, faces, colors, look_at_front(12.0), 12.0, 21, ambient=1.0, diffuse=0.0)
        assert image[10, 10].tolist() == [0, 0, 255] and image[10, 3].tolist() == [255, 0, 0]
        assert not mask[0, 0] and image[0, 0].tolist() == [0, 0, 0]


def test_projection_follows_the_model_rays():
    """A projected point's pixel coordinates give back the model's ray through that point."""
    rng = np.random.default_rng(0)
    for _ in range(3):
        transform = np.concatenate([rotation(*rng.uniform(-0.6, 0.6, 3)).T @ look_at_front()[:, :3],
                                    np.array([[0.1], [-0.2], [9.5]])], axis=1)
        points = rng.uniform(-0.8, 0.8, (50, 3))
        H, W = 48, 80
        uv, _ = project(points, transform, 12.0, (H, W))
        x, y = 1 - 2 * uv[:, 0] / (W - 1), 1 - 2 * uv[:, 1] / (H - 1)
        d_cam = torch.from_numpy(np.stack([x / 12, y / 12, np.ones_like(x)], -1))
        origins, dirs = camera_rays(torch.from_numpy(transform)[None], d_cam)
        offset = torch.from_numpy(points) - origins[0]
        distance = (offset - (offset * dirs[0]).sum(-1, keepdim=True) * dirs[0]).norm(dim=-1)
        assert distance.max() < 1e-9


def test_mesh_render_matches_the_volume_renderer():
    """An off-centre ball: the rasterized silhouette equals the model's volume-rendered opacity."""
    centre, radius = np.array([0.35, 0.2, 0.1]), 0.4
    verts, faces = uv_sphere(centre, radius, 48, 64)
    transform = np.concatenate([rotation(0.4, -0.2, 0.1).T @ look_at_front()[:, :3], [[0.05], [-0.1], [9.0]]], 1)
    _, mask = render_mesh(verts, faces, np.ones_like(verts), transform, 12.0, 32)

    def field(coords, dirs):
        inside = ((coords - torch.tensor(centre, dtype=coords.dtype)).norm(dim=-1) < radius) & inside_box(coords)
        return inside.to(coords.dtype), torch.ones(*coords.shape[:2], 3), None

    out = VolumeRenderer(32, n_coarse=32, n_fine=32, backend="torch")(field, torch.tensor(transform)[None].float())
    volume = out["opacity"][0, 0].numpy() > 0.5
    assert mask.sum() > 100 and abs(mask.mean(0).argmax() - volume.mean(0).argmax()) <= 1
    assert (mask != volume).sum() <= 0.06 * mask.sum()  # boundary pixels only (mesh chords vs sphere)


@pytest.fixture(scope="module")
def head():
    path = procedural_head_path()
    flame = FLAME(path)
    verts = flame(torch.zeros(1, 100), torch.zeros(1, 50), torch.zeros(1, 6))[0].numpy()
    return verts, flame.faces.numpy(), np.load(path)["vc"]


def test_head_renders_centred_and_fast(head):
    verts, faces, vc = head
    start = time.perf_counter()
    image, mask = render_mesh(verts, faces, vc, look_at_front(9.0), 12.0, 256)
    seconds = time.perf_counter() - start
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8 and len(faces) > 10000
    cols = np.flatnonzero(mask.any(0))
    assert abs((cols.min() + cols.max()) / 2 - 127.5) < 2  # left-right symmetric head, centred
    assert 0.2 < mask.mean() < 0.6 and (image[~mask] == 0).all()
    # the subject's left eyeball (x > 0, indices 4699..4860) shows on the image's right
    uv, _ = project(verts[4699:4861].mean(0, keepdims=True), look_at_front(9.0), 12.0, 256)
    assert uv[0, 0] > 140
    assert seconds < 3.0, f"256² head render took {seconds:.2f} s"  # ~0.1 s on one core; generous for CI


# --- synthetic dataset -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    info = make_synthetic_dataset(root, **TINY)
    return root, info


def test_layout_and_round_trip(tiny):
    root, info = tiny
    assert sorted(p.name for p in root.iterdir()) == ["camera.json", "dataset.pkl", "driver.json", "img_lmdb",
                                                      "synthetic.json"]
    assert info["frames"] == 6
    records, meta_info = load_dataset_pkl(root)
    keys = [f"img_00000{i}_{j}" for i in range(2) for j in range(3)]
    assert list(records) == keys
    assert meta_info == {"train": keys[:3], "val": keys[3:], "test": keys[3:]}
    ds = OfficialDataset(root, "val", n_sources=1)
    assert ds.camera == CAMERA
    frames = list(synthetic_frames(2, 3, 64, 0, samples=1))  # rendered again: deterministic
    for frame in frames:
        image, fmt = decode_image(frame.key, ds.lmdb.get(frame.key))
        assert fmt == "PNG"
        np.testing.assert_array_equal(image, frame.image.transpose(2, 0, 1))  # PNG decode == render
        stored = records[frame.key]
        assert sorted(stored) == sorted(frame.record)
        for field, value in frame.record.items():
            assert stored[field].dtype == np.float32
            np.testing.assert_array_equal(stored[field], value)
    r = records[keys[0]]
    assert r["bbox"].shape == (4,) and r["kps"].shape == (5, 2) and r["mica_shape"].shape == (100,)
    assert r["emoca_expression"].shape == (50,) and r["emoca_pose"].shape == (6,)
    assert r["transform_matrix"].shape == (3, 4) and (r["emoca_pose"][:3] == 0).all()
    np.testing.assert_allclose(r["transform_matrix"][:, :3] @ r["transform_matrix"][:, :3].T, np.eye(3), atol=1e-5)
    assert 0 < r["kps"].min() and r["kps"].max() < 64 and 0 < r["bbox"][2] - r["bbox"][0] < 1
    # identities differ in shape, frames in expression and pose; another seed changes everything
    assert not np.array_equal(records[keys[0]]["mica_shape"], records[keys[3]]["mica_shape"])
    assert np.array_equal(records[keys[0]]["mica_shape"], records[keys[1]]["mica_shape"])
    assert not np.array_equal(records[keys[0]]["emoca_expression"], records[keys[1]]["emoca_expression"])
    other = next(synthetic_frames(1, 1, 64, seed=1, samples=1))
    assert not np.array_equal(other.image, frames[0].image)


def test_split_rules():
    assert split_videos(["b", "a", "c", "d"]) == {"train": ["a", "b"], "val": ["c"], "test": ["d"]}
    assert split_videos(["a"]) == {"train": ["a"], "val": ["a"], "test": ["a"]}
    assert parse_key("img_007914_79") == ("007914", 79)
    with pytest.raises(ValueError, match="img_oops"):
        parse_key("img_oops")


# --- sampling ----------------------------------------------------------------------------------------


def test_train_samples(tiny):
    root, _ = tiny
    ds = OfficialDataset(root, "train", n_sources=2, seed=3)
    assert len(ds) == 3
    for index in range(len(ds)):
        sample = ds[index]
        key = sample["key"]
        assert len(sample["f_keys"]) == 2 and key not in sample["f_keys"] and len(set(sample["f_keys"])) == 2
        assert {parse_key(k)[0] for k in sample["f_keys"]} == {parse_key(key)[0]}
        assert sample["f_images"].shape == sample["of_images"].shape == (2, 3, 64, 64)
        assert sample["d_images"].shape == (3, 64, 64) and sample["f_transforms"].shape == (2, 3, 4)
        raw = torch.from_numpy(ds.lmdb.image(key)).float()
        torch.testing.assert_close(sample["d_images"], raw / 256, rtol=0, atol=0)  # the official / 256
        assert 0 <= sample["f_images"].min() and sample["f_images"].max() <= 255 / 256
        assert sample["d_poses"].shape == (6,) and sample["d_expressions"].shape == (50,)
    assert ds[1]["f_keys"] == OfficialDataset(root, "train", n_sources=2, seed=3)[1]["f_keys"]
    ds255 = OfficialDataset(root, "train", n_sources=1, pixel_scale=255, warp_sources=False)
    sample = ds255[0]
    torch.testing.assert_close(sample["f_images"], sample["of_images"])
    torch.testing.assert_close(sample["d_images"], torch.from_numpy(ds.lmdb.image(sample["key"])).float() / 255,
                               rtol=0, atol=0)
    # a forked worker reopens the LMDB this process already has open (py-lmdb allows one per process)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)))
    assert batch["f_images"].shape == (2, 2, 3, 64, 64) and batch["d_transforms"].shape == (2, 3, 4)
    torch.testing.assert_close(ds[0]["d_images"], batch["d_images"][0])  # and this process still reads it
    with pytest.raises(ValueError, match="000000"):
        OfficialDataset(root, "train", n_sources=3)  # 3 frames: only 2 besides the target


def test_val_and_test_sources(tiny):
    root, _ = tiny
    video = [f"img_000001_{j}" for j in range(3)]
    for n, expected in ((1, [0]), (2, [0, 2]), (3, [0, 1, 2]), (4, [0, 0, 1, 2])):
        ds = OfficialDataset(root, "val", n_sources=n)
        assert len(ds) == 3
        assert ds[1]["f_keys"] == [video[i] for i in expected]  # the target itself is not excluded
    assert source_positions(10, 4) == [0, 3, 6, 9]
    test = OfficialDataset(root, "test", n_sources=2)
    assert [s["key"] for s in test] == video[1:]  # test drops frame index 0


def test_flame_points(tiny):
    root, _ = tiny
    flame = FLAME(procedural_head_path())
    sample = OfficialDataset(root, "val", n_sources=1, flame=flame)[0]
    expected = flame(sample["d_shape"][None], sample["d_expressions"][None], sample["d_poses"][None])[0]
    torch.testing.assert_close(sample["d_points"], expected)
    assert sample["d_points"].shape == (5023, 3) and sample["d_points"].abs().max() < 1


def test_perspective_warp():
    S = 64
    ones = torch.ones(3, S, S)
    zoom_out = perspective_warp(ones, look_at_front(9.0))  # the square projects beyond the frame
    assert zoom_out[:, 0, 0].eq(0).all() and zoom_out[:, S // 2, S // 2].eq(1).all()
    zoom_in = perspective_warp(ones, look_at_front(24.0))  # inside it: every output pixel reads the image
    torch.testing.assert_close(zoom_in, ones, rtol=0, atol=1e-5)
    # the projected origin (centre of the square) lands at the output centre
    transform = np.concatenate([rotation(0.3, -0.2, 0.1).T @ look_at_front()[:, :3], [[0.2], [0.1], [14.0]]], 1)
    ndc = 12 * (transform[:, 3][:2] / transform[2, 3])
    u, v = S / 2 * (1 - ndc) - 0.5  # PyTorch3D screen coords -> pixel index
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    blob = torch.exp(-((xx - u) ** 2 + (yy - v) ** 2) / 4.0).expand(3, S, S)
    out = perspective_warp(blob, transform)[0]
    cy, cx = (out * yy).sum() / out.sum(), (out * xx).sum() / out.sum()
    assert abs(cx - (S - 1) / 2) < 1.5 and abs(cy - (S - 1) / 2) < 1.5
    with pytest.raises(ValueError, match="square"):
        perspective_warp(torch.ones(3, 8, 9), look_at_front())


# --- bad data ----------------------------------------------------------------------------------------


def broken_copy(root, dst, drop_key=None, corrupt_key=None, drop_field=None):
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns("img_lmdb"))
    ds = OfficialDataset(root, "val", n_sources=1)
    items = []
    for key in sorted(ds.records):
        if key != drop_key:
            items.append((key, b"\x89PNG garbage" if key == corrupt_key else ds.lmdb.get(key)))
    write_lmdb(dst / "img_lmdb", items, map_size=1 << 26)
    if drop_field:
        records, meta_info = load_dataset_pkl(dst)
        del records[drop_field[0]][drop_field[1]]
        (dst / "dataset.pkl").write_bytes(pickle.dumps({"records": records, "meta_info": meta_info}))
    return dst


def test_bad_data_errors_name_the_key(tiny, tmp_path, capsys):
    root, _ = tiny
    missing = broken_copy(root, tmp_path / "missing", drop_key="img_000001_0")
    with pytest.raises(KeyError, match="img_000001_0"):
        OfficialDataset(missing, "val", n_sources=1)[1]  # its source is the missing first frame
    corrupt = broken_copy(root, tmp_path / "corrupt", corrupt_key="img_000001_2")
    with pytest.raises(ValueError, match="img_000001_2"):
        OfficialDataset(corrupt, "val", n_sources=1)[2]
    no_field = broken_copy(root, tmp_path / "field", drop_field=("img_000001_1", "emoca_pose"))
    with pytest.raises(KeyError, match="img_000001_1.*emoca_pose"):
        OfficialDataset(no_field, "val", n_sources=1)[1]
    with pytest.raises(ValueError, match="img_bad"):
        decode_image("img_bad", b"nothing")
    tensor = io.BytesIO()
    torch.save(torch.full((3, 4, 5), 7, dtype=torch.uint8), tensor)  # the official fallback: a saved tensor
    assert decode_image("img_t_0", tensor.getvalue())[0].shape == (3, 4, 5)
    for broken, needle in ((missing, "img_000001_0"), (corrupt, "img_000001_2"), (no_field, "emoca_pose")):
        report = check_dataset(broken)
        assert not report.ok and any(needle in p for p in report.problems), report.problems
        assert main(["data", "check", str(broken)]) == 1
        assert needle in capsys.readouterr().out


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_synth_and_check(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "synth", str(out), "--identities", "3", "--frames", "3", "--size", "32",
                 "--samples", "1", "--format", "jpeg"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 9 frames" in printed and "time:" in printed and "train 3, val 3, test 3" in printed
    assert main(["data", "synth", str(out)]) == 2  # refuses to overwrite
    assert "already holds a dataset" in capsys.readouterr().err
    assert main(["data", "check", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "OK" in printed and "'JPEG': 9" in printed and "'32x32': 9" in printed
    assert main(["data", "preview", str(out), str(tmp_path / "grid.png"), "--tile", "32", "--annotate"]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    result = subprocess.run([sys.executable, "-m", "gpavatar.cli", "data", "check", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "frames/video" in result.stdout


def test_encode_rejects_unknown_format():
    with pytest.raises(ValueError, match="image_format"):
        encode_image(np.zeros((2, 2, 3), np.uint8), "gif")


# --- dataset pickles never run code (issue 13; the CLI side is in tests/test_cli.py) -----------------


def test_records_pickle_reads_data_and_refuses_code():
    from collections import Counter, OrderedDict

    from gpavatar.data.safe_pickle import safe_load

    data = {"records": OrderedDict(img_a_0={"bbox": np.arange(4, dtype=np.float32), "n": np.int64(3),
                                            "s": np.float32(0.5), "t": (1, 2.0, "x"), "l": [None, True]}),
            "meta_info": {"train": ["img_a_0"], "val": [], "test": []}}
    for protocol in (0, 2, 4, 5):
        back = safe_load(io.BytesIO(pickle.dumps(data, protocol=protocol)))
        record = back["records"]["img_a_0"]
        np.testing.assert_array_equal(record["bbox"], data["records"]["img_a_0"]["bbox"])
        assert record["n"] == 3 and record["s"] == np.float32(0.5) and record["t"] == (1, 2.0, "x")
    for hostile, name in ((Counter(a=1), "collections.Counter"), (np.ma.masked_array([1.0]), "numpy.ma"),
                          (torch.zeros(2), "torch"), (print, "builtins.print")):
        with pytest.raises(pickle.UnpicklingError, match=f"refusing.*{name}"):
            safe_load(io.BytesIO(pickle.dumps({"records": {"k": hostile}})))
    with pytest.raises(pickle.UnpicklingError, match="not a readable pickle"):
        safe_load(io.BytesIO(pickle.dumps(data)[:40]))

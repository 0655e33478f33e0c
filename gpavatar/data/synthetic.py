"""Synthetic talking-head videos in the official GPAvatar dataset layout (SPEC pipeline.md 2.1-2.4).

:func:`make_synthetic_dataset` renders FLAME heads (by default the procedural head,
:func:`gpavatar.flame.procedural.procedural_head_path`) with :mod:`gpavatar.data.raster` and writes
the files and fields the official loader reads (:class:`gpavatar.data.OfficialDataset` reads them
back; the official loader would resize the frames to 512):

=====================  ==========================================================================
``img_lmdb/``          LMDB, key ``img_<video>_<frame>`` (UTF-8) -> PNG (default) or JPEG q95 bytes
                       of a (size, size, 3) uint8 RGB frame on a black background
``dataset.pkl``        ``{"records": {key: record}, "meta_info": {"train": [...], "val": [...],
                       "test": [...]}}``; record fields, float32: ``bbox`` (4,), ``kps`` (5, 2),
                       ``mica_shape`` (100,), ``emoca_expression`` (50,), ``emoca_pose`` (6,),
                       ``transform_matrix`` (3, 4)
``camera.json``        ``{"flame_scale": 5.0, "focal_length": 12.0, "principal_point": [0.0, 0.0]}``
``driver.json``        an example driver file (:mod:`gpavatar.data.driver`): the FLAME parameters and
                       cameras of the test video's frames, for ``gpavatar reenact --driver``
``synthetic.json``     generation arguments and conventions (not read by the official code); written
                       last: it marks a complete dataset
=====================  ==========================================================================

The files are written into ``OUT/.synth-partial/`` and moved into place at the end: an interrupted
run leaves only that folder (the next run removes it).  Running again with the same arguments finds
the complete dataset and keeps it (``"reused": True``); other arguments need ``overwrite=True``.

One video per identity, ``video = "%06d" % identity``, frames ``0 .. frames_per_identity - 1``.

* Identity: ``mica_shape`` (100,) = the official record size (the tracker keeps the first 100 of
  MICA's 300).  The procedural head has 100 identity and 50 expression columns (12 / 15 of them
  named), so records map one to one; a FLAME file with fewer columns uses the leading entries
  (records are still written at 100 / 50; the extra entries are drawn but have no effect).
  Skin, hair and iris colours are re-tinted per identity from the model's ``vc`` (a model
  without ``vc`` renders in a uniform skin colour).
* Frames: ``emoca_expression`` (50,), jaw in ``emoca_pose[3:]`` with the global rotation
  ``emoca_pose[:3] = 0`` (as the tracker stores it); the head pose lives only in
  ``transform_matrix`` = ``[R_head · R_front | T]``, ``R_front = diag(-1, 1, -1)`` (a camera on
  world +z facing the head), depth ~ 9-10 like the tracker's, jittered so the head stays centred.
* ``kps``: 5 points (eyes, nose tip, mouth corners; image-left first, as RetinaFace) projected
  from FLAME's 68 landmarks, pixel coordinates of the model's grid (column u, row v);
  ``bbox``: square of side 1.25 x mean(width, height) of the 68 landmarks' box, same centre,
  divided by the image size (SPEC 2.3).
* Splits by video: the last video is ``test``, the one before ``val``, the rest ``train``;
  with 2 videos ``val`` = ``test`` = the second, with 1 video every split holds it.

Everything is a function of ``seed``: frame (i, j) uses ``default_rng([seed, i, j])``, so
a dataset with more frames or identities extends a smaller one.

    >>> info = make_synthetic_dataset("/tmp/synth", n_identities=2, frames_per_identity=3, size=64)  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import torch

from gpavatar.data.raster import look_at_front, project, render_mesh

__all__ = ["CAMERA", "head_camera", "SyntheticFrame", "make_synthetic_dataset", "synthetic_frames", "encode_image",
           "frame_key", "split_videos", "write_lmdb"]

CAMERA = {"flame_scale": 5.0, "focal_length": 12.0, "principal_point": [0.0, 0.0]}
N_SHAPE, N_EXP = 100, 50  # official record sizes (SPEC pipeline.md 2.3)
N_NAMED_SHAPE, N_NAMED_EXP = 12, 15  # named directions of the procedural head
HEAD_CENTRE = np.array([0.0, -0.12, 0.0])  # world point (flame_scale units) kept near the image centre
BASE_SKIN, BASE_HAIR, BASE_IRIS = (0.86, 0.66, 0.55), (0.2, 0.13, 0.09), (0.3, 0.42, 0.55)  # procedural vc
SKIN_TONES = ((0.96, 0.8, 0.68), (0.86, 0.66, 0.55), (0.76, 0.56, 0.42), (0.6, 0.42, 0.3), (0.42, 0.28, 0.2))
HAIR_COLOURS = ((0.05, 0.04, 0.04), (0.2, 0.13, 0.09), (0.42, 0.27, 0.15), (0.8, 0.66, 0.42), (0.6, 0.24, 0.1),
                (0.62, 0.62, 0.62))
IRIS_COLOURS = ((0.3, 0.42, 0.55), (0.3, 0.2, 0.12), (0.32, 0.45, 0.25), (0.5, 0.38, 0.22))
RETINA_FACE_LANDMARKS = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47), (30,), (48,), (54,))  # iBUG-68 groups
LMDB_COMMIT_EVERY = 2000
DRIVER_FILE = "driver.json"  # the example driver: the test video's FLAME parameters and cameras


class SyntheticFrame(NamedTuple):
    key: str  # img_<video>_<frame>
    image: np.ndarray  # (size, size, 3) uint8 RGB
    mask: np.ndarray  # (size, size) bool, the head's pixels
    record: dict  # the dataset.pkl record (numpy float32 arrays)


def frame_key(video: Union[int, str], frame: int) -> str:
    """``img_<video>_<frame>``; an int video id is written with 6 digits."""
    video = f"{video:06d}" if isinstance(video, (int, np.integer)) else str(video)
    if "_" in video or not video:
        raise ValueError(f"video ids must be non-empty and contain no '_', got {video!r}")
    return f"img_{video}_{int(frame)}"


def split_videos(videos: list[str]) -> dict[str, list[str]]:
    """Videos per split (module docstring): test = last, val = the one before, train = the rest."""
    videos = sorted(videos)
    if len(videos) >= 3:
        return {"train": videos[:-2], "val": videos[-2:-1], "test": videos[-1:]}
    if len(videos) == 2:
        return {"train": videos[:1], "val": videos[1:], "test": videos[1:]}
    return {"train": list(videos), "val": list(videos), "test": list(videos)}


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> PNG or JPEG bytes (what the official writer stores)."""
    from PIL import Image

    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    elif image_format in ("jpeg", "jpg"):
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    else:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    return buffer.getvalue()


def _euler(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Column-form rotation R_y(yaw) R_x(pitch) R_z(roll), radians."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return ry @ rx @ rz


def head_camera(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0, distance: float = 9.5) -> np.ndarray:
    """(3, 4) world-to-camera [R|T] (row form, as the tracker) looking at the procedural head's centre
    from ``distance`` world units, the head turned by ``yaw`` / ``pitch`` / ``roll`` radians."""
    R = _euler(yaw, pitch, roll).T @ look_at_front()[:, :3]
    T = np.array([0.0, 0.0, distance]) - HEAD_CENTRE @ R
    return np.concatenate([R, T[:, None]], axis=1).astype(np.float32)


def _hair_weight(v_template: np.ndarray) -> np.ndarray:
    """(V,) in [0, 1]: the procedural head's hair region, the formula of
    ``gpavatar.flame.procedural._colours`` (hairline height by azimuth around the head)."""
    from gpavatar.flame.procedural import CENTRE

    azimuth = np.degrees(np.abs(np.arctan2(v_template[:, 0], v_template[:, 2] - CENTRE[2])))
    hairline = np.interp(azimuth, [0, 40, 70, 100, 130, 180], [0.072, 0.066, 0.052, 0.04, 0.0, -0.05])
    t = np.clip((v_template[:, 1] - hairline) / 0.02 + 0.5, 0, 1)
    return t * t * (3 - 2 * t)


def _tint(vc: np.ndarray, hair_weight: np.ndarray, skin, hair, iris) -> np.ndarray:
    """Re-colour the model's vertex colours (V, 3).  With hair weight h, each colour is read as
    k · ((1 - h) · base skin + h · base hair) (k per channel: baked shading, brows, lips) and becomes
    k · ((1 - h) · skin + h · hair); colours brighter than the base skin in every channel (teeth,
    eye whites) are kept; the iris is replaced."""
    base_skin, base_hair = np.asarray(BASE_SKIN), np.asarray(BASE_HAIR)
    w = hair_weight[:, None]
    out = vc / ((1 - w) * base_skin + w * base_hair) * ((1 - w) * np.asarray(skin) + w * np.asarray(hair))
    out = np.where((vc > base_skin + 0.02).all(1, keepdims=True), vc, out)
    out[np.linalg.norm(vc - np.asarray(BASE_IRIS), axis=1) < 0.05] = iris
    return np.clip(out, 0, 1)


def _identity(seed: int, identity: int):
    rng = np.random.default_rng([seed, identity])
    shape = np.zeros(N_SHAPE)
    shape[:N_NAMED_SHAPE] = np.clip(rng.normal(0, 1.0, N_NAMED_SHAPE), -2, 2)
    shape[N_NAMED_SHAPE:] = rng.normal(0, 0.5, N_SHAPE - N_NAMED_SHAPE)
    jitter = lambda c: np.clip(np.asarray(c) * rng.normal(1, 0.05, 3), 0, 1)  # noqa: E731
    skin = jitter(SKIN_TONES[rng.integers(len(SKIN_TONES))])
    hair = jitter(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))])
    iris = jitter(IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))])
    return shape.astype(np.float32), (skin, hair, iris)


def _frame_params(seed: int, identity: int, frame: int):
    rng = np.random.default_rng([seed, identity, frame])
    expression = np.zeros(N_EXP)
    expression[:N_NAMED_EXP] = rng.normal(0, 0.3, N_NAMED_EXP)
    active = rng.choice(N_NAMED_EXP, size=rng.integers(1, 4), replace=False)
    expression[active] = rng.uniform(0.5, 2.0, len(active))
    expression[N_NAMED_EXP:] = rng.normal(0, 0.3, N_EXP - N_NAMED_EXP)
    pose = np.zeros(6)  # [global = 0 (the tracker zeroes it), jaw axis-angle]
    pose[3] = rng.uniform(0, 0.3) if rng.random() < 0.6 else 0.0  # +x opens the mouth
    pose[4] = rng.normal(0, 0.03)
    yaw, pitch, roll = np.radians([rng.uniform(-35, 35), rng.uniform(-15, 15), rng.uniform(-8, 8)])
    R = _euler(yaw, pitch, roll).T @ look_at_front()[:, :3]  # row form: X_cam = (X R_head^T) R_front + T
    target = np.array([rng.normal(0, 0.04), rng.normal(0, 0.04), rng.uniform(9.0, 10.0)])
    T = target - HEAD_CENTRE @ R
    transform = np.concatenate([R, T[:, None]], axis=1)
    return expression.astype(np.float32), pose.astype(np.float32), transform.astype(np.float32)


def _face_boxes(landmarks: np.ndarray, transform: np.ndarray, size: int):
    """kps (5, 2) pixels and normalised square bbox (4,) from 68 world landmarks."""
    uv, _ = project(landmarks, transform, CAMERA["focal_length"], size)
    kps = np.stack([uv[list(group)].mean(0) for group in RETINA_FACE_LANDMARKS])
    lo, hi = uv.min(0), uv.max(0)
    centre, side = (lo + hi) / 2, 1.25 * (hi - lo).mean()
    bbox = np.concatenate([centre - side / 2, centre + side / 2]) / size
    return kps.astype(np.float32), bbox.astype(np.float32)


def _flame(flame_model, landmark_embedding):
    """FLAME layer (scale 5, at most 100 / 50 columns), base vertex colours (V, 3), hair weight (V,)."""
    from gpavatar.flame import FLAME, load_flame_model
    from gpavatar.flame.procedural import procedural_head_path

    if flame_model is None:  # the procedural .npz holds its own landmark embedding
        flame_model = landmark_embedding = procedural_head_path()
    fields = load_flame_model(flame_model)
    flame = FLAME.clamped(fields, N_SHAPE, N_EXP, scale=CAMERA["flame_scale"], landmark_embedding=landmark_embedding)
    vc = fields.get("vc")
    if vc is None:  # a FLAME file without colours: uniform skin, no hair
        return flame, np.tile(BASE_SKIN, (flame.num_vertices, 1)), np.zeros(flame.num_vertices)
    return flame, vc.astype(np.float64), _hair_weight(fields["v_template"].astype(np.float64))


def synthetic_frames(n_identities: int = 8, frames_per_identity: int = 16, size: int = 256, seed: int = 0,
                     flame_model=None, landmark_embedding=None, samples: int = 2) -> Iterator[SyntheticFrame]:
    """Render the frames of :func:`make_synthetic_dataset` in key order (identity, then frame).

    Args:
        n_identities, frames_per_identity, size, seed: as :func:`make_synthetic_dataset`
        flame_model: FLAME ``.pkl`` / ``.npz`` path (None: the procedural head, cached, with its landmarks)
        landmark_embedding: landmark file or dict for ``flame_model``; without one, ``kps`` / ``bbox``
            come from the vertices of the front half (z > 0) instead of the 68 landmarks
        samples: anti-aliasing samples per pixel side (:func:`render_mesh`)
    """
    _check_arguments(n_identities, frames_per_identity, size, seed, samples)
    flame, vc, hair_weight = _flame(flame_model, landmark_embedding)
    faces = flame.faces.numpy()
    for identity in range(n_identities):
        shape, colours = _identity(seed, identity)
        colors = _tint(vc, hair_weight, *colours)
        params = [_frame_params(seed, identity, j) for j in range(frames_per_identity)]
        exp, pose, transforms = (np.stack(p) for p in zip(*params))
        with torch.no_grad():
            out = flame.full_output(torch.from_numpy(np.tile(shape[:flame.n_shape], (len(exp), 1))),
                                    torch.from_numpy(exp[:, :flame.n_exp]), torch.from_numpy(pose))
        vertices = out.vertices.numpy()
        landmarks = out.landmarks3d.numpy() if out.landmarks3d is not None else None
        for j in range(frames_per_identity):
            image, mask = render_mesh(vertices[j], faces, colors, transforms[j], CAMERA["focal_length"], size,
                                      samples=samples)
            lmk = landmarks[j] if landmarks is not None else vertices[j][vertices[j][:, 2] > 0]
            kps, bbox = _face_boxes(lmk, transforms[j], size)
            record = {"bbox": bbox, "kps": kps, "mica_shape": shape.copy(), "emoca_expression": exp[j],
                      "emoca_pose": pose[j], "transform_matrix": transforms[j]}
            yield SyntheticFrame(frame_key(identity, j), image, mask, record)


def write_lmdb(path: Union[str, os.PathLike], items, map_size: int = 1 << 40) -> int:
    """Write (key str, value bytes) pairs into a new LMDB at ``path`` (commit every 2000 puts); returns the count."""
    import lmdb

    from gpavatar.data.official import close_lmdb

    close_lmdb(path)  # a reader of the old database in this process would see stale pages
    env = lmdb.open(os.fspath(path), map_size=map_size, subdir=True, lock=True)
    count = 0
    try:
        txn = env.begin(write=True)
        for key, value in items:
            txn.put(key.encode("utf-8"), value)
            count += 1
            if count % LMDB_COMMIT_EVERY == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
    finally:
        env.close()
    return count


def _check_arguments(n_identities, frames_per_identity, size, seed, samples) -> None:
    for name, value, low in (("n_identities", n_identities, 1), ("frames_per_identity", frames_per_identity, 1),
                             ("size", size, 8), ("seed", seed, 0), ("samples", samples, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _complete_info(out: Path) -> Optional[dict]:
    """``synthetic.json`` of a complete dataset in ``out`` (every artefact there, the LMDB whole and
    holding the frames it lists), else None."""
    from gpavatar.data.official import open_lmdb_checked

    try:
        info = json.loads((out / "synthetic.json").read_text())
        if not (isinstance(info, dict) and (out / "dataset.pkl").is_file() and (out / "camera.json").is_file()):
            return None
        env = open_lmdb_checked(out / "img_lmdb")
        try:
            entries = env.stat()["entries"]
        finally:
            env.close()
        return info if entries == info.get("frames") else None
    except (OSError, ValueError):
        return None


def make_synthetic_dataset(out_dir: Union[str, os.PathLike], n_identities: int = 8, frames_per_identity: int = 16,
                           size: int = 256, seed: int = 0, image_format: str = "png", flame_model=None,
                           landmark_embedding=None, samples: int = 2, overwrite: bool = False,
                           map_size: int = 1 << 40, progress: bool = False) -> dict:
    """Render and write a synthetic dataset in the official layout (module docstring).

    Every argument is checked before anything is written.  The files are written into
    ``out_dir/.synth-partial/`` and moved into place at the end (``synthetic.json`` last), so an
    interrupted run leaves only that folder, which the next run removes.  A complete dataset with the
    same arguments already in ``out_dir`` is kept as it is: its ``synthetic.json`` content is returned
    with ``"reused": True``.

    Args:
        out_dir: created if needed; must not already hold another dataset unless ``overwrite``
        n_identities: videos (one identity each); frames_per_identity: frames per video (training
            draws 2 sources besides the target: 3 or more frames per video are needed to train)
        size: image side in pixels (the official data is 512); seed: everything derives from it
        image_format: ``"png"`` (lossless, default) or ``"jpeg"`` (quality 95, the official default)
        flame_model, landmark_embedding: FLAME file and its landmarks (None: the procedural head);
        samples: anti-aliasing samples per pixel side (:func:`render_mesh`)
        overwrite: replace whatever dataset ``out_dir`` holds
        progress: show a progress bar (tqdm, stderr)
    Returns:
        the ``synthetic.json`` content: arguments, frame count, splits sizes and ``seconds`` taken
    """
    from gpavatar.data.official import close_lmdb

    start = time.perf_counter()
    _check_arguments(n_identities, frames_per_identity, size, seed, samples)
    encode_image(np.zeros((1, 1, 3), np.uint8), image_format)  # validate the format before rendering
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a folder")
    settings = {"n_identities": int(n_identities), "frames_per_identity": int(frames_per_identity), "size": int(size),
                "seed": int(seed), "image_format": image_format, "samples": int(samples),
                "flame_model": "procedural" if flame_model is None else os.fspath(flame_model)}
    artefacts = [out / name for name in ("img_lmdb", "dataset.pkl", "camera.json", DRIVER_FILE, "synthetic.json")]
    if any(p.exists() for p in artefacts):
        if not overwrite:
            existing = _complete_info(out)
            if existing is not None and all(existing.get(k) == v for k, v in settings.items()):
                if not (out / DRIVER_FILE).is_file():  # a dataset written before the example driver existed
                    from gpavatar.data.official import load_dataset_pkl

                    _write_driver(out, load_dataset_pkl(out)[0])
                return {**existing, "reused": True}
            what = ("one not written (or not finished) by gpavatar data synth" if existing is None else
                    "other settings: " + ", ".join(f"{k} {existing.get(k)!r} (asked {v!r})"
                                                   for k, v in settings.items() if existing.get(k) != v))
            raise FileExistsError(f"{out} already holds a dataset ({what}); pass --overwrite (overwrite=True) to "
                                  f"replace it, or choose another folder")
        close_lmdb(artefacts[0])
        shutil.rmtree(artefacts[0], ignore_errors=True)
        for p in artefacts[1:]:
            p.unlink(missing_ok=True)
    partial = out / ".synth-partial"
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted run left
    partial.mkdir(parents=True)
    try:
        info = _write(partial, settings, flame_model, landmark_embedding, map_size, progress)
        info["seconds"] = round(time.perf_counter() - start, 3)
        (partial / "synthetic.json").write_text(json.dumps(info, indent=2) + "\n")
        for name in ("img_lmdb", "camera.json", "dataset.pkl", DRIVER_FILE, "synthetic.json"):  # marker last
            os.replace(partial / name, out / name)
    finally:
        close_lmdb(partial / "img_lmdb")
        shutil.rmtree(partial, ignore_errors=True)
    return info


def _write(folder: Path, settings: dict, flame_model, landmark_embedding, map_size: int, progress: bool) -> dict:
    """img_lmdb/, dataset.pkl and camera.json into ``folder``; returns the synthetic.json content."""
    records: dict[str, dict] = {}
    total = settings["n_identities"] * settings["frames_per_identity"]

    def items():
        frames = synthetic_frames(settings["n_identities"], settings["frames_per_identity"], settings["size"],
                                  settings["seed"], flame_model, landmark_embedding, settings["samples"])
        if progress:
            from tqdm import tqdm

            frames = tqdm(frames, total=total, desc="synth", unit="frame", leave=False)
        for frame in frames:
            records[frame.key] = frame.record
            yield frame.key, encode_image(frame.image, settings["image_format"])

    count = write_lmdb(folder / "img_lmdb", items(), map_size)
    videos = split_videos(sorted({key.split("_")[1] for key in records}))
    meta_info = {split: [k for k in records if k.split("_")[1] in vids] for split, vids in videos.items()}
    with open(folder / "dataset.pkl", "wb") as handle:
        pickle.dump({"records": records, "meta_info": meta_info}, handle, protocol=4)
    (folder / "camera.json").write_text(json.dumps(CAMERA, indent=2) + "\n")
    _write_driver(folder, records)
    return {"generator": "gpavatar.data.synthetic", **settings, "frames": count,
            "splits": {k: len(v) for k, v in meta_info.items()},
            "pixel_grid": "model: column j at x = 1 - 2j/(W-1), row i at y = 1 - 2i/(H-1)"}


def _write_driver(folder: Path, records: dict) -> Path:
    """``folder/driver.json``: the frames of the last video (the test split), in frame order."""
    from gpavatar.data.driver import driver_from_records, save_driver
    from gpavatar.data.official import parse_key

    video = max(parse_key(k)[0] for k in records)
    keys = sorted((k for k in records if parse_key(k)[0] == video), key=lambda k: parse_key(k)[1])
    driver = driver_from_records(records, keys, source=f"synthetic video {video}")
    driver.focal = CAMERA["focal_length"]
    return save_driver(folder / DRIVER_FILE, driver)

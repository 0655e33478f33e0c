"""Procedural FLAME-format head: a freely shippable stand-in for ``generic_model.pkl`` (SPEC pipeline.md 1.1).

The official FLAME assets cannot be redistributed. :func:`make_procedural_head`
builds, deterministically and in well under a second, a head model with the same
fields, layouts and joint tree, so that the FLAME layer, the data tools and the
renderer run end to end without them. It is a test asset, not a face model.

Format (one dict of numpy arrays; :func:`save_procedural_head` writes it as ``.npz``, or as a
``.pkl`` of plain numpy arrays that ``pickle.load`` and FLAME layers written for the official
file read; :func:`gpavatar.flame.load_flame_model` and :func:`load_landmark_embedding` read both):

=========================  ===================  ==============================================
key                        shape, dtype         content
=========================  ===================  ==============================================
``v_template``             (5023, 3) float32    metres, y up, face towards +z, head centred near 0
``f``                      (10034, 3) int64     triangles, outward (counter-clockwise) winding
``shapedirs``              (5023, 3, 300+E) f32 the FLAME release layout: S identity columns, zero
                                                columns up to 300, E expression columns from 300
``n_shape_total``          () int64             300, the column where expression starts (optional:
                                                readers without it assume 300, as the release)
``posedirs``               (5023, 3, 36) f32    official layout: column 9 (j-1) + 3 r + c multiplies
                                                (R_j - I)[r, c] for joint j = 1..4
``J_regressor``            (5, 5023) float32    dense, rows >= 0 summing to 1
``weights``                (5023, 5) float32    rows >= 0 summing to 1
``kintree_table``          (2, 5) int64         [[2**32-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]] as the
                                                official file (root parent 4294967295, read as -1)
``vc``                     (5023, 3) float32    vertex colours in [0, 1]
``static_lmk_*``           (51,), (51, 3)       face index / barycentric coords, iBUG points 17..67
``dynamic_lmk_*``          (79, 17), (79,17,3)  jaw contour, the same row for every yaw (no silhouette
                                                search: landmarks are unused by GPAvatar, SPEC 1.5)
``full_lmk_*``             (68,), (68, 3)       all 68 iBUG points
=========================  ===================  ==============================================

``layout="compact"`` gives the earlier in-memory layout instead: (5023, 3, S+E) with expression
from column S and ``n_shape_total`` = S (that key is then required to find the expressions).
Both layouts give the same FLAME vertices for the same parameters: the padding columns are zero
and the layer takes columns [0, n_shape) and [n_shape_total, n_shape_total + n_exp).

Joints: 0 root at the neck base, 1 neck (skull base; the head hangs on it), 2 jaw (hinge
between the ears), 3 left eye (+x, the subject's left), 4 right eye. Vertices: 4699 on the head
surface (2 poles + 61 latitude rows x 77 longitude columns; closed, genus 0, 9394 faces), then
two closed eyeballs of 162 vertices and 320 faces each (left, then right). The mouth is a slit
whose inner rows fold into a pocket (teeth rows, then a dark cavity); the upper lip is skinned
to the neck joint and the lower lip to the jaw, so a jaw rotation about +x opens the mouth. Scaled by
``flame_scale`` = 5 the head spans about [-0.42, 0.42] x [-0.83, 0.57] x [-0.57, 0.56].

Directions are smooth displacement fields; one unit of a named direction moves its region by
at most ``UNIT`` = 4 mm, so parameters in [-2, 2] stay plausible (``blink`` = 2 closes the
eyes). The first columns are named (``SHAPE_NAMES`` / ``EXPRESSION_NAMES``, nearly orthogonal:
|cos| < 0.7), the rest are seeded random smooth bumps, amplitude slowly decaying, each exactly
orthogonal to all columns of its group before it. ``seed`` only changes those random columns and
the random part of ``posedirs``; the template, faces, weights and colours never change.

    >>> head = make_procedural_head()
    >>> head["v_template"].shape, head["shapedirs"].shape, int(head["n_shape_total"])
    ((5023, 3), (5023, 3, 350), 300)
    >>> save_procedural_head("/tmp/generic_model.pkl")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from gpavatar.flame.loader import LANDMARK_KEYS
from gpavatar.flame.release import RELEASE_SHAPE_COLUMNS, to_release_layout, write_flame_pickle

NUM_VERTICES = 5023
HEAD_ROWS, HEAD_COLUMNS = 61, 77  # head surface: 2 poles + rows x columns = 4699 vertices
EYE_RINGS, EYE_SEGMENTS = 10, 16  # eyeball: 2 poles + rings x segments = 162 vertices
ROOT_PARENT = 4294967295  # kintree_table[0, 0] in the official file (uint32 -1)
PARENTS = (-1, 0, 1, 1, 1)
MODEL_KEYS = ("v_template", "f", "shapedirs", "n_shape_total", "posedirs", "J_regressor", "weights",
              "kintree_table", "vc")
EXPRESSION_NAMES = ("lips_part", "smile", "nostril_flare", "pucker", "mouth_stretch", "brow_raise", "brow_lower",
                    "blink", "cheek_puff", "chin_raise", "smile_asymmetric", "nose_wrinkle", "squint", "mouth_left",
                    "upper_lip_raise")
LAYOUTS = ("release", "compact")  # shapedirs: expression at column 300 (the FLAME release) / right after identity
FILE_SUFFIXES = (".npz", ".pkl")
SHAPE_NAMES = ("head_width", "head_height", "head_depth", "jaw_width", "nose_length", "chin_length",
               "forehead", "cheekbones", "eye_spacing", "neck_thickness", "lip_fullness", "ear_size")
UNIT = 0.004  # metres moved by one unit of a named direction

# --- geometry (metres) -----------------------------------------------------------------------
CENTRE = np.array([0.0, -0.01, -0.012])  # the head surface is radial (star-shaped) about this point
NECK_AXIS_Z, NECK_RADIUS, NECK_BOTTOM = -0.012, 0.054, -0.165
ELLIPSOIDS = (  # (centre, semi-axes): smooth union forms the head
    ((0, 0.015, -0.012), (0.076, 0.098, 0.102)),  # skull
    ((0, -0.03, 0.012), (0.062, 0.07, 0.074)),  # lower face
    ((0, -0.07, 0.052), (0.024, 0.02, 0.026)),  # chin
    ((0, 0.035, 0.058), (0.058, 0.014, 0.032)),  # brow ridge
    ((0, 0.012, 0.085), (0.009, 0.022, 0.013)),  # nose bridge
    ((0, -0.008, 0.094), (0.015, 0.012, 0.016)),  # nose tip
    ((0.04, -0.006, 0.048), (0.022, 0.018, 0.024)), ((-0.04, -0.006, 0.048), (0.022, 0.018, 0.024)),  # cheeks
    ((0, -0.032, 0.079), (0.024, 0.007, 0.011)),  # upper lip
    ((0, -0.045, 0.077), (0.021, 0.0075, 0.011)),  # lower lip
    ((0.074, 0.0, -0.012), (0.009, 0.026, 0.016)), ((-0.074, 0.0, -0.012), (0.009, 0.026, 0.016)),  # ears
)
UNION_POWER = 14.0
SLIT_Y = -0.038  # mouth slit height at the front
MOUTH_HALF_WIDTH = 0.024
POCKET_DEPTHS = (0.004, 0.018, 0.03, 0.03, 0.018, 0.004)  # inward, rows inside the slit (upper wall first)
POCKET_HALF_ANGLE = np.radians(0.7)  # the lips' inner rows sit this far above / below the slit direction
EYE_X, EYE_Y, EYE_RADIUS, EYE_DENT = 0.032, 0.024, 0.0125, 0.009
JOINT_TARGETS = ((0.0, -0.15, NECK_AXIS_Z), (0.0, -0.06, -0.02), (0.0, -0.012, -0.004))  # root, neck, jaw


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(P, centre, sigma):
    return np.exp(-0.5 * (((P - np.asarray(centre)) / np.asarray(sigma)) ** 2).sum(-1))


def _directions(theta, phi):
    """Unit vectors: theta from +y (top), phi around y from +z (front) towards +x."""
    return np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)], -1)


def _ray_exit(d, centre, axes):
    """Far intersection distance of rays CENTRE + t d with an ellipsoid (0 where missed)."""
    o, a = (CENTRE - np.asarray(centre)) / np.asarray(axes), d / np.asarray(axes)
    A, B, C = (a * a).sum(-1), 2 * (o * a).sum(-1), (o * o).sum() - 1
    disc = B * B - 4 * A * C
    t = (-B + np.sqrt(np.maximum(disc, 0))) / (2 * A)
    return np.where((disc > 0) & (t > 0), t, 0.0)


def _neck_exit(d):
    """Exit distance from the vertical neck cylinder, capped at NECK_BOTTOM (CENTRE lies on its axis)."""
    horizontal = np.hypot(d[:, 0], d[:, 2])
    t_side = NECK_RADIUS / np.maximum(horizontal, 1e-12)
    t_cap = np.where(d[:, 1] < 0, (NECK_BOTTOM - CENTRE[1]) / np.minimum(d[:, 1], -1e-12), np.inf)
    t_top = np.where(d[:, 1] > 0, -CENTRE[1] / np.maximum(d[:, 1], 1e-12), np.inf)  # open inside the head at y=0
    return np.minimum(np.minimum(t_side, t_cap), t_top)


def _base_radius(d):
    radii = [_ray_exit(d, c, a) for c, a in ELLIPSOIDS] + [_neck_exit(d)]
    return (np.stack(radii) ** UNION_POWER).sum(0) ** (1.0 / UNION_POWER)


def _eye_dent(P):
    """Depth of the eye openings (almond-shaped sockets the eyeballs show through)."""
    dent = np.zeros(len(P))
    for side in (1, -1):
        u, v = (P[:, 0] - side * EYE_X) / 0.015, (P[:, 1] - EYE_Y) / 0.0062
        q = np.abs(u) ** 1.6 + v * v
        dent += EYE_DENT * (1 - _smoothstep((q - 0.75) / 0.25)) * (P[:, 2] > 0.03)
    return dent


def _row_angles(theta_slit):
    """Latitudes of the head rows (dense over the face) and the index of the first pocket row."""
    fine = np.linspace(0, np.pi, 4001)
    deg = np.degrees(fine)
    density = 0.45 + 2.2 * np.exp(-(((deg - 96) / 30) ** 2)) + 0.6 * np.exp(-(((deg - 160) / 6) ** 2))
    F = np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2)])
    F /= F[-1]
    upper, lower = theta_slit - POCKET_HALF_ANGLE, theta_slit + POCKET_HALF_ANGLE
    Fu, Fl = np.interp(upper, fine, F), np.interp(lower, fine, F)
    n_regular = HEAD_ROWS - len(POCKET_DEPTHS)
    n_up = int(round(n_regular * Fu / (Fu + 1 - Fl)))
    up = np.interp(Fu * np.arange(1, n_up + 1) / n_up, F, fine)
    low = np.interp(Fl + (1 - Fl) * np.arange(n_regular - n_up) / (n_regular - n_up), F, fine)
    n_pocket = len(POCKET_DEPTHS)
    pocket = theta_slit + POCKET_HALF_ANGLE * (2 * np.arange(1, n_pocket + 1) / (n_pocket + 1) - 1)
    up[-1], low[0] = upper, lower
    return np.concatenate([up, pocket, low]), n_up


def _grid_faces(rows, cols):
    """Triangles of a closed lat-long grid: vertex 0 = top pole, then rows x cols, then the bottom pole."""
    r, c = np.meshgrid(np.arange(rows - 1), np.arange(cols), indexing="ij")
    a, b = 1 + r * cols + c, 1 + (r + 1) * cols + c
    b1, a1 = 1 + (r + 1) * cols + (c + 1) % cols, 1 + r * cols + (c + 1) % cols
    quads = np.concatenate([np.stack([a, b, b1], -1).reshape(-1, 3), np.stack([a, b1, a1], -1).reshape(-1, 3)])
    j = np.arange(cols)
    top = np.stack([np.zeros(cols, int), 1 + j, 1 + (j + 1) % cols], -1)
    last, bottom = 1 + (rows - 1) * cols, 1 + rows * cols
    bot = np.stack([last + j, np.full(cols, bottom), last + (j + 1) % cols], -1)
    return np.concatenate([top, quads, bot])


def _head_surface():
    """Head surface: vertices (N, 3), faces, row index per vertex (-1 and HEAD_ROWS at the poles), index of
    the first pocket row, unit directions from CENTRE (N, 3), eye-socket depth (N,)."""
    slit_dir = np.array([0.0, SLIT_Y - CENTRE[1], 0.1])
    theta_slit = np.arccos(slit_dir[1] / np.linalg.norm(slit_dir))
    theta, n_up = _row_angles(theta_slit)
    u = 2 * np.pi * np.arange(HEAD_COLUMNS) / HEAD_COLUMNS
    u = np.where(u > np.pi, u - 2 * np.pi, u)
    phi = u - 0.62 * np.sin(u)  # denser towards the face
    T, Ph = np.meshgrid(theta, phi, indexing="ij")
    d = np.concatenate([[[0, 1, 0]], _directions(T, Ph).reshape(-1, 3), [[0, -1, 0]]])
    row = np.concatenate([[-1], np.repeat(np.arange(HEAD_ROWS), HEAD_COLUMNS), [HEAD_ROWS]])
    r = _base_radius(d)
    P = CENTRE + r[:, None] * d
    dent = _eye_dent(P)
    r = r - dent
    k = row - n_up  # pocket rows are 0..5
    pocket = (k >= 0) & (k < len(POCKET_DEPTHS))
    mouth = 1 - _smoothstep((np.abs(P[:, 0]) - (MOUTH_HALF_WIDTH - 0.007)) / 0.007)
    r[pocket] -= np.asarray(POCKET_DEPTHS)[k[pocket]] * mouth[pocket] * (P[pocket, 2] > 0)
    P = CENTRE + r[:, None] * d
    return P, _grid_faces(HEAD_ROWS, HEAD_COLUMNS), row, n_up, d, dent


def _eyeball(side):
    """Eyeball at x = side * EYE_X, pushed back until it lies 1 mm under the closed lids (the head
    surface without its eye openings). Returns vertices (162, 3), unit offsets from the centre, centre."""
    centre = np.array([side * EYE_X, EYE_Y, 0.08 - EYE_RADIUS])
    for _ in range(3):
        offset = centre + EYE_RADIUS * _eyeball_directions() - CENTRE
        distance = np.linalg.norm(offset, axis=1)
        centre = centre - [0, 0, (distance - _base_radius(offset / distance[:, None])).max() + 0.001]
    local = _eyeball_directions()
    return centre + EYE_RADIUS * local, local, centre


def _eyeball_directions():
    """Unit vectors of the eyeball grid: front pole (+z), EYE_RINGS rings x EYE_SEGMENTS, back pole."""
    alpha = np.radians([8, 16, 25, 35, 47, 60, 75, 90, 115, 145])  # from the front pole; 90 = equator ring
    beta = 2 * np.pi * np.arange(EYE_SEGMENTS) / EYE_SEGMENTS
    A, B = np.meshgrid(alpha, beta, indexing="ij")
    local = np.stack([np.sin(A) * np.sin(B), -np.sin(A) * np.cos(B), np.cos(A)], -1).reshape(-1, 3)
    return np.concatenate([[[0, 0, 1]], local, [[0, 0, -1]]])


def _vertex_normals(P, faces):
    n = np.cross(P[faces[:, 1]] - P[faces[:, 0]], P[faces[:, 2]] - P[faces[:, 0]])
    out = np.zeros_like(P)
    for corner in range(3):
        np.add.at(out, faces[:, corner], n)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _regressor_row(P, mask, target):
    """Max-entropy weights on P[mask]: w >= 0, sum 1, w @ P[mask] = target (inside their hull)."""
    X = (P[mask] - np.asarray(target)) / 0.01
    lam = np.zeros(3)
    for _ in range(100):
        s = X @ lam
        w = np.exp(s - s.max())
        w /= w.sum()
        g = w @ X
        if np.abs(g).max() < 1e-9:
            break
        H = (X * w[:, None]).T @ X - np.outer(g, g)
        step = np.linalg.solve(H + 1e-9 * np.eye(3), g)
        lam -= step * min(1.0, 2.0 / np.linalg.norm(step))
    row = np.zeros(len(P))
    row[mask] = w
    return row


def _jaw_region(P):
    """Smooth lower-face mask (1 on the chin, 0 above the mouth, behind the hinge and on the neck)."""
    t_v = _smoothstep(((SLIT_Y + 0.018) - P[:, 1]) / 0.03)
    t_z = _smoothstep((P[:, 2] + 0.005) / 0.045)
    t_n = _smoothstep((P[:, 1] + 0.115) / 0.03)
    return t_v * t_z * t_n


def _mouth_mask(P):
    m_x = 1 - _smoothstep((np.abs(P[:, 0]) - (MOUTH_HALF_WIDTH - 0.004)) / 0.012)
    m_y = 1 - _smoothstep((np.abs(P[:, 1] - SLIT_Y) - 0.014) / 0.008)
    return m_x * m_y * _smoothstep((P[:, 2] - 0.03) / 0.02)


def _random_fields(rng, P, count, candidates, unit, previous=None, zero_rows=None):
    """Seeded smooth fields (sums of 4 Gaussian bumps), amplitude unit / (1 + k / 12).

    With ``previous`` (N, 3, K), each field is made orthogonal to those and to the fields before it.
    """
    out = np.zeros((len(P), 3, count))
    known = 0 if previous is None else previous.shape[2]
    basis = np.zeros((count + known, P.size))  # orthonormal rows
    if known:
        basis[:known] = np.linalg.qr(previous.reshape(-1, known))[0].T
    for k in range(count):
        field = np.zeros((len(P), 3))
        for centre in P[rng.choice(candidates, 4)]:
            sigma, direction = rng.uniform(0.012, 0.035), rng.normal(size=3)
            field += _gauss(P, centre, sigma)[:, None] * direction
        if zero_rows is not None:
            field[zero_rows] = 0
        if previous is not None:
            flat = field.reshape(-1)
            flat -= (basis[:known + k] @ flat) @ basis[:known + k]
            basis[known + k] = flat / np.linalg.norm(flat)
        out[:, :, k] = field * unit / (1 + k / 12) / np.abs(field).max()
    return out


def _expression_fields(P, normals, radial, below, mouth, dent):
    lips = np.where(below, -1.0, 1.0)[:, None]
    fields = {name: np.zeros_like(P) for name in EXPRESSION_NAMES}
    mouth_g = _gauss(P, (0, SLIT_Y, 0.085), (0.022, 0.013, 0.03))[:, None]
    fields["lips_part"] = 0.7 * mouth_g * mouth[:, None] * lips * [0, 1, 0]
    fields["pucker"] = mouth_g * np.stack([-P[:, 0] / 0.05, 0 * P[:, 0], np.ones(len(P))], -1)
    fields["chin_raise"] = (_gauss(P, (0, -0.062, 0.07), (0.02, 0.016, 0.03)) * below)[:, None] * [0, 0.6, 0.4]
    upper_lip = _gauss(P, (0, SLIT_Y + 0.006, 0.09), (0.018, 0.007, 0.02)) * ~below
    fields["upper_lip_raise"] = upper_lip[:, None] * [0, 0.8, 0.2]
    fields["mouth_left"] = 0.6 * mouth_g * [1, 0, 0]
    for s in (1, -1):
        corner = _gauss(P, (s * 0.025, SLIT_Y, 0.08), (0.013, 0.011, 0.02))[:, None]
        cheek = _gauss(P, (s * 0.035, -0.01, 0.07), (0.015, 0.015, 0.02))[:, None]
        smile = corner * [s * 0.35, 0.85, -0.25] + cheek * [0, 0.3, 0.2]
        fields["smile"] += smile
        fields["smile_asymmetric"] += s * smile
        fields["nostril_flare"] += _gauss(P, (s * 0.016, -0.016, 0.09), (0.008, 0.008, 0.01))[:, None] * [s, 0, 0]
        fields["mouth_stretch"] += corner * [s * 0.8, -0.2, -0.2]
        fields["brow_raise"] += _gauss(P, (s * 0.032, 0.042, 0.075), (0.022, 0.012, 0.02))[:, None] * [0, 1, 0]
        inner_brow = _gauss(P, (s * 0.016, 0.04, 0.08), (0.014, 0.01, 0.02))[:, None]
        fields["brow_lower"] += inner_brow * [-s * 0.5, -0.7, 0.1]
        fields["cheek_puff"] += 0.8 * _gauss(P, (s * 0.045, -0.03, 0.05), (0.018, 0.018, 0.02))[:, None] * normals
        fields["nose_wrinkle"] += 0.5 * _gauss(P, (s * 0.012, -0.005, 0.095), (0.01, 0.01, 0.01))[:, None] * [0, 1, 0]
        fields["squint"] += _gauss(P, (s * EYE_X, EYE_Y - 0.008, 0.08), (0.012, 0.005, 0.01))[:, None] * [0, 0.4, 0.1]
    fields = {k: v * UNIT / max(np.abs(v).max(), 1e-12) for k, v in fields.items()}
    fields["blink"] = 0.5 * dent[:, None] * radial  # 2 units fill the eye openings: closed lids
    return np.stack([fields[k] for k in EXPRESSION_NAMES], -1)


def _shape_fields(P, jaw, normals):
    f = {name: np.zeros_like(P) for name in SHAPE_NAMES}
    above_neck = (0.01 * np.logaddexp(0, (P[:, 1] + 0.07) / 0.01))[:, None]  # soft max(y + 0.07, 0)
    head = _smoothstep((P[:, 1] + 0.11) / 0.04)[:, None]
    f["head_width"] = head * P * [1, 0, 0]
    f["head_height"] = above_neck * [0, 1, 0]
    f["head_depth"] = head * (P - CENTRE) * [0, 0, 1]
    f["jaw_width"] = jaw[:, None] * P * [1, 0, 0]
    f["nose_length"] = _gauss(P, (0, -0.005, 0.1), (0.012, 0.02, 0.015))[:, None] * [0, -0.3, 0.8]
    f["chin_length"] = _gauss(P, (0, -0.07, 0.07), (0.03, 0.02, 0.03))[:, None] * [0, -0.8, 0.3]
    f["forehead"] = _gauss(P, (0, 0.06, 0.08), (0.04, 0.025, 0.03))[:, None] * [0, 0.2, 0.8]
    f["lip_fullness"] = _gauss(P, (0, SLIT_Y, 0.09), (0.02, 0.01, 0.012))[:, None] * [0, 0, 1]
    neck = _smoothstep((-0.08 - P[:, 1]) / 0.02)[:, None]
    f["neck_thickness"] = neck * (P - [0, 0, NECK_AXIS_Z]) * [1, 0, 1]
    for s in (1, -1):
        f["cheekbones"] += _gauss(P, (s * 0.05, 0.0, 0.05), (0.015, 0.015, 0.02))[:, None] * [s * 0.7, 0, 0.3]
        f["eye_spacing"] += _gauss(P, (s * EYE_X, EYE_Y, 0.07), (0.012, 0.01, 0.02))[:, None] * [s, 0, 0]
        f["ear_size"] += _gauss(P, (s * 0.08, 0, -0.012), (0.012, 0.025, 0.02))[:, None] * [s, 0, 0.3]
    return np.stack([v * UNIT / max(np.abs(v).max(), 1e-12) for v in (f[k] for k in SHAPE_NAMES)], -1)


def _pose_fields(P, jaw, normals, rng):
    """posedirs (N, 3, 36): jaw and neck correctives, zero outside their regions and for the eyes."""
    out = np.zeros((len(P), 3, 36))

    def col(joint, r, c):  # the official layout: (R_joint - I)[r, c] for joints 1..4
        return 9 * (joint - 1) + 3 * r + c

    neck = _smoothstep((-0.06 - P[:, 1]) / 0.03)
    cheeks = sum(_gauss(P, (s * 0.045, -0.035, 0.05), (0.015, 0.015, 0.02)) for s in (1, -1))[:, None]
    opening = -cheeks * normals + _gauss(P, (0, -0.095, 0.04), (0.025, 0.012, 0.02))[:, None] * [0, 0.5, -0.5]
    opening *= 0.004 / np.abs(opening).max() * jaw[:, None]  # per radian of jaw rotation about x
    out[:, :, col(2, 2, 1)] += 0.5 * opening  # (R - I)[2, 1] = sin(a)
    out[:, :, col(2, 1, 2)] -= 0.5 * opening  # (R - I)[1, 2] = -sin(a)
    out[:, :, col(2, 1, 1)] = out[:, :, col(2, 2, 2)] = 0.002 * cheeks * normals * jaw[:, None]  # cos(a) - 1
    throat = _gauss(P, (0, -0.09, 0.035), (0.03, 0.015, 0.015))[:, None] * normals * neck[:, None]
    out[:, :, col(1, 2, 1)] += 0.002 * throat
    out[:, :, col(1, 1, 2)] -= 0.002 * throat
    for joint, mask in ((1, neck), (2, jaw)):  # small smooth seeded part, as learned correctives have
        noise = _random_fields(rng, P, 9, np.flatnonzero(mask > 0.5), 0.0005)
        out[:, :, 9 * (joint - 1):9 * joint] += noise * mask[:, None, None]
    return out


def _colours(P, row, n_up, dent, eye_local):
    skin = np.array([0.86, 0.66, 0.55])
    c = np.tile(skin, (len(P), 1))
    for s in (1, -1):
        c += _gauss(P, (s * 0.045, -0.015, 0.06), 0.015)[:, None] * [0.02, -0.025, -0.02]  # cheeks
        brow_y = 0.039 - 25 * (P[:, 0] - s * 0.03) ** 2
        brow = np.exp(-0.5 * ((P[:, 1] - brow_y) / 0.0035) ** 4) * (P[:, 2] > 0.04)
        brow = (brow * _smoothstep(1.5 - np.abs(P[:, 0] - s * 0.031) / 0.016))[:, None]
        c = c * (1 - brow) + brow * [0.24, 0.16, 0.11]
    c *= 1 - 0.25 * _smoothstep(dent / EYE_DENT * 2)[:, None]  # socket shadow
    lip = 0.0
    for centre, axes in ELLIPSOIDS[8:10]:
        q = (((P - centre) / (np.asarray(axes) * [1.1, 1.15, 1.6])) ** 2).sum(1)
        lip = np.maximum(lip, 1 - _smoothstep((q - 0.8) / 0.4))
    c = c * (1 - lip[:, None]) + lip[:, None] * [0.72, 0.34, 0.34]
    k = row - n_up  # mouth pocket: teeth on its first and last rows, a dark cavity between
    pocket = (k >= 0) & (k < len(POCKET_DEPTHS)) & (P[:, 2] > 0.03)
    teeth = ((k == 0) | (k == len(POCKET_DEPTHS) - 1))[:, None]
    inside = (pocket * _mouth_mask(P) ** 0.5)[:, None] * np.where(teeth, 1.0, 0.85)
    c = c * (1 - inside) + inside * np.where(teeth, [0.92, 0.9, 0.84], [0.25, 0.05, 0.06])
    azimuth = np.degrees(np.abs(np.arctan2(P[:, 0], P[:, 2] - CENTRE[2])))
    hairline = np.interp(azimuth, [0, 40, 70, 100, 130, 180], [0.072, 0.066, 0.052, 0.04, 0.0, -0.05])
    hair = _smoothstep((P[:, 1] - hairline) / 0.02 + 0.5)[:, None]
    c = c * (1 - hair) + hair * [0.2, 0.13, 0.09]
    c *= 1 - 0.1 * _smoothstep((-0.09 - P[:, 1]) / 0.03)[:, None]  # neck in shade
    angle = np.degrees(np.arccos(np.clip(eye_local[:, 2], -1, 1)))
    eye = np.where(angle[:, None] < 12, [0.03, 0.03, 0.03], np.where(angle[:, None] < 30, [0.3, 0.42, 0.55],
                                                                      [0.95, 0.94, 0.91]))
    return np.clip(np.concatenate([c, eye]), 0, 1)


def _landmark_targets():
    """68 iBUG landmarks as front-view (x, y); x < 0 is the subject's right (image left)."""
    psi = np.radians(np.linspace(-105, 105, 17))
    jaw = np.stack([0.066 * np.sin(psi), -0.01 - 0.075 * np.cos(psi)], -1)
    t = np.linspace(0, 1, 5)
    brow_r = np.stack([-0.05 + 0.038 * t, 0.036 + 0.006 * np.sin(np.pi * t)], -1)
    brow_l = brow_r[::-1] * [-1, 1]
    nose = [(0, 0.028), (0, 0.015), (0, 0.002), (0, -0.01)] + [(x, -0.018) for x in (-0.014, -0.007, 0, 0.007, 0.014)]
    eye_r = [(-0.046, 0), (-0.037, 0.005), (-0.027, 0.005), (-0.018, 0), (-0.027, -0.005), (-0.037, -0.005)]
    eye_l = [(-x, y) for x, y in [eye_r[3], eye_r[2], eye_r[1], eye_r[0], eye_r[5], eye_r[4]]]
    eyes = np.array(eye_r + eye_l) + [0, EYE_Y]
    outer = [(-0.025, 0), (-0.017, 0.006), (-0.007, 0.009), (0, 0.008), (0.007, 0.009), (0.017, 0.006),
             (0.025, 0), (0.017, -0.009), (0.007, -0.012), (0, -0.013), (-0.007, -0.012), (-0.017, -0.009)]
    inner = [(-0.02, 0), (-0.008, 0.0015), (0, 0.0015), (0.008, 0.0015), (0.02, 0), (0.008, -0.0015),
             (0, -0.0015), (-0.008, -0.0015)]
    mouth = np.array(outer + inner) + [0, SLIT_Y]
    return np.concatenate([jaw, brow_r, brow_l, np.array(nose, float), eyes, mouth])


def _cast_front(P, faces, xy):
    """First triangle hit by rays from (x, y, +1) along -z: face index (L,), barycentric (L, 3)."""
    v0, e1, e2 = P[faces[:, 0]], P[faces[:, 1]] - P[faces[:, 0]], P[faces[:, 2]] - P[faces[:, 0]]
    h = np.stack([e2[:, 1], -e2[:, 0], np.zeros(len(faces))], -1)  # (0, 0, -1) x e2
    a = (e1 * h).sum(-1)
    a = np.where(np.abs(a) < 1e-15, 1e-15, a)
    s = np.concatenate([xy, np.ones((len(xy), 1))], 1)[:, None] - v0  # (L, F, 3)
    u = (s * h).sum(-1) / a
    q = np.cross(s, e1)
    v, t = -q[..., 2] / a, (q * e2).sum(-1) / a
    hit = (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    idx = np.argmin(np.where(hit, t, np.inf), 1)
    L = np.arange(len(xy))
    if not hit[L, idx].all():
        raise RuntimeError("a landmark ray missed the head surface")
    return idx, np.stack([1 - u[L, idx] - v[L, idx], u[L, idx], v[L, idx]], -1)


def _skinning(P, below, eye_of):
    """weights (N, 5): root on the lower neck, jaw on the lower face (lower lip sharp), eyeballs rigid."""
    on_head = eye_of < 0
    jaw, mouth = _jaw_region(P) * on_head, _mouth_mask(P) * on_head
    w_root = _smoothstep((-0.10 - P[:, 1]) / 0.05) * on_head
    w_jaw = np.where(below, mouth + (1 - mouth) * jaw, (1 - mouth) * jaw) * (1 - w_root)
    return np.stack([w_root, (1 - w_root - w_jaw) * on_head, w_jaw, eye_of == 0, eye_of == 1], -1).astype(float)


def _joint_regressor(V, eye_of, eye_centres):
    """J_regressor (5, N): each row puts the joint at its target: root and neck from neck / head rings,
    jaw from patches in front of both ears, eyes from their eyeballs."""
    on_head = eye_of < 0
    x, y, z = V.T
    masks = [on_head & (y < -0.13), on_head & (np.abs(y + 0.06) < 0.03),
             on_head & (np.abs(x) > 0.05) & (np.abs(y + 0.012) < 0.025) & (np.abs(z + 0.004) < 0.025),
             eye_of == 0, eye_of == 1]
    return np.stack([_regressor_row(V, m, t) for m, t in zip(masks, list(JOINT_TARGETS) + eye_centres)])


def make_procedural_head(seed: int = 0, n_shape: int = 100, n_exp: int = 50,
                         layout: str = "release") -> dict[str, np.ndarray]:
    """Build the procedural head in the FLAME file layout (see the module docstring).

    Args:
        seed: seeds the random (unnamed) shape / expression columns and the random part of posedirs
        n_shape, n_exp: identity and expression components (300 and 100 give the official column
            count); the first ``len(SHAPE_NAMES)`` / ``len(EXPRESSION_NAMES)`` are the named ones
        layout: ``"release"`` (default): ``shapedirs`` (V, 3, 300 + n_exp), identity zero-padded to
            300 columns, expression from column 300, ``n_shape_total`` = 300 (needs n_shape <= 300);
            ``"compact"``: (V, 3, n_shape + n_exp), ``n_shape_total`` = n_shape
    Returns:
        dict of numpy arrays keyed by ``MODEL_KEYS + LANDMARK_KEYS`` (float32, integers int64)
    """
    for name, value in (("seed", seed), ("n_shape", n_shape), ("n_exp", n_exp)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "release" and n_shape > RELEASE_SHAPE_COLUMNS:
        raise ValueError(f"n_shape must be <= {RELEASE_SHAPE_COLUMNS} for layout 'release' (expression starts at "
                         f"column {RELEASE_SHAPE_COLUMNS}), got {n_shape}; use layout='compact'")
    head, head_faces, row, n_up, radial, dent = _head_surface()
    eyes, eye_local, centres = (list(a) for a in zip(*(_eyeball(side) for side in (1, -1))))  # left (+x) first
    nh, ne = len(head), len(eyes[0])
    V = np.concatenate([head] + eyes)
    if len(V) != NUM_VERTICES:
        raise RuntimeError(f"procedural head has {len(V)} vertices, expected {NUM_VERTICES}")
    eye_faces = _grid_faces(EYE_RINGS, EYE_SEGMENTS)
    faces = np.concatenate([head_faces, eye_faces + nh, eye_faces + nh + ne])
    eye_of = np.repeat([-1, 0, 1], [nh, ne, ne])  # -1 head surface, 0 left eyeball, 1 right eyeball
    on_head = eye_of < 0

    def head_only(a):  # per-head-vertex array, zero-padded over the eyeballs
        return np.concatenate([a, np.zeros((2 * ne,) + a.shape[1:], a.dtype)])

    P = V.copy()  # eyeballs move rigidly: every field is evaluated at their centres
    P[eye_of == 0], P[eye_of == 1] = centres
    normals = _vertex_normals(V, faces)
    below = head_only(row >= n_up + len(POCKET_DEPTHS) // 2)  # the lower-lip side of the slit and all under it
    jaw = _jaw_region(P) * on_head

    rng_shape, rng_exp, rng_pose = (np.random.default_rng([seed, k]) for k in range(3))
    shape = _shape_fields(P, jaw, normals)
    shape = np.concatenate([shape, _random_fields(rng_shape, P, max(n_shape - shape.shape[2], 0),
                                                  np.flatnonzero(on_head), 0.6 * UNIT, shape)], 2)[:, :, :n_shape]
    exp = _expression_fields(P, normals, head_only(radial), below, _mouth_mask(P) * on_head, head_only(dent))
    exp[~on_head] = 0
    face = np.flatnonzero(on_head & (V[:, 2] > 0.02) & (np.abs(V[:, 1] + 0.015) < 0.085))
    exp = np.concatenate([exp, _random_fields(rng_exp, P, max(n_exp - exp.shape[2], 0), face, 0.5 * UNIT, exp,
                                              ~on_head)], 2)[:, :, :n_exp]
    posedirs = _pose_fields(P, jaw, normals, rng_pose)
    posedirs[~on_head] = 0

    lmk_faces, lmk_bary = _cast_front(V, head_faces, _landmark_targets())
    out = {
        "v_template": V, "f": faces, "shapedirs": np.concatenate([shape, exp], 2),
        "n_shape_total": np.asarray(n_shape), "posedirs": posedirs,
        "J_regressor": _joint_regressor(V, eye_of, centres), "weights": _skinning(P, below, eye_of),
        "kintree_table": np.array([[ROOT_PARENT, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
        "vc": _colours(head, row, n_up, dent, np.concatenate(eye_local)),
        "static_lmk_faces_idx": lmk_faces[17:], "static_lmk_bary_coords": lmk_bary[17:],
        "dynamic_lmk_faces_idx": np.tile(lmk_faces[:17], (79, 1)),
        "dynamic_lmk_bary_coords": np.tile(lmk_bary[:17], (79, 1, 1)),
        "full_lmk_faces_idx": lmk_faces, "full_lmk_bary_coords": lmk_bary,
    }
    if layout == "release":
        out = to_release_layout(out)
    return {k: np.array(v, dtype=np.int64 if v.dtype.kind in "iu" else np.float32, order="C")
            for k, v in out.items()}


def landmark_embedding(head: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``landmark_embedding.npy`` part of a procedural head (keys ``LANDMARK_KEYS``)."""
    return {k: head[k] for k in LANDMARK_KEYS}


def save_procedural_head(path: Union[str, os.PathLike], seed: int = 0, n_shape: int = 100, n_exp: int = 50,
                         compressed: bool = False, layout: str = "release") -> Path:
    """Write :func:`make_procedural_head` atomically (temp file, then rename); returns the path.

    The suffix of ``path`` picks the format: ``.npz`` (``compressed``: zip-deflated) or ``.pkl``, a
    pickle of plain numpy arrays (:func:`gpavatar.flame.release.write_flame_pickle`) that code written
    for the official ``generic_model.pkl`` loads with ``pickle.load``. Both hold every key of the
    module docstring, landmarks included."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"path {path} must end in {' or '.join(FILE_SUFFIXES)}")
    head = make_procedural_head(seed, n_shape, n_exp, layout)
    if suffix == ".pkl":
        return write_flame_pickle(path, head)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            (np.savez_compressed if compressed else np.savez)(file, **head)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def cache_dir() -> Path:
    """``$GPAVATAR_CACHE_DIR``, else ``$XDG_CACHE_HOME/gpavatar``, else ``~/.cache/gpavatar``."""
    if os.environ.get("GPAVATAR_CACHE_DIR"):
        return Path(os.environ["GPAVATAR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpavatar"


def procedural_head_path(seed: int = 0, n_shape: int = 100, n_exp: int = 50,
                         directory: Optional[Union[str, os.PathLike]] = None, suffix: str = ".npz") -> Path:
    """Path of the cached file for these arguments (release layout; ``suffix`` ``.npz`` or ``.pkl``,
    21 MB by default), generated on first use.

    The file name holds a digest of this module's and :mod:`gpavatar.flame.release`'s source, so an
    edited generator never reads a stale file.

        >>> from gpavatar.flame import FLAME
        >>> flame = FLAME(procedural_head_path(), landmark_embedding=procedural_head_path())  # doctest: +SKIP
    """
    directory = Path(directory) if directory is not None else cache_dir()
    sources = (Path(__file__), Path(__file__).with_name("release.py"))  # the generator and the file layout
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"suffix must be one of {FILE_SUFFIXES}, got {suffix!r}")
    path = directory / f"procedural_head_{digest}_seed{seed}_s{n_shape}_e{n_exp}{suffix}"
    if not path.exists():
        save_procedural_head(path, seed, n_shape, n_exp)
    return path

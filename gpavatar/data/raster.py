"""A small numpy z-buffer triangle rasterizer with the model's camera (SPEC section 7).

Used to render the synthetic dataset and FLAME meshes; CPU only, no gradients.

Projection (exactly :mod:`gpavatar.model.renderer`'s camera, so rendered pixels and
model rays agree): ``transform`` is the world-to-camera ``[R|T]`` (3, 4) in PyTorch3D's
row-vector form, ``X_cam = X_world · R + T``; the camera looks along +z and

    x_ndc = f · X_cam / Z_cam,  y_ndc = f · Y_cam / Z_cam,
    u = (1 - x_ndc) (W - 1) / 2  (column),  v = (1 - y_ndc) (H - 1) / 2  (row),

i.e. pixel column ``j`` sits at ``x = 1 - 2j/(W-1)`` and row ``i`` at ``y = 1 - 2i/(H-1)``
(``linspace(1, -1)``), the pixel grid of :func:`gpavatar.model.renderer.pixel_grid`: x decreases
to the right, y decreases downwards.  A pixel is covered when its centre ``(j, i)`` lies inside
the projected triangle.  With ``R = diag(-1, 1, -1)``, ``T = (0, 0, 9)`` the camera sits at
world ``(0, 0, 9)`` looking at a FLAME head that faces +z; the subject's left (+x) shows on
the image's right.

Algorithm: every triangle in front of the camera (and facing it, with ``cull_backfaces``)
expands into the pixels of its integer bounding box, all triangles at once with ``np.repeat``
(chunked to bound memory); barycentric coordinates decide coverage, perspective-correct
barycentrics give depth; the nearest fragment per pixel wins (a stable sort, so ties keep
the lower face index).  Shading is Lambert with a camera-space directional light plus an
ambient term on interpolated vertex normals and colours; ``samples`` > 1 averages
``samples²`` sub-pixel offsets around every pixel centre (anti-aliasing that keeps the grid).

    >>> import numpy as np
    >>> tri = np.array([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]])
    >>> cam = np.array([[-1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 12]])  # at (0, 0, 12), facing the triangle
    >>> image, mask = render_mesh(tri, np.array([[0, 1, 2]]), np.ones((3, 3)), cam, 12.0, 9)
    >>> image.shape, image.dtype, int(mask.sum()) > 0, bool(mask[4, 4])
    ((9, 9, 3), dtype('uint8'), True, True)
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import numpy as np

__all__ = ["Fragments", "project", "rasterize", "render_mesh", "vertex_normals", "look_at_front"]

DEFAULT_LIGHT = (0.35, 0.45, -1.0)  # camera space, towards the light: image left, up, towards the camera
MAX_PAIRS = 1 << 21  # (triangle, pixel) candidates per chunk


class Fragments(NamedTuple):
    face_index: np.ndarray  # (H, W) int64, -1 where no triangle covers the pixel centre
    bary: np.ndarray  # (H, W, 3) float64 perspective-correct barycentric weights of the face's 3 vertices
    depth: np.ndarray  # (H, W) float64 camera-space Z, inf where empty


def _size(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    H, W = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if isinstance(H, bool) or int(H) != H or int(W) != W or H < 1 or W < 1:
        raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
    return int(H), int(W)


def _check_mesh(vertices, faces, transform):
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    transform = np.asarray(transform, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must have shape (V, 3), got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.dtype.kind not in "iu":
        raise ValueError(f"faces must be an integer array of shape (F, 3), got {faces.shape} {faces.dtype}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"faces index vertices outside [0, {len(vertices)})")
    if transform.shape != (3, 4):
        raise ValueError(f"transform must be the (3, 4) world-to-camera [R|T], got {transform.shape}")
    return vertices, faces.astype(np.int64), transform


def project(vertices: np.ndarray, transform: np.ndarray, focal: float, size) -> tuple[np.ndarray, np.ndarray]:
    """World points to pixel coordinates of the model's grid (module docstring).

    Args:
        vertices: (V, 3) world; transform: (3, 4) world-to-camera [R|T]; focal: in NDC units (12);
        size: H = W or (H, W)
    Returns:
        uv (V, 2) float64 (column u, row v; pixel centres at integers), camera coords (V, 3)
    """
    H, W = _size(size)
    transform = np.asarray(transform, dtype=np.float64)
    cam = np.asarray(vertices, dtype=np.float64) @ transform[:, :3] + transform[:, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        x, y = focal * cam[:, 0] / cam[:, 2], focal * cam[:, 1] / cam[:, 2]
    return np.stack([(1 - x) * (W - 1) / 2, (1 - y) * (H - 1) / 2], axis=-1), cam


def look_at_front(distance: float = 9.0) -> np.ndarray:
    """(3, 4) camera on world +z at ``distance`` looking at the origin, +y up: ``[diag(-1, 1, -1) | (0, 0, d)]``."""
    return np.array([[-1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, distance]])


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3), (F, 3) -> (V, 3) unit area-weighted normals (counter-clockwise faces point outwards)."""
    v = np.asarray(vertices, dtype=np.float64)
    n_face = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    normals = np.zeros_like(v)
    for k in range(3):
        np.add.at(normals, faces[:, k], n_face)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-20)


def _candidates(p0, p1, p2, H, W):
    """Integer pixel bounding boxes of the projected triangles: x0, y0, widths, counts."""
    uv = np.stack([p0, p1, p2])  # (3, F, 2)
    lo = np.maximum(np.ceil(uv.min(0)), 0)
    hi = np.minimum(np.floor(uv.max(0)), [W - 1, H - 1])
    lo, hi = np.nan_to_num(lo, posinf=W, neginf=0), np.nan_to_num(hi, posinf=W, neginf=-1)
    extent = np.maximum(hi - lo + 1, 0).astype(np.int64)
    return lo[:, 0].astype(np.int64), lo[:, 1].astype(np.int64), extent[:, 0], extent[:, 0] * extent[:, 1]


def rasterize(vertices: np.ndarray, faces: np.ndarray, transform: np.ndarray, focal: float = 12.0,
              size: Union[int, Sequence[int]] = 256, cull_backfaces: bool = True, near: float = 1e-3,
              offset: tuple[float, float] = (0.0, 0.0)) -> Fragments:
    """Nearest triangle per pixel centre (z-buffer); see the module docstring for the camera.

    Args:
        vertices: (V, 3) world coordinates; faces: (F, 3) integer, counter-clockwise = outward;
        transform: (3, 4) world-to-camera [R|T]; focal: NDC focal length (12); size: H = W or (H, W);
        cull_backfaces: skip triangles whose outward normal points away from the camera;
        near: triangles with a vertex at camera Z <= near are skipped (no clipping);
        offset: (du, dv) sample position relative to each pixel centre, in pixels
    Returns:
        :class:`Fragments` (face_index (H, W), bary (H, W, 3), depth (H, W))
    """
    vertices, faces, transform = _check_mesh(vertices, faces, transform)
    H, W = _size(size)
    uv, cam = project(vertices, transform, focal, (H, W))
    uv = uv - np.asarray(offset, dtype=np.float64)  # sample at centre + offset == shift the mesh by -offset
    keep = (cam[faces, 2] > near).all(1)
    if cull_backfaces:
        c0, c1, c2 = cam[faces[:, 0]], cam[faces[:, 1]], cam[faces[:, 2]]
        keep &= np.einsum("fi,fi->f", np.cross(c1 - c0, c2 - c0), c0) < 0
    idx = np.flatnonzero(keep)
    p0, p1, p2 = uv[faces[idx, 0]], uv[faces[idx, 1]], uv[faces[idx, 2]]
    area = (p1[:, 0] - p0[:, 0]) * (p2[:, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (p2[:, 0] - p0[:, 0])
    x0, y0, bw, count = _candidates(p0, p1, p2, H, W)
    ok = (np.abs(area) > 1e-12) & (count > 0)
    idx, p0, p1, p2, area, x0, y0, bw, count = (a[ok] for a in (idx, p0, p1, p2, area, x0, y0, bw, count))
    inv_z = 1.0 / cam[faces[idx], 2]  # (F', 3)

    pix_all, depth_all, face_all, bary_all = [], [], [], []
    cum = np.cumsum(count)
    start = 0
    while start < len(idx):  # chunks of about MAX_PAIRS candidates, at least one triangle each
        stop = max(int(np.searchsorted(cum, cum[start] - count[start] + MAX_PAIRS, "right")), start + 1)
        sl = slice(start, stop)
        start = stop
        n = count[sl]
        t = np.repeat(np.arange(sl.start, sl.stop), n)  # local triangle of each candidate pixel
        local = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        px, py = x0[t] + local % bw[t], y0[t] + local // bw[t]
        q = np.stack([px, py], -1).astype(np.float64)
        e0 = _edge(p1[t], p2[t], q) / area[t]  # weight of vertex 0
        e1 = _edge(p2[t], p0[t], q) / area[t]
        e2 = 1.0 - e0 - e1
        lam = np.stack([e0, e1, e2], -1)
        inside = (lam >= -1e-9).all(-1)
        lam, t, px, py = lam[inside], t[inside], px[inside], py[inside]
        w = lam * inv_z[t]
        s = w.sum(-1)
        pix_all.append(py * W + px)
        depth_all.append(1.0 / s)
        face_all.append(idx[t])
        bary_all.append(w / s[:, None])
    face_index = np.full(H * W, -1, dtype=np.int64)
    depth = np.full(H * W, np.inf)
    bary = np.zeros((H * W, 3))
    if pix_all:
        pix, dep, face, bar = (np.concatenate(a) for a in (pix_all, depth_all, face_all, bary_all))
        order = np.lexsort((face, dep, pix))  # by pixel, then depth, then face index
        pix_sorted = pix[order]
        first = order[np.r_[True, pix_sorted[1:] != pix_sorted[:-1]]]
        face_index[pix[first]], depth[pix[first]], bary[pix[first]] = face[first], dep[first], bar[first]
    return Fragments(face_index.reshape(H, W), bary.reshape(H, W, 3), depth.reshape(H, W))


def _edge(a, b, q):
    """Twice the signed area of (a, b, q), rows of (N, 2)."""
    return (b[:, 0] - a[:, 0]) * (q[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (q[:, 0] - a[:, 0])


def _shade(frags, faces, colors, normals_cam, light, ambient, diffuse, background):
    hit = frags.face_index >= 0
    tri = faces[frags.face_index[hit]]  # (N, 3)
    bary = frags.bary[hit][:, :, None]
    albedo = (colors[tri] * bary).sum(1)
    n = (normals_cam[tri] * bary).sum(1)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-20)
    # light both sides: a normal facing away from the camera (seen through a fold) is flipped
    n *= np.where((n[:, 2] > 0)[:, None], -1.0, 1.0)
    lambert = np.clip(n @ light, 0.0, None)[:, None]
    out = np.empty(frags.face_index.shape + (3,))
    out[...] = background
    out[hit] = albedo * (ambient + diffuse * lambert)
    return out, hit


def render_mesh(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, transform: np.ndarray,
                focal: float = 12.0, size: Union[int, Sequence[int]] = 256, background=0.0,
                light: Sequence[float] = DEFAULT_LIGHT, ambient: float = 0.35, diffuse: float = 0.75,
                samples: int = 1, cull_backfaces: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Lambert-shaded RGB render of a coloured mesh with the model's camera.

    Args:
        vertices: (V, 3) world; faces: (F, 3) int; colors: (V, 3) float in [0, 1];
        transform: (3, 4) world-to-camera [R|T]; focal: NDC focal length (12); size: H = W or (H, W);
        background: scalar or (3,) colour in [0, 1] (0: black, as the official data);
        light: direction towards the light in camera space (normalised here);
        ambient, diffuse: colour = albedo · (ambient + diffuse · max(0, n·l));
        samples: s -> average of s x s sub-pixel samples (anti-aliasing; 1: pixel centres only)
    Returns:
        image (H, W, 3) uint8, mask (H, W) bool (at least half of the samples hit the mesh)
    """
    vertices, faces, transform = _check_mesh(vertices, faces, transform)
    colors = np.asarray(colors, dtype=np.float64)
    if colors.shape != vertices.shape:
        raise ValueError(f"colors must have shape (V, 3) = {vertices.shape}, got {colors.shape}")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    light = np.asarray(light, dtype=np.float64)
    light = light / np.linalg.norm(light)
    normals_cam = vertex_normals(vertices, faces) @ transform[:, :3]  # directions: d · R
    background = np.broadcast_to(np.asarray(background, dtype=np.float64), (3,))
    H, W = _size(size)
    acc, cover = np.zeros((H, W, 3)), np.zeros((H, W))
    steps = (np.arange(samples) + 0.5) / samples - 0.5
    for dv in steps:
        for du in steps:
            frags = rasterize(vertices, faces, transform, focal, (H, W), cull_backfaces, offset=(du, dv))
            rgb, hit = _shade(frags, faces, colors, normals_cam, light, ambient, diffuse, background)
            acc += rgb
            cover += hit
    image = np.clip(np.rint(acc / samples**2 * 255.0), 0, 255).astype(np.uint8)
    return image, cover * 2 >= samples**2

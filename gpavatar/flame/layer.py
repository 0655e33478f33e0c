"""The FLAME head model as a differentiable ``nn.Module`` (SPEC pipeline.md 1.3-1.6).

Linear blend skinning with pose correctives, in the official order (1.4):

1. ``v_shaped = T + sum_l beta_l S_l`` with beta = [shape, expression];
2. joints ``J = J_regressor v_shaped``;
3. Rodrigues per joint: phi = |r + 1e-8|, k = r / phi,
   ``R = I + sin(phi) K + (1 - cos(phi)) K^2``;
4. ``v_posed = v_shaped + reshape([R_1 - I, ..., R_{J-1} - I] . posedirs)`` (root excluded);
5. rigid transforms along the tree: ``G_i = G_parent(i) [R_i | J_i - J_parent(i)]``,
   ``A_i = G_i`` with translation ``t_i - R_i^glob J_i``;
6. skinning ``v = (sum_j w_vj A_j) [v_posed; 1]``, then ``v *= scale``.

Unlike the official layer (wrapped in ``no_grad``) this one is differentiable
in every input; GPAvatar itself never back-propagates through it.

    >>> import torch
    >>> from gpavatar.flame import FLAME
    >>> flame = FLAME("assets/generic_model.pkl")  # doctest: +SKIP
    >>> verts = flame(torch.zeros(1, 100), torch.zeros(1, 50), torch.zeros(1, 6))  # doctest: +SKIP
    >>> verts.shape  # doctest: +SKIP
    torch.Size([1, 5023, 3])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from gpavatar.flame.loader import (LANDMARK_KEYS, PathLike, load_flame_model, load_landmark_embedding,
                                   normalize_flame_model)

NUM_JOINTS = 5  # root (global), neck, jaw, left eye, right eye
NUM_DYNAMIC_ROWS = 79  # quantised yaw rows of the dynamic contour table (indices 0..78)
ROTATION_EPS = 1e-8  # added to each axis-angle component before the norm (SPEC 1.4 step 3)


def batch_rodrigues(rot_vecs: torch.Tensor) -> torch.Tensor:
    """Axis-angle to rotation matrices: (N, 3) -> (N, 3, 3).

    phi = |r + 1e-8| (eps added per component), k = r / phi, K = [k]_x,
    R = I + sin(phi) K + (1 - cos(phi)) K^2. r = 0 gives exactly I.
    """
    angle = torch.linalg.vector_norm(rot_vecs + ROTATION_EPS, dim=1, keepdim=True)  # (N, 1)
    kx, ky, kz = (rot_vecs / angle).unbind(dim=1)
    zeros = torch.zeros_like(kx)
    K = torch.stack([zeros, -kz, ky, kz, zeros, -kx, -ky, kx, zeros], dim=1).view(-1, 3, 3)
    sin, cos = torch.sin(angle)[:, :, None], torch.cos(angle)[:, :, None]
    eye = torch.eye(3, dtype=rot_vecs.dtype, device=rot_vecs.device)
    return eye + sin * K + (1 - cos) * torch.bmm(K, K)


def rigid_transforms(rot_mats: torch.Tensor, joints: torch.Tensor, parents: list[int]):
    """Global joint transforms along the kinematic tree (SPEC 1.4 step 5).

    Args:
        rot_mats: (B, J, 3, 3) local rotations; joints: (B, J, 3) rest joints;
        parents: J ints, parents[0] = -1 and parents[i] < i
    Returns:
        posed_joints (B, J, 3), transforms (B, J, 4, 4) mapping rest to posed positions
    """
    rel_joints = torch.cat([joints[:, :1], joints[:, 1:] - joints[:, parents[1:]]], dim=1)
    bottom = rot_mats.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(*rot_mats.shape[:2], 1, 4)
    local = torch.cat([torch.cat([rot_mats, rel_joints[..., None]], dim=-1), bottom], dim=-2)  # (B, J, 4, 4)
    chain = [local[:, 0]]
    for i in range(1, len(parents)):
        chain.append(chain[parents[i]] @ local[:, i])
    world = torch.stack(chain, dim=1)  # (B, J, 4, 4)
    posed_joints = world[..., :3, 3]
    offset = (world[..., :3, :3] @ joints[..., None])[..., 0]  # R_glob J_rest
    transforms = torch.cat([world[..., :3, :3], (posed_joints - offset)[..., None]], dim=-1)
    transforms = torch.cat([transforms, world[..., 3:, :]], dim=-2)
    return posed_joints, transforms


def lbs(betas: torch.Tensor, full_pose: torch.Tensor, v_template: torch.Tensor, shapedirs: torch.Tensor,
        posedirs: torch.Tensor, J_regressor: torch.Tensor, parents: list[int], weights: torch.Tensor):
    """Linear blend skinning with pose correctives (SPEC 1.4, unscaled).

    Args:
        betas: (B, L); full_pose: (B, 3 J) axis-angle per joint; v_template: (V, 3);
        shapedirs: (V, 3, L); posedirs: (9 (J - 1), 3 V), column index 3 v + c;
        J_regressor: (J, V); parents: J ints (parents[i] < i); weights: (V, J)
    Returns:
        vertices (B, V, 3), posed joints (B, J, 3)
    """
    B, V, J = betas.shape[0], v_template.shape[0], J_regressor.shape[0]
    v_shaped = v_template + torch.einsum("bl,vkl->bvk", betas, shapedirs)
    joints = torch.einsum("jv,bvk->bjk", J_regressor, v_shaped)
    rot_mats = batch_rodrigues(full_pose.reshape(-1, 3)).view(B, J, 3, 3)
    eye = torch.eye(3, dtype=betas.dtype, device=betas.device)
    pose_feature = (rot_mats[:, 1:] - eye).reshape(B, 9 * (J - 1))
    v_posed = v_shaped + (pose_feature @ posedirs).view(B, V, 3)
    posed_joints, transforms = rigid_transforms(rot_mats, joints, parents)
    per_vertex = (weights @ transforms.reshape(B, J, 16)).view(B, V, 4, 4)
    vertices = (per_vertex[..., :3, :3] @ v_posed[..., None])[..., 0] + per_vertex[..., :3, 3]
    return vertices, posed_joints


def vertices_to_landmarks(vertices: torch.Tensor, faces: torch.Tensor, face_idx: torch.Tensor,
                          bary: torch.Tensor) -> torch.Tensor:
    """Barycentric landmarks: vertices (B, V, 3), faces (F, 3), face_idx (B, L), bary (B, L, 3) -> (B, L, 3)."""
    B = vertices.shape[0]
    corner_idx = faces[face_idx]  # (B, L, 3)
    corners = vertices[torch.arange(B, device=vertices.device)[:, None, None], corner_idx]  # (B, L, 3, 3)
    return torch.einsum("blcx,blc->blx", corners, bary)


class FlameOutput(NamedTuple):
    vertices: torch.Tensor  # (B, V, 3), times scale
    joints: torch.Tensor  # (B, J, 3) posed joints, times scale
    landmarks2d: Optional[torch.Tensor]  # (B, 17 + 51, 3) dynamic contour + static, times scale; None without embedding
    landmarks3d: Optional[torch.Tensor]  # (B, 68, 3) fixed "full" set, times scale; None without embedding


class FLAME(nn.Module):
    """FLAME mesh from identity, expression and pose, scaled to GPAvatar's world units.

    Args:
        model: path of a FLAME ``.pkl`` / ``.npz`` or a dict of fields (see :mod:`gpavatar.flame.loader`)
        n_shape: identity components used, <= the model's ``n_shape_total`` (100)
        n_exp: expression components used, <= N - n_shape_total (50)
        scale: multiplies vertices, joints and landmarks after LBS (5.0 = ``flame_scale``;
            1.0 gives FLAME metres like the official layer's raw output)
        landmark_embedding: optional dict (or ``.npz`` path) with ``LANDMARK_KEYS``; enables
            landmarks in :meth:`full_output`

    Inputs of :meth:`forward` / :meth:`full_output` (same dtype and device as the buffers):
        shape: (B, n_shape); expression: (B, n_exp);
        pose: (B, 6) = [global, jaw] axis-angle (what GPAvatar passes; global is zero in its data)
              or (B, 15) = [global, neck, jaw, left eye, right eye];
        eye_pose: (B, 6) and neck_pose: (B, 3), zeros when omitted; only with a (B, 6) pose.

    Buffers (not in the state dict; they follow ``.to(dtype / device)``): ``v_template`` (V, 3),
    ``shapedirs`` (V, 3, n_shape + n_exp), ``posedirs`` (36, 3 V), ``J_regressor`` (5, V),
    ``lbs_weights`` (V, 5), ``faces`` (F, 3) int64, ``parents`` (5,) int64 = kintree_table[0] with -1 at 0.
    """

    def __init__(self, model: Union[PathLike, Mapping], n_shape: int = 100, n_exp: int = 50, scale: float = 5.0,
                 landmark_embedding: Union[PathLike, Mapping, None] = None):
        super().__init__()
        fields = normalize_flame_model(model) if isinstance(model, Mapping) else load_flame_model(model)
        n_shape_total, N = int(fields["n_shape_total"]), fields["shapedirs"].shape[2]
        for name, value, high in (("n_shape", n_shape, n_shape_total), ("n_exp", n_exp, N - n_shape_total)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if not 0 <= value <= high:
                raise ValueError(f"{name} must be in [0, {high}] for this model (shapedirs has {n_shape_total} "
                                 f"identity + {N - n_shape_total} expression columns), got {value}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
        J = fields["kintree_table"].shape[1]
        if J != NUM_JOINTS:
            raise ValueError(f"FLAME needs {NUM_JOINTS} joints (root, neck, jaw, eyes), the model has {J}")
        parents = [-1] + [int(p) for p in fields["kintree_table"][0, 1:]]
        if any(not 0 <= parents[i] < i for i in range(1, J)):
            raise ValueError(f"kintree_table[0] must list each joint's parent before it, got {parents}")
        self.n_shape, self.n_exp, self.scale, self._parents = n_shape, n_exp, float(scale), parents
        V = fields["v_template"].shape[0]
        shapedirs = np.concatenate([fields["shapedirs"][:, :, :n_shape],
                                    fields["shapedirs"][:, :, n_shape_total:n_shape_total + n_exp]], axis=2)
        buffers = {
            "v_template": fields["v_template"], "shapedirs": shapedirs,
            "posedirs": fields["posedirs"].reshape(V * 3, -1).T,  # (V, 3, P) -> (P, 3 V)
            "J_regressor": fields["J_regressor"], "lbs_weights": fields["weights"], "faces": fields["f"],
            "parents": np.asarray(parents, dtype=np.int64),
        }
        for name, array in buffers.items():
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(array)), persistent=False)
        self.has_landmarks = landmark_embedding is not None
        if self.has_landmarks:
            self._register_landmarks(landmark_embedding, fields["f"].shape[0])

    def _register_landmarks(self, embedding, num_faces: int) -> None:
        if not isinstance(embedding, Mapping):
            embedding = load_landmark_embedding(embedding)
        missing = [k for k in LANDMARK_KEYS if k not in embedding]
        if missing:
            raise ValueError(f"landmark_embedding is missing {missing}")
        arrays = {}
        for key in LANDMARK_KEYS:
            value = embedding[key]
            value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if key.startswith("full_"):
                value = value.reshape(value.shape[-2:] if key.endswith("bary_coords") else value.shape[-1:])
            arrays[key] = value
        static, dyn, full = (arrays[f"{p}_lmk_faces_idx"] for p in ("static", "dynamic", "full"))
        expected = {"static_lmk_bary_coords": static.shape + (3,), "dynamic_lmk_bary_coords": dyn.shape + (3,),
                    "full_lmk_bary_coords": full.shape + (3,)}
        if static.ndim != 1 or full.ndim != 1 or dyn.ndim != 2 or dyn.shape[0] < NUM_DYNAMIC_ROWS:
            raise ValueError(f"landmark_embedding faces must be static (Ls,), dynamic ({NUM_DYNAMIC_ROWS}, Ld), "
                             f"full (Lf,); got {static.shape}, {dyn.shape}, {full.shape}")
        for key, shape in expected.items():
            if arrays[key].shape != shape:
                raise ValueError(f"landmark_embedding[{key!r}] must have shape {shape}, got {arrays[key].shape}")
        for key in ("static_lmk_faces_idx", "dynamic_lmk_faces_idx", "full_lmk_faces_idx"):
            if arrays[key].size and (arrays[key].min() < 0 or arrays[key].max() >= num_faces):
                raise ValueError(f"landmark_embedding[{key!r}] indexes faces outside [0, {num_faces})")
        for key, value in arrays.items():
            dtype = torch.int64 if key.endswith("faces_idx") else self.v_template.dtype
            self.register_buffer(key, torch.as_tensor(value).to(dtype), persistent=False)

    @classmethod
    def clamped(cls, model: Union[PathLike, Mapping], n_shape: int = 100, n_exp: int = 50, **kwargs) -> "FLAME":
        """A layer with up to ``n_shape`` / ``n_exp`` components, fewer when the model has fewer
        columns (e.g. the procedural head); ``kwargs`` go to the constructor."""
        fields = normalize_flame_model(model) if isinstance(model, Mapping) else load_flame_model(model)
        n_shape_total, N = int(fields["n_shape_total"]), fields["shapedirs"].shape[2]
        return cls(fields, n_shape=min(n_shape, n_shape_total), n_exp=min(n_exp, N - n_shape_total), **kwargs)

    @property
    def num_vertices(self) -> int:
        return self.v_template.shape[0]

    def full_pose(self, pose: torch.Tensor, eye_pose: Optional[torch.Tensor] = None,
                  neck_pose: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 6) [global, jaw] (+ eyes, neck) or (B, 15) -> (B, 15) [global, neck, jaw, eye L, eye R]."""
        if pose.shape[1] == 3 * NUM_JOINTS:
            return pose
        B = pose.shape[0]
        neck = neck_pose if neck_pose is not None else pose.new_zeros(B, 3)
        eyes = eye_pose if eye_pose is not None else pose.new_zeros(B, 6)
        return torch.cat([pose[:, :3], neck, pose[:, 3:], eyes], dim=1)

    def _check_inputs(self, shape, expression, pose, eye_pose, neck_pose) -> None:
        dtype, device = self.v_template.dtype, self.v_template.device
        named = {"shape": shape, "expression": expression, "pose": pose, "eye_pose": eye_pose, "neck_pose": neck_pose}
        expected = {"shape": f"(B, {self.n_shape})", "expression": f"(B, {self.n_exp})",
                    "pose": f"(B, 6) or (B, {3 * NUM_JOINTS})", "eye_pose": "(B, 6)", "neck_pose": "(B, 3)"}
        widths = {"shape": (self.n_shape,), "expression": (self.n_exp,), "pose": (6, 3 * NUM_JOINTS),
                  "eye_pose": (6,), "neck_pose": (3,)}
        B = shape.shape[0] if isinstance(shape, torch.Tensor) and shape.dim() == 2 else None
        for name, t in named.items():
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor of shape {expected[name]}, got {type(t).__name__}")
            if t.dtype != dtype:
                raise TypeError(f"{name} must have dtype {str(dtype).replace('torch.', '')} like the FLAME buffers "
                                f"(cast it or call flame.to(dtype)), got {str(t.dtype).replace('torch.', '')}")
            if t.device != device:
                raise ValueError(f"{name} must be on {device} like the FLAME buffers, got {t.device}")
            if t.dim() != 2 or t.shape[1] not in widths[name] or (B is not None and t.shape[0] != B):
                batch = f" with B = {B} (from shape)" if B is not None else ""
                raise ValueError(f"{name} must have shape {expected[name]}{batch}, got {tuple(t.shape)}")
        if pose.shape[1] == 3 * NUM_JOINTS and (eye_pose is not None or neck_pose is not None):
            raise ValueError(f"eye_pose / neck_pose must be None when pose is the full (B, {3 * NUM_JOINTS}) pose")

    def full_output(self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor,
                    eye_pose: Optional[torch.Tensor] = None, neck_pose: Optional[torch.Tensor] = None) -> FlameOutput:
        """Vertices, posed joints and (with an embedding) landmarks, all times ``scale``; see the class docstring."""
        self._check_inputs(shape, expression, pose, eye_pose, neck_pose)
        full_pose = self.full_pose(pose, eye_pose, neck_pose)
        betas = torch.cat([shape, expression], dim=1)
        vertices, joints = lbs(betas, full_pose, self.v_template, self.shapedirs, self.posedirs, self.J_regressor,
                               self._parents, self.lbs_weights)
        vertices, joints = vertices * self.scale, joints * self.scale
        if not self.has_landmarks:
            return FlameOutput(vertices, joints, None, None)
        B = vertices.shape[0]
        row = self.dynamic_row(full_pose)
        face_idx = torch.cat([self.dynamic_lmk_faces_idx[row], self.static_lmk_faces_idx.expand(B, -1)], dim=1)
        bary = torch.cat([self.dynamic_lmk_bary_coords[row], self.static_lmk_bary_coords.expand(B, -1, -1)], dim=1)
        landmarks2d = vertices_to_landmarks(vertices, self.faces, face_idx, bary)
        landmarks3d = vertices_to_landmarks(vertices, self.faces, self.full_lmk_faces_idx.expand(B, -1),
                                            self.full_lmk_bary_coords.expand(B, -1, -1))
        return FlameOutput(vertices, joints, landmarks2d, landmarks3d)

    @staticmethod
    def dynamic_row(full_pose: torch.Tensor) -> torch.Tensor:
        """Row of the dynamic contour tables for each pose (SPEC 1.5): (B, 15) -> (B,) int64.

        R = R_root R_neck; yaw = round(min(deg(atan2(-R20, sqrt(R00^2 + R10^2))), 39));
        row = yaw if yaw >= 0, 39 - yaw if -39 <= yaw < 0, 78 below -39.
        """
        rot = batch_rodrigues(full_pose[:, :6].reshape(-1, 3)).view(-1, 2, 3, 3)
        rel = rot[:, 0] @ rot[:, 1]
        yaw = torch.atan2(-rel[:, 2, 0], torch.sqrt(rel[:, 0, 0] ** 2 + rel[:, 1, 0] ** 2))
        yaw = torch.round(torch.clamp(torch.rad2deg(yaw.detach()), max=39)).long()
        return torch.where(yaw < 0, torch.where(yaw < -39, 78, 39 - yaw), yaw)

    def forward(self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor,
                eye_pose: Optional[torch.Tensor] = None, neck_pose: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, n_shape), (B, n_exp), (B, 6 | 15) -> vertices (B, V, 3) times ``scale`` (no landmarks)."""
        self._check_inputs(shape, expression, pose, eye_pose, neck_pose)
        betas = torch.cat([shape, expression], dim=1)
        vertices, _ = lbs(betas, self.full_pose(pose, eye_pose, neck_pose), self.v_template, self.shapedirs,
                          self.posedirs, self.J_regressor, self._parents, self.lbs_weights)
        return vertices * self.scale

    def extra_repr(self) -> str:
        return (f"vertices={self.num_vertices}, n_shape={self.n_shape}, n_exp={self.n_exp}, scale={self.scale:g}, "
                f"landmarks={self.has_landmarks}")

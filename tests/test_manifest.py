"""Sanity checks for tests/data/official_state_dict.json.

The manifest lists every key (with its shape) of the official GPAvatar checkpoint's
``state_dict`` (``one_model.ckpt``) minus ``percep_loss.*``. It was derived from the
specification text (``shared/spec/stylegan.md`` sections 3-6 and 10, ``shared/SPEC.md``
sections 2, 3, 5, 6 and ``shared/spec/pipeline.md`` sections 5.4 and 5.8); the spot
checks below quote those sections.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

MANIFEST_PATH = Path(__file__).parent / "data" / "official_state_dict.json"
PREFIXES = ("style_tplane", "nerf_mlp", "up_renderer", "query_style_tplane", "attn_module")


@pytest.fixture(scope="module")
def manifest() -> dict:
    with MANIFEST_PATH.open() as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def keys(manifest: dict) -> dict[str, list[int]]:
    return manifest["keys"]


def _numel(keys: dict[str, list[int]], names) -> int:
    return sum(math.prod(keys[k]) for k in names)


def _under(keys: dict[str, list[int]], prefix: str) -> list[str]:
    return [k for k in keys if k == prefix or k.startswith(prefix + ".")]


def test_top_level_fields(manifest: dict) -> None:
    for field in ("source", "prefix_notes", "buffers", "keys"):
        assert field in manifest
    assert isinstance(manifest["source"], str) and manifest["source"]
    assert isinstance(manifest["prefix_notes"], dict)


def test_keys_unique_and_sorted(keys: dict[str, list[int]]) -> None:
    with MANIFEST_PATH.open() as fh:
        pairs = json.load(fh, object_pairs_hook=lambda p: p)
    raw_keys = [k for k, _ in dict(pairs)["keys"]]
    assert len(raw_keys) == len(set(raw_keys)), "duplicate keys in the JSON text"
    assert raw_keys == sorted(raw_keys)


def test_shapes_are_lists_of_positive_ints(keys: dict[str, list[int]]) -> None:
    for name, shape in keys.items():
        assert isinstance(shape, list) and shape, name
        assert all(type(d) is int and d > 0 for d in shape), (name, shape)


def test_prefixes(keys: dict[str, list[int]]) -> None:
    tops = {k.split(".", 1)[0] for k in keys}
    assert tops == set(PREFIXES)
    assert not any("percep_loss" in k for k in keys)


def test_buffers_listed_and_present(manifest: dict, keys: dict[str, list[int]]) -> None:
    # stylegan.md 10.1: the only persistent buffers are stylegan_decoder.noises.noise*.
    buffers = manifest["buffers"]
    assert buffers == sorted(set(buffers))
    assert set(buffers) == {k for k in keys if ".stylegan_decoder.noises.noise" in k}
    assert len(_under({b: keys[b] for b in buffers}, "style_tplane")) == 13
    assert len(_under({b: keys[b] for b in buffers}, "up_renderer")) == 15
    # SPEC.md 3: `scale` is a non-trainable parameter stored in the checkpoint.
    assert "attn_module.scale" in keys
    assert "attn_module.scale" in manifest.get("non_trainable_parameters", [])


def test_styleunet_counts(manifest: dict, keys: dict[str, list[int]]) -> None:
    # stylegan.md section 1 / 12: key counts, parameter totals and noise elements.
    buffers = set(manifest["buffers"])
    for prefix, n_keys, n_params, n_noise in (
        ("style_tplane", 254, 48_785_871, 174_736),
        ("up_renderer", 285, 48_675_388, 699_024),
    ):
        names = _under(keys, prefix)
        assert len(names) == n_keys
        assert _numel(keys, [k for k in names if k not in buffers]) == n_params
        assert _numel(keys, [k for k in names if k in buffers]) == n_noise
        assert _numel(keys, _under(keys, f"{prefix}.toRGB")) == {"style_tplane": 2_994, "up_renderer": 3_045}[prefix]


def test_styleunet_spot_checks(keys: dict[str, list[int]]) -> None:
    # stylegan.md 10.3 / 10.4: first conv of each StyleUNet (in_size > out_size only for style_tplane).
    assert keys["style_tplane.conv_body_first.0.weight"] == [16, 3, 1, 1]
    assert keys["style_tplane.conv_body_first.1.skip.weight"] == [32, 16, 1, 1]
    assert "style_tplane.conv_body_first.weight" not in keys
    assert keys["up_renderer.conv_body_first.weight"] == [16, 32, 1, 1]
    assert "up_renderer.conv_body_first.0.weight" not in keys
    assert not any(k.endswith(".skip.bias") for k in keys)  # ResBlock skip has no bias (4.3)
    # Worked examples of stylegan.md 10.4.
    assert keys["up_renderer.stylegan_decoder.style_convs.12.modulated_conv.modulation.weight"] == [64, 512]
    assert keys["style_tplane.condition_shift.5.2.bias"] == [64]
    # Output widths of the decoders (to_rgb1 = ToRGB(512, out_dim)).
    assert keys["style_tplane.stylegan_decoder.to_rgb1.modulated_conv.weight"] == [1, 96, 512, 1, 1]
    assert keys["up_renderer.stylegan_decoder.to_rgb1.modulated_conv.weight"] == [1, 3, 512, 1, 1]
    assert keys["up_renderer.final_linear.weight"] == [512, 4096]
    assert keys["up_renderer.stylegan_decoder.noises.noise14"] == [1, 1, 512, 512]
    assert keys["style_tplane.stylegan_decoder.noises.noise12"] == [1, 1, 256, 256]


def test_mta_spot_checks(keys: dict[str, list[int]]) -> None:
    # SPEC.md 3: f = LayerNorm(32) -> Linear(32,32) -> GELU -> Linear -> GELU -> Linear, biases on.
    for f in ("to_q_", "to_k_"):
        assert keys[f"attn_module.{f}.0.weight"] == [32]
        assert keys[f"attn_module.{f}.0.bias"] == [32]
        for i in (1, 3, 5):
            assert keys[f"attn_module.{f}.{i}.weight"] == [32, 32]
            assert keys[f"attn_module.{f}.{i}.bias"] == [32]
    assert len(_under(keys, "attn_module")) == 17
    # pipeline.md 5.4: learnable query tri-plane (1, 1, 3, 32, 256, 256), a bare parameter.
    assert keys["query_style_tplane"] == [1, 1, 3, 32, 256, 256]


def test_nerf_mlp_spot_checks(keys: dict[str, list[int]]) -> None:
    # SPEC.md 2 / 5: per-vertex learned feature table Embedding(5023, 32); Linear(59,64), Linear(64,32).
    q = "nerf_mlp.points_querier"
    assert keys[f"{q}.points_feature.weight"] == [5023, 32]
    assert keys[f"{q}.point_layers.0.weight"] == [64, 59]
    assert keys[f"{q}.point_layers.2.weight"] == [32, 64]
    # SPEC.md 6: Linear(64,128) ReLU Linear(128,128) ReLU Linear(128,128); Linear(128,1);
    # Linear(155,64) ReLU Linear(64,32).
    assert keys["nerf_mlp.feature_layers.0.weight"] == [128, 64]
    assert keys["nerf_mlp.feature_layers.4.weight"] == [128, 128]
    assert keys["nerf_mlp.density_layers.0.weight"] == [1, 128]
    assert keys["nerf_mlp.rgb_layers.0.weight"] == [64, 155]
    assert keys["nerf_mlp.rgb_layers.2.weight"] == [32, 64]
    assert len(_under(keys, "nerf_mlp")) == 17

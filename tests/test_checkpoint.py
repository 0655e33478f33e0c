"""Checkpoints: the paper model matches the official key manifest key for key and shape for
shape, loads an official-format checkpoint strictly (safely, without running code from the
file), round-trips through save_pretrained / from_pretrained, and explains what is wrong with
a checkpoint that does not fit.

tests/data/official_state_dict.json was written from shared/spec/stylegan.md and SPEC
sections 3, 5, 6 (see its "source" field and tests/test_manifest.py), not from this model.
"""

from __future__ import annotations

import json
import os
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import gpavatar.ops as ops
from gpavatar.model import CheckpointError, GPAvatar
from gpavatar.model.checkpoint import read_official_checkpoint

MANIFEST = json.loads((Path(__file__).parent / "data" / "official_state_dict.json").read_text())


@pytest.fixture(scope="module")
def paper_meta():
    with torch.device("meta"):
        return GPAvatar("paper")


def test_paper_model_matches_the_official_manifest(paper_meta):
    ours = {k: list(v.shape) for k, v in paper_meta.state_dict().items()}
    expected = MANIFEST["keys"]
    assert sorted(set(expected) - set(ours)) == [], "keys of the official checkpoint missing from the model"
    assert sorted(set(ours) - set(expected)) == [], "model keys the official checkpoint does not have"
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert wrong == {}
    buffers = {name for name, _ in paper_meta.named_buffers() if name in ours}
    assert buffers == set(MANIFEST["buffers"])
    frozen = {name for name, p in paper_meta.named_parameters() if not p.requires_grad}
    assert frozen == set(MANIFEST["non_trainable_parameters"])


def _official_checkpoint(path, *, drop=None, extra=None, reshape=None, seed=0):
    """An official-format checkpoint with random weights of the manifest's shapes, a frozen
    AlexNet entry, and a config object of a class that is not importable at load time."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) for k, shape in MANIFEST["keys"].items() if k != drop}
    state["percep_loss.net.slice1.0.weight"] = torch.randn(64, 3, 11, 11, generator=g)
    if extra:
        state[extra] = torch.zeros(3)
    if reshape:
        state[reshape] = torch.zeros(7)
    module = types.ModuleType("fake_easydict")

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "fake_easydict", "EasyDict"
    module.EasyDict = EasyDict
    sys.modules["fake_easydict"] = module
    try:
        config = EasyDict(MODEL=EasyDict(NAME="OneModel"), DATASET="vfhq")
        torch.save({"config_dict": config, "data_meta_info": {"flame_scale": 5.0, "focal_length": 12.0,
                                                              "principal_point": [0.0, 0.0]},
                    "step": 205000, "metric": 0.8, "state_dict": state}, path)
    finally:
        del sys.modules["fake_easydict"]
    return state


def test_official_checkpoint_loads_strictly(tmp_path):
    path = tmp_path / "one_model.ckpt"
    state = _official_checkpoint(path)
    model = GPAvatar.from_official_checkpoint(path)
    assert model.config.pef_normalize == "queries" and model.config.focal == 12.0
    assert model.config.pef_eps == ops.OFFICIAL_EPS == 1e-30  # the official 1 / d² (no constant)
    loaded = model.state_dict()
    for key in MANIFEST["keys"]:
        assert torch.equal(loaded[key], state[key]), key
    raw = read_official_checkpoint(path)
    assert raw["config_dict"]["MODEL"]["NAME"] == "OneModel"  # the foreign class came back as a dict


def test_official_checkpoint_saved_through_a_wrapper(tmp_path):
    """Keys prefixed by a DDP ("module.") wrapper load too."""
    state = {f"module.{k}": torch.zeros(shape) for k, shape in MANIFEST["keys"].items()}
    torch.save({"state_dict": state}, tmp_path / "wrapped.ckpt")
    model = GPAvatar.from_official_checkpoint(tmp_path / "wrapped.ckpt")
    assert not model.nerf_mlp.rgb_layers[2].weight.detach().any()


def test_official_checkpoint_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "config_dict": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load global (posix|os).system"):
        GPAvatar.from_official_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_official_checkpoint_mismatch_messages(tmp_path, case):
    path = tmp_path / "bad.ckpt"
    key = "nerf_mlp.rgb_layers.2.weight"
    kwargs = {"missing": dict(drop=key), "unexpected": dict(extra="nerf_mlp.extra_layer.weight"),
              "shape": dict(reshape=key)}[case]
    _official_checkpoint(path, **kwargs)
    expected = {"missing": r"1 missing key\(s\): nerf_mlp\.rgb_layers\.2\.weight",
                "unexpected": r"1 unexpected key\(s\): nerf_mlp\.extra_layer\.weight",
                "shape": r"1 shape mismatch\(es\): nerf_mlp\.rgb_layers\.2\.weight expected \[32, 64\], got \[7\]"}
    with pytest.raises(CheckpointError, match=expected[case]):
        GPAvatar.from_official_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        GPAvatar.from_official_checkpoint(tmp_path / "absent.ckpt")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "odd.ckpt")
    with pytest.raises(CheckpointError, match="state_dict"):
        GPAvatar.from_official_checkpoint(tmp_path / "odd.ckpt")


def test_save_and_load_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPAvatar("tiny", render_size=8).eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    again = GPAvatar.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    images = torch.rand(1, 1, 3, 64, 64)
    cam = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 9]]])
    points = torch.randn(1, 5023, 3) * 0.3
    assert torch.equal(model(images, points, cam)["image"], again(images, points, cam)["image"])
    # run-time overrides apply; an architecture change is a clear mismatch
    assert GPAvatar.from_pretrained(tmp_path / "m", noise="off").config.noise == "off"
    with pytest.raises(CheckpointError, match="shape mismatch"):
        GPAvatar.from_pretrained(tmp_path / "m", decoder_hidden=16)


def test_save_pretrained_is_atomic(tmp_path, monkeypatch):
    model = GPAvatar("tiny", render_size=8)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_from_pretrained_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPAvatar.from_pretrained(tmp_path)


def test_non_finite_weights_warn_with_their_names(tmp_path):
    from gpavatar.model.checkpoint import NonFiniteWeightsWarning

    model = GPAvatar("tiny")
    name = next(k for k in model.state_dict() if k.startswith("up_renderer.") and k.endswith("weight"))
    with torch.no_grad():
        model.query_style_tplane[0, 0, 0, 0, 0, 0] = float("nan")
        model.state_dict()[name].view(-1)[0] = float("inf")
    model.save_pretrained(tmp_path / "m")
    with pytest.warns(NonFiniteWeightsWarning, match=r"2 tensor\(s\) hold NaN or inf") as record:
        GPAvatar.from_pretrained(tmp_path / "m")
    assert "query_style_tplane" in str(record[0].message) and name in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GPAvatar("tiny").load_checked_state_dict(GPAvatar("tiny").state_dict())  # finite: silent

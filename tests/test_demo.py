"""The reenactment demo (the README's main job) end to end on CPU with the tiny preset."""

from __future__ import annotations

import av
import numpy as np
import pytest

import torch

from gpavatar import cli
from gpavatar.demo import TILE, TINY_WEIGHTS, driving_sequence, embedded_inputs, load_model, run_demo


def test_driving_sequence_moves_expression_jaw_and_head():
    exp, pose, yaw = driving_sequence(40)
    assert exp.shape == (40, 50) and pose.shape == (40, 6) and yaw.shape == (40,)
    assert exp.std(axis=0).max() > 0.3 and pose[:, 3].max() > 0.1 and np.abs(yaw).max() > 0.3
    assert (pose[:, :3] == 0).all()  # the global rotation lives in the camera, as in the official data


def test_demo_writes_a_video_and_reports_fps(tmp_path):
    result = run_demo(str(tmp_path / "clip.mp4"), frames=3, preset="tiny", device="cpu")
    assert result["frames"] == 3 and result["fps"] > 0 and result["preset"] == "tiny"
    with av.open(result["video"]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (TILE, 3 * TILE, 3)
    source, driver = frames[0][:, :TILE], frames[0][:, TILE:2 * TILE]
    assert source.mean() > 10 and driver.mean() > 10  # the head is visible in both panels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temporary file left


def test_demo_command_line(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "d.mp4"), "--frames", "2", "--device", "cpu",
                     "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "FPS" in out and "bundled tiny model" in out and (tmp_path / "d.mp4").is_file()
    assert "tuned" not in out
    assert cli.main(["demo", "--out", str(tmp_path / "t.gif"), "--frames", "1", "--device", "cpu",
                     "--preset", "tiny", "--tune"]) == 0
    out = capsys.readouterr().out  # on the CPU a tuning run is the base frame only
    assert "tuned (1 trials, " in out and " s): the defaults; frame " in out and (tmp_path / "t.gif").is_file()
    with pytest.raises(SystemExit):
        cli.main(["demo", "--frames", "0"])


def test_bundled_tiny_model_renders_the_driver_head():
    """The shipped weights (gpavatar/assets/tiny) reenact the embedded head far better than
    random weights: PSNR of the rendered frame against the driver mesh rendered by the
    rasterizer that made the training data."""
    from gpavatar.data.raster import render_mesh

    assert (TINY_WEIGHTS / "model.safetensors").is_file() and (TINY_WEIGHTS / "config.json").is_file()
    trained, weights = load_model("tiny", None, None, torch.device("cpu"), None)
    assert "bundled" in weights
    torch.manual_seed(0)
    from gpavatar.model import GPAvatar

    random_model = GPAvatar("tiny").eval().set_noise("stored")
    size = trained.config.output_size
    source, points, cameras, meshes, faces, colors = embedded_inputs(3, trained.config.image_size)
    scores = {}
    for name, model in (("trained", trained), ("random", random_model)):
        with torch.no_grad():
            avatar = model.build_avatar(source)
            psnrs = []
            for i in range(3):
                image = model.render(avatar, points[i:i + 1], cameras[i:i + 1])["image"].clamp(0, 1)
                target, _ = render_mesh(meshes[i], faces, colors, cameras[i].numpy(), 12.0, size, samples=2)
                target = torch.from_numpy(target).permute(2, 0, 1)[None].float() / 255
                psnrs.append(float(-10 * torch.log10(((image - target) ** 2).mean())))
        scores[name] = sum(psnrs) / len(psnrs)
    assert scores["trained"] > scores["random"] + 5, scores
    assert scores["trained"] > 18, scores


def test_demo_reports_what_runs_and_refuses_a_contradicting_preset(tmp_path, capsys):
    """--pretrained sets the sizes: the printed preset is the loaded model's, and a --preset that
    contradicts it is an error (it used to print "preset paper" and run tiny)."""
    with pytest.raises(ValueError, match="--preset paper contradicts --pretrained"):
        run_demo(str(tmp_path / "a.mp4"), frames=1, preset="paper", pretrained=str(TINY_WEIGHTS), device="cpu")
    assert cli.main(["demo", "--preset", "paper", "--pretrained", str(TINY_WEIGHTS), "--device", "cpu",
                     "--frames", "1", "--out", str(tmp_path / "b.mp4")]) == 2
    assert capsys.readouterr().err.startswith("gpavatar demo: error: --preset paper contradicts")
    with pytest.raises(ValueError, match="--preset tiny contradicts --checkpoint"):
        run_demo(str(tmp_path / "c.mp4"), frames=1, preset="tiny", checkpoint="one_model.ckpt", device="cpu")
    assert cli.main(["demo", "--pretrained", str(TINY_WEIGHTS), "--device", "cpu", "--frames", "1",
                     "--out", str(tmp_path / "d.mp4")]) == 0
    out = capsys.readouterr().out
    assert "preset tiny (64² sources, 16² rays x 16 samples, 64² output)" in out and f"pretrained {TINY_WEIGHTS}" in out
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "b.mp4").exists()


def test_demo_container_follows_the_suffix(tmp_path):
    from PIL import Image

    result = run_demo(str(tmp_path / "clip.gif"), frames=3, preset="tiny", device="cpu")
    data = (tmp_path / "clip.gif").read_bytes()
    assert data[:6] == b"GIF89a" and result["video"] == str(tmp_path / "clip.gif")
    with Image.open(tmp_path / "clip.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (3 * TILE, TILE)
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        run_demo(str(tmp_path / "clip.avi"), frames=1, preset="tiny", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif"]


def test_demo_default_output_is_where_make_demo_writes():
    from gpavatar.demo import DEFAULT_OUT

    assert DEFAULT_OUT == "demo-out/demo.mp4"
    assert cli.build_parser().parse_args(["demo"]).out == DEFAULT_OUT
    import inspect

    assert inspect.signature(run_demo).parameters["out"].default == DEFAULT_OUT
    import pathlib

    makefile = (pathlib.Path(__file__).parents[1] / "Makefile").read_text()
    demo_recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "gpavatar.cli demo" in demo_recipe and ("--out" not in demo_recipe or DEFAULT_OUT in demo_recipe)


def test_demo_compile_option_is_checked_first_and_reported(tmp_path, monkeypatch):
    """--compile names the real-time path's compiled parts; a bad value fails before the model loads;
    the result reports what was compiled and the device defaults (none on the CPU)."""
    import gpavatar.demo as demo

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    with monkeypatch.context() as m:
        m.setattr(demo, "load_model", refuse)
        with pytest.raises(ValueError, match="compile"):
            run_demo(str(tmp_path / "x.mp4"), frames=1, preset="tiny", device="cpu", compile="fast")
    result = run_demo(str(tmp_path / "n.mp4"), frames=1, preset="tiny", device="cpu", compile="none")
    assert result["compiled"] == [] and result["defaults"] == {}
    with pytest.raises(SystemExit):
        cli.main(["demo", "--compile", "everything"])


def test_demo_compiles_the_super_resolution_on_a_gpu_by_default(monkeypatch):
    """--compile's default "auto": the super-resolution on a CUDA device where Triton runs, nothing on
    a CPU or without Triton; the environment's value or a given one wins (checked: a ValueError)."""
    import gpavatar.demo as demo
    from gpavatar.ops import _backend

    monkeypatch.delenv("GPAVATAR_REALTIME_COMPILE", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    assert demo.demo_compile(None, cuda) == ("sr", True)
    assert demo.demo_compile("auto", cpu) == ("none", True)
    assert demo.demo_compile("layers", cuda) == ("layers", False)
    monkeypatch.setenv("GPAVATAR_REALTIME_COMPILE", "none")
    assert demo.demo_compile(None, cuda) == ("none", False)
    monkeypatch.setenv("GPAVATAR_REALTIME_COMPILE", "auto")
    assert demo.demo_compile(None, cuda) == ("sr", True)
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    assert demo.demo_compile(None, cuda) == ("none", True)
    with pytest.raises(ValueError, match="compile.*or auto"):
        demo.demo_compile("fast", cuda)
    assert cli.build_parser().parse_args(["demo", "--compile", "auto"]).compile == "auto"


def test_demo_falls_back_without_compile_only_when_it_chose_to_compile():
    """A compile that fails in the warm-up: with "auto" a RuntimeWarning and the renderer uncompiled
    (warmed up the same way); a compile the user asked for raises."""
    import gpavatar.demo as demo

    class Renderer:
        def __init__(self, compile):
            self.compile, self.calls = compile, 0

        def __call__(self, *args):
            if self.compile != "none":
                raise RuntimeError("inductor failed")
            self.calls += 1

    class Model:
        def __init__(self):
            self.built = []

        def realtime(self, avatar, compile, **options):
            self.built.append((compile, options))
            return Renderer(compile)

    model = Model()
    with pytest.warns(RuntimeWarning, match="compiling the super-resolution failed .*inductor failed"):
        r = demo._first_frame(model, None, (1, 2), {"batch": 1}, "sr", True, 2)
    assert r.compile == "none" and r.calls == 2 and model.built == [("sr", {"batch": 1}), ("none", {"batch": 1})]
    with pytest.raises(RuntimeError, match="inductor"):
        demo._first_frame(Model(), None, (1, 2), {}, "sr", False, 1)
    r = demo._first_frame(Model(), None, (1, 2), {}, "none", True, 3)
    assert r.calls == 3

"""The reenactment demo (the README's main job) end to end on CPU with the tiny preset."""

from __future__ import annotations

import av
import numpy as np
import pytest

from gpavatar import cli
from gpavatar.demo import TILE, driving_sequence, run_demo


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
    assert "FPS" in out and "random weights" in out and (tmp_path / "d.mp4").is_file()
    with pytest.raises(SystemExit):
        cli.main(["demo", "--frames", "0"])

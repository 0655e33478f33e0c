"""The paper preset runs on CPU: one frame at the official sizes with chunked field queries,
in a fresh process so its peak memory (ru_maxrss) is the model's alone; and the PEF's
"queries" normalization gives the same field chunked or not at the paper's query count."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from gpavatar.model import GPAvatar
    torch.manual_seed(0)
    model = GPAvatar("paper", query_chunk=131072).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 2, 3, 512, 512, generator=g)
    points = (torch.randn(1, 5023, 3, generator=g) * 0.35).clamp(-0.9, 0.9)
    camera = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 9.0]]])
    with torch.no_grad():
        avatar = model.build_avatar(images)
        out = model.render(avatar, points, camera)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        coords = torch.rand(1, 128 * 128 * 32, 3, generator=g) * 2.2 - 1.1
        dirs = torch.nn.functional.normalize(torch.randn(coords.shape, generator=g), dim=-1)
        whole = model.nerf_mlp(coords, dirs, avatar.planes, points, chunk=0)
        parts = model.nerf_mlp(coords, dirs, avatar.planes, points, chunk=100_000)
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(whole, parts))
    print(json.dumps({"shapes": {k: list(v.shape) for k, v in out.items()},
                      "finite": all(bool(v.isfinite().all()) for v in out.values()),
                      "image_range": [float(out["image"].min()), float(out["image"].max())],
                      "peak_gb": peak_gb, "chunk_error": err,
                      "alpha_nonzero": float((whole[0] > 0).float().mean())}))
""")


def test_paper_preset_one_frame_on_cpu():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    shapes = result["shapes"]
    assert shapes["image"] == [1, 3, 512, 512]
    assert shapes["coarse"] == shapes["fine"] == [1, 32, 128, 128]
    assert shapes["depth"] == [1, 1, 128, 128] and shapes["coarse_alphas"] == [1, 16384, 32]
    assert result["finite"]
    assert -0.001 <= result["image_range"][0] and result["image_range"][1] <= 1.001
    assert result["peak_gb"] < 8.0, f"peak memory {result['peak_gb']:.2f} GB"
    # Chunked "queries" normalization: the sums over 524,288 queries are the same numbers,
    # added in a different order (float32): agreement to ~1e-6 relative.
    assert result["chunk_error"] < 1e-5
    assert 0 < result["alpha_nonzero"] <= 1  # samples outside the box have zero density

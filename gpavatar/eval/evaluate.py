"""Self-reenactment evaluation as the official validation does it (pipeline.md 5.7, 6.1).

Each sample of a ``val`` / ``test`` :class:`gpavatar.data.OfficialDataset` (deterministic
sources: first and last frame of the video for two sources) is rendered without sampling
noise and with deterministic StyleGAN noise; PSNR and SSIM of the *unclamped* super-resolved
image against the target use the official conventions (PSNR range = the target's range; SSIM
with the torchmetrics defaults), averaged over samples. L1 on [0, 1] is reported too.

    gpavatar eval DATA --pretrained runs/tiny/pretrained [--split val] [--limit N]
                  [--per-sample metrics.csv|.json] [--grid examples.png] [--grid-rows 8]

``--per-sample`` writes one row per sample (target key, source keys, PSNR, SSIM, L1);
``--grid`` an image with one row per sample: sources | target | prediction
(:mod:`gpavatar.eval.report`).
"""

from __future__ import annotations

from typing import Optional

import torch

from gpavatar.eval.metrics import l1, psnr, ssim


@torch.no_grad()
def evaluate(model, dataset, device: Optional[torch.device | str] = None, limit: Optional[int] = None,
             noise: str = "stored", *, per_sample: bool = False, examples: int = 0,
             progress: bool = False) -> dict:
    """Mean PSNR / SSIM / L1 of ``model`` over ``dataset`` (one sample at a time, as official).

    Args:
        model: :class:`gpavatar.model.GPAvatar`; its training mode and noise setting are restored
        dataset: items with ``f_images``, ``d_images``, ``d_points``, ``d_transforms`` (and
            ``key``, ``f_keys``, ``of_images`` when present)
        limit: evaluate only the first ``limit`` samples (>= 1)
        noise: StyleGAN noise during evaluation ("stored": deterministic; "fresh": official)
        per_sample: also return ``"per_sample"``: one dict per sample (key, sources, psnr, ssim, l1)
        examples: also return ``"examples"``: (sources (V, 3, S, S), target (3, S, S), prediction
            (3, S', S')) CPU float tensors of the first ``examples`` samples (for a grid)
        progress: show a progress bar (tqdm, stderr)
    Returns:
        {"psnr", "ssim", "l1", "samples"} (+ "per_sample", "examples" when asked)
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training, old_noise = model.training, model.config.noise
    model.eval().set_noise(noise)
    totals, n = {"psnr": 0.0, "ssim": 0.0, "l1": 0.0}, 0
    rows, kept = [], []
    count = len(dataset) if limit is None else min(limit, len(dataset))
    indices = range(count)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="eval", unit="sample", leave=False)
    try:
        for index in indices:
            item = dataset[index]
            out = model(item["f_images"][None].to(device), item["d_points"][None].to(device),
                        item["d_transforms"][None].to(device))
            image, target = out["image"].float(), item["d_images"][None].to(device).float()
            scores = {"psnr": float(psnr(image, target)), "ssim": float(ssim(image, target)),
                      "l1": float(l1(image.clamp(0, 1), target))}
            for k, v in scores.items():
                totals[k] += v
            n += 1
            if per_sample:
                rows.append({"key": item.get("key", str(index)), "sources": list(item.get("f_keys", [])), **scores})
            if len(kept) < examples:
                kept.append((item.get("of_images", item["f_images"]).float().cpu(), item["d_images"].float().cpu(),
                             image[0].cpu()))
    finally:
        model.set_noise(old_noise)
        model.train(was_training)
    result: dict = {**{k: v / max(n, 1) for k, v in totals.items()}, "samples": n}
    if per_sample:
        result["per_sample"] = rows
    if examples:
        result["examples"] = kept
    return result


def add_parser(commands) -> None:
    from gpavatar.cli import NO_PROGRESS_HELP, positive_int

    p = commands.add_parser("eval", help="PSNR / SSIM / L1 of a model on a dataset split (official validation)",
                            description="PSNR / SSIM / L1 of a model on a dataset split, as the official "
                            "validation (deterministic sources: first and last frame of each video).")
    p.add_argument("data", help="dataset folder (official layout)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained", help="folder written by save_pretrained / gpavatar train")
    source.add_argument("--checkpoint", help="official one_model.ckpt")
    p.add_argument("--split", choices=("val", "test", "train"), default="val", help="dataset split")
    p.add_argument("--sources", type=positive_int, default=2, help="source images per sample")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N samples (default: all)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--noise", choices=("stored", "fresh", "off"), default="stored",
                   help="StyleGAN noise: stored (deterministic), fresh (the official, varies per run), off")
    p.add_argument("--per-sample", metavar="FILE", default=None,
                   help="write per-sample metrics to FILE (.csv or .json)")
    p.add_argument("--grid", metavar="FILE", default=None,
                   help="write an image (.png / .jpg) with one row per sample: sources | target | prediction")
    p.add_argument("--grid-rows", type=positive_int, default=8, help="samples in --grid")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(run=_main)


def _main(args) -> int:
    from gpavatar.cli import check_device, check_output_file, progress_enabled
    from gpavatar.data.official import OfficialDataset, dataset_flame
    from gpavatar.data.synthetic import CAMERA
    from gpavatar.eval.report import GRID_SUFFIXES, PER_SAMPLE_SUFFIXES, write_grid, write_per_sample
    from gpavatar.model import GPAvatar

    per_sample = check_output_file(args.per_sample, "--per-sample", PER_SAMPLE_SUFFIXES) if args.per_sample else None
    grid = check_output_file(args.grid, "--grid", GRID_SUFFIXES) if args.grid else None
    device = check_device(args.device)
    model = (GPAvatar.from_pretrained(args.pretrained) if args.pretrained
             else GPAvatar.from_official_checkpoint(args.checkpoint)).to(device)
    stage = "val" if args.split == "train" else args.split
    dataset = OfficialDataset(args.data, args.split, n_sources=args.sources, stage=stage,
                              resize=model.config.image_size, flame=dataset_flame(args.data, CAMERA["flame_scale"]),
                              pixel_scale=256.0)
    if len(dataset) == 0:
        raise ValueError(f"split {args.split!r} of {args.data} has no samples to evaluate")
    result = evaluate(model, dataset, device, args.limit, args.noise, per_sample=per_sample is not None,
                      examples=args.grid_rows if grid is not None else 0,
                      progress=progress_enabled(args.no_progress))
    print(f"{args.split}: {result['samples']} samples  PSNR {result['psnr']:.2f} dB  SSIM {result['ssim']:.4f}  "
          f"L1 {result['l1']:.4f}")
    if per_sample is not None:
        write_per_sample(per_sample, result["per_sample"], split=args.split)
        print(f"wrote {per_sample} ({len(result['per_sample'])} samples)")
    if grid is not None:
        write_grid(grid, result["examples"])
        print(f"wrote {grid} ({len(result['examples'])} rows: sources | target | prediction)")
    return 0

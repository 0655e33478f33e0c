"""Self-reenactment evaluation as the official validation does it (pipeline.md 5.7, 6.1).

Each sample of a ``val`` / ``test`` :class:`gpavatar.data.OfficialDataset` (deterministic
sources: first and last frame of the video for two sources) is rendered without sampling
noise and with deterministic StyleGAN noise; PSNR and SSIM of the *unclamped* super-resolved
image against the target use the official conventions (PSNR range = the target's range; SSIM
with the torchmetrics defaults), averaged over samples. L1 on [0, 1] is reported too.

    gpavatar eval DATA --pretrained runs/tiny/pretrained [--split val] [--limit N]
"""

from __future__ import annotations

from typing import Optional

import torch

from gpavatar.eval.metrics import l1, psnr, ssim


@torch.no_grad()
def evaluate(model, dataset, device: Optional[torch.device | str] = None, limit: Optional[int] = None,
             noise: str = "stored") -> dict[str, float]:
    """Mean PSNR / SSIM / L1 of ``model`` over ``dataset`` (one sample at a time, as official).

    Args:
        model: :class:`gpavatar.model.GPAvatar`; its training mode and noise setting are restored
        dataset: items with ``f_images``, ``d_images``, ``d_points``, ``d_transforms``
        limit: evaluate only the first ``limit`` samples
        noise: StyleGAN noise during evaluation ("stored": deterministic; "fresh": official)
    Returns:
        {"psnr", "ssim", "l1", "samples"}
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training, old_noise = model.training, model.config.noise
    model.eval().set_noise(noise)
    totals, n = {"psnr": 0.0, "ssim": 0.0, "l1": 0.0}, 0
    try:
        for index in range(len(dataset) if limit is None else min(limit, len(dataset))):
            item = dataset[index]
            out = model(item["f_images"][None].to(device), item["d_points"][None].to(device),
                        item["d_transforms"][None].to(device))
            image, target = out["image"].float(), item["d_images"][None].to(device).float()
            totals["psnr"] += float(psnr(image, target))
            totals["ssim"] += float(ssim(image, target))
            totals["l1"] += float(l1(image.clamp(0, 1), target))
            n += 1
    finally:
        model.set_noise(old_noise)
        model.train(was_training)
    return {**{k: v / max(n, 1) for k, v in totals.items()}, "samples": n}


def add_parser(commands) -> None:
    p = commands.add_parser("eval", help="PSNR / SSIM / L1 of a model on a dataset split (official validation)")
    p.add_argument("data", help="dataset folder (official layout)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained", help="folder written by save_pretrained / gpavatar train")
    source.add_argument("--checkpoint", help="official one_model.ckpt")
    p.add_argument("--split", choices=("val", "test", "train"), default="val")
    p.add_argument("--sources", type=int, default=2, help="source images per sample (2)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--noise", choices=("stored", "fresh", "off"), default="stored")
    p.set_defaults(run=_main)


def _main(args) -> int:
    from gpavatar.data.official import OfficialDataset, dataset_flame
    from gpavatar.data.synthetic import CAMERA
    from gpavatar.model import GPAvatar

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = (GPAvatar.from_pretrained(args.pretrained) if args.pretrained
             else GPAvatar.from_official_checkpoint(args.checkpoint)).to(device)
    stage = "val" if args.split == "train" else args.split
    dataset = OfficialDataset(args.data, args.split, n_sources=args.sources, stage=stage,
                              resize=model.config.image_size, flame=dataset_flame(args.data, CAMERA["flame_scale"]),
                              pixel_scale=256.0)
    result = evaluate(model, dataset, device, args.limit, args.noise)
    print(f"{args.split}: {result['samples']} samples  PSNR {result['psnr']:.2f} dB  SSIM {result['ssim']:.4f}  "
          f"L1 {result['l1']:.4f}")
    return 0

"""The ``gpavatar`` command (``python -m gpavatar.cli`` works too).

    gpavatar data synth OUT [--identities 8] [--frames 16] [--size 256] [--seed 0] [--format png] [--overwrite]
    gpavatar data check DIR [--sources 2] [--limit N]
    gpavatar data preview DIR OUT.png [--rows 8] [--cols 6] [--tile 128] [--annotate] [--colors 0]
    gpavatar train DATA OUT [--preset tiny|paper] [--steps N] [--amp bf16] ...   (gpavatar.train.command)
    gpavatar eval DATA --pretrained DIR | --checkpoint CKPT [--split val] [--limit N]   (gpavatar.eval.evaluate)
    gpavatar demo [--out demo.mp4] [--frames 50] [--preset paper|tiny] [--checkpoint CKPT] [--fast] ...

``synth`` writes a synthetic dataset in the official layout and prints its timing; ``check``
validates a dataset (every LMDB value decodes, records complete, splits consistent), prints a
summary table and exits 1 on problems; ``preview`` saves a grid of frames (rows: videos).
``demo`` reenacts the embedded procedural head and prints the render FPS (:mod:`gpavatar.demo`).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _synth(args) -> int:
    from gpavatar.data.synthetic import make_synthetic_dataset

    start = time.perf_counter()
    info = make_synthetic_dataset(args.out, n_identities=args.identities, frames_per_identity=args.frames,
                                  size=args.size, seed=args.seed, image_format=args.format, samples=args.samples,
                                  overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    print(f"wrote {info['frames']} frames ({args.identities} identities x {args.frames} frames, "
          f"{args.size}x{args.size} {args.format}) to {args.out}")
    print("splits: " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()))
    print(f"time: {seconds:.2f} s total, {1000 * seconds / max(info['frames'], 1):.1f} ms per frame")
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def _check(args) -> int:
    from gpavatar.data.official import check_dataset

    report = check_dataset(args.dir, n_sources=args.sources, limit=args.limit)
    rows = [["split", "frames", "videos", "frames/video"]]
    for split, s in report.splits.items():
        rows.append([split, str(s["frames"]), str(s["videos"]), f"{s['min_frames']}-{s['max_frames']}"])
    print(f"dataset {args.dir}")
    print(_table(rows))
    st = report.stats
    print(f"records: {st['records']}, LMDB entries: {st['lmdb_entries']}, decoded: {st['decoded']}")
    print(f"image sizes: {st['image_sizes'] or '-'}, formats: {st['formats'] or '-'}")
    print(f"camera: {st['camera']}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    for problem in report.problems[:args.max_problems]:
        print(f"problem: {problem}")
    if len(report.problems) > args.max_problems:
        print(f"... and {len(report.problems) - args.max_problems} more problems")
    print("OK" if report.ok else f"FAILED: {len(report.problems)} problems")
    return 0 if report.ok else 1


def _preview(args) -> int:
    import numpy as np
    from PIL import Image, ImageDraw

    from gpavatar.data.official import ImageLMDB, load_dataset_pkl, parse_key

    records, _ = load_dataset_pkl(args.dir)
    videos: dict = {}
    for key in sorted(records, key=parse_key):
        videos.setdefault(parse_key(key)[0], []).append(key)
    db = ImageLMDB(f"{args.dir}/img_lmdb")
    tiles = []
    for frames in list(videos.values())[:args.rows]:
        picks = [frames[i] for i in np.linspace(0, len(frames) - 1, min(args.cols, len(frames))).round().astype(int)]
        row = []
        for key in picks:
            image = Image.fromarray(db.image(key).transpose(1, 2, 0))
            if args.annotate:
                draw, (w, h) = ImageDraw.Draw(image), image.size
                x1, y1, x2, y2 = (np.asarray(records[key]["bbox"]) * [w, h, w, h]).tolist()
                draw.rectangle([x1, y1, x2, y2], outline=(255, 64, 64))
                for u, v in np.asarray(records[key]["kps"]).tolist():
                    draw.ellipse([u - 2, v - 2, u + 2, v + 2], outline=(64, 255, 64))
            row.append(np.asarray(image.resize((args.tile, args.tile), Image.LANCZOS)))
        row += [np.zeros_like(row[0])] * (args.cols - len(row))
        tiles.append(np.concatenate(row, axis=1))
    grid = Image.fromarray(np.concatenate(tiles, axis=0))
    if args.colors:
        grid = grid.quantize(colors=args.colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    grid.save(args.out, optimize=True)
    print(f"wrote {args.out} ({len(tiles)} videos x {args.cols} frames)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpavatar", description="GPAvatar tools (also: python -m gpavatar.cli)")
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="datasets in the official layout").add_subparsers(dest="action",
                                                                                               required=True)
    synth = data.add_parser("synth", help="render a synthetic dataset (official layout)")
    synth.add_argument("out", help="output folder")
    synth.add_argument("--identities", type=int, default=8, help="videos, one identity each (8)")
    synth.add_argument("--frames", type=int, default=16, help="frames per video (16)")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (256)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (0)")
    synth.add_argument("--format", choices=("png", "jpeg"), default="png", help="image encoding (png)")
    synth.add_argument("--samples", type=int, default=2, help="anti-aliasing samples per pixel side (2)")
    synth.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    synth.set_defaults(run=_synth)
    check = data.add_parser("check", help="validate a dataset; exit 1 on problems")
    check.add_argument("dir", help="dataset folder (img_lmdb/, dataset.pkl, camera.json)")
    check.add_argument("--sources", type=int, default=2, help="sources per training sample (2)")
    check.add_argument("--limit", type=int, default=None, help="decode only the first N LMDB values")
    check.add_argument("--max-problems", type=int, default=20, help="problems printed (20)")
    check.set_defaults(run=_check)
    preview = data.add_parser("preview", help="save a grid of frames (rows: videos)")
    preview.add_argument("dir", help="dataset folder")
    preview.add_argument("out", help="output image (.png / .jpg)")
    preview.add_argument("--rows", type=int, default=8, help="videos (8)")
    preview.add_argument("--cols", type=int, default=6, help="frames per video, evenly spaced (6)")
    preview.add_argument("--tile", type=int, default=128, help="tile side in pixels (128)")
    preview.add_argument("--annotate", action="store_true", help="draw bbox and kps")
    preview.add_argument("--colors", type=int, default=0, help="palette size for a smaller file (0: full colour)")
    preview.set_defaults(run=_preview)
    from gpavatar.demo import add_parser as add_demo
    from gpavatar.eval.evaluate import add_parser as add_eval
    from gpavatar.train.command import add_parser as add_train

    add_demo(commands)
    add_train(commands)
    add_eval(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError) as error:
        print(f"gpavatar: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``gpavatar`` command (``python -m gpavatar`` and ``python -m gpavatar.cli`` work too).

    gpavatar data synth OUT [--identities 8] [--frames 16] [--size 256] [--seed 0] [--format png] [--overwrite]
    gpavatar data check DIR [--sources 2] [--limit N]
    gpavatar data preview DIR OUT.png [--rows 8] [--cols 6] [--tile 128] [--annotate] [--colors 0]
    gpavatar train DATA OUT [--preset tiny|paper] [--steps N] [--amp bf16] ...   (gpavatar.train.command)
    gpavatar eval DATA --pretrained DIR | --checkpoint CKPT [--split val] [--limit N] [--per-sample F.csv]
                  [--grid F.png]   (gpavatar.eval.evaluate)
    gpavatar demo [--out demo-out/demo.mp4] [--frames 50] [--preset paper|tiny] [--checkpoint CKPT] ...
    gpavatar reenact --dataset DIR --source KEY | SOURCE_IMAGES [--driver FILE|DIR] [--orbit] [--depth] ...
                     (gpavatar.reenact)
    gpavatar --version

``synth`` writes a synthetic dataset in the official layout and prints its timing (a folder that
already holds the same complete dataset is left as it is); ``check`` validates a dataset (every
LMDB value decodes, records complete, splits consistent), prints a summary table and exits 1 on
problems; ``preview`` saves a grid of frames (rows: videos).  ``demo`` reenacts the embedded
procedural head and prints the render FPS (:mod:`gpavatar.demo`).

Failures: one line ``gpavatar <command>: error: <message>`` on stderr, no traceback (set
``GPAVATAR_TRACEBACK=1`` to see it); exit status 2 for bad input (arguments, files, data), 1 for
other failures (and ``data check`` problems), 130 when interrupted (Ctrl-C).  Progress bars
(stderr) show when stdout and stderr are terminals, unless ``--no-progress``.
"""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "UsageError", "check_output_file", "positive_int", "nonnegative_int",
           "progress_enabled", "check_device"]

EXIT_FAILURE, EXIT_INPUT, EXIT_INTERRUPTED = 1, 2, 130
RUNS_MODEL = ("demo", "reenact", "train", "eval")  # commands whose ops honour --backend / GPAVATAR_BACKEND
NO_PROGRESS_HELP = "no progress bar (one shows only when stdout and stderr are terminals)"


class UsageError(ValueError):
    """A bad command-line argument found after parsing (reported like argparse's errors, exit 2)."""


# input errors (exit 2); anything else is a failure (exit 1)
_INPUT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
                 IsADirectoryError, pickle.UnpicklingError)
_PLAIN_ERRORS = _INPUT_ERRORS + (OSError,)  # messages that read well without the exception's type name


# --- argument helpers (also used by gpavatar.demo and gpavatar.eval.evaluate) --------------------------


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


def check_output_file(path, option: str, suffixes: Optional[Sequence[str]] = None) -> Path:
    """The output file ``path`` of ``option`` (e.g. "--out"), checked before any work is done: not an
    existing folder, no file where a parent folder must be, a suffix of ``suffixes`` (case-insensitive)
    when given.  UsageError otherwise."""
    path = Path(path)
    if path.is_dir():
        example = path / ("out" + (suffixes[0] if suffixes else ""))
        raise UsageError(f"{option} {path} is a folder; give a file name (e.g. {example})")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} {path}: {parent} is a file, not a folder")
            break
    return path


def progress_enabled(no_progress: bool = False) -> bool:
    """Progress bars (written to stderr) only for a person watching: stdout and stderr are terminals."""
    return not no_progress and sys.stdout.isatty() and sys.stderr.isatty()


def check_device(name: Optional[str], option: str = "--device"):
    """``torch.device`` of ``name`` (None: cuda if available, else cpu); UsageError for names that are no
    device, devices other than cpu / cuda, and cuda without a visible GPU."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"{option} {name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{option} {name}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {name}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                             f"use {option} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_backend(args) -> None:
    """``--backend`` / ``$GPAVATAR_BACKEND`` name a backend that can run on the command's device."""
    from gpavatar.ops._backend import BACKENDS, available_backends

    env = os.environ.get("GPAVATAR_BACKEND")
    if env is not None and env not in BACKENDS:
        raise UsageError(f"GPAVATAR_BACKEND={env!r} is not a backend: use one of {', '.join(BACKENDS)} or unset it")
    explicit = getattr(args, "backend", None)
    name, origin = (explicit, f"--backend {explicit}") if explicit is not None else (env, f"GPAVATAR_BACKEND={env}")
    if name is None or name == "auto":
        return
    device = check_device(getattr(args, "device", None))
    usable = available_backends(device)
    if name not in usable:
        raise UsageError(f"{origin}: backend {name!r} cannot run on {device.type} here "
                         f"(usable: {', '.join(usable)})")


# --- data commands ---------------------------------------------------------------------------------


def _synth(args) -> int:
    from gpavatar.data.synthetic import make_synthetic_dataset

    if args.frames < 3:
        raise UsageError(f"--frames {args.frames}: every video needs at least 3 frames to train on (a target and "
                         f"2 sources drawn from the other frames, the official sampling); use --frames 3 or more")
    if args.identities == 1:
        warnings.warn("--identities 1: train, val and test all hold the one video, so evaluation measures training "
                      "frames; use 3 or more identities for separate splits", UserWarning)
    start = time.perf_counter()
    info = make_synthetic_dataset(args.out, n_identities=args.identities, frames_per_identity=args.frames,
                                  size=args.size, seed=args.seed, image_format=args.format, samples=args.samples,
                                  overwrite=args.overwrite, progress=progress_enabled(args.no_progress))
    if info.get("reused"):
        print(f"{args.out} already holds this dataset ({info['frames']} frames, {args.identities} identities x "
              f"{args.frames} frames, {args.size}x{args.size} {args.format}); nothing to do (--overwrite rewrites it)")
        return 0
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

    if not Path(args.dir).is_dir():
        raise FileNotFoundError(f"{args.dir} is not a folder (a dataset folder holds img_lmdb/, dataset.pkl, "
                                f"camera.json)")
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
    return 0 if report.ok else EXIT_FAILURE


def _preview(args) -> int:
    import numpy as np
    from PIL import Image, ImageDraw

    from gpavatar.data.official import ImageLMDB, check_record, load_dataset_pkl, parse_key
    from gpavatar.model.checkpoint import atomic_write

    out = check_output_file(args.out, "OUT", (".png", ".jpg", ".jpeg"))
    if args.colors and out.suffix.lower() != ".png":
        raise UsageError(f"--colors {args.colors}: a palette image needs a .png OUT, got {out}")
    records, _ = load_dataset_pkl(args.dir)
    if not records:
        raise ValueError(f"{Path(args.dir) / 'dataset.pkl'} holds no records")
    videos: dict = {}
    for key in sorted(records, key=parse_key):
        videos.setdefault(parse_key(key)[0], []).append(key)
    db = ImageLMDB(Path(args.dir) / "img_lmdb")
    tiles = []
    for frames in list(videos.values())[:args.rows]:
        picks = [frames[i] for i in np.linspace(0, len(frames) - 1, min(args.cols, len(frames))).round().astype(int)]
        row = []
        for key in picks:
            image = Image.fromarray(db.image(key).transpose(1, 2, 0))
            if args.annotate:
                record = check_record(key, records[key])
                draw, (w, h) = ImageDraw.Draw(image), image.size
                x1, y1, x2, y2 = (record["bbox"] * [w, h, w, h]).tolist()
                draw.rectangle([x1, y1, x2, y2], outline=(255, 64, 64))
                for u, v in record["kps"].tolist():
                    draw.ellipse([u - 2, v - 2, u + 2, v + 2], outline=(64, 255, 64))
            row.append(np.asarray(image.resize((args.tile, args.tile), Image.LANCZOS)))
        row += [np.zeros_like(row[0])] * (args.cols - len(row))
        tiles.append(np.concatenate(row, axis=1))
    grid = Image.fromarray(np.concatenate(tiles, axis=0))
    if args.colors:
        grid = grid.quantize(colors=args.colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if out.suffix.lower() == ".png" else "JPEG"
    atomic_write(out, lambda tmp: grid.save(tmp, format=fmt, optimize=True))
    print(f"wrote {out} ({len(tiles)} videos x {args.cols} frames)")
    return 0


# --- parser ------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help unless there is no default or the text already gives it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or "default" in text
                or f"({default})" in text or not action.option_strings):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command parser shows option defaults in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    import gpavatar

    parser = _Parser(prog="gpavatar", description="GPAvatar tools (also: python -m gpavatar)")
    parser.add_argument("--version", action="version", version=f"gpavatar {gpavatar.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = commands.add_parser("data", help="datasets in the official layout").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    synth = data.add_parser("synth", help="render a synthetic dataset (official layout)",
                            description="Render a synthetic dataset in the official layout into OUT. A folder that "
                            "already holds the same complete dataset is left as it is (exit 0); one with a "
                            "different dataset needs --overwrite.")
    synth.add_argument("out", help="output folder")
    synth.add_argument("--identities", type=positive_int, default=8, help="videos, one identity each")
    synth.add_argument("--frames", type=positive_int, default=16, help="frames per video (>= 3 to train)")
    synth.add_argument("--size", type=_int_at_least(8), default=256, help="image side in pixels")
    synth.add_argument("--seed", type=nonnegative_int, default=0, help="random seed")
    synth.add_argument("--format", choices=("png", "jpeg"), default="png", help="image encoding")
    synth.add_argument("--samples", type=positive_int, default=2, help="anti-aliasing samples per pixel side")
    synth.add_argument("--overwrite", action="store_true", help="replace a different dataset already in OUT")
    synth.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    synth.set_defaults(run=_synth)
    check = data.add_parser("check", help="validate a dataset; exit 1 on problems")
    check.add_argument("dir", help="dataset folder (img_lmdb/, dataset.pkl, camera.json)")
    check.add_argument("--sources", type=positive_int, default=2, help="sources per training sample")
    check.add_argument("--limit", type=nonnegative_int, default=None,
                       help="decode only the first N LMDB values (default: all)")
    check.add_argument("--max-problems", type=nonnegative_int, default=20, help="problems printed")
    check.set_defaults(run=_check)
    preview = data.add_parser("preview", help="save a grid of frames (rows: videos)")
    preview.add_argument("dir", help="dataset folder")
    preview.add_argument("out", help="output image (.png / .jpg)")
    preview.add_argument("--rows", type=positive_int, default=8, help="videos")
    preview.add_argument("--cols", type=positive_int, default=6, help="frames per video, evenly spaced")
    preview.add_argument("--tile", type=positive_int, default=128, help="tile side in pixels")
    preview.add_argument("--annotate", action="store_true", help="draw bbox and kps")
    preview.add_argument("--colors", type=_int_range(0, 256), default=0,
                         help="palette size for a smaller .png, 2-256 (0: full colour)")
    preview.set_defaults(run=_preview)
    from gpavatar.demo import add_parser as add_demo
    from gpavatar.eval.evaluate import add_parser as add_eval
    from gpavatar.reenact import add_parser as add_reenact
    from gpavatar.train.command import add_parser as add_train

    add_demo(commands)
    add_reenact(commands)
    add_train(commands)
    add_eval(commands)
    return parser


def _int_range(low: int, high: int):
    at_least = _int_at_least(low)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {value}")
        return value

    return parse


# --- running and reporting ---------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _message(error: BaseException) -> str:
    """One line for ``error``: its message (a KeyError's without quotes), the type name for exceptions
    whose message does not say what happened on its own, a hint for a full disk."""
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    else:
        text = str(error)
    text = _one_line(text) or type(error).__name__
    if not isinstance(error, _PLAIN_ERRORS):
        text = f"{type(error).__name__}: {text}"
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in text:
        text += " (the disk is full: free space or write elsewhere)"  # OSError, or lmdb's own error
    return text


def _command_name(args) -> str:
    command = getattr(args, "command", None)
    if command == "data" and getattr(args, "action", None):
        return f"data {args.action}"
    return command or ""


def _validate(args) -> None:
    """Checks shared by the commands, before any work: the device, the kernel backend."""
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    if getattr(args, "command", None) in RUNS_MODEL:
        _check_backend(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    name = ""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *rest, **kw: print(
            f"gpavatar{' ' + name if name else ''}: warning: {_one_line(message)}", file=sys.stderr)
        try:
            args = build_parser().parse_args(argv)
            name = _command_name(args)
            _validate(args)
            return args.run(args)
        except KeyboardInterrupt:
            print(f"gpavatar{' ' + name if name else ''}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # stdout closed early (`gpavatar data check DIR | head`)
            try:
                sys.stdout = open(os.devnull, "w")
            except OSError:
                pass
            return EXIT_FAILURE
        except Exception as error:  # noqa: BLE001 - every failure ends in one line
            if os.environ.get("GPAVATAR_TRACEBACK", "0") not in ("", "0"):
                raise
            print(f"gpavatar{' ' + name if name else ''}: error: {_message(error)}", file=sys.stderr)
            return EXIT_INPUT if isinstance(error, _INPUT_ERRORS) else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

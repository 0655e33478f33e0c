"""``gpavatar train``: train on a dataset in the official layout (``gpavatar data synth`` makes one).

    gpavatar train DATA OUT [--preset tiny|paper] [--model-config cfg.yaml] [--steps N]
                   [--batch-size 2] [--lr 1e-4] [--amp off|bf16] [--workers 0] [--seed 0]
                   [--log-every 50] [--save-every 5000] [--device cuda|cpu] [--no-resume]
    torchrun --nproc_per_node 8 -m gpavatar.cli train DATA OUT ...      # multi-GPU (DDP)

OUT receives ``last.pt`` (resumable), ``log.jsonl`` and ``pretrained/`` (``from_pretrained``).
A run finds ``OUT/last.pt`` and resumes from it unless ``--no-resume``.
"""

from __future__ import annotations

from pathlib import Path


def add_parser(commands) -> None:
    p = commands.add_parser("train", help="train GPAvatar on an official-layout dataset (resumable)")
    p.add_argument("data", help="dataset folder (img_lmdb/, dataset.pkl, camera.json)")
    p.add_argument("out", help="output folder: last.pt, log.jsonl, pretrained/")
    p.add_argument("--preset", choices=("paper", "tiny"), default="tiny", help="model sizes (tiny)")
    p.add_argument("--model-config", help="YAML/JSON model config (overrides --preset)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps in total (official: 205000)")
    p.add_argument("--batch-size", type=int, default=2, help="per process (2)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--milestones", default=None, help="comma list of LR decay steps (official 130000,160000)")
    p.add_argument("--amp", choices=("off", "bf16"), default="off")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=5000)
    p.add_argument("--device", default=None, help="default: this process's GPU, else CPU")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
    p.set_defaults(run=run)


def run(args) -> int:
    from gpavatar.data.official import OfficialDataset, dataset_flame
    from gpavatar.data.synthetic import CAMERA
    from gpavatar.model import GPAvatar, GPAvatarConfig
    from gpavatar.train.trainer import Trainer, TrainConfig

    config = GPAvatarConfig.load(args.model_config) if args.model_config else GPAvatarConfig.preset(args.preset)
    steps = args.steps if args.steps is not None else TrainConfig.steps
    milestones = (tuple(int(m) for m in args.milestones.split(",") if m) if args.milestones
                  else TrainConfig.milestones)
    train_config = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, milestones=milestones,
                               amp=args.amp, workers=args.workers, seed=args.seed, log_every=args.log_every,
                               save_every=args.save_every)
    flame = dataset_flame(args.data, CAMERA["flame_scale"])
    dataset = OfficialDataset(args.data, "train", n_sources=2, resize=config.image_size, flame=flame,
                              seed=args.seed)
    out = Path(args.out)
    trainer = Trainer(GPAvatar(config), dataset, out, train_config, device=args.device)
    resumed = False if args.no_resume else trainer.load()
    if trainer.context.is_main:
        print(f"gpavatar train: {len(dataset)} samples, {trainer.batches_per_epoch} batches/epoch/process, "
              f"{trainer.context.world_size} process(es), device {trainer.device}, "
              f"{'resumed at step ' + str(trainer.step) if resumed else 'from scratch'} -> {steps} steps")
    last = trainer.fit()
    if trainer.context.is_main:
        trainer.model.save_pretrained(out / "pretrained")
        terms = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
        print(f"done at step {trainer.step}: {terms}; wrote {out / 'last.pt'} and {out / 'pretrained'}")
    return 0


"""A few steps of a tiny Trainer on every rank; run under torchrun by tests/test_scaleout.py.

    python -m torch.distributed.run --standalone --nproc_per_node N ddp_worker.py MODE OUT BATCH STEPS

MODE "grad": the first step's gradient, recovered from the SGD update (weight decay,
clipping and warm-up off, so the first update is lr x world x gradient), from rank 0.
MODE "train": STEPS steps of rmt+ (burn-in 1), then every rank's student, teacher, and
the teacher before the last step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import synthetic_tiles
from napari_rmt.data import ClassList
from napari_rmt.train import IterationEvent, TrainConfig, Trainer
from napari_rmt.train.distributed import init_from_env, shutdown


def main() -> None:
    mode, out, batch, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    world, device = init_from_env("cpu")
    tiles = synthetic_tiles(n=8)
    classes = ClassList.from_names(["a", "b", "c"])
    cfg = TrainConfig.for_method(
        "rmt+", iterations=max(2, steps), burn_in=1, warmup=0, labelled_batch=batch, unlabelled_batch=batch,
        lr=0.01, weight_decay=0.0, grad_clip=0.0, threshold=0.0, ignore_low=None, ema_decay=0.9,
        lr_schedule="constant", device=device, checkpoint_every_s=0,
        model={"backbone": "resnet18", "norm": "group"},
    )
    trainer = Trainer(tiles[:4], tiles[4:], classes, cfg)
    if mode == "grad":
        # every anchor and proposal sampled: no random subset, so the ranks' shares add up
        trainer.student.rpn.fg_bg_sampler.batch_size_per_image = 10**6
        trainer.student.roi_heads.fg_bg_sampler.batch_size_per_image = 10**6
        before = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
        for ev in trainer.run():
            if isinstance(ev, IterationEvent):
                break
        grad = {k: (before[k] - v.detach()) / (cfg.lr * world.size) for k, v in trainer.student.named_parameters()}
        if world.is_main:
            torch.save(grad, out / f"grad_{world.size}.pt")
    else:
        previous = None
        for ev in trainer.run():
            if isinstance(ev, IterationEvent) and ev.iteration == steps - 1:
                previous = {k: v.detach().clone() for k, v in trainer.teacher.state_dict().items()}
        torch.save(
            {"student": trainer.student.state_dict(), "teacher": trainer.teacher.state_dict(),
             "teacher_before": previous, "iteration": trainer.iteration},
            out / f"rank{world.rank}.pt",
        )
    shutdown()


if __name__ == "__main__":
    main()

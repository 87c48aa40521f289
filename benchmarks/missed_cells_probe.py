"""What does the unlabelled loss teach about the cells the teacher misses? (issue 11)

Every branch that learns from pseudo-labels loses recall: the student learns to find the
cells the teacher labels and finds fewer of the rest. This probe follows the rest. It loads
a state saved by ``semi_wins.py supervised`` (a branch's first teacher), predicts the first
N unlabelled tiles of that seed's split as the trainer does (class scores, floor 0.05,
NMS), and sorts each hidden true cell by the best score of a teacher box at IoU >= 0.5 of
it: a pseudo-box (>= the threshold), in the ignore band ([ignore_low, threshold): its RoIs
weigh 0), or below it (its RoIs are background, weighted by the teacher's background
probability under soft negatives). For each group it also gives that background
probability on the cell's own box (what a student RoI right on the cell is weighted by) and
the same raised to a power (a sharper soft negative), and the share of the group that the
bundled nucleus model finds at a low cut (could a second, class-agnostic model point at
them?). ``--picture`` draws eight of the tiles: green the cells with a pseudo-box, orange
those in the band or just below it, red those with no teacher box; thin blue the teacher's
boxes at the threshold.

    python benchmarks/missed_cells_probe.py runs/semi/s1/supervised_nuc/state_50.pt --seed 1 --tiles 150 \
        --picture docs/images/semi-missed-cells-s1.png
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from semi_wins import split  # benchmarks/ is the script's folder
from torchvision.ops import boxes as box_ops

from napari_rmt.model.bundled import nucleus_path
from napari_rmt.model.predict import image_tensor, predict_images
from napari_rmt.train.checkpoint import load_model, model_from_checkpoint, read_checkpoint

#: The bundled model's cut for "it points at the cell" (low: it is shy, docs/benchmarks.md).
NUCLEUS_CUT = 0.1


@torch.no_grad()
def background_on(model, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The model's background probability for RoIs exactly on ``boxes``."""
    images_t, _ = model.transform([image])
    features = model.backbone(images_t.tensors)
    return model.roi_heads.class_probabilities(features, [boxes], images_t.image_sizes)[:, 0]


def best_score(truth: torch.Tensor, det: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per true box, the best score of a detection at IoU >= 0.5 of it (0: none)."""
    if not len(det["boxes"]) or not len(truth):
        return torch.zeros(len(truth))
    iou = box_ops.box_iou(truth, det["boxes"])
    return torch.where(iou >= 0.5, det["scores"][None, :], torch.zeros_like(iou)).max(dim=1).values


def picture(path: str, tiles, dets, best: list[torch.Tensor], threshold: float) -> None:
    """Eight of the tiles, each cell coloured by ``best`` (its best teacher box's score)."""
    from PIL import Image, ImageDraw

    step = max(1, len(tiles) // 8)
    panels = []
    for tile, det, s in list(zip(tiles, dets, best, strict=True))[::step][:8]:
        im = Image.fromarray(tile.pixels()[..., :3]).resize((512, 512), Image.NEAREST)
        draw = ImageDraw.Draw(im)
        for b, sc in zip(tile.boxes.xyxy * 2, s.numpy(), strict=True):
            colour = (0, 200, 0) if sc >= threshold else (255, 0, 0) if sc < 0.05 else (255, 200, 0)
            draw.rectangle(list(b), outline=colour, width=2)
        for b, sc in zip(det["boxes"].numpy() * 2, det["scores"].numpy(), strict=True):
            if sc >= threshold:
                draw.rectangle(list(b), outline=(0, 0, 255), width=1)
        panels.append(im)
    sheet = Image.new("RGB", (512 * 4, 512 * ((len(panels) + 3) // 4)), "white")
    for k, p in enumerate(panels):
        sheet.paste(p, ((k % 4) * 512, (k // 4) * 512))
    sheet.save(path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("state")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiles", type=int, default=150)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--picture", help="a PNG of eight of the tiles")
    ap.add_argument("--labelled", action="store_true", help="the labelled tiles instead (what it was taught)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    _ts, lab, unl, _test = split(args.seed)
    model = model_from_checkpoint(read_checkpoint(args.state))[0]
    model.eval()
    model.roi_heads.score_thresh = 0.05
    tiles = (lab if args.labelled else unl)[: args.tiles]
    images = [image_tensor(t.pixels()) for t in tiles]
    dets = predict_images(model, images, batch_size=4)
    nucleus = load_model(nucleus_path())[0]
    nucleus.roi_heads.score_thresh = 0.05
    nuc_dets = predict_images(nucleus, images, batch_size=4)
    best, bg, nuc = [], [], []
    for tile, im, det, nd in zip(tiles, images, dets, nuc_dets, strict=True):
        truth = torch.as_tensor(tile.boxes.xyxy, dtype=torch.float32)
        best.append(best_score(truth, det))
        nuc.append(best_score(truth, nd))
        if len(truth):
            bg.append(background_on(model, im, truth))
    best_t, bg_t, nuc_t = torch.cat(best).numpy(), torch.cat(bg).numpy(), torch.cat(nuc).numpy()
    n = len(best_t)
    print(f"{len(tiles)} {'labelled' if args.labelled else 'unlabelled'} tiles, {n} true cells, "
          f"threshold {args.threshold}")
    groups = {
        f">= {args.threshold} (pseudo-box)": best_t >= args.threshold,
        f"0.2-{args.threshold} (ignore band from 0.2)": (best_t >= 0.2) & (best_t < args.threshold),
        "0.05-0.2": (best_t >= 0.05) & (best_t < 0.2),
        "no teacher box (< 0.05)": best_t < 0.05,
    }
    print("| best teacher box on the cell | share of cells | background p on the cell's box: mean | "
          f"median | p^4 mean | p^8 mean | nucleus model >= {NUCLEUS_CUT} |")
    print("|---|---|---|---|---|---|---|")
    for name, sel in groups.items():
        b = bg_t[sel]
        if not len(b):
            print(f"| {name} | 0 | | | | | |")
            continue
        print(f"| {name} | {sel.mean():.3f} | {b.mean():.3f} | {np.median(b):.3f} | "
              f"{(b ** 4).mean():.3f} | {(b ** 8).mean():.3f} | {(nuc_t[sel] >= NUCLEUS_CUT).mean():.3f} |")
    if args.picture:
        picture(args.picture, tiles, dets, best, args.threshold)


if __name__ == "__main__":
    main()

"""``napari-rmt predict``: tiles of a COCO file or image files; large images in stitched windows."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..data.errors import NapariRmtError
from ..model.config import BACKENDS, BOX_SCORES, DEFAULT_BACKEND, PREDICTION_FLOOR
from .common import ProgressBar, at_least, in_range, load_dataset, pixel_size


def add_parser(sub) -> None:
    pred = sub.add_parser("predict", help="predict cells with a trained model")
    pred.add_argument("--model", required=True, help="model.pt (or its run folder), or 'nucleus' for the bundled nucleus model")
    pred.add_argument("--coco", default=None, help="predict every image of this COCO json, keeping ids")
    pred.add_argument("--images", default=None, help="image folder for --coco")
    pred.add_argument(
        "--allow-outside-paths", action="store_true",
        help="read images named by absolute paths or ../ in the COCO file (refused by default)",
    )
    pred.add_argument("paths", nargs="*", help="image files (when no --coco)")
    pred.add_argument("--out", required=True, help="COCO results json")
    pred.add_argument(
        "--overwrite", action="store_true",
        help="replace outputs that exist already (--out, its .images.json, --zarr stores); refused by default",
    )
    pred.add_argument("--score-threshold", type=in_range(0, 1), default=PREDICTION_FLOOR)
    pred.add_argument(
        "--box-score", choices=BOX_SCORES, default=None,
        help="what a box's score is: foreground (1 - p(background), its most probable class) or class "
        "(its class's probability); default: the model's own",
    )
    pred.add_argument("--nms", type=in_range(0, 1, low_open=True), default=0.5, help="class-agnostic NMS IoU")
    pred.add_argument(
        "--pixel-size", type=pixel_size, default=None, metavar="UM",
        help="the images' pixel size in µm (about 0.25 at 40x, 0.5 at 20x); each image is resampled to the "
        "model's own and its boxes mapped back. Default: what an image file states (OME-TIFF, Aperio), else "
        "the model's",
    )
    pred.add_argument("--batch-size", type=at_least(1), default=4)
    pred.add_argument("--device", default="auto")
    pred.add_argument(
        "--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
        help=f"how the CPU runs the model: torch, channels-last, or onnx (ONNX Runtime for the backbone; needs "
        f"the onnx extra); default {DEFAULT_BACKEND}, the fastest measured (docs/benchmarks.md), all with the same boxes",
    )
    big = pred.add_argument_group(
        "large images",
        "image files larger than window + 2 x context (and zarr stores) are predicted in windows "
        "and stitched into whole-image boxes",
    )
    big.add_argument("--window", type=at_least(16), default=512, help="window size in pixels (default 512)")
    big.add_argument("--overlap", type=at_least(0), default=0, help="overlap between windows (default 0)")
    big.add_argument("--context", type=at_least(0), default=128, help="pixels read around each window (default 128)")
    big.add_argument("--zarr", default=None, help="also write each large image's boxes to DIR/<name>.zarr")
    big.add_argument(
        "--geojson", default=None, metavar="DIR",
        help="also write each large image's boxes to DIR/<name>.geojson in whole-image pixels: QuPath opens it "
        "over the slide (detections with their class's name and colour)",
    )
    big.add_argument(
        "--tissue", choices=("auto", "on", "off"), default="auto",
        help="predict only windows that hold tissue (a mask computed on a coarse level; glass is skipped). "
        "auto (default): on for slides (a pyramid, or SVS / NDPI / SCN / BIF), off for other images",
    )
    dask = big.add_mutually_exclusive_group()
    dask.add_argument(
        "--workers", type=at_least(1), default=None,
        help="predict the windows on a local Dask cluster of N worker processes (needs the 'scale' extra)",
    )
    dask.add_argument(
        "--dask-scheduler", default=None, metavar="ADDRESS",
        help="predict the windows on a running dask.distributed scheduler's workers (tcp://host:8786); "
        "they must reach the image files by the same paths",
    )
    big.add_argument("--threads-per-worker", type=at_least(1), default=1, help="torch threads in each Dask worker")
    pred.set_defaults(func=run)


def _classes_by_name(model_classes, data_classes, where: str):
    """The model's classes under the dataset's category ids, matched by name.

    Boxes written under the model's own ids would be scored as other classes when the
    dataset numbers its categories differently; a class the dataset lacks is refused.
    """
    from ..data.classes import CellClass, ClassList

    if model_classes.names == data_classes.names and model_classes.ids == data_classes.ids:
        return model_classes
    missing = [c.name for c in model_classes if c.name.lower() not in {n.lower() for n in data_classes.names}]
    if missing:
        raise NapariRmtError(
            f"{where}: the model predicts classes {missing} that the dataset's categories "
            f"{data_classes.names} lack; predict on image files instead, or add the categories"
        )
    return ClassList(
        CellClass(data_classes.by_name(c.name).id, data_classes.by_name(c.name).name, c.colour) for c in model_classes
    )


def _tissue_for(image, mode: str):
    """The tissue mask of ``image`` when ``--tissue`` asks for one (auto: slides only)."""
    from ..data.tissue import is_slide, tissue_mask

    return tissue_mask(image) if mode == "on" or (mode == "auto" and is_slide(image)) else None


def _scale_for(tile, args: argparse.Namespace, native: float | None, said_before: set) -> float:
    """How much the detector enlarges ``tile``: its pixel size (``--pixel-size``, else what
    its file states) over the model's; said once per pixel size and source."""
    from ..data.scale import pixel_size_of, scale_factor

    size, said = args.pixel_size, "--pixel-size"
    if size is None and tile.path is not None and native is not None:
        size, said = pixel_size_of(tile.path), "its file"
    factor = scale_factor(size, native)
    if factor != 1.0 and (size, said) not in said_before:
        said_before.add((size, said))
        print(f"napari-rmt: images at {size:g} µm/px ({said}) resampled x{factor:.2f} to the model's {native:g} µm/px")
    return factor


def run(args: argparse.Namespace) -> int:
    from ..data.atomic import atomic_write_json, check_output
    from ..data.boxstore import write_boxes_zarr
    from ..data.imageio import image_size
    from ..data.large import is_zarr_path, open_large_image, tile_grid
    from ..data.results import write_coco_results
    from ..data.tiles import Tile, TileSet
    from ..model.backends import for_inference
    from ..model.predict import predict_tiles, resolve_device
    from ..model.wholeimage import predict_large_image

    # Every output is checked before hours of work, and none may be (inside) an input.
    inputs = [p for p in (args.model, args.coco, *(args.paths or [])) if p]
    check_output(args.out, inputs, "--out", overwrite=args.overwrite)
    if not args.coco:
        check_output(Path(args.out).with_suffix(".images.json"), inputs, "--out", overwrite=args.overwrite)
    if args.zarr:
        for p in args.paths or []:
            check_output(Path(args.zarr) / f"{Path(p).stem}.zarr", inputs, "--zarr", folder=True,
                         overwrite=args.overwrite)
    if args.geojson:
        for p in args.paths or []:
            check_output(Path(args.geojson) / f"{Path(p).stem}.geojson", inputs, "--geojson", overwrite=args.overwrite)
    from ..train.checkpoint import model_from_checkpoint, model_payload, native_pixel_size, read_checkpoint

    ckpt = read_checkpoint(args.model)
    if args.box_score:  # in the config, so that Dask workers rebuild the model with it too
        config = dict(ckpt["config"])
        config["model"] = {**dict(config.get("model") or {}), "box_score": args.box_score}
        ckpt = {**ckpt, "config": config}
    model, classes, _ = model_from_checkpoint(ckpt)
    native = native_pixel_size(ckpt)
    if args.pixel_size is not None and native is None:
        raise NapariRmtError(
            f"--pixel-size {args.pixel_size:g}: the model {args.model} does not state the pixel size it was "
            "trained at (train it with --pixel-size), so images cannot be resampled to it; predict without "
            "--pixel-size"
        )
    device = resolve_device(args.device)
    if args.backend == "onnx" and (device.type != "cpu" or args.workers or args.dask_scheduler):
        raise NapariRmtError(
            "--backend onnx runs in this process on the CPU; with "
            + ("--device " + str(device) if device.type != "cpu" else "Dask workers") + " use --backend torch"
        )
    model.to(device)
    for_inference(model, args.backend)
    if args.coco:
        tileset = load_dataset(args)
        classes = _classes_by_name(classes, tileset.classes, args.coco)
        tiles = list(tileset)
    else:
        if not args.paths:
            raise NapariRmtError("give --coco ANN.json or image paths to predict")
        tiles = []
        for i, p in enumerate(args.paths, start=1):
            w, h = open_large_image(p).size if is_zarr_path(p) else image_size(p)
            tiles.append(Tile(id=i, name=Path(p).name, width=w, height=h, path=Path(p)))
    # Images larger than one window (and zarr stores) are predicted window by window
    # and stitched; the rest in batches of whole tiles.
    side = args.window + 2 * args.context
    large = [
        t for t in tiles if not args.coco and (t.width > side or t.height > side or is_zarr_path(t.path))
    ]
    small = [t for t in tiles if t not in large]
    t0 = time.perf_counter()
    said: set = set()
    factors = {t.id: _scale_for(t, args, native, said) for t in tiles}
    if small:
        bar = ProgressBar(len(small), label="predict")
        done = 0
        for factor in sorted({factors[t.id] for t in small}):
            group = [t for t in small if factors[t.id] == factor]
            predict_tiles(
                model,
                group,
                classes,
                batch_size=args.batch_size,
                score_threshold=args.score_threshold,
                nms_iou=args.nms,
                device=device,
                progress=lambda d, n, before=done: bar.update(before + d),
                scale=factor,
            )
            done += len(group)
        bar.close()
    client = None
    if large and (args.workers or args.dask_scheduler):
        from ..model.dask_wholeimage import client_for

        client = client_for(args.dask_scheduler, args.workers or 0)
        print(f"napari-rmt: windows on Dask workers ({client.scheduler_info()['address']})")
    try:
        for t in large:
            image = open_large_image(t.path)
            tissue = _tissue_for(image, args.tissue)
            n_windows = len(tile_grid(image.width, image.height, args.window, args.overlap))
            if tissue is not None:
                from ..model.wholeimage import plan_windows

                plan = plan_windows(image, args.window, args.overlap, args.context, args.batch_size, tissue=tissue)
                print(f"napari-rmt: {t.name}: tissue on {100 * tissue.fraction:.0f} % of the slide; "
                      f"{plan.skipped} of {n_windows} windows are glass and skipped")
                n_windows = plan.n_windows
            bar = ProgressBar(max(1, n_windows), label=f"{t.name[:24]} windows")
            started = time.perf_counter()
            options = dict(
                window=args.window, overlap=args.overlap, context=args.context, batch_size=args.batch_size,
                score_threshold=args.score_threshold, nms_iou=args.nms, tissue=tissue,
                progress=lambda d, n, b=bar, s0=started: b.update(d, eta=(time.perf_counter() - s0) / d * (n - d)),
            )
            if client is not None:
                from ..model.dask_wholeimage import predict_large_image_dask

                # full-precision weights: the same boxes as the single-process path
                t.predictions = predict_large_image_dask(
                    client, model_payload(ckpt, half=False), model_from_checkpoint, image, classes,
                    threads_per_worker=args.threads_per_worker, scale=factors[t.id], **options,
                )
            else:
                t.predictions = predict_large_image(model, image, classes, device=device, scale=factors[t.id], **options)
            bar.close()
            if args.zarr:
                folder = Path(args.zarr)
                folder.mkdir(parents=True, exist_ok=True)
                store = write_boxes_zarr(
                    t.predictions, folder / f"{Path(t.name).stem}.zarr", classes, image.size, source=str(t.path)
                )
                print(f"napari-rmt: {len(t.predictions)} boxes of {t.name} -> {store}")
            if args.geojson:
                from ..data.boxstore import write_whole_image_boxes

                target = Path(args.geojson) / f"{Path(t.name).stem}.geojson"
                target.parent.mkdir(parents=True, exist_ok=True)
                write_whole_image_boxes(target, t.predictions, classes, t.name, image.size, t.path)
                print(f"napari-rmt: {len(t.predictions)} boxes of {t.name} -> {target}")
    finally:
        if client is not None:
            from ..model.dask_wholeimage import close_client

            close_client(client)
    out_set = TileSet(tiles=[], classes=classes)
    for t in tiles:
        out_set.add(
            Tile(id=t.id, name=t.name, width=t.width, height=t.height, path=t.path, predictions=t.predictions)
        )
    if not args.coco:
        # The index first, the results last; each result also names its file, so a crash
        # between the two writes cannot attribute boxes to the wrong image.
        atomic_write_json(
            Path(args.out).with_suffix(".images.json"),
            [{"id": t.id, "file_name": str(t.path), "width": t.width, "height": t.height} for t in tiles],
            indent=1,
        )
    out = write_coco_results(out_set, args.out, file_names=not args.coco)
    n = sum(len(t.predictions) for t in tiles)
    print(f"napari-rmt: {n} boxes on {len(tiles)} images in {time.perf_counter() - t0:.1f} s; wrote {out}")
    return 0

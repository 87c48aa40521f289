"""Whole-image prediction across ``dask.distributed`` workers.

The plan (which windows, in which batches) and the stitching are the single-process
path's (``wholeimage.plan_windows`` / ``_Stitcher``); only the batches' predictions run
elsewhere, one task per batch of windows:

- the model travels once: its payload (fp16 weights, config, classes: a ``model.pt``)
  is scattered to every worker, which builds the detector on first use and keeps it;
- each worker opens the image itself by its path (zarr, TIFF, PNG: a path every worker
  can read, e.g. on a shared file system) and reads only its windows;
- a task that fails (a worker lost, a read error) is retried (``retries``), not the slide;
- results come back as they finish and are stitched in the plan's row-major order, so
  the boxes are exactly those of the single-process path.

``dask.distributed`` is an optional dependency (the ``scale`` extra).
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..data.boxes import Boxes
from ..data.classes import ClassList
from ..data.errors import NapariRmtError
from ..data.large import LargeImage, Window, cached_large_image
from .config import PREDICTION_FLOOR
from .wholeimage import DEFAULT_OBJECTNESS

#: Detectors built on this worker process, by the payload's digest: built once per worker,
#: not per task. Tasks in several threads of one worker share it safely: a prediction's
#: limits are its own call's (``model/options.py``), never set on the model.
_MODELS: dict[str, torch.nn.Module] = {}
_BUILDING = threading.Lock()  # two first tasks build one model, not two


#: Builds the detector from a read model checkpoint: ``train.checkpoint.model_from_checkpoint``
#: in the product, handed down by the front end (this layer does not import training).
ModelBuilder = Callable[[dict[str, Any]], tuple[torch.nn.Module, Any, Any]]


def _worker_model(payload: bytes, digest: str, threads: int, build: ModelBuilder) -> torch.nn.Module:
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    with _BUILDING:
        model = _MODELS.get(digest)
        if model is None:
            ckpt = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            model = build(ckpt)[0].to(_worker_device()).eval()
            _MODELS.clear()  # one model per worker at a time
            _MODELS[digest] = model
    return model


def _worker_device() -> torch.device:
    """The worker's GPU when it sees one (one worker per GPU), else its CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batch_task(
    payload: bytes,
    digest: str,
    image_path: str,
    batch: list[tuple[Window, tuple[int, int, int, int]]],
    limit: int,
    options: dict[str, Any],
) -> list[tuple[Window, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One batch of windows on a worker: the windows' owned boxes."""
    from .wholeimage import detect_options, predict_window_batch

    model = _worker_model(payload, digest, options["threads"], options["build"])
    image = cached_large_image(image_path)
    limits = detect_options(limit, options["objectness"], options["per_cell"])
    return predict_window_batch(
        model, image, batch, options["score_threshold"], options["nms_iou"], _worker_device(), limits,
        options["scale"],
    )


#: How long a client waits for a scheduler that does not answer (distributed's own default is 30 s).
CONNECT_TIMEOUT_S = 10.0


def client_for(scheduler: str | None = None, workers: int = 0):
    """A client of a running scheduler (``ADDRESS``), or of a local cluster of ``workers``
    processes, each running one task at a time (the torch threads per worker are the
    prediction's ``threads_per_worker``); close it with ``close_client``."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise NapariRmtError(
            "prediction across Dask workers needs dask.distributed: pip install 'napari-rmt[scale]'"
        ) from exc
    if scheduler:
        try:
            return Client(scheduler, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            raise NapariRmtError(
                f"--dask-scheduler {scheduler}: no scheduler answered there within {CONNECT_TIMEOUT_S:g} s "
                f"({type(exc).__name__}: {exc}); start one (dask scheduler) or check the address"
            ) from exc
    if workers < 1:
        raise NapariRmtError(f"--workers {workers}: give at least 1 worker")
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    client._napari_rmt_cluster = cluster  # closed with the client by close_client
    return client


def close_client(client) -> None:
    cluster = getattr(client, "_napari_rmt_cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def predict_large_image_dask(
    client,
    model_payload: dict[str, Any],
    build: ModelBuilder,
    image: LargeImage,
    classes: ClassList,
    window: int = 512,
    overlap: int = 0,
    context: int = 128,
    batch_size: int = 4,
    score_threshold: float = PREDICTION_FLOOR,
    nms_iou: float = 0.5,
    objectness: float | None = DEFAULT_OBJECTNESS,
    per_cell: int | None = None,
    threads_per_worker: int = 1,
    retries: int = 2,
    scale: float = 1.0,
    tissue=None,
    progress: Callable[[int, int], None] | None = None,
) -> Boxes:
    """``wholeimage.predict_large_image`` with the batches computed by ``client``'s workers.

    ``model_payload`` is a checkpoint dict (``checkpoint.model_payload`` or a read
    ``model.pt``) and ``build`` makes the detector of it on each worker (a module-level
    function: it travels by name); ``image`` must have been opened from a path the
    workers can read.
    """
    from distributed import as_completed

    from .wholeimage import plan_windows, stitched_boxes

    if image.path is None:
        raise NapariRmtError(
            f"{image.name}: has no file path; Dask workers read the image themselves, so it must be "
            "a file (zarr, TIFF, PNG) they can reach"
        )
    buf = io.BytesIO()
    torch.save({k: v for k, v in model_payload.items() if k != "_path"}, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    plan = plan_windows(image, window, overlap, context, batch_size, tissue=tissue)
    options = {
        "score_threshold": score_threshold, "nms_iou": nms_iou, "threads": threads_per_worker,
        "objectness": objectness, "per_cell": per_cell, "build": build, "scale": scale,
    }
    # the model goes to every worker once; each task carries only its windows
    [sent] = client.scatter([payload], broadcast=True, hash=False)
    futures = {
        client.submit(
            _batch_task, sent, digest, str(image.path), batch, plan.limit, options,
            retries=retries, pure=False, key=f"napari-rmt-windows-{digest[:8]}-{i}",
        ): i
        for i, batch in enumerate(plan.batches)
    }
    stitcher = plan.stitcher(nms_iou)
    results: dict[int, list] = {}
    next_batch = done = 0
    try:
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            done += len(plan.batches[i])
            # stitched in the plan's order as soon as the next batch in line is in
            while next_batch in results:
                for found in results.pop(next_batch):
                    stitcher.add(*found)
                next_batch += 1
            if progress is not None:
                progress(done, plan.n_windows)
    finally:
        client.cancel(list(futures))
    return stitched_boxes(stitcher, classes)

"""Rebuild ``sample_data/`` from the CoNSeP patches in ``../shared/data/consep``.

Kept in the repository so the provenance of the bundled sample is reproducible:
16 training patches (4 from each of 4 source tiles) that all show tumor, stromal and
lymphocyte nuclei, with CoNSeP's classes renamed to the paper's (epithelial -> tumor,
spindle -> stromal, inflammatory -> lymphocyte, miscellaneous -> other).

    python scripts/make_sample.py [--data ../shared/data/consep] [--out sample_data]
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
from pathlib import Path

RENAME = {"epithelial": "tumor", "spindle": "stromal", "inflammatory": "lymphocyte", "miscellaneous": "other"}
NEW_IDS = {"tumor": 1, "stromal": 2, "lymphocyte": 3, "other": 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(Path(__file__).parents[2] / "shared" / "data" / "consep"))
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "sample_data"))
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    coco = json.loads((data / "annotations.json").read_text())
    cat_name = {c["id"]: RENAME[c["name"]] for c in coco["categories"]}
    per_image: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for a in coco["annotations"]:
        per_image[a["image_id"]][cat_name[a["category_id"]]] += 1

    def ok(img: dict) -> bool:
        c = per_image[img["id"]]
        return img["source_split"] == "train" and all(c[k] >= 3 for k in ("tumor", "stromal", "lymphocyte"))

    by_tile: dict[str, list[dict]] = collections.defaultdict(list)
    for img in coco["images"]:
        if ok(img):
            by_tile[img["source_tile"]].append(img)
    tiles = sorted((t for t in by_tile if len(by_tile[t]) >= 4), key=lambda t: -len(by_tile[t]))[:4]
    chosen = [img for t in sorted(tiles) for img in sorted(by_tile[t], key=lambda i: i["patch_index"])[:4]]
    chosen_ids = {img["id"] for img in chosen}

    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for new_id, img in enumerate(chosen, start=1):
        shutil.copy(data / img["file_name"], out / "images" / Path(img["file_name"]).name)
        rec = dict(img, id=new_id, file_name="images/" + Path(img["file_name"]).name)
        rec["consep_image_id"] = img["id"]
        images.append(rec)
    remap = {img["id"]: i for i, img in enumerate(chosen, start=1)}
    for a in coco["annotations"]:
        if a["image_id"] in chosen_ids:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": remap[a["image_id"]],
                    "category_id": NEW_IDS[cat_name[a["category_id"]]],
                    "bbox": a["bbox"],
                    "area": a["area"],
                    "iscrowd": 0,
                    "touches_border": a["touches_border"],
                }
            )
    sample = {
        "info": {
            "description": "napari-rmt sample: 16 CoNSeP patches (Graham et al., Medical Image "
            "Analysis 2019), classes renamed to the paper's; research use only",
            "version": "1.0",
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "cell"} for n, i in NEW_IDS.items()],
    }
    (out / "annotations.json").write_text(json.dumps(sample, indent=1))
    print(f"{len(images)} images from tiles {tiles}, {len(annotations)} boxes -> {out}")


if __name__ == "__main__":
    main()

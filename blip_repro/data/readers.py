"""Readers for the datasets' official on-disk formats. Each returns plain dict records with stable ids.

`limit` takes the first N records in file order. Missing or malformed files raise a one-line UserError naming the
file; images are checked lazily by `load_image`, which names the path of a missing or corrupt image.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from blip_repro.data import data_root
from blip_repro.errors import UserError

# dataset -> where its files live under $BLIP_REPRO_DATA (the names the official downloads use)
LAYOUT = {
    # image paths in the annotation files are relative to these folders ("val2014/COCO_val2014_...jpg",
    # "flickr30k-images/...jpg"), as in BLIP's configs; blip_repro.data.download unpacks to the same places
    "coco": {"images": "coco", "annotations": "coco/annotations"},
    "flickr30k": {"images": "flickr30k", "annotations": "flickr30k/annotations"},
    "nocaps": {"images": "nocaps", "annotations": "nocaps/annotations"},
    "shapes": {"images": "shapes/images", "annotations": "shapes/annotations"},
}


def read_json(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing file {path}; run `blip-repro download {_dataset_of(path)}` "
                        f"(data root $BLIP_REPRO_DATA={data_root()})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: malformed JSON ({e}); delete it and download it again") from None


def _dataset_of(path: Path) -> str:
    try:
        return path.resolve().relative_to(data_root()).parts[0]
    except (ValueError, IndexError):
        return "<dataset>"


def image_id_from_file(name: str) -> int:
    """COCO-style numeric id from a file name: `val2014/COCO_val2014_000000391895.jpg` -> 391895."""
    m = re.search(r"(\d+)\.\w+$", name)
    if not m:
        raise UserError(f"cannot read a numeric image id from file name {name!r}")
    return int(m.group(1))


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"missing image {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"corrupt image {path} ({type(e).__name__}); re-download or remove it") from None


def dataset_paths(dataset: str) -> tuple[Path, Path]:
    if dataset not in LAYOUT:
        raise UserError(f"unknown dataset {dataset!r}; valid: {', '.join(LAYOUT)}")
    root = data_root()
    if dataset == "shapes":  # built in: written on first use, so it is never "missing"
        from blip_repro.data import shapes

        shapes.generate(root / "shapes")
    return root / LAYOUT[dataset]["images"], root / LAYOUT[dataset]["annotations"]


def read_karpathy_captions(ann_file: str | Path, image_root: str | Path, gt_file: str | Path | None = None,
                           limit: int | None = None) -> list[dict]:
    """COCO-Karpathy caption split as BLIP/LAVIS distribute it: a list of {"image", "caption": [...]}.

    For val/test the references come from the COCO-format `_gt.json` file when given, as BLIP scored them
    (protocols.md §1.4). Records: {"image_id": int, "image": Path, "captions": [str, ...]}.
    """
    anns = read_json(ann_file)
    if not isinstance(anns, list) or (anns and not isinstance(anns[0], dict)):
        raise UserError(f"{ann_file}: expected a JSON list of {{'image', 'caption'}} records")
    refs = None
    if gt_file is not None:
        gt = read_json(gt_file)
        if "annotations" not in gt:
            raise UserError(f"{gt_file}: not a COCO-format caption file (no 'annotations')")
        refs = {}
        for a in gt["annotations"]:
            refs.setdefault(int(a["image_id"]), []).append(a["caption"])
    records, seen = [], set()
    for i, a in enumerate(anns):
        if "image" not in a or "caption" not in a:
            raise UserError(f"{ann_file}: record {i} lacks 'image' or 'caption'")
        image_id = image_id_from_file(a["image"])
        if image_id in seen:
            raise UserError(f"{ann_file}: image {a['image']} is listed twice")
        seen.add(image_id)
        caps = a["caption"] if isinstance(a["caption"], list) else [a["caption"]]
        if refs is not None:
            if image_id not in refs:
                raise UserError(f"{gt_file}: no reference captions for image id {image_id} ({a['image']})")
            caps = refs[image_id]
        records.append({"image_id": image_id, "image": Path(image_root) / a["image"], "captions": caps})
        if limit and len(records) >= limit:
            break
    return records


def read_caption_train(ann_file: str | Path, image_root: str | Path, limit: int | None = None) -> list[dict]:
    """Training pairs. Accepts BLIP's train format (one caption per record: {"image", "caption", ...}) and a
    user's own JSON list of {"image", "caption"} (the BLIP pre-training format); image paths are relative to
    `image_root` unless absolute. Records: {"image": Path, "caption": str}."""
    anns = read_json(ann_file)
    if not isinstance(anns, list):
        raise UserError(f"{ann_file}: expected a JSON list of {{'image', 'caption'}} records")
    out = []
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or not isinstance(a.get("image"), str) or not isinstance(a.get("caption"), str):
            raise UserError(f"{ann_file}: record {i} needs string 'image' and 'caption' fields")
        out.append({"image": Path(image_root) / a["image"], "caption": a["caption"]})
        if limit and len(out) >= limit:
            break
    return out


def read_nocaps(ann_file: str | Path, image_root: str | Path, limit: int | None = None) -> list[dict]:
    """NoCaps val/test as BLIP distributes it ({"image", "img_id"} records); references are scored on the official
    server (protocols.md §1.4), so records carry no captions."""
    anns = read_json(ann_file)
    out = []
    for i, a in enumerate(anns):
        if "image" not in a or "img_id" not in a:
            raise UserError(f"{ann_file}: record {i} lacks 'image' or 'img_id'")
        out.append({"image_id": int(a["img_id"]), "image": Path(image_root) / a["image"], "captions": []})
        if limit and len(out) >= limit:
            break
    return out

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


# Sherlock (Hessel et al. 2022) as the seed project lays it out: sherlock_dataset/*.json, vcr1images/<movie>/...,
# vg/images/VG_100K{,_2}/... under one root.
LAYOUT["sherlock"] = {"images": "sherlock", "annotations": "sherlock/sherlock_dataset"}


def read_caption_refs(ann_file: str | Path, image_root: str | Path, limit: int | None = None) -> list[dict]:
    """Your own held-out captions for evaluation: a JSON list of {"image", "caption"} where "caption" is one string or
    a list, and an image may appear in several records (the training format works as is). One record per image, in
    order of first appearance: {"image_id": the "image" string, "image": Path, "captions": [every caption]};
    `limit` keeps the first N images."""
    anns = read_json(ann_file)
    if not isinstance(anns, list):
        raise UserError(f"{ann_file}: expected a JSON list of {{'image', 'caption'}} records")
    by_image: dict[str, dict] = {}
    for i, a in enumerate(anns):
        caps = a.get("caption") if isinstance(a, dict) else None
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(a, dict) or not isinstance(a.get("image"), str) or not caps or \
                not all(isinstance(c, str) for c in caps):
            raise UserError(f"{ann_file}: record {i} needs a string 'image' and a 'caption' string or list of strings")
        if a["image"] not in by_image:
            if limit and len(by_image) >= limit:
                continue
            by_image[a["image"]] = {"image_id": a["image"], "image": Path(image_root) / a["image"], "captions": []}
        by_image[a["image"]]["captions"].extend(caps)
    return list(by_image.values())


def read_sherlock(ann_file: str | Path, image_root: str | Path, limit: int | None = None) -> list[dict]:
    """Sherlock v1.1 records ({"inputs": {"image": {"url"}, "bboxes", "clue", ...}, "targets": {"inference"},
    "instance_id"}) -> {"instance_id", "image": Path, "boxes": [(left, top, width, height)], "clue", "inference"}.
    Image URLs map to local files as the seed does: .../vcr1images/<movie>/<file> -> <root>/vcr1images/<movie>/<file>,
    Visual Genome .../<VG_100K|VG_100K_2>/<file> -> <root>/vg/images/<folder>/<file>."""
    anns = read_json(ann_file)
    if not isinstance(anns, list):
        raise UserError(f"{ann_file}: expected the Sherlock JSON list of {{'inputs', 'targets'}} records")
    out = []
    for i, a in enumerate(anns):
        try:
            inp, url = a["inputs"], a["inputs"]["image"]["url"]
            boxes = [(b["left"], b["top"], b["width"], b["height"]) for b in inp["bboxes"]]
            rec = {"instance_id": a["instance_id"], "clue": inp["clue"], "inference": a["targets"]["inference"]}
        except (KeyError, TypeError) as e:
            raise UserError(f"{ann_file}: record {i} is not in the Sherlock format (missing {e})") from None
        parts = url.split("/")
        rel = Path(*parts[-3:]) if len(parts) >= 3 and parts[-3] == "vcr1images" else Path("vg/images", *parts[-2:])
        out.append({**rec, "image": Path(image_root) / rel, "boxes": boxes})
        if limit and len(out) >= limit:
            break
    return out


def highlight_regions(image: Image.Image, boxes) -> Image.Image:
    """Sherlock's region cue: each (left, top, width, height) box tinted translucent pink with a green outline."""
    from PIL import ImageDraw

    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for left, top, width, height in boxes:
        draw.rectangle([left, top, left + width, top + height], fill=(255, 5, 205, 60), outline=(5, 255, 55, 255),
                       width=3)
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


# --- VQA: VQAv2, OK-VQA (the VQA format) and GQA (protocols.md §2.2) -----------------------------------------------
# VQAv2 and OK-VQA images are COCO's; the shapes copies mirror the real files under shapes/ (data/shapes.py).
LAYOUT.update({
    "vqav2": {"images": "coco", "annotations": "vqav2"},
    "okvqa": {"images": "coco", "annotations": "okvqa"},
    "gqa": {"images": "gqa/images", "annotations": "gqa"},
    "shapes-vqav2": {"images": "shapes/images", "annotations": "shapes/vqav2"},
    "shapes-okvqa": {"images": "shapes/images", "annotations": "shapes/okvqa"},
    "shapes-gqa": {"images": "shapes/images", "annotations": "shapes/gqa"},
})
# (benchmark, split) -> (questions file, annotations file or None: scored on the official server)
VQA_FILES = {
    ("vqav2", "train"): ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json"),
    ("vqav2", "val"): ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"),
    ("vqav2", "test-dev"): ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None),
    ("vqav2", "test"): ("v2_OpenEnded_mscoco_test2015_questions.json", None),
    # OK-VQA's paper "test" split is its val2014 file (protocols.md §2.2)
    ("okvqa", "train"): ("OpenEnded_mscoco_train2014_questions.json", "mscoco_train2014_annotations.json"),
    ("okvqa", "test"): ("OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json"),
    ("gqa", "train"): ("train_balanced_questions.json", None),
    ("gqa", "val"): ("val_balanced_questions.json", None),
    ("gqa", "test-dev"): ("testdev_balanced_questions.json", None),
}


def vqa_benchmark(dataset: str) -> str:
    """vqav2 | okvqa | gqa for a real dataset name or its shapes copy (shapes-vqav2, ...)."""
    name = dataset.removeprefix("shapes-")
    if name not in ("vqav2", "okvqa", "gqa"):
        raise UserError(f"dataset {dataset!r} is not a VQA dataset; use one of vqav2, okvqa, gqa, shapes-vqav2, "
                        "shapes-okvqa, shapes-gqa")
    return name


def vqa_paths(dataset: str, split: str) -> tuple[Path, Path | None, Path]:
    """(questions file, annotations file or None, image root) of a VQA dataset split; shapes is written on first use."""
    bench = vqa_benchmark(dataset)
    if (bench, split) not in VQA_FILES:
        valid = ", ".join(s for b, s in VQA_FILES if b == bench)
        raise UserError(f"dataset {dataset}: unknown split {split!r}; valid splits: {valid}")
    root = data_root()
    if dataset.startswith("shapes-"):
        from blip_repro.data import shapes

        shapes.generate(root / "shapes")
    questions, annotations = VQA_FILES[(bench, split)]
    folder = root / LAYOUT[dataset]["annotations"]
    return folder / questions, (folder / annotations if annotations else None), root / LAYOUT[dataset]["images"]


def _vqa_image(image_root: Path, subtype: str, image_id: int, shapes_format: bool) -> Path:
    folder = "test2015" if subtype.startswith("test-dev") else subtype  # test-dev2015 images live in test2015/
    prefix = "shapes" if shapes_format else "COCO"
    return Path(image_root) / folder / f"{prefix}_{folder}_{image_id:012d}.jpg"


def _vqa_annotations(ann_file: Path) -> dict:
    data = read_json(ann_file)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserError(f"{ann_file}: not a VQA annotation file (no 'annotations' list)")
    out = {}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "question_id" not in a or not isinstance(a.get("answers"), list):
            raise UserError(f"{ann_file}: annotation {i} needs 'question_id' and an 'answers' list")
        answers = [x.get("answer") if isinstance(x, dict) else None for x in a["answers"]]
        if not answers or not all(isinstance(x, str) for x in answers):
            raise UserError(f"{ann_file}: question_id {a['question_id']} has answers that are not "
                            f"{{'answer': str}} records")
        if a["question_id"] in out:
            raise UserError(f"{ann_file}: question_id {a['question_id']} is annotated twice")
        out[a["question_id"]] = {"answers": answers, "answer_type": a.get("answer_type"),
                                 "question_type": a.get("question_type"),
                                 "multiple_choice_answer": a.get("multiple_choice_answer")}
    return out


def read_vqa(questions_file: str | Path, annotations_file: str | Path | None, image_root: str | Path,
             limit: int | None = None, shapes_format: bool = False) -> list[dict]:
    """VQAv2 / OK-VQA question (+ annotation) files in the official format. OK-VQA's 5 answers are stored twice
    in its 10 slots, and kept so (the accuracy formula depends on it, protocols.md §3). Records:
    {"question_id", "image_id", "image": Path, "question", "answers": [str] ([] without annotations),
    "answer_type", "question_type", "multiple_choice_answer"}. Image paths follow the COCO file names of the
    file's data_subtype (test-dev2015 questions use test2015/ images); `shapes_format` for the shapes copies."""
    data = read_json(questions_file)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise UserError(f"{questions_file}: not a VQA question file (no 'questions' list)")
    subtype = data.get("data_subtype")
    if not isinstance(subtype, str):
        raise UserError(f"{questions_file}: no 'data_subtype' (e.g. val2014), so the image folder is unknown")
    anns = _vqa_annotations(Path(annotations_file)) if annotations_file else None
    out, seen = [], set()
    for i, q in enumerate(data["questions"]):
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= set(q):
            raise UserError(f"{questions_file}: question {i} needs 'question_id', 'image_id' and 'question'")
        qid = q["question_id"]
        if qid in seen:
            raise UserError(f"{questions_file}: question_id {qid} is listed twice")
        seen.add(qid)
        rec = {"question_id": qid, "image_id": q["image_id"], "question": q["question"],
               "image": _vqa_image(Path(image_root), subtype, int(q["image_id"]), shapes_format), "answers": [],
               "answer_type": None, "question_type": None, "multiple_choice_answer": None}
        if anns is not None:
            if qid not in anns:
                raise UserError(f"{annotations_file}: no annotation for question_id {qid} of {questions_file}")
            rec.update(anns[qid])
        out.append(rec)
        if limit and len(out) >= limit:
            break
    return out


def read_gqa(questions_file: str | Path, image_root: str | Path, limit: int | None = None,
             shapes_format: bool = False) -> list[dict]:
    """GQA balanced questions ({question id: {"imageId", "question", "answer", "types"}}). Records:
    {"question_id": str, "image_id", "image": Path, "question", "answer", "question_type" (types.detailed),
    "structural_type" (types.structural, absent in shapes)}. Images are <root>/<imageId>.jpg
    (shapes: <root>/<split>/<imageId>.jpg)."""
    data = read_json(questions_file)
    if not isinstance(data, dict):
        raise UserError(f"{questions_file}: not a GQA question file (expected a mapping of question ids)")
    out = []
    for qid, q in data.items():
        if not isinstance(q, dict) or not isinstance(q.get("imageId"), str) or not isinstance(q.get("question"), str):
            raise UserError(f"{questions_file}: question {qid} needs string 'imageId' and 'question'")
        if "answer" in q and not isinstance(q["answer"], str):
            raise UserError(f"{questions_file}: question {qid} has the answer {q['answer']!r}, not a string")
        image = q["imageId"]
        sub = Path(image.split("_")[1], f"{image}.jpg") if shapes_format else Path(f"{image}.jpg")
        types = q.get("types") or {}
        out.append({"question_id": str(qid), "image_id": image, "image": Path(image_root) / sub,
                    "question": q["question"], "answer": q.get("answer"), "question_type": types.get("detailed"),
                    "structural_type": types.get("structural")})
        if limit and len(out) >= limit:
            break
    return out


def read_answer_list(path: str | Path) -> list[str]:
    """BLIP's VQA answer list (answer_list.json: a JSON list of distinct answer strings; 3,128 for VQAv2)."""
    answers = read_json(path)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise UserError(f"{path}: not an answer list (expected a non-empty JSON list of answer strings)")
    if len(set(answers)) != len(answers):
        dup = next(a for a in answers if answers.count(a) > 1)
        raise UserError(f"{path}: the answer {dup!r} is listed twice")
    return answers


def read_retrieval(ann_file: str | Path, image_root: str | Path, limit: int | None = None) -> dict:
    """A Karpathy retrieval test split as BLIP distributes it (`coco_karpathy_test.json`, `flickr30k_test.json`): a
    list of {"image", "caption": [...]}. Captions are numbered in file order, as BLIP's retrieval datasets do, so the
    maps match its `txt2img` / `img2txt` (protocols.md §1.2). COCO's 5k test images have 5 to 7 captions (25,010 in
    all): unequal lists are normal. `limit` keeps the first N images and their captions.

    Returns {"images": [Path], "image_files": [str as in the file], "texts": [str], "txt2img": [int],
    "img2txt": [[int]]}."""
    anns = read_json(ann_file)
    if not isinstance(anns, list) or not anns:
        raise UserError(f"{ann_file}: expected a non-empty JSON list of {{'image', 'caption': [...]}} records")
    out = {"images": [], "image_files": [], "texts": [], "txt2img": [], "img2txt": []}
    first_seen: dict[str, int] = {}
    for i, a in enumerate(anns[:limit] if limit else anns):
        caps = a.get("caption") if isinstance(a, dict) else None
        if not isinstance(a, dict) or not isinstance(a.get("image"), str) or not isinstance(caps, (list, str)):
            raise UserError(f"{ann_file}: record {i} needs a string 'image' and a 'caption' list")
        caps = [caps] if isinstance(caps, str) else caps
        if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise UserError(f"{ann_file}: record {i} ({a['image']}) has an empty caption list or a non-text caption")
        if a["image"] in first_seen:
            raise UserError(f"{ann_file}: image {a['image']} is listed twice (records {first_seen[a['image']]} "
                            f"and {i}); each image must appear once with all its captions")
        first_seen[a["image"]] = i
        img = len(out["images"])
        out["images"].append(Path(image_root) / a["image"])
        out["image_files"].append(a["image"])
        out["img2txt"].append(list(range(len(out["texts"]), len(out["texts"]) + len(caps))))
        out["texts"].extend(caps)
        out["txt2img"].extend([img] * len(caps))
    return out

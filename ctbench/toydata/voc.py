"""Toy Pascal VOC 2007 + 2012: the same scenes as the toy COCO, in the VOCdevkit layout.

    VOC2007/JPEGImages/000001.jpg   VOC2007/Annotations/000001.xml
    VOC2007/ImageSets/Main/{trainval,train,val,test}.txt
    VOC2012/JPEGImages/2012_000001.jpg ...   VOC2012/ImageSets/Main/{trainval,train,val}.txt

Annotations carry VOC's fields (``size``, per object ``name``, ``pose``, ``truncated``, ``difficult``, 1-based
inclusive ``bndbox``) and all 20 class names; ``difficult`` marks objects less than half inside the image. Every
class has non-difficult objects in VOC2007 test (objects are dealt in shuffled rounds of the 20 classes, and the
images holding a class's first object are not truncated), so each class's AP is defined in
``PascalVOCDetectionEvaluator`` even for the tiny test set.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ctbench.toydata import objects

# (directory, split, count key, file-id format)
SPLITS = (("VOC2007", "trainval", "trainval2007", "{:06d}"), ("VOC2007", "test", "test2007", "{:06d}"),
          ("VOC2012", "trainval", "trainval2012", "2012_{:06d}"))
DIFFICULT_BELOW = 0.5  # visible fraction under which an object is marked difficult


def make_dirs(base: Path, counts: dict) -> None:
    for year in ("VOC2007", "VOC2012"):
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (base / year / sub).mkdir(parents=True, exist_ok=True)


def jobs(base: Path, counts: dict, seed: int) -> list[tuple]:
    out = []
    next_id = {"VOC2007": 1, "VOC2012": 1}
    for s, (year, split, key, fmt) in enumerate(SPLITS):
        n = counts[key]
        rng = np.random.default_rng(np.random.SeedSequence([seed, 3, s, 1 << 20]))
        min_objects = math.ceil(len(objects.VOC_CLASSES) / n) if split == "test" else 1
        schedule = objects.class_schedule(rng, n, objects.VOC_CLASSES, min_objects, 4, person_first=0.0)
        seen: set[str] = set()
        for i, names in enumerate(schedule):
            keep_whole = len(names) if not seen.issuperset(names) else 0
            seen.update(names)
            file_id = fmt.format(next_id[year])
            next_id[year] += 1
            out.append((base / year, file_id, (seed, 3, s, i), names, keep_whole, split))
    return out


def write_image(job: tuple) -> dict:
    root, file_id, words, names, keep_whole, split = job
    jpeg, w, h, instances = objects.render_scene(np.random.default_rng(np.random.SeedSequence(list(words))), names,
                                                 no_truncation=keep_whole)
    (root / "JPEGImages" / f"{file_id}.jpg").write_bytes(jpeg)
    (root / "Annotations" / f"{file_id}.xml").write_text(annotation_xml(root.name, file_id, w, h, instances))
    return {"year": root.name, "id": file_id, "split": split}


def annotation_xml(year: str, file_id: str, w: int, h: int, instances: list[objects.Instance]) -> str:
    objs = []
    for inst in instances:
        x0, y0, x1, y1 = inst.bbox
        box = (max(1, math.floor(x0) + 1), max(1, math.floor(y0) + 1), min(w, math.ceil(x1)), min(h, math.ceil(y1)))
        objs.append(
            "\t<object>\n"
            f"\t\t<name>{inst.name}</name>\n\t\t<pose>{inst.pose}</pose>\n"
            f"\t\t<truncated>{int(inst.truncated)}</truncated>\n"
            f"\t\t<difficult>{int(inst.extra['visible'] < DIFFICULT_BELOW)}</difficult>\n"
            "\t\t<bndbox>\n"
            + "".join(f"\t\t\t<{k}>{v}</{k}>\n" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
            + "\t\t</bndbox>\n\t</object>\n")
    return ("<annotation>\n"
            f"\t<folder>{year}</folder>\n\t<filename>{file_id}.jpg</filename>\n"
            f"\t<source>\n\t\t<database>ctbench toy {year} (synthetic)</database>\n"
            "\t\t<annotation>ctbench.toydata</annotation>\n\t\t<image>synthetic</image>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            "\t<segmented>0</segmented>\n" + "".join(objs) + "</annotation>\n")


def write_meta(base: Path, counts: dict, results: list[dict]) -> None:
    """ImageSets/Main lists; trainval is also split into train / val (alternate images), as VOC ships them."""
    for year in ("VOC2007", "VOC2012"):
        main = base / year / "ImageSets" / "Main"
        for split in ("trainval", "test"):
            ids = [r["id"] for r in results if r["year"] == year and r["split"] == split]
            if not ids:
                continue
            (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
            if split == "trainval":
                (main / "train.txt").write_text("".join(f"{i}\n" for i in ids[0::2]))
                (main / "val.txt").write_text("".join(f"{i}\n" for i in ids[1::2]))

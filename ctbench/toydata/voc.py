"""Toy Pascal VOC 2007 + 2012: the same scenes as the toy COCO, in the VOCdevkit layout.

    VOC2007/JPEGImages/000001.jpg   VOC2007/Annotations/000001.xml
    VOC2007/ImageSets/Main/{trainval,train,val,test}.txt     + <class>_{trainval,train,val,test}.txt per class
    VOC2012/JPEGImages/2012_000001.jpg ...   VOC2012/ImageSets/Main/{trainval,train,val}.txt (+ per class)
    VOC2012/SegmentationClass/2012_000001.png   VOC2012/SegmentationClassAug/2012_000001.png
    VOC2012/ImageSets/Segmentation/{train,val,trainval,train_aug}.txt

Annotations carry VOC's fields (``size``, per object ``name``, ``pose``, ``truncated``, ``difficult``, 1-based
inclusive ``bndbox``) and all 20 class names; ``difficult`` marks objects less than half inside the image. Every
class has non-difficult objects in VOC2007 test (objects are dealt in shuffled rounds of the 20 classes, and the
images holding a class's first object are not truncated), so each class's AP is defined in
``PascalVOCDetectionEvaluator`` even for the tiny test set.

Per-class image lists (``ImageSets/Main/<class>_<split>.txt``, what the VOC07 classification benchmark reads) hold
one ``<id> <label>`` line per image of the split, as VOC ships them: ``1`` the class is present (an object that is
not difficult), ``0`` only difficult objects of the class, ``-1`` absent.

Semantic segmentation (VOC2012, every trainval image is segmented): class-index masks drawn from the same polygons
as the boxes, in drawing order (a later object covers an earlier one), 0 background, 1-20 the classes in VOC's order,
a one-pixel 255 ("void") outline along every object's outer boundary as VOC draws it; saved as palette PNGs in VOC's
colour map, in ``SegmentationClass/`` and, as the SBD-augmented release used for training is laid out,
``SegmentationClassAug/``.
``train`` / ``val`` are the Main train / val halves of VOC2012 trainval; ``train_aug`` (VOC2012 train + SBD in the
real release, 10,582 images) is ``train`` here, since there is no toy SBD.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ctbench.toydata import objects

# (directory, split, count key, file-id format)
SPLITS = (("VOC2007", "trainval", "trainval2007", "{:06d}"), ("VOC2007", "test", "test2007", "{:06d}"),
          ("VOC2012", "trainval", "trainval2012", "2012_{:06d}"))
DIFFICULT_BELOW = 0.5  # visible fraction under which an object is marked difficult
SEGMENTED = ("VOC2012",)  # years whose images get segmentation masks
VOID = 255  # VOC's label of object outlines and unlabelled pixels (ignored by the evaluation)


def voc_colormap(n: int = 256) -> list[int]:
    """VOC's palette (VOCdevkit ``VOClabelcolormap``): the bits of the label index spread over R, G, B, high bits
    first; flat ``[r0, g0, b0, r1, ...]`` as ``Image.putpalette`` takes it."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


PALETTE = voc_colormap()


def segmentation_mask(w: int, h: int, instances: list[objects.Instance]) -> Image.Image:
    """Class-index mask ("P" mode, VOC palette) of the instances in drawing order; the outer boundary of each
    object (its pixels with a neighbour outside it) is 255, as VOC outlines objects."""
    out = np.zeros((h, w), np.uint8)
    for inst in instances:
        m = Image.new("L", (w, h), 0)
        d = ImageDraw.Draw(m)
        for p in inst.polygons:
            d.polygon([(float(x), float(y)) for x, y in p], fill=255)
        inside = np.asarray(m) > 0
        interior = np.asarray(m.filter(ImageFilter.MinFilter(3))) > 0  # eroded by one pixel
        out[inside] = objects.VOC_CLASSES.index(inst.name) + 1
        out[inside & ~interior] = VOID
    mask = Image.fromarray(out, mode="P")
    mask.putpalette(PALETTE)
    return mask


def make_dirs(base: Path, counts: dict) -> None:
    for year in ("VOC2007", "VOC2012"):
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (base / year / sub).mkdir(parents=True, exist_ok=True)
    for year in SEGMENTED:
        for sub in ("SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
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
    segmented = root.name in SEGMENTED
    (root / "JPEGImages" / f"{file_id}.jpg").write_bytes(jpeg)
    (root / "Annotations" / f"{file_id}.xml").write_text(annotation_xml(root.name, file_id, w, h, instances,
                                                                        segmented))
    if segmented:
        mask = segmentation_mask(w, h, instances)
        for sub in ("SegmentationClass", "SegmentationClassAug"):
            mask.save(root / sub / f"{file_id}.png", format="PNG")
    labels = {}  # class -> 1 (an object that is not difficult), 0 (only difficult objects); absent: -1
    for inst in instances:
        difficult = inst.extra["visible"] < DIFFICULT_BELOW
        labels[inst.name] = max(labels.get(inst.name, 0), 0 if difficult else 1)
    return {"year": root.name, "id": file_id, "split": split, "labels": labels}


def annotation_xml(year: str, file_id: str, w: int, h: int, instances: list[objects.Instance],
                   segmented: bool = False) -> str:
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
            f"\t<segmented>{int(segmented)}</segmented>\n" + "".join(objs) + "</annotation>\n")


def write_meta(base: Path, counts: dict, results: list[dict]) -> None:
    """ImageSets/Main lists (trainval is also split into train / val, alternate images, as VOC ships them), the
    per-class lists, and the segmentation lists."""
    for year in ("VOC2007", "VOC2012"):
        main = base / year / "ImageSets" / "Main"
        for split in ("trainval", "test"):
            rows = [r for r in results if r["year"] == year and r["split"] == split]
            if not rows:
                continue
            parts = {split: rows} if split == "test" else {"trainval": rows, "train": rows[0::2], "val": rows[1::2]}
            for name, part in parts.items():
                (main / f"{name}.txt").write_text("".join(f"{r['id']}\n" for r in part))
                for cls in objects.VOC_CLASSES:
                    (main / f"{cls}_{name}.txt").write_text(
                        "".join(f"{r['id']} {r['labels'].get(cls, -1):2d}\n" for r in part))
            if year in SEGMENTED and split == "trainval":
                seg = base / year / "ImageSets" / "Segmentation"
                for name, part in {**parts, "train_aug": parts["train"]}.items():
                    (seg / f"{name}.txt").write_text("".join(f"{r['id']}\n" for r in part))

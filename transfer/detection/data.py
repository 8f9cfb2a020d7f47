"""Dataset names for the detection and segmentation tasks, bound to a data root chosen at run time.

detectron2 registers its builtin names (``coco_2017_train``, ``voc_2007_test``, ...) once, when ``detectron2.data``
is first imported, with ``$DETECTRON2_DATASETS`` as it was then. The launcher takes ``--data-root`` (default
``$DETECTRON2_DATASETS`` now, or ``./datasets``) and re-registers the names a config uses with that root, so a
test that generates toy data in a temporary directory, or a user who changes the variable, gets the right files.
Same layouts, same names, same metadata as detectron2's builtin registration.

PASCAL VOC semantic segmentation (detectron2 has no builtin VOC segmentation names; ours, registered here)::

    voc_2012_seg_train_aug   VOC2012/ImageSets/Segmentation/train_aug.txt  ->  VOC2012/JPEGImages/<id>.jpg
                             + VOC2012/SegmentationClassAug/<id>.png  (VOC2012 train + SBD: 10,582 images)
    voc_2012_seg_val         VOC2012/ImageSets/Segmentation/val.txt        ->  VOC2012/JPEGImages/<id>.jpg
                             + VOC2012/SegmentationClass/<id>.png     (VOC's own val masks: 1,449 images)

Labels are class-index PNGs (VOC's palette masks, or the grey ones of the SBD-augmented release), 0 background,
1-20 VOC's classes in detectron2's order, 255 void (ignored); metadata ``stuff_classes`` (21), ``ignore_label`` 255,
``evaluator_type`` ``sem_seg``.

The registered loaders check what they read in the main process, before any data-loader worker starts: an empty
or unparseable annotation file (COCO JSON or VOC XML), an XML without its size or box fields, an unknown class, a
missing image file, a box that is not finite, has a negative size or lies outside its image, or a split without
images -> one :class:`UserError` naming the file (and the first offenders), never a crash deep in a worker. The
segmentation loaders check that every listed id has its image and its label PNG.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin import _PREDEFINED_SPLITS_COCO
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.coco import load_coco_json, register_coco_instances
from detectron2.data.datasets.pascal_voc import CLASS_NAMES, load_voc_instances, register_pascal_voc
from detectron2.structures import BoxMode

from ctbench.errors import UserError

_COCO = {name: (kind, image_root, json_file) for kind, splits in _PREDEFINED_SPLITS_COCO.items()
         for name, (image_root, json_file) in splits.items()}
_VOC = {f"voc_{year}_{split}": (f"VOC{year}", split, year)
        for year in (2007, 2012) for split in ("trainval", "train", "val", "test") if (year, split) != (2012, "test")}
# name -> (directory, ImageSets/Segmentation split, label directory)
VOC_SEG = {"voc_2012_seg_train_aug": ("VOC2012", "train_aug", "SegmentationClassAug"),
           "voc_2012_seg_val": ("VOC2012", "val", "SegmentationClass")}
VOC_SEG_CLASSES = ("background", *CLASS_NAMES)
VOC_IGNORE_LABEL = 255  # VOC's "void": object outlines and unlabelled pixels


def dataset_dir(name: str, root: str | os.PathLike) -> Path:
    """The directory a builtin name reads (``root/coco`` or ``root/VOC2007``), for records and error messages."""
    if name in _COCO:
        return Path(root) / _COCO[name][1].split("/")[0]
    if name in _VOC:
        return Path(root) / _VOC[name][0]
    if name in VOC_SEG:
        return Path(root) / VOC_SEG[name][0]
    raise UserError(f"dataset {name!r} is not a builtin COCO/VOC name; register it before running")


def register(names: list[str] | tuple[str, ...], root: str | os.PathLike) -> None:
    """(Re-)register the builtin ``names`` to read from ``root``; checks that their files exist."""
    root = Path(root).expanduser()
    for name in names:
        if name in _COCO:
            kind, image_root, json_file = _COCO[name]
            json_path, image_dir = root / json_file, root / image_root
            missing = json_path if not json_path.is_file() else image_dir if not image_dir.is_dir() else None
        elif name in _VOC:
            dirname, split, year = _VOC[name]
            split_file = root / dirname / "ImageSets" / "Main" / f"{split}.txt"
            missing = split_file if not split_file.is_file() else None
        elif name in VOC_SEG:
            dirname, split, labels = VOC_SEG[name]
            need = (root / dirname / "ImageSets" / "Segmentation" / f"{split}.txt", root / dirname / "JPEGImages",
                    root / dirname / labels)
            missing = next((p for p in need if not (p.is_file() if p.suffix == ".txt" else p.is_dir())), None)
        elif name in DatasetCatalog.list():
            continue  # a user-registered dataset: leave it alone
        else:
            raise UserError(f"dataset {name!r} is not registered and is not a builtin COCO/VOC name")
        if missing is not None:
            raise UserError(f"dataset {name}: {missing} not found under the data root {root} "
                            "(run `make data` for the toy data, or set DETECTRON2_DATASETS / --data-root)")
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if name in _COCO:
            register_coco_checked(name, _get_builtin_metadata(kind), json_path, image_dir)
        elif name in VOC_SEG:
            register_voc_sem_seg(name, root / dirname, split, labels)
        else:
            register_voc_checked(name, root / dirname, split, year)


def register_coco_checked(name: str, metadata: dict, json_path: str | os.PathLike, image_dir: str | os.PathLike
                          ) -> None:
    """``register_coco_instances`` whose loader checks the file and its records (see the module docstring)."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    if json_path.is_file() and json_path.stat().st_size == 0:
        raise UserError(f"{json_path}: empty annotation file (an interrupted download or copy?)")
    register_coco_instances(name, metadata, str(json_path), str(image_dir))
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: _load_coco(json_path, image_dir, name))


def register_voc_checked(name: str, dirname: str | os.PathLike, split: str, year: int,
                         class_names: tuple[str, ...] = tuple(CLASS_NAMES)) -> None:
    """``register_pascal_voc`` whose loader checks every XML and record first (see the module docstring)."""
    register_pascal_voc(name, str(dirname), split, year, class_names)
    MetadataCatalog.get(name).evaluator_type = "pascal_voc"
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: _load_voc(Path(dirname), split, class_names))


def register_voc_sem_seg(name: str, dirname: str | os.PathLike, split: str, labels: str) -> None:
    """A VOC segmentation split: records ``file_name``, ``sem_seg_file_name``, ``image_id`` (see the module
    docstring); the loader checks that every listed image and label exists."""
    dirname = Path(dirname)
    DatasetCatalog.register(name, lambda: _load_voc_sem_seg(dirname, split, labels))
    MetadataCatalog.get(name).set(stuff_classes=list(VOC_SEG_CLASSES), ignore_label=VOC_IGNORE_LABEL,
                                  evaluator_type="sem_seg", dirname=str(dirname), split=split, labels=labels)


def _load_voc_sem_seg(dirname: Path, split: str, labels: str) -> list[dict]:
    split_file = dirname / "ImageSets" / "Segmentation" / f"{split}.txt"
    ids = split_file.read_text().split() if split_file.is_file() else []
    if not ids:
        raise UserError(f"{split_file}: no image ids (empty or missing split file)")
    images, masks = dirname / "JPEGImages", dirname / labels
    have = {d: set(os.listdir(d)) if d.is_dir() else set() for d in (images, masks)}
    lost = [p for i in ids for p in (images / f"{i}.jpg", masks / f"{i}.png") if p.name not in have[p.parent]]
    if lost:
        raise UserError(f"{split_file}: {len(lost)} listed file(s) not found, e.g. {', '.join(map(str, lost[:3]))} "
                        "(see transfer/README.md for the VOC segmentation layout)")
    return [{"file_name": str(images / f"{i}.jpg"), "sem_seg_file_name": str(masks / f"{i}.png"), "image_id": i}
            for i in ids]


def _load_coco(json_path: Path, image_dir: Path, name: str) -> list[dict]:
    try:
        dicts = load_coco_json(str(json_path), str(image_dir), name)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{json_path}: not valid JSON ({str(e).splitlines()[0]})") from e
    except (KeyError, TypeError, ValueError, IndexError, AssertionError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:120]}"
        raise UserError(f"{json_path}: not a COCO annotation file ({what})") from e
    check_records(dicts, lambda r: json_path, f"{json_path} ({name})")
    return dicts


def _voc_field(root: ET.Element, path: str, xml: Path, number: bool = True) -> str:
    node = root.find(path)
    text = node.text.strip() if node is not None and node.text else ""
    if not text:
        raise UserError(f"{xml}: missing <{path.replace('/', '><')}>; every VOC annotation needs "
                        "<size><width>/<height> and, per object, <name> and <bndbox><xmin>/<ymin>/<xmax>/<ymax>")
    if number:
        try:
            float(text)
        except ValueError:
            raise UserError(f"{xml}: <{path}> is {text!r}, not a number") from None
    return text


def _load_voc(dirname: Path, split: str, class_names: tuple[str, ...]) -> list[dict]:
    split_file = dirname / "ImageSets" / "Main" / f"{split}.txt"
    ids = split_file.read_text().split() if split_file.is_file() else []
    if not ids:
        raise UserError(f"{split_file}: no image ids (empty or missing split file)")
    for fileid in ids:
        xml = dirname / "Annotations" / f"{fileid}.xml"
        if not xml.is_file():
            raise UserError(f"{xml} not found (listed in {split_file})")
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise UserError(f"{xml}: not valid XML ({e})") from e
        _voc_field(root, "size/width", xml)
        _voc_field(root, "size/height", xml)
        for obj in root.findall("object"):
            cls = _voc_field(obj, "name", xml, number=False)
            if cls not in class_names:
                raise UserError(f"{xml}: unknown class {cls!r}; VOC classes: {', '.join(class_names)}")
            for k in ("xmin", "ymin", "xmax", "ymax"):
                _voc_field(obj, f"bndbox/{k}", xml)
    dicts = load_voc_instances(str(dirname), split, list(class_names))
    check_records(dicts, lambda r: dirname / "Annotations" / f"{r['image_id']}.xml", str(split_file))
    return dicts


def check_records(dicts: list[dict], source_of, what: str) -> None:
    """Raise one :class:`UserError` for records whose image is missing or whose boxes are invalid; ``source_of(r)``
    is the annotation file to name for record ``r``."""
    if not dicts:
        raise UserError(f"{what}: no images")
    listings: dict[str, set[str]] = {}
    problems: list[str] = []
    n_bad = 0
    for r in dicts:
        issue = None
        d, base = os.path.split(r["file_name"])
        if d not in listings:
            listings[d] = set(os.listdir(d)) if os.path.isdir(d) else set()
        w, h = r.get("width", 0), r.get("height", 0)
        if base not in listings[d]:
            issue = f"image {r['file_name']} not found"
        elif not (w and h and w > 0 and h > 0):
            issue = f"image {base}: width/height {w} x {h}"
        else:
            for a in r.get("annotations", []):
                box = a.get("bbox")
                if not isinstance(box, (list, tuple)) or len(box) != 4 or \
                        not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
                    issue = f"image {base}: bbox {box!r} is not 4 finite numbers"
                    break
                x1, y1, x2, y2 = BoxMode.convert(list(box), a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
                if x2 < x1 or y2 < y1:
                    issue = f"image {base}: bbox {list(box)} has a negative width or height"
                    break
                if x1 > w or y1 > h or x2 < 0 or y2 < 0:
                    issue = f"image {base}: bbox {list(box)} lies outside the {w} x {h} image"
                    break
        if issue is not None:
            n_bad += 1
            if len(problems) < 3:
                problems.append(f"{source_of(r)}: {issue}")
    if n_bad:
        raise UserError(f"{what}: {n_bad} image(s) with bad annotations or missing files, e.g. "
                        + "; ".join(problems) + " — fix or remove them")

"""Dataset names for the detection tasks, bound to a data root chosen at run time.

detectron2 registers its builtin names (``coco_2017_train``, ``voc_2007_test``, ...) once, when ``detectron2.data``
is first imported, with ``$DETECTRON2_DATASETS`` as it was then. The launcher takes ``--data-root`` (default
``$DETECTRON2_DATASETS`` now, or ``./datasets``) and re-registers the names a config uses with that root, so a
test that generates toy data in a temporary directory, or a user who changes the variable, gets the right files.
Same layouts, same names, same metadata as detectron2's builtin registration.
"""

from __future__ import annotations

import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin import _PREDEFINED_SPLITS_COCO
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.coco import register_coco_instances
from detectron2.data.datasets.pascal_voc import register_pascal_voc

from ctbench.errors import UserError

_COCO = {name: (kind, image_root, json_file) for kind, splits in _PREDEFINED_SPLITS_COCO.items()
         for name, (image_root, json_file) in splits.items()}
_VOC = {f"voc_{year}_{split}": (f"VOC{year}", split, year)
        for year in (2007, 2012) for split in ("trainval", "train", "val", "test") if (year, split) != (2012, "test")}


def dataset_dir(name: str, root: str | os.PathLike) -> Path:
    """The directory a builtin name reads (``root/coco`` or ``root/VOC2007``), for records and error messages."""
    if name in _COCO:
        return Path(root) / _COCO[name][1].split("/")[0]
    if name in _VOC:
        return Path(root) / _VOC[name][0]
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
            register_coco_instances(name, _get_builtin_metadata(kind), str(json_path), str(image_dir))
        else:
            register_pascal_voc(name, str(root / dirname), split, year)
            MetadataCatalog.get(name).evaluator_type = "pascal_voc"

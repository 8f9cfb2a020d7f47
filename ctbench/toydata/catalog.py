"""Point detectron2's builtin COCO / VOC dataset names at a dataset root after detectron2 was imported.

detectron2 registers ``coco_2017_train``, ``keypoints_coco_2017_val``, ``voc_2007_test``, ... once, when
``detectron2.data`` is first imported, under ``$DETECTRON2_DATASETS`` as it was then. Tests (and notebooks) that
generate data in a temporary directory afterwards call::

    from ctbench.toydata.catalog import register_builtin
    register_builtin(root)          # same names, same metadata, files under root; also sets DETECTRON2_DATASETS

It re-runs detectron2's own ``register_all_coco`` and ``register_all_pascal_voc`` (nothing of ours in between), so
what loads is exactly what the builtin registration loads for that root.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def builtin_names() -> list[str]:
    """The names ``register_all_coco`` and ``register_all_pascal_voc`` register."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import builtin

    names = [k for splits in builtin._PREDEFINED_SPLITS_COCO.values() for k in splits]
    for prefix in builtin._PREDEFINED_SPLITS_COCO_PANOPTIC:
        names += [prefix, prefix + "_separated", prefix + "_stuffonly"]
    names += [n for n in DatasetCatalog.list() if n.startswith(("voc_2007_", "voc_2012_"))]
    return names


def register_builtin(root: str | os.PathLike) -> None:
    """Re-register detectron2's builtin COCO and VOC datasets under ``root`` (and export DETECTRON2_DATASETS)."""
    root = str(Path(root).expanduser())
    os.environ["DETECTRON2_DATASETS"] = root
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import builtin

    for name in builtin_names():
        with contextlib.suppress(KeyError):
            DatasetCatalog.remove(name)
        with contextlib.suppress(KeyError):
            MetadataCatalog.remove(name)
    builtin.register_all_coco(root)
    builtin.register_all_pascal_voc(root)

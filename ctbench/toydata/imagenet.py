"""Toy ImageNet: ten shape families under heavy nuisance, in the ImageNet folder layout.

    imagenet/train/<wnid>/<wnid>_<i>.JPEG          (real ImageNet wnids, ~96 px, short side 96)
    imagenet/val/<wnid>/ILSVRC2012_val_<n>.JPEG     (the usual class-folder reorganisation of the val set)
    imagenet/LOC_synset_mapping.txt                 (``<wnid> <names>`` per line, as in the Kaggle ImageNet release)

The class is the silhouette of one object (disk, ring, triangle, ...). Everything else is drawn independently of
the class: object and background textures (flat, gradient, stripes, checker, noise, dots) and colours, the object's
area (a fraction of the image drawn from the same range for every class), aspect, rotation and position, thin
clutter strokes and blobs behind and over the object. So colour and texture statistics, which a random-init network
captures well, carry no class information; shape, which survives MoCo's crops, jitter and blur, carries all of it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ctbench.toydata import draw

# Imagenette's ten synsets (real ImageNet-1k wnids and LOC_synset_mapping names), paired with a silhouette.
CLASSES: tuple[tuple[str, str, str], ...] = (
    ("n01440764", "tench, Tinca tinca", "disk"),
    ("n02102040", "English springer, English springer spaniel", "ring"),
    ("n02979186", "cassette player", "triangle"),
    ("n03000684", "chain saw, chainsaw", "square"),
    ("n03028079", "church, church building", "star"),
    ("n03394916", "French horn, horn", "cross"),
    ("n03417042", "garbage truck, dustcart", "crescent"),
    ("n03425413", "gas pump, gasoline pump, petrol pump, island dispenser", "arrow"),
    ("n03445777", "golf ball", "ell"),
    ("n03888605", "parachute, chute", "hourglass"),
)
SHORT_SIDE = 96
AREA_FRACTION = (0.08, 0.26)  # object area / image area, the same range for every class


def shape(name: str) -> tuple[list[draw.Poly], list[draw.Poly]]:
    """Unit silhouette centred at the origin, radius about 1: (filled polygons, holes)."""
    c = draw.circle
    if name == "disk":
        return [c(0, 0, 1, n=48)], []
    if name == "ring":
        return [c(0, 0, 1, n=48)], [c(0, 0, 0.6, n=48)]
    if name == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return [np.stack([np.cos(a), np.sin(a)], 1)], []
    if name == "square":
        return [draw.rect(-0.8, -0.8, 0.8, 0.8)], []
    if name == "star":
        a = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [np.stack([r * np.cos(a), r * np.sin(a)], 1)], []
    if name == "cross":
        w = 0.2
        return [draw.poly((-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                          (-1, -w), (-w, -w))], []
    if name == "crescent":
        return [c(0, 0, 1, n=48)], [c(0.5, -0.15, 0.85, n=48)]
    if name == "arrow":
        return [draw.poly((-1, -0.2), (0.15, -0.2), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.2), (-1, 0.2))], []
    if name == "ell":
        return [draw.poly((-0.6, -1), (-0.1, -1), (-0.1, 0.5), (0.7, 0.5), (0.7, 1), (-0.6, 1))], []
    if name == "hourglass":
        return [draw.poly((-0.8, -1), (0.8, -1), (0, 0)), draw.poly((-0.8, 1), (0.8, 1), (0, 0))], []
    raise ValueError(f"unknown shape {name!r}")


@functools.cache
def unit_area(name: str) -> float:
    """Area of the unit silhouette (rasterised once at 400 px: holes may overlap the outline)."""
    polys, holes = shape(name)
    m = Image.new("L", (400, 400), 0)
    d = ImageDraw.Draw(m)
    for p, fill in [(p, 255) for p in polys] + [(p, 0) for p in holes]:
        d.polygon([(float(x) * 100 + 200, float(y) * 100 + 200) for x, y in p], fill=fill)
    return float((np.asarray(m) > 127).sum()) / 100.0**2


def render(rng: np.random.Generator, cls: int) -> bytes:
    """One JPEG of class ``cls``."""
    long_side = int(rng.integers(SHORT_SIDE, SHORT_SIDE * 5 // 4 + 1))
    w, h = (long_side, SHORT_SIDE) if rng.random() < 0.5 else (SHORT_SIDE, long_side)
    canvas = draw.Canvas.textured(rng, w, h)
    canvas.clutter(rng, int(rng.integers(0, 7)), max_len=0.35 * SHORT_SIDE)

    name = CLASSES[cls][2]
    polys, holes = shape(name)
    s = np.sqrt(rng.uniform(*AREA_FRACTION) * w * h / unit_area(name))
    r = np.exp(rng.uniform(-0.25, 0.25))  # aspect
    s = min(s, 0.47 * min(w, h) / max(r, 1 / r))  # keep the object inside the image
    rot = rng.uniform(0, 2 * np.pi)
    centre = (w / 2 + rng.uniform(-0.12, 0.12) * w, h / 2 + rng.uniform(-0.12, 0.12) * h)
    flip = bool(rng.random() < 0.5)

    def place(ps: list[draw.Poly]) -> list[draw.Poly]:
        return [draw.transform(p, (s * r, s / r), rot, centre, flip) for p in ps]

    fg_base = draw.contrasting_colour(rng, canvas.mean_colour())
    canvas.fill(place(polys), canvas.new_texture(rng, fg_base), holes=place(holes))
    canvas.clutter(rng, int(rng.integers(0, 4)), max_len=0.3 * SHORT_SIDE, width=(0.5, 1.2), blobs=False)
    return canvas.jpeg_bytes()


def jobs(base: Path, counts: dict, seed: int) -> list[tuple]:
    """``(path, seed words, class)`` for every image under ``base/imagenet``; no image depends on the order."""
    root = base / "imagenet"
    out = []
    n_val = 0
    for c, (wnid, _, _) in enumerate(CLASSES[: counts["classes"]]):
        for i in range(counts["train"]):
            out.append((root / "train" / wnid / f"{wnid}_{i + 1}.JPEG", (seed, 1, 0, c, i), c))
        for i in range(counts["val"]):
            n_val += 1
            out.append((root / "val" / wnid / f"ILSVRC2012_val_{n_val:08d}.JPEG", (seed, 1, 1, c, i), c))
    return out


def write_image(job: tuple) -> None:
    path, words, cls = job
    path.write_bytes(render(np.random.default_rng(np.random.SeedSequence(list(words))), cls))


def write_meta(base: Path, counts: dict, results: list) -> None:
    lines = [f"{wnid} {names}\n" for wnid, names, _ in CLASSES[: counts["classes"]]]
    (base / "imagenet" / "LOC_synset_mapping.txt").write_text("".join(lines))


def make_dirs(base: Path, counts: dict) -> None:
    root = base / "imagenet"
    for wnid, _, _ in CLASSES[: counts["classes"]]:
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)

"""Toy ImageNet: ten classes of pattern-filled silhouettes, in the ImageNet folder layout.

    imagenet/train/<wnid>/<wnid>_<i>.JPEG          (real ImageNet wnids, short side 40 px, long side 40-50)
    imagenet/val/<wnid>/ILSVRC2012_val_<n>.JPEG     (the usual class-folder reorganisation of the val set)
    imagenet/LOC_synset_mapping.txt                 (``<wnid> <names>`` per line, as in the Kaggle ImageNet release)

An image is one large object (30-55 % of the image, near the centre) on a near-flat background. Its class sets two
things, as a real category sets a shape and a surface: the silhouette (disk, ring, triangle, ...) and the luminance
pattern inside it (stripes, rings, checker, ...), with within-class variation in size, aspect, position, any
orientation, mirror, the pattern's period and phase. Everything else is drawn independently of the class,
from the same random draws for every class (an image's seed gives the same colours whatever its class): the
background tint, the two low-saturation object tints (one light, one dark, either way round) and the sensor grain.
Both class cues survive MoCo v2's augmentation (crops, colour jitter, grayscale, blur, flip), colour does not
carry the class (the colour-only baseline in README.md).
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
SHORT_SIDE = 40  # pretraining and the evaluations crop 32 px views of it (pretrain/presets/toy.yaml)
AREA_FRACTION = (0.30, 0.55)  # object area / image area, the same range for every class
# The class's luminance pattern inside the silhouette (classes in CLASSES order): a cue that survives MoCo v2's
# crops, colour jitter, grayscale, blur and flips, unlike colour, which is random per image.
PATTERNS = ("stripes", "rings", "checker", "flat", "dots", "grid", "spokes", "hatch", "blobs", "chevrons")


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


def _tint(rng: np.random.Generator, v: tuple[float, float]) -> np.ndarray:
    """A low-saturation colour of random hue with value in ``v``: (3,) in [0, 1]."""
    h, s, val = rng.random(), rng.uniform(0.0, 0.45), rng.uniform(*v)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = val * (1 - s), val * (1 - s * f), val * (1 - s * (1 - f))
    return np.array([(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i])


def pattern(rng: np.random.Generator, kind: str, w: int, h: int, centre: tuple[float, float], size: float,
            rot: float) -> np.ndarray:
    """The class pattern in [0, 1] over an h x w grid (canvas pixels), scaled to the object ``size`` (its radius,
    same units) and turned by ``rot``; period and phase vary within the class."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = (xs - np.float32(centre[0])) / np.float32(size), (ys - np.float32(centre[1])) / np.float32(size)
    c, s = np.float32(np.cos(rot)), np.float32(np.sin(rot))
    u, v = x * c + y * s, y * c - x * s  # object coordinates, radius ~1
    f = np.float32(rng.uniform(0.85, 1.15))  # period jitter
    ph = np.float32(rng.uniform(0, 1))
    if kind == "flat":
        return np.zeros((h, w), np.float32)
    if kind == "stripes":
        return (((u * 2.2 * f + ph) % 1) < 0.5).astype(np.float32)
    if kind == "rings":
        return (((np.hypot(u, v) * 2.5 * f + ph) % 1) < 0.5).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u * 2.4 * f + ph) + np.floor(v * 2.4 * f + ph)) % 2).astype(np.float32)
    if kind == "dots":
        d = np.hypot((u * 2.2 * f + ph) % 1 - 0.5, (v * 2.2 * f + ph) % 1 - 0.5)
        return (d < 0.3).astype(np.float32)
    if kind == "grid":
        g = np.minimum(np.abs((u * 1.8 * f + ph) % 1 - 0.5), np.abs((v * 1.8 * f + ph) % 1 - 0.5))
        return (g < 0.13).astype(np.float32)
    if kind == "spokes":
        a = np.arctan2(v, u) / np.float32(2 * np.pi) * 8
        return (((a + ph) % 1) < 0.5).astype(np.float32)
    if kind == "hatch":  # two crossing sets of thin diagonal lines
        p1 = np.abs(((u + v) * 2.0 * f + ph) % 1 - 0.5)
        p2 = np.abs(((u - v) * 2.0 * f + ph) % 1 - 0.5)
        return (np.maximum(p1, p2) > 0.36).astype(np.float32)
    if kind == "blobs":  # smooth noise, thresholded: irregular patches
        g = int(rng.integers(4, 7))
        small = Image.fromarray((rng.random((g, g)) * 255).astype(np.uint8))
        return (np.asarray(small.resize((w, h), Image.BICUBIC), np.float32) > 127).astype(np.float32)
    if kind == "chevrons":
        return ((((u * 2.2 * f) + np.abs(v) * 2.2 * f + ph) % 1) < 0.5).astype(np.float32)
    raise ValueError(f"unknown pattern {kind!r}")


def render(rng: np.random.Generator, cls: int) -> bytes:
    """One JPEG of class ``cls``: its silhouette filled with its pattern, in random low-saturation colours, on a
    near-flat background."""
    long_side = int(rng.integers(SHORT_SIDE, SHORT_SIDE * 5 // 4 + 1))
    w, h = (long_side, SHORT_SIDE) if rng.random() < 0.5 else (SHORT_SIDE, long_side)
    bg = _tint(rng, (0.3, 0.75))
    ss = draw.SS
    ramp = draw.texture(rng, h, w, bg) if rng.random() < 0.3 else None  # a few backgrounds with gentle texture
    back = np.broadcast_to(bg * 255, (h * ss, w * ss, 3)).astype(np.float32)
    if ramp is not None:
        back = 0.75 * back + 0.25 * np.asarray(ramp.resize((w * ss, h * ss), Image.BILINEAR), np.float32)
    canvas = draw.Canvas(w, h, Image.fromarray(np.clip(back + 0.5, 0, 255).astype(np.uint8), "RGB"))

    name = CLASSES[cls][2]
    polys, holes = shape(name)
    s = np.sqrt(rng.uniform(*AREA_FRACTION) * w * h / unit_area(name))
    r = np.exp(rng.uniform(-0.2, 0.2))  # aspect
    s = min(s, 0.48 * min(w, h) / max(r, 1 / r))  # keep the object inside the image
    rot = rng.uniform(0, 2 * np.pi)  # any orientation (upright classes, +-0.3 rad, gave a 70 % random-init kNN)
    centre = (w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h)
    flip = bool(rng.random() < 0.5)

    def place(ps: list[draw.Poly]) -> list[draw.Poly]:
        return [draw.transform(p, (s * r, s / r), rot, centre, flip) for p in ps]

    light, dark = _tint(rng, (0.7, 1.0)), _tint(rng, (0.05, 0.35))
    if rng.random() < 0.5:
        light, dark = dark, light
    t = pattern(rng, PATTERNS[cls], w * ss, h * ss, (centre[0] * ss, centre[1] * ss), s * ss,
                rot + rng.uniform(-0.3, 0.3))
    if PATTERNS[cls] == "flat":  # one colour, contrasting with the background
        light = dark if abs(float(light.mean() - bg.mean())) < abs(float(dark.mean() - bg.mean())) else light
    paint = light * 255 + t[..., None] * (dark - light) * 255
    paint += rng.standard_normal((h * ss, w * ss, 1)).astype(np.float32) * np.float32(rng.uniform(0, 6))
    canvas.fill(place(polys), Image.fromarray(np.clip(paint + 0.5, 0, 255).astype(np.uint8), "RGB"),
                holes=place(holes))
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

"""Rendering primitives of the toy data: seeded textures, polygons, clipping and rasterisation.

Everything takes a ``numpy.random.Generator`` so an image depends only on its own seed. Images are composed at
``SS`` times the output resolution and box-downsampled once, which antialiases edges without a slow renderer.
Coordinates are ``float`` pixel positions of the output image, ``(x, y)`` with y down; polygons are ``(n, 2)``
arrays.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

SS = 2  # supersampling factor
JPEG_QUALITY = 90

Poly = np.ndarray  # (n, 2) float64, x y


# --------------------------------------------------------------------------- colours and textures


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A colour uniform in hue, spread in saturation and value: (3,) float in [0, 1]."""
    h, s, v = rng.random(), rng.uniform(0.15, 1.0), rng.uniform(0.15, 1.0)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def contrasting_colour(rng: np.random.Generator, *others: np.ndarray, min_dist: float = 0.35) -> np.ndarray:
    """A random colour at least ``min_dist`` (RGB Euclidean, 0-1 scale) from each of ``others``."""
    for _ in range(64):
        c = random_colour(rng)
        if all(np.linalg.norm(c - o) >= min_dist for o in others):
            return c
    return 1.0 - others[0]


def texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray | None = None) -> Image.Image:
    """A random RGB texture of size w x h: flat, gradient, stripes, checker, smooth noise or dots.

    Two colours are used: ``base`` (random if None) and a second one near or far from it.
    """
    c1 = random_colour(rng) if base is None else base
    c2 = np.clip(c1 + rng.normal(0, 0.25, 3), 0, 1) if rng.random() < 0.5 else random_colour(rng)
    n = float(max(h, w))
    ys, xs = np.arange(h, dtype=np.float32)[:, None] / n, np.arange(w, dtype=np.float32)[None, :] / n
    a = rng.uniform(0, 2 * np.pi)
    ca, sa = np.float32(np.cos(a)), np.float32(np.sin(a))
    u = xs * ca + ys * sa  # coordinate along a random direction: H x W
    kind = rng.integers(6)
    if kind == 0:  # flat
        t = np.zeros((h, w), np.float32)
    elif kind == 1:  # linear gradient
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif kind == 2:  # stripes
        t = 0.5 + 0.5 * np.sin(np.float32(2 * np.pi * rng.uniform(3, 12)) * u + np.float32(rng.uniform(0, 6.28)))
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
    elif kind == 3:  # checker
        v = ys * ca - xs * sa
        f = np.float32(rng.uniform(3, 10))
        t = ((np.floor(u * f) + np.floor(v * f)) % 2).astype(np.float32)
    elif kind == 4:  # smooth value noise
        g = int(rng.integers(3, 10))
        small = Image.fromarray((rng.random((g, g)) * 255).astype(np.uint8))
        t = np.asarray(small.resize((w, h), Image.BICUBIC), np.float32) / 255.0
    else:  # dots
        f = np.float32(rng.uniform(4, 12))
        v = ys * ca - xs * sa
        d = np.hypot((u * f) % 1 - 0.5, (v * f) % 1 - 0.5)
        t = (d < rng.uniform(0.15, 0.4)).astype(np.float32)
    c1, c2 = (c1 * 255).astype(np.float32), (c2 * 255).astype(np.float32)
    out = c1 + t[..., None] * (c2 - c1)  # H x W x 3, 0-255
    grain = rng.uniform(0, 10)
    if grain > 2:  # sensor-like grain on some images
        out += rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(grain)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def mean_colour(img: Image.Image) -> np.ndarray:
    """Mean colour of an RGB image, (3,) in [0, 1]."""
    return np.asarray(img.reduce(8), np.float32).reshape(-1, 3).mean(0) / 255.0


# --------------------------------------------------------------------------- polygons


def circle(cx: float, cy: float, rx: float, ry: float | None = None, n: int = 24, rot: float = 0.0) -> Poly:
    """An ellipse as an n-gon (radii rx, ry, rotated by ``rot`` radians)."""
    ry = rx if ry is None else ry
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(rot), np.sin(rot)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


def ring(cx: float, cy: float, rx: float, ry: float, inner: float = 0.7, n: int = 24) -> Poly:
    """An elliptic annulus as ONE polygon: outer ellipse, a zero-width slit, the inner one (``inner`` x radii) reversed.

    Even-odd and nonzero fills (PIL, pycocotools) both leave the hole empty, so it works as a COCO polygon.
    """
    t = np.linspace(0, 2 * np.pi, n + 1)
    outer = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)
    inner_pts = np.stack([cx + inner * rx * np.cos(t[::-1]), cy + inner * ry * np.sin(t[::-1])], 1)
    return np.concatenate([outer, inner_pts], 0)


def rect(x0: float, y0: float, x1: float, y1: float) -> Poly:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def segment(p: tuple[float, float], q: tuple[float, float], width: float) -> Poly:
    """A thick line from p to q as a quadrilateral."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    d = q - p
    n = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-9) * width / 2
    return np.stack([p + n, q + n, q - n, p - n])


def poly(*pts: tuple[float, float]) -> Poly:
    return np.asarray(pts, np.float64)


def polygon_area(p: Poly) -> float:
    """Signed-area magnitude (shoelace); a ring's slit polygon gives outer minus inner."""
    x, y = p[:, 0], p[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def transform(p: Poly, scale: tuple[float, float] = (1.0, 1.0), rot: float = 0.0,
              shift: tuple[float, float] = (0.0, 0.0), flip: bool = False) -> Poly:
    """Scale (per axis), mirror in x, rotate (radians), then translate."""
    q = p * np.asarray(scale)
    if flip:
        q = q * np.array([-1.0, 1.0])
    c, s = np.cos(rot), np.sin(rot)
    q = q @ np.array([[c, s], [-s, c]])
    return q + np.asarray(shift)


def clip_polygon(p: Poly, w: float, h: float) -> Poly | None:
    """Sutherland-Hodgman clip of ``p`` to the image rectangle [0, w] x [0, h]; None when nothing is left."""
    if p[:, 0].min() >= 0 and p[:, 1].min() >= 0 and p[:, 0].max() <= w and p[:, 1].max() <= h:
        return p
    pts = [tuple(v) for v in p]
    for axis, limit, keep_below in ((0, 0.0, False), (0, w, True), (1, 0.0, False), (1, h, True)):
        if not pts:
            return None

        def inside(v, axis=axis, limit=limit, keep_below=keep_below):
            return v[axis] <= limit if keep_below else v[axis] >= limit

        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(_cross(prev, cur, axis, limit))
                out.append(cur)
            elif inside(prev):
                out.append(_cross(prev, cur, axis, limit))
        pts = out
    if len(pts) < 3:
        return None
    q = np.asarray(pts, np.float64)
    return q if polygon_area(q) > 0.5 else None


def _cross(a, b, axis, limit):
    t = (limit - a[axis]) / (b[axis] - a[axis])
    return (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]))


# --------------------------------------------------------------------------- raster


class Patch:
    """A texture image placed at ``offset`` (canvas pixels) on a canvas."""

    def __init__(self, img: Image.Image, offset: tuple[int, int]):
        self.img, self.offset = img, offset

    def mean_colour(self) -> np.ndarray:
        return mean_colour(self.img)


class Canvas:
    """An RGB image at ``SS`` x the output size; draw colours and textures through polygons, then save."""

    def __init__(self, w: int, h: int, background: Image.Image):
        self.w, self.h = w, h
        self.img = background  # RGB, (w*SS) x (h*SS)
        self._draw = ImageDraw.Draw(self.img)

    @classmethod
    def textured(cls, rng: np.random.Generator, w: int, h: int) -> Canvas:
        return cls(w, h, texture(rng, h, w).resize((w * SS, h * SS), Image.BILINEAR))

    @staticmethod
    def _xy(p: Poly) -> list[tuple[float, float]]:
        return [(float(x) * SS, float(y) * SS) for x, y in p]

    def mask(self, polys: list[Poly], holes: list[Poly] = ()) -> Image.Image:
        """Union of ``polys`` minus ``holes`` at canvas resolution ("L", 255 inside)."""
        m = Image.new("L", self.img.size, 0)
        d = ImageDraw.Draw(m)
        for p in polys:
            d.polygon(self._xy(p), fill=255)
        for p in holes:
            d.polygon(self._xy(p), fill=0)
        return m

    def fill(self, polys: list[Poly], paint: np.ndarray | Image.Image | Patch, holes: list[Poly] = ()) -> None:
        """Paint a colour ((3,) in [0, 1]), a texture (an RGB image of the canvas size) or a :class:`Patch`
        inside the polygons."""
        if isinstance(paint, Patch):
            x, y = paint.offset
            box = (x, y, x + paint.img.width, y + paint.img.height)
            self.img.paste(paint.img, (x, y), self.mask(polys, holes).crop(box))
            return
        if isinstance(paint, Image.Image):
            self.img.paste(paint, (0, 0), self.mask(polys, holes))
            return
        c = tuple(int(v * 255 + 0.5) for v in paint)
        if holes:
            self.img.paste(c, (0, 0, *self.img.size), self.mask(polys, holes))
            return
        for p in polys:
            self._draw.polygon(self._xy(p), fill=c)

    def new_texture(self, rng: np.random.Generator, base: np.ndarray | None = None) -> Image.Image:
        """A texture made at the output resolution (detail finer than a pixel is lost anyway), upsampled."""
        return texture(rng, self.h, self.w, base).resize(self.img.size, Image.BILINEAR)

    def patch(self, rng: np.random.Generator, box: tuple[float, float, float, float],
              base: np.ndarray | None = None) -> Patch:
        """A texture covering only ``box`` (x0, y0, x1, y1 in output pixels; may extend past the image)."""
        x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
        w, h = max(1, int(np.ceil(box[2])) - x0), max(1, int(np.ceil(box[3])) - y0)
        img = texture(rng, h, w, base).resize((w * SS, h * SS), Image.BILINEAR)
        return Patch(img, (x0 * SS, y0 * SS))

    def mean_colour(self) -> np.ndarray:
        return mean_colour(self.img)

    def clutter(self, rng: np.random.Generator, n: int, max_len: float, width: tuple[float, float] = (0.6, 2.0),
                blobs: bool = True) -> None:
        """``n`` random thin strokes (and small blobs) in random colours: structure that belongs to no class."""
        for _ in range(n):
            x, y = rng.uniform(0, self.w), rng.uniform(0, self.h)
            colour = random_colour(rng)
            if blobs and rng.random() < 0.35:
                r = rng.uniform(1.0, max_len / 6)
                self.fill([circle(x, y, r, r * rng.uniform(0.5, 1.0), n=10, rot=rng.uniform(0, np.pi))], colour)
            else:
                a, length = rng.uniform(0, 2 * np.pi), rng.uniform(max_len / 4, max_len)
                q = (x + length * np.cos(a), y + length * np.sin(a))
                self.fill([segment((x, y), q, rng.uniform(*width))], colour)

    def to_pil(self) -> Image.Image:
        return self.img.reduce(SS)  # box downsampling

    def jpeg_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.to_pil().save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()

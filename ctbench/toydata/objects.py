"""Toy detection scenes: the 20 Pascal VOC classes as composite icons, and people as articulated stick figures.

Each class is a set of polygon parts in a unit box (x right, y down), e.g. a car is a body, a cabin and two wheels;
a person is a head, a torso and eight limb segments posed at random, with the 17 COCO keypoints where the joints
are. A scene has 1-5 objects, each in its own cell of a random grid, so objects never overlap and an instance mask
is exactly the union of its parts (written as COCO polygons; a wheel is a ring polygon with a slit). Objects near
the border are sometimes pushed partly out of the image (truncated: polygons clipped, keypoints outside dropped).
Colours and textures are random per object and per scene, as in the toy ImageNet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ctbench.toydata import draw
from ctbench.toydata.draw import circle as E
from ctbench.toydata.draw import poly as P
from ctbench.toydata.draw import rect as R
from ctbench.toydata.draw import ring as O
from ctbench.toydata.draw import segment as S

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
IMAGE_SIZES = ((160, 128), (128, 160), (144, 144), (160, 144), (144, 160), (128, 128))

# COCO keypoint order (person_keypoints_*.json) and the skeleton (1-based pairs) as in the real files
KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
             "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
             "right_knee", "left_ankle", "right_ankle")
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9], [8, 10],
            [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]


def _icon(name: str) -> tuple[float, list[tuple[np.ndarray, str]], list[np.ndarray]]:
    """(width / height, parts [(polygon, paint 'a' | 'b')], details painted with the accent inside the parts)."""
    if name == "aeroplane":
        return 1.7, [(E(0.5, 0.5, 0.47, 0.09), "a"), (P((0.42, 0.47), (0.6, 0.47), (0.4, 0.04), (0.32, 0.04)), "a"),
                     (P((0.42, 0.53), (0.6, 0.53), (0.4, 0.96), (0.32, 0.96)), "a"),
                     (P((0.04, 0.5), (0.14, 0.5), (0.06, 0.24), (0.02, 0.24)), "b"),
                     (P((0.04, 0.5), (0.14, 0.5), (0.06, 0.76), (0.02, 0.76)), "b")], [E(0.88, 0.5, 0.04, 0.04)]
    if name == "bicycle":
        return 1.6, [(O(0.2, 0.7, 0.19, 0.29, 0.75), "b"), (O(0.8, 0.7, 0.19, 0.29, 0.75), "b"),
                     (S((0.2, 0.7), (0.42, 0.3), 0.05), "a"), (S((0.42, 0.3), (0.72, 0.3), 0.05), "a"),
                     (S((0.72, 0.3), (0.8, 0.7), 0.05), "a"), (S((0.2, 0.7), (0.5, 0.7), 0.05), "a"),
                     (S((0.5, 0.7), (0.42, 0.3), 0.05), "a"), (S((0.72, 0.3), (0.7, 0.08), 0.05), "a"),
                     (R(0.34, 0.18, 0.5, 0.26), "b"), (R(0.62, 0.04, 0.78, 0.1), "b")], []
    if name == "bird":
        return 1.3, [(E(0.45, 0.55, 0.3, 0.2), "a"), (E(0.76, 0.35, 0.12, 0.15), "a"),
                     (P((0.85, 0.3), (1.0, 0.36), (0.85, 0.42)), "b"),
                     (P((0.2, 0.5), (0.0, 0.35), (0.0, 0.6), (0.2, 0.62)), "a"),
                     (S((0.42, 0.72), (0.4, 1.0), 0.03), "b"), (S((0.52, 0.72), (0.54, 1.0), 0.03), "b")], \
            [E(0.42, 0.5, 0.18, 0.1)]
    if name == "boat":
        return 1.4, [(P((0, 0.62), (1, 0.62), (0.85, 0.95), (0.12, 0.95)), "b"),
                     (S((0.48, 0.02), (0.48, 0.62), 0.03), "b"),
                     (P((0.51, 0.05), (0.51, 0.58), (0.88, 0.58)), "a"),
                     (P((0.45, 0.12), (0.45, 0.58), (0.18, 0.58)), "a")], [R(0.05, 0.7, 0.95, 0.75)]
    if name == "bottle":
        return 0.38, [(R(0.08, 0.42, 0.92, 1.0), "a"), (P((0.08, 0.43), (0.92, 0.43), (0.66, 0.2), (0.34, 0.2)), "a"),
                      (R(0.34, 0.02, 0.66, 0.21), "a")], [R(0.08, 0.6, 0.92, 0.8)]
    if name == "bus":
        return 2.2, [(R(0, 0.05, 1, 0.82), "a"), (E(0.2, 0.85, 0.07, 0.15), "b"), (E(0.8, 0.85, 0.07, 0.15), "b")], \
            [R(0.05 + i * 0.13, 0.15, 0.15 + i * 0.13, 0.42) for i in range(7)]
    if name == "car":
        return 1.9, [(R(0, 0.42, 1, 0.8), "a"), (P((0.18, 0.43), (0.3, 0.08), (0.7, 0.08), (0.82, 0.43)), "a"),
                     (E(0.22, 0.8, 0.1, 0.19), "b"), (E(0.78, 0.8, 0.1, 0.19), "b")], \
            [P((0.27, 0.4), (0.34, 0.15), (0.48, 0.15), (0.48, 0.4)),
             P((0.52, 0.4), (0.52, 0.15), (0.66, 0.15), (0.73, 0.4))]
    if name == "cat":
        legs = [(S((x, 0.66), (x, 1.0), 0.05), "a") for x in (0.24, 0.34, 0.54, 0.64)]
        return 1.3, [(E(0.42, 0.62, 0.3, 0.18), "a"), (E(0.8, 0.4, 0.15, 0.17), "a"),
                     (P((0.67, 0.32), (0.69, 0.06), (0.79, 0.26)), "a"),
                     (P((0.82, 0.26), (0.91, 0.06), (0.94, 0.32)), "a"),
                     (S((0.14, 0.6), (0.03, 0.14), 0.05), "b"), *legs], \
            [E(0.76, 0.38, 0.02, 0.03), E(0.86, 0.38, 0.02, 0.03)]
    if name == "chair":
        return 0.7, [(R(0.08, 0, 0.24, 0.55), "a"), (R(0.08, 0.48, 0.92, 0.6), "a"), (R(0.08, 0.6, 0.18, 1), "b"),
                     (R(0.82, 0.6, 0.92, 1), "b")], []
    if name == "cow":
        legs = [(R(x, 0.6, x + 0.08, 1), "a") for x in (0.18, 0.3, 0.62, 0.74)]
        return 1.5, [(R(0.15, 0.25, 0.84, 0.65), "a"), (P((0.8, 0.2), (1.0, 0.28), (1.0, 0.5), (0.82, 0.45)), "a"),
                     (S((0.84, 0.22), (0.8, 0.04), 0.03), "b"), (S((0.9, 0.24), (0.96, 0.06), 0.03), "b"),
                     (S((0.15, 0.3), (0.05, 0.7), 0.03), "a"), *legs], [E(0.35, 0.4, 0.1, 0.08), E(0.6, 0.5, 0.08, 0.1)]
    if name == "diningtable":
        return 1.7, [(R(0, 0.18, 1, 0.32), "a"), (R(0.05, 0.32, 0.12, 1), "b"), (R(0.88, 0.32, 0.95, 1), "b"),
                     (R(0.3, 0.32, 0.36, 0.88), "b"), (R(0.64, 0.32, 0.7, 0.88), "b")], []
    if name == "dog":
        legs = [(S((x, 0.56), (x + dx, 1.0), 0.06), "a") for x, dx in ((0.24, -0.04), (0.34, 0.02), (0.58, -0.02),
                                                                      (0.68, 0.04))]
        return 1.4, [(E(0.45, 0.5, 0.3, 0.16), "a"), (E(0.8, 0.3, 0.13, 0.15), "a"), (R(0.85, 0.3, 1.0, 0.42), "a"),
                     (E(0.73, 0.34, 0.05, 0.14), "b"), (S((0.16, 0.45), (0.04, 0.14), 0.04), "a"), *legs], \
            [E(0.98, 0.33, 0.02, 0.03)]
    if name == "horse":
        legs = [(S((x, 0.52), (x + dx, 1.0), 0.05), "a") for x, dx in ((0.22, -0.03), (0.32, 0.03), (0.6, -0.02),
                                                                      (0.7, 0.03))]
        return 1.3, [(E(0.45, 0.45, 0.3, 0.14), "a"), (P((0.64, 0.4), (0.72, 0.12), (0.82, 0.12), (0.8, 0.45)), "a"),
                     (P((0.72, 0.05), (1.0, 0.17), (0.98, 0.28), (0.74, 0.2)), "a"),
                     (S((0.16, 0.42), (0.06, 0.76), 0.05), "b"), *legs], [S((0.7, 0.1), (0.66, 0.4), 0.03)]
    if name == "motorbike":
        return 1.6, [(O(0.18, 0.7, 0.17, 0.28, 0.55), "b"), (O(0.82, 0.7, 0.17, 0.28, 0.55), "b"),
                     (P((0.28, 0.45), (0.7, 0.38), (0.76, 0.6), (0.34, 0.68)), "a"), (E(0.52, 0.36, 0.16, 0.09), "a"),
                     (R(0.22, 0.34, 0.4, 0.42), "b"), (S((0.82, 0.7), (0.74, 0.3), 0.05), "a"),
                     (S((0.74, 0.3), (0.78, 0.1), 0.05), "a")], [E(0.52, 0.36, 0.08, 0.04)]
    if name == "pottedplant":
        leaves = [E(0.5, 0.3, 0.1, 0.3), E(0.32, 0.38, 0.08, 0.25, rot=-0.6), E(0.68, 0.38, 0.08, 0.25, rot=0.6),
                  E(0.2, 0.5, 0.07, 0.18, rot=-1.1), E(0.8, 0.5, 0.07, 0.18, rot=1.1)]
        return 0.8, [(P((0.22, 0.62), (0.78, 0.62), (0.68, 1), (0.32, 1)), "b"), *[(e, "a") for e in leaves]], \
            [R(0.22, 0.62, 0.78, 0.68)]
    if name == "sheep":
        wool = [E(0.3 + 0.11 * i, 0.36 + 0.16 * j, 0.12, 0.16) for i in range(4) for j in range(2)]
        legs = [(R(x, 0.62, x + 0.06, 1), "b") for x in (0.28, 0.38, 0.58, 0.68)]
        return 1.4, [*[(w, "a") for w in wool], (E(0.86, 0.34, 0.1, 0.14), "b"), *legs], []
    if name == "sofa":
        return 2.0, [(R(0.05, 0.12, 0.95, 0.55), "a"), (R(0, 0.5, 1, 0.85), "a"), (R(0, 0.35, 0.12, 0.85), "a"),
                     (R(0.88, 0.35, 1, 0.85), "a"), (R(0.04, 0.85, 0.1, 1), "b"), (R(0.9, 0.85, 0.96, 1), "b")], \
            [R(0.49, 0.15, 0.51, 0.55), R(0.12, 0.55, 0.88, 0.58)]
    if name == "train":
        wheels = [(E(x, 0.9, 0.04, 0.1), "b") for x in (0.06, 0.22, 0.4, 0.6, 0.76, 0.94)]
        return 2.6, [(R(0, 0.25, 0.3, 0.86), "a"), (R(0.16, 0.06, 0.3, 0.25), "a"), (R(0.04, 0.1, 0.1, 0.25), "b"),
                     (R(0.33, 0.2, 0.66, 0.86), "a"), (R(0.68, 0.2, 1, 0.86), "a"), *wheels], \
            [R(0.36 + 0.1 * i, 0.3, 0.43 + 0.1 * i, 0.5) for i in range(3)] + \
            [R(0.71 + 0.1 * i, 0.3, 0.78 + 0.1 * i, 0.5) for i in range(3)]
    if name == "tvmonitor":
        return 1.3, [(R(0, 0, 1, 0.8), "a"), (R(0.44, 0.8, 0.56, 0.92), "b"), (R(0.28, 0.9, 0.72, 1), "b")], \
            [R(0.07, 0.08, 0.93, 0.72)]
    raise ValueError(f"no icon for {name!r}")


ASPECT = {n: _icon(n)[0] for n in VOC_CLASSES if n != "person"} | {"person": 0.5}


@dataclass
class Instance:
    """One annotated object of a scene, in output-pixel coordinates."""

    name: str
    polygons: list[np.ndarray]  # clipped to the image; their union is the mask
    bbox: tuple[float, float, float, float]  # x0 y0 x1 y1 (tight around the polygons)
    truncated: bool
    pose: str  # VOC: Frontal, Left, Right, Unspecified
    keypoints: list[float] | None = None  # 17 x (x, y, v) for a person
    extra: dict = field(default_factory=dict)


def _person(rng: np.random.Generator, cx: float, top: float, height: float):
    """A stick figure: (parts [(polygon, paint)], keypoints 17 x 3 in pixels with v in {1, 2}, pose)."""
    facing = ["front", "left", "right"][int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    wf = 1.0 if facing == "front" else 0.45
    kp = {}
    vis = dict.fromkeys(KEYPOINTS, 2)
    side = {"left": 1.0, "right": -1.0}  # person's left appears on image right when facing the camera
    head = np.array([0.0, 0.1])
    if facing == "front":
        kp["nose"] = head + (0, 0.012)
        for s_name, s in side.items():
            kp[f"{s_name}_eye"] = head + (0.032 * s, -0.018)
            kp[f"{s_name}_ear"] = head + (0.078 * s, 0.0)
    else:
        d = 1.0 if facing == "right" else -1.0  # looking towards +x or -x
        near, far = ("right", "left") if facing == "right" else ("left", "right")
        kp["nose"] = head + (0.075 * d, 0.012)
        kp[f"{near}_eye"] = head + (0.045 * d, -0.018)
        kp[f"{far}_eye"] = head + (0.06 * d, -0.02)
        kp[f"{near}_ear"] = head + (-0.01 * d, 0.0)
        kp[f"{far}_ear"] = head + (-0.01 * d, 0.0)
        vis[f"{far}_eye"] = 1 if rng.random() < 0.5 else 0
        vis[f"{far}_ear"] = 0
    for s_name, s in side.items():
        out = s if facing == "front" else float(rng.choice([-1.0, 1.0]))  # profile: limbs swing forward or back
        sh = np.array([0.12 * wf * s, 0.22])
        hip = np.array([0.08 * wf * s, 0.53])
        a_up = math.radians(rng.uniform(-15, 150))
        a_fore = a_up + math.radians(rng.uniform(-20, 100))
        elbow = sh + 0.17 * np.array([out * math.sin(a_up), math.cos(a_up)])
        wrist = elbow + 0.16 * np.array([out * math.sin(a_fore), math.cos(a_fore)])
        a_thigh = math.radians(rng.uniform(-8, 35))
        a_shin = a_thigh + math.radians(rng.uniform(-35, 10))
        knee = hip + 0.23 * np.array([out * math.sin(a_thigh), math.cos(a_thigh)])
        ankle = knee + 0.23 * np.array([out * math.sin(a_shin), math.cos(a_shin)])
        kp.update({f"{s_name}_shoulder": sh, f"{s_name}_hip": hip, f"{s_name}_elbow": elbow,
                   f"{s_name}_wrist": wrist, f"{s_name}_knee": knee, f"{s_name}_ankle": ankle})
    for j in ("elbow", "wrist", "knee", "ankle"):  # some joints labelled but occluded
        for s_name in side:
            if rng.random() < 0.08:
                vis[f"{s_name}_{j}"] = 1

    def px(v):
        return (cx + v[0] * height, top + v[1] * height)

    sh_c, hip_c = (kp["left_shoulder"] + kp["right_shoulder"]) / 2, (kp["left_hip"] + kp["right_hip"]) / 2
    ws, wh = max(0.13 * wf, 0.06), max(0.09 * wf, 0.055)
    torso = np.array([px(sh_c + (-ws, 0)), px(sh_c + (ws, 0)), px(hip_c + (wh, 0)), px(hip_c + (-wh, 0))])
    parts = [(draw.circle(*px(head), 0.085 * height, n=16), "c"),
             (draw.segment(px(head + (0, 0.07)), px(sh_c), 0.05 * height), "c"), (torso, "a")]
    for s_name in side:
        parts.append((draw.segment(px(kp[f"{s_name}_shoulder"]), px(kp[f"{s_name}_elbow"]), 0.055 * height), "a"))
        parts.append((draw.segment(px(kp[f"{s_name}_elbow"]), px(kp[f"{s_name}_wrist"]), 0.05 * height), "c"))
        parts.append((draw.segment(px(kp[f"{s_name}_hip"]), px(kp[f"{s_name}_knee"]), 0.07 * height), "b"))
        parts.append((draw.segment(px(kp[f"{s_name}_knee"]), px(kp[f"{s_name}_ankle"]), 0.06 * height), "b"))
    keypoints = np.array([[*px(kp[k]), vis[k]] for k in KEYPOINTS])  # 17 x 3
    pose = {"front": "Frontal", "left": "Left", "right": "Right"}[facing]
    return parts, keypoints, pose


def _grid(rng: np.random.Generator, w: int, h: int, k: int) -> list[tuple[float, float, float, float]]:
    """k disjoint cells (x0, y0, x1, y1) covering parts of the image, in random order."""
    cols = {1: 1, 2: 2, 3: 3, 4: 2, 5: 3}[k] if rng.random() < 0.5 or k in (4, 5) else 1
    rows = math.ceil(k / cols)
    if rows > 3:
        cols, rows = rows, cols

    def cuts(n: int, size: float) -> list[float]:
        inner = sorted(rng.uniform(0.8, 1.2) * size * (i + 1) / n for i in range(n - 1))
        return [0.0, *inner, float(size)]

    xs, ys = cuts(cols, w), cuts(rows, h)
    cells = [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(rows) for i in range(cols)]
    order = rng.permutation(len(cells))[:k]
    return [cells[i] for i in order]


def render_scene(rng: np.random.Generator, classes: list[str], no_truncation: int = 0) -> tuple[bytes, int, int,
                                                                                              list[Instance]]:
    """Render one scene with one object of each name in ``classes`` (at most 5).

    The first ``no_truncation`` objects are kept fully inside the image (the class coverage of small splits relies
    on it). Returns (JPEG bytes, width, height, instances in drawing order).
    """
    w, h = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    canvas = draw.Canvas.textured(rng, w, h)
    canvas.clutter(rng, int(rng.integers(0, 5)), max_len=0.2 * min(w, h), width=(0.5, 1.5))
    bg = canvas.mean_colour()
    instances = []
    for idx, (name, cell) in enumerate(zip(classes, _grid(rng, w, h, len(classes)))):
        keypoints, details = None, []
        if name == "person":  # built at height 1; its real extent (arms out) decides the fit
            parts, keypoints, pose = _person(rng, 0.0, 0.0, 1.0)
        else:
            aspect, parts, details = _icon(name)
            flip = bool(rng.random() < 0.5)
            sx = aspect * math.exp(rng.uniform(-0.15, 0.15))  # unit box -> width sx, height 1

            def local(p, sx=sx, flip=flip):
                q = p * (sx, 1.0)
                if flip:
                    q[:, 0] = sx - q[:, 0]
                return q

            parts, details = [(local(p), paint) for p, paint in parts], [local(p) for p in details]
            pose = ("Left" if flip else "Right") if rng.random() < 0.7 else "Unspecified"
        allpts = np.concatenate([p for p, _ in parts])
        lo, size = allpts.min(0), allpts.max(0) - allpts.min(0)
        cw, ch = cell[2] - cell[0], cell[3] - cell[1]
        scale = min(cw / size[0], ch / size[1]) * rng.uniform(0.6, 0.95)
        x0 = cell[0] + rng.uniform(0, cw - size[0] * scale)
        y0 = cell[1] + rng.uniform(0, ch - size[1] * scale)
        if idx >= no_truncation and rng.random() < 0.15:  # push across the nearer side border
            x0 += (-1 if x0 < w - (x0 + size[0] * scale) else 1) * rng.uniform(0.15, 0.45) * size[0] * scale
        shift = np.array([x0, y0]) - lo * scale
        parts = [(p * scale + shift, paint) for p, paint in parts]
        details = [p * scale + shift for p in details]
        if keypoints is not None:
            keypoints[:, :2] = keypoints[:, :2] * scale + shift
        allpts = np.concatenate([p for p, _ in parts])
        extent = (*allpts.min(0), *allpts.max(0))
        paint_a = canvas.patch(rng, extent, draw.contrasting_colour(rng, bg))
        ca = paint_a.mean_colour()
        paints = {"a": paint_a, "b": draw.contrasting_colour(rng, ca, bg, min_dist=0.3),
                  "c": draw.contrasting_colour(rng, ca, bg, min_dist=0.3)}
        for paint in ("a", "b", "c"):
            polys = [p for p, pt in parts if pt == paint]
            if polys:
                canvas.fill(polys, paints[paint])
        if details:
            canvas.fill(details, np.clip(paints["b"] * 0.5, 0, 1))
        clipped = [c for c in (draw.clip_polygon(p, w, h) for p, _ in parts) if c is not None]
        pts = np.concatenate(clipped)
        bbox = (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))
        truncated = any(p[:, 0].min() < 0 or p[:, 0].max() > w or p[:, 1].min() < 0 or p[:, 1].max() > h
                        for p, _ in parts)
        if keypoints is not None:
            outside = (keypoints[:, 0] < 0) | (keypoints[:, 0] >= w) | (keypoints[:, 1] < 0) | (keypoints[:, 1] >= h)
            keypoints[outside | (keypoints[:, 2] == 0)] = 0  # COCO: unlabelled keypoints are (0, 0, 0)
            keypoints = [round(float(v), 2) for v in keypoints.reshape(-1)]
        visible = sum(map(draw.polygon_area, clipped)) / max(sum(draw.polygon_area(p) for p, _ in parts), 1e-9)
        instances.append(Instance(name, clipped, bbox, truncated, pose, keypoints, {"visible": visible}))
    canvas.clutter(rng, int(rng.integers(0, 3)), max_len=0.12 * min(w, h), width=(0.4, 1.0), blobs=False)
    return canvas.jpeg_bytes(), w, h, instances


def class_schedule(rng: np.random.Generator, n_images: int, classes: tuple[str, ...], min_objects: int = 1,
                   max_objects: int = 4, person_first: float = 0.0) -> list[list[str]]:
    """Object names per image: classes are dealt from shuffled rounds of ``classes``, so each appears
    ``total // len(classes)`` times or more; with ``person_first`` a person leads an image with that probability."""
    lo = min(min_objects, 5)
    hi = min(max(lo, max_objects), 5)
    deck: list[str] = []
    out = []
    for _ in range(n_images):
        k = int(rng.integers(lo, hi + 1))
        names = []
        if person_first and rng.random() < person_first:
            names.append("person")
        while len(names) < k:
            if not deck:
                deck = [classes[i] for i in rng.permutation(len(classes))]
            names.append(deck.pop())
        out.append(names)
    return out

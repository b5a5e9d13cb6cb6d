"""Scene images: the described shapes at 224x224 on a textured background, plus clutter.

``layout`` places the subject and the object so that the relation holds (and is the only
one of left/right/above/below that clearly holds, for the four directional relations);
``render_scene`` draws them with distractor shapes the caption does not mention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from mmssl.data.synth.grammar import COLOURS, SHAPES, Description, Thing

SIZE = 224
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
RADIUS = {"big": (34.0, 44.0), "small": (16.0, 22.0)}
_CLUTTER_RADIUS = (5.0, 10.0)
NEAR_GAP, FAR_DISTANCE = 30.0, 120.0  # pixels between outlines / between centres


@dataclass(frozen=True)
class Placed:
    """A shape drawn at centre ``(x, y)`` with radius ``r`` (pixels)."""

    colour: str
    shape: str
    size: str
    x: float
    y: float
    r: float


def relation_holds(relation: str, a: Placed, b: Placed) -> bool:
    """Whether ``a relation b`` holds geometrically (image y grows downward)."""
    dx, dy = b.x - a.x, b.y - a.y
    gap = float(np.hypot(dx, dy)) - a.r - b.r
    if relation in ("left", "right"):
        sign = 1 if relation == "left" else -1
        return sign * dx > 0 and abs(dx) > 2 * abs(dy) and gap > 4
    if relation in ("above", "below"):
        sign = 1 if relation == "above" else -1
        return sign * dy > 0 and abs(dy) > 2 * abs(dx) and gap > 4
    if relation == "near":
        return 4 < gap < NEAR_GAP
    if relation == "far":
        return float(np.hypot(dx, dy)) > FAR_DISTANCE and gap > 4
    raise ValueError(f"unknown relation {relation!r}")


def _place(thing: Thing, rng: np.random.Generator) -> Placed:
    r = float(rng.uniform(*RADIUS[thing.size or "big"]))
    x, y = rng.uniform(r + 4, SIZE - r - 4, size=2)
    return Placed(thing.colour, thing.shape, thing.size or "big", float(x), float(y), r)


def layout(scene: Description, rng: np.random.Generator) -> list[Placed]:
    """Positions for the scene's one or two objects that satisfy its relation."""
    if scene.relation is None or scene.object is None:
        return [_place(scene.subject, rng)]
    for _ in range(10_000):
        a, b = _place(scene.subject, rng), _place(scene.object, rng)
        if relation_holds(scene.relation, a, b):
            return [a, b]
    raise RuntimeError(f"cannot lay out {scene}")  # unreachable for the relations above


def _shape_points(shape: str, x: float, y: float, r: float, angle: float) -> list[np.ndarray]:
    def ring(n: int, radii: list[float], start: float) -> np.ndarray:
        a = start + np.arange(n) * 2 * np.pi / n
        rr = np.asarray(radii * (n // len(radii)))
        return np.stack([x + rr * np.cos(a), y + rr * np.sin(a)], 1)

    if shape == "circle":
        return [ring(48, [r], 0.0)]
    if shape == "square":
        return [ring(4, [r * 1.2], np.pi / 4 + angle)]
    if shape == "diamond":
        a = np.array([0, np.pi / 2, np.pi, 3 * np.pi / 2])
        return [np.stack([x + r * 0.75 * np.cos(a), y + r * 1.15 * np.sin(a)], 1)]
    if shape == "triangle":
        return [ring(3, [r * 1.25], -np.pi / 2)]
    if shape == "hexagon":
        return [ring(6, [r * 1.05], angle)]
    if shape == "star":
        return [ring(10, [r * 1.2, r * 0.5], -np.pi / 2)]
    if shape == "cross":
        w = r * 0.38
        return [
            np.array([[x - w, y - r], [x + w, y - r], [x + w, y + r], [x - w, y + r]]),
            np.array([[x - r, y - w], [x + r, y - w], [x + r, y + w], [x - r, y + w]]),
        ]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 60)
        hx = 16 * np.sin(t) ** 3
        hy = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return [np.stack([x + r * hx / 16.5, y - r * (hy + 2.5) / 15.5], 1)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw(img: np.ndarray, p: Placed, angle: float, outline: bool) -> None:
    colour = RGB[p.colour]
    for pts in _shape_points(p.shape, p.x, p.y, p.r, angle):
        poly = [np.round(pts * 16).astype(np.int32)]
        cv2.fillPoly(img, poly, colour, lineType=cv2.LINE_AA, shift=4)
        if outline:
            edge = (40, 40, 40) if p.colour != "black" else (200, 200, 200)
            cv2.polylines(img, poly, True, edge, 1, lineType=cv2.LINE_AA, shift=4)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A muted random texture: blurred noise, stripes, checks or a gradient."""
    base = rng.uniform(90, 170, size=3)
    kind = int(rng.integers(4))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if kind == 0:
        tex = cv2.GaussianBlur(
            rng.normal(0, 1, (SIZE, SIZE)).astype(np.float32), (0, 0), float(rng.uniform(2, 8))
        )
        tex = tex / (tex.std() + 1e-6)
    elif kind == 1:
        a, period = rng.uniform(0, np.pi), rng.uniform(8, 30)
        tex = np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
    elif kind == 2:
        period = int(rng.integers(10, 32))
        tex = (((xx // period) + (yy // period)) % 2) * 2 - 1
    else:
        tex = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / SIZE * 2
    tint = rng.uniform(-1, 1, size=3) * 12
    img = base[None, None, :] + tex[..., None] * (14 + tint[None, None, :])
    return np.clip(img, 0, 255).astype(np.uint8)


def clutter(objects: list[Placed], rng: np.random.Generator, count: int) -> list[Placed]:
    """Small distractors that overlap nothing and repeat no mentioned (colour, shape)."""
    taken = {(p.colour, p.shape) for p in objects}
    out: list[Placed] = []
    for _ in range(count * 50):
        if len(out) == count:
            break
        colour, shape = str(rng.choice(COLOURS)), str(rng.choice(SHAPES))
        r = float(rng.uniform(*_CLUTTER_RADIUS))
        x, y = (float(v) for v in rng.uniform(r + 2, SIZE - r - 2, size=2))
        cand = Placed(colour, shape, "clutter", x, y, r)
        if (colour, shape) in taken:
            continue
        if all(np.hypot(x - p.x, y - p.y) > r + p.r * 1.3 + 6 for p in objects + out):
            out.append(cand)
    return out


def render_scene(
    objects: list[Placed], rng: np.random.Generator, clutter_count: int = 5
) -> tuple[np.ndarray, list[Placed]]:
    """``(224, 224, 3)`` uint8 RGB image of the objects on a texture, and the clutter drawn."""
    img = _background(rng)
    extra = clutter(objects, rng, clutter_count)
    for p in extra + objects:
        _draw(img, p, float(rng.uniform(-0.3, 0.3)), outline=p.size != "clutter")
    return img, extra


def scene_record(scene: Description, objects: list[Placed]) -> dict:
    """The scene as JSON: what a caption may say (relation) and where things are."""
    return {"relation": scene.relation, "objects": [asdict(p) for p in objects]}


def scene_from_record(record: dict) -> Description:
    objs = [Thing(o["colour"], o["shape"], o["size"]) for o in record["objects"]]
    return Description(objs[0], record["relation"], objs[1] if len(objs) > 1 else None)

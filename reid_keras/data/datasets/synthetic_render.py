"""Drawing synthetic pedestrians with numpy + OpenCV (issue 2, item 2).

`render_identity_image` draws one image of an `Identity` under a `Camera` (both from
`synthetic_attributes`): the view, pose, scale, shift and occlusion come from the per-image RNG
it is given. Some attributes are view-dependent, as on real people: a logo shows only from the
front, a backpack only from the back or the side (its straps from the front), a shoulder bag only
on its own side.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

from .synthetic_attributes import CLOTHING, VIEWS, Camera, Identity, pick_colour, random_identity

OCCLUDERS = ("pole", "car", "person")


@functools.lru_cache(maxsize=64)
def _background(camera: Camera, h: int, w: int) -> np.ndarray:
    """A texture 1.5x the crop size; each image takes a random window of it (camera pans)."""
    rng = np.random.default_rng([camera.texture_seed, 1])
    bh, bw = h + h // 2, w * 2
    img = np.empty((bh, bw, 3), np.uint8)
    img[:] = camera.wall
    if camera.background == "bricks":
        step = max(4, h // 16)
        for row, y in enumerate(range(0, bh, step)):
            cv2.line(img, (0, y), (bw, y), (90, 90, 90), 1)
            for x in range((row % 2) * step, bw, 2 * step):
                cv2.line(img, (x, y), (x, y + step), (90, 90, 90), 1)
    elif camera.background == "panels":
        for x in range(0, bw, max(6, w // 5)):
            shade = tuple(int(c * rng.uniform(0.6, 1.1)) for c in camera.wall)
            cv2.rectangle(img, (x, 0), (x + max(3, w // 8), bh), shade, -1)
    elif camera.background == "foliage":
        for _ in range(60):
            centre = (int(rng.integers(bw)), int(rng.integers(bh)))
            shade = (int(rng.integers(20, 80)), int(rng.integers(90, 170)), int(rng.integers(20, 90)))
            cv2.circle(img, centre, int(rng.integers(2, max(3, w // 6))), shade, -1)
    top = int(camera.horizon * bh)
    img[top:] = camera.floor
    for y in range(top, bh, max(3, h // 20)):
        cv2.line(img, (0, y), (bw, y), tuple(int(c * 0.8) for c in camera.floor), 1)
    # Clutter (signs, doors, bins) so that a camera's background is not a single colour.
    for _ in range(6):
        x, y = int(rng.integers(bw)), int(rng.integers(bh))
        cw, ch = int(rng.integers(3, max(4, w // 3))), int(rng.integers(3, max(4, h // 4)))
        cv2.rectangle(img, (x, y), (x + cw, y + ch), pick_colour(rng, CLOTHING), -1)
    ramp = np.linspace(0.85, 1.1, bh, dtype=np.float32)[:, None, None]
    return np.clip(img * ramp, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _noise_bank(camera: Camera, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng([camera.texture_seed, 2])
    return np.round(rng.standard_normal((h + 16, w + 16, 3)) * camera.noise).astype(np.int16)


class _Painter:
    """Maps person coordinates (u across, v down, both in person heights) to pixels."""

    def __init__(self, img, cx, top, ph):
        self.img, self.cx, self.top, self.ph = img, cx, top, ph

    def xy(self, u, v):
        """Pixel position in 1/16 px (4 fractional bits, cv2's `shift`), as Python ints."""
        return round((self.cx + u * self.ph) * 16), round((self.top + v * self.ph) * 16)

    def pts(self, uv):
        # Plain Python beats numpy on a handful of points, and this runs ~15 times per image.
        return np.array([self.xy(u, v) for u, v in uv], np.int32)

    def poly(self, uv, colour):
        cv2.fillPoly(self.img, [self.pts(uv)], colour, cv2.LINE_8, 4)

    def ellipse(self, u, v, ru, rv, colour, start=0, end=360):
        axes = (max(16, int(ru * self.ph * 16)), max(16, int(rv * self.ph * 16)))
        cv2.ellipse(self.img, self.xy(u, v), axes, 0, start, end, colour, -1, cv2.LINE_8, 4)

    def line(self, u0, v0, u1, v1, width, colour):
        thick = max(1, int(round(width * self.ph)))
        cv2.line(self.img, self.xy(u0, v0), self.xy(u1, v1), colour, thick, cv2.LINE_8, 4)


def _pattern_on(p: _Painter, ident: Identity, poly, view):
    """Fill the torso polygon with the identity's pattern (accent colour over the base colour)."""
    if ident.pattern == "plain" or (ident.pattern == "logo" and view != "front"):
        return
    if ident.pattern == "logo":
        u, v, r = 0.0, 0.27, 0.045 * ident.width
        if ident.logo == "circle":
            p.ellipse(u, v, r, r, ident.accent)
        elif ident.logo == "triangle":
            p.poly([(u - r, v + r), (u + r, v + r), (u, v - r)], ident.accent)
        else:
            p.poly([(u - r, v - r), (u + r, v - r), (u + r, v + r), (u - r, v + r)], ident.accent)
        return
    h, w = p.img.shape[:2]
    xy = p.pts(poly) // 16
    x0, y0 = max(0, xy[:, 0].min()), max(0, xy[:, 1].min())
    x1, y1 = min(w, xy[:, 0].max() + 1), min(h, xy[:, 1].max() + 1)
    if x1 <= x0 or y1 <= y0:
        return
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(mask, [p.pts(poly)], 1, cv2.LINE_8, 4, (-16 * x0, -16 * y0))
    period = max(2, int(round(ident.period * p.ph)))
    ys = (np.arange(y0, y1) - int(p.top)) // period % 2 == 1
    xs = (np.arange(x0, x1) - int(p.cx) + 1000 * period) // period % 2 == 1
    if ident.pattern == "hstripes":
        on = np.broadcast_to(ys[:, None], mask.shape)
    elif ident.pattern == "vstripes":
        on = np.broadcast_to(xs[None, :], mask.shape)
    else:
        on = ys[:, None] ^ xs[None, :]
    region = p.img[y0:y1, x0:x1]
    region[(mask == 1) & on] = ident.accent


def draw_person(img, ident: Identity, view: str, cx: float, top: float, ph: float, rng) -> None:
    """Draw `ident` seen from `view` with its feet at `top + ph`, centred at column `cx`."""
    p = _Painter(img, cx, top, ph)
    side = view in ("left", "right")
    face = -1.0 if view == "left" else 1.0  # image direction the person faces in a side view
    wf = ident.width * (0.6 if side else 1.0)
    hs, hw = 0.125 * wf, 0.1 * wf  # shoulder and waist half-widths
    stride = rng.uniform(-0.12, 0.12) if side else rng.uniform(-0.02, 0.02)
    swing = rng.uniform(-0.1, 0.1)
    leg_colour = ident.lower if ident.lower_type == "trousers" else ident.skin
    knee = {"trousers": 0.95, "shorts": 0.68, "skirt": 0.72}[ident.lower_type]

    if side and ident.bag == "backpack":
        back = -face * hs
        p.poly([(back, 0.18), (back - face * 0.075, 0.2), (back - face * 0.075, 0.44), (back, 0.44)],
               ident.bag_colour)
    # Legs: skin or trouser colour, then shorts/skirt over the top.
    if side:
        for sgn, shade in ((-1, 0.8), (1, 1.0)):
            foot = sgn * stride
            col = tuple(int(c * shade) for c in leg_colour)
            p.line(0.0, 0.52, foot, 0.95, 0.06 * ident.width, col)
            if ident.lower_type != "trousers":
                p.line(0.0, 0.52, foot * (knee - 0.52) / 0.43, knee, 0.065 * ident.width,
                       tuple(int(c * shade) for c in ident.lower))
            p.ellipse(foot + face * 0.02, 0.965, 0.04, 0.022, ident.shoes)
    else:
        for sgn in (-1, 1):
            p.poly([(sgn * 0.008, 0.56), (sgn * hw, 0.5), (sgn * (0.06 + stride), 0.95),
                    (sgn * 0.012, 0.95)], leg_colour)
            p.ellipse(sgn * (0.035 + stride), 0.965, 0.032, 0.022, ident.shoes)
        if ident.lower_type == "shorts":
            p.poly([(-hw, 0.5), (hw, 0.5), (hw * 0.95, knee), (0.01, knee), (0.0, 0.58),
                    (-0.01, knee), (-hw * 0.95, knee)], ident.lower)
        elif ident.lower_type == "skirt":
            p.poly([(-hw, 0.5), (hw, 0.5), (hw * 1.5, knee), (-hw * 1.5, knee)], ident.lower)
        else:
            p.poly([(-hw, 0.5), (hw, 0.5), (hw, 0.57), (-hw, 0.57)], ident.lower)
    # Torso with its pattern.
    torso = [(-hs, 0.15), (hs, 0.15), (hw, 0.52), (-hw, 0.52)]
    p.poly(torso, ident.upper)
    _pattern_on(p, ident, torso, view)
    # Arms.
    sleeve_end = 0.33 if ident.sleeves == "short" else 0.5
    arms = [(face * 0.01, swing)] if side else [(-1, 0.0), (1, 0.0)]
    for base, sw in arms:
        u0 = base if side else base * (hs - 0.02)
        u1 = (u0 + sw) if side else base * (hs + 0.015)
        frac = (sleeve_end - 0.17) / 0.33
        p.line(u0, 0.17, u1, 0.5, 0.05 * ident.width, ident.skin)
        p.line(u0, 0.17, u0 + (u1 - u0) * frac, sleeve_end, 0.055 * ident.width, ident.upper)
    # Bags.
    if ident.bag == "backpack":
        if view == "back":
            p.poly([(-0.085 * wf, 0.19), (0.085 * wf, 0.19), (0.085 * wf, 0.43), (-0.085 * wf, 0.43)],
                   ident.bag_colour)
        elif view == "front":
            for sgn in (-1, 1):
                p.line(sgn * hs * 0.6, 0.155, sgn * hs * 0.55, 0.34, 0.018, ident.bag_colour)
    elif ident.bag != "none":
        bag_left = ident.bag == "shoulder_left"
        if side and bag_left == (view == "left"):
            p.line(-0.02, 0.16, 0.0, 0.46, 0.015, ident.bag_colour)
            p.poly([(-0.06, 0.44), (0.06, 0.44), (0.06, 0.58), (-0.06, 0.58)], ident.bag_colour)
        elif not side:
            # The person's left is the image right in a front view, the image left from the back.
            s = (1.0 if bag_left else -1.0) * (1.0 if view == "front" else -1.0)
            p.line(-s * hs * 0.8, 0.16, s * (hs + 0.02), 0.47, 0.018, ident.bag_colour)
            p.poly([(s * hs, 0.44), (s * (hs + 0.08), 0.44), (s * (hs + 0.08), 0.58), (s * hs, 0.58)],
                   ident.bag_colour)
    # Head, then hair or hat.
    p.line(0.0, 0.11, 0.0, 0.16, 0.04, ident.skin)
    ru = 0.046 if not side else 0.05
    p.ellipse(0.0, 0.066, ru, 0.064, ident.skin)
    hat = ident.head == "hat"
    if hat:
        p.ellipse(0.0, 0.05, ru * 1.08, 0.05, ident.hat, 180, 360)
        brim = (-ru * 1.3, ru * 1.3) if not side else sorted((-face * ru, face * ru * 2.0))
        p.poly([(brim[0], 0.042), (brim[1], 0.042), (brim[1], 0.056), (brim[0], 0.056)], ident.hat)
    elif view == "back":
        p.ellipse(0.0, 0.064, ru * 1.05, 0.068, ident.hair)
    else:
        p.ellipse(0.0, 0.058, ru * 1.06, 0.06, ident.hair, 180, 360)
        if side:
            p.ellipse(-face * ru * 0.4, 0.066, ru * 0.7, 0.062, ident.hair)
    if ident.head == "long_hair":
        if view == "back":
            p.poly([(-ru, 0.07), (ru, 0.07), (ru * 1.1, 0.26), (-ru * 1.1, 0.26)], ident.hair)
        elif view == "front":
            for sgn in (-1, 1):
                p.poly([(sgn * ru * 0.8, 0.05), (sgn * ru * 1.25, 0.05), (sgn * ru * 1.3, 0.2),
                        (sgn * ru * 0.9, 0.2)], ident.hair)
        else:
            p.poly([(-face * ru * 0.2, 0.06), (-face * ru * 1.1, 0.06), (-face * ru * 1.1, 0.24),
                    (-face * ru * 0.2, 0.24)], ident.hair)


def _occlude(img, rng) -> None:
    """Draw one occluder: a pole, the front of a car-like block, or part of another person."""
    h, w = img.shape[:2]
    kind = OCCLUDERS[int(rng.integers(len(OCCLUDERS)))]
    if kind == "pole":
        x, pw = int(rng.uniform(0.0, 0.9) * w), max(2, int(rng.uniform(0.06, 0.14) * w))
        grey = int(rng.integers(40, 200))
        cv2.rectangle(img, (x, 0), (x + pw, h), (grey, grey, grey + 10), -1)
        cv2.line(img, (x + pw // 3, 0), (x + pw // 3, h), (min(255, grey + 50),) * 3, 1)
    elif kind == "car":
        y = int(h * rng.uniform(0.62, 0.78))
        x0, x1 = (0, int(w * rng.uniform(0.6, 1.0))) if rng.random() < 0.5 else (int(w * rng.uniform(0, 0.4)), w)
        body = pick_colour(rng, CLOTHING)
        cv2.rectangle(img, (x0, y), (x1, h), body, -1)
        cv2.rectangle(img, (x0 + 2, y + 2), (x1 - 2, y + max(3, (h - y) // 3)), (50, 45, 40), -1)
        cv2.circle(img, ((x0 + x1) // 2, h), max(3, (h - y) // 3), (15, 15, 15), -1)
    else:
        other = random_identity(rng)
        ph = h * rng.uniform(0.9, 1.2)
        cx = w * (rng.uniform(-0.35, -0.15) if rng.random() < 0.5 else rng.uniform(1.15, 1.35))
        draw_person(img, other, VIEWS[int(rng.integers(4))], cx, h - ph * rng.uniform(0.85, 1.0), ph, rng)


def _photometric(img, camera: Camera, rng) -> np.ndarray:
    """Camera colour cast, gamma and black level (one LUT), blur and sensor noise."""
    bright = rng.uniform(0.88, 1.12)
    x = np.linspace(0.0, 1.0, 256)[:, None] ** camera.gamma
    lut = np.clip((x * np.asarray(camera.gain)[None, :] * bright + camera.offset) * 255, 0, 255)
    img = cv2.LUT(img, lut.astype(np.uint8).reshape(256, 1, 3))
    sigma = camera.blur * rng.uniform(0.8, 1.25)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    h, w = img.shape[:2]
    bank = _noise_bank(camera, h, w)
    oy, ox = int(rng.integers(16)), int(rng.integers(16))
    return np.clip(img + bank[oy:oy + h, ox:ox + w], 0, 255).astype(np.uint8)


def render_identity_image(identity: Identity | None, camera: Camera, rng: np.random.Generator,
                          size: tuple = (128, 64), views: tuple | None = None,
                          box: str = "detection") -> np.ndarray:
    """Render one H x W x 3 BGR uint8 image of `identity` (None: background only) under `camera`.

    Args:
        identity: the person to draw, or None for an empty scene.
        camera: imaging conditions; its view distribution is used when `views` is None.
        rng: per-image generator (view, pose, scale, shift, occlusion, photometric jitter).
        size: (height, width) of the crop; Market/Duke 128 x 64, CUHK01 160 x 60.
        views: restrict the view to these (drawn uniformly), e.g. CUHK01 camera A front/back.
        box: "query" (hand-drawn, tight, never occluded), "detection" (camera jitter and
            occlusion), "junk" (crop overlapping the person by 20-50 % IoU, Market `-1`) or
            "distractor" (false alarm, < 20 % IoU, Market `0000`).
    """
    h, w = int(size[0]), int(size[1])
    if box not in ("query", "detection", "junk", "distractor"):
        raise ValueError(f"box must be query/detection/junk/distractor, got {box!r}")
    bg = _background(camera, h, w)
    oy, ox = int(rng.integers(bg.shape[0] - h + 1)), int(rng.integers(bg.shape[1] - w + 1))
    img = bg[oy:oy + h, ox:ox + w].copy()
    if views is None:
        view = VIEWS[int(rng.choice(len(VIEWS), p=camera.view_probs))]
    else:
        view = views[int(rng.integers(len(views)))]
    if identity is not None:
        tight = box == "query"
        scale = 1.0 + rng.uniform(-1, 1) * (0.03 if tight else camera.scale_jitter)
        shift = 0.015 if tight else camera.shift_jitter
        dx, dy = rng.uniform(-1, 1) * shift * w, rng.uniform(-1, 1) * shift * h
        if box in ("junk", "distractor"):
            # A box of the same size moved by (dx, dy) has IoU (W-dx)(H-dy) / (2WH - (W-dx)(H-dy)):
            # a shift of W/3..2W/3 along one axis gives 0.5..0.2, beyond 0.7W below 0.18.
            lo, hi = (1 / 3, 2 / 3) if box == "junk" else (0.7, 0.9)
            sgn = 1 if rng.random() < 0.5 else -1
            if rng.random() < 0.5:
                dx = sgn * rng.uniform(lo, hi) * w
            else:
                dy = sgn * rng.uniform(lo, hi) * h
        ph = h * identity.height * scale
        draw_person(img, identity, view, w / 2 + dx, (h - ph) / 2 + dy, ph, rng)
    if box == "detection" and rng.random() < camera.occlusion:
        _occlude(img, rng)
    return _photometric(img, camera, rng)

"""Attributes of synthetic pedestrians and cameras, fixed by a seed (issue 2, item 2).

An `Identity` is drawn once per (seed, pid), a `Camera` once per (seed, camera number); the drawing
itself is in `synthetic_render`.

Colour alone must not identify a person: identities come in groups of `GROUP_SIZE` that share the
upper, lower and accent colours and differ in pattern, lower-body type, bag, head and sleeves
(a distinct combination per member), plus body shape and small-area colours (shoes, hair, skin).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

# BGR clothing colours; several groups draw from the same palette, so colours collide across
# groups too (a CNN must look at patterns and shapes, a colour histogram cannot).
CLOTHING = (
    (30, 30, 30), (235, 235, 235), (128, 128, 128), (90, 40, 20), (200, 90, 30), (230, 180, 120),
    (40, 40, 200), (30, 20, 120), (40, 140, 40), (40, 110, 110), (40, 210, 230), (30, 130, 240),
    (180, 130, 240), (140, 50, 120), (30, 60, 100), (150, 190, 210), (140, 140, 30),
)
SKIN = ((165, 195, 235), (120, 160, 210), (80, 115, 160), (50, 75, 110))
HAIR = ((20, 20, 20), (30, 50, 80), (60, 110, 170), (150, 150, 150))
SHOES = ((25, 25, 25), (240, 240, 240), (40, 70, 110), (120, 120, 120), (40, 40, 160))

VIEWS = ("front", "back", "left", "right")
PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo")
LOWERS = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "shoulder_left", "shoulder_right")
HEADS = ("short_hair", "long_hair", "hat")
SLEEVES = ("long", "short")
GROUP_SIZE = 6
_COMBOS = len(PATTERNS) * len(LOWERS) * len(BAGS) * len(HEADS) * len(SLEEVES)
BACKGROUNDS = ("bricks", "panels", "foliage", "plain")


@dataclasses.dataclass(frozen=True)
class Identity:
    """Fixed appearance of one person; colours are BGR tuples, shape factors are relative."""

    pid: int
    group: int
    upper: tuple
    lower: tuple
    accent: tuple
    pattern: str
    lower_type: str
    bag: str
    head: str
    sleeves: str
    skin: tuple
    hair: tuple
    hat: tuple
    shoes: tuple
    bag_colour: tuple
    height: float   # person height / box height in a well-aligned crop
    width: float    # shoulder-width factor (body shape)
    period: float   # stripe / check period, fraction of person height
    logo: str       # circle / triangle / square


@dataclasses.dataclass(frozen=True)
class Camera:
    """Fixed imaging conditions of one camera (1-based `cam`)."""

    cam: int
    gain: tuple          # per-channel (BGR) colour cast
    offset: float        # black level, in [0, 1] units
    gamma: float
    view_probs: tuple    # over VIEWS
    blur: float          # Gaussian sigma, px
    noise: float         # Gaussian sigma, grey levels
    scale_jitter: float  # relative person-height jitter of detections
    shift_jitter: float  # centre jitter, fraction of the box size
    occlusion: float     # probability that an occluder hides part of a detection
    background: str
    wall: tuple
    floor: tuple
    horizon: float       # floor starts at this fraction of the image height
    texture_seed: int


def pick_colour(rng, table) -> tuple:
    """One entry of a colour table as a tuple of Python ints (what OpenCV wants)."""
    return tuple(int(c) for c in table[int(rng.integers(len(table)))])


def decode_combo(index: int) -> tuple:
    """(pattern, lower_type, bag, head, sleeves) of a combination index in [0, _COMBOS)."""
    out = []
    for options in (PATTERNS, LOWERS, BAGS, HEADS, SLEEVES):
        index, r = divmod(index, len(options))
        out.append(options[r])
    return tuple(out)


@functools.lru_cache(maxsize=4096)  # pure function of (seed, pid); drawn once per image otherwise
def identity_attributes(seed: int, pid: int) -> Identity:
    """The identity `pid` (>= 1) of dataset `seed`; members of a colour group share colours.

    Group `g` holds pids `g*GROUP_SIZE+1 .. (g+1)*GROUP_SIZE`; each member gets a different
    (pattern, lower type, bag, head, sleeves) combination, drawn without replacement.
    """
    if pid < 1:
        raise ValueError(f"pid must be >= 1 for a synthetic identity, got {pid}")
    group = (pid - 1) // GROUP_SIZE
    grng = np.random.default_rng([seed, 11, group])
    upper, lower, accent = (CLOTHING[i] for i in grng.choice(len(CLOTHING), 3, replace=False))
    combo = int(grng.choice(_COMBOS, GROUP_SIZE, replace=False)[(pid - 1) % GROUP_SIZE])
    return _identity(np.random.default_rng([seed, 12, pid]), pid, group, upper, lower, accent, combo)


def random_identity(rng: np.random.Generator) -> Identity:
    """An anonymous passer-by (distractors, occluding people): pid 0, group -1."""
    upper, lower, accent = (CLOTHING[i] for i in rng.choice(len(CLOTHING), 3, replace=False))
    return _identity(rng, 0, -1, upper, lower, accent, int(rng.integers(_COMBOS)))


def _identity(rng, pid, group, upper, lower, accent, combo) -> Identity:
    pattern, lower_type, bag, head, sleeves = decode_combo(combo)
    return Identity(
        pid=pid, group=group, upper=upper, lower=lower, accent=accent, pattern=pattern,
        lower_type=lower_type, bag=bag, head=head, sleeves=sleeves, skin=pick_colour(rng, SKIN),
        hair=pick_colour(rng, HAIR), hat=pick_colour(rng, CLOTHING), shoes=pick_colour(rng, SHOES),
        bag_colour=pick_colour(rng, CLOTHING), height=float(rng.uniform(0.82, 0.95)),
        width=float(rng.uniform(0.8, 1.2)), period=float(rng.uniform(0.03, 0.05)),
        logo=("circle", "triangle", "square")[int(rng.integers(3))])


@functools.lru_cache(maxsize=256)
def camera_style(seed: int, cam: int) -> Camera:
    """Imaging conditions of camera `cam` (1-based) of dataset `seed`."""
    rng = np.random.default_rng([seed, 21, cam])
    probs = rng.dirichlet(np.full(len(VIEWS), 0.7))
    return Camera(
        cam=cam, gain=tuple(float(g) for g in rng.uniform(0.8, 1.15, 3)),
        offset=float(rng.uniform(-0.03, 0.08)), gamma=float(rng.uniform(0.85, 1.2)),
        view_probs=tuple(float(p) for p in probs / probs.sum()),
        blur=float(rng.choice([0.0, 0.5, 0.8, 1.1])), noise=float(rng.uniform(2.0, 9.0)),
        scale_jitter=float(rng.uniform(0.03, 0.12)), shift_jitter=float(rng.uniform(0.02, 0.08)),
        occlusion=float(rng.uniform(0.05, 0.3)),
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        wall=tuple(int(0.45 * c + 0.55 * g) for c, g in zip(pick_colour(rng, CLOTHING), rng.integers(60, 200, 3))),
        floor=tuple(int(v) for v in rng.integers(50, 200, 3)),
        horizon=float(rng.uniform(0.55, 0.8)), texture_seed=int(rng.integers(2**31)))

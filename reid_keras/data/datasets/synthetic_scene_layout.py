"""Synthetic crowded scenes: the plan of every scene, without drawing anything (issue 13, Deliver 2).

`plan_scenes` decides, from seeded generators, which scene goes to which split under which file
name, whom it shows where and at what size, what stands in front of them, and which appearances
are the queries and galleries of the benchmark's protocol (docs/datasets.md §6-7,
docs/protocols.md (d)). `synthetic_scenes` draws and writes the planned scenes.

Content (the Pearson paper's crowded case, §III): 1-12 people per scene; labeled identities, each
seen in 2-5 scenes of its split across cameras (train and test identities disjoint), and
anonymous passers-by (unlabeled); person heights from ~10 % to ~75 % of the image height (40-300 px
at 400 x 600), smaller higher in the frame (a ground plane: height grows linearly with the feet's
row below the camera's floor line); people overlap one another, poles and barriers, but every
labeled person keeps most of its body visible.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .cuhk_sysu import GALLERY_SIZES as CUHK_GALLERY_SIZES
from .synthetic_attributes import VIEWS, camera_style, identity_attributes


@dataclasses.dataclass(frozen=True)
class SceneLayout:
    """How a person-search benchmark lies on disk and how many cameras (places) its scenes use."""

    folder: str
    image_dir: str   # relative to `folder`
    cams: int


SCENE_LAYOUTS = {
    # CUHK-SYSU has no camera ids (street snaps and movie frames): its "cameras" are 8 places.
    "cuhk_sysu": SceneLayout("CUHK-SYSU", "Image/SSM", 8),
    "prw": SceneLayout("PRW-v16.04.20", "frames", 6),
}
DEFAULT_SIZE = (400, 600)          # (height, width) of a scene
DEFAULT_TRAIN_SCENES, DEFAULT_TEST_SCENES = 500, 250
MAX_PEOPLE = 12                    # Pearson paper's crowded scenes: 1-12 people
LABELED_FRACTION = 0.5             # chance that a person slot holds a labeled identity
APPEARANCES = (2, 5)               # scenes per labeled identity within its split
MIN_VISIBLE = {True: 0.6, False: 0.35}   # visible fraction of a labeled / unlabeled person


@dataclasses.dataclass(frozen=True)
class SceneCamera:
    """Fixed geometry of one camera's scenes (pixels): the floor line, person heights at the floor
    line and at the bottom edge (row `bottom`), and where the scene window sits in the background
    texture."""

    floor_y: float
    far_height: float
    near_height: float
    bottom: float
    background_y: int
    background_x: int

    def person_height(self, feet_y: float) -> float:
        """Height of a person whose feet are at row `feet_y`: linear in the row (a ground plane)."""
        return self.far_height + (self.near_height - self.far_height) * (feet_y - self.floor_y) / (
            self.bottom - self.floor_y)


def scene_camera(seed: int, layout: str, cam: int, size: tuple) -> SceneCamera:
    """The `SceneCamera` of camera `cam` (1-based) of `layout` for dataset `seed` at scene `size`."""
    h, w = size
    rng = np.random.default_rng([seed, 61, list(SCENE_LAYOUTS).index(layout), cam])
    floor = float(rng.uniform(0.3, 0.5)) * h
    far, near = float(rng.uniform(0.105, 0.13)) * h, float(rng.uniform(0.62, 0.72)) * h
    return SceneCamera(floor, far, near, float(h), int(rng.integers(0, h // 4 + 1)), int(rng.integers(0, w // 2 + 1)))


@dataclasses.dataclass(frozen=True)
class PlannedPerson:
    """One person to draw: `identity` >= 1 labeled (synthetic identity number), 0 a passer-by;
    `cx` the centre column, `top` the row of the head, `height` the person's height in pixels (its
    box height, within a pixel or two: `synthetic_scenes` draws the tight box)."""

    identity: int
    cx: float
    top: float
    height: float
    view: str
    visible: float   # planned visible fraction (box model), used to pick the clearest query view

    @property
    def feet(self) -> float:
        return self.top + self.height


@dataclasses.dataclass(frozen=True)
class PlannedOccluder:
    """A pole or a barrier (car, bench) standing on the ground at row `ground`; `box` x1y1x2y2."""

    kind: str
    box: tuple
    ground: float


@dataclasses.dataclass(frozen=True)
class PlannedScene:
    """One scene: its file `name`, `split` ("train"/"test"), 1-based `cam`, `index` (seeds its
    drawing), `people` (annotation order) and `occluders`."""

    name: str
    split: str
    cam: int
    index: int
    people: tuple
    occluders: tuple = ()


@dataclasses.dataclass(frozen=True)
class ScenePlan:
    """Every scene of a synthetic person-search set and its protocol.

    `queries`: (scene index, person index) per query, in protocol-file order. CUHK-SYSU: one per
    test identity; PRW: one per test identity and camera it visits (docs/datasets.md §7).
    `galleries` (CUHK-SYSU): gallery size -> per query the scene indices of `TestG<size>`,
    the other scenes showing the query person first; sizes above the test scenes - 1 are left out,
    except 50 (TestG50 is what the -1 protocol reads), which then holds every other test scene.
    """

    layout: str
    seed: int
    size: tuple
    scenes: tuple
    train_ids: tuple
    test_ids: tuple
    queries: tuple
    galleries: dict

    def split(self, name: str) -> list:
        return [s for s in self.scenes if s.split == name]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_scene_args(layout, seed, train_scenes, test_scenes, size) -> tuple:
    """`(SceneLayout, (height, width))` after checking every argument; ValueError naming the bad one."""
    if layout not in SCENE_LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(SCENE_LAYOUTS)} for scenes, got {layout!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int (numpy SeedSequence entropy), got {seed!r}")
    for name, value in (("train_scenes", train_scenes), ("test_scenes", test_scenes)):
        if not _is_int(value) or not 2 <= value <= 100_000:
            raise ValueError(f"{name} must be an int in 2..100000 (a test identity needs two scenes), got {value!r}")
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), got {size!r}") from None
    if h < 64 or w < 64:
        raise ValueError(f"size must be at least 64 x 64 pixels (height, width), got {size!r}")
    return SCENE_LAYOUTS[layout], (h, w)


def _people_count(rng, n: int) -> np.ndarray:
    """1..MAX_PEOPLE people per scene, most often 3-7 (mean ~5.4)."""
    counts = np.arange(1, MAX_PEOPLE + 1)
    weights = np.exp(-0.5 * ((counts - 5) / 3.5) ** 2)
    return rng.choice(counts, size=n, p=weights / weights.sum())


def _assign_identities(rng, slots: np.ndarray, cams: np.ndarray) -> list:
    """Labeled identities of one split: each a list of 2..5 distinct scene indices, the second one
    from another camera when there is one with a free slot. Stops when fewer than two scenes have
    a free labeled slot (those slots hold passers-by)."""
    free = slots.astype(np.int64).copy()
    identities = []
    while np.count_nonzero(free) >= 2:
        k = min(int(rng.integers(APPEARANCES[0], APPEARANCES[1] + 1)), np.count_nonzero(free))
        chosen: list = []
        for _ in range(k):
            candidates = np.flatnonzero(free)
            candidates = candidates[~np.isin(candidates, chosen)]
            if len(chosen) == 1:
                other = candidates[cams[candidates] != cams[chosen[0]]]
                candidates = other if len(other) else candidates
            weights = free[candidates] / free[candidates].sum()
            chosen.append(int(rng.choice(candidates, p=weights)))
        free[chosen] -= 1
        identities.append(sorted(chosen))
    return identities


def _visible_fractions(boxes: np.ndarray, depth: np.ndarray, blockers: np.ndarray, blocker_depth: np.ndarray,
                       grid: int = 8) -> np.ndarray:
    """Per box (x1y1x2y2), the fraction of a grid x 2*grid sample of it not covered by a nearer box
    (people: larger `depth`, the feet's row) or a nearer blocker."""
    u = (np.arange(grid) + 0.5) / grid
    v = (np.arange(2 * grid) + 0.5) / (2 * grid)
    xs = boxes[:, None, None, 0] + u[None, None, :] * (boxes[:, None, None, 2] - boxes[:, None, None, 0])
    ys = boxes[:, None, None, 1] + v[None, :, None] * (boxes[:, None, None, 3] - boxes[:, None, None, 1])
    xs, ys = np.broadcast_arrays(xs, ys)
    all_boxes = np.concatenate([boxes, blockers.reshape(-1, 4)])
    all_depth = np.concatenate([depth, blocker_depth])
    covered = np.zeros(xs.shape, bool)
    for b, d in zip(all_boxes, all_depth):
        inside = (xs >= b[0]) & (xs < b[2]) & (ys >= b[1]) & (ys < b[3])
        covered |= inside & (d > depth)[:, None, None]
    return 1.0 - covered.mean(axis=(1, 2))


def _body_box(cx, top, height) -> np.ndarray:
    """The box model of a person for occlusion planning (the drawn body is ~0.3-0.45 heights wide)."""
    return np.array([cx - 0.17 * height, top, cx + 0.17 * height, top + height], np.float64)


def _place_people(rng, seed: int, identities: list, camera: SceneCamera, size) -> list:
    """Positions for the scene's people (`identities`, 0 = passer-by): feet on the floor below the
    floor line, more often far (small) than near, each labeled person >= 60 % visible in the box
    model, a passer-by >= 35 % (best of 30 tries otherwise). A labeled person's height follows
    its identity's body height (`Identity.height`, 0.82-0.95, relative to its mean 0.885)."""
    h, w = size
    placed: list = []   # (identity, cx, top, height)
    for identity in identities:
        best, best_score = None, -np.inf
        body = identity_attributes(seed, identity).height / 0.885 if identity > 0 else float(rng.uniform(0.93, 1.07))
        for _ in range(30):
            feet = camera.floor_y + 2 + (h - camera.floor_y - 2) * float(rng.uniform()) ** 1.4
            height = camera.person_height(feet) * body
            cand = (identity, float(rng.uniform(0.04, 0.96)) * w, feet - height, height)
            people = placed + [cand]
            boxes = np.array([_body_box(*p[1:]) for p in people])
            vis = _visible_fractions(boxes, boxes[:, 3], np.zeros((0, 4)), np.zeros(0))
            need = np.array([MIN_VISIBLE[p[0] > 0] for p in people])
            score = float(np.min(vis - need))
            if score > best_score:
                best, best_score = cand, score
            if score >= 0:
                break
        placed.append(best)
    return placed


def _plan_occluders(rng, people: list, camera: SceneCamera, size, chance: float) -> tuple:
    """0-2 poles or barriers, each just in front of one person; kept only if every labeled
    person stays >= 50 % visible and every passer-by >= 25 %."""
    h, w = size
    occluders: list = []
    for _ in range(2):
        if not people or rng.uniform() >= chance:
            break
        target = people[int(rng.integers(len(people)))]
        ground = min(float(h), target.feet + float(rng.uniform(0.01, 0.05)) * h)
        ph = target.height
        if rng.uniform() < 0.5:
            half = max(1.0, float(rng.uniform(0.025, 0.05)) * ph)
            cx = target.cx + float(rng.uniform(-0.15, 0.15)) * ph
            box = (cx - half, 0.0, cx + half, ground)
            kind = "pole"
        else:
            top = ground - float(rng.uniform(0.25, 0.45)) * ph
            box = (target.cx - float(rng.uniform(0.3, 1.2)) * ph, top, target.cx + float(rng.uniform(0.3, 1.2)) * ph,
                   ground)
            kind = "barrier"
        box = tuple(float(v) for v in np.clip(box, [0, 0, 0, 0], [w, h, w, h]))
        trial = occluders + [PlannedOccluder(kind, box, ground)]
        boxes = np.array([_body_box(p.cx, p.top, p.height) for p in people])
        vis = _visible_fractions(boxes, boxes[:, 3], np.array([o.box for o in trial]),
                                 np.array([o.ground for o in trial]))
        need = np.array([MIN_VISIBLE[p.identity > 0] - 0.1 for p in people])
        if np.all(vis >= need):
            occluders = trial
    return tuple(occluders)


def _names(rng, layout: str, cams: np.ndarray) -> list:
    """File names: CUHK-SYSU `s<k>.jpg` (k a permutation of 1..n, so train and test interleave as in
    the real set); PRW `c<cam>s<seq>_<frame:06d>.jpg` with 1-3 sequences per camera."""
    n = len(cams)
    if layout == "cuhk_sysu":
        return [f"s{k}.jpg" for k in rng.permutation(np.arange(1, n + 1))]
    names = [""] * n
    for cam in np.unique(cams):
        members = np.flatnonzero(cams == cam)
        seqs = rng.integers(1, 4, size=len(members))
        frames = np.sort(rng.choice(np.arange(1, 1_000_000, 25), size=len(members), replace=False))
        for i, seq, frame in zip(members, seqs, frames):
            names[i] = f"c{cam}s{seq}_{frame:06d}.jpg"
    return names


def plan_scenes(layout: str, seed: int = 0, train_scenes: int = DEFAULT_TRAIN_SCENES,
                test_scenes: int = DEFAULT_TEST_SCENES,
                size: tuple = DEFAULT_SIZE) -> ScenePlan:
    """Every scene of a synthetic person-search set as a `ScenePlan`, without drawing anything.

    Scenes 0..train_scenes-1 are the training split, the rest the test split (the pool / test
    frames). Labeled identities get numbers 1..L through a seeded permutation over both splits
    (so colour groups mix train and test); the identity drawn is `identity_attributes(seed, number)`.
    """
    spec, size = check_scene_args(layout, seed, train_scenes, test_scenes, size)
    rng = np.random.default_rng([seed, 60, list(SCENE_LAYOUTS).index(layout)])
    n = train_scenes + test_scenes
    cams = rng.integers(1, spec.cams + 1, size=n)
    counts = _people_count(rng, n)
    labeled = np.maximum(1, rng.binomial(counts, LABELED_FRACTION))
    splits = {"train": np.arange(train_scenes), "test": np.arange(train_scenes, n)}
    groups = {s: [[int(idx[i]) for i in g] for g in _assign_identities(rng, labeled[idx], cams[idx])]
              for s, idx in splits.items()}
    numbers = rng.permutation(np.arange(1, len(groups["train"]) + len(groups["test"]) + 1))
    ids = {"train": [int(v) for v in numbers[:len(groups["train"])]],
           "test": [int(v) for v in numbers[len(groups["train"]):]]}
    members: list = [[] for _ in range(n)]
    for split in splits:
        for number, scenes in zip(ids[split], groups[split]):
            for s in scenes:
                members[s].append(number)
    names = _names(rng, layout, cams)
    scenes = []
    for i in range(n):
        srng = np.random.default_rng([seed, 62, list(SCENE_LAYOUTS).index(layout), i])
        camera = scene_camera(seed, layout, int(cams[i]), size)
        style = camera_style(seed, int(cams[i]))
        who = list(members[i]) + [0] * max(0, int(counts[i]) - len(members[i]))
        who = [who[j] for j in srng.permutation(len(who))]
        placed = _place_people(srng, seed, who, camera, size)
        boxes = np.array([_body_box(*p[1:]) for p in placed])
        vis = _visible_fractions(boxes, boxes[:, 3], np.zeros((0, 4)), np.zeros(0))
        people = tuple(PlannedPerson(p[0], p[1], p[2], p[3], VIEWS[int(srng.choice(len(VIEWS), p=style.view_probs))],
                                     float(v)) for p, v in zip(placed, vis))
        occluders = _plan_occluders(srng, list(people), camera, size, min(0.9, 2.5 * style.occlusion))
        scenes.append(PlannedScene(names[i], "train" if i < train_scenes else "test", int(cams[i]), i, people,
                                   occluders))
    queries, galleries = _protocol(seed, layout, scenes, ids["test"], groups["test"], test_scenes)
    return ScenePlan(layout, int(seed), size, tuple(scenes), tuple(sorted(ids["train"])),
                     tuple(sorted(ids["test"])), tuple(queries), galleries)


def _person_index(scene: PlannedScene, identity: int) -> int:
    return next(j for j, p in enumerate(scene.people) if p.identity == identity)


def _clearest(rng, scenes, group: list, identity: int) -> int:
    """A scene of `group` where `identity` is (nearly) the most visible, drawn among the ties."""
    vis = np.array([scenes[s].people[_person_index(scenes[s], identity)].visible for s in group])
    return int(rng.choice(np.asarray(group)[vis >= vis.max() - 0.05]))


def _protocol(seed, layout, scenes, test_ids, test_groups, test_scenes) -> tuple:
    """Queries (a clearest appearance) and, for CUHK-SYSU, the TestG<N> galleries of each."""
    by_id = sorted(zip(test_ids, test_groups))
    rng = np.random.default_rng([seed, 73])
    queries = []
    if layout == "prw":
        for number, group in by_id:
            for cam in sorted({scenes[s].cam for s in group}):
                best = _clearest(rng, scenes, [s for s in group if scenes[s].cam == cam], number)
                queries.append((best, _person_index(scenes[best], number)))
        return queries, {}
    first_test = len(scenes) - test_scenes
    galleries = {size: [] for size in CUHK_GALLERY_SIZES if size <= test_scenes - 1 or size == 50}
    for q, (number, group) in enumerate(by_id):
        best = _clearest(rng, scenes, group, number)
        queries.append((best, _person_index(scenes[best], number)))
        positives = [s for s in group if s != best]
        others = [s for s in range(first_test, len(scenes)) if s not in group]
        order = np.random.default_rng([seed, 71, q]).permutation(others)
        for size, lists in galleries.items():
            lists.append(tuple(positives + [int(s) for s in order[:max(0, size - len(positives))]]))
    return queries, {size: tuple(lists) for size, lists in galleries.items()}

"""Person-search plots, written atomically with matplotlib's Agg canvas (no display), like
`metrics/plots.py`: the gallery-size curve (OIM paper §4.4, Fig. 7c), the detection
precision-recall curve (docs/protocols.md (e)) and a results figure: each query's crop beside its
top-k gallery scenes with the matched box, green when it is the query person, red when not.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from reid_keras.metrics.plots import _figure, _save

MATCH_COLOURS = {True: "tab:green", False: "tab:red"}
TRUTH_COLOUR = "gold"


def gallery_size_label(size: int, mean_gallery: Optional[float] = None) -> str:
    """"100", or "all (6,977)" for the full set (-1) with its mean number of gallery scenes per query."""
    if size == -1:
        return "all" if mean_gallery is None else f"all ({mean_gallery:,.0f})"
    return f"{size:,}"


def plot_gallery_size_curve(rows: Sequence[dict], path: str, title: str = "Impact of gallery size") -> str:
    """mAP and top-1 (%) against the gallery size (OIM paper Fig. 7c).

    Each row: `gallery_size` (-1 = every test scene), `mean_gallery` (gallery scenes per query, the x
    position; the full set sits at its real size), `mAP`, `top1` (fractions). Log-scaled x axis.
    """
    if len(rows) < 2:
        raise ValueError(f"plot_gallery_size_curve needs at least two gallery sizes, got {len(rows)}")
    rows = sorted(rows, key=lambda r: r["mean_gallery"])
    x = [max(float(r["mean_gallery"]), 1.0) for r in rows]
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    ax.plot(x, [100 * r["mAP"] for r in rows], marker="s", label="mAP")
    ax.plot(x, [100 * r["top1"] for r in rows], marker="o", label="top-1")
    ax.set_xscale("log")
    ax.set_xticks(x, [gallery_size_label(r["gallery_size"], r["mean_gallery"]) for r in rows], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("gallery size (scenes per query)")
    ax.set_ylabel("%")
    ax.set_ylim(0, 101)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def plot_detection_pr(precision, recall, path: str, ap: float, recall_at_threshold: float,
                      score_threshold: float = 0.5, operating_precision: Optional[float] = None,
                      matching: str = "mutual_best", title: str = "Detection precision-recall") -> str:
    """The detection precision-recall curve; AP and the recall at `score_threshold` in the legend,
    the operating point of the search (recall, precision at the threshold) marked when given."""
    precision, recall = np.asarray(precision, float).reshape(-1), np.asarray(recall, float).reshape(-1)
    if precision.shape != recall.shape:
        raise ValueError(f"precision {precision.shape} and recall {recall.shape} must have the same length")
    fig = _figure(6, 4.5)
    ax = fig.subplots()
    ax.plot(100 * recall, 100 * precision, drawstyle="steps-post",
            label=f"AP {100 * ap:.2f}%, recall@{score_threshold:g} {100 * recall_at_threshold:.2f}%")
    if operating_precision is not None and np.isfinite(operating_precision):
        ax.plot([100 * recall_at_threshold], [100 * operating_precision], marker="o", color="black", linestyle="",
                label=f"score >= {score_threshold:g}: precision {100 * operating_precision:.1f}%")
    ax.set_xlabel("recall (%)")
    ax.set_ylabel("precision (%)")
    ax.set_xlim(0, 101)
    ax.set_ylim(0, 101)
    ax.set_title(f"{title}\n({matching} matching, IoU >= 0.5)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def _read_image(path: str, max_side: int):
    """(RGB uint8 array scaled to at most `max_side`, scale factor), or (None, 1.0) when unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = min(1.0, max_side / max(img.size))
            if scale < 1.0:
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
            return np.asarray(img), scale
    except (OSError, ValueError):
        return None, 1.0


def _placeholder(ax, text: str) -> None:
    ax.imshow(np.full((60, 40, 3), 200, np.uint8))
    ax.text(20, 30, text, ha="center", va="center", fontsize=6, wrap=True)


def _box(ax, box, scale: float, colour: str, style: str = "-", width: float = 2.0) -> None:
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = (float(v) * scale for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=width,
                           linestyle=style))


def _query_crop(path: str, box, margin: float = 0.1, height: int = 160):
    """The query box cut from its scene (with a margin), resized to `height`; None when unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as img:
            img = img.convert("RGB")
            x1, y1, x2, y2 = (float(v) for v in box)
            mx, my = margin * (x2 - x1), margin * (y2 - y1)
            crop = img.crop((max(0, x1 - mx), max(0, y1 - my), min(img.width, x2 + mx), min(img.height, y2 + my)))
            width = max(1, round(crop.width * height / max(crop.height, 1)))
            return np.asarray(crop.resize((width, height)))
    except (OSError, ValueError):
        return None


def plot_search_results(rows: Sequence[dict], path: str, title: str = "Person search results",
                        max_side: int = 320) -> str:
    """Query crops beside their top-k gallery scenes with the matched box drawn.

    Each row: `query_image` (scene path), `query_box` [4] x1y1x2y2, `query_label`, and `matches`: the
    ranked list from `evaluate_search(..., keep_top=k)["top_matches"]` as dicts with `image` (scene
    path), `box`, `similarity`, `is_match` and optionally `truth` (the query person's box in that
    scene, drawn dashed in gold: where a wrong match should have been). Box and frame are green when
    the match is the query person, red when not. Unreadable images are drawn as grey placeholders.
    """
    if not rows:
        raise ValueError("plot_search_results needs at least one query row")
    cols = 1 + max(1, max(len(r["matches"]) for r in rows))
    fig = _figure(1.3 + 2.0 * (cols - 1), 2.0 * len(rows) + 0.8)
    axes = np.asarray(fig.subplots(len(rows), cols, squeeze=False, width_ratios=[0.6] + [1.0] * (cols - 1)))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    for r, row in enumerate(rows):
        ax = axes[r, 0]
        ax.axis("on")
        crop = _query_crop(row["query_image"], row["query_box"])
        if crop is None:
            _placeholder(ax, "query image\nmissing")
        else:
            ax.imshow(crop)
        ax.set_title(row.get("query_label", "query"), fontsize=7)
        for side in ax.spines.values():
            side.set_edgecolor("black")
            side.set_linewidth(3)
        if not row["matches"]:
            axes[r, 1].text(0.0, 0.5, "no gallery detection above the score threshold", fontsize=7,
                            transform=axes[r, 1].transAxes, va="center")
        for k, match in enumerate(row["matches"], start=1):
            ax = axes[r, k]
            ax.axis("on")
            colour = MATCH_COLOURS[bool(match["is_match"])]
            image, scale = _read_image(match["image"], max_side)
            if image is None:
                _placeholder(ax, "image\nmissing")
            else:
                ax.imshow(image)
                if match.get("truth") is not None and not match["is_match"]:
                    _box(ax, match["truth"], scale, TRUTH_COLOUR, style="--", width=1.5)
                _box(ax, match["box"], scale, colour)
            ax.set_title(f"{k}. {match.get('label', '')} sim {match['similarity']:.2f}".replace("  ", " "),
                         fontsize=6, color=colour)
            for side in ax.spines.values():
                side.set_edgecolor(colour)
                side.set_linewidth(3)
    fig.suptitle(f"{title}\nfirst column: query; green = the query person, red = someone else; "
                 "dashed gold = where the query person was")
    return _save(fig, path)


def pick_search_queries(valid, count: int, seed: int = 0) -> list:
    """Up to `count` valid query indices (seeded sample, ascending) for the results figure."""
    candidates = np.flatnonzero(np.asarray(valid, bool))
    if len(candidates) > count:
        candidates = np.sort(np.random.default_rng(seed).choice(candidates, count, replace=False))
    return [int(i) for i in candidates]


def search_result_rows(dataset, result: dict, queries: Sequence[int]) -> list:
    """Rows of `plot_search_results` for `queries` (indices into `dataset.queries`) from an
    `evaluate_search(..., keep_top=k)` result: scene paths, the matched boxes, and the query person's
    own box in each scene that shows them (not where a better-ranked match already found them)."""
    protocol = dataset.search_protocol(result["gallery_size"])
    rows = []
    for i in queries:
        query = dataset.queries[i]
        truth = {protocol.scene_names[int(s)]: box for s, box in zip(protocol.positive_scenes[i],
                                                                      protocol.positive_boxes[i])}
        matches, found = [], set()
        for name, box, sim, hit in result["top_matches"][i]:
            # gold marks where the person was, unless a better-ranked match already found them there
            matches.append({"image": _scene_path(dataset, name), "box": box, "similarity": float(sim),
                            "is_match": bool(hit), "truth": None if name in found else truth.get(name)})
            if hit:
                found.add(name)
        ap = float(result["per_query"]["ap"][i])
        rows.append({"query_image": _scene_path(dataset, query.scene), "query_box": query.box, "matches": matches,
                     "query_label": f"query {query.index} (id {query.pid})\nAP {100 * ap:.1f}%"})
    return rows


def _scene_path(dataset, name: str) -> str:
    try:
        return dataset.scene(name).path
    except KeyError:
        return name  # drawn as a placeholder


def draw_search_plots(out: str, dataset, metrics: dict, search_result: dict, detection: dict,
                      num_queries: int = 4, seed: int = 0) -> dict:
    """The plots of `python -m reid_keras.evaluate_search` in folder `out`; returns {plot name: file name}.

    `metrics["search"]` holds one row per evaluated gallery size (the curve needs two or more),
    `search_result` the `evaluate_search` result with `top_matches` (the results figure),
    `detection` the `evaluate_detection` result (its precision-recall curve).
    """
    import os

    name = metrics["dataset"]
    done = {}
    if len(metrics["search"]) >= 2:
        done["gallery_size"] = plot_gallery_size_curve(metrics["search"], os.path.join(out, "gallery_size.png"),
                                                       title=f"Impact of gallery size, {name}")
    precision, recall = detection_pr_curve(detection)
    done["detection_pr"] = plot_detection_pr(
        precision, recall, os.path.join(out, "detection_pr.png"), ap=detection["ap"],
        recall_at_threshold=detection["recall"], score_threshold=detection.get("score_threshold", 0.5),
        operating_precision=detection.get("precision"), matching=detection.get("matching", "mutual_best"),
        title=f"Detection precision-recall, {name}")
    if search_result.get("top_matches"):
        shown = pick_search_queries(search_result["per_query"]["valid"], num_queries, seed)
        if shown:
            k = max(len(m) for m in search_result["top_matches"])
            done["search_results"] = plot_search_results(
                search_result_rows(dataset, search_result, shown), os.path.join(out, "search_results.png"),
                title=f"Top-{k} gallery matches of {len(shown)} queries, {name} ({search_result['protocol']})")
    return {key: os.path.basename(path) for key, path in done.items()}


def detection_pr_curve(detection: dict):
    """(precision, recall) 1-d arrays of an `evaluate_detection` result's curve."""
    precision, recall = detection["recalls"]
    return np.asarray(precision, float), np.asarray(recall, float)

"""Evaluation plots, each written atomically to the path given (which it returns), drawn with
matplotlib's Agg canvas so no display is needed: CMC curves, ranked-list grids, camera-pair mAP /
rank-1 heatmaps (identification-verification paper Fig. 6), positive / negative distance histograms
with the equal-error threshold, t-SNE of embeddings (same paper, Fig. 4) and the gallery-size curve
(Table VI / Fig. 8).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from reid_keras.io_utils import atomic_write
from reid_keras.metrics.diagnostics import pick_queries, ranked_list


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # Agg canvas via Figure.savefig: no pyplot, no display

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str) -> str:
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=ext, bbox_inches="tight"))


def plot_cmc(curves, path: str, title: str = "CMC curve", max_rank: Optional[int] = None) -> str:
    """CMC curves (`{label: cmc array}` or one array), rank on x, matching rate (%) on y."""
    if not isinstance(curves, dict):
        curves = {"CMC": curves}
    fig = _figure(6, 4.5)
    ax = fig.subplots()
    for label, cmc in curves.items():
        cmc = np.asarray(cmc, dtype=float)[:max_rank] * 100
        ranks = np.arange(1, len(cmc) + 1)
        ax.plot(ranks, cmc, marker="o" if len(cmc) <= 30 else None, markersize=3,
                label=f"{label} (rank-1 {cmc[0]:.1f}%)")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title)
    ax.set_ylim(0, 101)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def _load_image(source, size=(128, 64)) -> np.ndarray:
    if isinstance(source, np.ndarray):
        image = source
    else:
        from PIL import Image

        with Image.open(source) as img:
            image = np.asarray(img.convert("RGB").resize((size[1], size[0])))
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8) if image.max() > 1.0 else (image * 255).astype(np.uint8)
    return image


def plot_ranked_lists(rows: Sequence[dict], path: str, title: str = "Ranked lists (junk removed)") -> str:
    """Grid of query + top-k gallery images; green border = same identity, red = different.

    Each row is a dict: `query` (image array or file path), `query_label`, `gallery` (list of
    images or paths in rank order), `match` (list of bool), optional `labels` (list of str).
    """
    if not rows:
        raise ValueError("plot_ranked_lists needs at least one row")
    cols = 1 + max(len(r["gallery"]) for r in rows)
    fig = _figure(1.1 * cols + 0.5, 2.3 * len(rows) + 0.6)
    axes = np.asarray(fig.subplots(len(rows), cols, squeeze=False))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    for r, row in enumerate(rows):
        ax = axes[r, 0]
        ax.axis("on")
        ax.imshow(_load_image(row["query"]))
        ax.set_title(row.get("query_label", "query"), fontsize=7)
        for side in ax.spines.values():
            side.set_edgecolor("black")
            side.set_linewidth(3)
        labels = row.get("labels") or [""] * len(row["gallery"])
        for k, (image, match, label) in enumerate(zip(row["gallery"], row["match"], labels), start=1):
            ax = axes[r, k]
            ax.axis("on")
            ax.imshow(_load_image(image))
            ax.set_title(f"{k}. {label}".strip(), fontsize=6)
            for side in ax.spines.values():
                side.set_edgecolor("tab:green" if match else "tab:red")
                side.set_linewidth(4)
    fig.suptitle(f"{title}\nfirst column: query; border green = same identity, red = different")
    return _save(fig, path)


def plot_camera_heatmap(matrix: dict, path: str, title: str = "Performance between camera pairs") -> str:
    """mAP and rank-1 heatmaps from `diagnostics.cross_camera_matrix` (rows query, columns gallery camera)."""
    fig = _figure(11, 4.8)
    axes = fig.subplots(1, 2)
    q_labels = [f"c{c + 1}" for c in matrix["query_cameras"]]
    g_labels = [f"c{c + 1}" for c in matrix["gallery_cameras"]]
    for ax, key, name in zip(axes, ("mAP", "rank1"), ("mAP", "rank-1")):
        values = np.asarray(matrix[key], dtype=float) * 100
        im = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=100, cmap="viridis")
        ax.set_xticks(range(len(g_labels)), g_labels)
        ax.set_yticks(range(len(q_labels)), q_labels)
        ax.set_xlabel("gallery camera")
        ax.set_ylabel("query (probe) camera")
        avg = matrix["cross_camera_" + key] * 100
        ax.set_title(f"{name} (%), cross-camera average {avg:.1f}")
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                text = "n/a" if not np.isfinite(values[i, j]) else f"{values[i, j]:.1f}"
                colour = "white" if np.isfinite(values[i, j]) and values[i, j] < 60 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=f"{name} (%)")
    fig.suptitle(f"{title}\n(gallery restricted to one camera; n/a = no valid query, e.g. same camera)")
    return _save(fig, path)


def plot_distance_histograms(positive, negative, path: str, threshold: Optional[float] = None,
                             eer: Optional[float] = None, title: str = "Pair distances") -> str:
    """Histograms of positive and negative pair distances with the equal-error threshold marked."""
    positive, negative = np.asarray(positive, float), np.asarray(negative, float)
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    both = np.concatenate([positive, negative])
    bins = np.linspace(both.min(), both.max() + 1e-9, 60) if len(both) else 10
    ax.hist(negative, bins=bins, density=True, alpha=0.55, color="tab:red",
            label=f"different identity ({len(negative)} pairs)")
    ax.hist(positive, bins=bins, density=True, alpha=0.55, color="tab:green",
            label=f"same identity, other camera ({len(positive)} pairs)")
    if threshold is not None:
        extra = f", EER {eer * 100:.1f}%" if eer is not None else ""
        ax.axvline(threshold, color="black", linestyle="--", label=f"EER threshold {threshold:.3f}{extra}")
    ax.set_xlabel("cosine distance (1 - cos)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def select_for_tsne(pids, max_ids: int = 30, max_points: int = 2000, seed: int = 0) -> np.ndarray:
    """Seeded subsample: up to `max_ids` identities (distractors/junk, ids <= 0, left out), then points."""
    pids = np.asarray(pids)
    ids = np.unique(pids[pids > 0])
    if not len(ids):
        ids = np.unique(pids)
    rng = np.random.default_rng(seed)
    if len(ids) > max_ids:
        ids = np.sort(rng.choice(ids, max_ids, replace=False))
    index = np.flatnonzero(np.isin(pids, ids))
    if len(index) > max_points:
        index = np.sort(rng.choice(index, max_points, replace=False))
    return index


def plot_tsne(features, pids, path: str, is_query=None, max_ids: int = 30, max_points: int = 2000,
              seed: int = 0, perplexity: float = 30.0, title: str = "t-SNE of test embeddings") -> str:
    """2-D t-SNE (sklearn, Barnes-Hut, seeded) of a subsample, coloured by identity."""
    from sklearn.manifold import TSNE

    index = select_for_tsne(pids, max_ids, max_points, seed)
    if len(index) < 3:
        raise ValueError(f"t-SNE needs at least 3 points; the selection has {len(index)}")
    x = np.asarray(features, dtype=np.float32)[index]
    labels = np.asarray(pids)[index]
    coords = TSNE(n_components=2, perplexity=min(perplexity, (len(index) - 1) / 3), init="pca",
                  random_state=seed).fit_transform(x)
    ids = np.unique(labels)
    from matplotlib import colormaps

    cmap = colormaps["tab20"] if len(ids) <= 20 else colormaps["gist_ncar"]
    colours = {pid: cmap(i / max(len(ids) - 1, 1) if len(ids) > 20 else i) for i, pid in enumerate(ids)}
    fig = _figure(7, 6.5)
    ax = fig.subplots()
    query = np.zeros(len(index), bool) if is_query is None else np.asarray(is_query, bool)[index]
    c = [colours[p] for p in labels]
    gallery = ~query
    ax.scatter(coords[gallery, 0], coords[gallery, 1], c=[c[i] for i in np.flatnonzero(gallery)], s=14, marker="o")
    if query.any():
        ax.scatter(coords[query, 0], coords[query, 1], c=[c[i] for i in np.flatnonzero(query)], s=70,
                   marker="*", edgecolors="black", linewidths=0.5)
    # Legend proxies in grey: colours encode identities, the markers encode the split.
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", color="grey", linestyle="", label="gallery image" if is_query is not None
                      else "image")]
    if query.any():
        handles.append(Line2D([], [], marker="*", color="grey", markeredgecolor="black", markersize=11,
                              linestyle="", label="query image"))
    ax.legend(handles=handles, loc="best", title="colour = identity")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(f"{title}\n{len(index)} images of {len(ids)} identities (seed {seed})")
    return _save(fig, path)


def plot_gallery_size_curve(rows: Sequence[dict], path: str, title: str = "Impact of gallery size") -> str:
    """mAP and rank-1 (%) against gallery size, from `diagnostics.gallery_size_curve` rows."""
    sizes = [r["gallery_size"] for r in rows]
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    ax.plot(sizes, [100 * r["rank1"] for r in rows], marker="o", label="rank-1")
    ax.plot(sizes, [100 * r["mAP"] for r in rows], marker="s", label="mAP")
    for r in rows:
        ax.annotate(f"+{r['distractors']:,}", (r["gallery_size"], 100 * r["rank1"]), fontsize=7,
                    textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xlabel("gallery size (images, distractors added)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def draw_evaluation_plots(out: str, metrics: dict, cmc_curves: dict, final: dict, query, gallery, pairs,
                          seed: int = 0, ranked_queries: int = 8, top_k: int = 10, tsne_ids: int = 30,
                          tsne_points: int = 2000) -> dict:
    """The plots of `evaluation.evaluate_model` in folder `out`; returns {plot name: file name}.

    `final` holds the evaluated `query_features` and, after re-ranking, the `distmat`; `query` /
    `gallery` are FeatureSets; `pairs` = (positive, negative) distance samples.
    """
    name = metrics["dataset"]
    done = {"cmc": plot_cmc(cmc_curves, os.path.join(out, "cmc.png"), title=f"CMC curve, {name}")}
    shown = pick_queries(query.pids, gallery.pids, query.camids, gallery.camids, ranked_queries, seed)
    if len(shown) and len(query.paths) and len(gallery.paths):
        rows = []
        for i in shown:
            row = None if final.get("distmat") is None else final["distmat"][i]
            top = ranked_list(i, query.pids, gallery.pids, query.camids, gallery.camids, k=top_k,
                              query_features=final["query_features"], gallery_features=gallery.features,
                              distance_row=row)
            rows.append({"query": str(query.paths[i]), "query_label": f"id {query.pids[i]} c{query.camids[i] + 1}",
                         "gallery": [str(gallery.paths[j]) for j in top["index"]], "match": list(top["match"]),
                         "labels": [f"{d:.2f}" for d in top["distance"]]})
        done["ranked_lists"] = plot_ranked_lists(rows, os.path.join(out, "ranked_lists.png"),
                                                 title=f"Top-{top_k} of {len(rows)} queries, {name} "
                                                       f"({metrics.get('variant', 'baseline')}; distance above)")
    matrix = metrics.get("cross_camera")
    if matrix and np.isfinite(np.asarray(matrix["mAP"], dtype=float)).any():
        done["camera_heatmap"] = plot_camera_heatmap(matrix, os.path.join(out, "camera_heatmap.png"),
                                                     title=f"Performance between camera pairs, {name}")
    positive, negative = pairs
    if len(positive) and len(negative):
        t = metrics.get("same_person_threshold", {})
        done["distance_histograms"] = plot_distance_histograms(
            positive, negative, os.path.join(out, "distance_histograms.png"), threshold=t.get("threshold"),
            eer=t.get("eer"), title=f"Query-gallery pair distances, {name}")
    feats = np.concatenate([query.features, gallery.features])
    pids = np.concatenate([query.pids, gallery.pids])
    if len(select_for_tsne(pids, tsne_ids, tsne_points, seed)) >= 3:
        is_query = np.concatenate([np.ones(len(query), bool), np.zeros(len(gallery), bool)])
        done["tsne"] = plot_tsne(feats, pids, os.path.join(out, "tsne.png"), is_query=is_query, max_ids=tsne_ids,
                                 max_points=tsne_points, seed=seed, title=f"t-SNE of test embeddings, {name}")
    if metrics.get("gallery_size_curve"):
        done["gallery_size"] = plot_gallery_size_curve(metrics["gallery_size_curve"],
                                                       os.path.join(out, "gallery_size.png"),
                                                       title=f"Impact of gallery size, {name}")
    return {k: os.path.basename(v) for k, v in done.items()}

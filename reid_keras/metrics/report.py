"""How evaluation results are summarised: the metrics.json entries, the results.csv columns and the
printed table (rank-k as fractions in files, percentages on screen; docs/protocols.md (a))."""
from __future__ import annotations

import numpy as np

RANKS = (1, 5, 10, 20)
CSV_FIELDS = ["time", "model", "dataset", "variant", "ap_variant", "flip", "rank1", "rank5", "rank10", "rank20",
              "mAP", "mINP", "num_valid_queries", "num_invalid_queries", "eer_threshold", "out"]


def metric_summary(result: dict) -> dict:
    """rank1/5/10/20, mAP, mINP, query counts and the CMC curve of an `evaluate_ranking` result."""
    cmc = np.asarray(result["cmc"], dtype=float)
    summary = {f"rank{k}": float(cmc[k - 1]) for k in RANKS if k <= len(cmc)}
    summary.update(mAP=float(result["mAP"]), mINP=float(result["mINP"]),
                   num_valid_queries=int(result["num_valid_queries"]),
                   num_invalid_queries=int(result["num_invalid_queries"]), cmc=cmc.tolist())
    return summary


def rank_table(result: dict, ranks=RANKS) -> dict:
    """{"rank-k": [fraction, None], ..., "mAP": [fraction, None]}: one evaluation, no spread."""
    cmc = np.asarray(result["cmc"])
    table = {f"rank-{k}": [float(cmc[k - 1]), None] for k in ranks if k <= len(cmc)}
    table["mAP"] = [float(result["mAP"]), None]
    return table


def csv_row(metrics: dict, time: str, out: str) -> dict:
    """The results.csv row of a metrics.json dict (CSV_FIELDS)."""
    row = {"time": time, "model": metrics["model"], "dataset": metrics["dataset"], "variant": metrics["variant"],
           "ap_variant": metrics["ap_variant"], "flip": metrics["flip"],
           "num_valid_queries": metrics["num_valid_queries"], "num_invalid_queries": metrics["num_invalid_queries"],
           "out": out, "eer_threshold": metrics.get("same_person_threshold", {}).get("threshold", "")}
    row.update({k: f"{metrics[k]:.6f}" for k in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP") if k in metrics})
    return row


def _cells(mean_std: dict, spread: bool) -> str:
    return ", ".join(f"{k} {100 * m:.2f}" + (f" ± {100 * sd:.2f}" if spread and sd is not None and np.isfinite(sd)
                                             else "") for k, (m, sd) in mean_std.items())


def format_table(metrics: dict) -> str:
    """The printed summary of a metrics.json dict: one row per variant, percentages, then the extras."""
    label = "mAP (devkit trapezoid)" if metrics["ap_variant"] == "trapezoid" else "mAP (non-interpolated)"
    ranks = [k for k in RANKS if f"rank{k}" in metrics]
    head = f"{'variant':<32}" + "".join(f"{'rank-' + str(k):>9}" for k in ranks) + f"{label:>25}{'mINP':>8}"
    lines = [f"{metrics['dataset']}: {metrics['num_query']} queries ({metrics['num_valid_queries']} valid, "
             f"{metrics['num_invalid_queries']} invalid), gallery {metrics['num_gallery']}", head]
    for name, m in metrics["variants"].items():
        lines.append(f"{name:<32}" + "".join(f"{100 * m[f'rank{k}']:>9.2f}" for k in ranks)
                     + f"{100 * m['mAP']:>25.2f}{100 * m['mINP']:>8.2f}")
    if "dataset_protocol" in metrics:
        paper = metrics["dataset_protocol"]
        lines.append(f"{paper['name']}: " + _cells(paper["mean_std"], spread=True))
        if "multi_shot" in paper:
            lines.append(f"{paper['multi_shot']['name']}: " + _cells(paper["multi_shot"]["mean_std"], spread=False))
    if "multi_query" in metrics:
        mq = metrics["multi_query"]
        lines.append(f"{mq['name']}: " + _cells(mq["mean_std"], spread=False)
                     + f" ({mq['pool_images']} gt_bbox images, {mq['queries_without_pool_images']} queries "
                       "without any)")
    if "same_person_threshold" in metrics:
        t = metrics["same_person_threshold"]
        lines.append(f"same-person threshold (equal error rate): cosine distance <= {t['threshold']:.4f} "
                     f"(EER {100 * t['eer']:.2f}%)")
    if "cross_camera" in metrics:
        c = metrics["cross_camera"]
        lines.append(f"cross-camera average: mAP {100 * c['cross_camera_mAP']:.2f}%, "
                     f"rank-1 {100 * c['cross_camera_rank1']:.2f}%")
    for row in metrics.get("gallery_size_curve", []):
        lines.append(f"gallery {row['gallery_size']:>9,} (+{row['distractors']:,} distractors): "
                     f"rank-1 {100 * row['rank1']:.2f}%, mAP {100 * row['mAP']:.2f}%")
    skipped = metrics.get("skipped") or {}
    if skipped.get("total"):
        lines.append(skipped_line(skipped))
    return "\n".join(lines)


def skipped_line(skipped: dict) -> str:
    """One line for a metrics.json "skipped" entry: the count, the reasons, the first file."""
    reasons = "; ".join(f"{n} {reason}" for reason, n in skipped["by_reason"].items())
    first = next(iter(skipped["examples"].values()), [""])[0]
    return f"skipped {skipped['total']} file(s) (metrics.json \"skipped\" lists examples): {reasons}; e.g. {first}"

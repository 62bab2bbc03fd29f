"""Scoring an instance segmentation against ground truth."""

from __future__ import annotations

import numpy as np

from metascreen.segment._common import relabel_kept

__all__ = ["cells_centred_in", "error_types", "match_instances", "pooled_ap"]


def cells_centred_in(labels: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The instances of ``labels`` whose centroid lies in ``region``, renumbered 1..n.

    Scoring a part of a field (a held-out strip, one half) this way counts every cell
    once, by where its centre is, whether or not it reaches over the part's edge.
    """
    flat = labels.ravel().astype(np.int64)
    size = int(flat.max()) + 1
    area = np.bincount(flat, minlength=size)
    rows, cols = np.indices(labels.shape)
    centre_row = np.bincount(flat, rows.ravel(), size) / np.maximum(area, 1)
    centre_col = np.bincount(flat, cols.ravel(), size) / np.maximum(area, 1)
    inside = region[np.round(centre_row).astype(int), np.round(centre_col).astype(int)] & (area > 0)
    return relabel_kept(labels, inside)


def _overlaps(
    true_labels: np.ndarray, pred_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Areas of the true and predicted labels, and every overlapping (true, pred) pair
    with its intersection and IoU, sparse: counted from the label pairs of the pixels."""
    true_labels, pred_labels = np.asarray(true_labels), np.asarray(pred_labels)
    if true_labels.shape != pred_labels.shape:
        raise ValueError(f"shape mismatch: {true_labels.shape} vs {pred_labels.shape}")
    true_flat = true_labels.ravel().astype(np.int64)
    pred_flat = pred_labels.ravel().astype(np.int64)
    true_area, pred_area = np.bincount(true_flat), np.bincount(pred_flat)
    both = (true_flat > 0) & (pred_flat > 0)
    key, inter = np.unique(true_flat[both] * pred_area.size + pred_flat[both], return_counts=True)
    t, p = np.divmod(key, pred_area.size)
    return true_area, pred_area, t, p, inter, inter / (true_area[t] + pred_area[p] - inter)


def match_instances(
    true_labels: np.ndarray, pred_labels: np.ndarray, *, iou_threshold: float = 0.5
) -> dict[str, float]:
    """Match predicted to true instances by IoU and score them.

    A pair matches when its intersection over union is strictly above
    ``iou_threshold``. For thresholds >= 0.5 a true object can overlap at most one
    prediction that much (and vice versa), so matching is unique without an
    assignment step. Intersections come from counting (true, pred) label pairs.

    Parameters
    ----------
    true_labels, pred_labels : (Y, X) integer arrays
        Instance labels, 0 = background.
    iou_threshold : float
        In [0.5, 1). Default 0.5.

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn`` (int counts); ``ap`` = TP / (TP + FP + FN) (1.0 when both
        images are empty); ``precision`` and ``recall`` (1.0 when undefined);
        ``mean_matched_iou`` over the true positives (NaN when there are none).
    """
    if not 0.5 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must lie in [0.5, 1), got {iou_threshold!r}")
    true_area, pred_area, t, p, inter, iou = _overlaps(true_labels, pred_labels)
    n_true, n_pred = int(np.count_nonzero(true_area[1:])), int(np.count_nonzero(pred_area[1:]))
    matched = iou > iou_threshold

    tp = int(matched.sum())
    fp, fn = n_pred - tp, n_true - tp
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "ap": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "mean_matched_iou": float(iou[matched].mean()) if tp else float("nan"),
    }


def error_types(true_labels: np.ndarray, pred_labels: np.ndarray) -> dict[str, int]:
    """Why true cells were not found: each true cell counted under one kind of error.

    AP says how many cells were lost; this says how, which tells a missing contact
    signal (merges) from missing foreground (misses) or over-cutting (splits). Each true
    cell falls in the first of these that applies:

    * ``matched``: a prediction overlaps it at IoU > 0.5 (:func:`match_instances`);
    * ``missed``: predictions cover less than half of it;
    * ``merged``: at least a third of the prediction that overlaps it most lies in
      other true cells (it was joined to a neighbour);
    * ``split``: two or more predictions each cover at least a fifth of it;
    * ``shape``: one prediction, of the wrong extent.

    ``spurious`` counts the predictions with less than half of their area in true
    cells (debris, background).

    Parameters
    ----------
    true_labels, pred_labels : (Y, X) integer arrays
        Instance labels, 0 = background.

    Returns
    -------
    dict
        ``n_true``, ``matched``, ``missed``, ``merged``, ``split``, ``shape`` (they sum to
        ``n_true``), ``n_pred`` and ``spurious`` (int counts).
    """
    true_area, pred_area, t, p, inter, iou = _overlaps(true_labels, pred_labels)
    present_true, present_pred = true_area > 0, pred_area > 0
    present_true[0] = present_pred[0] = False
    matched = np.zeros(true_area.size, bool)
    matched[t[iou > 0.5]] = True
    covered = np.bincount(t, inter, minlength=true_area.size)
    # the prediction overlapping each true cell most: the last of its pairs by overlap
    order = np.lexsort((inter, t))
    last = order[np.r_[t[order][1:] != t[order][:-1], True]] if order.size else order
    best = np.zeros(true_area.size, np.int64)
    best_inter = np.zeros(true_area.size)
    best[t[last]], best_inter[t[last]] = p[last], inter[last]
    in_cells = np.bincount(p, inter, minlength=pred_area.size)
    pieces = np.bincount(t[inter >= 0.2 * true_area[t]], minlength=true_area.size)

    missed = present_true & ~matched & (covered < 0.5 * true_area)
    open_ = present_true & ~matched & ~missed
    merged = open_ & (in_cells[best] - best_inter >= pred_area[best] / 3.0)
    split = open_ & ~merged & (pieces >= 2)
    return {
        "n_true": int(present_true.sum()),
        "matched": int(matched.sum()),
        "missed": int(missed.sum()),
        "merged": int(merged.sum()),
        "split": int(split.sum()),
        "shape": int((open_ & ~merged & ~split).sum()),
        "n_pred": int(present_pred.sum()),
        "spurious": int((present_pred & (in_cells < 0.5 * pred_area)).sum()),
    }


def pooled_ap(pairs: list[tuple[np.ndarray, np.ndarray]], iou_threshold: float = 0.5) -> float:
    """AP ``TP / (TP + FP + FN)`` pooled over ``(true_labels, pred_labels)`` pairs (1.0 if all empty)."""
    counts = np.zeros(3)
    for truth, labels in pairs:
        scores = match_instances(truth, labels, iou_threshold=iou_threshold)
        counts += [scores["tp"], scores["fp"], scores["fn"]]
    return float(counts[0] / counts.sum()) if counts.sum() else 1.0

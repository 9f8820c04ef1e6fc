"""Task metrics (numpy only; the tests check them against scikit-learn / scipy)."""

from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean()) if len(gold) else 0.0


def f1_for(pred: np.ndarray, gold: np.ndarray, cls: int) -> float:
    tp = float(((pred == cls) & (gold == cls)).sum())
    fp = float(((pred == cls) & (gold != cls)).sum())
    fn = float(((pred != cls) & (gold == cls)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation of a binary task (GLUE's CoLA metric); 0 when a row or column of the confusion
    matrix is empty, as scikit-learn does."""
    p, g = np.asarray(pred) == 1, np.asarray(gold) == 1
    tp, tn = float((p & g).sum()), float((~p & ~g).sum())
    fp, fn = float((p & ~g).sum()), float((~p & g).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom > 0 else 0.0


def macro_f1(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
    return float(np.mean([f1_for(pred, gold, c) for c in range(num_labels)]))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    return float((xc * yc).sum() / denom) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), like scipy.stats.rankdata."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(x)), _ranks(np.asarray(y)))


def task_metrics(kind: str, num_labels: int, pred: np.ndarray, gold: np.ndarray) -> dict:
    if kind == "regression":
        return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold),
                "mse": float(((pred - gold) ** 2).mean())}
    out = {"accuracy": accuracy(pred, gold)}
    if num_labels == 2:
        out["f1"] = f1_for(pred, gold, 1)
        out["matthews"] = matthews(pred, gold)
    else:
        out["macro_f1"] = macro_f1(pred, gold, num_labels)
    return out


def metric_names(kind: str, num_labels: int) -> list[str]:
    """What eval.metric may name for this label space (the keys task_metrics returns, and eval_loss)."""
    if kind == "regression":
        return ["pearson", "spearman", "mse", "eval_loss"]
    return ["accuracy"] + (["f1", "matthews"] if num_labels == 2 else ["macro_f1"]) + ["eval_loss"]


def default_metric(kind: str, num_labels: int) -> str:
    return "pearson" if kind == "regression" else ("accuracy" if num_labels == 2 else "macro_f1")

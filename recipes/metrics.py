"""Metrics per task kind, as torchmetrics objects so that DDP ranks sync their states before computing.

Sequence classification: accuracy, and precision/recall/F1 of the positive class (label 1) for two labels, their
macro average over labels otherwise; a task may ask for more (`TaskSpec.metrics`: "mcc", Matthews correlation,
CoLA's metric). Regression: Pearson and Spearman correlation and the mean squared error. Tagging, per word:
accuracy, and for an IOB2 scheme (NER) entity-level precision/recall/F1 from seqeval (conlleval's rules: an
entity counts only if its span and type are exact), else the macro average over tags. A task whose main metric
is a mean of others (`TaskSpec.mean_of`: GLUE's MRPC, mean of F1 and accuracy; STS-B, of Pearson and Spearman)
gets it computed beside them.
"""

from __future__ import annotations

import warnings

import torch
from seqeval.metrics import f1_score, precision_score, recall_score
from torchmetrics import MeanSquaredError, Metric, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    BinaryPrecision,
    BinaryRecall,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.functional.classification import multiclass_f1_score, multiclass_precision, multiclass_recall
from torchmetrics.utilities import dim_zero_cat

from recipes.tasks import TaskSpec


def classification_metrics(num_labels: int, **kwargs) -> MetricCollection:
    """`update(preds, target)` with label ids of shape (B,)."""
    if num_labels == 2:
        parts = {"accuracy": BinaryAccuracy, "precision": BinaryPrecision, "recall": BinaryRecall, "f1": BinaryF1Score}
        return MetricCollection({k: cls(**kwargs) for k, cls in parts.items()})
    return MetricCollection({
        "accuracy": MulticlassAccuracy(num_labels, average="micro", **kwargs),
        "precision": MulticlassPrecision(num_labels, average="macro", **kwargs),
        "recall": MulticlassRecall(num_labels, average="macro", **kwargs),
        "f1": MulticlassF1Score(num_labels, average="macro", **kwargs),
    })


class TaggingMetrics(Metric):
    """`update(preds, target)` with tag ids of shape (B, W), -100 in `target` on padding.

    Word-level predictions are kept sentence by sentence (flat tensors plus lengths, which concatenate across
    ranks in the same order), since seqeval scores whole entity spans.
    """

    full_state_update = False

    def __init__(self, labels: tuple[str, ...], scheme: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.labels, self.scheme = labels, scheme
        for name in ("preds", "target", "lengths"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        mask = target != -100
        self.preds.append(preds[mask])
        self.target.append(target[mask])
        self.lengths.append(mask.sum(1))

    def compute(self) -> dict[str, torch.Tensor]:
        preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        out = {"accuracy": (preds == target).float().mean()}
        if self.scheme == "iob2":
            sizes = dim_zero_cat(self.lengths).tolist()
            gold, guess = ([[self.labels[i] for i in s.tolist()] for s in t.split(sizes)] for t in (target, preds))
            for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
                out[name] = torch.tensor(fn(gold, guess, zero_division=0), dtype=torch.float)
        else:
            n = len(self.labels)
            for name, fn in (("precision", multiclass_precision), ("recall", multiclass_recall),
                             ("f1", multiclass_f1_score)):
                out[name] = fn(preds, target, n, average="macro")
        return out


def _mcc(num_labels: int, **kwargs) -> Metric:
    return BinaryMatthewsCorrCoef(**kwargs) if num_labels == 2 else MulticlassMatthewsCorrCoef(num_labels, **kwargs)


EXTRA = {"mcc": _mcc}  # TaskSpec.metrics -> a factory taking the number of labels


def regression_metrics(**kwargs) -> MetricCollection:
    """`update(preds, target)` with scores of shape (B,)."""
    with warnings.catch_warnings():  # Spearman keeps every prediction: a dev split's worth is small
        warnings.filterwarnings("ignore", ".*will save all targets and predictions.*")
        return MetricCollection({"pearson": PearsonCorrCoef(**kwargs), "spearman": SpearmanCorrCoef(**kwargs),
                                 "mse": MeanSquaredError(**kwargs)})


class WithMeans(MetricCollection):
    """A collection that also reports the mean of some of its metrics under one name (GLUE's combined scores).

    A correlation of constant predictions is undefined (torchmetrics gives NaN); it counts as 0 here, what a
    predictor that knows nothing scores, so a run's first evaluations stay comparable.
    """

    def __init__(self, metrics: MetricCollection, means: dict[str, tuple[str, ...]]):
        super().__init__(dict(metrics.items(keep_base=True, copy_state=False)), compute_groups=False)
        self.means = means

    def compute(self) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*variance of predictions or target is close to zero.*")
            out = {k: torch.nan_to_num(v.float(), nan=0.0) if k in ("pearson", "spearman") else v
                   for k, v in super().compute().items()}
        for name, parts in self.means.items():
            out[name] = torch.stack([out[p].float() for p in parts]).mean()
        return out


def build_metrics(spec: TaskSpec, **kwargs) -> Metric | MetricCollection:
    """The metrics of a task; kwargs go to torchmetrics (e.g. sync_on_compute=False for a one-process loop)."""
    if spec.kind == "tag":
        return TaggingMetrics(spec.labels, spec.scheme, **kwargs)
    if spec.kind == "regress":
        metrics = regression_metrics(**kwargs)
    else:
        metrics = classification_metrics(len(spec.labels), **kwargs)
        metrics.add_metrics({name: EXTRA[name](len(spec.labels), **kwargs) for name in spec.metrics})
    return WithMeans(metrics, {spec.main_metric: spec.mean_of} if spec.mean_of else {})

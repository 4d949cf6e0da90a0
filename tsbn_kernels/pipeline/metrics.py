"""Evaluation metrics of the four benchmarks (DESIGN.md §5), accumulated over a whole split.

Segmentation accumulates one confusion matrix (mIoU over the classes that occur in prediction or label, pixel
accuracy); depth and normal errors count valid pixels only (depth 0 / normal 0 = invalid); the median normal
angle comes from a 0.001°-bin histogram, so no per-pixel array is kept. A metric with nothing to score (no
labelled pixel, no valid depth or normal, an empty split) is NaN, written as null in metrics.json, never 0: an
error of 0 would count as a perfect score and enter Δm as a −100 % change. CelebA reports the mean accuracy and F1
over the 40 attributes and each attribute's own as ``{name}_accuracy`` / ``{name}_f1`` (flat keys: the CSV holds
one column per key; ``summary`` drops the per-attribute ones for a console line or a plot). Δm follows the
CAGrad / Nash-MTL / FAMO convention (lower is better), against the published single-task baselines below.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .celeba_data import ATTRIBUTES

BASELINES = {
    "nyuv2": {"miou": 0.3830, "pix_acc": 0.6376, "abs_err": 0.6754, "rel_err": 0.2780, "mean_angle": 25.01,
              "median_angle": 19.21, "within_11.25": 0.3014, "within_22.5": 0.5720, "within_30": 0.6915},
    "cityscapes": {"miou": 0.7401, "pix_acc": 0.9316, "abs_err": 0.0125, "rel_err": 27.77},
}
HIGHER_IS_BETTER = {"miou": True, "pix_acc": True, "abs_err": False, "rel_err": False, "mean_angle": False,
                    "median_angle": False, "within_11.25": True, "within_22.5": True, "within_30": True,
                    "accuracy": True, "f1": True, "max_f": True, "ods_f": True}
# PASCAL-Context reports five tasks whose metric names collide (two mIoUs), so its keys carry the task.
HIGHER_IS_BETTER.update({"seg_miou": True, "seg_pix_acc": True, "parts_miou": True, "parts_pix_acc": True,
                         "sal_max_f": True, "sal_miou": True, "normal_mean_angle": False, "normal_median_angle": False,
                         "edge_ods_f": True})
ATTRIBUTE_KEYS = tuple(f"{name}_{metric}" for name in ATTRIBUTES for metric in ("accuracy", "f1"))
HIGHER_IS_BETTER.update(dict.fromkeys(ATTRIBUTE_KEYS, True))
# The metrics Δm averages over for PASCAL-Context (the MTI-Net / ATRC convention: one per task). No published
# single-task baseline is built in: it depends on the backbone; pass one with tsbn-train --baseline FILE.
PASCAL_DELTA_KEYS = ("seg_miou", "parts_miou", "sal_max_f", "normal_mean_angle", "edge_ods_f")


class Segmentation:
    """Confusion matrix over the split; label −1 (or ``ignore_index``) is ignored."""

    def __init__(self, num_classes: int, ignore_index: int = -1):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, logits_or_pred: Tensor, label: Tensor) -> None:
        pred = logits_or_pred.argmax(dim=1) if logits_or_pred.dim() == label.dim() + 1 else logits_or_pred
        valid = label != self.ignore_index
        if bool(((label[valid] < 0) | (label[valid] >= self.num_classes)).any()):
            raise ValueError(f"segmentation labels must lie in [0, {self.num_classes}) or be {self.ignore_index}")
        # An out-of-range prediction would land in another cell of the flattened confusion matrix.
        if bool(((pred[valid] < 0) | (pred[valid] >= self.num_classes)).any()):
            raise ValueError(f"segmentation predictions must lie in [0, {self.num_classes})")
        index = label[valid].long() * self.num_classes + pred[valid].long()
        self.confusion += torch.bincount(index.cpu(), minlength=self.num_classes ** 2).view(
            self.num_classes, self.num_classes)

    def compute(self) -> dict[str, float]:
        c = self.confusion.double()
        tp = c.diagonal()
        union = c.sum(0) + c.sum(1) - tp
        present = union > 0
        miou = (tp[present] / union[present]).mean().item() if bool(present.any()) else math.nan
        return {"miou": miou, "pix_acc": (tp.sum() / c.sum()).item() if c.sum() > 0 else math.nan}


class Depth:
    """Mean absolute and mean relative error over valid pixels (ground truth ≠ 0) of the split."""

    def __init__(self):
        self.abs_sum = self.rel_sum = 0.0
        self.count = 0

    def update(self, pred: Tensor, target: Tensor) -> None:
        valid = target != 0
        diff = (pred - target)[valid].double().abs()
        self.abs_sum += diff.sum().item()
        self.rel_sum += (diff / target[valid].double().abs()).sum().item()
        self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if not self.count:
            return {"abs_err": math.nan, "rel_err": math.nan}
        return {"abs_err": self.abs_sum / self.count, "rel_err": self.rel_sum / self.count}


class Normals:
    """Angle between predicted and true normals (channel dim 1) over valid pixels (true normal ≠ 0)."""

    BINS = 180_000  # 0.001° per bin

    def __init__(self):
        self.histogram = torch.zeros(self.BINS, dtype=torch.long)
        self.angle_sum = 0.0
        self.count = 0

    def update(self, pred: Tensor, target: Tensor) -> None:
        valid = target.abs().sum(dim=1) > 0
        p = torch.nn.functional.normalize(pred.double(), dim=1)
        t = torch.nn.functional.normalize(target.double(), dim=1)
        cos = (p * t).sum(dim=1)[valid].clamp(-1, 1)
        angles = torch.rad2deg(torch.acos(cos))
        self.angle_sum += angles.sum().item()
        self.count += angles.numel()
        bins = (angles / 180 * self.BINS).long().clamp(0, self.BINS - 1).cpu()
        self.histogram += torch.bincount(bins, minlength=self.BINS)

    def compute(self) -> dict[str, float]:
        thresholds = (11.25, 22.5, 30)
        if not self.count:
            return dict.fromkeys(["mean_angle", "median_angle", *(f"within_{t:g}" for t in thresholds)], math.nan)
        n = self.count
        cumulative = self.histogram.cumsum(0)
        # The median as np.median takes it: the middle value, or the mean of the two middle values of an even
        # count (1-based ranks (n + 1) // 2 and n // 2 + 1, the same rank when n is odd).
        low = int(torch.searchsorted(cumulative, (self.count + 1) // 2))
        high = int(torch.searchsorted(cumulative, self.count // 2 + 1))
        width = 180 / self.BINS
        return {"mean_angle": self.angle_sum / n, "median_angle": ((low + high) / 2 + 0.5) * width,
                **{f"within_{t:g}": cumulative[min(int(t / width), self.BINS) - 1].item() / n
                   for t in thresholds}}


class BinaryAttributes:
    """Per-attribute accuracy and F1 of multi-label logits [N, A] against 0/1 targets over the split (a logit > 0
    predicts the attribute). ``compute`` gives the means over the attributes as ``accuracy`` and ``f1``, then
    ``{name}_accuracy`` and ``{name}_f1`` of each attribute in ``names`` order.

    F1 = 2·tp / (2·tp + fp + fn). An attribute neither predicted nor present in the split (tp = fp = fn = 0) has
    no defined F1; it scores 1 here, as sklearn's ``f1_score(..., zero_division=1.0)`` (sklearn's default and
    FAMO's CelebA code give 0): nothing was missed and nothing was claimed, and a perfect classifier scores 1 on
    every attribute. Predicting no positive while the split has some, or only false ones, scores 0 as
    everywhere. On the released val split every attribute occurs, so the convention only shows on small sets."""

    def __init__(self, num_attributes: int, names: tuple[str, ...] | list[str] | None = None):
        if names is not None and len(names) != num_attributes:
            raise ValueError(f"{len(names)} attribute names for {num_attributes} attributes")
        self.names = tuple(names) if names is not None else tuple(f"attr{i:02d}" for i in range(num_attributes))
        self.tp = torch.zeros(num_attributes, dtype=torch.long)
        self.fp = torch.zeros_like(self.tp)
        self.fn = torch.zeros_like(self.tp)
        self.tn = torch.zeros_like(self.tp)

    def update(self, logits: Tensor, target: Tensor) -> None:
        if logits.shape != target.shape or logits.dim() != 2 or logits.shape[1] != len(self.names):
            raise ValueError(f"expected logits and targets of shape [N, {len(self.names)}], got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")
        pred = (logits > 0).cpu()
        target = target.bool().cpu()
        self.tp += (pred & target).sum(0)
        self.fp += (pred & ~target).sum(0)
        self.fn += (~pred & target).sum(0)
        self.tn += (~pred & ~target).sum(0)

    def per_attribute(self) -> dict[str, Tensor]:
        total = (self.tp + self.fp + self.fn + self.tn).double()
        if not bool((total > 0).all()):                  # no sample seen: nothing is defined
            nan = torch.full(total.shape, math.nan, dtype=torch.float64)
            return {"accuracy": nan, "f1": nan.clone()}
        f1_denominator = (2 * self.tp + self.fp + self.fn).double()
        f1 = torch.where(f1_denominator > 0, 2 * self.tp.double() / f1_denominator.clamp_min(1), torch.ones(1).double())
        return {"accuracy": (self.tp + self.tn).double() / total, "f1": f1}

    def compute(self) -> dict[str, float]:
        per = self.per_attribute()
        result = {k: v.mean().item() for k, v in per.items()}
        for i, name in enumerate(self.names):
            result.update({f"{name}_{k}": v[i].item() for k, v in per.items()})
        return result


THRESHOLDS = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


def _count_above(values: Tensor) -> Tensor:
    """[K] float64: how many of ``values`` exceed each of the K thresholds, from one histogram (no [K, pixels]
    tensor): bucketize gives b = #thresholds below a value, so the value exceeds thresholds 0..b−1."""
    thresholds = THRESHOLDS.to(values.device, torch.float32)
    buckets = torch.bucketize(values.float().flatten(), thresholds)
    hist = torch.bincount(buckets, minlength=len(THRESHOLDS) + 1).double().cpu()
    return hist.flip(0).cumsum(0).flip(0)[1:]


class Saliency:
    """Binary saliency from logits [N, 1, H, W] against 0/1 maps, over the split: per threshold of the sigmoid,
    the precision/recall counts of the whole split; ``max_f`` is the best F_β with β² = 0.3 (the saliency
    convention) and ``miou`` the best mean IoU of foreground and background, both over the thresholds."""

    BETA2 = 0.3

    def __init__(self):
        self.tp = torch.zeros(len(THRESHOLDS), dtype=torch.float64)
        self.pred = torch.zeros_like(self.tp)
        self.truth = self.pixels = 0.0

    def update(self, logits: Tensor, target: Tensor) -> None:
        prob = torch.sigmoid(logits.float())
        truth = target.reshape(prob.shape) > 0.5
        self.tp += _count_above(prob[truth])
        self.pred += _count_above(prob)
        self.truth += float(truth.sum())
        self.pixels += prob.numel()

    def compute(self) -> dict[str, float]:
        if not self.pixels:
            return {"max_f": math.nan, "miou": math.nan}
        fp, fn = self.pred - self.tp, self.truth - self.tp
        tn = self.pixels - self.tp - fp - fn
        precision = self.tp / self.pred.clamp_min(1)
        recall = self.tp / max(self.truth, 1.0)
        f = (1 + self.BETA2) * precision * recall / (self.BETA2 * precision + recall).clamp_min(1e-12)
        iou_fg = self.tp / (self.tp + fp + fn).clamp_min(1)
        iou_bg = tn / (tn + fp + fn).clamp_min(1)
        return {"max_f": f.max().item(), "miou": ((iou_fg + iou_bg) / 2).max().item()}


class Edges:
    """Boundary detection from logits [N, 1, H, W] against 0/1 edge maps: a documented proxy of BSDS odsF.

    Per threshold over the split, a predicted edge pixel is a true positive when a ground-truth edge lies within
    ``tolerance`` × the image diagonal (BSDS maxDist 0.0075), and a ground-truth pixel is recalled when a
    prediction lies within that radius; ``ods_f`` is the best F1 over thresholds with one threshold for the
    whole split. Unlike the BSDS benchmark there is no non-maximum suppression and no one-to-one matching, so
    thick predictions are not penalised: compare runs with this proxy, not with published odsF numbers."""

    def __init__(self, tolerance: float = 0.0075):
        self.tolerance = tolerance
        self.pred = torch.zeros(len(THRESHOLDS), dtype=torch.float64)
        self.matched_pred = torch.zeros_like(self.pred)
        self.matched_truth = torch.zeros_like(self.pred)
        self.truth = self.pixels = 0.0

    def update(self, logits: Tensor, target: Tensor) -> None:
        height, width = target.shape[-2:]
        radius = max(1, math.ceil(self.tolerance * math.hypot(height, width)))
        prob = torch.sigmoid(logits.float()).reshape(-1, 1, height, width)
        truth = (target.float().reshape(-1, 1, height, width) > 0.5).float()
        near_truth = F.max_pool2d(truth, 2 * radius + 1, 1, radius) > 0
        # A truth pixel is recalled at threshold θ iff the largest probability within the radius exceeds θ.
        best_near = F.max_pool2d(prob, 2 * radius + 1, 1, radius)
        self.pred += _count_above(prob)
        self.matched_pred += _count_above(prob[near_truth])
        self.matched_truth += _count_above(best_near[truth > 0])
        self.truth += float(truth.sum())
        self.pixels += truth.numel()

    def compute(self) -> dict[str, float]:
        if not self.pixels:
            return {"ods_f": math.nan}
        precision = self.matched_pred / self.pred.clamp_min(1)
        recall = self.matched_truth / max(self.truth, 1.0)
        f = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        return {"ods_f": f.max().item()}


def delta_m(metrics: dict[str, float], baseline: dict[str, float]) -> float:
    """Δm% = (100/K) Σ_k (−1)^{δ_k} (M_k − B_k) / B_k, δ_k = 1 when higher is better; lower Δm is better."""
    keys = [k for k in baseline if k in metrics]
    if not keys:
        raise ValueError(f"no metric in common with the baseline: {sorted(metrics)} vs {sorted(baseline)}")
    total = 0.0
    for k in keys:
        sign = -1.0 if HIGHER_IS_BETTER[k] else 1.0
        total += sign * (metrics[k] - baseline[k]) / baseline[k]
    return 100.0 * total / len(keys)


def delta_m_per_task(task_metrics: dict[str, dict[str, float]], baseline: dict[str, float]) -> float:
    """LibMTL's variant: Δm of each task's own metrics first, then the mean over tasks."""
    values = [delta_m(m, baseline) for m in task_metrics.values()]
    return sum(values) / len(values) if values else math.nan


def metric_names(benchmark: str) -> list[str]:
    """The metric keys BenchmarkMetrics(benchmark).compute() reports (before ``delta_m``)."""
    return list(BenchmarkMetrics(benchmark, baseline={}).compute())


def summary(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` without CelebA's 80 per-attribute keys: what fits a console line or one plot per metric."""
    return {k: v for k, v in metrics.items() if k not in _ATTRIBUTE_KEY_SET}


_ATTRIBUTE_KEY_SET = frozenset(ATTRIBUTE_KEYS)


def delta_m_keys(benchmark: str, baseline: dict | None = None) -> tuple[str, ...]:
    """The metrics Δm averages over when the baseline has them: one per task for PASCAL-Context; for CelebA the
    per-attribute metrics when the baseline has any (its 40 tasks, as FAMO's per-attribute F1 baselines), else
    the two means, never both (the means would count the attributes twice); else all."""
    if benchmark == "pascal":
        return PASCAL_DELTA_KEYS
    if benchmark == "celeba":
        return ATTRIBUTE_KEYS if baseline and any(k in _ATTRIBUTE_KEY_SET for k in baseline) else ("accuracy", "f1")
    return tuple(metric_names(benchmark))


_DELTA_M_RULE = {"pascal": "one metric per task", "celeba": "either the per-attribute metrics or the two means"}


def check_baseline(benchmark: str, baseline) -> list[str]:
    """Validate a single-task baseline {metric: value} for ``benchmark`` before any training: raises ValueError
    when it is not such a mapping, a value is not a finite non-zero number (Δm divides by it) or no key is one
    Δm uses; returns warnings naming the keys Δm ignores (unknown metrics, or metrics outside the Δm convention)
    and the Δm metrics it lacks."""
    if not isinstance(baseline, dict):
        raise ValueError(f"must be a JSON object {{metric: value}}, got {type(baseline).__name__}")
    bad = [k for k, v in baseline.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v == 0]
    if bad:
        raise ValueError(f"values must be finite non-zero numbers (Δm divides by them): {bad}")
    names, used = metric_names(benchmark), delta_m_keys(benchmark, baseline)
    per_attribute = " or per attribute {name}_accuracy, {name}_f1 (Smiling_f1 ...)" if benchmark == "celeba" else ""
    if not any(k in baseline for k in used):
        raise ValueError(f"no key is a metric Δm of {benchmark} uses: {sorted(baseline)}; expected some of "
                         f"{list(used)}{per_attribute}")
    warnings = []
    unknown = [k for k in baseline if k not in names]
    if unknown:
        warnings.append(f"not metrics of {benchmark}, ignored: {unknown} (its metrics: "
                        f"{list(summary(dict.fromkeys(names)))}{per_attribute})")
    outside = [k for k in baseline if k in names and k not in used]
    if outside:
        rule = _DELTA_M_RULE.get(benchmark, "")
        warnings.append(f"not used by Δm, which averages {rule} ({list(used) if len(used) < 10 else 'per attribute'}):"
                        f" {outside}")
    if used is ATTRIBUTE_KEYS:
        # Per attribute, one metric is a complete baseline (FAMO publishes F1 only): name the absent attributes.
        missing = [a for a in ATTRIBUTES if f"{a}_accuracy" not in baseline and f"{a}_f1" not in baseline]
        if missing:
            warnings.append(f"Δm averages over the attributes the baseline has, without {missing}")
    else:
        missing = [k for k in used if k not in baseline]
        if missing:
            warnings.append(f"Δm averages over the metrics the baseline has, without {missing}")
    return warnings


class BenchmarkMetrics:
    """Every metric of one benchmark over a split: ``update(outputs, batch)`` per batch, then ``compute()``, which
    adds ``delta_m`` when a single-task baseline is known (built in for NYUv2 and Cityscapes, or given), over the
    baseline's keys that ``delta_m_keys`` admits (PASCAL-Context: one metric per task; CelebA: per attribute, or
    the two means)."""

    def __init__(self, benchmark: str, num_classes: dict[str, int] | None = None,
                 baseline: dict[str, float] | None = None):
        self.benchmark = benchmark
        self.baseline = baseline if baseline is not None else BASELINES.get(benchmark)
        num_classes = num_classes or {}
        if benchmark == "celeba":
            self.parts = {"attributes": BinaryAttributes(len(ATTRIBUTES), ATTRIBUTES)}
        elif benchmark == "pascal":
            self.parts = {"segmentation": Segmentation(num_classes.get("segmentation", 21)),
                          "human_parts": Segmentation(num_classes.get("human_parts", 7)),
                          "saliency": Saliency(), "normal": Normals(), "edge": Edges()}
        elif benchmark in ("nyuv2", "cityscapes"):
            self.parts = {"segmentation": Segmentation(num_classes.get("segmentation",
                                                                       13 if benchmark == "nyuv2" else 7)),
                          "depth": Depth()}
            if benchmark == "nyuv2":
                self.parts["normal"] = Normals()
        else:
            raise ValueError(f"no metrics for benchmark {benchmark!r}")

    def update(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        if self.benchmark == "celeba":
            self.parts["attributes"].update(torch.cat([o.float() for o in outputs.values()], dim=1),
                                            batch["attributes"])
            return
        for task, metric in self.parts.items():
            metric.update(outputs[task].float(), batch[task])

    def compute(self) -> dict[str, float]:
        if self.benchmark != "pascal":
            result = {k: v for metric in self.parts.values() for k, v in metric.compute().items()}
        else:
            prefixes = {"segmentation": "seg", "human_parts": "parts", "saliency": "sal", "normal": "normal",
                        "edge": "edge"}
            result = {}
            for task, metric in self.parts.items():
                values = metric.compute()
                if task == "normal":
                    values = {k: values[k] for k in ("mean_angle", "median_angle")}
                result.update({f"{prefixes[task]}_{k}": v for k, v in values.items()})
        if self.baseline:
            used = set(delta_m_keys(self.benchmark, self.baseline))
            result["delta_m"] = delta_m(result, {k: v for k, v in self.baseline.items() if k in used})
        return result

"""Evaluation metrics: PRDC, FID, train-on-synthetic/test-on-real and plausibility per class.

**Feature space.** Fidelity metrics (PRDC, FID) are computed on the embeddings of an *evaluation
classifier*: a timm CNN trained on the real (or phantom) training split, saved as its own
directory (``kind: eval_features``), separate from the reward model's backbone. The reward
backbone shapes the reward that trains the diffusion model, and a model must not grade its own
teacher, so the evaluation classifier uses another architecture (``FEATURE_PRESETS``), another
seed, its own path, and ``load_feature_model`` refuses a reward backbone.
The layer is ``Backbone.embed``: timm's ``forward_head(pre_logits=True)``, i.e. the globally
average-pooled output of the last stage (after EfficientNet's 1x1 head conv), just before the
linear classifier. That is the same place Inception's pool3 features come from in the usual FID.

**PRDC** (Naeem et al. 2020) is computed in torch with chunked distances (any device); it agrees
with the reference ``prdc`` package, including its strict ``<`` comparisons. **FID** is the
Fréchet distance of Gaussians fitted to the same features, through an eigen-decomposition (no
complex square roots). **TSTR** trains a classifier on synthetic images and tests it on the real
test split (macro F1, accuracy, macro precision/recall, one-vs-rest AUC), and MAGIC's settings:
real + synthetic and few-shot. Its honest reference is **TRTR at equal counts** (``real_equal``):
the same recipe on as many real train images per class as the synthetic set gave TSTR, so
"synthetic stands in for real" reads off one ratio; both run over several classifier seeds with
a 95 % t interval (``seed_interval``). ``prdc_equal`` is PRDC against the held-out test split
with both sides subsampled to the same count per class. **Plausibility** per class comes with
Wilson intervals, from the feedback store, a feedback export, an evaluator (judge, MLLM) or the
reward model.
Paired comparisons of experiment arms on the same images (McNemar, seeds x images bootstrap,
per class and per criterion) live in ``pathloop.stats``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator

from pathloop.config import ClassifierConfig, updated
from pathloop.vocab import Vocabulary

# Evaluation presets; any other timm name is accepted (never with hub weights). The feature
# model differs from the reward backbone (reward.BACKBONE_PRESETS: test_resnet, resnext50_32x4d).
FEATURE_PRESETS: dict[str, str] = {"tiny": "test_efficientnet", "paper": "resnet50"}
CLASSIFIER_PRESETS: dict[str, str] = {"tiny": "test_resnet", "paper": "resnext50_32x4d"}
FEATURES_KIND = "eval_features"
EMBED_LAYER = "timm forward_head(pre_logits=True): pooled last-stage features before the classifier"

# Train-on-synthetic/test-on-real settings (names are MLflow-safe: no '+').
SETTINGS: dict[str, str] = {
    "real": "all real train images (reference)",
    "synthetic": "synthetic images only (Sun et al. 2023)",
    "real_synthetic": "real train images + synthetic (MAGIC: augmentation)",
    "fewshot": "k real images per class (reference)",
    "fewshot_synthetic": "k real images per class + synthetic (MAGIC: few-shot)",
    "real_equal": "as many real train images per class as synthetic ones (TRTR at equal counts)",
}
REAL_ONLY = ("real", "fewshot")  # settings that do not depend on a generative model
SEEDED = ("synthetic", "real_equal")  # settings run over tstr.seeds classifier seeds
SEED_INTERVALS = ("macro_f1", "accuracy")  # metrics that get a 95 % interval over seeds


def _device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------- classifiers


class FeatureConfig(ClassifierConfig):
    """The evaluation classifier: another architecture and seed than the reward backbone."""

    arch: str = Field(
        "tiny", description="Preset (tiny: test_efficientnet, paper: resnet50) or a timm name."
    )
    seed: int = Field(1, description="Seed of init, batches and augmentation (reward: 0).")


def _resolved(cfg: ClassifierConfig, presets: dict[str, str]) -> ClassifierConfig:
    """``cfg`` with its preset replaced by the timm model name (checked to exist)."""
    from pathloop.classifiers import timm_name

    return updated(cfg, arch=timm_name(presets.get(cfg.arch, cfg.arch)))


def as_input(images: Any, px: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) or float (N, 3, H, W) → float (N, 3, px, px) in [-1, 1] (images of
    another size, e.g. 32 px samples against 64 px real cells, are resized)."""
    import torch.nn.functional as F

    from pathloop.classifiers import to_float_images

    x = to_float_images(images)  # (N, 3, H, W)
    if x.shape[-1] != px or x.shape[-2] != px:
        x = F.interpolate(x, size=(px, px), mode="bilinear", antialias=True)
    return x


def train_classifier(
    x: torch.Tensor, y: np.ndarray, num_classes: int, cfg: ClassifierConfig, presets: dict
) -> Any:
    """A fresh timm ``Backbone`` (preset names looked up in ``presets``) fitted with
    cross-entropy on x (N, 3, H, W), y (N,)."""
    from pathloop.classifiers import build_backbone, fit_classifier

    bcfg = _resolved(cfg, presets)
    torch.manual_seed(bcfg.seed)
    bb = build_backbone(bcfg.arch, num_classes, bcfg.in_px or x.shape[-1])
    fit_classifier(bb, x, torch.as_tensor(y, dtype=torch.long), bcfg)
    return bb.eval()


def predict_proba(model: Any, x: torch.Tensor, device: str | None = None) -> np.ndarray:
    """Softmax class probabilities (N, K) of a classifier on x (N, 3, H, W)."""
    from pathloop.classifiers import batched

    dev = _device(device)
    model.to(dev)
    logits = batched(model, x, dev)  # (N, K)
    return torch.softmax(logits.float(), dim=1).numpy()


# ----------------------------------------------------------------------------- feature space


def train_feature_model(real_shards: str | Path, out: str | Path, cfg: FeatureConfig) -> dict:
    """Train the evaluation classifier on the train split of ``real_shards``; save it to ``out``
    (``kind: eval_features``). Returns its metrics (test-split accuracy when there is one)."""
    from pathloop.classifiers import save_backbone
    from pathloop.data import load_arrays, read_vocab

    vocab = read_vocab(real_shards)
    images, labels = load_arrays(real_shards, split="train")
    if len(images) == 0:
        raise ValueError(f"{real_shards} has no train rows to train the feature model on")
    px = cfg.in_px or images.shape[1]
    bb = train_classifier(as_input(images, px), labels, len(vocab), cfg, FEATURE_PRESETS)
    metrics: dict[str, float] = {"n_train": float(len(images))}
    tx, ty = load_arrays(real_shards, split="test")
    if len(tx):
        pred = predict_proba(bb, as_input(tx, px), "cpu").argmax(1)
        metrics["test_accuracy"] = float((pred == ty).mean())
    bb.cpu()
    extra = {"train": cfg.model_dump(), "shards": str(real_shards), "layer": EMBED_LAYER}
    save_backbone(out, bb, vocab, kind=FEATURES_KIND, extra={**extra, "metrics": metrics})
    return {"path": str(out), **metrics}


def load_feature_model(path: str | Path) -> Any:
    """Load an evaluation classifier (eval mode, CPU). A reward backbone is refused: its kind is
    ``backbone``, and a model must not grade its own teacher."""
    from pathloop.classifiers import load_backbone

    return load_backbone(path, FEATURES_KIND)


def embed(model: Any, images: Any, batch_size: int = 256, device: str | None = None) -> np.ndarray:
    """(N, D) float64 features (``EMBED_LAYER``) of uint8 (N, H, W, 3) or float images."""
    from pathloop.classifiers import batched

    dev = _device(device)
    model.to(dev).eval()
    x = as_input(images, model.in_px)  # (N, 3, px, px)
    return batched(model.embed, x, dev, batch_size).double().numpy()  # (N, D)


# ----------------------------------------------------------------------------- PRDC


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(N,) distance of each row to its k-th nearest other row (the row itself is the 0th)."""
    radii = [
        torch.cdist(x[i : i + chunk], x).topk(k + 1, dim=1, largest=False).values[:, -1]
        for i in range(0, len(x), chunk)
    ]
    return torch.cat(radii)


def prdc(
    real: Any, fake: Any, k: int = 5, chunk: int = 2048, device: str | None = None
) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) of ``fake`` against ``real``
    features, (N, D) and (M, D). Distances in float64, ``chunk`` rows at a time, on ``device``
    (None = CUDA when available): memory is O(chunk x max(N, M))."""
    dev = _device(device)
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=dev)  # (N, D)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=dev)  # (M, D)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(r.shape)}, {f.shape}")
    if min(len(r), len(f)) <= k:
        raise ValueError(
            f"PRDC with k={k} needs more than k real and fake samples, got {len(r)} real and "
            f"{len(f)} fake; sample more images per class or lower fidelity.k"
        )
    r_real, r_fake = _knn_radii(r, k, chunk), _knn_radii(f, k, chunk)  # (N,), (M,)
    inside = torch.zeros(len(f), dtype=torch.float64, device=dev)  # real balls holding fake j
    recall_hits, covered = [], []
    for i in range(0, len(r), chunk):
        d = torch.cdist(r[i : i + chunk], f)  # (c, M)
        in_real_ball = d < r_real[i : i + chunk, None]  # (c, M)
        inside += in_real_ball.sum(0)
        recall_hits.append((d < r_fake[None, :]).any(1))  # (c,)
        covered.append(d.min(1).values < r_real[i : i + chunk])  # (c,)
    return {
        "precision": float((inside > 0).double().mean()),
        "recall": float(torch.cat(recall_hits).double().mean()),
        "density": float(inside.mean() / k),
        "coverage": float(torch.cat(covered).double().mean()),
    }


# ----------------------------------------------------------------------------- FID


def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"FID needs (N, D) features with N >= 2, got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) (Dowson & Landau 1982).

    tr((S1 S2)^1/2) is taken as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^1/2 S2 S1^1/2, so it stays real and stable when covariances are singular (D > N)."""
    from scipy.linalg import eigh, eigvalsh

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    w, v = eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # (D, D)
    m = s1_half @ s2 @ s1_half
    tr_covmean = np.sqrt(np.clip(eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def fid(real: Any, fake: Any) -> float:
    """Fréchet distance between Gaussians fitted to (N, D) real and (M, D) fake features."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


# ----------------------------------------------------------------------------- classification


def classification_metrics(y_true: Any, proba: Any) -> dict[str, float]:
    """Accuracy, macro F1/precision/recall and one-vs-rest AUC of class probabilities (N, K).

    Macro averages run over the classes present in ``y_true`` (a class the test split lacks
    has no recall to average); the AUC of a class needs both positives and negatives."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y) or len(y) == 0:
        raise ValueError(f"need proba (N, K) for N = {len(y)} labels, got shape {p.shape}")
    present = np.unique(y)
    pred = p.argmax(1)
    prec, rec, f1, _ = precision_recall_fscore_support(
        y, pred, labels=present, average="macro", zero_division=0
    )
    aucs = [roc_auc_score(y == c, p[:, c]) for c in present if 0 < (y == c).sum() < len(y)]
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1),
        "macro_precision": float(prec),
        "macro_recall": float(rec),
        "auc_ovr": float(np.mean(aucs)) if aucs else float("nan"),
    }


def take_per_class(y: np.ndarray, k: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``k`` seeded-random rows of each class (None = all rows)."""
    if k is None:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def take_matching(y: np.ndarray, like: np.ndarray, seed: int) -> np.ndarray:
    """Sorted indices of seeded-random rows of ``y`` with, per class, exactly as many rows as
    ``like`` has of that class (TRTR at equal counts); too few rows of a class is an error."""
    rng, keep = np.random.default_rng(seed), []
    classes, counts = np.unique(like, return_counts=True)
    for c, n in zip(classes, counts, strict=True):
        rows = np.flatnonzero(y == c)
        if len(rows) < n:
            raise ValueError(
                f"real_equal needs {n} real train images of class id {c}, the train split has "
                f"{len(rows)}; lower tstr.synthetic_per_class to {len(rows)} or drop real_equal "
                "from tstr.settings"
            )
        keep.append(rng.permutation(rows)[:n])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


class TSTRConfig(ClassifierConfig):
    """Train on synthetic (and/or real), test on the real test split."""

    arch: str = Field("tiny", description="Preset (tiny: test_resnet, paper: ResNeXt-50) or timm.")
    seed: int = Field(2, description="Seed of init, batches, augmentation and subsets.")
    synthetic_per_class: int = Field(
        128, gt=0, description="Synthetic training images per class (paper: 128)."
    )
    fewshot_k: int = Field(5, gt=0, description="Real images per class in the few-shot settings.")
    settings: tuple[str, ...] = Field(
        tuple(SETTINGS), description=f"Which settings to run: {', '.join(SETTINGS)}."
    )
    seeds: int = Field(
        3,
        ge=1,
        description=f"Classifier seeds (seed, seed + 1, ...) of the {' and '.join(SEEDED)} "
        "settings in the evaluation job: their mean and 95 % t interval; 1 = no interval.",
    )

    @field_validator("settings")
    @classmethod
    def _known_settings(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in v if s not in SETTINGS]
        if bad:
            raise ValueError(f"unknown TSTR setting(s) {bad}; valid: {', '.join(SETTINGS)}")
        return v


def _training_set(setting: str, real: tuple, syn: tuple | None, cfg: TSTRConfig) -> tuple:
    """(x, y) a setting trains on; ``real`` and ``syn`` are (x (N, 3, H, W), y (N,)) pairs.
    ``real_equal`` takes, per class, as many real rows as the synthetic setting would use."""
    parts = []
    if setting in ("real", "real_synthetic"):
        parts.append(real)
    if setting.startswith("fewshot"):
        idx = take_per_class(real[1], cfg.fewshot_k, cfg.seed)
        parts.append((real[0][idx], real[1][idx]))
    if setting.endswith("synthetic") or setting == "real_equal":
        if syn is None:
            raise ValueError(f"setting {setting!r} needs synthetic images")
        idx = take_per_class(syn[1], cfg.synthetic_per_class, cfg.seed)
        parts.append((syn[0][idx], syn[1][idx]))
    if setting == "real_equal":
        idx = take_matching(real[1], parts.pop()[1], cfg.seed)
        parts.append((real[0][idx], real[1][idx]))
    return torch.cat([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def tstr(
    setting: str,
    real_train: tuple,
    real_test: tuple,
    num_classes: int,
    cfg: TSTRConfig,
    synthetic: tuple | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """Train a fresh classifier for ``setting`` and test it on the real test split.

    Each data argument is (x float (N, 3, H, W) at one size, y (N,) class ids)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown TSTR setting {setting!r}; valid: {', '.join(SETTINGS)}")
    x, y = _training_set(setting, real_train, synthetic, cfg)
    model = train_classifier(x, y, num_classes, cfg, CLASSIFIER_PRESETS)
    out = classification_metrics(real_test[1], predict_proba(model, real_test[0], device))
    least = float(np.unique(y, return_counts=True)[1].min())  # training images of the rarest class
    return {**out, "n_train": float(len(y)), "n_per_class": least}


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student's t interval of the mean of per-seed values (``scipy.stats.t``);
    (mean, nan, nan) for one value, (mean, mean, mean) when all values are equal."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"seed_interval needs a 1-d sequence of values, got shape {v.shape}")
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    sem = float(stats.sem(v))
    if sem == 0:  # scipy wants scale > 0; no spread over seeds = no width
        return mean, mean, mean
    lo, hi = stats.t.interval(confidence, len(v) - 1, loc=mean, scale=sem)
    return mean, float(lo), float(hi)


def over_seeds(runs: Sequence[dict[str, float]], intervals: Sequence[str]) -> dict[str, Any]:
    """Per-seed metric dicts → the mean of each metric, ``<m>_lo`` / ``<m>_hi`` (95 % t
    interval) and ``<m>_per_seed`` for each metric in ``intervals``, and ``n_seeds``."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        mean, lo, hi = seed_interval([r[key] for r in runs])
        out[key] = mean
        if key in intervals:
            out.update({f"{key}_lo": lo, f"{key}_hi": hi})
            out[f"{key}_per_seed"] = [float(r[key]) for r in runs]
    return {**out, "n_seeds": float(len(runs))}


def tstr_seeds(
    setting: str,
    real_train: tuple,
    real_test: tuple,
    num_classes: int,
    cfg: TSTRConfig,
    synthetic: tuple | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """``tstr`` with seeds ``cfg.seed + i`` for i < ``cfg.seeds`` (init, batches and subsets):
    the mean of every metric and a 95 % t interval of ``SEED_INTERVALS`` over the seeds."""
    runs = []
    for i in range(cfg.seeds):
        one = updated(cfg, seed=cfg.seed + i)
        runs.append(tstr(setting, real_train, real_test, num_classes, one, synthetic, device))
    return over_seeds(runs, SEED_INTERVALS)


def _equal_subsets(a_ids: np.ndarray, b_ids: np.ndarray) -> int:
    """m: the most images per class both sets can give, over the classes of ``b_ids``."""
    classes = np.unique(b_ids)
    return int(min(min((a_ids == c).sum(), (b_ids == c).sum()) for c in classes))


def prdc_equal(
    real: tuple[np.ndarray, np.ndarray],
    fake: tuple[np.ndarray, np.ndarray],
    k: int = 5,
    seeds: Sequence[int] = (0,),
    chunk: int = 2048,
    device: str | None = None,
) -> dict[str, Any]:
    """PRDC of ``fake`` against ``real`` (each (features (N, D), class ids (N,))) at equal
    counts: over the classes of ``fake``, m = the smaller set's least per-class count, and both
    sides are subsampled (seeded, per seed) to m images of each class; the mean and 95 % t
    interval over the seeds, with ``n_per_class`` = m. The real side keeps only fake's classes."""
    rf, ry = np.asarray(real[0]), np.asarray(real[1])
    ff, fy = np.asarray(fake[0]), np.asarray(fake[1])
    m = _equal_subsets(ry, fy)
    if m == 0:
        raise ValueError("equal-count PRDC: the real split lacks a class of the synthetic set")
    ours = np.isin(ry, np.unique(fy))
    rf, ry = rf[ours], ry[ours]
    runs = []
    for s in seeds:
        ri, fi = take_per_class(ry, m, s), take_per_class(fy, m, s)  # (C*m,) each
        runs.append(prdc(rf[ri], ff[fi], k, chunk, device))
    return {**over_seeds(runs, tuple(runs[0])), "n_per_class": float(m)}


# ----------------------------------------------------------------------------- plausibility


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (z = 1.96: 95 %); (nan, nan) when n = 0.

    Counts per class are small (tens of images), where the normal interval fails. statsmodels'
    ``proportion_confint(method="wilson")``, clipped so that k / n lies inside it exactly (at
    k = 0 or k = n its bound can sit 1e-17 past the rate)."""
    from scipy.stats import norm
    from statsmodels.stats.proportion import proportion_confint

    if n <= 0:
        return float("nan"), float("nan")
    alpha = 2 * float(norm.sf(z))  # z = 1.96 -> 0.05
    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    p = k / n
    return max(0.0, min(float(lo), p)), min(1.0, max(float(hi), p))


def rate_difference(k1: int, n1: int, k0: int, n0: int) -> tuple[float, float, float]:
    """(k1/n1 - k0/n0, 95 % interval) of two independent proportions, e.g. one model's
    plausible rate against another's on their own samples: Newcombe's hybrid score interval
    (built from the two Wilson intervals; statsmodels ``confint_proportions_2indep``, method
    ``newcomb``). NaNs when either n is 0."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    if n1 <= 0 or n0 <= 0:
        return float("nan"), float("nan"), float("nan")
    lo, hi = confint_proportions_2indep(k1, n1, k0, n0, method="newcomb", compare="diff")
    return k1 / n1 - k0 / n0, float(lo), float(hi)


def _rate_row(votes: np.ndarray, z: float) -> dict[str, float]:
    k, n = int(votes.sum()), len(votes)
    lo, hi = wilson_interval(k, n, z)
    return {"n": n, "k": k, "rate": k / n if n else float("nan"), "lo": lo, "hi": hi}


def plausibility_table(
    plausible: Any, class_ids: Any, vocab: Vocabulary, z: float = 1.96
) -> dict[str, Any]:
    """Per-class and overall plausible rates with Wilson intervals. ``plausible`` holds 1/0 per
    image, NaN (or None) for unscored images, which are left out of n."""
    p = np.asarray([np.nan if v is None else float(v) for v in plausible], dtype=np.float64)
    c = np.asarray(class_ids, dtype=np.int64)
    scored = ~np.isnan(p)
    per_class = {}
    for info in vocab.classes:
        m = scored & (c == info.id)
        if (c == info.id).any():
            per_class[info.code] = {"name": info.name, **_rate_row(p[m] >= 0.5, z)}
    return {"overall": _rate_row(p[scored] >= 0.5, z), "per_class": per_class}


def plausible_by_evaluator(
    name: str, images: Sequence[np.ndarray], class_ids: Any, vocab: Vocabulary, **options: Any
) -> np.ndarray:
    """1/0 per image from a registered evaluator (judge, mllm); NaN where it gave no verdict."""
    from pathloop.experts import get_evaluator

    verdicts = get_evaluator(name, **options)(list(images), [int(c) for c in class_ids], vocab)
    return np.array([np.nan if v.plausible is None else float(v.plausible) for v in verdicts])


def plausible_by_reward(
    reward_model: Any,
    images: Any,
    class_ids: Any,
    vocab: Vocabulary,
    threshold: float = 0.5,
    tracking_uri: str | None = None,
) -> np.ndarray:
    """1/0 per image: the reward model's P(plausible) >= ``threshold``. ``reward_model`` is a
    loaded ``RewardModel`` or any reference ``reward.load_reward_model`` takes. Classes are
    matched by name, so the images' vocabulary may order classes differently."""
    from pathloop.reward import load_reward_model

    model = reward_model
    if isinstance(reward_model, str | Path):
        model = load_reward_model(reward_model, tracking_uri)
    ids = remap_ids(np.asarray(class_ids), vocab, model.vocab)
    return (model.score(images, ids) >= threshold).astype(np.float64)


def remap_ids(class_ids: np.ndarray, src: Vocabulary, dst: Vocabulary) -> np.ndarray:
    """Class ids of ``src`` → ids of the same-named classes in ``dst``; a missing one is an
    error naming it (a model and its reference data must share their classes)."""
    missing = sorted({src.lookup(int(c)).name for c in np.unique(class_ids)} - set(dst.names))
    if missing:
        raise ValueError(
            f"classes {missing} are not in the reference vocabulary ({', '.join(dst.names)}); "
            "evaluate models against data with the same classes"
        )
    table = np.array([dst.lookup(c.name).id if c.name in dst.names else -1 for c in src.classes])
    return table[np.asarray(class_ids, dtype=np.int64)]


def plausible_from_store(
    store: Any, round_id: int, sources: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, Vocabulary]:
    """(1/0 majority vote per labelled image, class ids, vocabulary) of a feedback round, from
    labels of ``sources`` (human, mllm, judge; None = all). ``store`` is a ``FeedbackStore`` or
    its URL. A tie counts as implausible, as in ``feedback.aggregate_labels``."""
    from collections import defaultdict

    from pathloop.feedback import FeedbackStore, aggregate_labels
    from pathloop.feedback_db import SOURCES

    bad = sorted(set(sources or ()) - set(SOURCES))
    if bad:
        raise ValueError(f"unknown label sources {bad}; valid: {', '.join(SOURCES)}")
    st = store if isinstance(store, FeedbackStore) else FeedbackStore(store)
    by_image = defaultdict(list)
    for lab in st.labels(round_id):
        if lab.plausible is not None and (sources is None or lab.source in sources):
            by_image[lab.image_id].append(lab)
    images = [im for im in st.images(round_id) if by_image[im.image_id]]
    votes = [aggregate_labels(by_image[im.image_id])["plausible"] for im in images]
    ids = np.array([im.class_id for im in images], dtype=np.int64)
    return np.asarray(votes, dtype=np.float64), ids, st.vocabulary(round_id)


def plausible_from_export(path: str | Path) -> tuple[np.ndarray, np.ndarray, Vocabulary]:
    """(plausible target >= 0.5 as 1/0, class ids, vocabulary) of a ``feedback.parquet`` export."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["class_id", "plausible"])
    meta = table.schema.metadata or {}
    if b"pathloop.vocabulary" not in meta:
        raise ValueError(
            f"{path} has no pathloop.vocabulary metadata; write it with `review export`"
        )
    vocab = Vocabulary.model_validate_json(meta[b"pathloop.vocabulary"])
    p = np.asarray(table["plausible"].to_numpy(zero_copy_only=False), dtype=np.float64)
    return (p >= 0.5).astype(np.float64), table["class_id"].to_numpy().astype(np.int64), vocab


# ---------------------------------------------------------------------------- inter-rater agreement


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa of two raters over the same items (``sklearn.metrics.cohen_kappa_score``).

    Degenerate case: when both raters used one and the same label for every item, p_e = 1 and
    the ratio is 0/0; that is perfect agreement, so it returns 1.0. No items gives NaN.
    """
    from sklearn.metrics import cohen_kappa_score

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"raters rated different numbers of items: {a.shape} vs {b.shape}")
    if a.size == 0:
        return float("nan")
    if len(np.union1d(a, b)) == 1:
        return 1.0
    return float(cohen_kappa_score(a, b))


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa from an (items, categories) table of how many raters chose each category.

    Items may have different numbers of ratings (each needs at least 2): P_i uses the item's own
    n_i, which reduces to Fleiss (1971) when every n_i is the same. When every rating falls in one
    category P_e = 1 and the ratio is 0/0; that is perfect agreement, so it returns 1.0. No items
    gives NaN.
    """
    counts = np.asarray(counts, dtype=np.float64)  # (N, k)
    if counts.ndim != 2:
        raise ValueError(f"counts must be (items, categories), got shape {counts.shape}")
    n_i = counts.sum(axis=1)  # (N,) ratings per item
    if counts.shape[0] == 0:
        return float("nan")
    if np.any(n_i < 2):
        raise ValueError("every item needs at least 2 ratings for Fleiss' kappa")
    p_j = counts.sum(axis=0) / counts.sum()  # (k,) share of all ratings in each category
    p_i = ((counts**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))  # (N,) agreeing rater pairs
    p_bar, p_e = float(p_i.mean()), float((p_j**2).sum())
    if math.isclose(p_e, 1.0):
        return 1.0
    return (p_bar - p_e) / (1.0 - p_e)


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def agreement_of(ratings: dict[str, dict[int, bool]]) -> dict:
    """Agreement on ``plausible`` of {image_id: {rater_id: plausible}}.

    Two raters: Cohen's kappa over the images both rated. More: Fleiss' kappa over the images
    with at least two ratings. Fewer than two raters or no shared images: kappa None.
    """
    raters = sorted({r for votes in ratings.values() for r in votes})
    out: dict[str, Any] = {
        "method": None,
        "kappa": None,
        "n_items": 0,
        "n_raters": len(raters),
        "observed_agreement": None,
    }
    if len(raters) < 2:
        return out
    if len(raters) == 2:
        pairs = [(v[raters[0]], v[raters[1]]) for v in ratings.values() if len(v) == 2]
        a = np.array([p[0] for p in pairs], dtype=bool)
        b = np.array([p[1] for p in pairs], dtype=bool)
        out.update(method="cohen", kappa=_nan_to_none(cohen_kappa(a, b)), n_items=len(pairs))
        out["observed_agreement"] = float(np.mean(a == b)) if pairs else None
        return out
    rows = [
        [sum(not x for x in v.values()), sum(v.values())] for v in ratings.values() if len(v) >= 2
    ]
    counts = np.array(rows, dtype=np.float64).reshape(-1, 2)  # (N, 2): implausible, plausible
    out.update(method="fleiss", kappa=_nan_to_none(fleiss_kappa(counts)), n_items=len(rows))
    if rows:
        n_i = counts.sum(axis=1)
        out["observed_agreement"] = float(
            (((counts**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))).mean()
        )
    return out

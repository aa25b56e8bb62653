"""What a review round says: progress and verdicts per class and rater, the answers given instead
of verdicts, inter-rater agreement, and each round mode's own statistics.

``round_stats`` is the summary ``pathloop review stats`` prints. A blinded real-vs-synthetic
round (``pathloop.blinded``) adds each rater's and the pooled accuracy at telling real from
synthetic, with an exact (Clopper-Pearson) confidence interval and a binomial test against chance
(scipy), and the raters' agreement (Cohen's kappa from scikit-learn for two raters, Fleiss' from
statsmodels for more). A pairwise round (``pathloop.pairwise``) adds the counts of each choice, the
rate at which the left image was preferred (left and right are drawn at random, so a rate away
from 0.5 is a side bias) and the same agreement.

"unsure" and "skip" are never verdicts: they count in ``answers``, not in plausible rates,
accuracies or exports.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from typing import Any

import numpy as np

CONFIDENCE = 0.95  # of every interval reported here
CHANCE = 0.5  # accuracy of guessing in a balanced blinded set (write_blinded_set balances it)
ABSTAIN = ("unsure", "skip")  # answers that are no decision

# ----------------------------------------------------------------------------- helpers


def accuracy(correct: int, n: int, chance: float = CHANCE, confidence: float = CONFIDENCE) -> dict:
    """``correct`` of ``n`` with its exact (Clopper-Pearson) interval and the two-sided binomial
    test against ``chance`` (scipy.stats.binomtest); None values when ``n`` is 0."""
    from scipy.stats import binomtest

    if n == 0:
        return {"n": 0, "correct": 0, "accuracy": None, "ci": None, "p_value": None}
    test = binomtest(int(correct), int(n), p=chance)
    ci = test.proportion_ci(confidence_level=confidence, method="exact")
    return {
        "n": int(n),
        "correct": int(correct),
        "accuracy": correct / n,
        "ci": [float(ci.low), float(ci.high)],
        "p_value": float(test.pvalue),
    }


def categorical_agreement(ratings: dict[str, dict[str, str]]) -> dict:
    """Agreement of raters on categorical answers ({rater: {item: answer}}).

    Two raters: Cohen's kappa (sklearn) over the items both answered. More: Fleiss' kappa
    (statsmodels) over the items every rater answered (Fleiss needs the same number of ratings per
    item). ``observed`` is the fraction of those items on which all raters gave the same answer.
    kappa is None with fewer than two raters, no shared item, or one answer throughout (0/0).
    """
    raters = sorted(r for r, answers in ratings.items() if answers)
    out: dict[str, Any] = {"method": None, "kappa": None, "observed": None, "n_items": 0}
    out["raters"] = raters
    if len(raters) < 2:
        return out
    items = sorted(set.intersection(*(set(ratings[r]) for r in raters)))
    out["n_items"] = len(items)
    if not items:
        return out
    table = np.array([[ratings[r][i] for r in raters] for i in items], dtype=object)  # (I, R)
    out["observed"] = float(np.mean([len(set(row)) == 1 for row in table]))
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")  # one answer throughout: 0/0, reported as None
        if len(raters) == 2:
            from sklearn.metrics import cohen_kappa_score

            kappa = cohen_kappa_score(list(table[:, 0]), list(table[:, 1]))
            out["method"] = "cohen"
        else:
            from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

            counts, _ = aggregate_raters(table.astype(str))  # (I, categories)
            kappa = fleiss_kappa(counts)
            out["method"] = "fleiss"
    out["kappa"] = float(kappa) if math.isfinite(kappa) else None
    return out


def _names(store: Any) -> dict[int, str]:
    return {r.id: r.name for r in store.raters()}


# ----------------------------------------------------------------------------- every round


def round_stats(store: Any, round_id: int) -> dict:
    """Per class: images, labelled images, plausible rate; per rater: counts; the answers given
    instead of verdicts; agreement on verdicts; a blinded or pairwise round's own section."""
    info, images = store.round_info(round_id), store.images(round_id)
    labels = store.labels(round_id)
    raters = {r.id: r for r in store.raters()}
    class_of = {im.image_id: im.class_name for im in images}
    classes = {
        c.name: {"n_images": 0, "n_labelled": 0, "plausible_rate": None}
        for c in store.vocabulary(round_id).classes
    }
    for im in images:
        classes[im.class_name]["n_images"] += 1
    by_class: dict[str, list[bool]] = defaultdict(list)
    labelled: dict[str, set[str]] = defaultdict(set)
    per_rater: dict[str, Counter] = defaultdict(Counter)
    answers: dict[str, Counter] = defaultdict(Counter)
    for lab in labels:
        name = raters[lab.rater_id].name
        per_rater[name]["n_labels"] += 1
        if lab.answer is not None:
            answers[name][lab.answer] += 1
        if lab.plausible is not None:
            by_class[class_of[lab.image_id]].append(lab.plausible)
            labelled[class_of[lab.image_id]].add(lab.image_id)
            per_rater[name]["n_scored"] += 1
            per_rater[name]["n_plausible"] += int(lab.plausible)
    for name, votes in by_class.items():
        classes[name].update(n_labelled=len(labelled[name]), plausible_rate=float(np.mean(votes)))
    kind = {r.name: r.kind for r in raters.values()}
    out = {
        "round": {
            "id": info.id,
            "name": info.name,
            "status": info.status,
            "mode": info.mode,
            "n_images": info.n_images,
            "n_labels": len(labels),
        },
        "classes": classes,
        "raters": {
            n: {"kind": kind[n], **{k: c[k] for k in ("n_labels", "n_scored", "n_plausible")}}
            for n, c in per_rater.items()
        },
        "answers": {n: dict(sorted(c.items())) for n, c in answers.items()},
        "agreement": store.agreement(round_id),
    }
    if info.mode == "blinded":
        out["blinded"] = blinded_stats(store, round_id)
    elif info.mode == "pairwise":
        out["pairwise"] = pairwise_stats(store, round_id)
    return out


# ----------------------------------------------------------------------------- blinded test


def blinded_stats(store: Any, round_id: int) -> dict:
    """How well raters tell real from synthetic in a blinded round: per rater and pooled.

    Accuracy is over the images a rater called real or synthetic (unsure and skip are counted
    apart), with its exact 95 % interval and the binomial test against guessing (0.5: the set is
    balanced per class). ``real_as_real`` and ``synthetic_as_synthetic`` split it by the truth.
    The pooled row counts every answer as one trial; answers of several raters on the same image
    are not independent, so its interval is narrower than the panel's uncertainty.
    """
    images = store.images(round_id)
    truth = {im.image_id: im.truth for im in images}
    class_of = {im.image_id: im.class_name for im in images}
    names = _names(store)
    given: dict[str, dict[str, str]] = defaultdict(dict)
    abstained: dict[str, Counter] = defaultdict(Counter)
    for lab in store.labels(round_id):
        if lab.answer in ("real", "synthetic"):
            given[names[lab.rater_id]][lab.image_id] = lab.answer
        elif lab.answer in ABSTAIN:
            abstained[names[lab.rater_id]][lab.answer] += 1

    def summary(pairs: list[tuple[str, str]]) -> dict:  # (truth, answer) per answer
        row = accuracy(sum(t == a for t, a in pairs), len(pairs))
        for t in ("real", "synthetic"):
            mine = [a for tt, a in pairs if tt == t]
            row[f"{t}_as_{t}"] = sum(a == t for a in mine) / len(mine) if mine else None
        return row

    per_rater = {}
    for name in sorted(set(given) | set(abstained)):
        row = summary([(truth[i], a) for i, a in given[name].items()])
        row.update(n_unsure=abstained[name]["unsure"], n_skipped=abstained[name]["skip"])
        per_rater[name] = row
    every = [(truth[i], a) for answers in given.values() for i, a in answers.items()]
    per_class: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for answers in given.values():
        for i, a in answers.items():
            per_class[class_of[i]].append((truth[i], a))
    return {
        "confidence": CONFIDENCE,
        "ci_method": "exact (Clopper-Pearson)",
        "chance": CHANCE,
        "n_images": dict(sorted(Counter(t for t in truth.values() if t).items())),
        "raters": per_rater,
        "pooled": summary(every),
        "per_class": {c: summary(p) for c, p in sorted(per_class.items())},
        "agreement": categorical_agreement(given),
    }


# ----------------------------------------------------------------------------- pairwise


def pairwise_stats(store: Any, round_id: int) -> dict:
    """Choices per rater, the rate at which the left image won a decided pair (with its interval
    and the test against 0.5: sides are random, so a departure is a side bias), agreement."""
    names = _names(store)
    choices: dict[str, dict[str, str]] = defaultdict(dict)
    counts: dict[str, Counter] = defaultdict(Counter)
    for lab in store.labels(round_id):
        if lab.answer is None:
            continue
        counts[names[lab.rater_id]][lab.answer] += 1
        if lab.answer not in ABSTAIN:
            choices[names[lab.rater_id]][lab.image_id] = lab.answer
    total = sum(counts.values(), Counter())
    return {
        "n_pairs": store.round_info(round_id).n_images,
        "choices": {n: dict(sorted(c.items())) for n, c in sorted(counts.items())},
        "left_preferred": accuracy(total["a"], total["a"] + total["b"]),
        "agreement": categorical_agreement(choices),
    }

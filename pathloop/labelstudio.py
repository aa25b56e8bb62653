"""Label Studio interop: a labeling config per round mode, task export, annotation import.

``export_tasks`` writes a round as Label Studio ``tasks.json`` plus ``labeling_config.xml``;
``import_annotations`` stores a Label Studio JSON export's annotations as human labels in the
feedback store (one rater per annotator), listing every annotation it could not use and why.

The config follows the round's mode: plausible / implausible / unsure with the 7 criteria and the
subtype; real / synthetic / unsure for a blinded round (the tasks carry no hint of the truth); and
for a pairwise round Label Studio's ``Pairwise`` tag over the two images (click the more plausible
one), or a choice of both equally plausible / neither plausible / unsure instead.
"""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from pathloop.feedback import FeedbackStore
from pathloop.feedback_db import FeedbackError
from pathloop.pairwise import pair_ids
from pathloop.vocab import CRITERIA, CRITERIA_TEXT, Vocabulary

# ----------------------------------------------------------------------------- labeling config

# Pairwise rounds: what a rater picks instead of clicking one image (text shown, alias stored).
NO_PREFERENCE = {
    "both": "Both equally plausible",
    "neither": "Neither is plausible",
    "unsure": "Unsure",
}


def labeling_config(vocab: Vocabulary, mode: str = "plausibility") -> str:
    """Label Studio labeling config for a round of ``mode`` (see the module docstring)."""
    view = ET.Element("View")
    if mode == "pairwise":
        _pairwise_config(view)
    elif mode == "blinded":
        ET.SubElement(view, "Image", name="image", value="$image", zoom="true")
        ET.SubElement(view, "Header", value="$class_name: a real cell or a synthetic one?")
        origin = ET.SubElement(
            view, "Choices", name="origin", toName="image", choice="single", required="true"
        )
        for v in ("real", "synthetic", "unsure"):
            ET.SubElement(origin, "Choice", value=v)
    else:
        _plausibility_config(view, vocab)
    ET.SubElement(
        view,
        "TextArea",
        name="comment",
        toName="left" if mode == "pairwise" else "image",
        editable="true",
        maxSubmissions="1",
        placeholder="Comment (optional)",
    )
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def _pairwise_config(view: ET.Element) -> None:
    ET.SubElement(view, "Header", value="$class_name: click the more plausible cell")
    ET.SubElement(view, "Text", name="description", value="$description")
    ET.SubElement(view, "Pairwise", name="pairwise", toName="left,right")
    row = ET.SubElement(view, "View", style="display: flex; gap: 1em;")
    for side in ("left", "right"):
        ET.SubElement(row, "Image", name=side, value=f"${side}", zoom="true")
    other = ET.SubElement(
        view, "Choices", name="no_preference", toName="left", choice="single", showInline="true"
    )
    for alias, text in NO_PREFERENCE.items():
        ET.SubElement(other, "Choice", value=text, alias=alias)


def _plausibility_config(view: ET.Element, vocab: Vocabulary) -> None:
    ET.SubElement(view, "Image", name="image", value="$image", zoom="true")
    ET.SubElement(view, "Header", value="$class_name")
    ET.SubElement(view, "Text", name="description", value="$description")
    verdict = ET.SubElement(
        view,
        "Choices",
        name="plausible",
        toName="image",
        choice="single",
        required="true",
        showInline="true",
    )
    for v in ("plausible", "implausible", "unsure"):
        ET.SubElement(verdict, "Choice", value=v)
    crit = ET.SubElement(view, "Choices", name="failed_criteria", toName="image", choice="multiple")
    for c in CRITERIA:  # alias: the result stores the criterion key, the UI shows the text
        ET.SubElement(crit, "Choice", value=CRITERIA_TEXT[c], alias=c)
    subtypes = sorted({s for c in vocab.classes for s in c.subtypes})
    if subtypes:
        sub = ET.SubElement(view, "Choices", name="subtype", toName="image", choice="single")
        for s in subtypes:
            ET.SubElement(sub, "Choice", value=s)


_CRITERION_BY_TEXT = {**{v: k for k, v in CRITERIA_TEXT.items()}, **{c: c for c in CRITERIA}}


_LS_CONTROLS = {
    "plausibility": ("plausible", "failed_criteria", "subtype", "comment"),
    "blinded": ("origin", "comment"),
    "pairwise": ("pairwise", "no_preference", "comment"),
}
_NO_PREFERENCE_BY_TEXT = {
    **{v: k for k, v in NO_PREFERENCE.items()},
    **{k: k for k in NO_PREFERENCE},
}


def _annotator_name(annotation: dict, prefix: str) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return None if who in (None, "") else f"{prefix}{who}"


def _one_choice(name: str, choices: list, valid: dict[str, str] | tuple[str, ...]) -> str:
    """The one choice of control ``name``, mapped by ``valid`` (shown text or alias -> value)."""
    valid = valid if isinstance(valid, dict) else {v: v for v in valid}
    if len(choices) != 1 or choices[0] not in valid:
        raise FeedbackError(f"{name} choice must be one of {sorted(set(valid))}, got {choices}")
    return valid[choices[0]]


def parse_ls_result(result: list, mode: str = "plausibility") -> dict:
    """put_label keywords from one Label Studio annotation's ``result`` list in a round of
    ``mode``: plausible or an answer (unsure; real/synthetic; a/b/both/neither), and the rest."""
    out: dict[str, Any] = {"failed_criteria": [], "subtype": None, "comment": ""}
    out.update(plausible=None, answer=None)
    controls = _LS_CONTROLS[mode]
    for item in result or []:
        name, value = item.get("from_name"), item.get("value") or {}
        if name not in controls:
            raise FeedbackError(f"unknown control {name!r}; valid: {', '.join(controls)}")
        if name == "comment":
            out["comment"] = "\n".join(value.get("text") or [])
            continue
        choices = value.get("choices") or []
        if name == "pairwise":
            side = value.get("selected")
            if side not in ("left", "right") or out["answer"]:
                raise FeedbackError(f"pick one image (left or right) or one other choice: {side}")
            out["answer"] = "a" if side == "left" else "b"
        elif name == "no_preference":
            if out["answer"]:
                raise FeedbackError("an annotation picked an image and a no-preference choice")
            out["answer"] = _one_choice(name, choices, _NO_PREFERENCE_BY_TEXT)
        elif name == "origin":
            out["answer"] = _one_choice(name, choices, ("real", "synthetic", "unsure"))
        elif name == "plausible":
            verdict = _one_choice(name, choices, ("plausible", "implausible", "unsure"))
            if verdict == "unsure":
                out["answer"] = "unsure"
            else:
                out["plausible"] = verdict == "plausible"
        elif name == "failed_criteria":
            bad = [c for c in choices if c not in _CRITERION_BY_TEXT]
            if bad:
                raise FeedbackError(f"unknown criteria {bad}; valid: {', '.join(CRITERIA)}")
            out["failed_criteria"] = [_CRITERION_BY_TEXT[c] for c in choices]
        else:
            out["subtype"] = choices[0] if choices else None
    if out["plausible"] is None and out["answer"] is None:
        first = {"plausibility": "plausible", "blinded": "origin", "pairwise": "pairwise"}[mode]
        raise FeedbackError(f"annotation has no '{first}' choice")
    return out


# ----------------------------------------------------------------------------- import report


class BadItem(BaseModel):
    """One Label Studio annotation that was not stored, and why."""

    task: int | str | None = Field(description="Label Studio task id (or index in the file).")
    image_id: str | None = Field(description="The task's data.image_id, if present.")
    annotator: str | None = Field(description="Rater name the annotation would have used.")
    reason: str = Field(description="Why it was not stored.")


class ImportReport(BaseModel):
    """What ``labelstudio_import`` did."""

    n_tasks: int = Field(description="Tasks in the export file.")
    n_annotations: int = Field(description="Annotations seen (cancelled ones included).")
    n_stored: int = Field(description="Annotations stored as a new label revision.")
    n_unchanged: int = Field(description="Annotations identical to the stored label.")
    raters: list[str] = Field(description="Rater names the annotations were stored under.")
    bad: list[BadItem] = Field(description="Annotations not stored, with reasons.")


# ----------------------------------------------------------------------------- export and import


def export_tasks(
    store: FeedbackStore, round_id: int, out_dir: str | Path, image_url_prefix: str | None = None
) -> Path:
    """Write Label Studio ``tasks.json`` and ``labeling_config.xml``; returns tasks.json.

    Images are inlined as PNG data URIs, or, with ``image_url_prefix``, written to
    ``out_dir/images/<id>.png`` and referenced as ``<prefix>/<id>.png`` (serve that folder). A
    pairwise task holds its two images as ``left`` and ``right``, a task of another round as
    ``image``.
    """
    info, vocab = store.round_info(round_id), store.vocabulary(round_id)
    images = store.images(round_id)
    pngs = _round_pngs(info, images)
    out = Path(out_dir)
    (out / "images" if image_url_prefix else out).mkdir(parents=True, exist_ok=True)

    def ref(rid: str) -> str:
        if image_url_prefix:
            (out / "images" / f"{rid}.png").write_bytes(pngs[rid])
            return f"{image_url_prefix.rstrip('/')}/{rid}.png"
        return "data:image/png;base64," + base64.b64encode(pngs[rid]).decode("ascii")

    tasks = []
    for im in images:
        c = vocab.lookup(im.class_id)
        if info.mode == "pairwise":
            left, right = pair_ids(im.image_id)
            data = {"left": ref(left), "right": ref(right)}
        else:
            data = {"image": ref(im.image_id)}
        data.update(image_id=im.image_id, round_id=round_id, class_name=c.name)
        data.update(class_code=c.code, description=c.description)
        tasks.append({"data": data})
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1) + "\n")
    (out / "labeling_config.xml").write_text(labeling_config(vocab, info.mode))
    return out / "tasks.json"


def _round_pngs(info: Any, images: list) -> dict[str, bytes]:
    """{shard id: PNG bytes} of every image a round shows (both of each pair)."""
    import pyarrow.parquet as pq

    from pathloop.data import read_manifest

    need = set()
    for im in images:
        need.update(pair_ids(im.image_id) if info.mode == "pairwise" else (im.image_id,))
    d, pngs = Path(info.samples_dir), {}
    for shard in read_manifest(d)["shards"]:
        table = pq.read_table(d / shard["file"], columns=["id", "image"])
        for rid, png in zip(table["id"].to_pylist(), table["image"].to_pylist(), strict=True):
            if rid in need:
                pngs[rid] = png
    if missing := sorted(need - pngs.keys()):
        raise FeedbackError(
            f"round {info.id}: {len(missing)} images are gone from {d}, e.g. {missing[0]}"
        )
    return pngs


def import_annotations(
    store: FeedbackStore,
    round_id: int,
    export_json_path: str | Path,
    rater_name_prefix: str = "ls:",
) -> ImportReport:
    """Store the annotations of a Label Studio JSON export as human labels.

    One rater per annotator (``<prefix><email or id>``). Bad annotations are listed in the
    report with the reason; every good one is stored (one transaction each).
    """
    try:
        tasks = json.loads(Path(export_json_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FeedbackError(f"cannot read Label Studio export {export_json_path}: {err}") from None
    if not isinstance(tasks, list):
        raise FeedbackError("a Label Studio JSON export is a list of tasks")
    report = ImportReport(
        n_tasks=len(tasks), n_annotations=0, n_stored=0, n_unchanged=0, raters=[], bad=[]
    )
    mode = store.round_info(round_id).mode
    for index, task in enumerate(tasks):
        _import_task(store, round_id, mode, task, index, rater_name_prefix, report)
    return report


def _import_task(
    store: FeedbackStore,
    round_id: int,
    mode: str,
    task: Any,
    index: int,
    prefix: str,
    report: ImportReport,
) -> None:
    task = task if isinstance(task, dict) else {}
    task_id = task.get("id", index)
    image_id = (task.get("data") or {}).get("image_id")
    for ann in task.get("annotations") or []:
        report.n_annotations += 1
        who = _annotator_name(ann, prefix)
        try:
            if who is None:
                raise FeedbackError("annotation has no completed_by")
            if not image_id:
                raise FeedbackError("task has no data.image_id")
            if ann.get("was_cancelled"):
                raise FeedbackError("annotation was cancelled (skipped)")
            kw = parse_ls_result(ann.get("result"), mode)
            rater_id = store.ensure_rater(who, "human")
            before = store.current_label(round_id, image_id, rater_id)
            lab = store.put_label(round_id, image_id, rater_id, source="human", **kw)
        except FeedbackError as err:
            report.bad.append(
                BadItem(task=task_id, image_id=image_id, annotator=who, reason=str(err))
            )
            continue
        if who not in report.raters:
            report.raters.append(who)
        changed = before is None or before.revision != lab.revision
        report.n_stored += int(changed)
        report.n_unchanged += int(not changed)

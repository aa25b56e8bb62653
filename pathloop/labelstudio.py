"""Label Studio interop: a labeling config for the 7 criteria, task export, annotation import.

``export_tasks`` writes a round as Label Studio ``tasks.json`` plus ``labeling_config.xml``;
``import_annotations`` stores a Label Studio JSON export's annotations as human labels in the
feedback store (one rater per annotator), listing every annotation it could not use and why.
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
from pathloop.vocab import CRITERIA, CRITERIA_TEXT, Vocabulary

# ----------------------------------------------------------------------------- labeling config


def labeling_config(vocab: Vocabulary) -> str:
    """Label Studio labeling config: plausible or not, failed criteria, subtype, comment."""
    view = ET.Element("View")
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
    for v in ("plausible", "implausible"):
        ET.SubElement(verdict, "Choice", value=v)
    crit = ET.SubElement(view, "Choices", name="failed_criteria", toName="image", choice="multiple")
    for c in CRITERIA:  # alias: the result stores the criterion key, the UI shows the text
        ET.SubElement(crit, "Choice", value=CRITERIA_TEXT[c], alias=c)
    subtypes = sorted({s for c in vocab.classes for s in c.subtypes})
    if subtypes:
        sub = ET.SubElement(view, "Choices", name="subtype", toName="image", choice="single")
        for s in subtypes:
            ET.SubElement(sub, "Choice", value=s)
    ET.SubElement(
        view,
        "TextArea",
        name="comment",
        toName="image",
        editable="true",
        maxSubmissions="1",
        placeholder="Comment (optional)",
    )
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


_CRITERION_BY_TEXT = {**{v: k for k, v in CRITERIA_TEXT.items()}, **{c: c for c in CRITERIA}}


_LS_CONTROLS = ("plausible", "failed_criteria", "subtype", "comment")


def _annotator_name(annotation: dict, prefix: str) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return None if who in (None, "") else f"{prefix}{who}"


def parse_ls_result(result: list) -> dict:
    """put_label keywords from one Label Studio annotation's ``result`` list."""
    out: dict[str, Any] = {"failed_criteria": [], "subtype": None, "comment": ""}
    for item in result or []:
        name, value = item.get("from_name"), item.get("value") or {}
        if name not in _LS_CONTROLS:
            raise FeedbackError(f"unknown control {name!r}; valid: {', '.join(_LS_CONTROLS)}")
        if name == "comment":
            out["comment"] = "\n".join(value.get("text") or [])
            continue
        choices = value.get("choices") or []
        if name == "plausible":
            if len(choices) != 1 or choices[0] not in ("plausible", "implausible"):
                raise FeedbackError(
                    f"plausible choice must be 'plausible' or 'implausible', got {choices}"
                )
            out["plausible"] = choices[0] == "plausible"
        elif name == "failed_criteria":
            bad = [c for c in choices if c not in _CRITERION_BY_TEXT]
            if bad:
                raise FeedbackError(f"unknown criteria {bad}; valid: {', '.join(CRITERIA)}")
            out["failed_criteria"] = [_CRITERION_BY_TEXT[c] for c in choices]
        else:
            out["subtype"] = choices[0] if choices else None
    if "plausible" not in out:
        raise FeedbackError("annotation has no 'plausible' choice")
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
    ``out_dir/images/<id>.png`` and referenced as ``<prefix>/<id>.png`` (serve that folder).
    """
    vocab = store.vocabulary(round_id)
    table = store.shard_table(round_id, columns=["id", "image", "class_id"])
    out = Path(out_dir)
    (out / "images" if image_url_prefix else out).mkdir(parents=True, exist_ok=True)
    tasks = []
    for rid, png, cid in zip(
        table["id"].to_pylist(),
        table["image"].to_pylist(),
        table["class_id"].to_pylist(),
        strict=True,
    ):
        info = vocab.lookup(int(cid))
        if image_url_prefix:
            (out / "images" / f"{rid}.png").write_bytes(png)
            url = f"{image_url_prefix.rstrip('/')}/{rid}.png"
        else:
            url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        tasks.append(
            {
                "data": {
                    "image": url,
                    "image_id": rid,
                    "round_id": round_id,
                    "class_name": info.name,
                    "class_code": info.code,
                    "description": info.description,
                }
            }
        )
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1) + "\n")
    (out / "labeling_config.xml").write_text(labeling_config(vocab))
    return out / "tasks.json"


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
    for index, task in enumerate(tasks):
        _import_task(store, round_id, task, index, rater_name_prefix, report)
    return report


def _import_task(
    store: FeedbackStore, round_id: int, task: Any, index: int, prefix: str, report: ImportReport
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
            kw = parse_ls_result(ann.get("result"))
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

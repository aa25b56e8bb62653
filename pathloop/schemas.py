"""HTTP request and response models shared by ``serve/``, clients and tests.

The server enforces tighter, configurable limits (``serve.app.Limits``) on top of the static bounds
here; the static bounds only keep the OpenAPI schema honest (and API fuzzing finite). Every error
body is an ``ErrorResponse``: ``{"detail": "<what was wrong and the valid values>"}``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pathloop.config import Weights, check_interval

# [lo, hi] as a JSON array (the API is strict: an array is not a tuple there)
GuidanceInterval = Annotated[
    list[float], Field(min_length=2, max_length=2), AfterValidator(check_interval)
]

SAMPLER_NAMES = ("ddim", "ddpm", "dpm++")
MAX_SEED = 2**32 - 1  # seed + i must stay a valid torch seed for every image of a request


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ----------------------------------------------------------------------------- common


class ErrorResponse(_Model):
    """Body of every 4xx/5xx answer."""

    detail: str = Field(description="What was wrong, and the valid values where there are any.")


class HealthResponse(_Model):
    status: Literal["ok"] = Field("ok", description="The HTTP layer is up.")


class ReadyResponse(_Model):
    ready: bool = Field(description="Every configured model is loaded.")
    models: dict[str, bool] = Field(description="Per component (generator, scorer): loaded.")


class CriterionInfo(_Model):
    key: str = Field(description="Criterion id used in requests (e.g. nc_ratio).")
    text: str = Field(description="Human name shown in the UI.")
    hotkey: str = Field(description="Review UI key that toggles it (1-7).")


class ClassOut(_Model):
    id: int = Field(description="Integer class id of the model.")
    name: str = Field(description="Class name.")
    code: str = Field(description="Short class code; accepted wherever a class name is.")
    description: str = Field(description="What an expert expects to see.")
    subtypes: list[str] = Field(description="Subtypes an expert may record, if any.")


class ClassesResponse(_Model):
    classes: list[ClassOut] = Field(description="The classes the model generates and scores.")
    criteria: list[CriterionInfo] = Field(description="The 7 plausibility criteria.")


# ----------------------------------------------------------------------------- generate


class GenerateRequest(_Model):
    """Draw ``n`` images of one class; image i uses seed ``seed + i``."""

    class_name: str = Field(
        min_length=1, max_length=200, description="Class name or code (case-insensitive)."
    )
    n: int = Field(1, ge=1, le=1024, description="Images to draw (server limit: limits.max_n).")
    sampler: Literal["ddim", "ddpm", "dpm++"] = Field("ddim", description="Diffusers scheduler.")
    steps: int = Field(
        50, ge=1, le=1000, description="Denoising steps (server limit: limits.max_steps)."
    )
    guidance: float = Field(
        2.0,
        ge=0,
        le=20,
        description="Guidance scale (classifier-free, or toward the guide); 1 = conditional, "
        "0 = null class (the guide).",
    )
    guidance_interval: GuidanceInterval = Field(
        [0.0, 1.0],
        description="Guide only at noise levels t/T in [lo, hi] (scale 1 elsewhere); [0, 1] = "
        "every step.",
    )
    guide: str | None = Field(
        None,
        min_length=1,
        max_length=300,
        description="Autoguidance: a served model of the same classes (as `model`, GET "
        "/v1/models) in place of the null class; None = classifier-free guidance.",
    )
    weights: Weights = Field("ema", description="The model's weights: ema or raw.")
    guide_weights: Weights | None = Field(None, description="The guide's; None = weights.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Base seed; image i uses seed + i.")
    format: Literal["png", "base64"] = Field(
        "base64",
        description="png: raw image/png when n == 1 (JSON base64 otherwise); base64: always JSON.",
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=300,
        description="Which served model draws: a name or models:/<name>/<version> URI that "
        "GET /v1/models lists; None = the server's default model.",
    )


class Provenance(_Model):
    model: str | None = Field(None, description="The served model's id (GET /v1/models).")
    model_uri: str = Field(description="The reference that model was loaded from.")
    checkpoint_step: int = Field(description="Training step of the checkpoint.")
    sampler: str = Field(description="Scheduler used.")
    steps: int = Field(description="Denoising steps used.")
    guidance: float = Field(description="Guidance scale used.")
    guidance_interval: tuple[float, float] = Field(
        (0.0, 1.0), description="Noise levels t/T guided."
    )
    guide: str | None = Field(None, description="The guide model's id; None = classifier-free.")
    weights: str = Field("ema", description="The model's weights used.")
    guide_weights: str | None = Field(None, description="The guide's weights used, if any.")
    seed: int = Field(description="This image's own seed.")


class GeneratedImage(_Model):
    image_b64: str = Field(description="PNG bytes, base64.")
    seed: int = Field(description="This image's seed (request seed + index).")
    class_name: str = Field(description="Class name (canonical, even if a code was sent).")
    provenance: Provenance


class GenerateResponse(_Model):
    images: list[GeneratedImage]


class ModelOut(_Model):
    id: str = Field(description="What a request sends as `model`.")
    kind: Literal["named", "registered"] = Field(
        description="named: in the server's config; registered: a version in its MLflow store."
    )
    reference: str = Field(description="Where it loads from (server paths shortened).")
    default: bool = Field(False, description="Used when a request names no model.")


class ModelsResponse(_Model):
    models: list[ModelOut]
    registered_names: list[str] = Field(
        description="Registered model names whose versions may be requested."
    )
    max_loaded_per_replica: int = Field(
        description="Models a generator replica keeps loaded; others load on demand (LRU)."
    )


# ----------------------------------------------------------------------------- score


class ScoreRequest(_Model):
    """One image to score for its declared class (PNG or JPEG bytes, base64)."""

    image_b64: str = Field(min_length=1, description="PNG or JPEG bytes, base64.")
    class_name: str = Field(min_length=1, max_length=200, description="Declared class name/code.")


class ScoreResponse(_Model):
    class_name: str = Field(description="Declared class (canonical name).")
    reward: float | None = Field(description="Reward model score; None without a reward model.")
    plausible: bool | None = Field(description="Judge: all 7 criteria pass; None without judge.")
    criteria: dict[str, bool] | None = Field(description="Judge: criterion -> passes.")
    failed_criteria: list[str] | None = Field(description="Judge: failed criteria, in order.")
    subtype: str | None = Field(
        description="Subtype read from the pixels, where the class has one."
    )


class ScoreBatchResponse(_Model):
    results: list[ScoreResponse] = Field(description="One result per image, in request order.")


# ----------------------------------------------------------------------------- review

Answer = Literal["unsure", "skip", "real", "synthetic", "a", "b", "both", "neither"]


class LabelOut(_Model):
    plausible: bool | None = Field(description="The rater's verdict; None = unscored.")
    failed_criteria: list[str] = Field(description="Criteria the rater marked as failed.")
    subtype: str | None = Field(description="Subtype the rater recorded.")
    comment: str = Field(description="Free-text comment.")
    revision: int = Field(description="Revision number of this label.")
    answer: Answer | None = Field(
        None, description="An answer instead of a verdict (plausible is then None); see answer."
    )


class LabelRequest(_Model):
    """The signed-in rater's label for one image of the review round (an upsert): a verdict
    (plausible) or an answer, never both."""

    image_id: str = Field(
        min_length=1, max_length=129, description="Shard id of the image (pairwise: '<a>|<b>')."
    )
    plausible: bool | None = Field(
        None, description="Plausibility rounds: is this a plausible cell of its declared class?"
    )
    answer: Answer | None = Field(
        None,
        description="Instead of a verdict: unsure (final, no verdict) or skip (asked again at "
        "the end); blinded rounds: real or synthetic; pairwise rounds: a (left more plausible), "
        "b (right), both (equally plausible) or neither (neither is plausible).",
    )
    failed_criteria: list[str] = Field(
        default_factory=list, max_length=7, description="Criteria that failed (keys of criteria)."
    )
    subtype: str | None = Field(None, max_length=100, description="Subtype, where the class has.")
    comment: str = Field("", max_length=2000, description="Free text.")


class LabelResponse(_Model):
    image_id: str
    label: LabelOut
    done: int = Field(description="Images this rater has scored.")
    total: int = Field(description="Images in the round.")
    next_id: str | None = Field(description="First image this rater has not scored, or None.")


class UndoRequest(_Model):
    image_id: str = Field(min_length=1, max_length=129, description="Image whose label to undo.")


class UndoResponse(_Model):
    image_id: str
    label: LabelOut | None = Field(description="The label now in force; None when none is left.")
    done: int
    total: int
    next_id: str | None


class ProgressResponse(_Model):
    round_id: int
    rater: str = Field(description="Name of the signed-in rater.")
    done: int
    total: int
    next_id: str | None = Field(description="First unscored image in review order, or None.")


class SubtypeKey(_Model):
    key: str = Field(description="Review UI key (first letter of the subtype, upper case).")
    subtype: str


class ReviewClass(_Model):
    name: str
    code: str
    description: str
    subtypes: list[SubtypeKey]


class ReviewMetaResponse(_Model):
    round_id: int
    round_name: str
    rater: str = Field(description="Name of the signed-in rater.")
    criteria: list[CriterionInfo]
    classes: list[ReviewClass]
    mode: Literal["plausibility", "blinded", "pairwise"] = Field(
        "plausibility",
        description="What raters answer: plausible or not; real or synthetic (blinded); which "
        "of two images of one class is more plausible (pairwise).",
    )
    require_criteria: bool = Field(
        False, description="An implausible verdict must name at least one failed criterion."
    )


class ClassProgress(_Model):
    name: str
    code: str
    done: int = Field(description="Items of this class the rater has answered.")
    total: int = Field(description="Items of this class in the round.")


class NextResponse(_Model):
    """One image to review: the requested one, else the first this rater has not scored."""

    image_id: str | None = Field(description="None when every image is scored and none was asked.")
    position: int | None = Field(description="0-based position in review order.")
    class_name: str | None = Field(description="Declared class.")
    class_code: str | None
    description: str | None = Field(description="What the class should look like.")
    subtypes: list[SubtypeKey] = Field(description="Subtype keys of this class.")
    image_b64: str | None = Field(description="The image, PNG base64.")
    url: str | None = Field(description="The same image at GET /v1/review/image/{image_id}.png.")
    prev_id: str | None = Field(
        description="Previous item in review order; when every item is done, the last one."
    )
    next_id: str | None = Field(description="Following image in review order.")
    label: LabelOut | None = Field(description="This rater's current label of the image.")
    done: int
    total: int
    real_examples: list[str] = Field(description="Real images of the class, PNG base64.")
    image_b_b64: str | None = Field(
        None, description="Pairwise rounds: the right image, PNG base64 (image_b64 the left)."
    )
    pair: list[str] | None = Field(None, description="Pairwise rounds: [left id, right id].")
    skipped: int = Field(0, description="Items this rater skipped (asked again at the end).")
    class_progress: list[ClassProgress] = Field(
        default_factory=list, description="Per class: items answered by this rater and in all."
    )

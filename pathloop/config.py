"""Job configs: one frozen pydantic model per job, built from shared sub-models.

Precedence: field defaults < YAML file < dotted overrides (``optim.lr=2e-4``). An unknown key is an
error that lists the valid keys at that level. Configs cross process boundaries as plain dicts and
are re-validated on the other side (``XConfig.model_validate(d)``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError


class Frozen(BaseModel):
    """Base of every config model: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


# ----------------------------------------------------------------------------- shared sub-models


class ModelConfig(Frozen):
    """The class-conditional UNet (diffusers ``UNet2DModel``)."""

    preset: Literal["tiny", "small", "paper"] = Field(
        "tiny", description="tiny: 32 px CPU-sized (~1M params); paper: 64 px with attention."
    )
    sample_size: int | None = Field(None, description="Image side in px; None = preset's.")
    block_out_channels: tuple[int, ...] | None = Field(None, description="None = preset's.")
    layers_per_block: int | None = Field(
        None, description="ResNet blocks per level; None = preset's."
    )
    attention: bool | None = Field(
        None, description="Attention in the lowest level; None = preset's."
    )
    num_classes: int | None = Field(
        None, description="Real classes (the null class is added on top); None = from the data."
    )
    p_uncond: float = Field(
        0.1, ge=0, le=1, description="Class dropout for classifier-free guidance."
    )


class NoiseConfig(Frozen):
    """The DDPM training schedule (a diffusers scheduler config)."""

    num_train_timesteps: int = Field(1000, gt=0, description="T of the forward process.")
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = Field(
        "squaredcos_cap_v2", description="linear (Ho et al.) or cosine (Nichol & Dhariwal)."
    )
    # v, not eps, by default: the cosine schedule reaches zero SNR at t = T-1 (alphabar ~ 2e-9),
    # where the x0 implied by an eps prediction amplifies its error ~2e4-fold; samplers that start
    # there ("trailing" spacing) then fix wrong colours early (Lin et al. 2024, "Common diffusion
    # noise schedules and sample steps are flawed"). Measured here: tiny preset, 500 steps, judge
    # plausibility 0.20 with v against 0.00 with eps after 1500 steps.
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "v_prediction", description="UNet target: v (default, stable at zero SNR) or eps."
    )


def check_interval(v: Sequence[float]) -> Sequence[float]:
    """A guidance interval [lo, hi] of noise levels t/T: 0 <= lo <= hi <= 1."""
    lo, hi = v
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"must be [lo, hi] with 0 <= lo <= hi <= 1 (t/T), got {list(v)}")
    return v


# [lo, hi] of the noise level t/T (t = the scheduler's timestep 0..T-1) where guidance applies.
GuidanceInterval = Annotated[tuple[float, float], AfterValidator(check_interval)]
Weights = Literal["ema", "raw"]


class SamplerConfig(Frozen):
    """How samples are drawn: one ``diffusion.sample()`` call."""

    sampler: Literal["ddpm", "ddim", "dpm++"] = Field("ddim", description="diffusers scheduler.")
    steps: int = Field(50, ge=1, le=1000, description="Denoising steps.")
    guidance: float = Field(
        2.0,
        ge=0,
        le=20,
        description="Guidance scale g (CFG, or autoguidance with guide); 1 = conditional only, "
        "0 = the null class (the guide).",
    )
    guidance_interval: GuidanceInterval = Field(
        (0.0, 1.0),
        description="Guide only at noise levels t/T in [lo, hi], scale 1 elsewhere (Kynkaanniemi "
        "et al. 2024); [0, 1] = every step. diffusion.sigma_interval converts a sigma band.",
    )
    guide: str | None = Field(
        None,
        min_length=1,
        description="Autoguidance (Karras et al. 2024): a weaker checkpoint of the same classes "
        "(dir, result.json, models:/ URI, or 'earliest' = the oldest one the model's run kept) "
        "in place of the null class: guide + g (model - guide). None = classifier-free.",
    )
    weights: Weights = Field(
        "ema",
        description="Weights sampled: ema (default; with optim.ema_warmup it averages about the "
        "last step^0.75 steps, so short runs are not pulled back to init) or raw (last step's).",
    )
    guide_weights: Weights | None = Field(None, description="The guide's weights; None = weights.")
    seed: int = Field(0, description="Base seed; image i of a request uses seed + i.")
    batch_size: int = Field(
        32,
        gt=0,
        description="Images per UNet call (CFG doubles the rows). On 2 CPU cores 16-32 sample "
        "about 1.5x faster per image than 128; GPUs want hundreds.",
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto",
        description="channels_last UNet weights; auto = on a CPU, off on a GPU. 2-core CPU "
        "machine, tiny preset, DPM++-10: 13.2 images/s against 9.6 (one thread). GPUs: eager "
        "GroupNorm has no channels_last kernel (see train.channels_last).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the UNet for this batch size (each new batch shape compiles "
        "once): for GPU processes that sample many batches; compile time is not measured.",
    )
    bf16_cpu: bool = Field(
        False,
        description="bf16 autocast on a CPU with native bf16 instructions (AVX512-BF16, AMX; "
        "fp32 elsewhere). 2-core EPYC, tiny preset, DPM++-10, one thread: 23.4 images/s against "
        "15.2 in fp32; images differ by bf16 rounding. CUDA runs use the sample job's bf16.",
    )


class AdamWConfig(Frozen):
    """AdamW at a constant learning rate (what the reward model's head trains with)."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate (paper: 1e-4).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")


class OptimConfig(AdamWConfig):
    """AdamW with warm-up, clipping and an EMA of the weights."""

    warmup_steps: int = Field(100, ge=0, description="Linear LR warm-up steps.")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant",
        description="LR after warm-up (diffusers get_scheduler): constant, or cosine/linear "
        "decay to 0 at train.steps (short runs end sharper).",
    )
    grad_clip: float = Field(1.0, gt=0, description="Max global grad norm.")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="EMA decay (paper: 0.9999).")
    ema_warmup: bool = Field(True, description="EMA decay ramps up so short runs are usable.")


class ClassifierConfig(Frozen):
    """A timm CNN and how to train it as a classifier: the one shape of every classifier pathloop
    trains (reward backbone, subtype Γρ, guidance, evaluation features, TSTR; ``classifiers``)."""

    arch: str = Field("tiny", description="Preset (tiny, paper) or any timm model name.")
    in_px: int | None = Field(
        None, gt=0, description="Side the network sees; inputs are resized to it. None = data's."
    )
    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(32, gt=0, description="Images per step.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    augment: bool = Field(True, description="Random flips and 90° turns (cells have no up).")
    seed: int = Field(0, description="Seed of init, batches and augmentation.")


class WorkersConfig(Frozen):
    """Ray Train workers of a job: how many and what each gets (for ray.train.ScalingConfig)."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs Ray reserves per worker.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per worker; None = cpus_per_worker. Reserve 1 CPU "
        "but use 2 threads on a 2-core box so Ray Data's readers still get a CPU.",
    )


class TrackingConfig(Frozen):
    """MLflow: where runs go and what they are called."""

    tracking_uri: str | None = Field(
        None, description="None = $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db."
    )
    experiment: str = Field("pathloop", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name; None = generated.")
    register_as: str | None = Field(
        None, description="Registered model name; None = don't register."
    )
    parent_run_id: str | None = Field(
        None, description="Parent MLflow run (set by `pathloop loop`): this run shows as its child."
    )


# ----------------------------------------------------------------------------- loading

C = TypeVar("C", bound=BaseModel)


def parse_value(text: str) -> Any:
    """Parse an override as YAML (so 2e-4, true, [1,2] and null work), else keep the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _is_str_field(ann: Any) -> bool:
    """str, or str | None: the annotation a typed-as-text override should stay text for."""
    import typing

    if ann is str:
        return True
    args = typing.get_args(ann)
    return bool(args) and str in args and all(a in (str, type(None)) for a in args)


def _set_dotted(
    tree: dict, model: type[BaseModel], dotted: str, value: Any, raw: str | None = None
) -> None:
    parts = dotted.split(".")
    node, cls = tree, model
    for i, key in enumerate(parts):
        fields = cls.model_fields if cls is not None else None
        if fields is not None and key not in fields:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(
                f"unknown config key {dotted!r}: {key!r} is not a field at {where}; "
                f"valid keys: {', '.join(sorted(fields))}"
            )
        if i == len(parts) - 1:
            # A string field keeps the text as typed (run names like "7", paths like "1e3").
            ann = fields[key].annotation if fields is not None else None
            node[key] = raw if _is_str_field(ann) and raw is not None else value
            return
        ann = fields[key].annotation if fields is not None else None
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is not a section")


class ConfigError(ValueError):
    """A config could not be built; the message names the key and the fix."""


def _format_errors(err: ValidationError, model: type[BaseModel], where: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = where + ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = model
            for p in e["loc"][:-1]:
                ann = parent.model_fields[str(p)].annotation if parent else None
                parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            valid = ", ".join(sorted(parent.model_fields)) if parent else "?"
            lines.append(f"  {loc}: unknown key; valid keys here: {valid}")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid {model.__name__}:\n" + "\n".join(lines)


def updated(cfg: C, /, **changes: Any) -> C:
    """``cfg`` with ``changes`` applied and re-validated: the one way to derive a config.

    Each keyword names a field of ``cfg``. A dict given for a field that holds a model is merged
    into that model, recursively: ``updated(cfg, data={"shards": s})`` keeps the other fields of
    ``cfg.data``. Any other value, a model instance included, replaces the field whole. Unchanged
    values are passed on as they are (nested models are not dumped and rebuilt) and fields left at
    their defaults stay unset, so validators see the config as if it had been written this way.

    Returns a new, frozen ``type(cfg)``. Raises ConfigError, like ``load_config``: an unknown key
    names the valid keys at its level, an invalid value says why (``train.steps: ... (got -5)``).
    """
    return _updated(cfg, changes, "")


def _updated(model: C, changes: dict[str, Any], where: str) -> C:
    cls = type(model)
    fields = cls.model_fields
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {where + unknown[0]!r} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    data = {k: getattr(model, k) for k in model.model_fields_set}
    for key, value in changes.items():
        current = getattr(model, key)
        if isinstance(value, dict) and isinstance(current, BaseModel):
            value = _updated(current, value, f"{where}{key}.")
        data[key] = value
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, cls, where)) from None


def load_config(model: type[C], path: str | Path | None = None, overrides: list[str] = ()) -> C:
    """Build ``model`` from defaults < YAML ``path`` < ``key.sub=value`` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; pass an existing YAML file")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, _, raw = item.partition("=")
        _set_dotted(tree, model, key.strip(), parse_value(raw), raw if raw != "null" else None)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, model)) from None


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Save the resolved config next to an artifact (YAML for people, exact for reloading)."""
    Path(path).write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))

"""Ray job entrypoints and the one registry of config-driven steps.

    ray job submit --working-dir . -- \
        python jobs/pretrain.py --config jobs/configs/pretrain.tiny.yaml [a.b=v ...]

A job script is ``main("<step>")`` and nothing else, so a job and the CLI command are one code
path: the same config model, the same library call, the same flags and exit codes. ``STEPS``
names each step's config model and driver; the CLI and sweeps (``pathloop.sweep.jobs``) both
read it, and nothing in it is imported until a step runs. Inside a Ray job the working directory
is Ray's unpacked copy of ``--working-dir`` (without what .gitignore and .rayignore exclude, so
no ``runs/``), which Ray garbage-collects after the job: outputs belong on shared storage, and
``check_outputs`` says so when a config writes to a relative path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

# Set by Ray's job supervisor in the entrypoint's environment (runtime env and metadata).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Top-level config fields that name where a job writes.
OUTPUT_FIELDS = ("workdir", "out")


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Step:
    """A config-driven step: its config model and driver as ``"module:name"`` (imported on use,
    so the registry costs nothing at import) and, for a step a sweep can split into Train
    segments, the dotted config key holding its optimizer steps."""

    config: str
    driver: str
    steps_key: str | None = None

    @property
    def config_cls(self) -> type:
        """The step's frozen pydantic config model."""
        return _resolve(self.config)

    def run(self, cfg: Any) -> dict[str, Any]:
        """Run the step's driver on a validated config; its result dict."""
        return _resolve(self.driver)(cfg)


def _resolve(ref: str) -> Any:
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# Keys are `pathloop` command names; jobs/<key>.py (- written _) runs each as a Ray job.
STEPS: dict[str, Step] = {
    "pretrain": Step(
        "pathloop.pretrain:PretrainConfig", "pathloop.pretrain:run_pretrain", "train.steps"
    ),
    "sample": Step("pathloop.sampling:SampleConfig", "pathloop.sampling:run_sample"),
    "reward": Step("pathloop.reward:RewardConfig", "pathloop.reward:run_reward", "train.steps"),
    "finetune": Step(
        "pathloop.finetune:FinetuneConfig", "pathloop.finetune:run_finetune", "train.steps"
    ),
    "concepts": Step("pathloop.concepts:ConceptsConfig", "pathloop.concepts:run_concepts"),
    "guidance-classifier": Step(
        "pathloop.classifiers:GuidanceJobConfig", "pathloop.classifiers:run_guidance_classifier"
    ),
    "evaluate": Step("pathloop.evaluate:EvaluateConfig", "pathloop.evaluate:evaluate_models"),
    "sweep": Step("pathloop.sweep:SweepConfig", "pathloop.sweep:run_sweep"),
    "ablation": Step("pathloop.sweep:AblationConfig", "pathloop.sweep:run_ablation"),
    "loop": Step("pathloop.pipeline:LoopConfig", "pathloop.pipeline:run_loop"),
    "experiment": Step(
        "pathloop.experiment:ExperimentConfig", "pathloop.experiment:run_experiment"
    ),
}


def get_step(name: str) -> Step:
    """The registered step ``name``; an unknown name lists the valid ones."""
    if name not in STEPS:
        raise KeyError(f"unknown step {name!r}; valid steps: {', '.join(STEPS)}")
    return STEPS[name]


# ----------------------------------------------------------------------------- Ray jobs


def main(step: str, argv: list[str] | None = None) -> None:
    """Run ``pathloop <step> ARGV`` (default ``sys.argv[1:]``) and exit with its status."""
    import sys

    from pathloop.cli import app

    get_step(step)  # a job script naming no registered step is a bug in the script
    app([step, *(sys.argv[1:] if argv is None else argv)], prog_name=f"jobs/{step}.py")


def in_ray_job() -> bool:
    """True inside the entrypoint of a submitted Ray job."""
    return RAY_JOB_ENV in os.environ


def check_outputs(cfg: Any) -> list[str]:
    """Inside a Ray job, one warning per output field holding a relative local path (it would
    be written into the job's temporary working directory); elsewhere none."""
    from pathloop.storage import is_uri

    if not in_ray_job():
        return []
    warnings = []
    for name in OUTPUT_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, str) and not is_uri(value) and not os.path.isabs(value):
            warnings.append(
                f"{name}={value!r} is relative: inside a Ray job it lands in the job's "
                f"temporary working dir ({os.getcwd()}), which Ray deletes; pass an absolute "
                f"path on shared storage or a URI, e.g. {name}=$PATHLOOP_STORAGE/{value}"
            )
    return warnings

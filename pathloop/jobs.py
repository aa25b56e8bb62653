"""Ray job entrypoints: ``jobs/<step>.py`` runs ``pathloop <step>`` as a Ray job.

    ray job submit --working-dir . -- \
        python jobs/pretrain.py --config jobs/configs/pretrain.tiny.yaml [a.b=v ...]

A job script is ``main("<step>")`` and nothing else, so a job and the CLI command are one code
path: the same config model, the same library call, the same flags and exit codes. Inside a Ray
job the working directory is Ray's unpacked copy of ``--working-dir`` (without what .gitignore
and .rayignore exclude, so no ``runs/``), which Ray garbage-collects after the job: outputs
belong on shared storage, and ``check_outputs`` says so when a config writes to a relative path.
"""

from __future__ import annotations

import os
from typing import Any

# Set by Ray's job supervisor in the entrypoint's environment (runtime env and metadata).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Top-level config fields that name where a job writes.
OUTPUT_FIELDS = ("workdir", "out")


def main(step: str, argv: list[str] | None = None) -> None:
    """Run ``pathloop <step> ARGV`` (default ``sys.argv[1:]``) and exit with its status."""
    import sys

    from pathloop.cli import app

    app([step, *(sys.argv[1:] if argv is None else argv)], prog_name=f"jobs/{step}.py")


def in_ray_job() -> bool:
    """True inside the entrypoint of a submitted Ray job."""
    return RAY_JOB_ENV in os.environ


def check_outputs(cfg: Any) -> list[str]:
    """Inside a Ray job, one warning per output field holding a relative local path (it would
    be written into the job's temporary working directory); elsewhere none."""
    if not in_ray_job():
        return []
    warnings = []
    for name in OUTPUT_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            warnings.append(
                f"{name}={value!r} is relative: inside a Ray job it lands in the job's "
                f"temporary working dir ({os.getcwd()}), which Ray deletes; pass an absolute "
                f"path on shared storage or a URI, e.g. {name}=$PATHLOOP_STORAGE/{value}"
            )
    return warnings

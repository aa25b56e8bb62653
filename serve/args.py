"""ServeArgs: the one config of the HTTP service, read from a Ray Serve config file.

``serve/config.yaml`` is a plain Ray Serve config (``serve deploy serve/config.yaml`` works); the
``args`` of its pathloop application are a ``ServeArgs``. ``load_args`` reads them for
``pathloop serve`` and tests, with the same ``key.sub=value`` overrides as every other job.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, SecretStr, model_validator

from pathloop.config import ConfigError, Frozen, load_config

APP_NAME = "pathloop"
DEFAULT_MODEL = "default"  # the id of ServeArgs.model among the served models
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Limits(Frozen):
    """Bounds on what one request, or one client, may ask for; past them 422, 413 or 429."""

    max_n: int = Field(16, ge=1, le=1024, description="Images per /v1/generate request.")
    max_steps: int = Field(250, ge=1, le=1000, description="Denoising steps per request.")
    max_image_steps: int = Field(
        1000,
        ge=1,
        description="Denoising work of one /v1/generate request: n x steps (422 above). One "
        "request holds the generator for all of it (16 x 250 took 72 s on 2 CPU cores).",
    )
    max_concurrent_per_client: int = Field(
        4,
        ge=1,
        description="Requests one client may have in flight on /v1/generate and /v1/score* "
        "(429 above). A client is its API token, else its IP address (behind a proxy without "
        "tokens, every client shares the proxy's). Per ingress replica.",
    )
    max_image_bytes: int = Field(
        4 * 2**20,
        ge=1024,
        description="Bytes of an uploaded image (413 above); the JSON body may "
        "be 4/3 of this plus 64 KiB for base64.",
    )
    max_side: int = Field(2048, ge=8, description="Width or height of an uploaded image, px (413).")
    max_score_batch: int = Field(
        256,
        ge=1,
        le=4096,
        description="Images per /v1/score/batch request (422 above); a batch is scored in one "
        "model call (merged with other waiting requests up to score_batch_size).",
    )
    max_batch_bytes: int = Field(
        32 * 2**20,
        ge=1024,
        description="Body bytes of a /v1/score/batch request (413 above); each image is still "
        "held to max_image_bytes and max_side.",
    )


class ServeArgs(Frozen):
    """Everything the pathloop Serve application needs; each deployment re-validates it."""

    # --- models (resolved when a replica starts, never at import)
    model: str | None = Field(
        None,
        description="Diffusion checkpoint dir, models:/name/version or runs:/id/model; "
        "None = no /v1/generate (503).",
    )
    reward_model: str | None = Field(
        None,
        description="Reward model for /v1/score (a model dir, its job's result.json or an MLflow "
        "URI); None = no reward.",
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="More diffusion models the same Generator serves, {name: dir, result.json "
        "or MLflow URI}, e.g. every round of a loop; a request picks one with `model` "
        "(None: `model`, listed as 'default'). Loaded on first use (max_models_per_replica).",
    )
    registered_models: tuple[str, ...] = Field(
        (),
        description="Registered model names in the tracking_uri store whose versions a request "
        "may name as models:/<name>/<version> (e.g. the loop's pathloop-finetune).",
    )
    max_models_per_replica: int = Field(
        3,
        ge=1,
        description="Diffusion models one Generator replica keeps loaded; a request for another "
        "loads it and unloads the least recently used (Ray Serve model multiplexing). "
        "In-process (--no-ray) the same bound holds for the one process.",
    )
    judge: bool = Field(False, description="Score with the phantom judge (per-criterion results).")
    tracking_uri: str | None = Field(None, description="MLflow URI for models:/ and runs:/ refs.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per replica; None = Ray's default (its reserved "
        "CPUs). More threads than reserved CPUs oversubscribe the cores and slow sampling down.",
    )

    # --- HTTP
    app_name: str = Field(APP_NAME, description="Serve application name.")
    route_prefix: str = Field("/", description="Serve route prefix of the application.")
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 to expose).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port.")
    open_on_network: bool = Field(
        False,
        description="Allow a host other than loopback with no API tokens, i.e. /v1/generate and "
        "/v1/score open to anyone who reaches the port. Off: such a config is an error.",
    )
    docs: Literal["auto", "open", "token", "off"] = Field(
        "auto",
        description="/docs, /redoc and /openapi.json. open: to anyone; token: /openapi.json "
        "with an API token, no /docs (a browser page cannot send one); off: none; auto: open "
        "without API tokens, token with them.",
    )
    image_size: int | None = Field(
        None,
        ge=8,
        description="Side (px) of the square images /v1/score accepts (422 otherwise, unless the "
        "request asks resize); None = the diffusion model's sample_size, else 32 (the judge's).",
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="Per request wait for a model; past it the answer is 504."
    )
    limits: Limits = Field(default_factory=Limits)
    api_tokens: tuple[SecretStr, ...] | None = Field(
        None,
        description="Bearer tokens for /v1/* model routes; None = open. Review routes take "
        "a rater token from the feedback store instead.",
    )
    api_tokens_env: str | None = Field(
        None, description="Env var with comma-separated API tokens, read when the app is built."
    )

    # --- replicas and batching
    replicas: int = Field(1, ge=1, description="Generator replicas.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per Generator replica (fractional ok).")
    generator_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per Generator.")
    scorer_cpus: float = Field(0.5, ge=0, description="CPUs Ray reserves for the Scorer.")
    ingress_cpus: float = Field(0.5, ge=0, description="CPUs Ray reserves for the ingress.")
    max_batch_size: int = Field(
        16, ge=1, description="Images per merged sample() call (and UNet batch); >= limits.max_n."
    )
    batch_wait_timeout_s: float = Field(
        0.02, ge=0, description="How long a batch waits for more requests before it runs."
    )
    score_batch_size: int = Field(256, ge=1, description="Images per Scorer batch.")
    health_check_period_s: float = Field(
        10.0, gt=0, description="How often Serve checks each replica; a dead one is replaced."
    )
    model_access_log: bool = Field(
        False,
        description="Serve's access log in the Generator and Scorer replicas too. The ingress "
        "logs every request either way; off, since on 2 cores these lines cost ~10 % of "
        "/v1/generate throughput.",
    )

    # --- review
    feedback_url: str | None = Field(
        None, description="Feedback store (SQLite path or SQLAlchemy URL); None = no review routes."
    )
    review_round: int | None = Field(None, ge=1, description="Round the review UI serves.")
    review_samples_dir: str | None = Field(
        None, description="Or: a shard set; its round is reused, else created at start."
    )
    real_examples: str | None = Field(
        None, description="Shard set of real cells shown beside each image (matched by class)."
    )
    real_examples_per_class: int = Field(6, ge=0, le=32, description="Real examples per class.")
    review_require_criteria: bool | None = Field(
        None,
        description="An implausible verdict must name at least one failed criterion (422 "
        "otherwise; the page asks for one); None = the round's own setting "
        "(`pathloop review create --require-criteria`).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServeArgs:
        if (self.models or self.registered_models) and not self.model:
            raise ValueError("models and registered_models add to the default model: set model too")
        bad = [k for k in self.models if not MODEL_NAME.fullmatch(k) or k == DEFAULT_MODEL]
        if bad:
            raise ValueError(
                f"models names {bad}: use letters, digits, '.', '_' or '-' (at most 64), "
                f"not {DEFAULT_MODEL!r} (the name of `model`)"
            )
        if self.limits.max_n > self.max_batch_size:
            raise ValueError(
                f"limits.max_n ({self.limits.max_n}) must be <= max_batch_size "
                f"({self.max_batch_size}): one request must fit in one batch"
            )
        if self.review_round is not None and self.review_samples_dir is not None:
            raise ValueError("set review_round or review_samples_dir, not both")
        if (self.review_round or self.review_samples_dir) and not self.feedback_url:
            raise ValueError("review_round/review_samples_dir need feedback_url")
        tokens = self.api_tokens or self.api_tokens_env
        if not (_loopback(self.host) or tokens or self.open_on_network):
            raise ValueError(
                f"host {self.host} exposes /v1/generate and /v1/score with no API token: set "
                "api_tokens or api_tokens_env, or open_on_network: true to mean it"
            )
        return self

    def tokens(self) -> list[str]:
        """The API tokens in force: api_tokens plus those in $api_tokens_env."""
        out = [t.get_secret_value() for t in self.api_tokens or ()]
        if self.api_tokens_env:
            out += [t.strip() for t in os.environ.get(self.api_tokens_env, "").split(",")]
        return [t for t in out if t]

    def to_dict(self) -> dict:
        """A dict for crossing process boundaries (secrets kept, unlike mode='json')."""
        d = self.model_dump(mode="python")
        d["api_tokens"] = self.tokens() or None
        d["api_tokens_env"] = None  # resolved here, where the environment is
        return d


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def app_args(serve_config: dict, app_name: str = APP_NAME) -> dict:
    """The ``args`` of application ``app_name`` in a Ray Serve config (the only one, if one)."""
    apps = serve_config.get("applications") or []
    if not apps:
        raise ConfigError("the Serve config has no applications: list")
    match = [a for a in apps if a.get("name") == app_name] or (apps if len(apps) == 1 else [])
    if not match:
        names = ", ".join(str(a.get("name")) for a in apps)
        raise ConfigError(f"no application named {app_name!r} in the Serve config; have: {names}")
    return dict(match[0].get("args") or {})


def load_args(path: str | Path | None = None, overrides: list[str] = ()) -> ServeArgs:
    """ServeArgs from a Serve config file's application args < ``key.sub=value`` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"serve config {str(p)!r} not found; pass an existing YAML file")
        tree = app_args(yaml.safe_load(p.read_text()) or {})
    # load_config gives the same error messages and override rules as every other job.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(tree, f)
    try:
        return load_config(ServeArgs, f.name, list(overrides))
    finally:
        os.unlink(f.name)

"""The `pathloop` command: one error path (a user mistake is one `error:` line and exit 2, a bug
keeps its traceback), read-only review commands refuse a missing store, help text survives rich
markup, and one step registry serves the CLI, the Ray job scripts and sweeps."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pathloop.cli import app, one_line

REPO = Path(__file__).resolve().parents[1]


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _assert_user_error(res, needle: str) -> str:
    """Exit 2, no traceback, and exactly one `error:` line, which contains ``needle``."""
    assert res.exit_code == 2, res.output + repr(res.exception)
    assert isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    assert needle in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "args, needle",
    [
        (["sample", "model=/no/such"], "model '/no/such' is neither"),
        (["sample", "per_clas=3"], "'per_clas' is not a field"),
        (["sample", "per_class=0", "sampler.steps=-1"], "per_class: Input should be greater"),
        (["finetune", "--method", "bogus"], "method"),
        (["loop", "--config", "/no/such.yaml"], "config file '/no/such.yaml' not found"),
        (["judge", "/no/dir"], "/no/dir is not a shard set: no such folder"),
        (["pretrain", "data.shards=/no/dir"], "/no/dir is not a shard set"),
        (["ingest", "/no/src", "--out", "o"], "source '/no/src' does not exist"),
        (["phantoms", "--out", "o", "--size", "48"], "--size must be 32 or 64, got 48"),
        (["phantoms", "--out", "o", "--scenario", "x"], "unknown scenario 'x'; valid scenarios"),
        (["judge", ".", "--expert", "x"], "unknown expert profile 'x'; valid profiles: default"),
        (["review", "stats", "1", "--store", "foo://x"], "cannot open feedback store 'foo://x'"),
    ],
)
def test_user_mistakes_print_one_line_and_exit_2(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _assert_user_error(_invoke(*args), needle)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()


def test_unknown_mlflow_model_is_a_user_error(tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = _invoke("sample", "model=models:/nope/1", f"tracking.tracking_uri={db}")
    line = _assert_user_error(res, "model 'models:/nope/1' is not in the MLflow store")
    assert "nope" in line and "tracking URI" in line


def test_read_only_review_commands_refuse_a_missing_store(tmp_path):
    store = tmp_path / "typo.db"
    for args in (["stats", "99"], ["export", "1", "--out", str(tmp_path / "x")], ["judge", "1"]):
        res = _invoke("review", *args, "--store", str(store))
        _assert_user_error(res, f"no feedback store at {store}")
        assert "pathloop review create" in res.output
    assert not store.exists()


def test_review_create_checks_samples_before_making_a_store(tmp_path):
    store = tmp_path / "fb.db"
    res = _invoke("review", "create", "--samples", "/no/dir", "--store", str(store))
    _assert_user_error(res, "/no/dir is not a shard set")
    assert not store.exists()


def test_review_round_lifecycle_and_unknown_round(phantom_shards, tmp_path):
    store = str(tmp_path / "fb.db")
    rater = _invoke("review", "rater", "alice", "--store", store)  # may start a store
    assert rater.exit_code == 0, rater.output
    _assert_user_error(_invoke("review", "stats", "99", "--store", store), "existing rounds: none")
    created = _invoke("review", "create", "--samples", str(phantom_shards), "--store", store)
    assert created.exit_code == 0, created.output
    rid = created.stdout.strip().splitlines()[-1]
    assert _invoke("review", "stats", rid, "--store", store).exit_code == 0
    line = _assert_user_error(_invoke("review", "stats", "99", "--store", store), "round 99")
    assert f"existing rounds: {rid}" in line


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user errors are caught: anything else reaches the caller (exit 1, traceback)."""
    import pathloop.sampling

    def buggy(cfg):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pathloop.sampling, "run_sample", buggy)
    res = _invoke("sample")
    assert res.exit_code == 1 and isinstance(res.exception, ZeroDivisionError)
    assert "error:" not in res.output


def test_a_bug_prints_a_traceback_from_the_console_entry(tmp_path):
    code = (
        "import pathloop.sampling as s\n"
        "def bug(cfg): raise ZeroDivisionError('a bug')\n"
        "s.run_sample = bug\n"
        "from pathloop.cli import app\n"
        "app(['sample'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" in out.stderr and "ZeroDivisionError" in out.stderr


def test_one_line_drops_key_quotes_and_joins_details():
    assert one_line(KeyError("unknown evaluator 'x'; valid: judge")) == (
        "unknown evaluator 'x'; valid: judge"
    )
    msg = "invalid X:\n  a: too small (got 0)\n  b: unknown key"
    assert one_line(ValueError(msg)) == "invalid X: a: too small (got 0); b: unknown key"
    assert one_line(ValueError()) == "ValueError"


# ----------------------------------------------------------------------------- help


def test_loop_help_keeps_the_bracketed_round():
    res = _invoke("loop", "--help")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "pretrain → [review round → feedback → reward → finetune → evaluate] × rounds" in text


# ----------------------------------------------------------------------------- the registry


def _job_step(script: Path) -> str | None:
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main":
            return node.args[0].value
    return None


def test_one_registry_serves_cli_jobs_and_sweeps():
    from pydantic import BaseModel
    from typer.main import get_command

    from pathloop.jobs import STEPS, get_step
    from pathloop.sweep import jobs

    commands = get_command(app).commands
    assert set(STEPS) <= set(commands)
    scripts = {_job_step(p) for p in (REPO / "jobs").glob("*.py")}
    assert scripts == set(STEPS)  # every job script runs a registered step, and vice versa
    for name, step in STEPS.items():
        assert issubclass(step.config_cls, BaseModel), name
    assert all(step is STEPS[name] for name, step in jobs().items())
    assert set(jobs()) == {"pretrain", "reward", "finetune", "evaluate"}
    assert jobs()["evaluate"].steps_key is None  # a trial evaluates once, in one segment
    for name, step in jobs().items():  # a sweep splits this key into Train segments
        if name == "evaluate":
            continue
        node = step.config_cls()
        for part in step.steps_key.split("."):
            node = getattr(node, part)
        assert isinstance(node, int) and node > 0, name
    with pytest.raises(KeyError, match="valid steps: pretrain, sample"):
        get_step("pretrian")


def test_registry_drivers_resolve():
    from pathloop.jobs import STEPS, _resolve

    for name, step in STEPS.items():
        assert callable(_resolve(step.driver)), name


def test_importing_the_cli_and_registry_loads_nothing_heavy():
    code = (
        "import sys, pathloop.cli, pathloop.jobs\n"
        "heavy = ('torch', 'ray', 'mlflow', 'sqlalchemy', 'pathloop.pretrain', 'pathloop.sweep')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

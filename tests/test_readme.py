"""The README as a user meets it: its HTTP examples run as pasted, its size, its commands.

The HTTP section's shell blocks run under bash against ``pathloop serve --no-ray`` (plain uvicorn,
the same routes as behind Ray Serve) on a free localhost port. The server starts from the README's
own serve command, in a directory laid out like ``runs/loop`` after the README's loop command: a
tiny untrained diffusion checkpoint and a phantom review round stand in for the loop's. Only the
port changes (and ``--no-ray``); every client command runs verbatim otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
MAX_CHARS = 12_000
# The project's own development history: numbered work periods, issue numbers, who had a GPU.
HISTORY = re.compile(
    r"\bsessions? \d|\bissues? #?\d|(?<![\w&/])#\d+\b|\bno GPU (?:was|has been|is) "
    r"(?:lent|available)|\blent\b",
    re.IGNORECASE,
)
# `pathloop demo`, `pathloop review rater`; not paths, package names or `from pathloop import x`.
COMMAND = re.compile(
    r"(?<![\w/.-])(?<!from )(?<!import )pathloop ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?"
)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)

pytestmark = pytest.mark.timeout(240)


def section(text: str, heading: str) -> str:
    """The body of the ``## heading...`` section (up to the next ``## ``)."""
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- static checks


def test_readme_is_under_the_size_limit():
    n = len(README.read_text())
    assert n < MAX_CHARS, f"README.md is {n} characters; keep it under {MAX_CHARS}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_development_history(doc):
    hits = [
        f"{doc.name}:{i}: {line.strip()}"
        for i, line in enumerate(doc.read_text().splitlines(), start=1)
        if HISTORY.search(line)
    ]
    assert not hits, "name the machine and date of a figure, not its history:\n" + "\n".join(hits)


def named_commands(text: str) -> set[tuple[str, ...]]:
    """``pathloop <command> [<subcommand>]`` as written in code blocks and inline code."""
    code = [c for _, c in blocks(text)]
    rest = FENCE.sub("", text)
    code += re.findall(r"`([^`\n]+)`", rest)
    found = set()
    for chunk in code:
        for m in COMMAND.finditer(chunk):
            found.add(tuple(g for g in m.groups() if g))
    return found


def test_every_named_command_exists():
    import typer

    from pathloop.cli import app

    cli = typer.main.get_command(app)
    named = set().union(*(named_commands(p.read_text()) for p in DOCS))
    assert ("demo",) in named and ("serve",) in named  # the scan sees the README's commands
    missing = []
    for words in sorted(named):
        cmd = cli.commands.get(words[0])
        if cmd is None:
            missing.append(" ".join(words))
        elif len(words) > 1 and hasattr(cmd, "commands") and words[1] not in cmd.commands:
            missing.append(" ".join(words))
    assert not missing, f"not in `pathloop --help`: {missing}; valid: {sorted(cli.commands)}"


def documented_step_commands(text: str) -> list[tuple[str, str | None, list[str]]]:
    """(step, --config path, overrides) of every complete `pathloop <step> ...` command in the
    code blocks: continuation lines joined, comments dropped; placeholders (``...``, ``<x>``,
    ``$VAR``) make a command an example, not a command, and it is skipped."""
    import shlex

    from pathloop.jobs import STEPS

    out = []
    for _, code in blocks(text):
        for line in code.replace("\\\n", " ").splitlines():
            m = re.search(r"(?<![\w/.-])pathloop ([a-z][a-z-]*)(.*)", line)
            if not m or m.group(1) not in STEPS:
                continue
            rest = m.group(2).split(" #")[0]
            if re.search(r"\.\.\.|<|\$", rest):
                continue
            words, config, overrides = shlex.split(rest), None, []
            for i, w in enumerate(words):
                if w in ("--config", "-c"):
                    config = words[i + 1]
                elif w == "--method":
                    overrides.append(f"method={words[i + 1]}")
                elif "=" in w and not w.startswith("-"):
                    overrides.append(w)
            out.append((m.group(1), config, overrides))
    return out


def test_documented_commands_have_valid_configs():
    """Every documented `pathloop <step> --config X a.b=v` builds its config: the YAML and the
    dotted keys exist (a renamed key fails here, not for a reader)."""
    from pathloop.config import ConfigError, load_config
    from pathloop.jobs import STEPS

    commands = [c for p in DOCS for c in documented_step_commands(p.read_text())]
    assert len(commands) >= 20, commands  # the scan sees the docs' commands
    bad = []
    for step, config, overrides in commands:
        if config is not None and not (REPO / config).is_file():
            continue  # a file the reader made (e.g. a sweep's best.yaml)
        path = REPO / config if config else None
        try:
            load_config(STEPS[step].config_cls, path, overrides)
        except ConfigError as err:
            bad.append(f"pathloop {step} --config {config} {' '.join(overrides)}:\n  {err}")
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- HTTP examples


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory, tiny_ckpt, phantom_shards) -> Path:
    """A directory laid out like the repo after the README's loop (the model untrained and tiny)."""
    root = tmp_path_factory.mktemp("readme")
    (root / "serve").mkdir()
    shutil.copy(REPO / "serve/config.yaml", root / "serve/config.yaml")
    r1 = root / "runs/loop/round1"
    (r1 / "finetune").mkdir(parents=True)
    (r1 / "finetune/result.json").write_text(json.dumps({"checkpoint": str(tiny_ckpt)}))
    (r1 / "review").symlink_to(phantom_shards, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def http_section() -> str:
    return section(README.read_text(), "HTTP")


@pytest.fixture(scope="module")
def server(demo_root, http_section) -> str:
    """The README's serve command, with ``--no-ray`` and a free port; its base URL."""
    [serve_cmd] = [c for lang, c in blocks(http_section) if "pathloop serve" in c]
    port = free_port()
    cmd = serve_cmd.replace("pathloop serve ", "exec pathloop serve --no-ray ", 1)
    cmd = cmd.replace("--config serve/config.yaml", f"--config serve/config.yaml port={port}", 1)
    assert f"port={port}" in cmd and "--no-ray" in cmd, serve_cmd
    log = (demo_root / "serve.log").open("w")
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", cmd],
        cwd=demo_root,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, ended below by its id
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}:\n{_tail(demo_root)}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after 150 s:\n{_tail(demo_root)}")
            time.sleep(0.25)
        yield url
        assert proc.poll() is None, f"server died during the examples:\n{_tail(demo_root)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # this venv's python and pathloop first
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}


def _tail(root: Path) -> str:
    return (root / "serve.log").read_text()[-3000:]


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.strip()][-1])


def _check_outputs(block: str, cwd: Path, stdout: str) -> list[str]:
    """What each example promises: the files it names and the JSON it prints."""
    from PIL import Image

    checked = []
    for name in re.findall(r"-o (\S+)", block):
        path = cwd / name
        assert path.is_file() and path.stat().st_size > 0, f"{name} not written"
        if name.endswith(".png"):
            with Image.open(path) as im:
                assert im.format == "PNG" and im.size == (32, 32), (im.format, im.size)
        elif name.endswith(".json"):
            assert json.loads(path.read_text())["images"], name
        checked.append(name)
    for pattern in re.findall(r"open\(f'([^']*\{i\}[^']*)'", block):
        files = sorted(cwd.glob(pattern.replace("{i}", "*")))
        assert files, f"no {pattern}"
        for path in files:
            with Image.open(path) as im:
                assert im.format == "PNG", path
        checked.append(pattern)
    if "/v1/classes" in block:
        body = json.loads(stdout)
        assert {c["code"] for c in body["classes"]} >= {"M5", "ER6"} and len(body["criteria"]) == 7
        checked.append("classes")
    if "/v1/score" in block:
        score = _last_json(stdout)
        assert score["reward"] is None or 0.0 <= score["reward"] <= 1.0, score
        assert isinstance(score["plausible"], bool), score  # serve/config.yaml: judge: true
        assert set(score["criteria"]) and score["class_name"], score
        checked.append("score")
    return checked


def test_http_examples_work_as_pasted(server, demo_root, http_section):
    port = server.rsplit(":", 1)[1]
    examples = [
        (lang, c)
        for lang, c in blocks(http_section)
        if "pathloop serve" not in c and re.search(r"(localhost|127\.0\.0\.1):8000", c)
    ]
    assert len(examples) >= 4, "the HTTP section lost its examples"
    checked = []
    for lang, code in examples:
        code = re.sub(r"(localhost|127\.0\.0\.1):8000", f"127.0.0.1:{port}", code)
        if lang == "python":  # the example's result must be what it says: PNG bytes
            code += "\nassert pngs and all(p.startswith(b'\\x89PNG\\r\\n\\x1a\\n') for p in pngs)"
            argv = [sys.executable, "-c", code]
        else:
            argv = ["bash", "-euo", "pipefail", "-c", code]
        done = subprocess.run(
            argv, cwd=demo_root, env=_env(), capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (
            f"example failed ({done.returncode}):\n{code}\n{done.stderr[-2000:]}"
        )
        checked += _check_outputs(code, demo_root, done.stdout) if lang != "python" else ["py"]
    for what in ("m5.png", "er6.json", "er6_{i}.png", "classes", "score", "py"):
        assert what in checked, f"no README example produced {what}; checked {checked}"
    assert checked.count("score") >= 2  # both routes: the PNG upload and the JSON body

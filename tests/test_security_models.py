"""Hostile inputs to the models and the review store: pickled code in checkpoints, truncated
checkpoints on resume, rater tokens that expire and are revoked, images kept on the machine."""

from __future__ import annotations

import ast
import hashlib
import pickle
import re
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.block_out_channels=[16, 32]", "model.layers_per_block=1"]


class _Payload:
    """Unpickling this calls ``open(flag, "w")``: the flag file appears iff pickled code ran."""

    def __init__(self, flag: Path) -> None:
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def _plant(path: Path, flag: Path) -> None:
    """Replace ``path`` with a pickle that creates ``flag`` when a loader unpickles it."""
    torch.save({"state": {}, "param_groups": [], "x": _Payload(flag)}, path)


@pytest.fixture
def old_torch_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch < 2.6 behaviour: a ``torch.load`` that does not pass weights_only unpickles code."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


# ----------------------------------------------------------------------------- pickled code


def test_every_torch_load_passes_weights_only_and_the_floor_is_2_6() -> None:
    unsafe = []
    for d in ("pathloop", "serve", "jobs"):
        for f in sorted((ROOT / d).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if not (isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"):
                    continue
                kw = {k.arg: k.value for k in node.keywords}
                flag = kw.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    unsafe.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    floor = re.search(r'"torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert floor and tuple(map(int, floor.group(1).split("."))) >= (2, 6)


def test_crafted_optimizer_pt_never_runs(tiny_ckpt: Path, tmp_path: Path, old_torch_default):
    import shutil

    from pathloop.diffusion import load_checkpoint

    ckpt, flag = tmp_path / "ck", tmp_path / "pwned"
    shutil.copytree(tiny_ckpt, ckpt)
    _plant(ckpt / "optimizer.pt", flag)
    ck = load_checkpoint(ckpt)  # sampling and `pathloop serve`: optimizer.pt is never opened
    assert ck.optimizer_state is None and ck.step == 3
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(ckpt, optimizer=True)  # resume reads it as data and refuses the code
    assert not flag.exists()


def test_crafted_classifier_reward_and_reward_optimizer_files_never_run(
    tmp_path: Path, old_torch_default
):
    from pathloop import classifiers as C
    from pathloop import reward as R
    from pathloop.vocab import BONE_MARROW_16

    flag = tmp_path / "pwned"
    model = R.RewardModel(C.build_backbone("tiny", 16, 32), BONE_MARROW_16, hidden=8)
    fitter = SimpleNamespace(model=model, opt=torch.optim.AdamW(model.parameters()))
    _, load = R.reward_checkpoints(None, fitter)
    for planted, loader in [
        ("backbone/model.pt", lambda d: C.load_backbone(d / "backbone")),
        ("head.pt", R.load_reward_model),
        ("optimizer.pt", lambda d: load(str(d))),
    ]:
        out = tmp_path / planted.replace("/", "_")
        R.save_reward_model(out, model, step=1, config={}, metrics={}, optimizer=fitter.opt)
        _plant(out / planted, flag)
        with pytest.raises(pickle.UnpicklingError):
            loader(out)
        assert not flag.exists(), planted


# ----------------------------------------------------------------------------- resume


def _run_with_two_checkpoints(tmp_path: Path):
    """A tiny diffusion job's state and run dir with Ray-named checkpoints at steps 2 and 4."""
    from pathloop.config import load_config
    from pathloop.harness import build_state, unet_checkpoints
    from pathloop.pretrain import PretrainConfig
    from pathloop.vocab import Vocabulary

    cfg = load_config(PretrainConfig, None, TINY)
    vocab = Vocabulary.from_names(["a", "b"])
    st = build_state(cfg, len(vocab), torch.device("cpu"))
    save, load = unet_checkpoints(cfg, st, vocab)
    run = tmp_path / "run"
    old = run / "checkpoint_2025-01-01_00-00-01.000000"  # Ray names them by report time
    new = run / "checkpoint_2025-01-01_00-00-02.000000"
    save(str(old), 2, {})
    with torch.no_grad():
        for p in st.raw.parameters():
            p.add_(1.0)  # the newest weights differ from the older ones
    save(str(new), 4, {})
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's files beside them
    return st, load, old, new


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("broken", ["unet/diffusion_pytorch_model.safetensors", "optimizer.pt"])
def test_resume_skips_a_truncated_newest_checkpoint_and_says_so(tmp_path: Path, broken: str):
    import ray.train

    from pathloop.diffusion import load_checkpoint
    from pathloop.harness import load_newest, run_checkpoints

    st, load, old, new = _run_with_two_checkpoints(tmp_path)
    _truncate(new / broken)
    candidates = run_checkpoints(ray.train.Checkpoint(str(new)))  # what get_checkpoint() gives
    assert [Path(c.path).name for c in candidates] == [new.name, old.name]
    lines: list[str] = []
    assert load_newest(candidates, load, tell=lines.append) == 2
    assert len(lines) == 1 and "skipping checkpoint" in lines[0] and new.name in lines[0]
    assert "\n" not in lines[0]
    kept = load_checkpoint(old, ema=False).raw_unet.state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in st.raw.state_dict().items())

    _truncate(old / broken)
    with pytest.raises(RuntimeError, match=f"no checkpoint of this run loads: .*{old.name}"):
        load_newest(candidates, load, tell=lines.append)


@pytest.mark.slow
def test_pretrain_job_resumes_past_a_truncated_newest_checkpoint(
    ray_session, phantom_shards: Path, tmp_path: Path
):
    """Through Ray Train: the newest checkpoint Ray hands back is broken, the run goes on from
    the older one it kept."""
    from pathloop.config import load_config
    from pathloop.pretrain import PretrainConfig, run_pretrain

    overrides = [
        f"workdir={tmp_path / 'run'}",
        f"data.shards={phantom_shards}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *TINY,
        "train.batch_size=8",
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.sample_every=0",
        "train.preview_per_class=1",
        "preview.steps=2",
        "scaling.torch_threads=1",
        "max_failures=0",
    ]
    cfg = load_config(PretrainConfig, None, overrides)
    assert run_pretrain(cfg)["step"] == 4
    kept = sorted(
        p for p in (tmp_path / "run" / "ray" / cfg.name).glob("checkpoint_*") if p.is_dir()
    )
    assert len(kept) == 2
    _truncate(kept[-1] / "unet" / "diffusion_pytorch_model.safetensors")
    again = load_config(PretrainConfig, None, [*overrides, "resume=true", "train.steps=6"])
    assert run_pretrain(again)["step"] == 6  # from step 2; before, the broken step 4 crashed it


# ----------------------------------------------------------------------------- rater tokens


@pytest.fixture
def store(tmp_path: Path):
    from pathloop.feedback import FeedbackStore

    with FeedbackStore(tmp_path / "fb.db") as s:
        yield s


def _now(days: float = 0):
    from pathloop.feedback_db import utc_now

    return utc_now() + timedelta(days=days)


def _clock(monkeypatch: pytest.MonkeyPatch, days: float) -> None:
    """The store's clock, ``days`` ahead."""
    import pathloop.feedback as F

    monkeypatch.setattr(F, "utc_now", lambda: _now(days))


def test_tokens_expire(store, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathloop.feedback_db import FeedbackError

    ann, ann_token = store.add_rater("ann")  # the default lifetime: 30 days
    bob, bob_token = store.add_rater("bob", expires_days=2)
    _clock(monkeypatch, 1)
    assert store.rater_for_token(ann_token).id == ann and store.rater_for_token(bob_token).id == bob
    _clock(monkeypatch, 3)
    assert store.rater_for_token(bob_token) is None and store.rater_for_token(ann_token).id == ann
    _clock(monkeypatch, 31)
    assert store.rater_for_token(ann_token) is None
    listed = {
        t.rater: (t.status(_now()), t.status(_now(3)), t.status(_now(31))) for t in store.tokens()
    }
    assert listed == {"ann": ("active",) * 2 + ("expired",), "bob": ("active",) + ("expired",) * 2}
    renewed = store.issue_token(bob, expires_days=60)
    assert store.rater_for_token(renewed).id == bob  # day 31 of the clock, 60-day token
    with pytest.raises(FeedbackError, match="lifetime"):
        store.add_rater("cy", expires_days=0)


def test_revoked_tokens_are_refused(store) -> None:
    from pathloop.feedback_db import FeedbackError

    ann, ann_token = store.add_rater("ann")
    bob, bob_token = store.add_rater("bob")
    revoked = store.revoke_token("ann")
    assert revoked.rater == "ann" and revoked.revoked is not None
    assert store.rater_for_token(ann_token) is None and store.rater_for_token(bob_token).id == bob
    bob_id = next(t.token_id for t in store.tokens() if t.rater == "bob")
    store.revoke_token(bob_id)  # by token id
    assert store.rater_for_token(bob_token) is None
    assert {t.rater: t.status(_now()) for t in store.tokens()} == {
        "ann": "revoked",
        "bob": "revoked",
    }
    with pytest.raises(FeedbackError, match="names no token.*ann"):
        store.revoke_token("nobody")
    assert store.rater_for_token(store.issue_token(ann)).id == ann  # a new token works again


def test_an_older_store_opens_and_its_tokens_get_an_expiry(tmp_path: Path) -> None:
    from pathloop.feedback import FeedbackStore

    path = tmp_path / "old.db"
    with FeedbackStore(path) as s:
        _, token = s.add_rater("ann")
        with s.engine.begin() as conn:  # the raters table as pathloop made it before expiry
            for col in ("token_created", "token_expires", "token_revoked"):
                conn.exec_driver_sql(f"ALTER TABLE raters DROP COLUMN {col}")
    with FeedbackStore(path) as s:
        assert s.rater_for_token(token).name == "ann"
        (info,) = s.tokens()
        assert timedelta(days=29) < info.expires - _now() <= timedelta(days=30)
        s.revoke_token("ann")
        assert s.rater_for_token(token) is None


def test_cli_lists_and_revokes_tokens_without_showing_them(tmp_path: Path) -> None:
    from pathloop.cli import app

    db, run = str(tmp_path / "fb.db"), CliRunner().invoke
    made = run(app, ["review", "rater", "ann", "--expires-days", "7", "--store", db])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[-1]
    digest = hashlib.sha256(token.encode()).hexdigest()
    listed = run(app, ["review", "tokens", "--store", db])
    assert listed.exit_code == 0, listed.output
    assert "ann" in listed.output and "active" in listed.output
    assert token not in listed.output and digest not in listed.output
    gone = run(app, ["review", "tokens", "--revoke", "ann", "--store", db])
    assert gone.exit_code == 0 and "revoked" in gone.stdout.splitlines()[-1]
    assert token not in gone.output
    renewed = run(app, ["review", "rater", "ann", "--new-token", "--store", db])
    assert renewed.exit_code == 0 and renewed.stdout.strip().splitlines()[-1] != token


# ----------------------------------------------------------------------------- MLLM


def test_mllm_without_an_endpoint_refuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pathloop.cli import app
    from pathloop.experts import BASE_URL_ENV, MLLMError, get_evaluator
    from pathloop.feedback import FeedbackStore

    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    with pytest.raises(MLLMError, match="off this machine"):
        get_evaluator("mllm", model="gpt-4o")
    with pytest.raises(MLLMError, match="model name"):
        get_evaluator("mllm", base_url="http://127.0.0.1:9/v1")
    assert get_evaluator("mllm", model="m", base_url="http://127.0.0.1:9/v1")  # explicit: fine
    assert get_evaluator("mllm", model="m", allow_public_api=True)  # explicit opt-in: fine
    FeedbackStore(tmp_path / "fb.db").close()
    args = ["review", "mllm", "1", "--model", "m", "--store", str(tmp_path / "fb.db")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "off this machine" in res.output
    with FeedbackStore(tmp_path / "fb.db") as s:
        assert s.raters() == []  # refused before anything was recorded

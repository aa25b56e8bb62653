"""Finetuning jobs on Ray Train: preference (DPO) end to end, reward shaping, lineage in MLflow."""

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pathloop.config import load_config
from pathloop.finetune import FinetuneConfig, run_finetune, shape_rewards


def test_shape_rewards_modes():
    r = np.array([0.2, 0.6, 0.9, 0.3])
    c = np.array([0, 0, 1, 1])
    assert np.allclose(shape_rewards(r, c, "raw", 0.5), r)
    assert np.allclose(shape_rewards(r, c, "threshold", 0.5), [0, 1, 1, 0])
    # class_norm: each class's weights average to 1
    assert np.allclose(shape_rewards(r, c, "class_norm", 0.5), [0.5, 1.5, 1.5, 0.5])
    assert np.array_equal(shape_rewards(r, c, "none", 0.5), [0, 0, 0, 0])  # the control arm
    assert np.array_equal(shape_rewards(r, c, "ones", 0.5), [1, 1, 1, 1])  # self-training
    # class_z: centred and scaled within each class into [0, 1]; a class scored alike is 0.5
    z = shape_rewards(
        np.array([1.0, 0.0, 0.0, 0.0, 0.7, 0.7]), np.array([0, 0, 0, 0, 1, 1]), "class_z", 0.5
    )
    assert z[0] == 1.0 and np.allclose(z[1:4], 0.5 - 0.5 / np.sqrt(3)) and np.allclose(z[4:], 0.5)


def _magic_rule(s1: int, s2: int, n: int) -> tuple[int, int]:
    """MAGIC's App. A.2 on summed scores of n criteria, as written for n = 5 (bar 2 of 5)."""
    lose = 2 / 5 * n
    if max(s1, s2) <= lose:
        return -1, -1
    if min(s1, s2) == n or (s1 == s2 and s1 > lose):
        return 1, 1
    return (1, -1) if s1 > s2 else (-1, 1)


def test_pair_rule_is_magics_for_5_and_7_criteria():
    import itertools

    from pathloop.finetune import magic_pair_signs

    for n in (5, 7):
        for s1, s2 in itertools.product(range(n + 1), repeat=2):
            assert magic_pair_signs(s1 / n, s2 / n) == _magic_rule(s1, s2, n), (n, s1, s2)
    kinds = [_magic_rule(a, b, 5) for a, b in itertools.product(range(6), repeat=2)]
    assert (kinds.count((-1, -1)), kinds.count((1, 1))) == (9, 3)  # 0-2 x 0-2; 3-3, 4-4, 5-5
    # 7 criteria: at most 2 passed loses, so 2 vs 2 both lose and 3 vs 3 both win
    assert magic_pair_signs(2 / 7, 2 / 7) == (-1, -1) and magic_pair_signs(3 / 7, 3 / 7) == (1, 1)
    assert magic_pair_signs(2 / 7, 3 / 7) == (-1, 1)
    assert magic_pair_signs(0.6 + 0.1 + 0.2, 0.9) == (1, 1)  # averaged votes: equal to rounding


def test_given_rewards_match_images_by_id(tmp_path):
    import re

    from pathloop.finetune import check_reward_source, given_rewards

    csv = tmp_path / "r.csv"
    csv.write_text("id,reward\n007,0.5\nb,1\na,0\n")
    assert given_rewards(str(csv), ["a", "007", "b"]).tolist() == [0.0, 0.5, 1.0]
    pq.write_table(pa.table({"id": ["a"], "score": [1.0]}), tmp_path / "r.parquet")
    for path, ids, needle in [
        (csv, ["a", "zz"], "no reward for 1 of the 2 synthetic images (e.g. id zz)"),
        (tmp_path / "r.parquet", ["a"], "lacks columns ['reward']"),
        (tmp_path / "none.csv", ["a"], "no such file"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(needle)):
            given_rewards(str(path), ids)
    csv.write_text("id,reward\na,-1\n")
    with pytest.raises(ValueError, match="finite number >= 0"):
        given_rewards(str(csv), ["a"])
    with pytest.raises(ValueError, match="not both"):
        check_reward_source(FinetuneConfig(rewards="r.csv", reward_model="m"))
    check_reward_source(FinetuneConfig(reward_mode="ones"))  # self-training needs no rewards
    check_reward_source(FinetuneConfig(rewards="r.csv"))


@pytest.fixture(scope="module")
def checklist_feedback(tmp_path_factory, phantom_shards):
    """A feedback export with per-criterion failure fractions (as the judge or an MLLM gives)."""
    from pathloop.data import encode_png, iter_records
    from pathloop.vocab import CRITERIA

    rng = np.random.default_rng(0)
    rows = list(iter_records(phantom_shards, split="train"))
    cols = {
        "id": [r["id"] for r in rows],
        "image": [encode_png(r["image"]) for r in rows],
        "class_id": [r["class_id"] for r in rows],
    }
    for c in CRITERIA:
        cols[f"fail_{c}"] = rng.integers(0, 2, len(rows)).astype(float) * (rng.random() < 0.5)
    out = tmp_path_factory.mktemp("feedback") / "feedback.parquet"
    pq.write_table(pa.table(cols), out)
    return out


def test_dpo_finetune_end_to_end(
    ray_session, tiny_ckpt, checklist_feedback, phantom_shards, tmp_path
):
    import mlflow

    cfg = load_config(
        FinetuneConfig,
        None,
        [
            f"workdir={tmp_path / 'ft'}",
            f"pretrained={tiny_ckpt}",
            f"synthetic={checklist_feedback}",
            f"real={phantom_shards}",
            "method=dpo",
            "train.steps=3",
            "train.batch_size=8",
            "train.log_every=1",
            "train.checkpoint_every=3",
            "train.preview_per_class=1",
            "preview.steps=2",
            "scaling.torch_threads=1",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
            "feedback_round=7",
            "feedback_fraction=0.5",
        ],
    )
    res = run_finetune(cfg)
    assert res["step"] == 3 and res["data"]["pairs"] > 0 and res["data"]["real_images"] == 128
    run = mlflow.MlflowClient(res["tracking_uri"]).get_run(res["run_id"])
    assert run.data.tags["pathloop.method"] == "dpo"
    assert run.data.tags["pathloop.feedback_round"] == "7"
    assert run.data.tags["pathloop.pretrained"] == str(tiny_ckpt)
    assert np.isfinite(run.data.metrics["loss"])
    kinds = res["data"]["pair_kinds"]  # ties do not train by default
    assert sum(kinds.values()) == res["data"]["pairs"]
    assert run.data.metrics["pairs_trained"] == res["data"]["pairs_trained"] == kinds["one_wins"]
    assert run.data.metrics["pairs_both_lose"] == kinds["both_lose"]
    assert 0 <= run.data.metrics["preview/colour/intensity"] <= 1  # the last step's preview


def test_reward_method_needs_a_reward_model(tiny_ckpt, checklist_feedback, tmp_path):
    cfg = FinetuneConfig(
        workdir=str(tmp_path / "ft"),
        pretrained=str(tiny_ckpt),
        synthetic=str(checklist_feedback),
        method="reward",
        tracking={"tracking_uri": f"sqlite:///{tmp_path}/m.db"},
    )
    with pytest.raises(ValueError, match="reward_model"):
        run_finetune(cfg)


@pytest.mark.parametrize("p_uncond", [0.0, 1.0])
def test_real_term_trains_the_null_class_when_labels_drop(p_uncond):
    """Eq. 3's beta_r term is the plain CFG training loss: its labels drop to the null class at
    p_uncond, as the synthetic term's do; otherwise CFG's unconditional branch goes stale."""
    import torch

    from pathloop.diffusion import null_class
    from pathloop.finetune import finetune_loss
    from pathloop.harness import build_state

    cfg = load_config(
        FinetuneConfig,
        None,
        [
            "model.block_out_channels=[16, 32]",
            "model.layers_per_block=1",
            "train.batch_size=8",
            "real=unused",
            f"p_uncond={p_uncond}",
        ],
    )
    st = build_state(cfg, 16, torch.device("cpu"))
    rng = np.random.default_rng(0)
    data = {
        "images": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "class_ids": np.array([0, 1, 2, 3]),
        "weights": np.zeros(4, dtype=np.float32),  # the synthetic term contributes nothing
        "pairs": np.zeros((0, 4), dtype=np.int64),
        "real_images": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "real_class_ids": np.array([0, 1, 2, 3]),
    }
    finetune_loss(cfg, st, None, data, 0, 0, 1).backward()
    emb = st.raw.class_embedding.weight.grad  # (classes + 1, dim); the last row is the null class
    null_grad = emb[null_class(st.raw)].abs().sum().item()
    real_grad = emb[:4].abs().sum().item()
    if p_uncond == 1.0:
        assert null_grad > 0 and real_grad == 0  # every real label dropped to the null class
    else:
        assert null_grad == 0 and real_grad > 0


def test_the_control_arm_needs_the_real_term(tmp_path):
    """reward_mode=none trains on real images only; without them it would train nothing."""
    cfg = FinetuneConfig(workdir=str(tmp_path), reward_model="r", reward_mode="none", beta_r=0.0)
    with pytest.raises(ValueError, match="beta_r > 0 and real="):
        run_finetune(cfg)


def test_previews_log_their_mean_colour_per_class(tmp_path):
    """Each preview logs its samples' mean intensity and RGB, overall and per class, at the
    preview's step, so colour drift shows in MLflow while a finetuning run goes (no Ray)."""
    import mlflow
    import torch

    from pathloop import tracking
    from pathloop.harness import MlflowRun, RankZeroLog, build_state
    from pathloop.vocab import BONE_MARROW_16

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(
        FinetuneConfig,
        None,
        [
            "model.block_out_channels=[16, 32]",
            "model.layers_per_block=1",
            f"workdir={tmp_path}",
            "train.steps=4",
            "train.sample_every=2",
            "train.preview_per_class=2",
            "preview.steps=2",
            f"tracking.tracking_uri={uri}",
        ],
    )
    run_id = tracking.start_run(cfg.tracking, tmp_path, run_name="preview")
    st = build_state(cfg, len(BONE_MARROW_16), torch.device("cpu"))
    log = RankZeroLog(cfg, MlflowRun(uri=uri, run_id=run_id), 0, st, BONE_MARROW_16)
    for step in (2, 3):  # 3 is not a preview step
        log.preview(step)
    client = mlflow.MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    p = "preview/colour"
    codes = [c.code for c in BONE_MARROW_16.classes]
    per_class = {c: [metrics[f"{p}/class/{c}/{k}"] for k in ("r", "g", "b")] for c in codes}
    for c, rgb in per_class.items():  # intensity is the mean of the channels, all in [0, 1]
        assert metrics[f"{p}/class/{c}/intensity"] == pytest.approx(np.mean(rgb))
        assert all(0 <= v <= 1 for v in rgb)
    overall = np.mean(list(per_class.values()), axis=0)  # equal images per class
    assert [metrics[f"{p}/{k}"] for k in ("r", "g", "b")] == pytest.approx(overall)
    history = client.get_metric_history(run_id, f"{p}/class/{codes[0]}/intensity")
    assert [m.step for m in history] == [2]
    assert (tmp_path / "previews" / "step_000002.png").is_file()


def _tiny_state_and_data(overrides: list[str]):
    """A (16, 32)-channel UNet's training state and a step's data: 4 synthetic and 4 real rows."""
    import torch

    from pathloop.harness import build_state

    base = ["model.block_out_channels=[16, 32]", "model.layers_per_block=1", "real=unused"]
    cfg = load_config(FinetuneConfig, None, [*base, "train.batch_size=8", *overrides])
    st = build_state(cfg, 16, torch.device("cpu"))
    rng = np.random.default_rng(0)
    data = {
        "images": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "class_ids": np.array([0, 1, 2, 3]),
        "weights": np.zeros(4, dtype=np.float32),
        "pairs": np.zeros((0, 4), dtype=np.int64),
        "real_images": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "real_class_ids": np.array([0, 1, 2, 3]),
    }
    return cfg, st, data


def test_a_pool_that_weighs_zero_is_skipped():
    """A pool that weighs 0 everywhere (the control's reward_mode=none, or zero rewards in any
    mode): its loss and gradients are those of a vanishing weight, with one network call per step
    (the real batch) instead of two. Without a pool at all (synthetic unset) the control draws
    the same real rows, noise and steps: the same loss and gradients."""
    import torch

    from pathloop.finetune import finetune_loss

    got = {}
    cases = {"none": ("none", 0.0), "raw": ("raw", 1e-30), "zeros": ("raw", 0.0)}
    for name, (mode, w) in {**cases, "no pool": ("none", None)}.items():
        torch.manual_seed(0)  # raw 1e-30: the pool term computed, weighed ~0
        cfg, st, data = _tiny_state_and_data([f"reward_mode={mode}", "beta_r=1.0"])
        data["weights"] = np.full(4, w or 0.0, np.float32)
        if w is None:  # an empty synthetic set, as _finetune_data writes it for synthetic=None
            data |= {"images": data["images"][:0], "class_ids": data["class_ids"][:0]}
            data["weights"] = data["weights"][:0]
        calls = []
        st.model.register_forward_hook(lambda m, i, o, calls=calls: calls.append(len(i[0])))
        loss = finetune_loss(cfg, st, None, data, 3, 0, 1)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in st.model.parameters() if p.grad is not None])
        got[name] = (loss.item(), grads, calls)
    assert got["none"][2] == got["zeros"][2] == got["no pool"][2] == [8]  # the real batch
    assert got["raw"][2] == [8, 8]
    assert got["none"][0] == pytest.approx(got["raw"][0]) and got["none"][0] > 0
    torch.testing.assert_close(got["none"][1], got["raw"][1])
    assert got["no pool"][0] == got["none"][0]
    torch.testing.assert_close(got["no pool"][1], got["none"][1], rtol=0, atol=0)


def test_weigh_real_draws_real_rows_in_proportion_to_their_weights():
    """Eq. 3 with weigh_real: the real rows are drawn by their weights (weight 0: never; 0/1
    verdicts: the curated data), and the term is the plain loss on them, whatever the scale."""
    import torch

    from pathloop.finetune import _finetune_batch, finetune_loss

    cfg, st, data = _tiny_state_and_data(["weigh_real=true", "real_rewards=unused"])
    shape = (3, 32, 32)
    picks = torch.cat(
        [
            _finetune_batch(cfg, s, 4, 4, shape, 0, 1, torch.tensor([0.0, 1.0, 0.0, 3.0]))[1]
            for s in range(20)
        ]
    )
    share = (picks == 3).float().mean().item()
    assert set(picks.tolist()) == {1, 3} and 0.6 < share < 0.9  # 3/4 of the rows, 160 draws
    uniform = _finetune_batch(cfg, 0, 4, 4, shape, 0, 1)[1]
    assert len(set(uniform.tolist())) > 2  # no weights: every real row can come
    with torch.no_grad():
        losses = {}
        for name, w in {"ones": 1.0, "twos": 2.0}.items():
            data["real_weights"] = np.full(4, w, np.float32)
            losses[name] = finetune_loss(cfg, st, None, data, 0, 0, 1).item()
        data["real_weights"] = np.array([0, 0, 1, 0], np.float32)
        only_2 = finetune_loss(cfg, st, None, data, 0, 0, 1).item()
        data["real_images"][2] = data["real_images"][0]  # the same picks, another image
        other = finetune_loss(cfg, st, None, data, 0, 0, 1).item()
    assert losses["ones"] > 0 and losses["twos"] == pytest.approx(losses["ones"])
    assert only_2 != pytest.approx(losses["ones"]) and other != pytest.approx(only_2)


def test_nft_on_real_images_learns_only_from_rewards_away_from_one_half():
    """method=nft with weigh_real: a real image with reward 0.5 (no information) gives no
    gradient at the frozen model, one with reward 1 the plain loss's; without weigh_real the
    real term stays the plain loss."""
    import copy

    from pathloop.finetune import finetune_loss

    def grad_norm(cfg, st, data) -> float:
        st.model.zero_grad()
        ref = copy.deepcopy(st.model).eval().requires_grad_(False)  # the model that drew the pool
        finetune_loss(cfg, st, ref, data, 0, 0, 1).backward()
        return sum(p.grad.abs().sum().item() for p in st.model.parameters() if p.grad is not None)

    cfg, st, data = _tiny_state_and_data(["method=nft", "weigh_real=true", "real_rewards=x"])
    data["weights"] = np.full(4, 0.5, np.float32)  # the synthetic rows carry no information
    data["real_weights"] = np.full(4, 0.5, np.float32)
    half = grad_norm(cfg, st, data)  # zero but for rounding (v- = 2 v_old - v)
    data["real_weights"] = np.ones(4, np.float32)
    one = grad_norm(cfg, st, data)
    plain = cfg.model_copy(update={"weigh_real": False})
    data["real_weights"] = np.full(4, 0.5, np.float32)  # ignored: the plain loss trains
    assert half < 1e-3 * one and grad_norm(plain, st, data) == pytest.approx(one, rel=1e-4)


def test_nft_with_real_nft_off_draws_the_real_rows_and_fits_them_plainly():
    """method=nft, weigh_real, real_nft=false: the pool stays in the negative-aware loss, the
    real rows are drawn by their weights (0/1: the curated data) and fitted with the plain loss,
    so rewards of 0.5 still train (in the nft loss they give no gradient) and a weight-0 image
    is never drawn."""
    import copy

    import torch

    from pathloop.finetune import finetune_loss

    cfg, st, data = _tiny_state_and_data(
        ["method=nft", "weigh_real=true", "real_rewards=x", "real_nft=false"]
    )
    ref = copy.deepcopy(st.model).eval().requires_grad_(False)
    data["weights"] = np.full(4, 0.5, np.float32)  # the pool carries no information
    norms = {}
    for name, c in {"plain": cfg, "nft": cfg.model_copy(update={"real_nft": True})}.items():
        data["real_weights"] = np.full(4, 0.5, np.float32)
        st.model.zero_grad()
        finetune_loss(c, st, ref, data, 0, 0, 1).backward()
        norms[name] = sum(
            p.grad.abs().sum().item() for p in st.model.parameters() if p.grad is not None
        )
    assert norms["nft"] < 1e-3 * norms["plain"]
    data["real_weights"] = np.array([0, 0, 1, 0], np.float32)
    with torch.no_grad():
        only_2 = finetune_loss(cfg, st, ref, data, 0, 0, 1).item()
        data["real_images"][0] = data["real_images"][3]  # an image never drawn
        same = finetune_loss(cfg, st, ref, data, 0, 0, 1).item()
        data["real_images"][2] = data["real_images"][1]  # the one drawn
        other = finetune_loss(cfg, st, ref, data, 0, 0, 1).item()
    assert same == only_2 and other != pytest.approx(only_2)


def test_nft_keeps_the_real_term_in_classes_the_expert_leaves_alone():
    """nft with weigh_real, by default: in a class where every real image passes, the real
    images keep reward 1 (the plain loss's gradient, above), a rejected one gets 0; centred
    within the class (class_z) they would all get 0.5, which gives no gradient."""
    from pathloop.finetune import real_mode

    verdicts, classes = np.array([1.0, 1.0, 1.0, 1.0, 0.0]), np.array([0, 0, 1, 1, 1])
    cfg = FinetuneConfig(method="nft", weigh_real=True, real_rewards="x", synthetic="s")
    weights = shape_rewards(verdicts, classes, real_mode(cfg), cfg.reward_threshold)
    assert weights.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    centred = shape_rewards(verdicts, classes, "class_z", cfg.reward_threshold)
    assert centred[:2].tolist() == [0.5, 0.5]  # what the class the expert leaves alone would get
    assert real_mode(cfg.model_copy(update={"method": "reward"})) == "class_norm"


def test_calibration_sets_each_class_to_its_rate_and_keeps_the_order():
    """real_labels: one logit shift per class takes the class's mean score to the rate the
    expert gave its labelled images; the order within a class and unlabelled classes stay."""
    from scipy.special import expit, logit
    from scipy.stats import spearmanr

    from pathloop.finetune import calibrate_per_class

    rng = np.random.default_rng(0)
    scores, ids = rng.uniform(0.02, 0.7, 300), np.repeat([0, 1, 2], 100)  # (300,)
    out = calibrate_per_class(scores, ids, {0: 0.8, 1: 1.0})
    assert out[ids == 0].mean() == pytest.approx(0.8, abs=1e-6)
    assert out[ids == 1].mean() == pytest.approx(0.99, abs=1e-6)  # clipped: no infinite shift
    np.testing.assert_allclose(out[ids == 2], scores[ids == 2])  # no labels: unchanged
    for c in (0, 1):
        m = ids == c
        assert spearmanr(scores[m], out[m]).statistic == pytest.approx(1.0)
        shift = logit(out[m]) - logit(scores[m])
        np.testing.assert_allclose(shift, shift[0], atol=1e-6)  # one offset per class
        assert shift[0] > 0 and expit(logit(scores[m]) + shift[0]).mean() == pytest.approx(
            out[m].mean()
        )


def test_real_labels_shift_the_reward_models_real_scores(tmp_path, monkeypatch):
    """The real images' scores, looked up by id, move to the labelled images' rate per class."""
    import pathloop.finetune as finetune
    from pathloop.data import ShardWriter, iter_records
    from pathloop.phantoms import generate
    from pathloop.vocab import BONE_MARROW_16

    real = tmp_path / "real"
    with ShardWriter(real, BONE_MARROW_16, source_note="two classes") as w:
        for img, cls, sub in generate(8, size=32, seed=0, classes=[0, 1]):
            w.add(img, cls, "train", "phantom", sub)
    rows = list(iter_records(real, "train", columns=["id", "class_id"]))
    y = np.array([r["class_id"] for r in rows])  # (16,) the order the beta_r term reads
    first = [np.flatnonzero(y == c)[:4] for c in (0, 1)]  # four labelled images per class
    labels = {"id": [rows[i]["id"] for i in np.concatenate(first)]}
    # reviewed images without a verdict (NaN, null) count for nothing
    labels["id"] += [rows[i]["id"] for i in np.flatnonzero(y == 0)[4:6]]
    plausible = [1, 1, 0, 1, 0, 0, 0, 1, float("nan"), None]
    pq.write_table(pa.table(labels | {"plausible": plausible}), tmp_path / "l.pq")
    monkeypatch.setattr(finetune, "_cached_rewards", lambda *a, **k: np.full(16, 0.5))
    cfg = FinetuneConfig(
        real=str(real), weigh_real=True, reward_model="m", real_labels=str(tmp_path / "l.pq")
    )
    finetune.check_reward_source(cfg)
    scores = finetune._real_scores(cfg, None, y, tmp_path / "c.npz")
    out = finetune._calibrated(cfg, scores, y)
    assert out[y == 0] == pytest.approx(0.75) and out[y == 1] == pytest.approx(0.25)
    pq.write_table(pa.table({"id": ["x"], "plausible": [1]}), tmp_path / "none.pq")
    none = cfg.model_copy(update={"real_labels": str(tmp_path / "none.pq")})
    with pytest.raises(ValueError, match="labels none of the 16 real images"):
        finetune._calibrated(none, scores, y)
    with pytest.raises(ValueError, match="set weigh_real=true and reward_model="):
        finetune.check_reward_source(cfg.model_copy(update={"real_rewards": "r.csv"}))


def test_weigh_real_needs_real_images_and_their_rewards():
    from pathloop.finetune import check_reward_source

    ok = {"rewards": "r.csv", "real": "shards", "weigh_real": True}
    check_reward_source(FinetuneConfig(**ok, real_rewards="real.csv"))
    check_reward_source(FinetuneConfig(reward_model="m", real="shards", weigh_real=True))
    for bad, needle in [
        ({**ok}, "weigh_real needs the real images' rewards"),
        ({**ok, "real_rewards": "x", "real": None}, "set real=<shard set> and beta_r > 0"),
        ({**ok, "real_rewards": "x", "beta_r": 0.0}, "set real=<shard set> and beta_r > 0"),
        ({**ok, "real_rewards": "x", "method": "dpo"}, "method=reward or nft"),
        ({**ok, "real_rewards": "x", "synthetic": None}, "synthetic is unset, and method=reward"),
    ]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            check_reward_source(FinetuneConfig(**bad))

"""Guidance that keeps diversity: limited-interval CFG, autoguidance, EMA vs raw weights.

Tiny untrained UNets (16 px), 2-3 DDIM steps, CPU, no Ray: the whole file runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from pathloop import diffusion as D
from pathloop.config import ConfigError, ModelConfig, NoiseConfig, SamplerConfig, load_config
from pathloop.vocab import BONE_MARROW_16, Vocabulary

NOISE = NoiseConfig()
TINY = ModelConfig(sample_size=16, block_out_channels=(16, 32), layers_per_block=1)
IDS = [0, 1, 2, 0]


def _unet(seed: int = 0, classes: int = 3, **changes):
    torch.manual_seed(seed)
    return D.build_unet(TINY.model_copy(update=changes), classes).eval()


def _reference_cfg(unet, ids, seed, steps, guidance, guided) -> torch.Tensor:
    """Classifier-free guidance written out with diffusers' DDIM scheduler, independent of
    ``sample()``'s loop: image i's noise from a generator seeded seed + i; ``guided(t)`` says
    whether step t is guided (scale ``guidance``) or conditional only."""
    sched = D.build_scheduler(NOISE, "ddim")
    sched.set_timesteps(steps)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(ids))]
    x = torch.cat([torch.randn((1, 3, 16, 16), generator=g) for g in gens])  # (N, C, H, W)
    x = x * sched.init_noise_sigma
    cond = torch.tensor(ids)
    null = torch.full_like(cond, D.null_class(unet))
    with torch.no_grad():
        for t in sched.timesteps:
            out_cond = unet(x, t, class_labels=cond).sample
            if guided(int(t)):
                out_null = unet(x, t, class_labels=null).sample
                out = out_null + guidance * (out_cond - out_null)
            else:
                out = out_cond
            x = sched.step(out, t, x, generator=gens, use_clipped_model_output=True).prev_sample
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------- interval


def test_full_interval_is_classifier_free_guidance_and_a_part_of_it_guides_only_there():
    unet = _unet()
    kw = dict(sampler="ddim", steps=2, guidance=3.0, seed=4, batch_size=4)  # t = 999, 499
    full = D.sample(unet, NOISE, IDS, guidance_interval=(0.0, 1.0), **kw)
    ref_full = _reference_cfg(unet, IDS, 4, 2, 3.0, lambda t: True)
    torch.testing.assert_close(full, ref_full, atol=1e-5, rtol=0)
    high = D.sample(unet, NOISE, IDS, guidance_interval=(0.6, 1.0), **kw)  # only t = 999
    ref_high = _reference_cfg(unet, IDS, 4, 2, 3.0, lambda t: t == 999)
    torch.testing.assert_close(high, ref_high, atol=1e-5, rtol=0)
    assert not torch.allclose(high, full, atol=1e-3)


def test_interval_holding_no_step_is_conditional_sampling():
    unet = _unet()
    kw = dict(sampler="ddim", steps=2, seed=4, batch_size=4)  # t/T = 0.999, 0.499
    cond = D.sample(unet, NOISE, IDS, guidance=1.0, **kw)
    for interval in ((0.6, 0.9), (0.3, 0.3), (0.0, 0.0)):
        empty = D.sample(unet, NOISE, IDS, guidance=3.0, guidance_interval=interval, **kw)
        assert torch.equal(empty, cond), interval
    assert not torch.allclose(D.sample(unet, NOISE, IDS, guidance=3.0, **kw), cond, atol=1e-3)


def test_sigma_interval_converts_edm_noise_levels():
    lo, hi = D.sigma_interval(NOISE, 0.28, 5.42)
    alphabar = D.build_scheduler(NOISE).alphas_cumprod.double()
    sigma = ((1 - alphabar) / alphabar).sqrt()
    t_lo, t_hi = round(lo * 1000), round(hi * 1000)
    assert 0.28 <= sigma[t_lo] and sigma[t_lo - 1] < 0.28
    assert sigma[t_hi] <= 5.42 < sigma[t_hi + 1]
    with pytest.raises(ValueError, match="no timestep"):
        D.sigma_interval(NOISE, 1e6, 2e6)


# ----------------------------------------------------------------------------- autoguidance


def test_a_guide_equal_to_the_model_is_conditional_sampling():
    unet = _unet()
    kw = dict(sampler="ddim", steps=3, seed=2, batch_size=4)
    cond = D.sample(unet, NOISE, IDS, guidance=1.0, **kw)
    assert torch.equal(D.sample(unet, NOISE, IDS, guidance=3.0, guide=unet, **kw), cond)
    weaker = _unet(seed=1)
    auto = D.sample(unet, NOISE, IDS, guidance=3.0, guide=weaker, **kw)
    cfg = D.sample(unet, NOISE, IDS, guidance=3.0, **kw)
    assert not torch.allclose(auto, cond, atol=1e-3) and not torch.allclose(auto, cfg, atol=1e-3)
    # guidance 0: the guide alone, conditional on the same class
    assert torch.equal(D.sample(unet, NOISE, IDS, guidance=0.0, guide=weaker, **kw),
                       D.sample(weaker, NOISE, IDS, guidance=1.0, **kw))  # fmt: skip


def test_autoguidance_follows_the_formula_at_every_step():
    """One DDIM step from pure noise: the prediction is guide + g (model - guide)."""
    unet, weaker = _unet(), _unet(seed=1)
    got = D.sample(unet, NOISE, IDS, sampler="ddim", steps=1, guidance=2.5, guide=weaker, seed=9)
    sched = D.build_scheduler(NOISE, "ddim")
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    gens = [torch.Generator().manual_seed(9 + i) for i in range(len(IDS))]
    x = torch.cat([torch.randn((1, 3, 16, 16), generator=g) for g in gens])
    cond = torch.tensor(IDS)
    with torch.no_grad():
        a, b = unet(x, t, class_labels=cond).sample, weaker(x, t, class_labels=cond).sample
    want = sched.step(b + 2.5 * (a - b), t, x, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(got, want.clamp(-1, 1), atol=1e-5, rtol=0)


def test_per_image_seeds_stay_independent_of_batching_with_interval_and_guide():
    unet, weaker = _unet(), _unet(seed=1)
    kw = dict(sampler="ddpm", steps=3, guidance=2.0, guidance_interval=(0.2, 0.9), guide=weaker)
    a = D.sample(unet, NOISE, IDS, seed=7, batch_size=4, **kw)
    b = D.sample(unet, NOISE, IDS, seed=7, batch_size=3, **kw)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    c = D.sample(unet, NOISE, [1, 2, 1], seed=8, batch_size=1, **kw)  # images 1, 2 of a
    torch.testing.assert_close(a[1:3], c[:2], atol=1e-4, rtol=0)
    assert not torch.allclose(a[0], a[3])


def test_a_guide_that_does_not_fit_is_refused():
    unet = _unet()
    with pytest.raises(ValueError, match="num_class_embeds"):
        D.sample(unet, NOISE, IDS, steps=1, guide=_unet(classes=4))
    with pytest.raises(ValueError, match="sample_size"):
        D.sample(unet, NOISE, IDS, steps=1, guide=_unet(sample_size=32))


# ----------------------------------------------------------------------------- weights


def _run_dir(root: Path, steps: list[int], vocab: Vocabulary = BONE_MARROW_16) -> list[Path]:
    """A training run's kept checkpoints, as the harness leaves them: <workdir>/ray/<name>/
    checkpoint_*, each with different raw and EMA weights; returned oldest first."""
    out = []
    config = {"workdir": str(root), "name": "pretrain", "noise": NOISE.model_dump()}
    for k, step in enumerate(steps):
        raw, ema = _unet(10 + k, len(vocab)), _unet(20 + k, len(vocab))
        path = root / "ray" / "pretrain" / f"checkpoint_2026-01-0{k + 1}"
        out.append(
            D.save_checkpoint(path, raw, ema_unet=ema, step=step, config=config, vocab=vocab)
        )
    return out


def test_ema_or_raw_weights_and_a_guide_loaded_from_a_path(tmp_path):
    from pathloop.sampling import load_models

    early, final = _run_dir(tmp_path, [250, 500])
    ids, kw = [0, 1], dict(sampler="ddim", steps=2, guidance=2.0, seed=1)
    ema_ck, _ = load_models(final, None, SamplerConfig())
    raw_ck, guide = load_models(final, early, SamplerConfig(weights="raw", guide_weights="ema"))
    assert torch.equal(ema_ck.unet.conv_in.weight, _unet(21, 16).conv_in.weight)
    assert torch.equal(raw_ck.unet.conv_in.weight, _unet(11, 16).conv_in.weight)
    assert torch.equal(guide.conv_in.weight, _unet(20, 16).conv_in.weight)
    # sample() loads a guide given as a directory with guide_weights (default: weights)
    by_path = D.sample(raw_ck.unet, NOISE, ids, guide=str(early), weights="raw", **kw)
    raw_guide = D.sample(raw_ck.unet, NOISE, ids, guide=_unet(10, 16), **kw)
    assert torch.equal(by_path, raw_guide)
    ema_guide = D.sample(raw_ck.unet, NOISE, ids, guide=str(early), guide_weights="ema", **kw)
    assert not torch.allclose(ema_guide, by_path, atol=1e-3)


def test_guide_earliest_is_the_oldest_checkpoint_the_run_kept(tmp_path):
    from pathloop.config import TrackingConfig
    from pathloop.sampling import load_models, resolve_guide

    first, second, final = _run_dir(tmp_path / "run", [250, 500, 750])
    assert [s for s, _ in D.kept_checkpoints(final)] == [250, 500, 750]
    tracking = TrackingConfig()
    assert resolve_guide("earliest", final, tracking) == first.resolve()
    assert resolve_guide(None, final, tracking) is None
    assert resolve_guide(str(second), final, tracking) == second.resolve()
    (only,) = _run_dir(tmp_path / "alone", [100])
    with pytest.raises(ValueError, match="kept no checkpoint before step 100"):
        resolve_guide("earliest", only, tracking)
    # a guide of other classes is refused by name
    classes = [c.model_dump() for c in BONE_MARROW_16.classes[:3]]
    (other,) = _run_dir(tmp_path / "other", [5], Vocabulary.model_validate({"classes": classes}))
    with pytest.raises(ValueError, match="another classes"):
        load_models(final, other, SamplerConfig())
    json.loads((final / "config.json").read_text())  # the checkpoint is left as it was


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "override, needle",
    [
        ("sampler.guidance_interval=[0.8, 0.2]", "0 <= lo <= hi <= 1"),
        ("sampler.guidance_interval=[-0.1, 0.5]", "0 <= lo <= hi <= 1"),
        ("sampler.guidance_interval=[0.2, 1.5]", "0 <= lo <= hi <= 1"),
        ("sampler.guidance_interval=[0.2]", "guidance_interval"),
        ("sampler.weights=best", "'ema' or 'raw'"),
        ("sampler.guide_weights=last", "'ema' or 'raw'"),
        ("sampler.guide=", "at least 1 character"),
    ],
)
def test_bad_guidance_settings_are_one_line_errors(override, needle):
    from pathloop.sampling import SampleConfig

    with pytest.raises(ConfigError) as err:
        load_config(SampleConfig, None, [override])
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid SampleConfig:" and len(lines) == 2, lines
    assert lines[1].strip().startswith("sampler.guid") or "weights" in lines[1]
    assert needle in lines[1]


def test_sampler_settings_reach_sample_as_keywords_and_sample_checks_the_interval():
    unet = _unet()
    cfg = SamplerConfig(steps=2, guidance=3.0, guidance_interval=(0.6, 0.9), seed=4)
    by_cfg = D.sample(unet, NOISE, IDS, **cfg.model_dump())
    assert torch.equal(by_cfg, D.sample(unet, NOISE, IDS, steps=2, guidance=1.0, seed=4))
    with pytest.raises(ValueError, match="guidance_interval"):
        D.sample(unet, NOISE, IDS, steps=1, guidance_interval=(0.5, 0.4))
    with pytest.raises(ValidationError):
        SamplerConfig(guidance_interval=(0.5, 0.4))


# ----------------------------------------------------------------------------- serve schema


def test_generate_request_takes_the_guidance_options():
    from pathloop.schemas import GenerateRequest

    req = GenerateRequest(
        class_name="M5", guidance_interval=[0.2, 0.8], guide="other", weights="raw"
    )
    assert req.guidance_interval == [0.2, 0.8] and req.guide == "other"
    assert req.weights == "raw" and req.guide_weights is None
    default = GenerateRequest(class_name="M5")
    assert (default.guidance_interval, default.guide, default.weights) == ([0, 1], None, "ema")
    bad_values = [[0.9, 0.1], [0.5], [0.1, 0.2, 0.3]]
    for bad in [
        *({"guidance_interval": v} for v in bad_values),
        {"weights": "best"},
        {"guide": ""},
    ]:
        with pytest.raises(ValidationError):
            GenerateRequest(class_name="M5", **bad)


# ----------------------------------------------------------------------------- the sweep preset


def test_guidance_sweep_preset_builds_every_trial_config():
    from pathloop.sweep import Segment, SweepConfig, check_space, measure_evaluate

    real = load_config(SweepConfig, "jobs/configs/sweep.guidance.real.yaml")
    assert check_space(real).torch_threads == 2 and real.metric == "prdc_test_coverage"
    sampler = load_config(SweepConfig, "jobs/configs/sweep.sampler.real.yaml")
    assert check_space(sampler).sampler.guidance == 1.0  # the guidance sweep's choice
    assert set(sampler.space) == {"sampler.sampler", "sampler.steps"}
    cfg = load_config(SweepConfig, "jobs/configs/sweep.guidance.tiny.yaml")
    job = check_space(cfg)  # every grid value through the evaluation job's config
    assert cfg.measure_names == ["evaluate"] and job.torch_threads == 2
    assert set(cfg.space) == {"sampler.guidance", "sampler.guidance_interval", "sampler.guide"}
    with pytest.raises(ValidationError, match="segments must be 1"):
        SweepConfig(step="evaluate", segments=2)
    with pytest.raises(ValidationError, match="only it does"):
        SweepConfig(step="finetune", measures=["evaluate"])
    result = {
        "fidelity": {"model": {"fid": 9.0, "precision": 0.5, "coverage": 0.25}, "real": {}},
        "tstr": {"model": {"synthetic": {"macro_f1": 0.4}}, "real": {"real": {"macro_f1": 1}}},
        "plausibility": {},
        "feature_model": {"test_accuracy": 1.0},
        "sampling": {"model": {"seconds": 8.0, "images": 32, "images_per_s": 4.0}},
    }
    got = measure_evaluate(Segment(cfg, job, result, None, {}))
    want = {"fid": 9.0, "precision": 0.5, "coverage": 0.25, "tstr_synthetic_macro_f1": 0.4}
    want |= {"sampling_seconds": 8.0, "sampling_images": 32, "sampling_images_per_s": 4.0}
    assert got == want


def test_the_sweep_tradeoff_table_and_plot(tmp_path):
    """An evaluation sweep's trials as the fidelity-diversity table: searched values first,
    rows by test coverage, TSTR with its interval, columns no trial reported left out."""
    from pathloop.sweep import write_tradeoff

    params = ["sampler.guidance", "sampler.guide"]
    rows = [
        {"sampler.guidance": 2.0, "sampler.guide": None, "prdc_test_precision": 0.9,
         "prdc_test_coverage": 0.3, "prdc_test_coverage_lo": 0.3, "prdc_test_coverage_hi": 0.3,
         "tstr_synthetic_macro_f1": 0.8,
         "tstr_synthetic_macro_f1_lo": 0.75, "tstr_synthetic_macro_f1_hi": 0.85},
        {"sampler.guidance": 1.0, "sampler.guide": "earliest", "prdc_test_precision": 0.7,
         "prdc_test_coverage": 0.6, "tstr_synthetic_macro_f1": 0.86},
    ]  # fmt: skip
    out = write_tradeoff(rows, params, tmp_path)
    lines = Path(out["md"]).read_text().splitlines()
    assert lines[0].startswith("| guidance | guide | precision (test, equal counts) |")
    assert "FID" not in lines[0] and "judge rate" not in lines[0]
    assert lines[2].startswith("| 1.0 | earliest | 0.700 | 0.600 |")  # the most coverage first
    assert lines[3].startswith("| 2.0 | none | 0.900 | 0.300 |")  # equal subsets: no interval
    assert "0.800 [0.750, 0.850]" in lines[3]
    assert Path(out["png"]).read_bytes()[:4] == b"\x89PNG"

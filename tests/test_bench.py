"""`make bench`'s report: the generated table is rewritten, the hand-written notes are kept."""

from __future__ import annotations

import json

from pathloop.bench import Figure, write_report


def test_report_rewrites_the_table_and_keeps_the_notes(tmp_path):
    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "benchmarks.json"
    write_report([Figure("judge", 500.0, "images/s", "direct", 1000.0)], md, js)
    assert "| judge | 500 images/s | 1000 (direct) | 0.50x |" in md.read_text()
    md.write_text(md.read_text() + "\n## Notes\n\nWhy the judge is slow.\n")

    write_report([Figure("judge", 800.0, "images/s", "direct", 1000.0)], md, js)
    text = md.read_text()
    assert "| judge | 800 images/s | 1000 (direct) | 0.80x |" in text
    assert "500 images/s" not in text
    assert text.endswith("## Notes\n\nWhy the judge is slow.\n")
    assert json.loads(js.read_text())["judge"]["ratio"] == 0.8


def test_gpu_section_runs_on_the_tiny_preset(tmp_path):
    """`make bench`'s GPU section as a CPU machine runs it (tiny preset, batch 4, two timed
    steps, a two-step sampler): pathloop's step beside the diffusers-example step, each figure
    with its FLOP/s, and the report takes them."""
    from pathloop.bench_gpu import Setup, bench_gpu, peak_tflops

    setup = Setup("tiny", 4, 1, 2, ("tiny",), 2, 2, compile=False)
    figs = {f.name.split(": ", 2)[-1]: f for f in bench_gpu(setup)}
    assert {"diffusers example, fp32", "pathloop train_step, defaults, eager", "fp32"} <= set(figs)
    ours = figs["pathloop train_step, defaults, eager"]
    assert ours.peer_name.endswith("diffusers example, fp32") and ours.ratio > 0
    assert ours.target == ">= 1.0x"
    for f in figs.values():
        assert f.value > 0 and f.unit == "images/s" and "TFLOP/s" in f.note
    gflop = float(ours.note.split(" GFLOP/image")[0])
    assert 1.0 < gflop < 2.0  # the tiny UNet: ~1.46 GFLOP per image forward and backward

    import torch

    assert peak_tflops(torch.device("cpu")) is None
    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "benchmarks.json"
    write_report(list(figs.values()), md, js)
    assert "| GPU section: train step, tiny preset, batch 4: pathloop train_step" in md.read_text()


def test_the_judge_is_timed_alone_and_beside_a_busy_process(tmp_path):
    import os

    from pathloop.bench import THREAD_VARS, bench_judge

    before = {k: os.environ.get(k) for k in THREAD_VARS}
    alone, beside = bench_judge(tmp_path)
    assert alone.value > 0 and beside.value > 0 and beside.peer_value == alone.value
    assert beside.ratio == beside.value / alone.value
    assert {k: os.environ.get(k) for k in THREAD_VARS} == before  # the child's settings only

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

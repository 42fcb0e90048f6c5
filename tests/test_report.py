"""Reports: one table of every stage of one or more runs (perplexity change only against the same protocol,
encoder agreement, speed against the base on the same device), markdown / HTML / JSON, and the Pareto plot."""

from __future__ import annotations

import json

import pytest

from compress import report
from compress.errors import CompressError


def _manifest(run, i, folder, disk, ppl=None, protocol=None, device="cpu", tokens_per_s=100.0, agreement=None):
    (run / folder).mkdir(parents=True)
    accuracy = {}
    if ppl is not None:
        accuracy["perplexity"] = {"zoo:austen": {"value": ppl, "protocol": protocol or {"seq_len": 512, "device": device}}}
    if agreement is not None:
        accuracy["agreement"] = {"zoo:austen": {"spearman": agreement, "mean_cosine": 0.9}}
    m = {"stage": "base" if i == 0 else folder[3:], "name": folder[3:], "index": i, "folder": folder, "complete": True,
         "format": "plain", "size": {"params": 1000, "disk_bytes": disk, "bits_per_weight": 8 * disk / 1000},
         "memory": {"measured_peak_bytes": 2**20, "method": "rss-growth"}, "accuracy": accuracy,
         "speed": {"eval_tokens_per_s": tokens_per_s, "protocol": {"device": device}}, "seconds": 1.0}
    (run / folder / "manifest.json").write_text(json.dumps(m))


def test_change_speed_and_frontier(tmp_path):
    run = tmp_path / "r"
    _manifest(run, 0, "00-base", 4000, 10.0)
    _manifest(run, 1, "01-small", 1000, 12.5, tokens_per_s=50.0)
    _manifest(run, 2, "02-worse", 2000, 13.0)                                   # bigger and worse: dominated
    _manifest(run, 3, "03-other", 500, 11.0, protocol={"seq_len": 256, "device": "cpu"})  # another protocol
    (run / "04-unfinished").mkdir()                                              # no manifest: not a stage yet
    rows = report.collect([run])
    assert [r["folder"] for r in rows] == ["00-base", "01-small", "02-worse", "03-other"]
    assert rows[1]["perplexity_change_pct"] == {"zoo:austen": pytest.approx(25.0)}
    assert rows[3]["perplexity_change_pct"] == {}                                # not comparable with the base
    assert rows[1]["eval_speed_vs_base"] == pytest.approx(0.5)
    md = report.to_markdown(rows)
    assert "12.50 (+25.0%)" in md and "(x0.50)" in md and md.count("\n| ") == 4
    assert "<table>" in report.to_html(rows) and json.loads(report.to_json(rows))[0]["folder"] == "00-base"
    pts = [(r["disk_bytes"], r["perplexity"]["zoo:austen"]) for r in rows[:3]]
    assert report.pareto_front(pts) == [1, 0]                                  # sorted by size: small, then base
    png = report.pareto_plot(rows, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(CompressError, match="disk_bytes or weights_bytes"):
        report.pareto_plot(rows, tmp_path / "q.png", metric="params")


def test_report_of_unevaluated_runs_says_why_there_is_no_plot(tmp_path):
    run = tmp_path / "r"
    _manifest(run, 0, "00-base", 4000)
    text = report.report([run], out_dir=run)
    assert "no Pareto plot" in text and (run / "report.md").is_file() and not (run / "pareto.png").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompressError, match="no finished stage"):
        report.collect([tmp_path / "empty"])


def test_report_shows_encoder_agreement(tmp_path):
    """A run of a bare encoder has no perplexity: the report's table carries its agreement per eval set."""
    run = tmp_path / "enc"
    for i, (folder, rho) in enumerate([("00-base", 1.0), ("01-distill", 0.8371)]):
        (run / folder).mkdir(parents=True)
        m = {"stage": "base" if i == 0 else "distill", "name": folder[3:], "index": i, "folder": folder,
             "complete": True, "size": {"params": 10}, "memory": {},
             "accuracy": {"agreement": {"zoo:austen": {"spearman": rho, "mean_cosine": 0.9}}}}
        (run / folder / "manifest.json").write_text(json.dumps(m))
    rows = report.collect([run])
    head, cells = report.table(rows)
    col = head.index("agreement zoo:austen")
    assert [c[col] for c in cells] == ["1.000", "0.837"]
    assert not any(h.startswith("ppl ") for h in head)


def test_kl_and_top1_columns_and_the_kl_plot(tmp_path):
    run = tmp_path / "r"
    _manifest(run, 0, "00-base", 4000, 10.0)
    _manifest(run, 1, "01-q", 1000, 12.0)
    for folder, kl, top1 in (("00-base", 0.0, 1.0), ("01-q", 0.125, 0.8)):
        path = run / folder / "manifest.json"
        m = json.loads(path.read_text())
        m["accuracy"]["perplexity"]["zoo:austen"].update(kl=kl, top1=top1)
        path.write_text(json.dumps(m))
    rows = report.collect([run])
    assert rows[1]["kl"] == {"zoo:austen": 0.125} and rows[1]["top1"] == {"zoo:austen": 0.8}
    head, cells = report.table(rows)
    col = head.index("KL / top-1 zoo:austen")
    assert [c[col] for c in cells] == ["0.0000 / 100.0%", "0.1250 / 80.0%"]
    assert report.pareto_plot(rows, tmp_path / "kl.png", y="kl").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(CompressError, match="perplexity or kl"):
        report.pareto_plot(rows, tmp_path / "x.png", y="bleu")

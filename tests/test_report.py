"""The run report: self-contained HTML, Markdown with figure files, and partial runs that do not crash."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from dualpseudo.artifacts import write_json, write_text
from dualpseudo.figures import save_grid
from dualpseudo.report import write_report
from dualpseudo.rundir import RunDir

C = 10


def _cm(rng, diag=40):
    return (rng.integers(0, 5, (C, C)) + np.eye(C, dtype=int) * diag).tolist()


def _stage1(run: RunDir, rng) -> None:
    s1 = run.stage1
    write_text(run.config, "data:\n  name: fashion_mnist\n  labels_per_class: 4\nstage2:\n  sampler: dpm\n"
                           "  steps: 20\n  guidance_scale: 1.5\nrounds: 2\n")
    write_json(run.env, {"torch": "2.x", "device": "cpu", "argv": ["dualpseudo", "run"]})
    write_json(s1 / "split.json", {"num_labeled": 40, "per_class": {str(c): 4 for c in range(C)}})
    precision = [0.9] * (C - 1) + [None]                                  # one class never predicted
    write_json(s1 / "metrics.json", {
        "pseudo_labels": {"num_images": 1000, "accuracy": 0.8123, "balanced_accuracy": 0.8,
                          "per_class_precision": precision, "per_class_recall": [0.7] * C,
                          "confusion_matrix": _cm(rng), "mean_confidence": 0.9},
        "test": {"top1": 0.7891, "per_class_accuracy": [0.8] * C, "confusion": np.array(_cm(rng)).tolist(),
                 "num_images": 500},
        "learner": "fixmatch", "network": "cnn13"})
    write_json(s1 / "manifest.json", {"wall_time_s": 12.5, "summary": {}})
    lines = [json.dumps({"step": i * 10, "loss_x": 2.0 / (i + 1), "loss_u": 0.1 * i, "mask": None if i == 0 else 0.5,
                         "lr": 0.03, "threshold": 0.95, "time": i, "note": "text is ignored"}) for i in range(6)]
    write_text(s1 / "stats.jsonl", "\n".join(lines) + "\n{\"step\": 70, \"loss_x\"")   # half-written last line


def _later_stages(run: RunDir, rng, r: int = 1) -> None:
    s2, s3, ev = run.stage("stage2", r), run.stage("stage3", r), run.stage("evaluation", r)
    images = rng.integers(0, 255, (C * 3, 8, 8, 1), dtype=np.uint8)
    save_grid(s2 / "grid.png", images, rows=C, row_names=[str(c) for c in range(C)])
    write_text(s2 / "stats.jsonl", "".join(json.dumps({"kimg": 0.5 * i, "loss": 1.0 / (i + 1), "lr": 1e-3,
                                                       "img_per_s": 100.0, "time": 1.7e9 + i}) + "\n"
                                           for i in range(5)))
    write_json(s2 / "manifest.json", {"wall_time_s": 300.0, "summary": {}})
    write_json(s3 / "metrics.json", {
        "pseudo_labels": {"accuracy": 0.85, "per_class_precision": [0.9] * C, "per_class_recall": [0.8] * C,
                          "confusion_matrix": _cm(rng)},
        "test": {"top1": 0.8234 + 0.01 * (r - 1), "per_class_accuracy": [0.85] * C, "confusion": _cm(rng),
                 "num_images": 500},
        "stage1_test_top1": 0.7891, "delta_top1": 0.0343 + 0.01 * (r - 1), "mode": "ssl", "num_pseudo_images": 300})
    write_json(s3 / "manifest.json", {"wall_time_s": 45.0, "summary": {}})
    write_text(s3 / "stats.jsonl", json.dumps({"step": 5, "loss_x": 0.5, "loss_u": 0.2, "mask": 0.9}) + "\n")
    write_json(ev / "metrics.json", {
        "num_samples": 300, "sampler": "dpm", "steps": 20, "guidance_scale": 1.5,
        "fid": {"fid": 23.456, "num_samples": 300, "num_reference": 1000, "sampler": "dpm", "steps": 20,
                "guidance_scale": 1.5},
        "class_consistency": {"accuracy": 0.9321, "per_class_accuracy": [0.9] * C, "confusion_matrix": _cm(rng)},
        "precision_recall": {"precision": 0.612, "recall": 0.543, "density": 0.9, "coverage": 0.8},
        "domain_fd": 3.21, "oracle": {"test_top1": 0.91}})
    write_json(ev / "manifest.json", {"wall_time_s": 30.0, "summary": {}})


def _check_outputs(run: RunDir) -> str:
    page = run.report_html.read_text()
    assert "data:image/png;base64," in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)      # nothing fetched from elsewhere
    assert "<link" not in page and "<script" not in page
    md = run.report_md.read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert refs
    for ref in refs:
        assert not ref.startswith(("/", "http")), ref
        assert (run.root / ref).is_file(), ref
    return page


def test_full_run_report(tmp_path):
    rng = np.random.default_rng(0)
    run = RunDir(tmp_path / "run")
    _stage1(run, rng)
    _later_stages(run, rng, 1)
    _later_stages(run, rng, 2)

    assert write_report(run) == run.report_html
    page = _check_outputs(run)
    md = run.report_md.read_text()
    for text in ("fashion_mnist", "78.91%", "82.34%", "83.34%", "+3.43 pp", "+4.43 pp", "81.23%", "23.46",
                 "93.21%", "0.612 / 0.543", "guidance 1.5", "20 steps", "12.5 s", "5.0 min", "round 2",
                 "ankle boot", "labels_per_class: 4"):
        assert text in page, text
        assert text in md, text
    assert page.count("data:image/png;base64,") >= 10       # 2 grids, 5 curves, 1 bar chart, 6 confusion matrices
    assert "not run yet" not in page


def test_partial_run_only_stage1(tmp_path):
    rng = np.random.default_rng(1)
    run = RunDir(tmp_path / "run")
    _stage1(run, rng)
    write_report(run)
    page = _check_outputs(run)
    assert "78.91%" in page and "81.23%" in page
    assert "not run yet" in page                      # stage 2/3/evaluation are noted, not crashed on


@pytest.mark.parametrize("junk", ["", "not json", "[1, 2]", '{"pseudo_labels": 3, "test": {"top1": "x"}}'])
def test_empty_or_broken_run(tmp_path, junk):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    if junk:
        write_text(run.stage1 / "metrics.json", junk)
        write_text(run.stage1 / "manifest.json", junk)
        write_text(run.config, junk)
    write_report(run)
    assert run.report_html.is_file() and run.report_md.is_file()
    assert "not run yet" in run.report_html.read_text()


def test_malformed_values_do_not_crash(tmp_path):
    run = RunDir(tmp_path / "run")
    write_text(run.config, "data:\n  name: [1, 2]\n")
    write_json(run.stage1 / "metrics.json", {
        "pseudo_labels": {"accuracy": "high", "per_class_precision": {"0": 1}, "per_class_recall": [0.5, "x", None],
                          "confusion_matrix": [[1, 2], [3]]},
        "test": {"top1": None, "confusion": "n/a", "per_class_accuracy": [1.0, 0.0, 0.5]}})
    write_text(run.stage1 / "stats.jsonl", '{"step": "a", "loss": [1]}\n3\n{"loss": 1.0}\n{"loss": 0.5}\n')
    write_json(run.stage("evaluation") / "metrics.json", {"fid": 12.0, "precision_recall": None})
    write_report(run)
    page = _check_outputs(run)
    assert "12.00" in page and "2: 2" in page

"""A user's own data: a folder of unlabeled images plus a labels file (data.name=pool), end to end, and every
bad-data case with its one-line error."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualpseudo.artifacts import read_json
from dualpseudo.cli import main
from dualpseudo.config import DataConfig
from dualpseudo.data.datasets import DataError, make_synthetic
from dualpseudo.data.pool import load_pool

from conftest import SMOKE_GRAPH
NAMES = ["bar-0", "bar-45", "bar-90", "bar-135"]


def make_pool(base: Path, labels_per_class: int = 2, fmt: str = "csv") -> dict:
    """Synthetic bars as PNGs under base/pool (nested, arbitrary names), a labels file and a test folder."""
    ds = make_synthetic(4, 48, 16, size=16, seed=0)
    pool = base / "pool"
    rows, seen = [], {c: 0 for c in range(4)}
    for i, (im, y) in enumerate(zip(ds.train_images, ds.train_labels)):
        p = pool / f"batch{i % 3}" / f"photo_{(i * 7919) % 1000:04d}_{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im[..., 0]).save(p)
        if seen[int(y)] < labels_per_class:
            seen[int(y)] += 1
            rows.append((p.relative_to(pool).as_posix(), NAMES[int(y)]))
    for i, (im, y) in enumerate(zip(ds.test_images, ds.test_labels)):
        p = base / "test" / NAMES[int(y)] / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im[..., 0]).save(p)
    labels = base / f"labels.{fmt}"
    if fmt == "csv":
        labels.write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    else:
        labels.write_text(json.dumps(dict(rows)))
    return {"root": pool, "labels": labels, "test": base / "test", "rows": rows, "ds": ds}


def _sets(p: dict, *extra: str) -> list[str]:
    out = []
    for kv in ("data.name=pool", f"data.root={p['root']}", f"data.labels_file={p['labels']}",
               "data.labels_per_class=0", *extra):
        out += ["--set", kv]
    return out


def test_pool_runs_the_whole_pipeline_and_says_what_it_cannot_measure(tmp_path):
    p = make_pool(tmp_path)
    run = tmp_path / "run"
    assert main(["run", SMOKE_GRAPH, "--run-dir", str(run), *_sets(p, f"data.test_root={p['test']}",
                 f"evaluation.cache_dir={tmp_path / 'cache'}")]) == 0
    split = read_json(run / "stage1/split.json")
    assert split["num_labeled"] == 8 and "every labeled image" in split["source"]
    m1, m3 = read_json(run / "stage1/metrics.json"), read_json(run / "stage3/metrics.json")
    assert m1["pseudo_labels"]["accuracy"] is None and "unknown" in m1["pseudo_labels"]["not_available"]
    assert sum(m1["pseudo_labels"]["predicted"]) == 192 - 8
    assert m1["test"]["top1"] > 0.5, "the test folder's classes are matched by name"
    ev = read_json(run / "evaluation/metrics.json")
    assert ev["class_consistency"] is None and ev["oracle"] is None and "class_consistency" in ev["not_available"]
    assert "stage 3's classifier" in ev["judged_by_stage3"]["judge"] and 0 <= ev["judged_by_stage3"]["accuracy"] <= 1
    report = (run / "report.md").read_text()
    assert "not available: the unlabeled images' true classes are unknown" in report
    assert "not available: no oracle" in report
    import dualpseudo
    assert dualpseudo.load_classifier(run).class_names == tuple(sorted(NAMES))
    assert m3["test"]["top1"] >= 0


def test_pool_without_a_test_set_reports_no_test_top1(tmp_path):
    p = make_pool(tmp_path, fmt="json")
    run = tmp_path / "run"
    assert main(["stage1", SMOKE_GRAPH, "--run-dir", str(run), *_sets(p,
                 f"evaluation.cache_dir={tmp_path / 'cache'}")]) == 0
    m1 = read_json(run / "stage1/metrics.json")
    assert "test" not in m1 and m1["pseudo_labels"]["accuracy"] is None


def test_sizes_and_modes_follow_the_documented_rule(tmp_path):
    p = make_pool(tmp_path)
    Image.new("RGB", (40, 24), (255, 0, 0)).save(p["root"] / "batch0" / "wide_red.png")   # another size, RGB
    cfg = DataConfig(name="pool", root=str(p["root"]), labels_file=str(p["labels"]), labels_per_class=0)
    with pytest.raises(DataError, match="data.image_size"):
        load_pool(cfg)
    ds = load_pool(DataConfig(name="pool", root=str(p["root"]), labels_file=str(p["labels"]),
                              labels_per_class=0, image_size=16, channels=0))
    assert ds.image_shape == (16, 16, 3)                 # one colour image makes the pool RGB
    assert (ds.train_labels == -1).sum() == 193 - 8 and not ds.train_labels_known
    assert ds.class_names == tuple(sorted(NAMES))


def _bad_labels(p, text):
    p["labels"].write_text(text)


@pytest.mark.parametrize("case, change, expect", [
    ("missing file", lambda p: _bad_labels(p, "nope.png,bar-0\n"), "does not exist"),
    ("outside the folder", lambda p: _bad_labels(p, "../test/bar-0/0.png,bar-0\n" + p["labels"].read_text()),
     "outside data.root"),
    ("two labels", lambda p: _bad_labels(p, p["labels"].read_text() + f"{p['rows'][0][0]},bar-90\n"),
     "labeled both"),
    ("one class", lambda p: _bad_labels(p, "".join(f"{r},bar-0\n" for r, _ in p["rows"])), "at least 2 classes"),
    ("malformed row", lambda p: _bad_labels(p, "a.png;bar-0\n"), "expected `path,label`"),
    ("zero-byte image", lambda p: (p["root"] / "batch1" / "empty.png").write_bytes(b""), "empty.png"),
    ("empty folder", lambda p: [f.unlink() for f in p["root"].rglob("*.png")], "no images"),
])
def test_bad_pool_data_is_one_error_line(tmp_path, capsys, case, change, expect):
    p = make_pool(tmp_path)
    change(p)
    code = main(["run", SMOKE_GRAPH, "--run-dir", str(tmp_path / "run"),
                 *_sets(p, f"evaluation.cache_dir={tmp_path / 'cache'}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], (case, err)
    assert not (tmp_path / "run" / "stage1" / "manifest.json").exists()


def test_too_few_labels_for_labels_per_class_names_the_class(tmp_path, capsys):
    p = make_pool(tmp_path)
    code = main(["run", SMOKE_GRAPH, "--run-dir", str(tmp_path / "run"),
                 *_sets(p, "data.labels_per_class=3", f"evaluation.cache_dir={tmp_path / 'cache'}")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "fewer than labels_per_class=3" in err and "labeled images" in err


def test_unreadable_pool_images_can_be_skipped_and_are_counted(tmp_path, capsys):
    p = make_pool(tmp_path)
    (p["root"] / "batch2" / "broken.png").write_bytes(b"not a png")
    cfg = DataConfig(name="pool", root=str(p["root"]), labels_file=str(p["labels"]), labels_per_class=0,
                     skip_unreadable=True)
    ds = load_pool(cfg, tmp_path / "cache")
    assert len(ds.train_images) == 192 and "skipped 1 unreadable image(s) of 193" in capsys.readouterr().out
    again = load_pool(cfg, tmp_path / "cache")                 # the cached decode gives the same pool
    assert np.array_equal(np.asarray(again.train_images), np.asarray(ds.train_images))

"""The Python API and the commands built on it: predict, sample to files, export (on the smoke recipes)."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dualpseudo
from dualpseudo.artifacts import load_npz, read_json
from dualpseudo.cli import main
from dualpseudo.data.datasets import make_synthetic


def _write_pngs(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = folder / ("sub" if i % 2 else "") / f"img{i:03d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(im[..., 0]).save(p)
        paths.append(p)
    return paths


def test_loaded_classifier_reproduces_the_stage_metrics(graph_run):
    run, _ = graph_run
    ds = make_synthetic(4, 48, 16, size=16, seed=0)
    for stage in (1, 3):
        clf = dualpseudo.load_classifier(run, stage=stage)
        assert clf.kind == "label-propagation" and clf.image_size == 16 and clf.in_channels == 1
        top1 = float((clf.predict(ds.test_images) == ds.test_labels).mean())
        # the stage scored with float64 graph scores, the file keeps float32: at most a near-tie may flip
        assert top1 == pytest.approx(read_json(run / f"stage{stage}/metrics.json")["test"]["top1"], abs=1.01 / 64)


def test_predict_cli_matches_the_api_on_a_folder(graph_run, tmp_path, capsys):
    run, _ = graph_run
    ds = make_synthetic(4, 48, 16, size=16, seed=0)
    paths = _write_pngs(tmp_path / "imgs", ds.test_images[:12])
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run-dir", str(run), str(tmp_path / "imgs"), "--out", str(out), "--top-k", "2"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12 and set(rows[0]) == {"path", "class", "confidence", "top1", "top1_prob", "top2",
                                                "top2_prob"}
    clf = dualpseudo.load_classifier(run)
    by_path = {Path(r["path"]).name: r for r in rows}
    api = clf.predict(paths)                                      # files as given, in this order
    assert [by_path[p.name]["class"] for p in paths] == [clf.class_names[c] for c in api]
    assert np.array_equal(api, clf.predict(ds.test_images[:12]))  # PNG round trip is lossless
    assert all(r["class"] == r["top1"] and 0 < float(r["confidence"]) <= 1 for r in rows)


def test_images_of_another_size_and_mode_are_resized_and_converted(tmp_path):
    rgb = np.zeros((40, 32, 3), np.uint8)
    rgb[:, :, 0] = 255                                            # pure red: luminance 76
    Image.fromarray(rgb).save(tmp_path / "red.png")
    deep = np.full((16, 16), 65535, np.uint16)                     # 16-bit white
    Image.fromarray(deep).save(tmp_path / "deep.png")
    x, files = dualpseudo.load_images([tmp_path / "red.png", tmp_path / "deep.png"], 16, 1)
    assert x.shape == (2, 16, 16, 1) and x.dtype == np.uint8
    assert abs(int(x[0].mean()) - 76) <= 1 and x[1].min() == 255


def test_sample_to_files_is_reproducible_and_checks_its_arguments(graph_run, tmp_path, capsys):
    run, _ = graph_run
    gen = dualpseudo.load_generator(run)
    name = gen.class_names[2]
    for d in ("a", "b"):
        assert main(["sample", "--run-dir", str(run), "--class", name, "--num", "5", "--seed", "7",
                     "--format", "png", "npz", "--out-dir", str(tmp_path / d)]) == 0
    files = sorted((tmp_path / "a").rglob("*.png"))
    pngs = [f for f in files if f.name != "grid.png"]
    assert len(pngs) == 5 and {f.name for f in pngs} == {f"{7 + j:06d}.png" for j in range(5)}
    for f in pngs:
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    npz = load_npz(tmp_path / "a" / "samples.npz", ("images", "labels", "seeds"))
    assert npz["labels"].tolist() == [2] * 5 and npz["seeds"].tolist() == list(range(7, 12))
    assert np.array_equal(npz["images"], gen.sample(name, 5, seed=7))
    assert np.array_equal(np.asarray(Image.open(pngs[0])), npz["images"][0, ..., 0])
    capsys.readouterr()
    for bad in (["--class", "no-such-class"], ["--num", "0"], ["--num", "-3"], ["--format", "gif"]):
        code = main(["sample", "--run-dir", str(run), "--out-dir", str(tmp_path / "c"), *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), bad
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").rglob("*.png"))     # nothing half-written


def test_export_loads_in_a_fresh_process_with_the_same_predictions(graph_run, tmp_path):
    run, _ = graph_run
    out = tmp_path / "export"
    assert main(["export", "--run-dir", str(run), "--out", str(out)]) == 0
    for f in ("config.yaml", "stage3/classifier.safetensors", "encoder/encoder.safetensors",
              "stage2/diffusion.safetensors", "class_names.json", "metrics.json", "MODEL_CARD.md"):
        assert (out / f).is_file(), f
    card = (out / "MODEL_CARD.md").read_text()
    assert "load_classifier" in card and "labeled images: 2 per class" in card
    ds = make_synthetic(4, 48, 16, size=16, seed=0)
    np.save(tmp_path / "x.npy", ds.test_images)
    code = ("import sys, numpy as np, dualpseudo; x = np.load(sys.argv[2]); "
            "print(' '.join(map(str, dualpseudo.load_classifier(sys.argv[1]).predict(x))))")
    fresh = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.npy")], capture_output=True,
                           text=True, check=True, cwd=tmp_path)
    expected = dualpseudo.load_classifier(run).predict(ds.test_images)
    assert fresh.stdout.split() == [str(c) for c in expected]
    assert np.array_equal(dualpseudo.load_generator(out).sample(0, 3), dualpseudo.load_generator(run).sample(0, 3))
    assert main(["export", "--run-dir", str(run), "--out", str(out)]) == 2         # not into a full folder


def test_torchscript_export_of_a_network_classifier(tmp_path):
    import torch

    from dualpseudo.classify.networks import build_network
    from dualpseudo.classify.train import save_classifier
    from dualpseudo.export import _torchscript

    torch.manual_seed(0)
    net = build_network("cnn_small", 4, 1, 16)
    save_classifier(tmp_path / "stage3" / "classifier.safetensors", net,
                    {"network": "cnn_small", "num_classes": 4, "in_channels": 1, "image_size": 16,
                     "class_names": ["a", "b", "c", "d"]})
    clf = dualpseudo.load_classifier(tmp_path)
    _torchscript(tmp_path, 3, clf, tmp_path / "ts.pt")
    x = make_synthetic(4, 8, 4, size=16, seed=1).test_images
    probs = torch.jit.load(str(tmp_path / "ts.pt"))(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(probs, clf.predict_proba(x), atol=1e-5)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dualpseudo {dualpseudo.__version__}"

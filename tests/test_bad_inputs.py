"""Bad input, table-driven: every failure a user can cause by config or data ends in one `error:` line that names
the key or file, exit code 2, before any training (nothing but the lock file is written to the run directory).
Also: an edited labeled-index file re-runs stage 1, and 16-bit, palette and transparent images decode to the
right values."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualpseudo.manifest import stage_status, write_manifest
from dualpseudo.cli import main
from dualpseudo.config import DataConfig, load_config
from dualpseudo.data.datasets import load_dataset
from dualpseudo.data.splits import read_indices
from dualpseudo.rundir import RunDir

from conftest import ROOT, SMOKE

NUM_TRAIN = 4 * 48                                   # smoke.yaml's synthetic training images


def refused(capsys, args: list[str], needle: str, run_dir: Path) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one stderr line, `error: ...` containing `needle`,
    and leave the run directory unwritten (an advisory lock file aside)."""
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err, err
    left = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    assert left in ([], [".lock"]), f"written before the error: {left}"   # (the run's advisory lock aside)
    return err


def run_args(run_dir: Path, *sets: str, config: str = SMOKE, dry_run: bool = True) -> list[str]:
    args = ["run", config, "--run-dir", str(run_dir), "--set", "runtime.threads=1",
            "--set", f"evaluation.cache_dir={run_dir.parent / 'cache'}"]
    for s in sets:
        args += ["--set", s]
    return args + (["--dry-run"] if dry_run else [])


# ---------------------------------------------------------------------------------------------- config values
CONFIG_CASES = [
    # non-finite floats pass no range check
    (["stage2.guidance_scale=.inf"], "stage2.guidance_scale: inf is not a finite number"),
    (["stage1.lr=.inf"], "stage1.lr: inf is not a finite number"),
    (["stage2.duration_kimg=.inf"], "stage2.duration_kimg: inf is not a finite number"),
    (["stage1.p_cutoff=.nan"], "stage1.p_cutoff: nan is not a finite number"),
    (["stage2.lr=-.inf"], "stage2.lr: -inf is not a finite number"),
    (["stage2.lr=inf"], "stage2.lr: inf is not a finite number"),
    (["stage1.lr=1e400"], "stage1.lr: inf is not a finite number"),
    (["stage1.lr=1" + "0" * 400], "stage1.lr: the number is too large"),
    # a section where a value belongs, and the other way round
    (["data=3"], "'data' is a section, not a value"),
    (["stage1=[1, 2]"], "'stage1' is a section, not a value"),
    (["data.name.x=3"], "'data.name' is a value, not a section"),
    (["rounds.x=1"], "'rounds' is a value, not a section"),
    (["stage1.lr=[1, 2]"], "stage1.lr: [1, 2] has the wrong type"),
    (["stage1.learner={a: 1}"], "stage1.learner: {'a': 1} is not one of"),
    # networks and image geometry, checked while planning
    (["stage2.network=unet_huge"], "stage2.network: 'unet_huge' is not one of"),
    (["stage1.network=resnet"], "stage1.network: 'resnet' is not one of"),
    (["data.synthetic_size=8"], "stage1.network: cnn_small needs images of at least 16x16"),
    (["data.synthetic_size=8", "stage1.learner=linear-probe", "linear_probe.encoder=pixels", "stage3.mode=supervised"],
     "stage1.network: cnn_small needs images of at least 16x16"),
    (["data.synthetic_size=8", "stage1.learner=linear-probe", "linear_probe.encoder=pixels",
      "stage3.mode=linear-probe"], "evaluation.oracle_network: cnn_small needs images of at least 16x16"),
    (["latent.autoencoder=train", "latent.levels=3", "data.synthetic_size=20"],
     "latent.levels: the autoencoder downsamples by 8, but the training images are 20x20"),
    (["evaluation.oracle_network=vgg"], "evaluation.oracle_network: 'vgg'"),
]


@pytest.mark.parametrize("sets, needle", CONFIG_CASES, ids=[" ".join(c[0])[:60] for c in CONFIG_CASES])
def test_bad_config_value(tmp_path, capsys, sets, needle):
    refused(capsys, run_args(tmp_path / "run", *sets), needle, tmp_path / "run")


def test_stage1_alone_does_not_check_stage2(tmp_path, capsys):
    """A stage-2 setting is checked only when stage 2 is planned: `stage1` with a bad stage-2 network plans."""
    args = run_args(tmp_path / "run", "stage2.network=unet_huge")
    args[0] = "stage1"
    assert main(args) == 0
    assert "stage1" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- config files
CONFIG_FILES = [
    (b"data: [1, 2\n", "is not valid YAML: expected ',' or ']'"),
    (b"data:\n\tname: synthetic\n", "is not valid YAML: found character '\\t'"),
    ("data:\n  root: caf\u00e9\n".encode("latin-1"), "is not UTF-8 text"),
    (b"- 1\n- 2\n", "must be a mapping of sections"),
    (b"just a word\n", "must be a mapping of sections"),
    (b"data: !!python/object:os.system x\n", "is not valid YAML: could not determine a constructor"),
]


@pytest.mark.parametrize("content, needle", CONFIG_FILES, ids=[str(i) for i in range(len(CONFIG_FILES))])
def test_bad_config_file(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    err = refused(capsys, run_args(tmp_path / "run", config=str(path)), needle, tmp_path / "run")
    assert str(path) in err


def test_empty_section_in_file_takes_overrides(tmp_path):
    """`data:` with nothing under it is an empty section, which --set may fill."""
    path = tmp_path / "c.yaml"
    path.write_text("data:\nstage1:\n")
    assert load_config(path, ["data.name=synthetic"]).data.name == "synthetic"


# ---------------------------------------------------------------------------------------------- labeled-index files
INDEX_FILES = [
    (b"[1.5, 2, 3]", "1.5 is not an integer image index"),
    (b"[1.0, 2, 3]", "1.0 is not an integer image index"),
    (b"[true, 2, 3]", "true is not an integer image index"),
    (b'"123"', "'\"123\"' is not an integer image index"),
    (b'["1", "2"]', '"1" is not an integer image index'),
    (b"[[1, 2]]", "[1, 2] is not an integer image index"),
    (b"1 2 x", "'x' is not an integer image index"),
    (b"1, 2.5", "'2.5' is not an integer image index"),
    (b"[1, 2", "'[1' is not an integer image index"),
    (b'{"labeled_indices": [1, 1.5]}', "1.5 is not an integer image index"),
    (b'{"indices": [1, 2]}', "without a 'labeled_indices' list"),
    (b'{"labeled_indices": 3}', "'labeled_indices' must be a JSON list"),
    (b"[1, 2, 1]", "lists an index more than once"),
    (b"[0, 500]", f"index 500 is outside 0..{NUM_TRAIN - 1}"),
    (b"[-1, 2]", f"index -1 is outside 0..{NUM_TRAIN - 1}"),
    (b"[]", "holds no indices"),
    (b"[0]", "labels no image of class"),
    (b"\xff\xfe1 2", "is not UTF-8 text"),
]


@pytest.mark.parametrize("content, needle", INDEX_FILES, ids=[str(i) for i in range(len(INDEX_FILES))])
def test_bad_labeled_index_file(tmp_path, capsys, content, needle):
    path = tmp_path / "idx.txt"
    path.write_bytes(content)
    err = refused(capsys, run_args(tmp_path / "run", f"data.labeled_indices={path}"), needle, tmp_path / "run")
    assert "data.labeled_indices" in err and str(path) in err


def test_good_index_files_read_the_same(tmp_path):
    """JSON list, split.json and text forms of one split give the same indices."""
    forms = {"a.json": "[5, 1, 9]", "b.json": json.dumps({"labeled_indices": [1, 5, 9]}), "c.txt": "9\n1, 5\n",
             "d.txt": "+1 5 9"}
    for name, text in forms.items():
        (tmp_path / name).write_text(text)
        assert read_indices(tmp_path / name, 10).tolist() == [1, 5, 9], name


def _stage1(cfg, ds, run_dir):
    import torch

    from dualpseudo.stages.pipeline import build_steps
    return next(s for s in build_steps(cfg, RunDir(run_dir), ds, ("stage1",), torch.device("cpu"))
                if s.name == "stage1")


def test_editing_the_index_file_reruns_stage1(tmp_path):
    """The index file's content, not its path, is a stage-1 input: an in-place edit re-runs stage 1 (and so
    everything after it); a rewrite with the same indices in another format does not."""
    from dualpseudo.data.splits import labeled_split
    idx = tmp_path / "idx.json"
    ds = load_dataset(load_config(SMOKE).data)
    first, other = (labeled_split(ds.train_labels, ds.num_classes, 2, seed).tolist() for seed in (0, 1))
    idx.write_text(json.dumps(first))
    cfg = load_config(SMOKE, [f"data.labeled_indices={idx}"])
    step = _stage1(cfg, ds, tmp_path / "run")
    step.dir.mkdir(parents=True)
    (step.dir / "metrics.json").write_text("{}")                       # stands in for the stage's outputs
    write_manifest(step.dir, step.config_hash, step.inputs(), ["metrics.json"], {})
    assert stage_status(step.dir, step.config_hash, step.inputs())[0] is True

    idx.write_text(" ".join(str(i) for i in first))                     # same indices as text: still done
    again = _stage1(cfg, ds, tmp_path / "run")
    assert again.config_hash == step.config_hash
    assert stage_status(again.dir, again.config_hash, again.inputs())[0] is True

    idx.write_text(json.dumps(other))                                   # other indices, same path
    edited = _stage1(cfg, ds, tmp_path / "run")
    assert edited.config_hash == step.config_hash
    done, why = stage_status(edited.dir, edited.config_hash, edited.inputs())
    assert done is False and "inputs" in why
    assert edited.inputs()["labeled_indices"] != step.inputs()["labeled_indices"]


def test_seeded_split_inputs_unchanged():
    """Without an index file stage 1's inputs are what they were (existing run directories stay reusable)."""
    cfg = load_config(SMOKE)
    step = _stage1(cfg, load_dataset(cfg.data), Path("/nonexistent/run"))
    assert set(step.inputs()) == {"dataset"}


# ---------------------------------------------------------------------------------------------- files the config names
def test_named_file_that_is_not_torchscript(tmp_path, capsys):
    fake = tmp_path / "encoder.pt"
    fake.write_bytes(b"not a zip archive")
    refused(capsys, run_args(tmp_path / "run", "stage1.learner=linear-probe", "linear_probe.encoder=torchscript",
                             f"linear_probe.encoder_path={fake}"),
            f"linear_probe.encoder_path: {fake} is not a TorchScript file", tmp_path / "run")


def test_named_torchscript_file_is_hashed_by_content(tmp_path):
    """Replacing the TorchScript encoder in place changes the inputs of the stages that read it."""
    import torch

    from dualpseudo.stages.declare import named_file_inputs

    class Flat(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1) * 1.0

    path = tmp_path / "enc.pt"
    torch.jit.save(torch.jit.script(Flat()), str(path))
    cfg = load_config(SMOKE, ["stage1.learner=linear-probe", "linear_probe.encoder=torchscript",
                              f"linear_probe.encoder_path={path}"])
    before = named_file_inputs(cfg, "stage1")
    assert set(before) == {"encoder_file"} and named_file_inputs(cfg, "stage3") == before
    assert named_file_inputs(cfg, "stage2") == {}
    torch.jit.save(torch.jit.script(torch.nn.Flatten()), str(path))
    os.utime(path, ns=(1, 1))
    assert named_file_inputs(cfg, "stage1") != before


# ---------------------------------------------------------------------------------------------- image folders
def _folder(root: Path, images: dict[str, list[np.ndarray | Image.Image]]) -> Path:
    for cls, ims in images.items():
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(ims):
            (im if isinstance(im, Image.Image) else Image.fromarray(im)).save(root / "train" / cls / f"{i}.png")
    return root


def _grey(n=3, size=16, value=100):
    return [np.full((size, size), value, np.uint8) for _ in range(n)]


def _folder_run(tmp_path, capsys, needle: str) -> str:
    run = tmp_path / "run"
    return refused(capsys, run_args(run, "data.name=folder", f"data.root={tmp_path / 'data'}", "data.labels_per_class=1",
                                    dry_run=False), needle, run)


def test_non_square_images_are_refused_before_training(tmp_path, capsys):
    _folder(tmp_path / "data", {"a": [np.zeros((16, 20), np.uint8)] * 3, "b": [np.zeros((16, 20), np.uint8)] * 3})
    _folder_run(tmp_path, capsys, "images are 20x16 (width x height), but the networks take square images")


def test_tiny_folder_images_are_refused_before_training(tmp_path, capsys):
    _folder(tmp_path / "data", {"a": _grey(size=8), "b": _grey(size=8)})
    _folder_run(tmp_path, capsys, "cnn_small needs images of at least 16x16, got 8")


def test_dangling_link_is_named(tmp_path, capsys):
    root = _folder(tmp_path / "data", {"a": _grey(), "b": _grey()})
    (root / "train" / "a" / "zz.png").symlink_to(tmp_path / "gone.png")
    _folder_run(tmp_path, capsys, f"{root / 'train' / 'a' / 'zz.png'} is a symbolic link to")


def test_link_loop_is_named(tmp_path, capsys):
    root = _folder(tmp_path / "data", {"a": _grey(), "b": _grey()})
    loop = root / "train" / "b" / "loop.png"
    loop.symlink_to(loop)
    _folder_run(tmp_path, capsys, f"cannot follow {loop}")


def test_dangling_class_folder_link_is_named(tmp_path, capsys):
    root = _folder(tmp_path / "data", {"a": _grey(), "b": _grey()})
    (root / "train" / "c").symlink_to(tmp_path / "no-such-folder")
    _folder_run(tmp_path, capsys, f"{root / 'train' / 'c'} is a symbolic link to")


@pytest.mark.parametrize("pixels, needle", [(64 * 64, "too large to decode safely"),     # over 2x: Pillow's error
                                            (40 * 40, "too large to decode safely")])   # over 1x: its warning
def test_decompression_bomb_is_named(tmp_path, capsys, monkeypatch, pixels, needle):
    side = int(pixels ** 0.5)
    root = _folder(tmp_path / "data", {"a": _grey(), "b": _grey()})
    Image.fromarray(np.zeros((side, side), np.uint8)).save(root / "train" / "b" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    err = _folder_run(tmp_path, capsys, needle)
    assert "bomb.png" in err


def test_float_and_corrupt_images_are_named(tmp_path, capsys):
    root = _folder(tmp_path / "data", {"a": _grey(), "b": _grey()})
    Image.fromarray(np.zeros((16, 16), np.float32)).save(root / "train" / "b" / "f.tiff")
    _folder_run(tmp_path, capsys, "has floating-point pixels")
    (root / "train" / "b" / "f.tiff").unlink()
    good = (root / "train" / "b" / "0.png").read_bytes()
    (root / "train" / "b" / "0.png").write_bytes(good[: len(good) // 2])
    _folder_run(tmp_path, capsys, f"cannot read image {root / 'train' / 'b' / '0.png'}")


def _load(root: Path):
    return load_dataset(DataConfig(name="folder", root=str(root)))


def test_16_bit_grey_png_is_scaled(tmp_path):
    """16-bit grey PNGs are scaled from 0..65535 to 0..255 (not clipped at 255)."""
    values = np.array([[0, 257, 32768, 65535]] * 4, np.uint16)
    im = Image.fromarray(values)                                         # mode I;16
    assert im.mode == "I;16"
    _folder(tmp_path, {"a": [im], "b": []})
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "train" / "b" / "0.tiff")     # mode I (32-bit)
    ds = _load(tmp_path)
    assert ds.train_images.shape == (2, 4, 4, 1)
    for i in range(2):
        assert ds.train_images[i, 0, :, 0].tolist() == [0, 1, 128, 255]


def test_palette_and_transparent_images(tmp_path):
    """Palette images take their palette's colours; alpha is composited onto black."""
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (200, 40, 10)
    rgb[2:] = (0, 90, 250)
    pal = Image.fromarray(rgb).quantize(colors=4)                        # mode P
    rgba = np.concatenate([rgb, np.full((4, 4, 1), 128, np.uint8)], axis=2)
    rgba[0, 0, 3] = 0
    _folder(tmp_path / "colour", {"a": [pal], "b": [Image.fromarray(rgba)]})
    ds = _load(tmp_path / "colour")
    x = {ds.class_names[c]: ds.train_images[i] for i, c in enumerate(ds.train_labels)}
    assert x["a"].shape == (4, 4, 3) and np.array_equal(x["a"], rgb)
    assert x["b"][0, 0].tolist() == [0, 0, 0]                            # fully transparent: black
    assert x["b"][3, 3].tolist() == [0, 45, 125]                         # half: (v * 128 + 127) // 255

    la = np.stack([np.full((4, 4), 200, np.uint8), np.full((4, 4), 255, np.uint8)], axis=2)
    la[1, 1, 1] = 0
    _folder(tmp_path / "grey", {"a": [Image.fromarray(la)], "b": _grey(1, 4)})
    ds = _load(tmp_path / "grey")
    a = ds.train_images[list(ds.train_labels).index(0)]
    assert a.shape == (4, 4, 1) and a[0, 0, 0] == 200 and a[1, 1, 0] == 0


# ---------------------------------------------------------------------------------------------- other commands
@pytest.mark.parametrize("flag, value, needle", [("--per-class", "-3", "--per-class/--num: -3"),
                                                 ("--per-class", "0", "--per-class/--num: 0"),
                                                 ("--steps", "0", "--steps: 0"),
                                                 ("--guidance-scale", "inf", "--guidance-scale: inf"),
                                                 ("--guidance-scale", "-1", "--guidance-scale: -1"),
                                                 ("--round", "0", "--round: 0")])
def test_sample_arguments(tmp_path, capsys, flag, value, needle):
    refused(capsys, ["sample", "--run-dir", str(tmp_path / "run"), flag, value], needle, tmp_path / "run")


def test_one_error_line_from_the_command(tmp_path):
    """The installed command prints one `error:` line, no traceback, and exits 2."""
    p = subprocess.run([sys.executable, "-m", "dualpseudo", "run", SMOKE, "--run-dir", str(tmp_path / "run"),
                        "--set", "stage2.guidance_scale=.inf", "--dry-run"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == "error: stage2.guidance_scale: inf is not a finite number"

"""Faults: a training state or artifact that fails to load is reported, deleted and rebuilt, never used."""
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dualpseudo.artifacts import load_npz, load_torch, read_json
from dualpseudo.cli import main

from conftest import SMOKE, Evil


def stage2(run: Path) -> int:
    return main(["stage2", SMOKE, "--run-dir", str(run), "--set", "runtime.threads=1"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished stages-1-2 smoke run directory (copy it before changing it)."""
    run = tmp_path_factory.mktemp("faults") / "run"
    assert stage2(run) == 0
    return run


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_stage2_state_is_rebuilt(run, finished, capsys):
    """Killed mid-training with a half-written state.pt (no snapshot, no manifest): rebuilt from scratch."""
    s2 = run / "stage2"
    for f in ("manifest.json", "diffusion.safetensors", "pseudo_images.npz"):
        (s2 / f).unlink()
    shutil.rmtree(s2 / "chunks")
    _truncate(s2 / "state.pt")
    assert stage2(run) == 0
    err = capsys.readouterr().err
    assert "[stage2] warning:" in err and "state.pt" in err and "rebuilding" in err
    assert load_torch(s2 / "state.pt")["nimg"] == 1024
    np.testing.assert_array_equal(load_npz(s2 / "pseudo_images.npz")["images"],
                                  load_npz(finished / "stage2/pseudo_images.npz")["images"])


@pytest.mark.parametrize("content", ["pickle", "other_config"])
def test_foreign_stage1_state_is_refused_and_rebuilt(run, finished, content, capsys):
    """A state.pt with code in its pickle, or from another config, is never used: deleted, stage 1 retrains."""
    s1 = run / "stage1"
    (s1 / "manifest.json").unlink()
    if content == "pickle":
        (s1 / "state.pt").write_bytes(pickle.dumps(Evil()))
    else:
        torch.save({"resume_key": {"stage1": "another config"}, "step": 40}, s1 / "state.pt")
    assert stage2(run) == 0
    captured = capsys.readouterr()
    assert "pwned" not in captured.out
    assert "[stage1] warning:" in captured.err and "state.pt" in captured.err
    assert load_torch(s1 / "state.pt")["step"] == 40
    np.testing.assert_array_equal(load_npz(s1 / "pseudo_labels.npz")["label"],
                                  load_npz(finished / "stage1/pseudo_labels.npz")["label"])


def test_truncated_pseudo_labels_rerun_stage1(run, finished, capsys):
    """A finished stage whose output no longer matches its manifest runs again (resuming its final state)."""
    _truncate(run / "stage1/pseudo_labels.npz")
    assert stage2(run) == 0
    out = capsys.readouterr().out
    assert "[stage1] running (pseudo_labels.npz changed since it was written)" in out
    a, b = load_npz(run / "stage1/pseudo_labels.npz"), load_npz(finished / "stage1/pseudo_labels.npz")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert read_json(run / "stage2/manifest.json")["inputs"]["pseudo_labels"] != "missing"


def test_truncated_snapshot_and_chunk_are_rebuilt(run, finished, capsys):
    """A half-written diffusion snapshot is reported and rebuilt; a damaged sample chunk is regenerated."""
    s2 = run / "stage2"
    (s2 / "manifest.json").unlink()
    _truncate(s2 / "diffusion.safetensors")
    _truncate(s2 / "chunks" / "chunk_0001.npz")
    assert stage2(run) == 0
    assert "diffusion.safetensors" in capsys.readouterr().err
    np.testing.assert_array_equal(load_npz(s2 / "pseudo_images.npz")["images"],
                                  load_npz(finished / "stage2/pseudo_images.npz")["images"])

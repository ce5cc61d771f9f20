"""Data parallel: the smoke pipeline under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo).

Sampling is sharded by chunk and reassembled by rank 0, so pseudo-images from 2 processes equal those from 1
process for the same diffusion model and seeds; training runs end to end and rank 0 writes every artifact once.
"""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dualpseudo.artifacts import load_npz, load_torch, read_json
from dualpseudo.distributed import LOCAL, World

from conftest import ROOT, SMOKE

ACCELERATE = Path(sys.executable).parent / "accelerate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _launch(nproc: int, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`dualpseudo ARGS` in `nproc` processes (accelerate launch, or torchrun when accelerate's CLI is absent)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "dualpseudo"]
    elif ACCELERATE.is_file():
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "dualpseudo"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "dualpseudo"]
    done = subprocess.run(cmd + list(args) + ["--set", "runtime.threads=1"], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_single_process_world_is_a_no_op():
    assert LOCAL.size == 1 and LOCAL.is_main and not LOCAL.distributed
    assert LOCAL.broadcast({"a": 1}) == {"a": 1} and LOCAL.gather(3) == [3] and LOCAL.all_true(True)
    assert LOCAL.per_rank(32, "x") == 32
    with pytest.raises(ValueError, match="stage2.batch_size=30 is not divisible by the 4 processes"):
        World(rank=0, size=4).per_rank(30, "stage2.batch_size")


def test_two_processes_sample_the_same_images_as_one(tmp_path):
    """Stages 1-2 in one process; then the same trained model samples again with 2 processes: equal images."""
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(1, "stage2", SMOKE, "--run-dir", str(one))
    shutil.copytree(one, two)
    s2 = two / "stage2"
    shutil.rmtree(s2 / "chunks")
    for f in ("pseudo_images.npz", "manifest.json", "grid.png"):
        (s2 / f).unlink()
    snapshot = (s2 / "diffusion.safetensors").stat().st_mtime_ns
    out = _launch(2, "stage2", SMOKE, "--run-dir", str(two)).stdout
    assert "[stage1] reused" in out and out.count("[stage2] running") == 1
    assert (s2 / "diffusion.safetensors").stat().st_mtime_ns == snapshot, "the trained model must be reused"
    assert len(list((s2 / "chunks").glob("chunk_*.npz"))) == 2          # 32 images in chunks of 16, one per rank
    a, b = load_npz(one / "stage2/pseudo_images.npz"), load_npz(s2 / "pseudo_images.npz")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_two_process_pipeline_writes_every_artifact_once(tmp_path):
    run = tmp_path / "run"
    args = ("run", SMOKE, "--run-dir", str(run), "--set", f"evaluation.cache_dir={tmp_path / 'cache'}")
    out = _launch(2, *args).stdout
    for stage in ("stage1", "stage2", "stage3", "evaluation"):
        assert out.count(f"[{stage}] running") == 1 and out.count(f"[{stage}] done") == 1, out
    assert out.count("report:") == 1
    for f in ["config.yaml", "env.json", "report.html", "report.md",
              "stage1/split.json", "stage1/classifier.safetensors", "stage1/pseudo_labels.npz",
              "stage1/metrics.json", "stage1/state.pt", "stage1/manifest.json",
              "stage2/diffusion.safetensors", "stage2/state.pt", "stage2/pseudo_images.npz", "stage2/grid.png",
              "stage2/manifest.json", "stage3/classifier.safetensors", "stage3/metrics.json",
              "stage3/manifest.json", "evaluation/metrics.json"]:
        assert (run / f).is_file(), f
    assert not [p for p in run.rglob("*.tmp")], "no half-written temp files are left"
    assert read_json(run / "env.json")["device"] == "cpu x 2 processes"
    s1, s2 = load_torch(run / "stage1/state.pt"), load_torch(run / "stage2/state.pt")
    assert s1["step"] == 40 and len(s1["rng"]["augment_ranks"]) == 2      # both ranks' augmentation streams
    assert s2["nimg"] == 1024 and len(s2["noise_gen_states"]) == 2        # the global batch counts images once
    gen = load_npz(run / "stage2/pseudo_images.npz", ("images", "labels"))
    assert gen["images"].shape == (32, 16, 16, 1) and np.bincount(gen["labels"]).tolist() == [8] * 4
    assert read_json(run / "stage1/metrics.json")["test"]["top1"] > 0.5
    again = _launch(2, *args).stdout
    assert again.count("reused") == 4 and "running" not in again

"""Helpers shared by the tests: the repository's paths and smoke configs, a malicious pickle, tiny IDX datasets
written into a test's own folder (so no test needs the Debian `dataset-fashion-mnist` package, which only CI
installs), the label-propagation smoke run, and torch's thread count put back after every test.

HOME points at a fresh folder for the whole session, so a test that forgets `evaluation.cache_dir` can neither
read nor write the user's own `~/.cache/dualpseudo` (encoders, FID statistics, the oracle)."""
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import numpy as np


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def make_idx_dataset(root: Path, n=40, test=10, gz=True, classes=10):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, m in (("train", n), ("t10k", test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (m, 28, 28)), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(m) % classes, gz)
    return root


_HOME = {}


def pytest_configure(config):
    _HOME["real"], _HOME["test"] = os.environ.get("HOME"), tempfile.mkdtemp(prefix="dualpseudo-tests-home-")
    os.environ["HOME"] = _HOME["test"]


def pytest_unconfigure(config):
    if _HOME.get("test"):
        shutil.rmtree(_HOME["test"], ignore_errors=True)
        if _HOME["real"] is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = _HOME["real"]


@pytest.fixture(autouse=True)
def _torch_threads_put_back():
    """A run inside a test may set `runtime.threads` (the smoke configs use 1): put torch's thread count back
    after every test, so the tests after it do not silently run on one thread."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


ROOT = Path(__file__).resolve().parents[1]                            # the repository root
SMOKE = str(ROOT / "configs" / "smoke.yaml")                          # FreeMatch + pixel diffusion, seconds on CPU
SMOKE_GRAPH = str(ROOT / "configs" / "smoke_label_propagation.yaml")


class Evil:
    """Pickled, it calls print("pwned") when unpickled: what a checkpoint or batch file must never run.

    `pickle.dumps(Evil())`, or an `Evil()` inside any pickled object, is the malicious file; a loader that
    refuses it never prints "pwned"."""

    def __reduce__(self):
        return (print, ("pwned",))


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    """The label-propagation smoke recipe run end to end once per test module (through the Python API):
    (run directory, its parent, which also holds the run's cache)."""
    import dualpseudo

    base = tmp_path_factory.mktemp("graph")
    run = base / "run"
    assert dualpseudo.run(SMOKE_GRAPH, run, [f"evaluation.cache_dir={base / 'cache'}"]) == 0
    return run, base


def stage1_beside(base, name: str, *settings: str):
    """Stage 1 of the smoke recipe with `settings`, in `base / name`, sharing the graph run's cache: that folder."""
    from dualpseudo.cli import main
    other = base / name
    sets = [x for kv in settings for x in ("--set", kv)]
    assert main(["stage1", SMOKE_GRAPH, "--run-dir", str(other), *sets,
                 "--set", f"evaluation.cache_dir={base / 'cache'}"]) == 0
    return other

"""Behaviour pin: fingerprints of what the two smoke recipes write, compared with constants computed from the code
before the "one home per concept" refactor (commit 113d1f7).

For configs/smoke.yaml (FreeMatch + pixel diffusion + FreeMatch, fp32) and configs/smoke_label_propagation.yaml
(SimCLR encoder + label propagation + pixel diffusion + label propagation) this pins:
- the set of files the run writes, per folder (stage1/, stage2/, stage3/, evaluation/, encoder/, figures/, top);
- each step's config hash, and the names of its recorded inputs and outputs (manifest.json);
- the dataset fingerprint and the labeled split (sha256 of the indices);
- sha256 of pseudo_labels.npz's label / is_labeled / confidence arrays (stages 1 and 3) and of
  pseudo_images.npz's images / labels / seeds arrays;
- test top-1, pseudo-label accuracy and mean confidence of stages 1 and 3, stage 3's delta, and the evaluation's
  class consistency, domain distance and precision/recall (floats rounded to 6 significant digits).

Both runs use one CPU thread (`runtime.threads=1`; the label-propagation recipe sets it itself), so the numbers do
not depend on the machine's core count. They do depend on the float kernels torch dispatches to, which follow the
CPU's vector capability (`torch.backends.cpu.get_cpu_capability()`): the classifiers' confidences (and so their
hashes and means) and the domain distance's last digit differ between AVX-512 and AVX2 machines, while the files,
hashes of configs, split, labels, pseudo-images and every other metric agree. Those kernel-dependent values are
pinned per capability (`BY_CAPABILITY`), each set computed from the unchanged code on a machine of that kind. On a
capability with no pinned set they are compared with a relative tolerance of 3e-3 (AVX-512 and AVX2 differ by up
to 8e-4; the confidence hashes are left out); pin that machine's set from unchanged code rather than loosening the
tolerance.

A refactor must leave every constant as it is. A deliberate behaviour change must update the constants in the
same commit, and say there why they changed. (The step config hashes changed once, with run-directory schema 2:
they leave out SCHEDULE fields; every other constant is 113d1f7's. The evaluation's hash joined the pin when
`evaluation.cache_dir` stopped entering it as set: it is the hash a run with the default cache always had.)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from dualpseudo.cli import main

from conftest import SMOKE

STEP_DIRS = ("encoder", "stage1", "stage2", "stage3", "evaluation")


def array_sha256(a: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (C order)."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _npz(path: Path, keys: tuple[str, ...]) -> dict[str, str]:
    with np.load(path, allow_pickle=False) as z:
        return {k: array_sha256(z[k]) for k in keys}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")


def fingerprint(run: Path) -> dict:
    """What the pin compares: plain data read straight from the run directory's files (no package code)."""
    files: dict[str, list[str]] = {}
    for p in sorted(run.rglob("*")):
        if p.is_file():
            rel = p.relative_to(run)
            files.setdefault(rel.parts[0] if len(rel.parts) > 1 else ".", []).append(str(rel))
    out: dict = {"files": files}
    for d in STEP_DIRS:
        if (run / d / "manifest.json").is_file():
            m = _json(run / d / "manifest.json")
            out[f"{d}/manifest"] = {"inputs": sorted(m["inputs"]), "outputs": sorted(m["outputs"]),
                                    "config_hash": m["config_hash"]}   # evaluation's: the default cache_dir's
    split = _json(run / "stage1/split.json")
    out["split"] = {"dataset_fingerprint": split["dataset_fingerprint"], "num_labeled": split["num_labeled"],
                    "labeled_indices": array_sha256(np.asarray(split["labeled_indices"], dtype=np.int64))}
    for s in ("stage1", "stage3"):
        out[f"{s}/pseudo_labels.npz"] = _npz(run / s / "pseudo_labels.npz", ("label", "is_labeled", "confidence"))
        m = _json(run / s / "metrics.json")
        out[f"{s}/metrics"] = {"test_top1": _round(m["test"]["top1"]),
                               "pseudo_label_accuracy": _round(m["pseudo_labels"]["accuracy"]),
                               "mean_confidence": _round(m["pseudo_labels"]["mean_confidence"]),
                               **({"delta_top1": _round(m["delta_top1"])} if s == "stage3" else {})}
    out["stage2/pseudo_images.npz"] = _npz(run / "stage2/pseudo_images.npz", ("images", "labels", "seeds"))
    ev = _json(run / "evaluation/metrics.json")
    out["evaluation/metrics"] = {"class_consistency": _round(ev["class_consistency"]["accuracy"]),
                                 "domain_fd": _round(ev["domain_fd"]),
                                 "precision": _round(ev["precision_recall"]["precision"]),
                                 "recall": _round(ev["precision_recall"]["recall"])}
    return out


def _close(a, b, rel: float = 3e-3) -> bool:
    """Equal, with floats (at any depth of dicts) within `rel` of each other."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)
    return a == b


def _assert_same(got: dict, expected: dict, approximate: tuple[str, ...] = ()) -> None:
    """`got` equals `expected`; the keys in `approximate` only within `_close` (and without confidence hashes)."""
    def same(k, v):
        if k not in approximate:
            return got.get(k) == v
        now = {f: x for f, x in (got.get(k) or {}).items() if f != "confidence"}
        return _close(now, {f: x for f, x in v.items() if f != "confidence"})
    changed = {k: {"now": got.get(k), "pinned": v} for k, v in expected.items() if not same(k, v)}
    extra = sorted(set(got) - set(expected))
    assert not changed and not extra, (
        "the smoke run's behaviour changed (a refactor must not change it; a deliberate change updates the "
        f"constants in tests/test_behaviour_pin.py): {json.dumps(changed, indent=1)}; not pinned: {extra}")


# ------------------------------------------------------------------------------------------------ constants
# Computed with commit 113d1f7's code and configs (a pristine `git worktree`, PYTHONPATH at its src/), twice, with
# the same result. Shared by the two recipes: the synthetic dataset and its split, and stage 2 (both stage-1
# learners label every training image correctly, so the diffusion model trains on the same labels).
SPLIT = {"dataset_fingerprint": "9f9c0fb78f80e10e", "num_labeled": 8,
         "labeled_indices": "2cd4ff7b6f38e848f0e6836c64c358799f895f6b41aa1bbf42a596a1c5485d58"}
LABEL = "d288ceffc46d96d303b2dde4dc16b7a08b08b5c469ab08f4a6e3b1df08b2db91"
IS_LABELED = "c271f4cc20238a073bcf788af90d37cf5d24353d6cc9c4333c06ab5e4fa8b894"
PSEUDO_IMAGES = {"images": "60675e1a03dfee5e1899c20fbdc8587af997f09018541955abd260ffe1a538e7",
                 "labels": "1d368072e0fad4b2f01ee693dfbda347511efb91a1bf7b6deb164f518eaa26e1",
                 "seeds": "9d96bab1f1b20ca21e53ab3eb36c3f8256d180da90c1f50b5e2c9bd40fd90ede"}
STAGE2_MANIFEST = {"config_hash": "5830232b249f5e4e", "inputs": ["pseudo_labels"],
                   "outputs": ["diffusion.safetensors", "grid.png", "pseudo_images.npz"]}
EVALUATION = {"class_consistency": 0.71875, "domain_fd": 19.0437, "precision": 0.09375, "recall": 0.40625}
TRAINED = ["classifier.safetensors", "manifest.json", "metrics.json", "pseudo_labels.npz"]
TRAINING_STATE = ["state.pt", "state.pt.sha256", "state_key.json", "stats.jsonl"]


def _in(folder: str, names: list[str]) -> list[str]:
    return sorted(f"{folder}/{n}" for n in names)


FILES_COMMON = {
    ".": [".lock", "config.yaml", "env.json", "report.html", "report.md"],
    "stage2": _in("stage2", ["chunks/chunk_0000.npz", "chunks/chunk_0001.npz", "diffusion.safetensors", "grid.png",
                             "manifest.json", "pseudo_images.npz", "sample_key.json", *TRAINING_STATE]),
    "evaluation": _in("evaluation", ["manifest.json", "metrics.json"]),
}

EXPECTED_SMOKE = {
    "files": {
        **FILES_COMMON,
        "stage1": _in("stage1", [*TRAINED, "split.json", *TRAINING_STATE]),
        "stage3": _in("stage3", [*TRAINED, *TRAINING_STATE]),
        "figures": _in("figures", ["cm_class_consistency_round1.png", "cm_pseudo_labels.png", "cm_stage1_test.png",
                                   "cm_stage3_test_round1.png", "curves_stage1_round1.png",
                                   "curves_stage2_round1.png", "curves_stage3_round1.png", "grid_round1.png",
                                   "pseudo_label_pr.png", "real_beside_generated.png"]),
    },
    "stage1/manifest": {"config_hash": "6cfcfe2d6e321242", "inputs": ["dataset"],
                        "outputs": ["classifier.safetensors", "metrics.json", "pseudo_labels.npz", "split.json"]},
    "stage2/manifest": STAGE2_MANIFEST,
    "stage3/manifest": {"config_hash": "56a984eb626e12e8", "inputs": ["pseudo_images", "split"],
                        "outputs": ["classifier.safetensors", "metrics.json", "pseudo_labels.npz"]},
    "evaluation/manifest": {"inputs": ["pseudo_images"], "outputs": ["metrics.json"],
                            "config_hash": "c4aa6c24386e1ce6"},
    "split": SPLIT,
    "stage1/pseudo_labels.npz": {
        "label": LABEL, "is_labeled": IS_LABELED,
        "confidence": "2d3b88ad7a3ed1615f0fb262d08feb6faf5757104f3074fad9d19e07c5969099"},
    "stage1/metrics": {"test_top1": 1.0, "pseudo_label_accuracy": 1.0, "mean_confidence": 0.997229},
    "stage2/pseudo_images.npz": PSEUDO_IMAGES,
    "stage3/pseudo_labels.npz": {
        "label": LABEL, "is_labeled": IS_LABELED,
        "confidence": "5a6ee2770791b56a2cb5607142329059f37b420005a50e4133c256088c95b398"},
    "stage3/metrics": {"test_top1": 1.0, "pseudo_label_accuracy": 1.0, "mean_confidence": 0.997354,
                       "delta_top1": 0.0},
    "evaluation/metrics": EVALUATION,
}

EXPECTED_GRAPH = {
    "files": {
        **FILES_COMMON,
        "encoder": _in("encoder", ["encoder.safetensors", "manifest.json", "stats.jsonl"]),
        "stage1": _in("stage1", [*TRAINED, "split.json", "state_key.json", "features/test/shard_00000.npz",
                                 *(f"features/train/shard_0000{i}.npz" for i in range(3))]),
        "stage3": _in("stage3", [*TRAINED, "state_key.json", "features/pseudo/shard_00000.npz"]),
        "figures": _in("figures", ["cm_class_consistency_round1.png", "cm_pseudo_labels.png", "cm_stage1_test.png",
                                   "cm_stage3_test_round1.png", "curves_encoder_round1.png",
                                   "curves_stage2_round1.png", "grid_round1.png", "pseudo_label_pr.png",
                                   "real_beside_generated.png"]),
    },
    "encoder/manifest": {"config_hash": "d8ae9dba62cd13a0", "inputs": ["dataset"],
                         "outputs": ["encoder.safetensors"]},
    "stage1/manifest": {"config_hash": "14484c0e40b80af9", "inputs": ["dataset", "encoder"],
                        "outputs": ["classifier.safetensors", "metrics.json", "pseudo_labels.npz", "split.json"]},
    "stage2/manifest": STAGE2_MANIFEST,
    "stage3/manifest": {"config_hash": "080492205b9ff07b", "inputs": ["encoder", "pseudo_images", "split"],
                        "outputs": ["classifier.safetensors", "metrics.json", "pseudo_labels.npz"]},
    "evaluation/manifest": {"inputs": ["pseudo_images"], "outputs": ["metrics.json"],
                            "config_hash": "c4aa6c24386e1ce6"},
    "split": SPLIT,
    "stage1/pseudo_labels.npz": {
        "label": LABEL, "is_labeled": IS_LABELED,
        "confidence": "ba80aba783e30a37d61f9ab8eb16a16e0f3ec7331f58edec33344b326dcbc94d"},
    "stage1/metrics": {"test_top1": 1.0, "pseudo_label_accuracy": 1.0, "mean_confidence": 0.694785},
    "stage2/pseudo_images.npz": PSEUDO_IMAGES,
    "stage3/pseudo_labels.npz": {
        "label": LABEL, "is_labeled": IS_LABELED,
        "confidence": "bbfffd62159529de917fb49b01e1d25f5a5672cbe41a897dd68c156c5c741d35"},
    "stage3/metrics": {"test_top1": 1.0, "pseudo_label_accuracy": 1.0, "mean_confidence": 0.771997,
                       "delta_top1": 0.0},
    "evaluation/metrics": EVALUATION,
}


@pytest.fixture(scope="module")
def smoke_one_thread(tmp_path_factory) -> Path:
    """configs/smoke.yaml run end to end on one CPU thread (about 10 s); the test process's thread count is put
    back afterwards."""
    import torch

    threads = torch.get_num_threads()
    base = tmp_path_factory.mktemp("pin")
    run = base / "run"
    try:
        assert main(["run", SMOKE, "--run-dir", str(run), "--set", f"evaluation.cache_dir={base / 'cache'}",
                     "--set", "runtime.threads=1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


# The values that follow the float kernels (module docstring), per CPU capability. EXPECTED_SMOKE / EXPECTED_GRAPH
# above hold the AVX512 set (113d1f7's); the AVX2 set was computed from the unchanged code on a 2-core AMD EPYC with
# AVX2 only (torch 2.13.0), where every other constant above came out the same.
KERNEL_DEPENDENT = ("stage1/pseudo_labels.npz", "stage1/metrics", "stage3/pseudo_labels.npz", "stage3/metrics",
                    "evaluation/metrics")
BY_CAPABILITY = {
    "smoke": {"AVX2": {
        "stage1/pseudo_labels.npz": {
            "label": LABEL, "is_labeled": IS_LABELED,
            "confidence": "d51792ca54da0b2afcf1352f4218b47dbe81c9a912e7cb3bd9a51ace2c7c717b"},
        "stage1/metrics": {"test_top1": 1.0, "pseudo_label_accuracy": 1.0, "mean_confidence": 0.997363},
        "stage3/pseudo_labels.npz": {
            "label": LABEL, "is_labeled": IS_LABELED,
            "confidence": "5e80ce44322174823c66c4f1b4c40f45fdb7190498d145e8af70f0813105ae0b"},
        "stage3/metrics": {"test_top1": 1.0, "pseudo_label_accuracy": 1.0, "mean_confidence": 0.997465,
                           "delta_top1": 0.0},
        "evaluation/metrics": {**EVALUATION, "domain_fd": 19.0436}}},
    "graph": {"AVX2": {
        "stage1/pseudo_labels.npz": {
            "label": LABEL, "is_labeled": IS_LABELED,
            "confidence": "7bc1bf6ddeaab5928c2db9a1929b054c6996adfd7207d717baf40a11785502e1"},
        "stage1/metrics": {"test_top1": 1.0, "pseudo_label_accuracy": 1.0, "mean_confidence": 0.695332},
        "stage3/pseudo_labels.npz": {
            "label": LABEL, "is_labeled": IS_LABELED,
            "confidence": "40bb0722fdbd1f6ba740bca8fcf237bfdc96d155c40ce432c41b3efe670a8cbd"},
        "stage3/metrics": {"test_top1": 1.0, "pseudo_label_accuracy": 1.0, "mean_confidence": 0.771481,
                           "delta_top1": 0.0},
        "evaluation/metrics": {**EVALUATION, "domain_fd": 19.0436}}},
}


def _check(got: dict, recipe: str, expected: dict) -> None:
    """Exact where this CPU capability has a pinned set; the kernel-dependent values within 3e-3 elsewhere."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        _assert_same(got, expected)
    elif capability in BY_CAPABILITY[recipe]:
        _assert_same(got, {**expected, **BY_CAPABILITY[recipe][capability]})
    else:
        _assert_same(got, expected, approximate=KERNEL_DEPENDENT)


def test_freematch_smoke_run_is_unchanged(smoke_one_thread):
    _check(fingerprint(smoke_one_thread), "smoke", EXPECTED_SMOKE)


def test_label_propagation_smoke_run_is_unchanged(graph_run):
    _check(fingerprint(graph_run[0]), "graph", EXPECTED_GRAPH)


def test_the_tolerant_comparison_still_catches_changes():
    """Where no set is pinned, a change beyond 3e-3, or in any exactly pinned key, still fails."""
    base = {"stage1/metrics": {"mean_confidence": 0.9973, "test_top1": 1.0}, "split": SPLIT}
    _assert_same({"stage1/metrics": {"mean_confidence": 0.99735, "test_top1": 1.0}, "split": SPLIT}, base,
                 approximate=("stage1/metrics",))
    for got in ({"stage1/metrics": {"mean_confidence": 0.9, "test_top1": 1.0}, "split": SPLIT},
                {"stage1/metrics": {"mean_confidence": 0.9973, "test_top1": 0.99}, "split": SPLIT},
                {"stage1/metrics": base["stage1/metrics"], "split": {**SPLIT, "num_labeled": 9}}):
        with pytest.raises(AssertionError, match="behaviour changed"):
            _assert_same(got, base, approximate=("stage1/metrics",))


# The step config hashes run-directory schema 1 wrote for the two smoke runs (before SCHEDULE fields left them).
SCHEMA_1 = {"smoke": {"stage1": "e46535e5a1e5161c", "stage2": "9b28ee96b31e7975", "stage3": "aae7e2b69c914f5f"},
            "graph": {"encoder": "7cad9fd83fb4106f", "stage1": "12b754e6ddd33db3", "stage2": "9b28ee96b31e7975",
                      "stage3": "a7f3cebd839493f7"}}


def test_schema_1_hashes_are_reproduced_so_old_run_directories_carry_over():
    from dualpseudo.config import load_config
    from dualpseudo.data.datasets import load_dataset
    from dualpseudo.stages.declare import STAGE1, STAGE2, STAGE3
    from dualpseudo.stages.encoder import encoder_key
    from conftest import SMOKE_GRAPH
    for name, cfg in (("smoke", load_config(SMOKE, ["runtime.threads=1"])), ("graph", load_config(SMOKE_GRAPH))):
        got = {"stage1": STAGE1.legacy_hash(cfg), "stage2": STAGE2.legacy_hash(cfg), "stage3": STAGE3.legacy_hash(cfg)}
        if name == "graph":
            got["encoder"] = encoder_key(cfg, load_dataset(cfg.data), legacy=True)
            assert got["encoder"] != encoder_key(cfg, load_dataset(cfg.data))
        assert got == SCHEMA_1[name]

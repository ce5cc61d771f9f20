"""Run integrity, table-driven: one run per directory, verified training states, divergence, damaged run-directory
files, a full disk and a read-only directory. Each case changes a copy of a finished tiny run (or starts an empty
one), runs one command and states its answer: the exit code, the `error:` line (or the output line), the
artifact that was rebuilt; and in every case nothing that is wrong is marked done."""
from __future__ import annotations

import errno
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from dualpseudo.artifacts import file_hash, load_npz, read_json
from dualpseudo.manifest import read_manifest
from dualpseudo.cli import main

from conftest import SMOKE

# configs/smoke.yaml cut to a few optimisation steps per stage: the cases test bookkeeping, not learning
TINY = ["runtime.threads=1", "stage1.iterations=8", "stage1.checkpoint_every=4", "stage1.log_every=2",
        "stage2.duration_kimg=0.128", "stage2.checkpoint_every_kimg=0.064", "stage2.log_every_kimg=0.032",
        "stage2.warmup_kimg=0.032", "stage2.ema_halflife_kimg=0.032", "stage2.images_per_class=4",
        "stage2.steps=2", "stage2.sample_chunk=8", "stage2.sample_batch_size=8", "stage3.iterations=8",
        "evaluation.oracle_iterations=8"]
STAGES = ("stage1", "stage2", "stage3", "evaluation")


def argv(command: str, run: Path, cache: Path, sets: tuple[str, ...] = ()) -> list[str]:
    if command in ("eval", "report"):
        return [command, "--run-dir", str(run), *[a for kv in sets for a in ("--set", kv)]]
    kv = TINY + [f"evaluation.cache_dir={cache}", *sets]
    return [command, SMOKE, "--run-dir", str(run), *[a for s in kv for a in ("--set", s)]]


def verified(run: Path) -> dict[str, dict]:
    """Stage folder -> recorded output hashes, for every stage whose manifest's outputs still match."""
    out = {}
    for m in run.rglob("manifest.json"):
        man = read_manifest(m.parent)
        if man and isinstance(man.get("outputs"), dict) and all(
                (m.parent / n).is_file() and file_hash(m.parent / n) == h for n, h in man["outputs"].items()):
            out[str(m.parent.relative_to(run))] = man["outputs"]
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run of every stage (copied by each case before it is changed)."""
    base = tmp_path_factory.mktemp("integrity")
    assert main(argv("run", base / "run", base / "cache")) == 0
    assert set(verified(base / "run")) == set(STAGES)
    return base / "run", base / "cache"


# ------------------------------------------------------------------------------------------- what cases do
def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def hold_lock(run: Path, ctx: dict, kill: bool = False) -> None:
    """Another process holds the run directory's lock (killed at once with `kill`: a stale lock)."""
    code = ("import sys; from dualpseudo.rundir import lock; lock(sys.argv[1]); print('held', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    ctx["pid"] = proc.pid
    ctx["cleanup"].append(lambda: (proc.kill(), proc.wait()))
    if kill:
        proc.kill()
        proc.wait()
    else:                              # a file the holder is writing: the refused command must not delete it
        (run / "stage2" / ".pseudo_images.npz.x1y2.tmp").write_bytes(b"being written")


def unlink(*names: str) -> Callable[[Path, dict], None]:
    def setup(run: Path, ctx: dict) -> None:
        for n in names:
            p = run / n
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return setup


def both(*setups: Callable[[Path, dict], None]) -> Callable[[Path, dict], None]:
    def setup(run: Path, ctx: dict) -> None:
        for s in setups:
            s(run, ctx)
    return setup


def write(name: str, text: str) -> Callable[[Path, dict], None]:
    return lambda run, ctx: (run / name).write_text(text)


def malformed_outputs(run: Path, ctx: dict) -> None:
    m = read_json(run / "stage2" / "manifest.json")
    m["outputs"] = list(m["outputs"])
    (run / "stage2" / "manifest.json").write_text(json.dumps(m))


def append_garbage_stats(run: Path, ctx: dict) -> None:
    (run / "stage1" / "manifest.json").unlink()
    with open(run / "stage1" / "stats.jsonl", "a") as f:
        f.write('}{ "step": \n')


def torch_write_fails(run: Path, ctx: dict) -> None:
    """torch.save fails as on a full disk (torch's inline_container.cc text, no errno), nothing free."""
    import collections

    import torch

    def boom(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4480 vs 4372")
    usage = collections.namedtuple("usage", "total used free")
    ctx["monkeypatch"].setattr(torch, "save", boom)
    ctx["monkeypatch"].setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0))


def savez_enospc(run: Path, ctx: dict) -> None:
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    ctx["monkeypatch"].setattr(np, "savez", full)


def read_only(run: Path, ctx: dict) -> None:
    """Every new file under the run directory fails as on a read-only mount (EROFS)."""
    import tempfile
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and Path(dir).resolve().is_relative_to(run.resolve()):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*a, dir=dir, **k)
    ctx["monkeypatch"].setattr(tempfile, "mkstemp", mkstemp)


def old_schema(run: Path, ctx: dict, version: int = 1) -> None:
    """Every manifest says another run-directory schema wrote it, keeping hashes that schema never gave."""
    for m in run.rglob("manifest.json"):
        man = read_json(m)
        man["schema_version"] = version
        m.write_text(json.dumps(man))


def schema_1(run: Path, ctx: dict) -> None:
    """The run directory as the previous version left it: schema 1, each stage under the hash schema 1 gave it
    (SCHEDULE fields included); the stage files' times are kept to show that none is written again."""
    from dualpseudo.config import load_config
    from dualpseudo.stages.declare import EVALUATION, STAGE1, STAGE2, STAGE3
    cfg = load_config(SMOKE, TINY + [f"evaluation.cache_dir={ctx['cache']}"])
    for name, decl in zip(STAGES, (STAGE1, STAGE2, STAGE3, EVALUATION)):
        man = read_json(run / name / "manifest.json")
        man.update(schema_version=1, config_hash=decl.legacy_hash(cfg))
        (run / name / "manifest.json").write_text(json.dumps(man))
    from dualpseudo.stages.declare import stage2_model_key      # stage 2's model and chunks, schema 1's keys
    model_key = {**read_json(run / "stage2" / "state_key.json"), **stage2_model_key(cfg, schema1=True)}
    (run / "stage2" / "state_key.json").write_text(json.dumps(model_key))
    sample_key = {**read_json(run / "stage2" / "sample_key.json"), "model": model_key}
    (run / "stage2" / "sample_key.json").write_text(json.dumps(sample_key))
    ctx["times"] = {p: p.stat().st_mtime_ns for s in STAGES for p in (run / s).rglob("*")
                    if p.is_file() and p.name != "manifest.json"}


def stage1_hash_unknown(run: Path, ctx: dict) -> None:
    """Stage 1's manifest holds a hash that neither schema gives this config (it was made with another one)."""
    man = read_json(run / "stage1" / "manifest.json")
    man["config_hash"] = "0123456789abcdef"
    (run / "stage1" / "manifest.json").write_text(json.dumps(man))


def nothing_rewritten(run: Path, finished: Path, ctx: dict) -> None:
    assert ctx["times"] == {p: p.stat().st_mtime_ns for p in ctx["times"]}


def model_kept(run: Path, finished: Path, ctx: dict) -> None:
    """Stage 2's trained model was not trained again (only its images were sampled again), and it is now kept under
    this schema's key."""
    from dualpseudo.config import load_config
    from dualpseudo.stages.declare import stage2_model_key
    for name in ("diffusion.safetensors", "stats.jsonl"):
        p = run / "stage2" / name
        assert p.stat().st_mtime_ns == ctx["times"][p], name
    cfg = load_config(SMOKE, TINY + [f"evaluation.cache_dir={ctx['cache']}"])
    assert read_json(run / "stage2" / "state_key.json")["stage2_train"] == stage2_model_key(cfg)["stage2_train"]


def manifests_converted(run: Path, finished: Path, ctx: dict) -> None:
    assert {read_json(m)["schema_version"] for m in run.rglob("manifest.json")} == {2}


# ------------------------------------------------------------------------------------------- checks after
def same_arrays(name: str, *keys: str) -> Callable[[Path, Path, dict], None]:
    def check(run: Path, finished: Path, ctx: dict) -> None:
        a, b = load_npz(run / name), load_npz(finished / name)
        for k in keys:
            np.testing.assert_array_equal(a[k], b[k])
    return check


def no_temp_files(run: Path, finished: Path, ctx: dict) -> None:
    assert not [p for p in run.rglob("*.tmp")], "a failed write left a temp file"


def holder_file_kept(run: Path, finished: Path, ctx: dict) -> None:
    assert (run / "stage2" / ".pseudo_images.npz.x1y2.tmp").read_bytes() == b"being written"


def stats_rebuilt(run: Path, finished: Path, ctx: dict) -> None:
    assert (run / "stage1/stats.jsonl").read_text() == (finished / "stage1/stats.jsonl").read_text()


def resumes_after_space_is_freed(run: Path, finished: Path, ctx: dict) -> None:
    ctx["monkeypatch"].undo()
    assert main(argv("stage1", run, ctx["cache"])) == 0
    assert "stage1" in verified(run)


@dataclass
class Case:
    id: str
    command: str
    setup: Callable[[Path, dict], None]
    code: int
    expect: str                          # regex: the error line (code 2), else a line of stdout/stderr
    sets: tuple[str, ...] = ()
    check: Callable[[Path, Path, dict], None] | None = None
    not_done: tuple[str, ...] = ()       # stage folders that must not be marked done afterwards
    fresh: bool = False                  # an empty run directory instead of a copy of the finished run
    rebuilt: tuple[str, ...] = field(default=())   # stages allowed to be (re)marked done by the command
    force: bool = False                  # the command gets --force


LOCKED = r"^error: run directory .* is in use by another dualpseudo process \(PID {pid}\); wait for it"
CASES = [
    # one run per directory
    *[Case(f"locked-{cmd}", cmd, lambda run, ctx: hold_lock(run, ctx), 2, LOCKED, check=holder_file_kept)
      for cmd in ("run", "stage1", "stage2", "stage3", "eval")],
    Case("stale-lock-after-crash", "run", lambda run, ctx: hold_lock(run, ctx, kill=True), 0,
         r"\[evaluation\] reused"),
    # integrity of training state: a flipped bit is refused, the state discarded and the stage retrained
    Case("bitflip-stage1-state", "stage1", both(unlink("stage1/manifest.json"),
                                                lambda run, ctx: flip_bit(run / "stage1/state.pt")), 0,
         r"\[stage1\] warning: .*state\.pt does not match the sha256 recorded in state\.pt\.sha256.*rebuilding",
         check=same_arrays("stage1/pseudo_labels.npz", "label", "confidence"), rebuilt=("stage1",)),
    Case("bitflip-stage2-state", "stage2",
         both(unlink("stage2/manifest.json", "stage2/diffusion.safetensors", "stage2/pseudo_images.npz",
                     "stage2/chunks"), lambda run, ctx: flip_bit(run / "stage2/state.pt")), 0,
         r"\[stage2\] warning: .*state\.pt does not match the sha256 recorded",
         check=same_arrays("stage2/pseudo_images.npz", "images", "labels"), rebuilt=("stage2",)),
    # divergence never becomes an artifact
    Case("diverged-stage1", "stage1", lambda run, ctx: None, 2,
         r"^error: stage1: .*(non-finite|collapsed).* Lower stage1\.lr", fresh=True,
         sets=("stage1.lr=1e6", "stage1.iterations=6"), not_done=("stage1",),
         check=lambda run, fin, ctx: not (run / "stage1/pseudo_labels.npz").exists() or pytest.fail("written")),
    # damaged run-directory files
    Case("manifest-not-json", "run", write("stage1/manifest.json", '{"schema_version": 1, "outp'), 0,
         r"\[stage1\] running \(manifest\.json is unreadable\)",
         check=same_arrays("stage1/pseudo_labels.npz", "label", "confidence"), rebuilt=("stage1",)),
    Case("manifest-wrong-types", "run", malformed_outputs, 0, r"\[stage2\] running \(manifest\.json is malformed\)",
         check=same_arrays("stage2/pseudo_images.npz", "images"), rebuilt=("stage2",)),
    *[Case(f"config-yaml-not-yaml-{cmd}", cmd, write("config.yaml", "data: [unclosed\n"), 2,
           r"^error: .*config\.yaml is (not valid YAML|damaged).*restore it, or delete it") for cmd in
      ("run", "eval", "report")],
    Case("config-yaml-a-list", "stage1", write("config.yaml", "- data\n- stage1\n"), 2,
         r"^error: .*config\.yaml is a YAML list, not a config; restore it"),
    Case("stats-jsonl-garbage", "stage1", append_garbage_stats, 0, r"stats\.jsonl: dropped 1 unreadable line",
         check=stats_rebuilt, rebuilt=("stage1",)),
    # a full disk and a read-only directory
    Case("disk-full-torch-text", "stage1", torch_write_fails, 2,
         r"^error: no space left to write .*stage1/state\.pt \(No space left on device", fresh=True,
         not_done=("stage1",), check=no_temp_files),
    Case("disk-full-enospc", "stage1", savez_enospc, 2,
         r"^error: no space left to write .*stage1/pseudo_labels\.npz .*rerun the same command", fresh=True,
         not_done=("stage1",), check=lambda run, fin, ctx: (no_temp_files(run, fin, ctx),
                                                            resumes_after_space_is_freed(run, fin, ctx))),
    *[Case(f"read-only-finished-{cmd}", cmd, read_only, 0, expect) for cmd, expect in
      (("report", r"report\.html"), ("eval", r"\[evaluation\] \{"), ("run", r"\[stage3\] reused"))],
    Case("read-only-needs-a-write", "run", read_only, 2,
         r"^error: cannot use .*config\.yaml.* \(Read-only file system\)", sets=("stage3.iterations=9",),
         force=True),
    # a run directory of schema 1 is converted: the stages it finished are recognised, none re-runs
    *[Case(f"schema-1-{cmd}", cmd, schema_1, 0,
           rf"^run directory converted from run-directory schema 1 to 2 \(.*\); finished stages recognised: {got}$",
           check=nothing_rewritten)
      for cmd, got in (("run", "stage1, stage2, stage3, evaluation"), ("stage3", "(.*, )?stage3"),
                       ("eval", "(.*, )?evaluation"))],
    # ... a schema-1 stage under a hash schema 1 did not give this config re-runs, saying why
    Case("schema-1-unrecognised", "run", both(old_schema, stage1_hash_unknown), 0,
         r"recognised: none$\n\[stage1\] running \(its config changed\)", rebuilt=STAGES, check=manifests_converted),
    # a run directory of a newer schema: one error line saying what to do
    *[Case(f"newer-schema-{cmd}", cmd, lambda run, ctx: old_schema(run, ctx, 3), 2,
           r"^error: run directory .* was made by a newer dualpseudo \(run-directory schema 3; this version reads "
           r"2\), so its finished stages cannot be recognised; use a new --run-dir, or rerun "
           r"`dualpseudo run CONFIG --run-dir .* --force`")
      for cmd in ("run", "stage3", "eval")],
    Case("newer-schema-forced", "run", lambda run, ctx: old_schema(run, ctx, 3), 0,
         r"\[stage1\] running \(schema version 3 != 2\)",
         force=True, rebuilt=STAGES, check=same_arrays("stage2/pseudo_images.npz", "images", "labels")),
    # ... --force on a schema-1 directory converts it first: only the stages the changed keys affect re-run
    Case("schema-1-forced", "run", schema_1, 0,
         r"recognised: stage1, stage2, evaluation$(.|\n)*^\[stage2\] reused(.|\n)*^\[stage3\] running \(its config "
         r"changed\)", sets=("stage3.iterations=9",), force=True, rebuilt=("stage3",)),
    # ... and a sampler change there samples again with the model schema 1 trained, without training it again
    Case("schema-1-resampled", "run", schema_1, 0, r"recognised: stage1, stage3, evaluation$(.|\n)*^\[stage2\] "
         r"running \(its config changed\)", sets=("stage2.steps=3",), force=True,
         rebuilt=("stage2", "stage3", "evaluation"), check=model_kept),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, finished, tmp_path, capsys, monkeypatch):
    done_run, cache = finished
    run = tmp_path / "run"
    if not case.fresh:
        shutil.copytree(done_run, run)
    before = verified(run)
    ctx = {"monkeypatch": monkeypatch, "cleanup": [], "cache": cache}
    try:
        case.setup(run, ctx)
        args = argv(case.command, run, cache, case.sets)
        if case.force:
            args.append("--force")
        code = main(args)
        out, err = capsys.readouterr()
        expect = case.expect.replace("{pid}", str(ctx.get("pid")))
        assert code == case.code, out[-2000:] + err[-2000:]
        assert "Traceback" not in err
        if case.code == 2:
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
            assert re.search(expect, errors[0]), errors[0]
        else:
            assert re.search(expect, out + err, re.M), out[-2000:] + err[-2000:]
        after = verified(run)
        for stage in case.not_done:
            assert stage not in after, f"{stage} is marked done"
        for stage, outputs in after.items():          # nothing new is marked done unless it was rebuilt
            assert before.get(stage) == outputs or stage in case.rebuilt, stage
        if case.check:
            case.check(run, done_run, ctx)
    finally:
        for c in ctx["cleanup"]:
            c()


def test_a_schedule_change_reruns_nothing(finished, tmp_path, capsys):
    """Checkpoint and log intervals and inference batch sizes (SCHEDULE fields) enter no stage key: changed on a
    finished run, every stage is reused and no file of a stage is written again."""
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    files = [p for s in STAGES for p in (run / s).rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    sets = ("stage1.checkpoint_every=2", "stage1.log_every=1", "stage1.predict_batch_size=7",
            "stage2.checkpoint_every_kimg=0.032", "stage2.log_every_kimg=0.016")
    assert main(argv("run", run, finished[1], sets) + ["--force"]) == 0
    out = capsys.readouterr().out
    assert all(f"[{s}] reused" in out for s in STAGES) and "running" not in out, out
    assert before == {p: p.stat().st_mtime_ns for p in files}


def test_a_moved_cache_reruns_nothing(finished, tmp_path, capsys):
    """`evaluation.cache_dir` says where the shared caches live, not what a stage computes: a finished run pointed
    at a new, empty cache folder reuses every stage and writes no file of a stage again."""
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    files = [p for s in STAGES for p in (run / s).rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    assert main(argv("run", run, tmp_path / "moved-cache") + ["--force"]) == 0
    out = capsys.readouterr().out
    assert all(f"[{s}] reused" in out for s in STAGES) and "running" not in out, out
    assert before == {p: p.stat().st_mtime_ns for p in files}


def test_sigterm_says_interrupted(tmp_path):
    """SIGTERM during training ends like Ctrl-C: a line saying so, exit 143, no traceback, nothing marked done."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dualpseudo", *argv("stage1", run, tmp_path / "cache", ("stage1.iterations=100000",))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "[stage1] running" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted (SIGTERM); rerun the same command to resume" in err and "Traceback" not in err
    assert "stage1" not in verified(run) and not list(run.rglob("*.tmp"))


def test_a_bug_keeps_its_traceback(finished, monkeypatch):
    """Only failures a user can cause become error lines; an error of ours propagates with its traceback."""
    from dualpseudo import commands

    def bug(run_root):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(commands, "write_report", bug)
    with pytest.raises(ZeroDivisionError):
        main(["report", "--run-dir", str(finished[0])])


def test_lock_is_released_after_each_command(finished, tmp_path):
    """The lock lives as long as the command: a second command of the same process (and another process after
    it) takes it again."""
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    assert main(["eval", "--run-dir", str(run)]) == 0
    code = "import sys; from dualpseudo.rundir import lock; print(lock(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True", done.stderr

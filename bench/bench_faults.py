"""Fault injection: `kill -9` the pipeline at random moments of each stage, rerun the same command, repeat.

For every stage, N times: start `dualpseudo run`, wait until the stage is running, sleep a random time, kill the
whole process group with SIGKILL, and check that every stage finished before the kill still verifies (its
manifest's output hashes match) and that no temp file is read as an artifact. The next launch of the same command
is the resume. A final launch runs to completion; every artifact is then loaded (npz, safetensors, state.pt,
JSON) and a last launch must reuse every stage. Prints "K kills, K resumes, 0 lost".

Two more cases, each in a run directory of its own:
- concurrent runs: while a launch trains stage 1, the same command, and the same command with another config and
  `--force`, must each end at once with one `error:` line naming the first launch's PID (exit code 2), and the
  first launch's files must be intact; after it is killed (`kill -9`) its lock is gone and a rerun resumes.
- full disk: the run directory on a small tmpfs (where this user may mount one; otherwise skipped, with the reason
  printed): the launch must end in one `error:` line about the disk with every finished stage intact; after the
  tmpfs grows, rerunning finishes; remounted read-only, `report`, `eval` and the same `run` must still succeed.

    .venv/bin/python bench/bench_faults.py --kills-per-stage 2
    .venv/bin/python bench/bench_faults.py --kills-per-stage 2 --nproc 2      # under accelerate launch, gloo
    .venv/bin/python bench/bench_faults.py --kills-per-stage 0                # only the two cases above
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("stage1", "stage2", "stage3", "evaluation")
# Long enough that a kill lands inside training; checkpoints often enough that resuming keeps work.
LONGER = ["stage1.iterations=500", "stage1.checkpoint_every=25", "stage2.duration_kimg=8",
          "stage2.checkpoint_every_kimg=0.5", "stage2.images_per_class=64", "stage2.steps=18",
          "stage3.iterations=500", "evaluation.oracle_iterations=500", "runtime.threads=1"]


def command(run: Path, cache: Path, nproc: int, port: int) -> list[str]:
    sets = [a for kv in LONGER + [f"evaluation.cache_dir={cache}"] for a in ("--set", kv)]
    args = ["run", str(ROOT / "configs/smoke.yaml"), "--run-dir", str(run), *sets]
    if nproc == 1:
        return [sys.executable, "-m", "dualpseudo", *args]
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), "-m", "dualpseudo", *args]


def finished_stages(run: Path) -> dict[str, dict]:
    """Stage folder -> manifest, for every stage whose manifest's output hashes still match the files."""
    from dualpseudo.artifacts import file_hash
    from dualpseudo.manifest import read_manifest

    out = {}
    for d in sorted(p for p in run.rglob("manifest.json")):
        m = read_manifest(d.parent)
        if m is not None and all((d.parent / n).is_file() and file_hash(d.parent / n) == h
                                 for n, h in m["outputs"].items()):
            out[str(d.parent.relative_to(run))] = m
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (the launcher's workers may sit in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant at once, like a node dying."""
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_during(cmd: list[str], stage: str, max_delay: float, rng: random.Random) -> tuple[bool, str]:
    """Launch; once `[stage] running` is printed, SIGKILL the process tree after a random delay.

    Returns (killed, output); killed is False when the stage finished first (the launch is then stopped at once,
    so later stages stay unfinished for their own kills) or the run ended before reaching the stage.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if f"[{stage}] running" in line:
                started.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not started.is_set() and proc.poll() is None:
        time.sleep(0.05)
    killed = False
    if started.is_set():
        deadline = time.time() + rng.uniform(0, max_delay)
        while time.time() < deadline and proc.poll() is None and not any(f"[{stage}] done" in l for l in lines):
            time.sleep(0.01)
        if proc.poll() is None:
            killed = not any(f"[{stage}] done" in l for l in lines)
            kill_tree(proc.pid)
    proc.wait()
    reader.join(timeout=5)
    return killed, "".join(lines)


def _launch(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


def _run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_error(done: subprocess.CompletedProcess, must_contain: str) -> str | None:
    """None when `done` ended with exit code 2 and exactly one `error:` line containing `must_contain`."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    if done.returncode == 2 and len(errors) == 1 and must_contain in errors[0] and "Traceback" not in done.stderr:
        return None
    return f"exit {done.returncode}: {(done.stderr or done.stdout)[-600:]}"


def concurrent_runs(base: Path, cache: Path, nproc: int, rng: random.Random) -> tuple[int, list[str]]:
    """(refused launches, problems): a second launch on a run directory in use is refused, with the holder's PID."""
    run, problems, refused = base / "concurrent", [], 0
    cmd = command(run, cache, nproc, 29500 + rng.randrange(1000))
    first = _launch(cmd)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in first.stdout:
            lines.append(line)
            if "[stage1] running" in line:
                started.set()
    threading.Thread(target=read, daemon=True).start()
    while not started.is_set() and first.poll() is None:
        time.sleep(0.05)
    if not started.is_set():
        return 0, ["concurrent: the first launch never reached stage 1: " + "".join(lines)[-600:]]
    time.sleep(rng.uniform(0, 1))
    (run / "stage1" / ".holder.probe.tmp").write_bytes(b"being written")   # what a start-up clean-up would delete
    for extra in ([], ["--set", "stage2.guidance_scale=2", "--force"]):
        done = _run(command(run, cache, nproc, 29500 + rng.randrange(1000)) + extra, timeout=300)
        pids = process_tree(first.pid)
        problem = _one_error(done, "is in use by another dualpseudo process (PID ")
        if problem is None and not any(f"PID {p})" in done.stderr for p in pids):
            problem = f"the error names no PID of the running launch {pids}: {done.stderr.strip()}"
        if problem:
            problems.append(f"concurrent launch {' '.join(extra) or '(same command)'}: {problem}")
        refused += problem is None
    if not (run / "stage1" / ".holder.probe.tmp").is_file():
        problems.append("concurrent: a refused launch deleted a temp file of the running one")
    alive = first.poll() is None
    kill_tree(first.pid)
    first.wait()
    if not alive:
        problems.append("concurrent: the first launch ended while the others were refused: " + "".join(lines)[-600:])
    again = _launch(cmd)                                   # its lock died with it: a rerun resumes at once
    out = ""
    deadline = time.time() + 300
    while time.time() < deadline and again.poll() is None:
        line = again.stdout.readline()
        out += line
        if "[stage1] running" in line or "[stage1] done" in line:
            break
    kill_tree(again.pid)
    again.wait()
    if "[stage1]" not in out or "in use" in out:
        problems.append("concurrent: no rerun after the holder was killed: " + out[-600:])
    return refused, problems


def full_disk(base: Path, cache: Path, nproc: int, rng: random.Random, size_mb: int) -> tuple[str, list[str]]:
    """(summary, problems): a run directory on a small tmpfs fills up, grows, then is read-only."""
    mnt = base / "tmpfs"
    mnt.mkdir(exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)],
                                 capture_output=True, text=True)
    except OSError as e:
        return f"full disk: skipped (cannot run mount: {e})", []
    if mounted.returncode != 0:
        return f"full disk: skipped (mounting a tmpfs is not allowed here: {mounted.stderr.strip()})", []
    run, problems = mnt / "run", []
    cmd = command(run, cache, nproc, 29500 + rng.randrange(1000))
    try:
        full = _run(cmd)
        before = finished_stages(run)
        problem = _one_error(full, "no space left")
        if problem:
            problems.append(f"full disk ({size_mb} MiB): {problem}")
        bad = verify_artifacts(run)
        problems += [f"full disk: {b}" for b in bad]
        subprocess.run(["mount", "-o", "remount,size=2g", str(mnt)], check=True)
        done = _run(cmd)
        if done.returncode != 0:
            problems.append(f"full disk: the rerun after freeing space failed: {done.stderr[-600:]}")
        after = finished_stages(run)
        problems += [f"full disk: {s} lost" for s in before if s not in after]
        problems += [f"full disk: {s} not finished by the rerun" for s in STAGES if s not in after]
        problems += [f"full disk, rerun: {b}" for b in verify_artifacts(run)]
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        py = [sys.executable, "-m", "dualpseudo"]
        for name, ro in (("report", py + ["report", "--run-dir", str(run)]),
                         ("eval", py + ["eval", "--run-dir", str(run)]), ("run", cmd)):
            r = _run(ro)
            if r.returncode != 0:
                problems.append(f"read-only: `{name}` of the finished run failed: {(r.stderr or r.stdout)[-600:]}")
        summary = (f"full disk: {size_mb} MiB filled during {sorted(set(STAGES) - set(before)) or 'nothing'}, "
                   f"stopped with one error line, finished after growing; read-only report/eval/run ok")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    return summary, problems


def verify_artifacts(run: Path) -> list[str]:
    """Load every artifact of the run directory; the list of failures."""
    from dualpseudo.artifacts import load_npz, load_torch, read_json
    from dualpseudo.classify.train import load_classifier
    from dualpseudo.diffuse.train import load_diffusion

    bad = []
    for p in sorted(run.rglob("*")):
        try:
            if p.name.endswith(".tmp"):
                bad.append(f"{p}: leftover temp file")
            elif p.suffix == ".npz":
                load_npz(p)
            elif p.suffix == ".pt":
                load_torch(p)
            elif p.suffix == ".json":
                read_json(p)
            elif p.name == "diffusion.safetensors":
                load_diffusion(p)
            elif p.suffix == ".safetensors":
                load_classifier(p)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            bad.append(f"{p}: {e}")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills-per-stage", type=int, default=2)
    ap.add_argument("--max-delay", type=float, default=2.0, help="longest wait (s) after a stage starts")
    ap.add_argument("--nproc", type=int, default=1, help="processes per launch (accelerate launch when > 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default=None, help="default: a fresh temporary folder")
    ap.add_argument("--disk-mb", type=int, default=None,
                    help="size of the tmpfs that fills up (MiB; default 60%% of the finished run directory)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base = Path(args.run_dir or tempfile.mkdtemp(prefix="bench_faults_"))
    run, cache = base / "run", base / "cache"
    t0 = time.time()
    kills = resumes = lost = 0
    pending_resume = False
    refused, problems = concurrent_runs(base, cache, args.nproc, rng)
    for p in problems:
        print("LOST", p)
    lost += len(problems)
    print(f"concurrent runs: {refused} of 2 refused with the holder's PID", flush=True)
    for stage in STAGES:
        landed = 0
        for i in range(3 * args.kills_per_stage):
            if landed == args.kills_per_stage or stage in finished_stages(run):
                break
            before = finished_stages(run)
            cmd = command(run, cache, args.nproc, 29500 + rng.randrange(1000))
            killed, out = kill_during(cmd, stage, args.max_delay, rng)
            if pending_resume and "Traceback" not in out:
                resumes += 1                      # this launch picked the run up after the previous kill
            pending_resume = killed
            after = finished_stages(run)
            gone = [s for s in before if s not in after or after[s]["outputs"] != before[s]["outputs"]]
            lost += len(gone)
            kills, landed = kills + killed, landed + killed
            print(f"{stage} try {i + 1}: {'killed' if killed else 'finished first'}; finished stages "
                  f"{sorted(after)}{'; LOST ' + str(gone) if gone else ''}", flush=True)
            if "Traceback" in out:
                print(out[-3000:])
                return 1
    final = subprocess.run(command(run, cache, args.nproc, 29500 + rng.randrange(1000)), capture_output=True,
                           text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if final.returncode != 0:
        print(final.stdout[-3000:] + final.stderr[-3000:])
        return 1
    resumes += pending_resume
    bad = verify_artifacts(run)
    again = subprocess.run(command(run, cache, args.nproc, 29500 + rng.randrange(1000)), capture_output=True,
                           text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    not_reused = [s for s in STAGES if f"[{s}] reused" not in again.stdout]
    lost += len(bad) + len(not_reused)
    for b in bad + [f"{s} not reused by a final rerun" for s in not_reused]:
        print("LOST", b)
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    disk, disk_problems = full_disk(base, cache, args.nproc, rng, args.disk_mb or max(1, int(0.6 * size) >> 20))
    for p in disk_problems:
        print("LOST", p)
    lost += len(disk_problems)
    print(disk, flush=True)
    print(f"{kills} kills, {resumes} resumes, {lost} lost  ({args.nproc} process(es), {time.time() - t0:.0f} s, "
          f"run directory {run})")
    return 0 if lost == 0 and resumes == kills else 1


if __name__ == "__main__":
    sys.exit(main())

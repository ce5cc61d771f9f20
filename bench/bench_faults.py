"""Fault injection: `kill -9` the pipeline at random moments of each stage, rerun the same command, repeat.

For every stage, N times: start `dualpseudo run`, wait until the stage is running, sleep a random time, kill the
whole process group with SIGKILL, and check that every stage finished before the kill still verifies (its
manifest's output hashes match) and that no temp file is read as an artifact. The next launch of the same command
is the resume. A final launch runs to completion; every artifact is then loaded (npz, safetensors, state.pt,
JSON) and a last launch must reuse every stage. Prints "K kills, K resumes, 0 lost".

    .venv/bin/python bench/bench_faults.py --kills-per-stage 2
    .venv/bin/python bench/bench_faults.py --kills-per-stage 2 --nproc 2      # under accelerate launch, gloo
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
    from dualpseudo.artifacts import file_hash, read_manifest

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
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base = Path(args.run_dir or tempfile.mkdtemp(prefix="bench_faults_"))
    run, cache = base / "run", base / "cache"
    t0 = time.time()
    kills = resumes = lost = 0
    pending_resume = False
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
    print(f"{kills} kills, {resumes} resumes, {lost} lost  ({args.nproc} process(es), {time.time() - t0:.0f} s, "
          f"run directory {run})")
    return 0 if lost == 0 and resumes == kills else 1


if __name__ == "__main__":
    sys.exit(main())

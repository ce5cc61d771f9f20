"""Accuracy benchmarks on Fashion-MNIST: runs the CLI, then tabulates the run directories' metrics.

    python bench/bench_quality.py stage1 --learners fixmatch freematch supervised --seeds 0 1 2 --labels 4
    python bench/bench_quality.py stage1 --learners fixmatch freematch --seeds 0 --labels 4 \
        --set stage1.iterations=8000 --tag long
    python bench/bench_quality.py e2e --labels-list 1 2 4 10 --seeds 0

Each (setting, seed) is its own run directory under --root; finished runs are reused, interrupted ones resume,
so the command can be stopped and restarted. Stage 1 of the config's own learner runs in the end-to-end run
directory (`e2e-l{labels}-s{seed}`), so the two tables share it instead of training it twice. `seed` sets both
the labeled split and the training seed. Reported models are the final EMA models; the test split is used for
the reported number only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CONFIG = "configs/fashion_mnist.yaml"


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{100 * xs[0]:.2f}"
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"


def config_learner(config: str) -> str:
    """The stage-1 learner `config` selects (the loader fills in defaults)."""
    from dualpseudo.config import load_config

    return load_config(config).stage1.learner


def stage1(args) -> None:
    rows = []
    own = config_learner(args.config)
    for learner in args.learners:
        accs, pls, times = [], [], []
        for seed in args.seeds:
            name = f"e2e-l{args.labels}-s{seed}" if learner == own and not args.set else \
                f"stage1-{learner}-l{args.labels}-s{seed}{args.tag}"
            d = Path(args.root) / name
            run([sys.executable, "-m", "dualpseudo", "stage1", args.config, "--run-dir", str(d),
                 "--set", f"stage1.learner={learner}", "--set", f"data.labels_per_class={args.labels}",
                 "--set", f"data.split_seed={seed}", "--set", f"runtime.seed={seed}", *args.set])
            m = read(d / "stage1" / "metrics.json")
            accs.append(m["test"]["top1"])
            pls.append(m["pseudo_labels"]["accuracy"])
            times.append(read(d / "stage1" / "manifest.json").get("wall_time_s"))
        rows.append((learner, mean_std(accs), " / ".join(f"{100 * a:.2f}" for a in accs), mean_std(pls),
                     f"{statistics.median(t for t in times if t) / 60:.1f}", len(accs)))
    print("\n| learner | test top-1 (%) | per seed | pseudo-label acc. (%) | median wall time (min) | seeds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


def e2e(args) -> None:
    print_rows = []
    for labels in args.labels_list:
        for seed in args.seeds:
            d = Path(args.root) / f"e2e-l{labels}-s{seed}{args.tag}"
            run([sys.executable, "-m", "dualpseudo", "run", args.config, "--run-dir", str(d),
                 "--set", f"data.labels_per_class={labels}", "--set", f"data.split_seed={seed}",
                 "--set", f"runtime.seed={seed}", *args.set])
            s1, s3 = read(d / "stage1" / "metrics.json"), read(d / "stage3" / "metrics.json")
            ev = read(d / "evaluation" / "metrics.json")
            wall = sum(read(d / s / "manifest.json").get("wall_time_s", 0) for s in
                       ("stage1", "stage2", "stage3", "evaluation"))
            fid = ev.get("fid", {})
            print_rows.append((labels, seed, f"{100 * s1['test']['top1']:.2f}", f"{100 * s3['test']['top1']:.2f}",
                               f"{100 * s3['delta_top1']:+.2f}", f"{100 * s1['pseudo_labels']['accuracy']:.2f}",
                               f"{fid['fid']:.2f} ({fid['num_samples']}/{fid['num_reference']})" if fid else "—",
                               f"{100 * ev['class_consistency']['accuracy']:.1f}" if ev.get("class_consistency") else "—",
                               f"{wall / 60:.0f}"))
    print("\n| labels/class | seed | stage-1 top-1 | stage-3 top-1 | change | pseudo-label acc. | FID (gen/ref) "
          "| class consistency | wall time (min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in print_rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["stage1", "e2e"])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--root", default="runs/bench")
    p.add_argument("--labels", type=int, default=4, help="labels per class (stage1)")
    p.add_argument("--labels-list", type=int, nargs="+", default=[4], dest="labels_list", help="labels per class (e2e)")
    p.add_argument("--learners", nargs="+", default=["fixmatch", "freematch", "supervised"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[], help="passed to the CLI as --set")
    p.add_argument("--tag", default="", help="suffix of the run directories; required with --set")
    args = p.parse_args()
    if args.set and not args.tag:
        p.error("--set changes the runs: give them their own directories with --tag NAME")
    args.tag = f"-{args.tag}" if args.tag else ""
    args.set = [x for kv in args.set for x in ("--set", kv)]
    (stage1 if args.what == "stage1" else e2e)(args)


if __name__ == "__main__":
    main()

"""Accuracy benchmarks on Fashion-MNIST: runs the CLI, then tabulates the run directories' metrics.

    python bench/bench_quality.py stage1 --learners fixmatch freematch supervised --seeds 0 1 2 --labels 4
    python bench/bench_quality.py stage1 --learners fixmatch freematch --seeds 0 --labels 4 \
        --set stage1.iterations=8000 --tag long
    python bench/bench_quality.py e2e --labels-list 1 2 4 10 --seeds 0
    python bench/bench_quality.py dpt --seeds 0 1 2 --labels 4      # DPT against its baselines, same splits
    python bench/bench_quality.py stage3 --seeds 3 4 --labels 4 --tag lp --weights 1 0.2 --filters none agree
    python bench/bench_quality.py stage3 --seeds 3 4 --labels 1 --tag lpw256 --filters agree none --priors weighted real

`dpt` runs the config end to end per seed, then stage 3 again in copies of each run directory (stage 1 and 2
reused) for the baselines and variants: `real` (K real images per class with stage 1's most confident labels
instead of generated ones, with the config's stage-3 settings: plain self-training), `unweighted` (every
pseudo-image a full-weight labeled node, no judge), `probe` (stage 3 a logistic regression on labeled +
pseudo-images, the paper's ImageNet stage 3), with `--variants ... both` the generated and the real images
together, and, with --extra for the network learners, stage 1 trained for stage 1 + stage 3's iterations
(`extra`); a variant whose settings equal the run's own stage 3 is left out. `stage3` runs a grid of stage-3
settings (`--weights`, `--filters`, `--priors`, `--sources`) on the same run directories.

Each (setting, seed) is its own run directory under --root; finished runs are reused, interrupted ones resume,
so the command can be stopped and restarted. Stage 1 of the config's own learner runs in the end-to-end run
directory (`e2e-l{labels}-s{seed}{tag}`), so the two tables share it instead of training it twice. `seed` sets both
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
            name = f"e2e-l{args.labels}-s{seed}{args.tag}" if learner == own and not args.set else \
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
                     " / ".join(f"{100 * a:.2f}" for a in pls), f"{statistics.median(t for t in times if t) / 60:.1f}",
                     len(accs)))
    print(f"\n| learner | test top-1 (%) | per seed {args.seeds} | pseudo-label (pool) acc. (%) | per seed | "
          "median wall time (min) | seeds |")
    print("|---|---|---|---|---|---|---|")
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


VARIANTS = {"real": ["stage3.pseudo_source=real"],
            "unweighted": ["stage3.pseudo_weight=1", "stage3.filter=none"],
            "probe": ["stage3.mode=linear-probe", "stage3.pseudo_weight=1"],
            "both": ["stage3.pseudo_source=both"]}
DEFAULT_VARIANTS = ("real", "unweighted", "probe")


def stage3_variants(config: str, sets: list[str], names=DEFAULT_VARIANTS) -> dict[str, list[str]]:
    """The VARIANTS `names` whose settings change the run's own stage 3 (`config` with `sets`, as `key=value`):
    one that resolves to the same stage-3 settings is stage 3 itself, so it is neither run nor tabulated."""
    from dualpseudo.config import load_config
    own = load_config(config, sets).stage3
    return {name: VARIANTS[name] for name in names
            if load_config(config, [*sets, *VARIANTS[name]]).stage3 != own}


def _copy_upstream(src: Path, dst: Path) -> None:
    """A run directory holding `src`'s config, encoder, stage 1 and stage 2 (for a stage-3 variant)."""
    import shutil
    if dst.exists():
        return
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.yaml", dst / "config.yaml")
    for d in ("encoder", "stage1", "stage2"):
        if (src / d).is_dir():
            shutil.copytree(src / d, dst / d)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def dpt(args) -> None:
    from dualpseudo.config import load_config
    sets = [kv for kv in args.set if kv != "--set"]
    cfg = load_config(args.config, sets)
    variants = stage3_variants(args.config, sets, args.variants)
    network_learner = cfg.stage1.learner in ("fixmatch", "freematch", "supervised")
    rows = []
    for seed in args.seeds:
        common = ["--set", f"data.labels_per_class={args.labels}", "--set", f"data.split_seed={seed}",
                  "--set", f"runtime.seed={seed}", *args.set]
        d = Path(args.root) / f"e2e-l{args.labels}-s{seed}{args.tag}"
        run([sys.executable, "-m", "dualpseudo", "run", args.config, "--run-dir", str(d), *common])
        s1, s3 = read(d / "stage1" / "metrics.json"), read(d / "stage3" / "metrics.json")
        ev = read(d / "evaluation" / "metrics.json")
        row = {"seed": seed, "stage1": s1["test"]["top1"], "stage3": s3["test"]["top1"],
               "pool1": s1["pseudo_labels"]["accuracy"], "pool3": s3["pseudo_labels"]["accuracy"],
               "fid": ev.get("fid", {}).get("fid"),
               "consistency": (ev.get("class_consistency") or {}).get("accuracy"),
               "worst1": min(s1["test"]["per_class_accuracy"]), "worst3": min(s3["test"]["per_class_accuracy"]),
               "kept": (s3.get("filter") or {}).get("kept")}
        for name, sets in variants.items():
            v = Path(f"{d}-{name}")
            _copy_upstream(d, v)
            run([sys.executable, "-m", "dualpseudo", "stage3", args.config, "--run-dir", str(v), "--force", *common,
                 *[x for kv in sets for x in ("--set", kv)]])
            row[name] = read(v / "stage3" / "metrics.json")["test"]["top1"]
        if network_learner and args.extra:
            v = Path(args.root) / f"stage1-extra-l{args.labels}-s{seed}{args.tag}"
            iters = cfg.stage1.iterations + (cfg.stage3.iterations or cfg.stage1.iterations)
            run([sys.executable, "-m", "dualpseudo", "stage1", args.config, "--run-dir", str(v), *common,
                 "--set", f"stage1.iterations={iters}"])
            row["extra"] = read(v / "stage1" / "metrics.json")["test"]["top1"]
        rows.append(row)
    cols = [("stage1", "stage 1"), ("stage3", "stage 3 (DPT)"), ("delta", "change"),
            ("real", "stage 3, real pseudo-labeled images"),
            ("unweighted", "stage 3, every pseudo-image at full weight"),
            ("probe", "stage 3, linear probe on labeled + pseudo-images"),
            ("both", "stage 3, generated + real pseudo-labeled images"),
            ("extra", "stage 1, stage 3's extra iterations"), ("pool1", "pool acc. stage 1"),
            ("pool3", "pool acc. stage 3"),
            ("worst1", "worst class stage 1"), ("worst3", "worst class stage 3"),
            ("consistency", "class consistency")]
    for r in rows:
        r["delta"] = r["stage3"] - r["stage1"]
    cols = [(k, t) for k, t in cols if any(k in r for r in rows)]
    print("\n| seed | " + " | ".join(t for _, t in cols) + " | pseudo-images the judge kept | FID |")
    print("|---" * (len(cols) + 3) + "|")
    for r in rows:
        fid = f"{r['fid']:.2f}" if r.get("fid") is not None else "—"
        kept = "—" if r["kept"] is None else f"{r['kept']:,}"
        print(f"| {r['seed']} | " + " | ".join(_pct(r.get(k)) for k, _ in cols) + f" | {kept} | {fid} |")
    fids = [r["fid"] for r in rows if r.get("fid") is not None]
    mean_fid = f"{statistics.mean(fids):.2f}" if fids else "—"
    print("| mean ± std | " + " | ".join(mean_std([r.get(k) for r in rows]) for k, _ in cols) + f" | | {mean_fid} |")


def stage3_grid(args) -> None:
    """Stage 3 over a grid of `stage3.pseudo_weight` x `stage3.filter` on each seed's end-to-end run directory
    (stages 1-2 trained there first if needed, then reused by copies), with the pool and test accuracy."""
    rows = {}
    for seed in args.seeds:
        common = ["--set", f"data.labels_per_class={args.labels}", "--set", f"data.split_seed={seed}",
                  "--set", f"runtime.seed={seed}", *args.set]
        d = Path(args.root) / f"e2e-l{args.labels}-s{seed}{args.tag}"
        run([sys.executable, "-m", "dualpseudo", "stage2", args.config, "--run-dir", str(d), "--force", *common])
        s1 = read(d / "stage1" / "metrics.json")
        rows.setdefault(("stage 1",), []).append((s1["pseudo_labels"]["accuracy"], s1["test"]["top1"]))
        for src in args.sources:
            for w in args.weights:
                for f in args.filters:
                    for prior in args.priors:
                        v = Path(f"{d}-w{w:g}-{f}" + ("" if src == "generated" else f"-{src}")
                                 + ("" if prior == "weighted" else f"-prior-{prior}"))
                        _copy_upstream(d, v)
                        run([sys.executable, "-m", "dualpseudo", "stage3", args.config, "--run-dir", str(v),
                             "--force", *common, "--set", f"stage3.pseudo_weight={w}", "--set", f"stage3.filter={f}",
                             "--set", f"stage3.pseudo_source={src}", "--set", f"stage3.class_prior={prior}"])
                        m = read(v / "stage3" / "metrics.json")
                        rows.setdefault((src, f"{w:g}", f, prior), []).append((m["pseudo_labels"]["accuracy"],
                                                                              m["test"]["top1"]))
    print(f"\n| pseudo-images | pseudo_weight | filter | class_prior | pool acc. per seed {args.seeds} | "
          f"pool acc. mean | test top-1 per seed | test top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in rows.items():
        src, w, f, prior = key if len(key) == 4 else ("none (stage 1)", "—", "—", "—")
        print(f"| {src} | {w} | {f} | {prior} | " + " / ".join(_pct(p) for p, _ in r)
              + f" | {mean_std([p for p, _ in r])} | " + " / ".join(_pct(t) for _, t in r)
              + f" | {mean_std([t for _, t in r])} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["stage1", "e2e", "dpt", "stage3"])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--root", default="runs/bench")
    p.add_argument("--labels", type=int, default=4, help="labels per class (stage1)")
    p.add_argument("--labels-list", type=int, nargs="+", default=[4], dest="labels_list", help="labels per class (e2e)")
    p.add_argument("--learners", nargs="+", default=["fixmatch", "freematch", "supervised"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[], help="passed to the CLI as --set")
    p.add_argument("--tag", default="", help="suffix of the run directories; required with --set")
    p.add_argument("--extra", action="store_true", help="dpt: also stage 1 with stage 3's extra iterations")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                   help="dpt: the stage-3 variants beside the recipe (both: generated + real pseudo-labeled images)")
    p.add_argument("--weights", type=float, nargs="+", default=[1.0], help="stage3: stage3.pseudo_weight values")
    p.add_argument("--sources", nargs="+", default=["generated"], choices=["generated", "real", "both"],
                   help="stage3: stage3.pseudo_source values (real: the self-training baseline; both: the two)")
    p.add_argument("--filters", nargs="+", default=["none"], choices=["none", "agree", "auto"], help="stage3: filters")
    p.add_argument("--priors", nargs="+", default=["weighted"], choices=["weighted", "real"],
                   help="stage3: stage3.class_prior values")
    args = p.parse_args()
    if args.set and not args.tag:
        p.error("--set changes the runs: give them their own directories with --tag NAME")
    args.tag = f"-{args.tag}" if args.tag else ""
    args.set = [x for kv in args.set for x in ("--set", kv)]
    {"stage1": stage1, "e2e": e2e, "dpt": dpt, "stage3": stage3_grid}[args.what](args)


if __name__ == "__main__":
    main()

"""The `dualpseudo` command: parse arguments, resolve the config, call the library. Nothing else lives here."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = {
    "run": """examples:
  dualpseudo run configs/fashion_mnist.yaml --run-dir runs/fm4
  dualpseudo run configs/fashion_mnist.yaml --set data.labels_per_class=1 --run-dir runs/fm1
  dualpseudo run configs/fashion_mnist.yaml --run-dir runs/fm4 --dry-run     # config + plan, runs nothing
  accelerate launch --multi_gpu --num_processes 2 -m dualpseudo run configs/smoke.yaml --run-dir runs/smoke""",
    "stage1": """examples:
  dualpseudo stage1 configs/fashion_mnist.yaml --run-dir runs/fm4
  dualpseudo stage1 configs/fashion_mnist.yaml --set stage1.learner=fixmatch --run-dir runs/fm4-fixmatch""",
    "stage2": """examples:
  dualpseudo stage2 configs/fashion_mnist.yaml --run-dir runs/fm4           # reuses a finished stage 1
  dualpseudo stage2 configs/fashion_mnist.yaml --set stage2.guidance_scale=2 --run-dir runs/fm4 --force""",
    "stage3": """examples:
  dualpseudo stage3 configs/fashion_mnist.yaml --run-dir runs/fm4
  dualpseudo stage3 configs/fashion_mnist.yaml --set stage3.mode=supervised --run-dir runs/fm4-sup""",
    "sample": """examples:
  dualpseudo sample --run-dir runs/fm4 --per-class 16 --out grid.png
  dualpseudo sample --run-dir runs/fm4 --per-class 8 --guidance-scale 3 --seed 1 --out g3.png""",
    "eval": """examples:
  dualpseudo eval --run-dir runs/fm4          # accuracy, FID, precision/recall, class consistency""",
    "report": """examples:
  dualpseudo report --run-dir runs/fm4        # writes runs/fm4/report.html and report.md""",
}


def _add_config_args(p: argparse.ArgumentParser, config_required: bool) -> None:
    if config_required:
        p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stage1.iterations=500 (repeatable)")
    p.add_argument("--run-dir", required=True, help="run directory; rerunning the same command resumes it")
    p.add_argument("--force", action="store_true",
                   help="accept a config that differs from the run directory's: re-run exactly the affected stages")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, run nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualpseudo",
        description="Dual Pseudo Training: a semi-supervised classifier and a class-conditional diffusion model "
                    "that improve each other with few labels.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(EXAMPLES[k] for k in ("run", "sample")))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    _add_config_args(add("run", "run stages 1, 2, 3 and the evaluation; finished stages are reused"), True)
    _add_config_args(add("stage1", "stage 1: semi-supervised classifier and pseudo-labels for every image"), True)
    _add_config_args(add("stage2", "stage 2: class-conditional diffusion on pseudo-labels, K pseudo-images per class"), True)
    _add_config_args(add("stage3", "stage 3: retrain the classifier on real data plus pseudo-images"), True)

    p = add("sample", "draw a grid of samples (one row per class) from a run directory's diffusion model")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--per-class", type=int, default=10, help="images per class (columns)")
    p.add_argument("--out", default=None, help="output PNG (default RUN_DIR/sample_grid.png)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the run's stage2.guidance_scale")
    p.add_argument("--steps", type=int, default=None, help="default: the run's stage2.steps")
    p.add_argument("--sampler", choices=["dpmpp_2m", "heun"], default=None)
    p.add_argument("--seed", type=int, default=0, help="first per-image seed")
    p.add_argument("--round", type=int, default=1, help="which DPT round's diffusion model")

    p = add("eval", "evaluate a run: accuracy, FID, precision/recall and class consistency of pseudo-images")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override evaluation.* settings, e.g. --set evaluation.fid=false")

    p = add("report", "write report.html and report.md for a run directory")
    p.add_argument("--run-dir", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .artifacts import ArtifactError
    from .config import ConfigError
    from .data.datasets import DataError
    from .stages import pipeline

    try:
        if args.command in ("run", "stage1", "stage2", "stage3"):
            stages = pipeline.ALL_STAGES if args.command == "run" else (args.command,)
            return pipeline.main(args.config, args.overrides, Path(args.run_dir), stages=stages,
                                 force=args.force, dry_run=args.dry_run)
        if args.command == "sample":
            return pipeline.sample_grid(Path(args.run_dir), per_class=args.per_class, out=args.out,
                                        guidance_scale=args.guidance_scale, steps=args.steps,
                                        sampler=args.sampler, seed=args.seed, round=args.round)
        if args.command == "eval":
            return pipeline.evaluate_run(Path(args.run_dir), args.overrides)
        if args.command == "report":
            return pipeline.write_report(Path(args.run_dir))
    except (ConfigError, DataError, ArtifactError, pipeline.RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        from .distributed import shutdown
        shutdown()
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""The `dualpseudo` command: parse arguments, resolve the config, call the library. Nothing else lives here.

`main` is the one exception boundary: a failure the user can cause or fix (a bad config, input or run directory,
a damaged artifact, a diverged training, a full disk, a directory it may not write) ends in one `error:` line
and exit code 2; SIGINT and SIGTERM end with a line saying the run was interrupted; anything else is a bug of
ours and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import signal
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
  dualpseudo sample --run-dir runs/fm4 --per-class 8 --guidance-scale 3 --seed 1 --out g3.png
  dualpseudo sample --run-dir runs/fm4 --class sneaker --num 50 --out-dir samples/      # PNG files + grid
  dualpseudo sample --run-dir runs/fm4 --num 100 --format png npz --out-dir samples/    # every class""",
    "predict": """examples:
  dualpseudo predict --run-dir runs/fm4 photos/ extra.png --out predictions.csv
  dualpseudo predict --run-dir runs/fm4 photos/ --stage 1 --top-k 5 --out stage1.csv""",
    "export": """examples:
  dualpseudo export --run-dir runs/fm4 --out fm4-models
  dualpseudo predict --run-dir fm4-models photos/ --out predictions.csv      # the export loads like a run""",
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
    from . import __version__
    parser.add_argument("--version", action="version", version=f"dualpseudo {__version__}")
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
    p.add_argument("--per-class", "--num", dest="per_class", type=int, default=10,
                   help="images per class (the grid's columns)")
    p.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME",
                   help="with --out-dir: only this class (name or index; repeatable); default every class")
    p.add_argument("--out-dir", default=None,
                   help="write each image as OUT_DIR/<class>/<seed>.png (and/or samples.npz) plus grid.png")
    p.add_argument("--format", nargs="+", default=["png"], metavar="FMT", help="with --out-dir: png and/or npz")
    p.add_argument("--out", default=None, help="output PNG (default RUN_DIR/sample_grid.png)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the run's stage2.guidance_scale")
    p.add_argument("--steps", type=int, default=None, help="default: the run's stage2.steps")
    p.add_argument("--sampler", choices=["dpmpp_2m", "heun"], default=None)
    p.add_argument("--seed", type=int, default=0, help="first per-image seed")
    p.add_argument("--round", type=int, default=1, help="which DPT round's diffusion model")

    p = add("predict", "classify image files and folders with a run's classifier; writes a CSV")
    p.add_argument("--run-dir", required=True, help="a run directory or a folder written by `dualpseudo export`")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (searched recursively)")
    p.add_argument("--out", default="predictions.csv", help="CSV: path, class, confidence, top-k")
    p.add_argument("--stage", type=int, choices=[1, 3], default=3, help="3: the final classifier; 1: stage 1's")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=512)

    p = add("export", "write a run's classifier and generator, class names and a model card to a folder")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--torchscript", action="store_true", help="also a TorchScript of a network classifier")

    p = add("eval", "evaluate a run: accuracy, FID, precision/recall and class consistency of pseudo-images")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override evaluation.* settings, e.g. --set evaluation.fid=false")

    p = add("report", "write report.html and report.md for a run directory")
    p.add_argument("--run-dir", required=True)
    return parser


def _check_sample_args(args: argparse.Namespace) -> None:
    """`dualpseudo sample`'s numbers: counts and steps >= 1, a finite guidance scale >= 0 (ConfigError)."""
    import math

    from .config import ConfigError

    if args.per_class < 1:
        raise ConfigError(f"--per-class/--num: {args.per_class} images per class; give a number >= 1")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: {args.steps} sampler steps; give a number >= 1")
    if args.guidance_scale is not None and not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        raise ConfigError(f"--guidance-scale: {args.guidance_scale}; give a finite number >= 0")
    if args.round < 1:
        raise ConfigError(f"--round: {args.round}; rounds are numbered from 1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .artifacts import ArtifactError
    from .config import ConfigError
    from .data.datasets import DataError
    from .guards import DivergenceError
    from .rundir import RunDirError

    restore = _interrupt_on_sigterm()
    try:
        return _run_command(args)
    except (ConfigError, DataError, ArtifactError, RunDirError, DivergenceError) as e:
        return _error(str(e))
    except Terminated:
        print("\ninterrupted (SIGTERM); rerun the same command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:
        line = _os_error(e)
        if line is None:
            raise
        return _error(line)
    except RuntimeError as e:                   # torch.save's own text for a failed write (inline_container.cc)
        if "PytorchStreamWriter" not in str(e):
            raise
        return _error(f"writing a file failed ({str(e).strip().splitlines()[0][:160]}); the disk may be full: "
                      f"free some space and rerun the same command to resume")
    finally:
        from .distributed import shutdown
        from .rundir import unlock_all
        unlock_all()
        restore()
        shutdown()


def _run_command(args: argparse.Namespace) -> int:
    """Call the library function of the parsed command; its exit code."""
    if args.command == "sample":
        _check_sample_args(args)
    if args.command in ("run", "stage1", "stage2", "stage3"):
        from .stages import pipeline
        stages = pipeline.ALL_STAGES if args.command == "run" else (args.command,)
        return pipeline.main(args.config, args.overrides, Path(args.run_dir), stages=stages,
                             force=args.force, dry_run=args.dry_run)
    if args.command == "sample" and args.out_dir:
        from .api import sample_files
        written = sample_files(Path(args.run_dir), args.out_dir, classes=args.classes, num=args.per_class,
                               seed=args.seed, guidance_scale=args.guidance_scale, steps=args.steps,
                               sampler=args.sampler, formats=args.format, round=args.round)
        print(f"{len(written)} files under {args.out_dir}")
        return 0
    if args.command == "predict":
        from .api import predict_files
        print(predict_files(Path(args.run_dir), args.paths, args.out, stage=args.stage, top_k=args.top_k,
                            batch_size=args.batch_size))
        return 0
    if args.command == "export":
        from .export import export_run
        print(export_run(Path(args.run_dir), Path(args.out), torchscript=args.torchscript))
        return 0
    from . import commands
    if args.command == "sample":
        return commands.sample_grid(Path(args.run_dir), per_class=args.per_class, out=args.out,
                                    guidance_scale=args.guidance_scale, steps=args.steps,
                                    sampler=args.sampler, seed=args.seed, round=args.round)
    if args.command == "eval":
        return commands.evaluate_run(Path(args.run_dir), args.overrides)
    if args.command == "report":
        return commands.write_report(Path(args.run_dir))
    return 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so files being written are cleaned up as on Ctrl-C."""


def _interrupt_on_sigterm():
    """Turn SIGTERM into `Terminated` for this call; returns what puts the previous handler back."""
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:                          # not the main thread: leave signals alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


def _error(message: str) -> int:
    _close_progress_bars()
    print("error: " + " ".join(message.split("\n")), file=sys.stderr)
    return 2


def _close_progress_bars() -> None:
    """End the progress bars a failure left open, so the error line starts a line of its own."""
    try:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _os_error(e: OSError) -> str | None:
    """The error line for an OSError a user can fix (disk full, no permission, read-only), else None."""
    where = e.filename if e.filename is not None else "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left to write {where} ({e.strerror}); free some space and rerun the same command to "
                f"resume (finished stages are kept)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot use {where} ({e.strerror}); give this user access to it, or use another --run-dir / "
                f"evaluation.cache_dir (a finished run can be reported and evaluated in a read-only directory)")
    if e.errno == errno.EIO:
        return f"cannot write {where} ({e.strerror}); check the disk, then rerun the same command to resume"
    return None


if __name__ == "__main__":
    sys.exit(main())

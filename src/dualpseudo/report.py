"""The run report: headline table, sample grids, training curves, per-class results and the config, as a
self-contained report.html (PNGs embedded) and report.md (PNGs under figures/). Pictures: figures.py; HTML and
Markdown: render.py."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .figures import bars_png, curves_png, heatmap_png, as_number
from .render import Block, to_html, to_markdown
from .stages.files import (CLASSIFIER, DIFFUSION, GRID, METRICS, STATS, Metrics, PseudoImages, Split, get_path,
                           read_object, step_summary, wall_time_s)


# ------------------------------------------------------------------------------------------------ the run report
# A report is a list of blocks (render.py) rendered twice: HTML (figures embedded as base64, no external
# resources) and Markdown (figures written under `figures/`). Every input is optional, so a partial run reports
# what exists.
STAGES = ("stage1", "stage2", "stage3", "evaluation")
NA = "—"
LABEL_SOURCES = {"true": "all true labels (full-label reference generator)",
                 "none": "none (unconditional reference generator)"}


def write_report(run) -> Path:
    """Write `report.html` (self-contained) and `report.md` (+ `figures/*.png`) for a run; return the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    from .artifacts import write_bytes, write_text

    rounds = _rounds(run)
    cfg_text, cfg = _config(run)
    s1 = Metrics.read(run.stage1)
    names = _artifact_class_names(run) or _class_names(get_path(cfg, "data", "name"), _num_classes(run, rounds, s1))
    blocks: list[Block] = [("h", 1, f"DPT run report: {run.root.name}")]
    blocks += _headline(run, rounds, cfg, s1)
    blocks += _grid_section(run, rounds, get_path(cfg, "stage2", "label_source") == "none", names)
    blocks += _curves_section(run, rounds)
    blocks += _per_class_section(run, rounds, s1, names)
    blocks += _config_section(run, cfg_text)

    html_path = write_text(run.report_html, to_html(blocks, run.root.name))
    md, figures = to_markdown(blocks, Path(os.path.relpath(run.figures, run.root)).as_posix())
    for name, png in figures.items():
        write_bytes(run.figures / name, png)
    write_text(run.report_md, md)
    return html_path


# ---------------------------------------------------------------------------------------------------- reading
def _config(run) -> tuple[str | None, dict]:
    try:
        text = run.config.read_text()
    except (OSError, UnicodeDecodeError):
        return None, {}
    try:
        import yaml

        cfg = yaml.safe_load(text)
    except Exception:  # a broken config still shows as text
        cfg = None
    return text, cfg if isinstance(cfg, dict) else {}


def _rounds(run) -> list[int]:
    found = {1}
    for p in run.root.glob("round*"):
        if p.is_dir() and p.name[5:].isdigit():
            found.add(int(p.name[5:]))
    return sorted(found)


def _num_classes(run, rounds, s1: Metrics) -> int | None:
    candidates = [s1.pseudo_label_recall, s1.test_per_class_accuracy]
    candidates += [Metrics.read(run.stage("evaluation", r)).class_consistency_per_class for r in rounds]
    return next((len(c) for c in candidates if isinstance(c, list) and c), None)


def _class_names(dataset: str | None, num_classes: int | None) -> list[str]:
    from .data.datasets import CIFAR10_CLASSES, FASHION_MNIST_CLASSES

    known = {"fashion_mnist": FASHION_MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}.get(str(dataset))
    if known and (num_classes is None or num_classes == len(known)):
        return list(known)
    return [str(i) for i in range(num_classes or 0)]


def _artifact_class_names(run) -> list[str] | None:
    """The class names a model file carries in its safetensors header (read without loading the tensors)."""
    from .artifacts import ArtifactError, weights_meta

    for path in (run.stage1 / CLASSIFIER, run.stage("stage2") / DIFFUSION):
        try:
            metas = weights_meta(path)
        except ArtifactError:
            continue
        for meta in metas.values():
            names = meta.get("class_names")
            if isinstance(names, list) and names:
                return [str(x) for x in names]
    return None


def _labeled_images(run) -> dict[int, np.ndarray] | None:
    """Each class's labeled real images (stage1/split.json read from the run's dataset), or None when the
    dataset cannot be read here or is not the one the run used."""
    from .config import ConfigError, load_config
    from .data.datasets import DataError, load_dataset

    split = Split.read(run.stage1)
    if split is None or split.per_class is None:
        return None
    try:
        cfg = load_config(run.config)
        ds = load_dataset(cfg.data, cfg.evaluation.cache_dir)
        if ds.fingerprint != split.dataset_fingerprint:
            return None
        return {int(c): ds.train_images[np.asarray(ix, dtype=np.int64)] for c, ix in split.per_class.items()}
    except (ConfigError, DataError, OSError, ValueError, IndexError):
        return None


def _real_beside_generated(run, names: list[str], per_row: int = 10, real_per_row: int = 4) -> bytes | None:
    """A PNG: one row per class, its labeled real images, a gap, then its first generated pseudo-images."""
    import io

    from .artifacts import ArtifactError
    from .figures import grid_image

    try:
        gen = PseudoImages.load(run.stage("stage2"))
    except ArtifactError:
        return None
    real = _labeled_images(run)
    if real is None:
        return None
    images, labels = gen.images, gen.labels
    h, w, c = images.shape[1:]
    blank = np.full((h, w, c), 255, np.uint8)
    tiles = []
    for k in range(len(names)):
        r = list(real.get(k, np.zeros((0, h, w, c), np.uint8))[:real_per_row])
        g = list(images[labels == k][:per_row])
        tiles += r + [blank] * (real_per_row - len(r) + 1) + g + [blank] * (per_row - len(g))
    img = grid_image(np.stack(tiles), rows=len(names), row_names=names, scale=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _stats(path: Path) -> list[dict]:
    """Rows of a stats.jsonl; unreadable lines (e.g. a half-written last line) are skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- formatting

def _pct(x) -> str:
    return NA if as_number(x) is None else f"{100 * x:.2f}%"


def _pp(x) -> str:
    return NA if as_number(x) is None else f"{100 * x:+.2f} pp"


def _f(x, digits: int = 3) -> str:
    return NA if as_number(x) is None else f"{x:.{digits}f}"


def _secs(x) -> str:
    x = as_number(x)
    if x is None:
        return "not run yet"
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min" if x < 7200 else f"{x / 3600:.2f} h"


def _fid(ev: Metrics) -> str:
    fid = ev.fid
    if as_number(fid["fid"]) is None:
        return "not measured" if ev else NA
    parts = [f"{fid['num_samples']} samples" if fid["num_samples"] is not None else None,
             f"vs {fid['num_reference']} real" if fid["num_reference"] is not None else None,
             str(fid["sampler"]) if fid["sampler"] is not None else None,
             f"{fid['steps']} steps" if fid["steps"] is not None else None,
             f"guidance {fid['guidance_scale']}" if fid["guidance_scale"] is not None else None]
    details = ", ".join(p for p in parts if p)
    return f"{fid['fid']:.2f}" + (f" ({details})" if details else "")


# --------------------------------------------------------------------------------------------------- sections
NO_TEST = "not available: no test set (data.test_root)"


def _unavailable(why: str | None) -> str | None:
    """'not available: <reason>' when a metric could not be measured (`why`), else None."""
    return None if why is None else f"not available: {why}"


def _or_na(x) -> str:
    return NA if x is None else str(x)


def _pseudo_used(m: Metrics) -> str:
    """How many pseudo-images stage 3 used, and what its filter (`stage3.filter`) did to them."""
    f = m.data.get("filter") or {}
    if not f or m.num_pseudo_images is None:
        return _or_na(m.num_pseudo_images)
    if f.get("rule") == "agree":
        return f"{m.num_pseudo_images} of {f['of']} (kept by the judge)"
    return f"{m.num_pseudo_images} (no judge: `stage3.filter: {f.get('setting')}` with one labeled image in a class)"


def _headline_metrics() -> list[tuple[str, str, Callable[[Metrics], str]]]:
    """(row label, the step whose metrics.json it reads, how it shows them) of the summary table."""
    pr = lambda m, k: _f(m.precision_recall(k))  # noqa: E731
    top1 = lambda m: _pct(m.test_top1) if m.has_test else NO_TEST  # noqa: E731
    pseudo = lambda m: _unavailable(m.pseudo_labels_unavailable) or _pct(m.pseudo_label_accuracy)  # noqa: E731
    return [
        ("stage-1 test top-1", "stage1", top1),
        ("stage-3 test top-1", "stage3", top1),
        ("change vs stage 1", "stage3", lambda m: _pp(m.delta_top1)),
        ("baseline: stage 3 with K real pseudo-labeled images instead (self-training)", "stage3_baseline",
         lambda m: f"{_pct(m.test_top1)} ({_pp(m.delta_top1)})"),
        ("pseudo-label accuracy, stage 1 (unlabeled pool)", "stage1", pseudo),
        ("pseudo-label accuracy, stage 3 (unlabeled pool)", "stage3", pseudo),
        ("pseudo-images used in stage 3", "stage3", _pseudo_used),
        ("FID", "evaluation", _fid),
        ("class consistency (oracle)", "evaluation",
         lambda m: _unavailable(m.class_consistency_unavailable) or _pct(m.class_consistency_accuracy)),
        ("pseudo-images in their class by stage 3's classifier (no oracle; it trained on them)", "evaluation",
         lambda m: _pct(m.judged_by_stage3_accuracy)),
        ("precision / recall", "evaluation", lambda m: f"{pr(m, 'precision')} / {pr(m, 'recall')}"),
        ("density / coverage", "evaluation", lambda m: f"{pr(m, 'density')} / {pr(m, 'coverage')}"),
        ("domain Fréchet distance (oracle features)", "evaluation", lambda m: _f(m.domain_fd, 2)),
        ("oracle test top-1", "evaluation", lambda m: _pct(m.oracle_test_top1)),
    ]


def _headline(run, rounds: list[int], cfg: dict, s1: Metrics) -> list[Block]:
    split = Split.read(run.stage1)
    info = [["dataset", str(get_path(cfg, "data", "name", default=NA))],
            ["labels per class", str(get_path(cfg, "data", "labels_per_class", default=NA))],
            ["labeled images", _or_na(split and split.num_labeled)],
            ["stage-1 learner / network", f"{_or_na(s1.learner)} / {_or_na(s1.network)}"],
            ["DPT rounds", str(len(rounds))]]
    source = get_path(cfg, "stage2", "label_source", default="pseudo")
    threshold = as_number(get_path(cfg, "stage2", "min_confidence", default=0.0)) or 0.0
    if source != "pseudo":                                   # a reference generator, not DPT
        info.append(["stage-2 training labels", LABEL_SOURCES.get(source, str(source))])
    elif threshold > 0:                                      # confidence-aware conditioning
        share = step_summary(run.stage("stage2", 1), "conditional_fraction")
        info.append(["stage-2 training labels", f"pseudo-labels of confidence >= {threshold:g} "
                     f"({_pct(share)} of the training images; the others train the null class)"])
    out: list[Block] = [("h", 2, "Summary"), ("table", ["run", "value"], info)]
    if not s1:
        out.append(("note", f"Stage 1 not run yet (no stage1/{METRICS})."))

    src = {"stage1": {r: s1 if r == 1 else None for r in rounds}}      # stage 1 runs once, in round 1
    src.update({s: {r: Metrics.read(run.stage(s, r)) for r in rounds}
                for s in ("stage3", "stage3_baseline", "evaluation")})
    metrics = _headline_metrics()
    # An unconditional generator has no stage 3 and no class for its images to be consistent with.
    undefined = {label for label, stage, _ in metrics if source == "none" and
                 (stage == "stage3" or label.startswith("class consistency"))}

    def cell(label: str, m: Metrics | None, fn) -> str:
        if label in undefined:
            return "— (unconditional generator)"
        if label.startswith("baseline:") and m is not None and not m:
            return "not run (stage3.baseline: false)"
        return "" if m is None else fn(m) if m else "not run yet"
    rows = [[label] + [cell(label, src[stage][r], fn) for r in rounds] for label, stage, fn in metrics]
    for s in STAGES:
        wall = [wall_time_s(run.stage(s, r)) for r in rounds]
        if s == "stage3" and source == "none":
            rows.append([f"wall time, {s}"] + [NA] * len(rounds))
            continue
        rows.append([f"wall time, {s}"] + ["" if s == "stage1" and r > 1 else _secs(w) for r, w in zip(rounds, wall)])
    out.append(("table", ["metric"] + [f"round {r}" for r in rounds], rows))
    return out


def _grid_section(run, rounds: list[int], unconditional: bool = False,
                  names: list[str] | None = None) -> list[Block]:
    out: list[Block] = [("h", 2, "Pseudo-images")]
    side = None if unconditional or not names else _real_beside_generated(run, names)
    if side is not None:
        out.append(("img", "real_beside_generated.png", side,
                    "Each row one class: its labeled real images, then pseudo-images generated for it"))
    what = "Unconditional samples (rows are not classes)" if unconditional else "Samples, one row per class"
    for r in rounds:
        path = run.stage("stage2", r) / GRID
        tag = "" if r == 1 else f" (round {r})"
        try:
            out.append(("img", f"grid_round{r}.png", path.read_bytes(), f"{what}{tag}"))
        except OSError:
            out.append(("note", f"Stage 2{tag} not run yet (no {path.relative_to(run.root)})."))
    return out


def _curves_section(run, rounds: list[int]) -> list[Block]:
    out: list[Block] = [("h", 2, "Training curves")]
    what = {"encoder": "self-supervised encoder (SimCLR, no labels)", "stage1": "stage 1 (classifier)",
            "stage2": "stage 2 (diffusion)", "stage3": "stage 3 (classifier)"}
    dirs = [("encoder", 1)] * run.encoder.is_dir() + [("stage1", 1)] + \
        [(s, r) for r in rounds for s in ("stage2", "stage3")]
    for s, r in dirs:
        d, title = run.stage(s, r), what[s] + ("" if r == 1 else f", round {r}")
        rows = _stats(d / STATS)
        png = curves_png(rows, title) if rows else None
        learner = Metrics.read(d).learner
        if png is None and learner in ("linear-probe", "label-propagation"):
            out.append(("note", f"{title}: {learner} is solved to convergence, not trained by steps (no curve)."))
        elif png is None:
            out.append(("note", f"{title}: not run yet (no {(d / STATS).relative_to(run.root)})."))
        else:
            out.append(("img", f"curves_{s}_round{r}.png", png, f"{title}: logged training statistics"))
    return out


def _per_class_section(run, rounds: list[int], s1: Metrics, names: list[str]) -> list[Block]:
    out: list[Block] = [("h", 2, "Per-class results")]
    prec, rec = s1.pseudo_label_precision, s1.pseudo_label_recall
    if isinstance(prec, list) or isinstance(rec, list):
        series = {"precision": prec if isinstance(prec, list) else [], "recall": rec if isinstance(rec, list) else []}
        png = bars_png(series, names, "Stage-1 pseudo-labels (unlabeled pool)")
        out.append(("img", "pseudo_label_pr.png", png, "Per-class precision and recall of stage-1 pseudo-labels"))
    else:
        out.append(("note", "Stage 1 not run yet: no pseudo-label precision/recall."))

    out += _per_class_table(run, rounds, s1, names)

    matrices = [("pseudo-labels, stage 1 (unlabeled pool)", s1.pseudo_label_confusion, "cm_pseudo_labels.png"),
                ("stage-1 test set", s1.test_confusion, "cm_stage1_test.png")]
    for r in rounds:
        tag = "" if r == 1 else f", round {r}"
        s3 = Metrics.read(run.stage("stage3", r))
        matrices.append((f"stage-3 test set{tag}", s3.test_confusion, f"cm_stage3_test_round{r}.png"))
        matrices.append((f"generated images{tag}: oracle prediction",
                         Metrics.read(run.stage("evaluation", r)).class_consistency_confusion,
                         f"cm_class_consistency_round{r}.png"))
    gallery, missing = [], []
    for title, cm, fname in matrices:
        png = heatmap_png(cm, names, title) if cm is not None else None
        if png is not None:
            gallery.append((fname, png, f"Confusion matrix, {title} (rows: true class)"))
        else:
            missing.append(title)
    out.append(("h", 3, "Confusion matrices"))
    if gallery:
        out.append(("gallery", gallery))
    if missing:
        out.append(("note", "Not run yet: " + "; ".join(missing) + "."))
    return out


def _per_class_table(run, rounds: list[int], s1: Metrics, names: list[str]) -> list[Block]:
    """One row per class: pseudo-label precision/recall, test accuracy of stages 1 and 3, class consistency."""
    cols = {"pseudo-label precision": s1.pseudo_label_precision,
            "pseudo-label recall": s1.pseudo_label_recall,
            "stage-1 test acc.": s1.test_per_class_accuracy}
    for r in rounds:
        tag = "" if len(rounds) == 1 else f" (round {r})"
        cols[f"stage-3 test acc.{tag}"] = Metrics.read(run.stage("stage3", r)).test_per_class_accuracy
        cols[f"class consistency{tag}"] = Metrics.read(run.stage("evaluation", r)).class_consistency_per_class
    cols = {k: v for k, v in cols.items() if isinstance(v, list) and v}
    if not cols or not names:
        return []
    rows = [[f"{c}: {name}"] + [_pct(v[c]) if c < len(v) else NA for v in cols.values()]
            for c, name in enumerate(names)]
    return [("table", ["class"] + list(cols), rows)]


def _config_section(run, cfg_text: str | None) -> list[Block]:
    out: list[Block] = [("h", 2, "Configuration")]
    out.append(("pre", cfg_text) if cfg_text else ("note", "No config.yaml yet."))
    out.append(("h", 2, "Environment"))
    env = read_object(run.env)
    out.append(("pre", json.dumps(env, indent=2, default=str)) if env else ("note", "No env.json yet."))
    return out

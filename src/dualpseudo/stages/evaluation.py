"""Evaluation of the pseudo-images: class consistency, domain Frechet distance and precision/recall under an
oracle classifier, and FID with the standard Inception network.

Evaluation runs in one process (rank 0 of a data-parallel launch; the others wait): it is small next to training.
The oracle is a classifier trained with ALL training labels. DPT itself never sees it; it only judges whether a
generated image shows the class it was conditioned on. It is trained once per (dataset, settings) and cached.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..artifacts import load_npz, write_json
from ..classify.train import load_classifier, predict, save_classifier, train_classifier
from ..config import ExperimentConfig, Stage1Config, config_hash
from ..data.datasets import Dataset
from ..distributed import LOCAL
from ..evaluate.classification import class_consistency, top1
from ..evaluate.domain import domain_feature_fn
from ..evaluate.features import extract_features
from ..evaluate.fid import fid_report, frechet_distance, feature_stats, reference_key, reference_stats
from ..evaluate.prdc import precision_recall


def oracle_config(cfg: ExperimentConfig) -> Stage1Config:
    """Supervised training on every labeled training image."""
    return Stage1Config(learner="supervised", network=cfg.evaluation.oracle_network,
                        iterations=cfg.evaluation.oracle_iterations, batch_size=128, uratio=0, lr=0.03,
                        checkpoint_every=max(1, cfg.evaluation.oracle_iterations // 4), log_every=50)


def get_oracle(cfg: ExperimentConfig, ds: Dataset, cache: Path, device: torch.device,
               progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """The cached oracle for this dataset and settings, trained (resumably) when missing."""
    s = oracle_config(cfg)
    key = config_hash({"dataset": ds.fingerprint, "oracle": s, "hflip": cfg.data.hflip,
                       "precision": cfg.runtime.precision})
    d = cache / f"oracle-{key}"
    path = d / "classifier.safetensors"
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


def run_evaluation(cfg: ExperimentConfig, ds: Dataset, pseudo_images: Path, out: Path, device: torch.device,
                   progress: bool = True) -> dict:
    """Write `out/metrics.json` for the pseudo-images of one round and return it."""
    ev = cfg.evaluation
    gen = load_npz(pseudo_images, ("images", "labels"))
    images, labels = gen["images"], gen["labels"]
    cache = Path(ev.cache_dir).expanduser()
    unconditional = bool(len(labels)) and bool((labels >= ds.num_classes).all())
    guidance = float(gen["guidance_scale"]) if "guidance_scale" in gen else cfg.stage2.guidance_scale
    metrics: dict = {"num_samples": int(len(labels)), "sampler": cfg.stage2.sampler, "steps": cfg.stage2.steps,
                     "guidance_scale": guidance, "unconditional": unconditional}

    oracle, meta = get_oracle(cfg, ds, cache, device, progress)
    metrics["oracle"] = {"network": meta.get("network"), "test_top1": meta.get("test_top1"),
                         "trained_on": "all training labels (evaluation only)"}
    classify = lambda x: predict(oracle, x, batch_size=ev.batch_size, device=device,  # noqa: E731
                                 precision=cfg.runtime.precision)
    # Unconditional images have no conditioning label to be consistent with.
    metrics["class_consistency"] = None if unconditional else class_consistency(classify, images, labels,
                                                                                 ds.num_classes, ev.batch_size)

    # Domain features: the oracle's penultimate layer.
    real_idx = reference_subset(ds, min(ev.fid_reference_images, len(ds.train_images)))
    fn = domain_feature_fn(oracle)
    real_f = extract_features(fn, ds.train_images[real_idx], batch_size=ev.batch_size, device=device,
                              progress=progress, desc="oracle features (real)")
    gen_f = extract_features(fn, images, batch_size=ev.batch_size, device=device, progress=progress,
                             desc="oracle features (generated)")
    metrics["domain_fd"] = frechet_distance(*feature_stats(gen_f), *feature_stats(real_f), method=ev.fid_method)
    n_pr = min(ev.pr_max_samples, len(real_f), len(gen_f))
    rng = np.random.default_rng(0)
    metrics["precision_recall"] = precision_recall(real_f[rng.permutation(len(real_f))[:n_pr]],
                                                   gen_f[rng.permutation(len(gen_f))[:n_pr]], k=ev.pr_k)
    metrics["precision_recall"]["features"] = "oracle penultimate layer"

    if ev.fid:
        from ..evaluate.inception import inception_feature_fn

        inc = inception_feature_fn(ev.inception_path, ev.resize_mode, ev.inception_precision)
        key = reference_key(ds.fingerprint, inc.extractor_id, ev.resize_mode, len(real_idx))
        ref_mu, ref_sigma = reference_stats(
            cache / "fid", key, lambda: extract_features(inc, ds.train_images[real_idx], batch_size=ev.batch_size,
                                                          device=device, progress=progress,
                                                          desc="Inception (reference)"))
        gen_inc = extract_features(inc, images, batch_size=ev.batch_size, device=device, progress=progress,
                                   desc="Inception (generated)")
        metrics["fid"] = fid_report(gen_inc, ref_mu, ref_sigma, num_reference=len(real_idx),
                                    feature_extractor=inc.extractor_id, guidance_scale=guidance,
                                    sampler=cfg.stage2.sampler, steps=cfg.stage2.steps, method=ev.fid_method)
    write_json(out / "metrics.json", metrics)
    return metrics

"""The learner that stages 1 and 3 share: fit the classifier, label every training image, and measure it.

Stage 1 (`pseudo_labels.run_stage1`) fits on the labeled split plus the unlabeled pool; stage 3
(`retrain.run_stage3`) fits again with the pseudo-images joining the labeled set (`mode: ssl`) or on labeled +
pseudo-images alone (`mode: supervised`). Both call `fit_and_label`, which writes the classifier and the
pseudo-labels and returns the metrics; each stage writes its own metrics.json. The test split is used only
to report the final EMA model's top-1, never to pick a model or a setting.

With `learner: linear-probe` (the paper's ImageNet recipe) both stages instead fit a logistic regression on
frozen-encoder features (`classify/linear.py`): stage 1 on the labeled images, stage 3 on the labeled images plus
the pseudo-images; every training image is then labeled from its cached features. With
`learner: label-propagation` both stages run Poisson learning (`classify/graph.py`) on a k-NN graph of the same
features: stage 1 over the training images, stage 3 with the pseudo-images joining the graph as labeled nodes.
The frozen encoder of both is `linear_probe.encoder`; `ssl` is the run's self-supervised encoder
(`classify/contrastive.py`), whose weights file the pipeline passes as `encoder_file`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..artifacts import concerning, save_weights
from ..classify import graph
from ..classify.linear import (MirrorAveraged, build_encoder, cached_features, fit_objective, fit_probe, probe_predict,
                               save_probe)
from ..classify.train import predict, save_classifier, train_classifier
from ..config import ExperimentConfig
from ..distributed import World
from ..guards import check_outputs
from ..data.datasets import Dataset
from .declare import FEATURE_LEARNERS
from .files import CLASSIFIER, FEATURES, STATE, PseudoLabels
from ..evaluate.classification import confusion_matrix, per_class_accuracy, pseudo_label_report, top1


def fit_and_label(cfg: ExperimentConfig, ds: Dataset, labeled_idx: np.ndarray, out: Path, device: torch.device, *,
                  x_pseudo: np.ndarray | None = None, y_pseudo: np.ndarray | None = None,
                  learner: str | None = None, iterations: int | None = None, pseudo_fraction: float = 0.0,
                  feature_cache: Path | None = None, encoder_file: Path | None = None, world: World,
                  progress: bool = True) -> dict:
    """The learner of stages 1 and 3: train the classifier into `out`, write it and the pseudo-labels, and
    return the metrics (each stage writes its own metrics.json).

    `feature_cache` (linear probe): where the real images' features are cached, default `out/features`; stage 3
    passes stage 1's cache, whose shards are reused when their keys (extractor, image hash) match.

    With several processes (`world`) all train (data parallel); rank 0 alone labels, measures and writes, the
    others return {}.
    """
    s1 = cfg.stage1 if learner is None else replace(cfg.stage1, learner=learner)
    if s1.learner in FEATURE_LEARNERS:
        if not world.is_main:                           # features and fits are cheap: rank 0 alone runs them
            return {}
        features = _feature_fn(cfg, device, out, feature_cache or out / FEATURES, encoder_file, progress)
        fit = _fit_and_label_probe if s1.learner == "linear-probe" else _fit_and_label_graph
        return fit(cfg, ds, labeled_idx, out, features, x_pseudo, y_pseudo)
    x_lb, y_lb = ds.train_images[labeled_idx], ds.train_labels[labeled_idx]
    init = None
    if s1.init == "encoder":
        if encoder_file is None:
            raise ValueError("stage1.init=encoder needs the trained encoder's file (the pipeline passes it)")
        from ..classify.contrastive import load_encoder
        init = load_encoder(encoder_file)[0]
    with concerning(out / STATE):                      # the loop names its refused state only in the message
        model = train_classifier(
            s1, x_lb=x_lb, y_lb=y_lb, x_ulb=ds.train_images, num_classes=ds.num_classes, hflip=cfg.data.hflip,
            out_dir=out, device=device, precision=cfg.runtime.precision, seed=cfg.runtime.seed,
            x_pseudo=x_pseudo, y_pseudo=y_pseudo, pseudo_fraction=pseudo_fraction, iterations=iterations,
            progress=progress, world=world, init_weights=init)
    if not world.is_main:
        return {}
    save_classifier(out / CLASSIFIER, model, {
        "network": s1.network, "num_classes": ds.num_classes, "in_channels": ds.image_shape[2],
        "image_size": ds.image_shape[0], "class_names": list(ds.class_names)})

    # Every training image gets a label; labeled images keep their true one.
    probs = predict(model, ds.train_images, batch_size=s1.predict_batch_size, device=device,
                    precision=cfg.runtime.precision)
    test_probs = None
    if len(ds.test_images):
        test_probs = predict(model, ds.test_images, batch_size=s1.predict_batch_size, device=device,
                             precision=cfg.runtime.precision)
    metrics = _label_and_measure(ds, labeled_idx, out, probs, test_probs,
                                 "final EMA (no selection on the test split)")
    metrics["learner"] = s1.learner
    metrics["network"] = s1.network
    return metrics


def _label_and_measure(ds: Dataset, labeled_idx: np.ndarray, out: Path, probs: np.ndarray,
                       test_probs: np.ndarray | None, model_note: str) -> dict:
    """Write pseudo_labels.npz from train probabilities (N, C) and return the metrics (test ones if given).

    Probabilities that are non-finite or put every unlabeled image in one class at confidence 1.0 (a diverged
    training) raise `DivergenceError` instead: the stage is not marked done."""
    label, confidence = probs.argmax(1).astype(np.int64), probs.max(1).astype(np.float32)
    is_labeled = np.zeros(len(label), dtype=bool)
    is_labeled[labeled_idx] = True
    check_outputs(probs, is_labeled, out.name, "Lower stage1.lr or use runtime.precision=fp32, then rerun")
    label[is_labeled], confidence[is_labeled] = ds.train_labels[is_labeled], 1.0
    PseudoLabels(label, confidence, is_labeled).save(out)

    metrics = label_metrics(label, confidence, is_labeled, ds)
    if test_probs is not None:
        test_pred = test_probs.argmax(1)
        metrics["test"] = {
            "top1": top1(test_pred, ds.test_labels),
            "per_class_accuracy": per_class_accuracy(test_pred, ds.test_labels, ds.num_classes),
            "confusion": confusion_matrix(test_pred, ds.test_labels, ds.num_classes),
            "num_images": int(len(ds.test_labels)),
            "model": model_note,
        }
    return metrics


def _feature_fn(cfg: ExperimentConfig, device: torch.device, out: Path, feature_cache: Path,
                encoder_file: Path | None, progress: bool):
    """`features(images, name) -> (N, D)`: the frozen encoder's features, cached by name ("train", "test" in
    `feature_cache`, shared by stages 1 and 3; "pseudo", "judged" in `out/features`); `.meta` describes the
    encoder."""
    lp = cfg.linear_probe
    if lp.encoder == "ssl":
        from ..classify.contrastive import EncoderFeatures
        if encoder_file is None:
            raise ValueError("linear_probe.encoder=ssl needs the trained encoder's file (the pipeline passes it)")
        encoder = EncoderFeatures(encoder_file, cfg.runtime.precision)
    else:
        encoder = build_encoder(lp.encoder, lp.encoder_path, cfg.runtime.precision)
    if lp.mirror:
        encoder = MirrorAveraged(encoder)

    def features(images: np.ndarray, name: str) -> np.ndarray:
        cache = (out / "features" if name in ("pseudo", "judged") else feature_cache) / name
        return cached_features(encoder, images, cache, extractor_id=encoder.extractor_id,
                               shard_size=lp.shard_size, batch_size=lp.batch_size, device=device, progress=progress)

    features.device = device
    features.meta = {"encoder": lp.encoder, "encoder_path": lp.encoder_path, "extractor_id": encoder.extractor_id,
                     **({"mirror": True} if lp.mirror else {})}
    return features


def _fit_and_label_probe(cfg: ExperimentConfig, ds: Dataset, labeled_idx: np.ndarray, out: Path, features,
                         x_pseudo: np.ndarray | None, y_pseudo: np.ndarray | None) -> dict:
    """The linear-probe learner: cached encoder features, logistic regression, labels for every image.

    Features are centred with the mean over all real training images (stage 1 and 3 alike) and fitted on the
    labeled images, plus the pseudo-images when given (stage 3).
    """
    lp = cfg.linear_probe
    f_train = features(ds.train_images, "train")                           # (N, D)
    f_fit, y_fit = f_train[labeled_idx], ds.train_labels[labeled_idx]
    if x_pseudo is not None and len(x_pseudo):
        f_fit = np.concatenate([f_fit, features(x_pseudo, "pseudo")])
        y_fit = np.concatenate([y_fit, np.asarray(y_pseudo, dtype=np.int64)])
    probe = fit_probe(f_fit, y_fit, f_train, ds.num_classes, lp.l2_strength, max_iter=lp.max_iter,
                      device=features.device)
    save_probe(out / CLASSIFIER, probe, {
        **features.meta, "feature_dim": int(f_train.shape[1]), "l2_strength": lp.l2_strength,
        "num_classes": ds.num_classes, "in_channels": ds.image_shape[2], "image_size": ds.image_shape[0],
        "class_names": list(ds.class_names)})

    test_probs = probe_predict(probe, features(ds.test_images, "test")) if len(ds.test_images) else None
    metrics = _label_and_measure(ds, labeled_idx, out, probe_predict(probe, f_train), test_probs,
                                 "logistic regression at its optimum (no selection on the test split)")
    metrics["learner"] = "linear-probe"
    metrics["network"] = f"{lp.encoder} features + logistic regression"
    metrics["linear_probe"] = {**features.meta, "feature_dim": int(f_train.shape[1]),
                               "l2_strength": lp.l2_strength, "num_fit_images": int(len(y_fit)),
                               "fit_objective": fit_objective(probe, f_fit, y_fit, lp.l2_strength)}
    return metrics


def judge_agreement(cfg: ExperimentConfig, ds: Dataset, labeled_idx: np.ndarray, out: Path, device: torch.device,
                    x: np.ndarray, y: np.ndarray, *, feature_cache: Path, encoder_file: Path | None,
                    progress: bool = True) -> np.ndarray:
    """Which images (N,) bool an independent judge assigns to their class `y`: a logistic regression on the
    frozen `linear_probe.encoder` features of the labeled real images alone (it never sees a pseudo-label)."""
    features = _feature_fn(cfg, device, out, feature_cache, encoder_file, progress)
    lp = cfg.linear_probe
    f_train = features(ds.train_images, "train")
    judge = fit_probe(f_train[labeled_idx], ds.train_labels[labeled_idx], f_train, ds.num_classes,
                      lp.l2_strength, max_iter=lp.max_iter, device=device)
    return probe_predict(judge, features(x, "judged")).argmax(1) == np.asarray(y)


def _fit_and_label_graph(cfg: ExperimentConfig, ds: Dataset, labeled_idx: np.ndarray, out: Path, features,
                         x_pseudo: np.ndarray | None, y_pseudo: np.ndarray | None) -> dict:
    """The label-propagation learner: Poisson learning on the k-NN graph of the training images' features.

    Stage 3 adds the pseudo-images to the graph as labeled nodes whose sources weigh `stage3.pseudo_weight`
    each (a real label weighs 1). The class-size prior, enforced over the unlabeled real images, is the labeled
    nodes' class distribution (real + pseudo, weighted), or with `stage3.class_prior: real` the real labeled
    images' alone. Test images take the scores
    of their nearest graph nodes. The saved "classifier" is the graph's scores and node features with the
    encoder's identity (`api.load_classifier` predicts new images from it).
    """
    g = cfg.graph
    f_train = features(ds.train_images, "train")                           # (N, D)
    nodes, labeled, labels = f_train, np.asarray(labeled_idx), ds.train_labels[labeled_idx]
    strength, prior = np.ones(len(labeled)), None
    if x_pseudo is not None and len(x_pseudo):
        f_ps = features(x_pseudo, "pseudo")
        nodes = np.concatenate([f_train, f_ps])
        labeled = np.concatenate([labeled, len(f_train) + np.arange(len(f_ps))])
        labels = np.concatenate([labels, np.asarray(y_pseudo, dtype=np.int64)])
        strength = np.concatenate([strength, np.full(len(f_ps), cfg.stage3.pseudo_weight)])
        if cfg.stage3.class_prior == "real":
            prior = np.bincount(ds.train_labels[labeled_idx], minlength=ds.num_classes).astype(np.float64)
    pool = np.setdiff1d(np.arange(len(f_train)), labeled_idx)
    transform, whiten = {}, ({"whiten": g.whiten} if g.whiten else {})
    if g.whiten:                                          # fitted on the real training images, without labels
        mean, projection = graph.whitening(f_train, g.whiten)
        transform = {"whiten_mean": mean, "whiten_projection": projection}
        nodes = graph.whiten(nodes, mean, projection)
    result = graph.propagate(nodes, labeled, labels, ds.num_classes, k=g.k, max_iter=g.max_iter,
                             balanced=g.balanced, score_of=pool, strength=strength, prior=prior)
    scores = result["scores"]                                              # (N [+ P], C)
    tensors = {"scores": scores.float().contiguous(),                     # the nodes' features: for new images
               "features": torch.as_tensor(np.ascontiguousarray(nodes, np.float32)), **transform}
    save_weights(out / CLASSIFIER, tensors, {
        "network": "label-propagation", **features.meta, "k": g.k, **whiten, "num_classes": ds.num_classes,
        "num_nodes": int(len(nodes)), "in_channels": ds.image_shape[2], "image_size": ds.image_shape[0],
        "class_names": list(ds.class_names)}, "dualpseudo_graph")
    test_probs = None
    if len(ds.test_images):
        f_test = features(ds.test_images, "test")
        if transform:
            f_test = graph.whiten(f_test, transform["whiten_mean"], transform["whiten_projection"])
        test_probs = graph.probabilities(graph.predict_new(nodes, scores, f_test, g.k))
    metrics = _label_and_measure(ds, labeled_idx, out, graph.probabilities(scores[:len(f_train)]), test_probs,
                                 "Poisson learning at convergence (no selection on the test split)")
    metrics["learner"] = "label-propagation"
    metrics["network"] = f"{features.meta['encoder']} features + Poisson learning (k={g.k})"
    metrics["graph"] = {**features.meta, "k": g.k, "balanced": g.balanced, **whiten,
                        "iterations": result["iterations"],
                        "num_nodes": int(len(nodes)), "num_labeled_nodes": int(len(labeled)),
                        "pseudo_weight": cfg.stage3.pseudo_weight if len(labeled) > len(labeled_idx) else None,
                        "class_prior": cfg.stage3.class_prior if len(labeled) > len(labeled_idx) else None,
                        "class_offsets": result["offsets"].tolist()}
    return metrics


def label_metrics(label: np.ndarray, confidence: np.ndarray, is_labeled: np.ndarray, ds: Dataset) -> dict:
    """Pseudo-label quality on the unlabeled pool (true labels used for diagnostics only)."""
    pool = ~is_labeled
    if not ds.train_labels_known:              # a pool of unlabeled images: nothing to compare against
        report = {"num_images": int(pool.sum()), "accuracy": None,
                  "not_available": "the unlabeled images' true classes are unknown (data.name=pool)",
                  "predicted": np.bincount(label[pool], minlength=ds.num_classes).tolist()}
    else:
        report = pseudo_label_report(label, ds.train_labels, pool, ds.num_classes)
    report["mean_confidence"] = float(confidence[pool].mean()) if pool.any() else None
    return {"pseudo_labels": report}

"""Evaluation: Inception/domain feature extractors, FID with cached reference statistics, improved
precision/recall, class consistency of generated images, classification metrics."""
from .classification import (class_consistency, confusion_matrix, per_class_accuracy, pseudo_label_report,
                             to_predictions, top1)
from .domain import DomainFeatures, domain_feature_fn, uint8_to_signed_unit
from .features import as_nhwc_uint8, extract_features, interleave_shards, shard_indices
from .fid import (feature_stats, fid_from_features, fid_report, frechet_distance, reference_key,
                  reference_stats)
from .inception import (FEATURE_DIM, RESIZE_MODES, InceptionFeatures, default_inception_path,
                        inception_feature_fn, load_inception, preprocess, resize_tf_legacy)
from .prdc import knn_radii, precision_recall

__all__ = [
    "class_consistency", "confusion_matrix", "per_class_accuracy", "pseudo_label_report", "to_predictions", "top1",
    "DomainFeatures", "domain_feature_fn", "uint8_to_signed_unit",
    "as_nhwc_uint8", "extract_features", "interleave_shards", "shard_indices",
    "feature_stats", "fid_from_features", "fid_report", "frechet_distance", "reference_key", "reference_stats",
    "FEATURE_DIM", "RESIZE_MODES", "InceptionFeatures", "default_inception_path", "inception_feature_fn",
    "load_inception", "preprocess", "resize_tf_legacy",
    "knn_radii", "precision_recall",
]

"""Classification metrics on hand cases, and class consistency with a fake oracle."""
import warnings

import numpy as np
import pytest
import torch

from dualpseudo.evaluate.classification import (class_consistency, confusion_matrix, per_class_accuracy,
                                                pseudo_label_report, top1)

PRED = np.array([0, 0, 1, 2, 2, 2])
TRUE = np.array([0, 1, 1, 2, 2, 0])


def test_top1_from_predictions_and_probabilities():
    assert top1(PRED, TRUE) == pytest.approx(4 / 6)
    probs = np.eye(4)[PRED] * 0.7 + 0.05
    assert top1(probs, TRUE) == pytest.approx(4 / 6)
    assert top1(torch.tensor(probs), torch.tensor(TRUE)) == pytest.approx(4 / 6)


def test_confusion_matrix_and_per_class_accuracy():
    cm = confusion_matrix(PRED, TRUE, 4)
    np.testing.assert_array_equal(cm, [[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # no NaN / division warnings for the empty class
        assert per_class_accuracy(PRED, TRUE, 4) == [0.5, 0.5, 1.0, None]
    with pytest.raises(ValueError):
        confusion_matrix(np.array([4]), np.array([0]), 4)


def test_pseudo_label_report_by_hand():
    mask = np.array([1, 1, 1, 1, 1, 0], bool)                # last image is "labeled": excluded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = pseudo_label_report(PRED, TRUE, mask, 4)
    assert r["num_images"] == 5 and r["accuracy"] == pytest.approx(4 / 5)
    assert r["per_class_precision"] == [0.5, 1.0, 1.0, None]
    assert r["per_class_recall"] == [1.0, 0.5, 1.0, None]
    assert r["undefined_precision_classes"] == [3] and r["undefined_recall_classes"] == [3]
    assert r["balanced_accuracy"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    assert r["support"] == [1, 2, 2, 0] and r["predicted"] == [2, 1, 2, 0]


def test_class_consistency_with_fake_classifier():
    labels = np.array([0, 0, 1, 1, 1, 2, 2])
    images = np.repeat(labels * 10, 4 * 4).reshape(7, 4, 4, 1).astype(np.uint8)   # class c images have value 10c
    calls = []

    def oracle(batch):                                       # reads the class from the pixel value; calls 2 a 0
        calls.append(len(batch))
        c = batch.reshape(len(batch), -1).mean(axis=1).astype(int) // 10
        c[c == 2] = 0
        return np.eye(4)[c]

    r = class_consistency(oracle, images, labels, num_classes=4, batch_size=3)
    assert calls == [3, 3, 1]
    assert r["accuracy"] == pytest.approx(5 / 7)
    assert r["per_class_accuracy"] == [1.0, 1.0, 0.0, None]
    assert r["classes_without_samples"] == [3]
    assert r["mean_prob_of_label"] == pytest.approx(5 / 7)
    assert r["num_samples"] == 7

"""Contracts of the stage files (stages/files.py): names, on-disk schemas, round trips, old-format fallbacks, and
the ArtifactError that names its file."""
import json

import numpy as np
import pytest

from dualpseudo.artifacts import ArtifactError, concerning, load_npz, read_json, save_npz, write_json
from dualpseudo.manifest import write_manifest
from dualpseudo.stages import files
from dualpseudo.stages.files import Metrics, PseudoImages, PseudoLabels, Split, run_metrics, step_record, wall_time_s


def test_split_round_trip_keeps_the_on_disk_keys_and_order(tmp_path):
    labels = np.array([0, 1, 0, 1, 2, 2])
    split = Split.of(np.array([0, 3, 4]), labels, 3, "fp", 7, "1 per class, seed 7")
    path = split.save(tmp_path)
    assert path == tmp_path / "split.json"
    on_disk = json.loads(path.read_text())
    assert list(on_disk) == ["dataset_fingerprint", "seed", "source", "num_labeled", "per_class", "labeled_indices"]
    assert on_disk["per_class"] == {"0": [0], "1": [3], "2": [4]} and on_disk["num_labeled"] == 3
    assert Split.read(tmp_path) == split
    assert Split.read(tmp_path / "nothing") is None


def test_split_read_is_lenient_with_partial_files(tmp_path):
    write_json(tmp_path / "split.json", {"num_labeled": 4, "per_class": [1, 2]})
    split = Split.read(tmp_path)
    assert split.num_labeled == 4 and split.per_class is None and split.dataset_fingerprint is None


def test_pseudo_labels_round_trip(tmp_path):
    pl = PseudoLabels(np.array([1, 0], np.int64), np.array([0.5, 1.0], np.float32), np.array([False, True]))
    pl.save(tmp_path)
    z = load_npz(tmp_path / "pseudo_labels.npz")
    assert list(z) == ["label", "confidence", "is_labeled"]
    back = PseudoLabels.load(tmp_path)
    for k in ("label", "confidence", "is_labeled"):
        np.testing.assert_array_equal(getattr(back, k), getattr(pl, k))
        assert getattr(back, k).dtype == getattr(pl, k).dtype


def test_pseudo_images_round_trip_and_old_files(tmp_path):
    images = np.zeros((2, 4, 4, 1), np.uint8)
    PseudoImages(images, np.array([0, 1]), np.array([5, 6]), "heun", 6, 1.5).save(tmp_path)
    z = load_npz(tmp_path / "pseudo_images.npz")
    assert list(z) == ["images", "labels", "seeds", "sampler", "steps", "guidance_scale"]
    assert z["sampler"].dtype.kind == "U" and z["steps"].dtype == np.int64 and z["guidance_scale"].dtype == np.float64
    back = PseudoImages.load(tmp_path)
    assert (back.sampler, back.steps, back.guidance_scale) == ("heun", 6, 1.5)
    old = tmp_path / "old"
    save_npz(old / "pseudo_images.npz", images=images, labels=np.array([0, 1]))   # before the settings were saved
    back = PseudoImages.load(old)
    assert back.seeds is None and back.sampler is None and back.guidance_scale is None


def test_missing_or_damaged_files_raise_an_artifact_error_naming_the_file(tmp_path):
    with pytest.raises(ArtifactError) as e:
        PseudoLabels.load(tmp_path)
    assert e.value.path == tmp_path / "pseudo_labels.npz"
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(ArtifactError) as e:
        Metrics.load(tmp_path)
    assert e.value.path == tmp_path / "metrics.json" and str(tmp_path) in str(e.value)
    assert not Metrics.read(tmp_path) and Metrics.read(tmp_path).test_top1 is None


def test_concerning_names_the_file_only_when_the_raiser_did_not():
    with pytest.raises(ArtifactError) as e:
        with concerning("run/stage1/state.pt"):
            raise ArtifactError("refused")
    assert str(e.value.path) == "run/stage1/state.pt" and str(e.value) == "refused"
    with pytest.raises(ArtifactError) as e:
        with concerning("run/stage1/state.pt"):
            raise ArtifactError("other", "run/stage1/x.npz")
    assert str(e.value.path) == "run/stage1/x.npz"


CLASSIFIER_METRICS = {
    "pseudo_labels": {"accuracy": 0.75, "per_class_precision": [1.0, 0.5], "per_class_recall": [0.5, 1.0],
                      "confusion_matrix": [[1, 1], [0, 2]]},
    "test": {"top1": 0.5, "per_class_accuracy": [0.0, 1.0], "confusion": [[0, 2], [0, 2]], "num_images": 4},
    "learner": "freematch", "network": "cnn_small", "num_pseudo_images": 8, "delta_top1": -0.25}


def test_classifier_metrics_accessors(tmp_path):
    Metrics(CLASSIFIER_METRICS).save(tmp_path)
    assert read_json(tmp_path / "metrics.json") == CLASSIFIER_METRICS
    m = Metrics.load(tmp_path)
    assert (m.test_top1, m.learner, m.network, m.delta_top1, m.num_pseudo_images) == (0.5, "freematch", "cnn_small",
                                                                                     -0.25, 8)
    assert m.has_test and m.test_per_class_accuracy == [0.0, 1.0]
    assert m.test_confusion == [[0, 2], [0, 2]] and m.pseudo_label_confusion == [[1, 1], [0, 2]]
    assert m.pseudo_label_precision == [1.0, 0.5] and m.pseudo_label_recall == [0.5, 1.0]
    assert m.pseudo_labels_unavailable is None
    assert m.classifier_summary() == {"test_top1": 0.5, "pseudo_label_accuracy": 0.75}
    assert not Metrics({"pseudo_labels": {}}).has_test


def test_metrics_fallbacks_for_old_and_pool_runs():
    old = Metrics({"pseudo_labels": {"precision": [0.1], "recall": [0.2]}, "fid": 12.5, "num_samples": 40})
    assert old.pseudo_label_precision == [0.1] and old.pseudo_label_recall == [0.2]
    assert old.fid["fid"] == 12.5 and old.fid["num_samples"] == 40
    pool = Metrics({"pseudo_labels": {"accuracy": None, "not_available": "unknown classes"},
                    "not_available": {"class_consistency": "no oracle"}, "class_consistency": None})
    assert pool.pseudo_labels_unavailable == "unknown classes"
    assert pool.class_consistency_unavailable == "no oracle" and pool.class_consistency_accuracy is None


def test_evaluation_metrics_accessors():
    m = Metrics({"num_samples": 32, "sampler": "dpmpp_2m", "steps": 6, "guidance_scale": 1.0,
                 "oracle": {"test_top1": 0.9}, "domain_fd": 3.5,
                 "class_consistency": {"accuracy": 0.5, "per_class_accuracy": [0.5], "confusion_matrix": [[1]]},
                 "precision_recall": {"precision": 0.1, "recall": 0.2, "density": 0.3, "coverage": 0.4},
                 "fid": {"fid": 20.0, "num_reference": 100, "steps": 8}})
    assert m.fid == {"fid": 20.0, "num_reference": 100, "num_samples": 32, "sampler": "dpmpp_2m", "steps": 8,
                     "guidance_scale": 1.0}
    assert m.evaluation_summary() == {"fid": 20.0, "class_consistency": 0.5, "precision": 0.1, "recall": 0.2}
    assert (m.oracle_test_top1, m.domain_fd, m.precision_recall("coverage")) == (0.9, 3.5, 0.4)
    assert m.class_consistency_per_class == [0.5] and m.class_consistency_confusion == [[1]]
    assert Metrics({"class_consistency": None}).evaluation_summary() == {
        "fid": None, "class_consistency": None, "precision": None, "recall": None}


def test_run_metrics_and_manifest_record(tmp_path):
    Metrics({"test": {"top1": 1.0}}).save(tmp_path / "stage1")
    Metrics({"fid": None}).save(tmp_path / "evaluation")
    assert run_metrics(tmp_path) == {"stage1": {"test": {"top1": 1.0}}, "evaluation": {"fid": None}}
    Metrics.path(tmp_path / "evaluation").write_text("{\"fid\": ")            # cut short by a full disk
    with pytest.raises(ArtifactError, match="evaluation.*not valid JSON"):
        run_metrics(tmp_path)
    Metrics({"fid": None}).save(tmp_path / "evaluation")
    assert step_record({"a": 1}, 2.5) == {"wall_time_s": 2.5, "summary": {"a": 1}}
    assert list(step_record({"a": 1}, 2.5)) == ["wall_time_s", "summary"]
    assert step_record({"a": 1}) == {"summary": {"a": 1}}
    write_manifest(tmp_path / "stage1", "h", {}, [files.METRICS], step_record({}, 1.5))
    assert wall_time_s(tmp_path / "stage1") == 1.5 and wall_time_s(tmp_path / "evaluation") is None


def test_stage_outputs_are_the_manifest_file_lists():
    assert files.STAGE1_OUTPUTS == ("split.json", "classifier.safetensors", "pseudo_labels.npz", "metrics.json")
    assert files.STAGE2_OUTPUTS == ("pseudo_images.npz", "diffusion.safetensors", "grid.png")
    assert files.STAGE3_OUTPUTS == ("classifier.safetensors", "pseudo_labels.npz", "metrics.json")
    assert files.EVALUATION_OUTPUTS == ("metrics.json",)

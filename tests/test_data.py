import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from dualpseudo.config import DataConfig
from dualpseudo.data.datasets import DataError, load_dataset, make_synthetic, read_idx
from dualpseudo.data.splits import labeled_split, read_indices, split_record

from conftest import Evil, make_idx_dataset, write_idx

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader(tmp_path, gz):
    make_idx_dataset(tmp_path, gz=gz)
    ds = load_dataset(DataConfig(name="mnist", root=str(tmp_path)))
    assert ds.train_images.shape == (40, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_labels.shape == (10,) and ds.num_classes == 10
    assert len(ds.fingerprint) == 16


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(FMNIST), test_limit=100))
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (100, 28, 28, 1)
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10


def test_missing_file_names_it_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"missing .*train-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))


def test_truncated_and_corrupt_idx(tmp_path):
    make_idx_dataset(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)
    p.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(p)
    g = tmp_path / "x.gz"
    g.write_bytes(gzip.compress(b"abc" * 100)[:20])
    with pytest.raises(DataError, match="not a valid gzip"):
        read_idx(g)


def test_count_mismatch_and_label_range(tmp_path):
    make_idx_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(39) % 10)
    with pytest.raises(DataError, match="40 train images but 39 train labels"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(40, 12))
    with pytest.raises(DataError, match="label 12 is outside 0..9"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)))


def test_cifar10_batches_and_malicious_pickle(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (20, 3072)).astype(np.uint8), b"labels": [i % 10 for i in range(20)]}
        (root / name).write_bytes(pickle.dumps({k: v for k, v in d.items()}))
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert ds.train_images.shape == (100, 32, 32, 3) and ds.test_images.shape == (20, 32, 32, 3)

    (root / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match="test_batch is not a valid CIFAR-10 batch.*refusing"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert "pwned" not in capsys.readouterr().out, "the batch's pickled code never ran"
    (root / "test_batch").write_bytes(b"\x80\x04trunc")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


def test_image_folder_and_unreadable_image(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("test", 1)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((12, 12, 3), i * 40, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset(DataConfig(name="folder", root=str(tmp_path)))
    assert ds.train_images.shape == (6, 12, 12, 3) and ds.class_names == ("cat", "dog")
    assert ds.test_labels.tolist() == [0, 1]
    (tmp_path / "train" / "dog" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*dog/bad.png"):
        load_dataset(DataConfig(name="folder", root=str(tmp_path)))


def test_a_folder_mixing_grey_and_colour_becomes_rgb_whatever_comes_first(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((12, 12), 200, np.uint8)).save(tmp_path / split / cls / "0_grey.png")
    Image.fromarray(np.full((12, 12, 3), (255, 0, 0), np.uint8)).save(tmp_path / "test" / "b" / "1_red.png")
    ds = load_dataset(DataConfig(name="folder", root=str(tmp_path)))
    assert ds.train_images.shape[1:] == ds.test_images.shape[1:] == (12, 12, 3)   # a colour test image: all RGB
    assert (ds.train_images == 200).all()                                          # grey kept as grey RGB
    assert ds.test_images[-1, 0, 0].tolist() == [255, 0, 0]                        # red stays red


def test_image_folder_cache_is_a_memory_map_reused_until_a_file_changes(tmp_path, monkeypatch):
    import os

    from PIL import Image

    from dualpseudo.data import datasets

    root = tmp_path / "imgs"
    for split, n in (("train", 3), ("test", 1)):
        for c, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 10 * i + 100 * c, np.uint8)).save(root / split / cls / f"{i}.png")
    cfg = DataConfig(name="folder", root=str(root))
    plain = load_dataset(cfg)
    cached = load_dataset(cfg, cache_dir=tmp_path / "cache")
    assert isinstance(cached.train_images, np.memmap) and not cached.train_images.flags.writeable
    np.testing.assert_array_equal(cached.train_images, plain.train_images)
    np.testing.assert_array_equal(cached.test_labels, plain.test_labels)
    assert cached.fingerprint == plain.fingerprint and cached.image_shape == (8, 8, 1)
    assert len(list((tmp_path / "cache" / "data").glob("folder-*.npy"))) == 2          # train and test

    def no_decoding(*a, **k):
        raise AssertionError("decoded an image although the cache is valid")
    monkeypatch.setattr(datasets, "_read_image", no_decoding)
    again = load_dataset(cfg, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.train_images, plain.train_images)
    monkeypatch.undo()

    changed = root / "train" / "dog" / "0.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))                                        # a new mtime, whatever the clock
    fresh = load_dataset(cfg, cache_dir=tmp_path / "cache")
    assert int(fresh.train_images[3, 0, 0, 0]) == 7 and fresh.fingerprint != plain.fingerprint


def test_synthetic_is_deterministic():
    a, b = make_synthetic(seed=3), make_synthetic(seed=3)
    assert a.fingerprint == b.fingerprint and a.train_images.shape == (256, 16, 16, 1)
    assert make_synthetic(seed=4).fingerprint != a.fingerprint


def test_labeled_split_seeded_balanced_and_errors():
    labels = np.repeat(np.arange(5), 20)
    a = labeled_split(labels, 5, 3, seed=1)
    assert np.bincount(labels[a]).tolist() == [3] * 5
    assert np.array_equal(a, labeled_split(labels, 5, 3, seed=1))
    assert not np.array_equal(a, labeled_split(labels, 5, 3, seed=2))
    with pytest.raises(DataError, match="class 0 has 20 training images, fewer than labels_per_class=21"):
        labeled_split(labels, 5, 21, seed=0)
    with pytest.raises(DataError, match="labels_per_class must be >= 0"):
        labeled_split(labels, 5, -1, seed=0)
    pool = labels.copy()
    pool[::2] = -1                                   # a pool: unknown labels are never drawn; 0 takes every known one
    assert labeled_split(pool, 5, 0, seed=0).tolist() == np.flatnonzero(pool >= 0).tolist()
    assert (pool[labeled_split(pool, 5, 4, seed=0)] >= 0).all()
    with pytest.raises(DataError, match="class 0 has 10 labeled images, fewer than labels_per_class=11"):
        labeled_split(pool, 5, 11, seed=0)
    rec = split_record(a, labels, 5, "fp", 1, "x")
    assert rec["num_labeled"] == 15 and len(rec["per_class"]["4"]) == 3


def test_read_indices_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("5 3,9\n1")
    assert read_indices(tmp_path / "a.txt", 10).tolist() == [1, 3, 5, 9]
    (tmp_path / "b.json").write_text(json.dumps({"labeled_indices": [2, 0]}))
    assert read_indices(tmp_path / "b.json", 10).tolist() == [0, 2]
    (tmp_path / "c.txt").write_text("1 12")
    with pytest.raises(DataError, match="index 12 is outside"):
        read_indices(tmp_path / "c.txt", 10)
    (tmp_path / "d.txt").write_text("1 x")
    with pytest.raises(DataError, match="integer"):
        read_indices(tmp_path / "d.txt", 10)
    with pytest.raises(DataError, match="does not exist"):
        read_indices(tmp_path / "nope.txt", 10)

"""IDX reading, dataset loading errors, label splits and deterministic subsets."""

import gzip

import numpy as np
import pytest

from mtz_tf import data


def write_idx(path, array):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def test_read_idx_plain_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte.gz", images)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "a-idx3-ubyte.gz")), images)
    values = np.array([1, -5, 70000], dtype=np.int32)
    write_idx(tmp_path / "b", values)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "b")), values)


def test_read_idx_rejects_bad_and_truncated_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(str(tmp_path / "bad"))
    write_idx(tmp_path / "short", np.zeros((4, 2), np.uint8))
    raw = (tmp_path / "short").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(str(tmp_path / "short"))


def test_load_idx_directory(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5, dtype=np.uint8))
    images, labels = data.load("mnist", "test", data_dir=str(tmp_path), source="idx")
    assert images.shape == (5, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4]


def test_missing_data_names_both_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir.*TFDS"):
        data.load("mnist", "train", data_dir=str(tmp_path / "nowhere"), source="idx")


def test_real_fashion_mnist_is_there():
    images, labels = data.load("fashion_mnist", "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


def test_split_labels_remaps_and_filters():
    x = np.arange(10)[:, None]
    y = np.array([0, 5, 6, 1, 9, 5, 2, 7, 8, 3])
    x_sub, y_sub = data.split_labels(x, y, (5, 6, 7, 8, 9))
    assert x_sub[:, 0].tolist() == [1, 2, 4, 5, 7, 8]
    assert y_sub.tolist() == [0, 1, 4, 0, 2, 3]
    with pytest.raises(ValueError, match="distinct"):
        data.split_labels(x, y, (1, 1))


def test_subsets_and_splits_are_deterministic_and_disjoint():
    x = np.arange(100)
    a, b = data.calibration_subset(x, 10, seed=3), data.calibration_subset(x, 10, seed=3)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 10
    (x_train, _), (x_val, _) = data.train_validation_split(x, x, validation_size=20, seed=1)
    assert len(x_val) == 20 and not set(x_train.tolist()) & set(x_val.tolist())
    with pytest.raises(ValueError, match="must be positive"):
        data.calibration_subset(x, 0)


def test_training_stream_repeats_exactly_on_every_iterator():
    x = np.arange(10, dtype=np.float32)
    stream = data.training_stream(x, x.astype(np.int64), batch_size=4, seed=7)
    first = [b[0].numpy().tolist() for b in stream.take(6)]
    second = [b[0].numpy().tolist() for b in stream.take(6)]
    assert first == second
    epoch = sorted(v for batch in first[:2] for v in batch)
    assert len(set(epoch)) == 8  # no repeats within an epoch

"""Datasets: MNIST-format IDX files offline, TFDS when reachable, and the splits MTZ needs.

Images come back as ``uint8`` arrays of shape (N, 28, 28) and labels as ``int64`` arrays
of shape (N,); :func:`normalize` turns images into float32 network inputs. Everything else
(calibration subsets, disjoint label splits, validation splits, ``tf.data`` pipelines) is
deterministic given a seed.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package puts the Fashion-MNIST IDX files."""

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SUPPORTED_NAMES = ("fashion_mnist", "mnist")


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (optionally gzip-compressed) into a NumPy array.

    The IDX header is two zero bytes, a type code, the number of dimensions, then one
    big-endian uint32 per dimension; the data follow in row-major order.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path!r} is not an IDX file (bad magic number {raw[:4]!r}).")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f"{path!r} is truncated: its header announces shape {shape} "
            f"({int(np.prod(shape))} values) but it holds {data.size}."
        )
    return data.reshape(shape)


def _find_idx(data_dir: str, stem: str) -> str | None:
    for candidate in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    return None


def load_idx(data_dir: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of an MNIST-format dataset from a directory of IDX files.

    Args:
        data_dir: str, directory holding ``train-images-idx3-ubyte[.gz]`` and friends.
        split: str, ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)``: uint8 (N, 28, 28) and int64 (N,).
    """
    if split not in _IDX_FILES:
        raise ValueError(f"`split` must be one of {sorted(_IDX_FILES)}. Received: split={split!r}")
    paths = [_find_idx(data_dir, stem) for stem in _IDX_FILES[split]]
    if None in paths:
        missing = [s for s, p in zip(_IDX_FILES[split], paths) if p is None]
        raise FileNotFoundError(f"No IDX files {missing} (optionally .gz) in {data_dir!r}.")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"IDX files in {data_dir!r} do not form a dataset: images {images.shape}, "
            f"labels {labels.shape}."
        )
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _load_tfds(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds  # Imported lazily: slow, and only needed here.

    images, labels = tfds.as_numpy(
        tfds.load(name, split=split, batch_size=-1, as_supervised=True, data_dir=data_dir)
    )
    return images.reshape(images.shape[:3]).astype(np.uint8), labels.astype(np.int64)


def load(
    name: str = "fashion_mnist",
    split: str = "train",
    data_dir: str | None = None,
    source: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Loads ``mnist`` or ``fashion_mnist`` from IDX files or TFDS.

    Args:
        name: str, ``"fashion_mnist"`` or ``"mnist"``.
        split: str, ``"train"`` or ``"test"``.
        data_dir: str or None, a directory of IDX files. None means Debian's Fashion-MNIST
            location (:data:`DEFAULT_IDX_DIR`) for ``fashion_mnist``.
        source: str, ``"idx"``, ``"tfds"`` or ``"auto"`` (IDX files when present, else TFDS).

    Returns:
        ``(images, labels)``: uint8 (N, 28, 28) and int64 (N,).
    """
    if name not in _SUPPORTED_NAMES:
        raise ValueError(f"`name` must be one of {_SUPPORTED_NAMES}. Received: name={name!r}")
    if source not in ("auto", "idx", "tfds"):
        raise ValueError(f"`source` must be 'auto', 'idx' or 'tfds'. Received: source={source!r}")
    idx_dir = data_dir or (DEFAULT_IDX_DIR if name == "fashion_mnist" else None)
    idx_error = tfds_error = None
    if source in ("auto", "idx") and idx_dir is not None:
        try:
            return load_idx(idx_dir, split)
        except FileNotFoundError as e:
            idx_error = e
    if source in ("auto", "tfds"):
        try:
            return _load_tfds(name, split, None if source == "auto" else data_dir)
        except Exception as e:  # noqa: BLE001 - TFDS raises many kinds when offline.
            tfds_error = e
    raise FileNotFoundError(
        f"Could not load {name!r} ({split}). Either put MNIST-format IDX files in a directory "
        f"and pass it as `data_dir` / --data_dir"
        + (
            " (on Debian: `apt-get install dataset-fashion-mnist` puts Fashion-MNIST in "
            f"{DEFAULT_IDX_DIR})"
            if name == "fashion_mnist"
            else ""
        )
        + f", or let TFDS download it (`tfds.load({name!r})` needs the internet). "
        f"IDX: {idx_error or 'no directory given'}. TFDS: {tfds_error or 'not tried'}."
    )


def normalize(images: np.ndarray, scheme: str = "unit") -> np.ndarray:
    """Turns uint8 images (N, H, W) into float32 network inputs (N, H, W, 1).

    ``"unit"`` maps pixels to x/255 in [0, 1]; ``"symmetric"`` to (x/255 - 0.5)/0.5 in
    [-1, 1], the normalisation of the Neuron Merging reference code.
    """
    x = images.astype(np.float32)[..., None] / 255.0
    if scheme == "unit":
        return x
    if scheme == "symmetric":
        return (x - 0.5) / 0.5
    raise ValueError(f"`scheme` must be 'unit' or 'symmetric'. Received: scheme={scheme!r}")


def split_labels(
    x: np.ndarray, y: np.ndarray, classes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the samples whose label is in ``classes`` and remaps labels to 0..len-1.

    ``classes=(5, 6, 7, 8, 9)`` keeps labels 5-9 and maps them to 0-4, in that order.
    """
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"`classes` must be non-empty and distinct. Received: {classes}")
    lookup = np.full(max(int(y.max()), max(classes)) + 1, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    keep = lookup[y] >= 0
    return x[keep], lookup[y[keep]]


def train_validation_split(
    x: np.ndarray, y: np.ndarray, validation_size: int = 5000, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Splits off a seeded random validation set (for model selection; never the test set)."""
    if not 0 < validation_size < len(x):
        raise ValueError(f"`validation_size` must be in (0, {len(x)}). Received: {validation_size}")
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:validation_size], order[validation_size:]
    return (x[train], y[train]), (x[val], y[val])


def upsampled_rgb(x: np.ndarray, size: int = 32, batch: int = 4096) -> np.ndarray:
    """Grey images (N, H, W, 1) bilinearly resized to (N, size, size, 3), the grey value in
    every channel: the input ImageNet-style architectures (MobileNet, EfficientNet) expect.
    Float32, value range kept; converted ``batch`` images at a time."""
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(f"Expected grey images (N, H, W, 1). Received shape {x.shape}.")
    parts = [
        np.repeat(tf.image.resize(x[i : i + batch], (size, size)).numpy(), 3, axis=-1)
        for i in range(0, len(x), batch)
    ]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, size, size, 3))


def calibration_subset(x: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A deterministic random subset of ``size`` inputs (all of them if ``size >= len(x)``)."""
    if size <= 0:
        raise ValueError(f"`size` must be positive. Received: size={size}")
    if size >= len(x):
        return x
    order = np.random.default_rng(seed).permutation(len(x))[:size]
    return x[np.sort(order)]


def to_dataset(
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """A batched ``tf.data.Dataset`` of ``x`` (or ``(x, y)``), optionally seed-shuffled."""
    ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def dataset_inputs(dataset, input_shape: tuple, whose: str, what: str) -> tf.data.Dataset:
    """The input batches of ``dataset``, which yields batches of inputs or (inputs, labels)
    tuples, after checking from its ``element_spec`` alone that they have the shape
    (batch, *input_shape). ``whose`` and ``what`` name the data in errors, e.g.
    ``"task 'a'"`` and ``"calibration data"``."""
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"The {what} for {whose} must be a batched tf.data.Dataset, e.g. "
            f"`mtz_tf.data.to_dataset(x, y)`. Received: {type(dataset).__name__}"
        )
    spec = dataset.element_spec
    x_spec = spec[0] if isinstance(spec, tuple) else spec
    if not isinstance(x_spec, tf.TensorSpec):
        raise TypeError(
            f"The {what} for {whose} yields elements of structure {spec}; expected "
            "batches of inputs, or (inputs, labels) tuples. Map a dict dataset to that "
            "first, e.g. `dataset.map(lambda d: (d['image'], d['label']))`."
        )
    shape = tuple(x_spec.shape)
    if len(shape) != len(input_shape) + 1 or any(
        s is not None and s != e for s, e in zip(shape[1:], input_shape)
    ):
        raise ValueError(
            f"The {what} for {whose} yields inputs of shape {shape}; the model takes "
            f"batches of shape (batch, {', '.join(map(str, input_shape))}). Batch the "
            "dataset and give it inputs of the model's shape."
        )
    if isinstance(spec, tuple):
        return dataset.map(lambda *element: element[0])
    return dataset


def first_inputs(dataset: tf.data.Dataset, count: int, what: str = "dataset") -> np.ndarray:
    """The first ``count`` inputs (fewer if the dataset ends first) of a dataset of input
    batches or (inputs, labels) batches, as one array; ``what`` names it in errors."""
    batches, seen = [], 0
    for element in dataset:
        x = element[0] if isinstance(element, (tuple, list)) else element
        batches.append(np.asarray(x))
        seen += len(batches[-1])
        if seen >= count:
            break
    if not batches:
        raise ValueError(f"The {what} is an empty dataset: no inputs to read.")
    return np.concatenate(batches)[:count]


def training_stream(x: np.ndarray, y: np.ndarray, batch_size: int = 32, seed: int = 0):
    """An endless, reshuffled stream of ``(x, y)`` batches that repeats exactly.

    Epoch e visits the samples in the order argsort(u) with u drawn by a stateless RNG
    from ``(seed, e)``, so every new iterator yields the same batches in the same order,
    in this process or another one. ``Retrain`` relies on that to resume an interrupted
    zip exactly (a seeded ``shuffle`` reshuffles differently on every new iterator).
    """
    n = len(x)
    if n == 0:
        raise ValueError("`x` is empty: a training stream needs at least one sample.")
    x, y = tf.constant(x), tf.constant(y)

    def epoch(e):
        u = tf.random.stateless_uniform([n], seed=tf.stack([tf.constant(seed, tf.int64), e]))
        return tf.data.Dataset.from_tensor_slices(tf.argsort(u))

    indices = tf.data.Dataset.counter().flat_map(epoch)
    return (
        indices.batch(batch_size, drop_remainder=True)
        .map(lambda i: (tf.gather(x, i), tf.gather(y, i)))
        .prefetch(tf.data.AUTOTUNE)
    )


def load_task(
    name: str = "fashion_mnist",
    classes: Sequence[int] | None = None,
    data_dir: str | None = None,
    validation_size: int = 5000,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train/validation/test arrays of one task, normalised to [0, 1] (N, 28, 28, 1).

    Args:
        name: str, ``"fashion_mnist"`` or ``"mnist"``.
        classes: optional label subset; labels are remapped to 0..len(classes)-1.
        data_dir: optional IDX directory (see :func:`load`).
        validation_size: int, samples split off the training set (seeded) for selection.
        seed: int, seeds the validation split.

    Returns:
        {"train": (x, y), "validation": (x, y), "test": (x, y)}.
    """
    splits = {}
    for split in ("train", "test"):
        images, labels = load(name, split, data_dir)
        x = normalize(images)
        if classes is not None:
            x, labels = split_labels(x, labels, classes)
        splits[split] = (x, labels)
    size = min(validation_size, len(splits["train"][0]) // 10)
    splits["train"], splits["validation"] = train_validation_split(*splits["train"], size, seed)
    return splits

"""Dataset loaders: each format is checked on tiny files written here in that exact format."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clbench.data.datasets as D
from clbench.data import load_dataset
from clbench.registry import DATASETS, ClbenchError
from conftest import DATA_ROOT

SHARED_DATA = DATA_ROOT


# --------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime, to prove a loader wrote nothing there."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def write_idx(path: Path, array: np.ndarray) -> None:
    data = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def fake_idx(folder: Path, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """The 4 idx files with 3 train and 2 test 5x4 images (sizes need not be 28x28 for the parser)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (3, 5, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([3, 0, 9], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (2, 5, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([1, 1], dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), array)
    return arrays


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def flat(colour: tuple[int, int, int], size: int) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (size, size, 3)).copy()


def assert_colours(x: torch.Tensor, colours: list[tuple[int, int, int]]) -> None:
    """Each (lossy JPEG) flat-colour image decodes to its colour within 3 levels."""
    assert x.shape[0] == len(colours)
    for image, colour in zip(x, colours):
        assert (image.int() - torch.tensor(colour).view(3, 1, 1)).abs().max() <= 3


def make_tar(archive: Path, folder: Path, arcname: str) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname)


def stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    values = x.double() / 255
    return values.mean((0, 2, 3)).tolist(), values.std((0, 2, 3), unbiased=False).tolist()


def assert_stats(dataset) -> None:
    mean, std = stats(dataset.train.x)
    assert dataset.mean == pytest.approx(mean, abs=1e-9) and dataset.std == pytest.approx(std, abs=1e-9)


# --------------------------------------------------------------------------- digits


def test_all_loaders_are_registered():
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "tiny_imagenet", "image_folder"} <= set(DATASETS.names())
    assert all(e.description for e in DATASETS.entries())


def test_digits_split_is_stratified_fixed_and_typed(tmp_path):
    first = load_dataset("digits", cache_dir=str(tmp_path))
    second = D.load_digits(root="/nonexistent")
    assert (len(first.train), len(first.test)) == (1438, 359)
    assert first.image_shape == (1, 8, 8) and first.class_names == tuple("0123456789")
    assert first.train.x.dtype == torch.uint8 and first.train.y.dtype == torch.int64
    per_class = Counter(first.train.y.tolist()) + Counter(first.test.y.tolist())
    assert Counter(first.test.y.tolist()) == {c: round(0.2 * n) for c, n in per_class.items()}
    for a, b in ((first.train, second.train), (first.test, second.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert first.train.x.max() == 255
    assert_stats(first)
    assert list(tmp_path.iterdir()) == []  # no cache for the built-in set


def test_digits_pixels_match_scikit_learn():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    assert np.array_equal(D._digits_table(), np.column_stack([bunch.data, bunch.target]))
    dataset = D.load_digits()
    rows = lambda x, y: Counter(bytes(i.flatten().tolist()) + bytes([int(t)]) for i, t in zip(x, y))  # noqa: E731
    expected = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    assert rows(dataset.train.x, dataset.train.y) + rows(dataset.test.x, dataset.test.y) == rows(expected, bunch.target)


# --------------------------------------------------------------------------- mnist / fashion-mnist (idx)


@pytest.mark.parametrize(
    "loader, subfolder, gz",
    [
        (D.load_mnist, "", False),
        (D.load_mnist, "raw", True),
        (D.load_mnist, "MNIST/raw", True),
        (D.load_fashion_mnist, "", True),
        (D.load_fashion_mnist, "FashionMNIST/raw", False),
    ],
)
def test_idx_loaders_read_files_exactly(tmp_path, loader, subfolder, gz):
    root = tmp_path / "data"
    arrays = fake_idx(root / subfolder, gz)
    before = snapshot(root)
    dataset = loader(root=str(root), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(dataset.train.x, torch.from_numpy(arrays["train-images-idx3-ubyte"]).unsqueeze(1))
    assert torch.equal(dataset.test.x, torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).unsqueeze(1))
    assert dataset.train.y.tolist() == [3, 0, 9] and dataset.test.y.tolist() == [1, 1]
    assert dataset.num_classes == 10
    assert dataset.class_names[0] == ("0" if loader is D.load_mnist else "T-shirt/top")
    assert_stats(dataset)
    assert snapshot(root) == before


def test_idx_bad_magic_names_the_file(tmp_path):
    fake_idx(tmp_path, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((3, 2), dtype=np.uint8))  # 2-d: wrong magic
    with pytest.raises(ClbenchError, match="train-labels-idx1-ubyte.gz.*magic"):
        D.load_mnist(root=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_idx_label_count_mismatch(tmp_path):
    fake_idx(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2, 3], dtype=np.uint8))
    with pytest.raises(ClbenchError, match="t10k-labels-idx1-ubyte: 3 labels for 2 images"):
        D.load_mnist(root=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_cache_is_created_reused_and_keyed_by_the_files(tmp_path, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "cache"
    fake_idx(root, gz=True)
    first = D.load_mnist(root=str(root), cache_dir=str(cache))
    assert [p.suffix for p in cache.iterdir()] == [".pt"]  # one file, no temporary left behind

    def no_parsing(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(D, "_parse_idx", no_parsing)
    second = D.load_mnist(root=str(root), cache_dir=str(cache))
    assert torch.equal(first.train.x, second.train.x) and first.mean == second.mean
    assert second.class_names == first.class_names

    os.utime(root / "t10k-images-idx3-ubyte.gz", ns=(1, 1))  # a changed source file is decoded again
    with pytest.raises(AssertionError, match="decoded although cached"):
        D.load_mnist(root=str(root), cache_dir=str(cache))


def test_cache_dir_defaults_to_env_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "env-cache"
    fake_idx(root, gz=False)
    monkeypatch.setenv("CLBENCH_CACHE", str(cache))
    D.load_mnist(root=str(root))
    (cached,) = cache.iterdir()
    cached.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        dataset = D.load_mnist(root=str(root))
    assert len(dataset.train) == 3
    assert D.load_mnist(root=str(root)).train.y.tolist() == [3, 0, 9]  # rewritten and readable


@pytest.mark.parametrize("name, subfolder", [("mnist", "mnist"), ("fashion_mnist", "fashion-mnist")])
def test_real_idx_files(tmp_path, name, subfolder):
    root = SHARED_DATA / subfolder
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no real {name} files in {root}")
    dataset = load_dataset(name, root=str(root), cache_dir=str(tmp_path))
    assert (len(dataset.train), len(dataset.test)) == (60000, 10000)
    assert dataset.image_shape == (1, 28, 28) and dataset.num_classes == 10
    if name == "mnist":
        assert dataset.mean[0] == pytest.approx(0.1307, abs=1e-4) and dataset.std[0] == pytest.approx(0.3081, abs=1e-4)
    else:
        assert torch.bincount(dataset.test.y).tolist() == [1000] * 10


# --------------------------------------------------------------------------- cifar10 (python batches)


def fake_cifar_batches(folder: Path, seed: int = 0) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """The 6 official batch pickles with 2 images each, and batches.meta."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i, name in enumerate(D._CIFAR_BATCHES):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = [i % 10, (i + 5) % 10]
        (folder / name).write_bytes(pickle.dumps({b"batch_label": name.encode(), b"data": data, b"labels": labels}, 2))
        xs.append(data)
        ys.append(labels)
    meta = {b"label_names": [n.encode() for n in D.CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, 2))
    train_x = np.concatenate(xs[:5]).reshape(-1, 3, 32, 32)
    return train_x, sum(ys[:5], []), xs[5].reshape(-1, 3, 32, 32), ys[5]


@pytest.mark.parametrize("layout", ["flat", "subfolder", "tar"])
def test_cifar10_python_batches(tmp_path, layout):
    root = tmp_path / "data"
    source = root if layout == "flat" else root / "cifar-10-batches-py"
    train_x, train_y, test_x, test_y = fake_cifar_batches(source)
    if layout == "tar":
        make_tar(root / "cifar-10-python.tar.gz", source, "cifar-10-batches-py")
        for f in source.iterdir():
            f.unlink()
        source.rmdir()
    before = snapshot(root)
    dataset = D.load_cifar10(root=str(root), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(dataset.train.x, torch.from_numpy(train_x)) and dataset.train.y.tolist() == train_y
    assert torch.equal(dataset.test.x, torch.from_numpy(test_x)) and dataset.test.y.tolist() == test_y
    assert dataset.class_names == D.CIFAR10_CLASSES
    assert_stats(dataset)
    assert snapshot(root) == before


# --------------------------------------------------------------------------- cifar10 (JPEG class folders)


def fake_class_folders(top: Path, classes, per_split: dict[str, int], size: int, suffix=".jpg"):
    """<top>/<split>/<class>/NNNN.jpg flat-colour JPEGs; returns the colours in loader order."""
    colours: dict[str, list] = {}
    for s, (split, count) in enumerate(per_split.items()):
        colours[split] = []
        for c, name in enumerate(classes):
            (top / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour = (20 * c + 10, 60 * s + 40 * i + 20, 200 - 15 * c)
                (top / split / name / f"{i:04d}{suffix}").write_bytes(encode(flat(colour, size)))
                colours[split].append(colour)
    return colours


@pytest.mark.parametrize("layout", ["root", "CIFAR-10-images", "tar"])
def test_cifar10_jpeg_folders(tmp_path, layout, monkeypatch):
    root = tmp_path / "data"
    top = root if layout == "root" else root / "CIFAR-10-images"
    colours = fake_class_folders(top, D.CIFAR10_CLASSES, {"train": 2, "test": 1}, 32)
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in D.CIFAR10_CLASSES]}, 2))
    if layout == "tar":
        (top / "README.md").write_text("not an image")
        make_tar(root / "CIFAR-10-images-jpg.tar.gz", top, "CIFAR-10-images")
        for f in sorted(top.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        top.rmdir()
    before = snapshot(root)
    dataset = D.load_cifar10(root=str(root), cache_dir=str(tmp_path / "cache"))
    assert dataset.class_names == D.CIFAR10_CLASSES and dataset.image_shape == (3, 32, 32)
    assert dataset.train.y.tolist() == [c for c in range(10) for _ in range(2)]
    assert dataset.test.y.tolist() == list(range(10))
    assert_colours(dataset.train.x, colours["train"])
    assert_colours(dataset.test.x, colours["test"])
    assert_stats(dataset)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(D, "_decode_images", no_decoding)
    again = D.load_cifar10(root=str(root), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(again.train.x, dataset.train.x) and again.class_names == dataset.class_names
    assert snapshot(root) == before


def test_cifar10_jpeg_checks_classes_against_batches_meta(tmp_path):
    fake_class_folders(tmp_path / "CIFAR-10-images", D.CIFAR10_CLASSES, {"train": 1, "test": 1}, 32)
    names = [n.encode() for n in D.CIFAR10_CLASSES]
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": names[1:] + names[:1]}, 2))
    with pytest.raises(ClbenchError, match="class folders"):
        D.load_cifar10(root=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_cifar10_jpeg_wrong_image_size_and_missing_class(tmp_path):
    top = tmp_path / "a" / "CIFAR-10-images"
    fake_class_folders(top, D.CIFAR10_CLASSES, {"train": 1, "test": 1}, 32)
    (top / "test" / "cat" / "0000.jpg").write_bytes(encode(flat((1, 2, 3), 30)))
    with pytest.raises(ClbenchError, match=r"test/cat/0000.jpg is 30x30 \(HxW\), expected 32x32"):
        D.load_cifar10(root=str(tmp_path / "a"), cache_dir=str(tmp_path / "cache"))
    fake_class_folders(tmp_path / "b", D.CIFAR10_CLASSES[:9], {"train": 1, "test": 1}, 32)
    with pytest.raises(ClbenchError, match="class folders"):
        D.load_cifar10(root=str(tmp_path / "b"), cache_dir=str(tmp_path / "cache"))


# --------------------------------------------------------------------------- tiny-imagenet


def fake_tiny_imagenet(top: Path) -> tuple[list, list, list, list]:
    """3 classes (wnids.txt unsorted), 2 train images each (one grayscale), 4 val images."""
    wnids = ["n03000003", "n01000001", "n02000002"]
    top.mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (top / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in wnids))
    train_colours, train_labels = [], []
    for label, wnid in enumerate(sorted(wnids)):
        images = top / "train" / wnid / "images"
        images.mkdir(parents=True)
        (top / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
        for i in range(2):
            colour = (40 * label + 20, 100 + 50 * i, 30)
            if label == 1 and i == 1:  # a grayscale JPEG, as in the real set
                colour = (90, 90, 90)
                data = encode(np.full((64, 64), 90, dtype=np.uint8))
            else:
                data = encode(flat(colour, 64))
            (images / f"{wnid}_{i}.JPEG").write_bytes(data)
            train_colours.append(colour)
            train_labels.append(label)
    (top / "val" / "images").mkdir(parents=True)
    val_colours, val_labels, lines = [], [], []
    for i, wnid in enumerate(["n02000002", "n03000003", "n01000001", "n02000002"]):
        colour = (200, 20 * i, 100)
        (top / "val" / "images" / f"val_{i}.JPEG").write_bytes(encode(flat(colour, 64)))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
        val_colours.append(colour)
        val_labels.append(sorted(wnids).index(wnid))
    (top / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return train_colours, train_labels, val_colours, val_labels


@pytest.mark.parametrize("layout", ["root", "subfolder", "tar"])
def test_tiny_imagenet(tmp_path, layout, monkeypatch):
    root = tmp_path / "data"
    top = root if layout == "root" else root / "tiny-imagenet-200"
    train_colours, train_labels, val_colours, val_labels = fake_tiny_imagenet(top)
    if layout == "tar":
        make_tar(root / "tiny-imagenet-200.tar.gz", top, "tiny-imagenet-200")
        for f in sorted(top.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        top.rmdir()
    before = snapshot(root)
    dataset = D.load_tiny_imagenet(root=str(root), cache_dir=str(tmp_path / "cache"))
    assert dataset.class_names == ("n01000001", "n02000002", "n03000003")
    assert dataset.image_shape == (3, 64, 64)
    assert dataset.train.y.tolist() == train_labels and dataset.test.y.tolist() == val_labels
    assert_colours(dataset.train.x, train_colours)
    assert_colours(dataset.test.x, val_colours)
    assert_stats(dataset)
    monkeypatch.setattr(D, "_decode_images", lambda *a, **k: pytest.fail("decoded although cached"))
    assert torch.equal(D.load_tiny_imagenet(root=str(root), cache_dir=str(tmp_path / "cache")).test.x, dataset.test.x)
    assert snapshot(root) == before


def test_jpegs_decode_alike_without_torchvision_decoder(tmp_path, monkeypatch):
    """PIL takes over when torchvision drops decode_jpeg (announced in 0.29)."""
    import torchvision.io

    images = [encode(flat((10 * i, 200 - 10 * i, 7), 16)) for i in range(5)]
    images.append(encode(np.arange(256, dtype=np.uint8).reshape(16, 16)))  # grayscale, not flat
    names = [f"{i}.jpg" for i in range(len(images))]
    fast = D._decode_images(images, names)
    monkeypatch.delattr(torchvision.io, "decode_jpeg")
    pil, used = D._decode_with_pil, []
    monkeypatch.setattr(D, "_decode_with_pil", lambda data, name: used.append(name) or pil(data, name))
    slow = D._decode_images(images, names)
    assert used == names
    assert fast.shape == slow.shape == (6, 3, 16, 16)
    assert (fast.int() - slow.int()).abs().max() <= 1


def test_tiny_imagenet_bad_annotation(tmp_path):
    fake_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    with open(tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt", "a") as f:
        f.write("val_9.JPEG\tn01000001\t0\t0\t1\t1\n")
    with pytest.raises(ClbenchError, match="bad line.*val_9.JPEG"):
        D.load_tiny_imagenet(root=str(tmp_path), cache_dir=str(tmp_path / "cache"))


# --------------------------------------------------------------------------- image_folder


def test_image_folder_reads_pngs_exactly(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    expected: dict[str, list] = {"train": [], "val": []}
    for split, classes in (("train", ["zebra", "ant"]), ("val", ["zebra"])):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            (root / split / name / ".DS_Store").write_bytes(b"junk")
            for i in range(2):
                array = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
                (root / split / name / f"{i}.png").write_bytes(encode(array, "PNG"))
                expected[split].append((name, array))
    gray = rng.integers(0, 256, (5, 4), dtype=np.uint8)
    (root / "train" / "ant" / "2.png").write_bytes(encode(gray, "PNG"))
    expected["train"].append(("ant", np.repeat(gray[:, :, None], 3, axis=2)))
    before = snapshot(root)
    dataset = load_dataset("image_folder", root=str(root), cache_dir=str(tmp_path / "cache"))
    assert dataset.class_names == ("ant", "zebra")
    order = {"ant": 0, "zebra": 1}
    for split, key in ((dataset.train, "train"), (dataset.test, "val")):
        items = sorted(expected[key], key=lambda item: order[item[0]])  # stable: file order within a class
        assert split.y.tolist() == [order[name] for name, _ in items]
        assert torch.equal(split.x, torch.from_numpy(np.stack([a for _, a in items])).permute(0, 3, 1, 2))
    assert_stats(dataset)
    assert snapshot(root) == before


def test_image_folder_errors(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "0.png").write_bytes(encode(np.zeros((4, 4, 3), np.uint8), "PNG"))
    (root / "train" / "a" / "1.png").write_bytes(encode(np.zeros((4, 6, 3), np.uint8), "PNG"))
    with pytest.raises(ClbenchError, match=r"train/a/1.png is 4x6 \(HxW\), but .*train/a/0.png is 4x4"):
        load_dataset("image_folder", root=str(root), cache_dir=str(tmp_path / "cache"))
    (root / "train" / "a" / "1.png").unlink()
    (root / "test" / "b").mkdir()
    (root / "test" / "b" / "0.png").write_bytes(encode(np.zeros((4, 4, 3), np.uint8), "PNG"))
    with pytest.raises(ClbenchError, match=r"class folder\(s\) \['b'\] are not among the train classes"):
        load_dataset("image_folder", root=str(root), cache_dir=str(tmp_path / "cache"))
    (root / "test" / "b" / "0.png").write_bytes(b"\xff\xd8\xff broken jpeg")
    (root / "test" / "b" / "0.png").rename(root / "test" / "a" / "1.jpg")
    with pytest.raises(ClbenchError, match="cannot decode image .*test/a/1.jpg"):
        load_dataset("image_folder", root=str(root), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ClbenchError, match="needs a root"):
        load_dataset("image_folder")
    with pytest.raises(ClbenchError, match="train/<class>"):
        load_dataset("image_folder", root=str(tmp_path / "nothing"))


# --------------------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    "name, expected_file",
    [
        ("mnist", "train-images-idx3-ubyte"),
        ("fashion_mnist", "t10k-labels-idx1-ubyte"),
        ("cifar10", "CIFAR-10-images-jpg.tar.gz"),
        ("tiny_imagenet", "val_annotations.txt"),
    ],
)
def test_missing_files_say_where_and_what(tmp_path, monkeypatch, name, expected_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ClbenchError) as info:
        load_dataset(name, root=str(empty), cache_dir=str(tmp_path / "cache"))
    message = str(info.value)
    assert str(empty) in message and expected_file in message and "CLBENCH_DATA_ROOT" in message

    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(tmp_path / "env-root"))
    with pytest.raises(ClbenchError, match=str(tmp_path / "env-root")):
        load_dataset(name, cache_dir=str(tmp_path / "cache"))

    monkeypatch.delenv("CLBENCH_DATA_ROOT")
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    with pytest.raises(ClbenchError, match=str(tmp_path / "shared" / "data")):
        load_dataset(name, cache_dir=str(tmp_path / "cache"))
    assert list(tmp_path.glob("cache/*")) == []


def test_data_root_env_finds_the_default_subfolder(tmp_path, monkeypatch):
    arrays = fake_idx(tmp_path / "fashion-mnist", gz=True)
    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(tmp_path))
    dataset = load_dataset("fashion_mnist", cache_dir=str(tmp_path / "cache"))
    assert torch.equal(dataset.test.x[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))

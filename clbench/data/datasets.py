"""The built-in dataset loaders: ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``,
``tiny_imagenet`` and ``image_folder``.

Each loader reads the dataset's official file layout (folders or archives, never
extracting anything) and returns an :class:`~clbench.data.types.ImageDataset` of uint8
tensors.  File-based datasets are decoded once and then reloaded from the cache
(:mod:`clbench.data.cache`).  Without ``root`` a loader looks in
``$CLBENCH_DATA_ROOT/<subfolder>``, or ``../shared/data/<subfolder>`` when that variable is
unset.  Missing or broken files raise :class:`~clbench.registry.ClbenchError` naming the
paths searched and the layout expected.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import os
import struct
import tarfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clbench.data.cache import cached_dataset
from clbench.data.types import ImageDataset, ImageSplit
from clbench.registry import ClbenchError, register_dataset
from clbench.safe_load import load_data_pickle

DATA_ROOT_ENV = "CLBENCH_DATA_ROOT"

DIGIT_CLASSES = tuple("0123456789")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
_CIFAR_FILES = (*_CIFAR_BATCHES, "batches.meta")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0  # fixed: the digits split never depends on the run seed
_DECODE_CHUNK = 1024  # images per batched decode_jpeg call


# --------------------------------------------------------------------------- loaders


@register_dataset("digits", description="scikit-learn's 8x8 handwritten digits (1797 images, no files needed)")
def load_digits(root: str | None = None, cache_dir: str | None = None) -> ImageDataset:
    """scikit-learn's digits with a fixed stratified 80/20 split; ``root`` and ``cache_dir`` are ignored."""
    table = _digits_table()
    x = torch.from_numpy(np.rint(table[:, :64] * (255 / 16)).astype(np.uint8)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(table[:, 64].astype(np.int64))
    generator = torch.Generator().manual_seed(_DIGITS_SPLIT_SEED)
    test_parts = []
    for label in range(10):
        members = torch.nonzero(y == label).flatten()
        n_test = round(_DIGITS_TEST_FRACTION * len(members))
        test_parts.append(members[torch.randperm(len(members), generator=generator)[:n_test]])
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[torch.cat(test_parts)] = True
    return _make_dataset("digits", x[~is_test], y[~is_test], x[is_test], y[is_test], DIGIT_CLASSES)


@register_dataset("mnist", description="MNIST handwritten digits, 28x28 grayscale (the 4 official idx files)")
def load_mnist(root: str | None = None, cache_dir: str | None = None) -> ImageDataset:
    """MNIST from its idx files (gzipped or not) in ``root``, ``root/raw`` or ``root/MNIST/raw``."""
    return _load_idx_dataset("mnist", root, cache_dir, "mnist", "MNIST", DIGIT_CLASSES)


@register_dataset("fashion_mnist", description="Fashion-MNIST clothing, 28x28 grayscale (the 4 official idx files)")
def load_fashion_mnist(root: str | None = None, cache_dir: str | None = None) -> ImageDataset:
    """Fashion-MNIST from its idx files in ``root``, ``root/raw`` or ``root/FashionMNIST/raw``."""
    return _load_idx_dataset("fashion_mnist", root, cache_dir, "fashion-mnist", "FashionMNIST", FASHION_MNIST_CLASSES)


@register_dataset("cifar10", description="CIFAR-10, 32x32 RGB (official python batches or the JPEG class folders)")
def load_cifar10(root: str | None = None, cache_dir: str | None = None) -> ImageDataset:
    """CIFAR-10 from the official python batches (folder or ``cifar-10-python.tar.gz``), else from
    ``CIFAR-10-images/{train,test}/<class>/*.jpg`` (folder or ``CIFAR-10-images-jpg.tar.gz``)."""
    searched: list[Path] = []
    for base in _search_bases(root, ("cifar10-jpeg", "cifar-10-batches-py")):
        for folder in (base, base / "cifar-10-batches-py"):
            searched.append(folder)
            if all((folder / name).is_file() for name in _CIFAR_BATCHES):
                return _load_cifar10_batches(_Files(folder, _CIFAR_FILES), cache_dir)
        searched.append(base / "cifar-10-python.tar.gz")
        if searched[-1].is_file():
            return _load_cifar10_batches(_Files(searched[-1], _CIFAR_FILES, "cifar-10-batches-py/"), cache_dir)
        for folder in (base, base / "CIFAR-10-images"):
            searched.append(folder)
            if (folder / "train").is_dir() and (folder / "test").is_dir():
                return _load_cifar10_jpeg(_Files(folder, ("train", "test")), base / "batches.meta", cache_dir)
        searched.append(base / "CIFAR-10-images-jpg.tar.gz")
        if searched[-1].is_file():
            files = _Files(searched[-1], ("train", "test"), "CIFAR-10-images/")
            return _load_cifar10_jpeg(files, base / "batches.meta", cache_dir)
    raise _not_found(
        "cifar10",
        searched,
        "either the official python batches (" + ", ".join(_CIFAR_BATCHES) + ", batches.meta) in a folder or in "
        "cifar-10-python.tar.gz, or JPEGs as CIFAR-10-images/{train,test}/<class>/*.jpg in a folder or in "
        "CIFAR-10-images-jpg.tar.gz",
        "cifar10-jpeg",
    )


@register_dataset("tiny_imagenet", description="Tiny-ImageNet-200, 64x64 RGB, 200 classes (val is the test split)")
def load_tiny_imagenet(root: str | None = None, cache_dir: str | None = None) -> ImageDataset:
    """Tiny-ImageNet-200 (official layout, folder or ``tiny-imagenet-200.tar.gz``); class names are the wnids."""
    searched: list[Path] = []
    for base in _search_bases(root, ("tiny-imagenet-200",)):
        for folder in (base, base / "tiny-imagenet-200"):
            searched.append(folder)
            if (folder / "wnids.txt").is_file():
                return _load_tiny_imagenet_files(_Files(folder, ("wnids.txt", "train", "val")), cache_dir)
        searched.append(base / "tiny-imagenet-200.tar.gz")
        if searched[-1].is_file():
            files = _Files(searched[-1], ("wnids.txt", "train", "val"), "tiny-imagenet-200/")
            return _load_tiny_imagenet_files(files, cache_dir)
    raise _not_found(
        "tiny_imagenet",
        searched,
        "tiny-imagenet-200/ (a folder or tiny-imagenet-200.tar.gz) holding wnids.txt, train/<wnid>/images/*.JPEG, "
        "val/images/*.JPEG and val/val_annotations.txt",
        "tiny-imagenet-200",
    )


@register_dataset("image_folder", description="any root/{train,test}/<class>/<image> tree of equal-size images")
def load_image_folder(root: str | None = None, cache_dir: str | None = None) -> ImageDataset:
    """An ImageFolder-style tree: ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``root/val``).

    Class ids follow the sorted train class folders; images are converted to RGB and must all
    have the same size.
    """
    if root is None:
        raise ClbenchError("dataset 'image_folder' needs a root folder holding train/<class>/* and test/<class>/*")
    folder = Path(root).expanduser()
    test = "test" if (folder / "test").is_dir() else "val"
    if not ((folder / "train").is_dir() and (folder / test).is_dir()):
        raise _not_found(
            "image_folder",
            [folder / "train", folder / "test", folder / "val"],
            "train/<class>/<image> and test/<class>/<image> (or val/<class>/<image>), images of one size",
        )
    files = _Files(folder, ("train", test))

    def build() -> ImageDataset:
        data = files.read()
        classes = tuple(sorted({name.split("/")[1] for name in data if _is_class_image(name, "train")}))
        if not classes:
            raise ClbenchError(f"image_folder: no images in {folder / 'train'}/<class>/")
        train_x, train_y = _class_folder_split(files, data, "train", classes)
        test_x, test_y = _class_folder_split(files, data, test, classes, size=tuple(train_x.shape[2:]))
        return _make_dataset("image_folder", train_x, train_y, test_x, test_y, classes)

    return cached_dataset("image_folder", files.paths(), cache_dir, build)


# --------------------------------------------------------------------------- file access


@dataclass(frozen=True)
class _Files:
    """The files a dataset uses: the top-level ``members`` (files or folders) of a folder, or of
    the folder ``prefix`` inside a tar archive at ``path``.  Read-only: nothing is extracted."""

    path: Path
    members: tuple[str, ...]
    prefix: str = ""

    def paths(self) -> list[Path]:
        """The files that key the cache: the archive, or every file under the members."""
        if not self.path.is_dir():
            return [self.path]
        found = []
        for member in self.members:
            top = self.path / member
            if top.is_file():
                found.append(top)
            for folder, _, names in os.walk(top):
                found.extend(Path(folder, name) for name in names)
        return found

    def read(self) -> dict[str, bytes]:
        """Every file under the members, as ``{"train/cat/0001.jpg": bytes}``."""
        if self.path.is_dir():
            return {p.relative_to(self.path).as_posix(): p.read_bytes() for p in self.paths()}
        data = {}
        try:
            with tarfile.open(self.path, "r|*") as archive:  # streaming: one pass, no seeks
                for member in archive:
                    name = member.name.removeprefix(self.prefix)
                    if member.isfile() and member.name.startswith(self.prefix) and name.split("/")[0] in self.members:
                        data[name] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise ClbenchError(f"cannot read archive {self.path}: {err}") from err
        if not data:
            raise ClbenchError(f"archive {self.path} holds none of {', '.join(self.prefix + m for m in self.members)}")
        return data

    def where(self, name: str) -> str:
        """How to show file ``name`` to a user."""
        return str(self.path / (self.prefix + name))


def _search_bases(root: str | None, subfolders: tuple[str, ...]) -> list[Path]:
    """``[root]``, else each subfolder of ``$CLBENCH_DATA_ROOT``, else of ``../shared/data``."""
    if root is not None:
        return [Path(root).expanduser()]
    env = os.environ.get(DATA_ROOT_ENV)
    base = Path(env).expanduser() if env else Path.cwd().parent / "shared" / "data"
    return [base / sub for sub in subfolders]


def _not_found(dataset: str, searched: list[Path], layout: str, subfolder: str | None = None) -> ClbenchError:
    hint = "Set scenario.data_root=<folder holding these files>"
    if subfolder is not None:
        hint += f" or set {DATA_ROOT_ENV} to a folder whose '{subfolder}' subfolder holds them"
    paths = "\n".join(f"  {p}" for p in dict.fromkeys(searched))
    return ClbenchError(f"dataset '{dataset}': no data found. Searched:\n{paths}\nExpected {layout}.\n{hint}.")


# --------------------------------------------------------------------------- formats


def _digits_table() -> np.ndarray:
    """scikit-learn's digits as int64 ``[1797, 65]``: 64 pixels in 0..16, then the label.

    Parsed from the csv that ``sklearn.datasets.load_digits`` reads, found without importing
    scikit-learn (that import alone takes about a second; the parse takes milliseconds).
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ClbenchError("dataset 'digits' needs scikit-learn: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if path.is_file():
        return np.loadtxt(path, delimiter=",", dtype=np.int64)
    from sklearn.datasets import load_digits as sklearn_digits  # the file moved in some scikit-learn version

    bunch = sklearn_digits()
    return np.column_stack([bunch.data, bunch.target]).astype(np.int64)


def _load_idx_dataset(
    name: str,
    root: str | None,
    cache_dir: str | None,
    subfolder: str,
    torchvision_folder: str,
    classes: tuple[str, ...],
) -> ImageDataset:
    """An MNIST-like dataset from the 4 idx files in ``root``, ``root/raw`` or ``root/<torchvision_folder>/raw``."""
    searched: list[Path] = []
    for base in _search_bases(root, (subfolder,)):
        for folder in (base, base / "raw", base / torchvision_folder / "raw"):
            searched.append(folder)
            chosen = [next((f for f in (s, s + ".gz") if (folder / f).is_file()), None) for s in _IDX_FILES]
            if None not in chosen:
                files = _Files(folder, tuple(chosen))
                return cached_dataset(name, files.paths(), cache_dir, lambda: _build_idx(name, files, classes))
    layout = "the 4 idx files (each optionally .gz): " + ", ".join(_IDX_FILES)
    raise _not_found(name, searched, layout, subfolder)


def _build_idx(name: str, files: _Files, classes: tuple[str, ...]) -> ImageDataset:
    data = files.read()
    train_images, train_labels, test_images, test_labels = (
        _parse_idx(data[member], files.where(member), ndim) for member, ndim in zip(files.members, (3, 1, 3, 1))
    )
    for images, labels, member in zip((train_images, test_images), (train_labels, test_labels), files.members[1::2]):
        if len(labels) != len(images):
            raise ClbenchError(f"{files.where(member)}: {len(labels)} labels for {len(images)} images")
        if len(labels) and int(labels.max()) >= len(classes):
            raise ClbenchError(f"{files.where(member)}: label {int(labels.max())} is not below {len(classes)}")
    return _make_dataset(
        name, train_images.unsqueeze(1), train_labels.long(), test_images.unsqueeze(1), test_labels.long(), classes
    )


def _parse_idx(data: bytes, where: str, ndim: int) -> torch.Tensor:
    """An idx file (gzipped if ``where`` ends in .gz) of uint8 values with ``ndim`` dimensions."""
    if where.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise ClbenchError(f"{where}: not a valid gzip file ({err})") from err
    header = 4 + 4 * ndim
    if data[:4] != bytes((0, 0, 0x08, ndim)):
        raise ClbenchError(
            f"{where}: not an idx file of uint8 with {ndim} dimension(s) "
            f"(magic number {data[:4].hex()}, expected {bytes((0, 0, 0x08, ndim)).hex()})"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) != header + math.prod(dims):
        raise ClbenchError(f"{where}: header says shape {dims} but the file holds {len(data) - header} values")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).reshape(dims)


def _cifar_meta_names(path: Path) -> tuple[str, ...] | None:
    """The ``label_names`` of a CIFAR-10 ``batches.meta`` file, or None where there is none."""
    return _unpickle(path.read_bytes(), str(path)).get(b"label_names") if path.is_file() else None


def _unpickle(data: bytes, where: str) -> dict:
    """A CIFAR python-format pickle (the official format, written by Python 2), read by a restricted
    unpickler that runs no code (:func:`~clbench.safe_load.load_data_pickle`); keys come back as
    bytes (str keys of a Python 3 pickle are encoded) and ``label_names`` as a tuple of str."""
    batch = load_data_pickle(data, where)
    if not isinstance(batch, dict):
        raise ClbenchError(f"{where}: not a CIFAR python batch file (a {type(batch).__name__}, expected a dict)")
    batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
    if b"label_names" in batch:
        try:
            batch[b"label_names"] = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in batch[b"label_names"])
        except (TypeError, UnicodeDecodeError) as err:
            raise ClbenchError(f"{where}: label_names is not a list of names ({err})") from None
    return batch


def _load_cifar10_batches(files: _Files, cache_dir: str | None) -> ImageDataset:
    def build() -> ImageDataset:
        data = files.read()
        missing = [f for f in _CIFAR_BATCHES if f not in data]
        if missing:
            raise ClbenchError(f"{files.path}: missing {', '.join(files.prefix + m for m in missing)}")
        batches = {f: _unpickle(data[f], files.where(f)) for f in _CIFAR_BATCHES}
        x, y = {}, {}
        for split, names in (("train", _CIFAR_BATCHES[:5]), ("test", _CIFAR_BATCHES[5:])):
            try:
                x[split] = torch.from_numpy(np.concatenate([np.asarray(batches[n][b"data"], np.uint8) for n in names]))
                y[split] = torch.tensor([label for n in names for label in batches[n][b"labels"]], dtype=torch.int64)
                x[split] = x[split].reshape(len(y[split]), 3, 32, 32)
            except (KeyError, ValueError, RuntimeError) as err:
                raise ClbenchError(f"{files.path}: unexpected content in the {split} batches ({err!r})") from err
        meta = _unpickle(data["batches.meta"], files.where("batches.meta")) if "batches.meta" in data else {}
        classes = meta.get(b"label_names", CIFAR10_CLASSES)
        return _make_dataset("cifar10", x["train"], y["train"], x["test"], y["test"], classes)

    return cached_dataset("cifar10", files.paths(), cache_dir, build)


def _load_cifar10_jpeg(files: _Files, meta: Path, cache_dir: str | None) -> ImageDataset:
    """The JPEG class folders; their sorted names must be the classes of ``meta`` (when present) or CIFAR-10's."""
    expected = _cifar_meta_names(meta) or CIFAR10_CLASSES

    def build() -> ImageDataset:
        data = files.read()
        for split in ("train", "test"):
            found = tuple(sorted({name.split("/")[1] for name in data if _is_class_image(name, split)}))
            if found != tuple(expected):
                raise ClbenchError(
                    f"cifar10: the class folders in {files.where(split)} are {list(found)}, expected {list(expected)}"
                )
        train_x, train_y = _class_folder_split(files, data, "train", expected, size=(32, 32))
        test_x, test_y = _class_folder_split(files, data, "test", expected, size=(32, 32))
        return _make_dataset("cifar10", train_x, train_y, test_x, test_y, expected)

    return cached_dataset("cifar10", files.paths(), cache_dir, build)


def _load_tiny_imagenet_files(files: _Files, cache_dir: str | None) -> ImageDataset:
    def build() -> ImageDataset:
        data = files.read()
        for required in ("wnids.txt", "val/val_annotations.txt"):
            if required not in data:
                raise ClbenchError(f"tiny_imagenet: missing {files.where(required)}")
        wnids = tuple(sorted(data["wnids.txt"].decode().split()))
        label_of = {wnid: i for i, wnid in enumerate(wnids)}
        train = sorted(
            (label_of.get(parts[1], -1), name)
            for name in data
            if (parts := name.split("/"))[0] == "train" and len(parts) == 4 and parts[2] == "images" and _is_image(name)
        )
        if not train:
            raise ClbenchError(f"tiny_imagenet: no images in {files.where('train')}/<wnid>/images/")
        if train[0][0] < 0:
            raise ClbenchError(f"tiny_imagenet: {files.where(train[0][1])} is of a class missing from wnids.txt")
        val = []
        for line in data["val/val_annotations.txt"].decode().splitlines():
            if not line.strip():
                continue
            file_name, wnid = (line.split("\t") + [""])[:2]
            if f"val/images/{file_name}" not in data or wnid not in label_of:
                raise ClbenchError(f"tiny_imagenet: bad line in {files.where('val/val_annotations.txt')}: {line!r}")
            val.append((label_of[wnid], f"val/images/{file_name}"))
        if not val:
            raise ClbenchError(f"tiny_imagenet: {files.where('val/val_annotations.txt')} lists no images")
        x, y = {}, {}
        for split, items in (("train", train), ("test", val)):
            names = [name for _, name in items]
            x[split] = _decode_images([data[n] for n in names], [files.where(n) for n in names], size=(64, 64))
            y[split] = torch.tensor([label for label, _ in items], dtype=torch.int64)
        return _make_dataset("tiny_imagenet", x["train"], y["train"], x["test"], y["test"], wnids)

    return cached_dataset("tiny_imagenet", files.paths(), cache_dir, build)


def _is_image(name: str) -> bool:
    """Whether path ``name`` names an image file by its suffix (hidden files excluded)."""
    file_name = name.rsplit("/", 1)[-1]
    return not file_name.startswith(".") and file_name.lower().endswith(_IMAGE_SUFFIXES)


def _is_class_image(name: str, split: str) -> bool:
    """Whether ``name`` is ``<split>/<class>/<image file>``."""
    parts = name.split("/")
    return len(parts) == 3 and parts[0] == split and _is_image(name)


def _class_folder_split(
    files: _Files, data: dict[str, bytes], split: str, classes: tuple[str, ...], size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the ``<split>/<class>/<image>`` files, ordered by class then file name, and their labels."""
    label_of = {c: i for i, c in enumerate(classes)}
    items = sorted((label_of.get(n.split("/")[1], -1), n) for n in data if _is_class_image(n, split))
    if not items:
        raise ClbenchError(f"no images in {files.where(split)}/<class>/")
    if items[0][0] < 0:
        unknown = sorted({n.split("/")[1] for label, n in items if label < 0})
        raise ClbenchError(
            f"{files.where(split)}: class folder(s) {unknown} are not among the train classes {list(classes)}"
        )
    names = [name for _, name in items]
    x = _decode_images([data[n] for n in names], [files.where(n) for n in names], size)
    return x, torch.tensor([label for label, _ in items], dtype=torch.int64)


# --------------------------------------------------------------------------- decoding and statistics


def _decode_images(data: list[bytes], names: list[str], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode image files into one uint8 RGB tensor ``[N, 3, H, W]``.

    JPEGs go through torchvision's batched libjpeg-turbo decoder, a chunk per thread (about
    2.5x faster than PIL here); other formats through PIL.  Every image must be ``size``
    (H, W), or the first image's size when ``size`` is None.
    """
    starts = range(0, len(data), _DECODE_CHUNK)
    out = torch.empty(0)
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        chunks = pool.map(lambda s: _decode_chunk(data[s : s + _DECODE_CHUNK], names[s : s + _DECODE_CHUNK]), starts)
        for start, images in zip(starts, chunks):
            if start == 0:
                height, width = size or images[0].shape[1:]
                out = torch.empty((len(data), 3, height, width), dtype=torch.uint8)
            bad = next((i for i, image in enumerate(images) if image.shape != out.shape[1:]), None)
            if bad is not None:
                h, w = images[bad].shape[1:]
                like = "expected" if size else f"but {names[0]} is"
                raise ClbenchError(
                    f"{names[start + bad]} is {h}x{w} (HxW), {like} {out.shape[2]}x{out.shape[3]}: "
                    "all images must have one size"
                )
            torch.stack(images, out=out[start : start + len(images)])
    return out


def _decode_chunk(data: list[bytes], names: list[str]) -> list[torch.Tensor]:
    """One ``decode_jpeg`` call for a chunk of JPEGs; PIL for other formats and to name a broken file."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # torchvision 0.29 announced the removal of its image decoders
        decode_jpeg = None
    if decode_jpeg is not None and all(d[:3] == b"\xff\xd8\xff" for d in data):
        try:
            encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
            return decode_jpeg(encoded, mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # decode one by one below to name the broken file
    return [_decode_with_pil(d, n) for d, n in zip(data, names)]


def _decode_with_pil(data: bytes, name: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.array(image.convert("RGB"))
    except Exception as err:
        raise ClbenchError(f"cannot decode image {name}: {err}") from err
    return torch.from_numpy(array).permute(2, 0, 1)


def _make_dataset(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    class_names: tuple[str, ...],
) -> ImageDataset:
    """An :class:`ImageDataset` whose mean/std are the train split's per-channel pixel statistics."""
    mean, std = _channel_stats(train_x)
    return ImageDataset(name, ImageSplit(train_x, train_y), ImageSplit(test_x, test_y), tuple(class_names), mean, std)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images scaled to [0, 1].

    Exact, from per-channel histograms of the pixel values (much faster than float sums over
    dims 0, 2, 3), taken over chunks of about 64M pixels to bound the memory used.
    """
    histogram = torch.zeros(x.shape[1], 256, dtype=torch.int64)
    for part in x.split(max(1, (1 << 26) // (x.shape[2] * x.shape[3]))):
        for channel in range(x.shape[1]):
            histogram[channel] += torch.bincount(part[:, channel].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255
    count = histogram.sum(1).to(torch.float64)
    mean = (histogram * values).sum(1) / count
    std = ((histogram * values.square()).sum(1) / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())

"""Nothing loaded from disk runs code (issue 11, section 3).

Every loader gets a payload that would create a file if it were executed, and must refuse it
with a one-line :class:`ClbenchError` naming the file, without the file appearing.  Bad
model checkpoints (not a state dict, refused pickle, corrupt safetensors header, truncated
file) and damaged or tampered dataset caches are covered too.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from clbench.data import datasets as D
from clbench.data.cache import cached_dataset
from clbench.data.types import ImageDataset, ImageSplit
from clbench.models.cifar_resnet import CifarResNetConfig, cifar_resnet
from clbench.models.pretrained import TimmConfig, create_timm_backbone, load_state_dict_file
from clbench.registry import ClbenchError
from clbench.safe_load import load_data_pickle, torch_load, weights_only_loads
from conftest import DATA_ROOT

SHARED_DATA = DATA_ROOT


class Touch:
    """Unpickling this calls ``Path(target).touch()``: a stand-in for arbitrary code."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.target),)


def assert_one_line(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message, message


def test_the_payload_is_live(tmp_path):
    """Sanity check: a plain unpickler does run it (so the tests below are meaningful)."""
    target = tmp_path / "pwned"
    pickle.loads(pickle.dumps({"x": Touch(target)}))
    assert target.exists()


# --------------------------------------------------------------------------- CIFAR-10 python batches
class Py2Pickler(pickle._Pickler):
    """Writes ``str`` and ``bytes`` the way Python 2 wrote its ``str`` (BINSTRING), and numpy's
    reconstructors under their old ``numpy.core`` names: the layout of the official CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_dumps(obj) -> bytes:
    buffer = __import__("io").BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")


def write_batches(folder: Path, dumps, str_keys: bool) -> tuple[np.ndarray, list[int]]:
    """The 6 batch files (2 images each) and batches.meta, keyed by str or by bytes."""
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i, name in enumerate(D._CIFAR_BATCHES):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = [i % 10, (i + 3) % 10]
        (folder / name).write_bytes(dumps({key("batch_label"): name, key("data"): data, key("labels"): labels}))
        xs.append(data)
        ys.append(labels)
    names = list(reversed(D.CIFAR10_CLASSES))
    (folder / "batches.meta").write_bytes(dumps({key("label_names"): [key(n) for n in names], key("num_vis"): 3072}))
    return np.concatenate(xs[:5]).reshape(-1, 3, 32, 32), sum(ys[:5], [])


@pytest.mark.parametrize("layout", ["py2-bytes-keys", "py3-str-keys-protocol2", "py3-str-keys-protocol5"])
def test_python_batches_are_read_without_running_code(tmp_path, layout):
    dumps = {"py2-bytes-keys": py2_dumps, "py3-str-keys-protocol2": lambda o: pickle.dumps(o, 2),
             "py3-str-keys-protocol5": lambda o: pickle.dumps(o, 5)}[layout]
    train_x, train_y = write_batches(tmp_path / "data", dumps, str_keys=layout != "py2-bytes-keys")
    if layout == "py2-bytes-keys":
        assert b"cnumpy.core.multiarray\n_reconstruct" in (tmp_path / "data" / "data_batch_1").read_bytes()
    dataset = D.load_cifar10(root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(dataset.train.x, torch.from_numpy(train_x)) and dataset.train.y.tolist() == train_y
    assert dataset.class_names == tuple(reversed(D.CIFAR10_CLASSES))


@pytest.mark.parametrize("member", ["data_batch_1", "test_batch", "batches.meta"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_python_batches_refuse_code(tmp_path, member, protocol):
    root, target = tmp_path / "data", tmp_path / "pwned"
    write_batches(root, lambda o: pickle.dumps(o, 2), str_keys=False)
    (root / member).write_bytes(pickle.dumps({b"data": Touch(target), b"label_names": [b"x"]}, protocol))
    with pytest.raises(ClbenchError, match="refused to unpickle.*Python global '(__builtin__.getattr|pathlib.Path.touch)'") as err:
        D.load_cifar10(root=str(root), cache_dir=str(tmp_path / "cache"))
    assert not target.exists()
    assert_one_line(err, root / member)


def test_jpeg_layout_meta_refuses_code(tmp_path):
    """The batches.meta next to the JPEG copy is read the same way."""
    meta, target = tmp_path / "batches.meta", tmp_path / "pwned"
    meta.write_bytes(pickle.dumps({b"label_names": [Touch(target)]}, 2))
    with pytest.raises(ClbenchError, match="refused") as err:
        D._cifar_meta_names(meta)
    assert not target.exists()
    assert_one_line(err, meta)


@pytest.mark.parametrize("payload, refused", [
    (lambda target: pickle.dumps(eval), "builtins.eval"),
    (lambda target: pickle.dumps(np.array([Touch(target)], dtype=object)), "pathlib.Path.touch"),  # inside an array
    (lambda target: b"\x80\x02cos\nsystem\nX\x05\x00\x00\x00touch\x85R.", "os.system"),  # os.system("touch")
    (lambda target: pickle.dumps(np.random.default_rng(0)), "numpy.random._pickle"),  # numpy, but not an array
])
def test_data_pickle_refuses_every_other_global(tmp_path, payload, refused):
    target = tmp_path / "pwned"
    with pytest.raises(ClbenchError, match=f"refused to unpickle: it asks for the Python global '{refused}"):
        load_data_pickle(payload(target), "some.pkl")
    assert not target.exists()


def test_data_pickle_truncated_is_a_clear_error():
    with pytest.raises(ClbenchError, match=r"some\.pkl: not a readable pickle"):
        load_data_pickle(pickle.dumps({b"data": np.zeros(100, np.uint8)}, 2)[:-20], "some.pkl")


def test_real_batches_meta():
    meta = SHARED_DATA / "cifar10-jpeg" / "batches.meta"
    if not meta.is_file():
        pytest.skip(f"no {meta}")
    assert D._cifar_meta_names(meta) == D.CIFAR10_CLASSES


# --------------------------------------------------------------------------- model checkpoints
def state_file(path: Path, obj, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def test_timm_checkpoint_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    path = state_file(tmp_path / "evil.pt", {"w": torch.zeros(2), "x": Touch(target)})
    with pytest.raises(ClbenchError, match="refused: it asks for the Python global") as err:
        load_state_dict_file(path)
    assert not target.exists()
    assert_one_line(err, path)


def test_cifar_resnet_checkpoint_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    path = state_file(tmp_path / "evil.th", {"state_dict": {"x": Touch(target)}, "best_prec1": 90.0}, legacy=True)
    with pytest.raises(ClbenchError, match="model cifar_resnet: checkpoint .*refused") as err:
        cifar_resnet(CifarResNetConfig(depth=20, checkpoint=str(path)), (3, 32, 32), 10)
    assert not target.exists()
    assert_one_line(err, path)


def test_fetril_initial_model_refuses_code(tmp_path):
    """strategy.initial_model and the FeTrIL benchmark's checkpoint go through torch_load."""
    target = tmp_path / "pwned"
    path = state_file(tmp_path / "initial.pt", {"model": Touch(target)})
    with pytest.raises(ClbenchError, match="strategy.initial_model .*refused") as err:
        torch_load(path, "strategy.initial_model")
    assert not target.exists()
    assert_one_line(err, path)
    source = (Path(__file__).resolve().parents[1] / "strategies" / "fetril.py").read_text()
    assert "torch_load(cfg.initial_model" in source and "torch.load(" not in source


def test_timm_hub_weights_refuse_code(tmp_path):
    """timm's own loading (here of a pretrained_cfg file, as for a hub download) runs no code either."""
    target = tmp_path / "pwned"
    path = state_file(tmp_path / "hub.pth", {"x": Touch(target)})
    cfg = TimmConfig(arch="resnet10t", pretrained=True, kwargs={"pretrained_cfg_overlay": {"file": str(path)}})
    with pytest.raises(ClbenchError, match="could not fetch timm's pretrained weights .*refused") as err:
        create_timm_backbone(cfg)
    assert not target.exists()
    assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)


def test_weights_only_loads_overrides_the_caller(tmp_path, monkeypatch):
    """Third-party code asking torch.load for weights_only=False still gets weights_only=True."""
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    target = tmp_path / "pwned"
    path = state_file(tmp_path / "evil.pt", {"x": Touch(target)})
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)
    assert not target.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def truncated(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(4)}, str(good))
    raw = good.read_bytes()
    header = tmp_path / "header.safetensors"
    header.write_bytes(raw[:8] + b"{garbage" + raw[16:])
    short = tmp_path / "short.safetensors"
    short.write_bytes(raw[:-4])
    zipped = state_file(tmp_path / "zip.pt", {"w": torch.zeros(100)})
    legacy = state_file(tmp_path / "legacy.pt", {"w": torch.zeros(100)}, legacy=True)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, not a checkpoint")
    return {
        "list, not a state dict": (state_file(tmp_path / "list.pt", [torch.zeros(2)]), "does not hold a state dict"),
        "non-tensor entry": (state_file(tmp_path / "float.pt", {"w": torch.zeros(2), "acc": 0.9}),
                             "entry 'acc' is a float, not a tensor"),
        "refused pickle": (state_file(tmp_path / "frac.pt", {"w": Fraction(1, 2)}),
                           "refused: it asks for the Python global 'fractions.Fraction'"),
        "corrupt safetensors header": (header, "not a valid safetensors file .*header"),
        "truncated safetensors": (short, "not a valid safetensors file"),
        "truncated zip torch file": (truncated(zipped, 200), "corrupt or truncated"),
        "truncated legacy torch file": (truncated(legacy, len(legacy.read_bytes()) - 40), "truncated"),
        "not a torch file": (junk, "not a torch file"),
    }


@pytest.mark.parametrize("case", ["list, not a state dict", "non-tensor entry", "refused pickle",
                                  "corrupt safetensors header", "truncated safetensors", "truncated zip torch file",
                                  "truncated legacy torch file", "not a torch file"])
def test_bad_model_checkpoint_is_one_clear_line(tmp_path, case):
    path, problem = bad_checkpoints(tmp_path)[case]
    with pytest.raises(ClbenchError, match=f"model checkpoint .*{problem}") as err:
        load_state_dict_file(path)
    assert_one_line(err, path)


def test_bad_cifar_resnet_checkpoint_is_one_clear_line(tmp_path):
    path = state_file(tmp_path / "r.th", {"state_dict": {"conv1.weight": torch.zeros(1)}, "best_prec1": 1.0})
    truncated(path, 100)
    with pytest.raises(ClbenchError, match="model cifar_resnet: checkpoint .*corrupt or truncated") as err:
        cifar_resnet(CifarResNetConfig(depth=20, checkpoint=str(path)), (3, 32, 32), 10)
    assert_one_line(err, path)


# --------------------------------------------------------------------------- dataset cache
def tiny_dataset() -> ImageDataset:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    split = ImageSplit(x, torch.tensor([0, 1]))
    return ImageDataset("tiny", split, split, ("a", "b"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def cached_again(cache: Path) -> tuple[ImageDataset, list[str], int]:
    """Load through the cache; returns the dataset, the warnings and how often it was rebuilt."""
    builds = []

    def build() -> ImageDataset:
        builds.append(1)
        return tiny_dataset()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = cached_dataset("tiny", [], cache, build)
    return dataset, [str(w.message) for w in caught], len(builds)


def tamper(state: dict) -> None:
    state["train_y"] = torch.tensor([0, 255])  # a label outside the 2 classes


@pytest.mark.parametrize("damage", ["code", "truncated", "labels out of range", "float images", "foreign keys"])
def test_damaged_or_tampered_cache_is_rebuilt_without_running_code(tmp_path, damage):
    cache, target = tmp_path / "cache", tmp_path / "pwned"
    _, _, builds = cached_again(cache)
    (path,) = cache.iterdir()
    state = torch.load(path, weights_only=True)
    if damage == "code":
        state["name"] = Touch(target)
        torch.save(state, path)
    elif damage == "truncated":
        truncated(path, 300)
    elif damage == "labels out of range":
        tamper(state)
        torch.save(state, path)
    elif damage == "float images":
        state["test_x"] = state["test_x"].float()
        torch.save(state, path)
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    dataset, caught, builds = cached_again(cache)
    assert builds == 1 and not target.exists()
    assert len(caught) == 1 and f"ignoring unreadable dataset cache {path}" in caught[0], caught
    assert "weights_only=False" not in caught[0] and "\n" not in caught[0]
    assert dataset.train.y.tolist() == [0, 1]
    assert cached_again(cache)[2] == 0  # rewritten and readable

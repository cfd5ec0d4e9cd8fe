"""Golden for FeTrIL: the official feature-translation, classifier and prediction scripts on a tiny seeded case.

Official code: ``GregoirePetit/FeTrIL`` @ e3b139ce84a735a28f1fc0f93b7ab401721f6dad (2023-06-05), the scripts
``codes/compute_distances.py`` (class means, nearest new class, pseudo-features), ``codes/prepare_train.py``
(one file per feature row), ``codes/train_classifiers.py`` (one-vs-rest ``sklearn.svm.LinearSVC`` per seen
class, liblinear primal solver), ``codes/compute_predictions.py`` (scores and ranking of every test feature)
and ``codes/eval.py`` (top-1 per state), run unmodified with ``runpy`` on a config file in the format of
``configs/cifar100_b50_t10.cf``; plus its external dependency ``GregoirePetit/utilsCIL`` @
205b828fcf0766d044790990238d8edd3b63f1c5 (2023-01-27, the version current at the FeTrIL commit; at today's
HEAD 6599f71 ``MyFeatureFolder.py`` differs only by a comment): ``MyFeatureFolder.L4FeaturesDataset``, the
reader ``train_classifiers.py`` imports.  Both are extracted from local git mirrors (``fetch`` them) or given
with ``--source`` / ``--utils-source``; nothing is copied into clbench.

The case (seeded, numpy only): 12 classes, 8 base classes + 2 incremental states of 2 classes
(``first_batch_size=8, il_states=2``), 16-d non-negative "features" that are multiples of 1/64 (exact in the
text files, float32 and float64), 64 training and 8 test features per class, written in the official layout
``<feat_root>/<dataset>/seed-1/b8/{train,test}/<class>`` (one space-separated row per line).
64 rows per class puts the 512-row boundary of the official first-batch bug (below) on a class boundary,
and 12 classes (>= 11) exercise the lexicographic class order of ``L4FeaturesDataset`` (``np.sort`` of
``'<c>_decomposed'`` names: 0, 10, 11, 1, 2, ... at the last state).

Two runs of the classifier stage (the translation is shared):

* ``parity``: the released scripts exactly as they are, including
  ``train_classifiers.py::normalize_train_features`` leaving the first 512-row loader batch unnormalised.
* ``paper``: the same scripts with that one bug neutralised from the outside: ``torch.utils.data.DataLoader``
  is wrapped to yield an empty batch first, so every real row goes through ``F.normalize`` (the paper's
  behaviour and clbench's default).

Outside patches (behaviour-neutral): ``multiprocessing.Pool`` is a serial map (the scripts use
``Pool().map``); the DataLoader runs with ``num_workers=0, pin_memory=False`` (the script asks for 70
workers); ``sklearn.metrics.pairwise_distances`` is wrapped to *record* the class means and the distance
matrix ``compute_distances.py`` computes (it returns the original's result unchanged).

Golden ``tests/reference/fetril.safetensors``:
``train_x/train_y/test_x/test_y`` (the features written), ``means_s{s}`` / ``distances_s{s}`` (class means
of all classes seen at state s and their distances to the state's new-class means), ``pseudo_s{s}`` /
``pseudo_y_s{s}`` for s = 1, 2 (the past classes' pseudo-features as ``L4FeaturesDataset`` reads them back:
the ``%1.8f`` text cast to float32), ``row_labels_s{s}`` / ``row_index_s{s}`` (the SVM training rows in the
order the official loader read them: class, and row within that class's file -- ``np.sort`` of the class
folder names, then ``os.listdir`` order, which depends on the file system), and per
mode ``m`` in (paper, parity): ``{m}_weight_s{s}`` / ``{m}_bias_s{s}`` (the ``.model`` files),
``{m}_scores_s{s}`` (``w.x/||x|| + b`` per test feature and classifier, as ``compute_predictions.py``
computes it), ``{m}_pred_s{s}`` (its first-ranked class) and ``{m}_top1`` (``eval.py``'s top-1 per state).
Note the official sign: ``y = np.empty(..., dtype=str)`` truncates '+1'/'-1' to '+'/'-', and LinearSVC's
positive class is then '-' ("not c"), so the written weights are minus clbench's; ``compute_predictions.py``
ranks by ascending score, which makes the prediction the argmax of clbench's score again.

Second golden ``tests/reference/fetril_lucir_resnet18.safetensors`` (the released initial model's
architecture): the official ``lucir_models/modified_resnet.py::resnet18`` (LUCIR's ResNet-18: ImageNet stem, no
ReLU after the last block, ``AvgPool2d(7)``) with utilsCIL's ``modified_linear.CosineLinear`` head, 10 classes,
its weights set by :func:`lucir_fill` in state-dict order from a seed, on two seeded 224 px inputs: the head's
input features and the logits in eval mode and in train mode; ``extra.keys`` maps each official key to clbench's
``resnet18(stem=imagenet, nf=64, last_relu=false, classifier=lucir)`` key (:func:`lucir_key`).

Run: ``python tools/reference/fetril.py [--source DIR] [--utils-source DIR]`` (CPU, seconds; needs
scikit-learn, pandas, torch).  Rerunning rewrites both goldens; ``fetril``'s SVM figures may move at the
rounding level because the official loader's row order within a class is ``os.listdir``'s (recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import runpy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.reference.common import imported_from, official_source, write_golden  # noqa: E402

REPOSITORY = "GregoirePetit/FeTrIL"
COMMIT = "e3b139ce84a735a28f1fc0f93b7ab401721f6dad"
UTILS_REPOSITORY = "GregoirePetit/utilsCIL"
UTILS_COMMIT = "205b828fcf0766d044790990238d8edd3b63f1c5"
FILES = ["codes/compute_distances.py", "codes/prepare_train.py", "codes/train_classifiers.py",
         "codes/compute_predictions.py", "codes/eval.py", "configs/cifar100_b50_t10.cf",
         f"{UTILS_REPOSITORY}@{UTILS_COMMIT}:MyFeatureFolder.py"]
CASE = {"nb_classes": 12, "first_batch_size": 8, "il_states": 2, "dim": 16, "train_per_class": 64,
        "test_per_class": 8, "seed": 0, "grid": 64, "regul": 1.0, "toler": 1e-4, "dataset": "toy", "random_seed": -1}


def make_features(case: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Class-clustered non-negative features on a 1/64 grid (exact in text, float32 and float64)."""
    rng = np.random.default_rng(case["seed"])
    n, d, g = case["nb_classes"], case["dim"], case["grid"]
    centres = rng.uniform(0.0, 2.0, size=(n, d))

    def draw(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([centres[c] + rng.normal(0.0, 0.6, size=(per_class, d)) for c in range(n)])
        return np.round(np.clip(x, 0.0, None) * g) / g, np.repeat(np.arange(n), per_class)

    train_x, train_y = draw(case["train_per_class"])
    test_x, test_y = draw(case["test_per_class"])
    return train_x, train_y, test_x, test_y


class SerialPool:
    """``multiprocessing.Pool`` stand-in: the same ``map``, in this process."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return list(map(fn, items))


def run_script(path: Path, cf: Path) -> dict:
    argv = sys.argv
    sys.argv = [str(path), str(cf)]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", help=f"a checkout of {REPOSITORY} at {COMMIT}")
    parser.add_argument("--utils-source", help=f"a checkout of {UTILS_REPOSITORY} at {UTILS_COMMIT}")
    args = parser.parse_args()
    src = official_source(REPOSITORY, COMMIT, args.source)
    utils_src = official_source(UTILS_REPOSITORY, UTILS_COMMIT, args.utils_source)
    codes = src / "codes"
    case = dict(CASE)
    n, b, t = case["nb_classes"], case["first_batch_size"], case["il_states"]
    inc = (n - b) // t
    train_x, train_y, test_x, test_y = make_features(case)

    import multiprocessing
    import sklearn.metrics
    import torch.utils.data

    out: dict[str, torch.Tensor] = {"train_x": torch.from_numpy(train_x).float(), "train_y": torch.from_numpy(train_y),
                                    "test_x": torch.from_numpy(test_x).float(), "test_y": torch.from_numpy(test_y)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        feat_dir = tmp / "features" / case["dataset"] / f"seed{case['random_seed']}" / f"b{b}"
        for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            (feat_dir / split).mkdir(parents=True)
            for c in range(n):
                (feat_dir / split / str(c)).write_text("".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in x[y == c]))

        def config(mode: str) -> Path:
            cf = tmp / f"{mode}.cf"
            cf.write_text("[config]\n" + "".join(f"{k} = {v}\n" for k, v in {
                "nb_classes": n, "dataset": case["dataset"], "first_batch_size": b, "il_states": t,
                "random_seed": case["random_seed"], "num_workers": 0, "regul": case["regul"], "toler": case["toler"],
                "feat_root": tmp / "features", "classifiers_root": tmp / f"classifiers_{mode}",
                "pred_root": tmp / f"predictions_{mode}"}.items()))
            return cf

        recorded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        original_distances = sklearn.metrics.pairwise_distances

        def recording_distances(a, b_, *rest, **kw):
            d = original_distances(a, b_, *rest, **kw)
            recorded.append((np.array(a, dtype=np.float64), np.array(b_, dtype=np.float64), np.array(d)))
            return d

        original_pool, original_loader = multiprocessing.Pool, torch.utils.data.DataLoader
        rows_read: dict[str, list[list[tuple[int, int]]]] = {}  # per mode and state: (class, row in its file) read

        def loader_for(mode: str):
            def loader(dataset, *a, **kw):
                kw.update(num_workers=0, pin_memory=False)
                rows_read.setdefault(mode, []).append([(int(Path(p).parent.name.split("_")[0]), int(Path(p).name))
                                                        for p in dataset.X])  # prepare_train.py names row i "i"
                inner = original_loader(dataset, *a, **kw)
                if mode == "parity":
                    return inner
                first = next(iter(inner))  # only for the shape: the empty batch keeps the official vstack working
                empty = (first[0][:0], first[1][:0])

                class EmptyFirst:
                    def __iter__(self):
                        yield empty
                        yield from inner
                return EmptyFirst()
            return loader

        multiprocessing.Pool = SerialPool
        sklearn.metrics.pairwise_distances = recording_distances
        try:
            run_script(codes / "compute_distances.py", config("parity"))
            run_script(codes / "prepare_train.py", config("parity"))
            sklearn.metrics.pairwise_distances = original_distances
            for mode in ("parity", "paper"):
                torch.utils.data.DataLoader = loader_for(mode)
                try:
                    with imported_from(utils_src, "MyFeatureFolder"):
                        run_script(codes / "train_classifiers.py", config(mode))
                finally:
                    torch.utils.data.DataLoader = original_loader
                run_script(codes / "compute_predictions.py", config(mode))
                top1 = run_script(codes / "eval.py", config(mode))["top1"]
                out[f"{mode}_top1"] = torch.tensor(top1, dtype=torch.float64)
        finally:
            multiprocessing.Pool = original_pool
            sklearn.metrics.pairwise_distances = original_distances
            torch.utils.data.DataLoader = original_loader

        # translation: one pairwise_distances call per state (the scripts' Pool.map order: state 0, 1, 2)
        assert len(recorded) == t + 1, len(recorded)
        for s, (means, new_means, dist) in enumerate(recorded):
            out[f"means_s{s}"] = torch.from_numpy(means)
            out[f"distances_s{s}"] = torch.from_numpy(dist)
        lucir = tmp / "features" / "fetril" / case["dataset"] / f"seed{case['random_seed']}" / f"b{b}" / f"t{t}" / "train"
        for s in range(1, t + 1):
            past = b + (s - 1) * inc
            rows = [np.array([[float(v) for v in line.split()] for line in (lucir / f"batch{s}" / str(c)).read_text().splitlines()],
                             dtype=np.float32) for c in range(past)]
            out[f"pseudo_s{s}"] = torch.from_numpy(np.concatenate(rows))
            out[f"pseudo_y_s{s}"] = torch.tensor(np.repeat(np.arange(past), [len(r) for r in rows]))
        assert rows_read["parity"] == rows_read["paper"]
        for s, rows in enumerate(rows_read["parity"]):  # the official row order: classes sorted as strings, os.listdir within
            out[f"row_labels_s{s}"] = torch.tensor([c for c, _ in rows], dtype=torch.int16)
            out[f"row_index_s{s}"] = torch.tensor([i for _, i in rows], dtype=torch.int16)
        for mode in ("parity", "paper"):
            for s in range(t + 1):
                seen = b + s * inc
                models = [(tmp / f"classifiers_{mode}" / "fetril" / case["dataset"] / f"seed{case['random_seed']}" / f"b{b}"
                           / f"t{t}" / f"batch{s}" / f"{c}.model").read_text().split("\n") for c in range(seen)]
                out[f"{mode}_weight_s{s}"] = torch.tensor([[float(v) for v in m[0].split()] for m in models], dtype=torch.float64)
                out[f"{mode}_bias_s{s}"] = torch.tensor([float(m[1]) for m in models], dtype=torch.float64)
                scores, preds = [], []
                for c in range(seen):
                    pred_file = tmp / f"predictions_{mode}" / "fetril" / case["dataset"] / f"seed{case['random_seed']}" / f"b{b}" / f"t{t}" / f"batch{s}" / str(c)
                    for line in pred_file.read_text().splitlines():
                        pairs = [item.split(":") for item in line.split()]
                        row = np.zeros(seen)
                        for idx, value in pairs:
                            row[int(idx)] = -float(value)  # the file holds -score (pred_dict.append(-cls_score))
                        scores.append(row)
                        preds.append(int(pairs[0][0]))
                out[f"{mode}_scores_s{s}"] = torch.tensor(np.stack(scores))
                out[f"{mode}_pred_s{s}"] = torch.tensor(preds)
                ranked = np.sort(-np.stack(scores), axis=1)  # clbench's sign: the prediction is the argmax
                print(f"{mode} state {s}: top-1 {top1_of(out, mode, s):.4f}, smallest top-2 score gap {np.min(ranked[:, 1] - ranked[:, 0]):.2e}")
    extra = dict(case, states=t + 1, increment=inc,
                 paper_mode="train_classifiers.py with an empty first DataLoader batch (every SVM row L2-normalised)",
                 parity_mode="train_classifiers.py as released (the first 512-row batch unnormalised)")
    lucir_golden(src, utils_src)
    write_golden("fetril", out, repository=REPOSITORY, commit=COMMIT, files=FILES, script="tools/reference/fetril.py",
                 notes="official FeTrIL scripts run unmodified (serial Pool, DataLoader without workers); paper mode "
                       "neutralises the first-512-rows bug with an empty first loader batch", extra=extra)


def top1_of(out: dict, mode: str, s: int) -> float:
    return float(out[f"{mode}_top1"][s])


LUCIR_CASE = {"seed": 0, "num_classes": 10, "batch": 2, "size": 224}


def lucir_key(name: str) -> str:
    """The clbench ``resnet18`` (``stem=imagenet, last_relu=false, classifier=lucir``) name of an official
    ``lucir_models/modified_resnet.py`` state-dict entry."""
    parts = name.split(".")
    if parts[0] in ("conv1", "bn1"):
        return f"backbone.stem.{0 if parts[0] == 'conv1' else 1}." + ".".join(parts[1:])
    if parts[0] == "fc":
        return "head." + ".".join(parts[1:])
    layer, block, rest = int(parts[0][len("layer"):]), int(parts[1]), parts[2:]
    if rest[0] == "downsample":
        rest = ["shortcut"] + rest[1:]
    return f"backbone.layers.{2 * (layer - 1) + block}." + ".".join(rest)


def lucir_fill(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """The deterministic weights of the architecture check (the test applies the same rule, in the same order)."""
    t = torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(shape) > 1:
        return t / float(np.prod(shape[1:])) ** 0.5
    if name.endswith(("weight", "running_var", "sigma")):
        return 1.0 + 0.1 * t.abs()
    return 0.1 * t


def lucir_golden(src: Path, utils_src: Path) -> None:
    """Golden ``fetril_lucir_resnet18``: the official LUCIR ResNet-18 (``lucir_models/modified_resnet.py`` with
    utilsCIL's ``modified_linear.CosineLinear`` head), weights set by :func:`lucir_fill` in state-dict order,
    on seeded 224 px inputs: features (the head's input), logits in eval mode and in train mode (batch BN)."""
    case = LUCIR_CASE
    with imported_from(utils_src, "modified_linear"), imported_from(src, "lucir_models"):
        from lucir_models import modified_resnet

        model = modified_resnet.resnet18(num_classes=case["num_classes"])
    g = torch.Generator().manual_seed(case["seed"])
    state, keys = model.state_dict(), []
    with torch.no_grad():
        for name, value in state.items():
            if value.is_floating_point():
                value.copy_(lucir_fill(name, tuple(value.shape), g))
                keys.append([name, lucir_key(name)])
    x = torch.randn(case["batch"], 3, case["size"], case["size"], generator=torch.Generator().manual_seed(case["seed"] + 1))
    feats = {}
    model.fc.register_forward_hook(lambda mod, inp, out: feats.__setitem__("x", inp[0].detach().clone()))
    out = {}
    with torch.no_grad():
        model.eval()
        out["eval_logits"] = model(x)
        out["features"] = feats["x"]
        model.train()
        out["train_logits"] = model(x)
    out["input_sum"] = x.double().sum().reshape(1)
    write_golden("fetril_lucir_resnet18", out, repository=REPOSITORY, commit=COMMIT,
                 files=["lucir_models/modified_resnet.py", f"{UTILS_REPOSITORY}@{UTILS_COMMIT}:modified_linear.py"],
                 script="tools/reference/fetril.py",
                 notes="official LUCIR ResNet-18 with deterministic weights (lucir_fill, state-dict order), seeded 224 px inputs",
                 extra=dict(case, keys=keys, fill="lucir_fill in tools/reference/fetril.py: randn/sqrt(fan_in) for "
                            "conv/linear weights; 1+0.1|randn| for BN weight, running_var, sigma; 0.1 randn otherwise"))


if __name__ == "__main__":
    main()

"""Golden for the Si-Blurry stream and the online evaluation points, from the official code.

Repository ``KHU-AGI/Si-Blurry`` at commit ``61bd5eb`` ("Code for distribution ready"; HEAD
``c90d6d7`` has a syntax error in ``models/mvp.py``).  Official code exercised:

* ``methods/_trainer.py::_Trainer.main_worker`` -- the whole online loop of the released
  trainer: the ``OnlineSampler`` it builds (called positionally with ``rnd_NM`` and
  ``selection_size=1``, so the stochastic ``varing_NM`` branch), the per-task ``DataLoader``
  batches, the sample counter and the A_auc trigger ``samples_cnt > num_eval`` (no point at the
  end), ``add_new_class`` (exposure order).  Only the method hooks ``online_step`` /
  ``online_evaluate`` / ``online_before_task`` / ``online_after_task`` are ours: they record the
  batch indices and return the sample count as the "accuracy", so the official code's own
  ``eval_results["test_acc"]`` / ``["data_cnt"]`` (saved to ``seed_<s>_eval.npy`` /
  ``_eval_time.npy``) are the trigger positions.
* ``utils/online_sampler.py::OnlineSampler`` with ``varing_NM=False`` directly (the fixed-N/M
  branch the released trainer never reaches).

Case: the labels of clbench's built-in ``digits`` training split (1438 samples, 10 classes; no
images are needed by the sampler -- the official dataset here is a stand-in holding those
targets in that order), batch 16, ``eval_period`` 100: 5 tasks N=50 M=10 (the paper's setting)
for seeds 1, 5 (a task with no sample) and 7 (a task of 18 samples), 3 tasks N=50 M=30 (one class
dropped) for seed 3, 5 tasks N=20 M=50 for seed 7; the fixed branch for seed 2 (5 tasks, N=50,
M=10) and seed 3 (3 tasks, N=50, M=30).  Stored per case: the
per-task disjoint / blurry class lists, the per-task sample order (dataset indices), the exposure
order, and the A_auc trigger sample counts (+ ``num_eval`` values).  Seeds whose first task is
empty or too short to reach one evaluation point crash the official loop (``eval_dict`` is
unbound at the end of task 0) and are not used.

Patched from outside (CPU, no packages beyond clbench's): ``randaugment`` and
``torch_optimizer`` are stub modules (imported, unused on this path); the trainer module's
``torch`` name is a proxy whose ``device(...)`` is the CPU (``main_worker`` does
``torch.device(gpu)``); ``get_dataset`` / ``get_model`` in ``methods._trainer`` return the
stand-in dataset and a 1-feature linear model (never trained); ``ngpus_per_nodes`` and
``world_size`` are set to 1 after construction (``torch.cuda.device_count()`` is 0 on CPU).

Run: ``python tools/reference/si_blurry.py [--source DIR]`` (``DIR``: a checkout at 61bd5eb;
default: extracted from the mirror ``/work/.mirror/KHU-AGI+Si-Blurry/repo``).
Test: ``tests/test_reference_si_blurry.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import imported_from, official_source, write_golden  # noqa: E402

REPOSITORY, COMMIT = "KHU-AGI/Si-Blurry", "61bd5eb"
FILES = ["methods/_trainer.py", "utils/online_sampler.py", "utils/indexed_dataset.py"]
BATCH, PERIOD = 16, 100
TRAINER_CASES = [  # (seed, n_tasks, N, M)
    (1, 5, 50, 10),
    (5, 5, 50, 10),  # task 3 gets no class at all (0 samples)
    (7, 5, 50, 10),  # task 3: 18 samples (blurry leak only)
    (3, 3, 50, 30),  # one class dropped (3 disjoint + 6 blurry of 10)
    (7, 5, 20, 50),
]
FIXED_CASES = [(2, 5, 50, 10), (3, 3, 50, 30)]


def stub_packages() -> None:
    ra = types.ModuleType("randaugment")
    ra.__path__ = []  # a package: rainbow_memory.py imports randaugment.randaugment
    ra.RandAugment = object
    rar = types.ModuleType("randaugment.randaugment")
    rar.RandAugment = object
    sys.modules.setdefault("randaugment", ra)
    sys.modules.setdefault("randaugment.randaugment", rar)
    sys.modules.setdefault("torch_optimizer", types.ModuleType("torch_optimizer"))


class _TorchOnCPU(types.ModuleType):
    """``torch`` for the trainer module, except that ``torch.device(anything)`` is the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def device(*args, **kwargs):
        return torch.device("cpu")


def digits_split():
    from clbench.data import load_dataset

    ds = load_dataset("digits")
    return ds.train.y.clone(), ds.test.y.clone(), list(ds.class_names)


def make_dataset_class(train_y, test_y, class_names):
    from torch.utils.data import Dataset

    class Targets(Dataset):
        """Stand-in for a torchvision dataset: ``classes``, ``targets`` in file order, dummy images."""

        classes = list(class_names)

        def __init__(self, root=None, train=True, download=False, transform=None):
            self.targets = (train_y if train else test_y).tolist()

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return torch.zeros(1), self.targets[i]

    return Targets


def run_trainer(src: Path, seed: int, n_tasks: int, n: int, m: int, data) -> dict:
    stub_packages()
    with imported_from(src, "methods", "models", "utils", "datasets", "configuration"):
        import methods._trainer as trainer_module

        dataset_cls = make_dataset_class(*data)
        n_classes = len(dataset_cls.classes)
        trainer_module.torch = _TorchOnCPU("torch")
        trainer_module.get_dataset = lambda name: (dataset_cls, (0.0,), (1.0,), n_classes)
        trainer_module.get_model = lambda name, num_classes: (nn.Linear(1, num_classes), 8)

        class Probe(trainer_module._Trainer):
            """Only the method hooks are ours; everything else is the released _Trainer."""

            def online_before_task(self, task_id):
                self.task_end = False

            def online_after_task(self, task_id):
                self.task_end = True

            def online_step(self, images, labels, idx):
                self.add_new_class(labels)
                self.batches.append(idx.clone())
                return 0.0, 0.0

            def online_evaluate(self, test_loader):
                seen = sum(b.numel() for b in self.batches)
                if not self.task_end:
                    self.exposed_at_eval.append(len(self.exposed_classes))
                return {"avg_loss": 0.0, "avg_acc": float(seen), "cls_acc": [0.0] * n_classes}

        with tempfile.TemporaryDirectory() as tmp:
            t = Probe(mode="probe", n=n, m=m, rnd_NM=True, n_tasks=n_tasks, dataset="digits", rnd_seed=seed,
                      memory_size=0, log_path=tmp, model_name="probe", opt_name="adam", sched_name="default",
                      batchsize=BATCH, n_worker=0, lr=0.1, transforms=[], data_dir=tmp, debug=False, note="ref",
                      selection_size=1, eval_period=PERIOD, temp_batchsize=None, online_iter=1, use_amp=False,
                      topk=1)
            t.ngpus_per_nodes, t.world_size, t.distributed = 1, 1, False
            t.batches, t.exposed_at_eval, t.task_end = [], [], False
            with contextlib.redirect_stdout(io.StringIO()):
                t.run()
            logs = Path(tmp) / "logs" / "digits" / "ref"
            test_acc = np.load(logs / f"seed_{seed}_eval.npy")
            data_cnt = np.load(logs / f"seed_{seed}_eval_time.npy")
        s = t.train_sampler
        assert torch.equal(torch.cat(t.batches), torch.tensor([i for task in s.indices for i in task]))
        return {"disjoint": s.disjoint_classes, "blurry": s.blurry_classes, "indices": s.indices,
                "exposed": list(t.exposed_classes), "eval_samples": test_acc.astype(np.int64).tolist(),
                "num_eval": data_cnt.astype(np.int64).tolist(), "exposed_at_eval": t.exposed_at_eval}


def run_fixed_sampler(src: Path, seed: int, n_tasks: int, n: int, m: int, data) -> dict:
    stub_packages()
    with imported_from(src, "methods", "models", "utils", "datasets", "configuration"):
        from utils.indexed_dataset import IndexedDataset
        from utils.online_sampler import OnlineSampler

        ds = IndexedDataset(make_dataset_class(*data)(train=True))
        with contextlib.redirect_stdout(io.StringIO()):
            s = OnlineSampler(ds, n_tasks, m, n, seed, 0, False)
        return {"disjoint": s.disjoint_classes, "blurry": s.blurry_classes, "indices": s.indices}


def flat(lists) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-task lists as (values int32, lengths int32)."""
    values = [int(v) for task in lists for v in task]
    return torch.tensor(values, dtype=torch.int32), torch.tensor([len(t) for t in lists], dtype=torch.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", help="a checkout of KHU-AGI/Si-Blurry at 61bd5eb")
    args = parser.parse_args()
    src = official_source(REPOSITORY, COMMIT, args.source)
    data = digits_split()
    tensors: dict[str, torch.Tensor] = {"targets": data[0].to(torch.int8)}
    cases = []
    for kind, table in (("trainer", TRAINER_CASES), ("fixed", FIXED_CASES)):
        for seed, n_tasks, n, m in table:
            name = f"{kind}_s{seed}_T{n_tasks}_N{n}_M{m}"
            out = (run_trainer if kind == "trainer" else run_fixed_sampler)(src, seed, n_tasks, n, m, data)
            for key in ("disjoint", "blurry", "indices"):
                tensors[f"{name}/{key}"], tensors[f"{name}/{key}_sizes"] = flat(out[key])
            if kind == "trainer":
                tensors[f"{name}/exposed"] = torch.tensor(out["exposed"], dtype=torch.int32)
                for key in ("eval_samples", "num_eval", "exposed_at_eval"):
                    tensors[f"{name}/{key}"] = torch.tensor(out[key], dtype=torch.int32)
                print(f"{name}: task sizes {[len(t) for t in out['indices']]}, {len(out['eval_samples'])} A_auc points")
            cases.append({"name": name, "kind": kind, "seed": seed, "n_tasks": n_tasks, "N": n, "M": m,
                          "variant": "stochastic" if kind == "trainer" else "fixed"})
    write_golden("si_blurry", tensors, repository=REPOSITORY, commit=COMMIT, files=FILES,
                 script="tools/reference/si_blurry.py",
                 notes="Official Si-Blurry stream (OnlineSampler via the released _Trainer loop) and A_auc trigger "
                       "points on the digits training labels",
                 extra={"dataset": "digits", "batch_size": BATCH, "eval_period": PERIOD, "cases": cases})


if __name__ == "__main__":
    main()

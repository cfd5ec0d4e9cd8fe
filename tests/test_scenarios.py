"""Scenario invariants on a synthetic in-memory dataset and the built-in ``digits``.

Class-/task-incremental: disjoint class groups covering every class, every sample in exactly
one experience, labels remapped by the (seeded) class order, impossible splits rejected with
a suggestion.  Domain-incremental: permuted / rotated / split / datasets-as-domains.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clbench.data import load_dataset
from clbench.data.types import ImageDataset, ImageSplit
from clbench.registry import ClbenchError, register_dataset
from clbench.scenarios import build_stream
from clbench.scenarios.base import PixelPermutation, Rotation
from clbench.scenarios.class_incremental import ClassSplitConfig, TaskSplitConfig
from clbench.scenarios.domain_incremental import DomainConfig

SYN = "synthetic_test"
N_CLASSES = 10
# Uneven class sizes: class c has 3 + 2c training and 1 + c test samples.
TRAIN_SIZES = [3 + 2 * c for c in range(N_CLASSES)]
TEST_SIZES = [1 + c for c in range(N_CLASSES)]


def _split(sizes: list[int], gen: torch.Generator, shape=(1, 4, 4), n_classes: int = N_CLASSES) -> ImageSplit:
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(sizes[:n_classes])])
    y = y[torch.randperm(y.numel(), generator=gen)]  # interleave classes
    x = torch.randint(0, 256, (y.numel(), *shape), dtype=torch.uint8, generator=gen)
    return ImageSplit(x, y)


def _make(name: str, seed: int, shape=(1, 4, 4), n_classes: int = N_CLASSES) -> ImageDataset:
    gen = torch.Generator().manual_seed(seed)
    channels = shape[0]
    return ImageDataset(
        name=name, train=_split(TRAIN_SIZES, gen, shape, n_classes), test=_split(TEST_SIZES, gen, shape, n_classes),
        class_names=tuple(f"c{c}" for c in range(n_classes)),
        mean=(0.5,) * channels, std=(0.25,) * channels,
    )


@register_dataset(SYN, description="synthetic 10-class 1x4x4 dataset (tests only)")
def synthetic_test(root=None, cache_dir=None) -> ImageDataset:
    return _make(SYN, 123)


@register_dataset("synthetic_test_b", description="second synthetic dataset, same shape, 8 classes (tests only)")
def synthetic_test_b(root=None, cache_dir=None) -> ImageDataset:
    return _make("synthetic_test_b", 456, n_classes=8)


@register_dataset("synthetic_test_rgb", description="synthetic 3x4x4 dataset (tests only)")
def synthetic_test_rgb(root=None, cache_dir=None) -> ImageDataset:
    return _make("synthetic_test_rgb", 789, shape=(3, 4, 4))


def class_stream(seed: int = 0, protocol: str = "class", **kw):
    cfg_cls = ClassSplitConfig if protocol == "class" else TaskSplitConfig
    kw.setdefault("dataset", SYN)
    return build_stream(cfg_cls(**kw), seed=seed)


def _assert_partition(idx_lists: list[torch.Tensor], n: int) -> None:
    """Every index in 0..n-1 occurs in exactly one of ``idx_lists``."""
    counts = torch.bincount(torch.cat(idx_lists), minlength=n)
    assert counts.numel() == n
    assert bool((counts == 1).all()), f"counts {counts.tolist()}"


# --------------------------------------------------------------------------- class-incremental


@pytest.mark.parametrize("dataset,n_tasks", [(SYN, 5), (SYN, 2), (SYN, 10), ("digits", 5)])
def test_class_il_partitions_classes_and_samples(dataset, n_tasks):
    s = class_stream(seed=3, dataset=dataset, n_tasks=n_tasks)
    raw = load_dataset(dataset)
    assert s.protocol == "class" and len(s) == n_tasks and s.num_classes == 10
    per = 10 // n_tasks
    all_classes = torch.cat([e.classes for e in s])
    assert sorted(all_classes.tolist()) == list(range(10))  # disjoint and covering
    for k, e in enumerate(s):
        assert e.index == k and e.task_id == k
        assert e.classes.tolist() == list(range(k * per, (k + 1) * per))  # k-th block of remapped ids
        assert set(s.train.y[e.train_idx].tolist()) == set(e.classes.tolist())
        assert set(s.test.y[e.test_idx].tolist()) == set(e.classes.tolist())
        assert e.transform is None
    _assert_partition([e.train_idx for e in s], len(s.train))
    _assert_partition([e.test_idx for e in s], len(s.test))
    assert len(s.train) == len(raw.train) and len(s.test) == len(raw.test)
    # Experience sizes follow the (uneven) class sizes of the original labels in the group.
    for e in s:
        originals = [s.class_order[c] for c in e.classes.tolist()]
        assert e.train_idx.numel() == int(torch.isin(raw.train.y, torch.tensor(originals)).sum())


@pytest.mark.parametrize("dataset", [SYN, "digits"])
def test_class_order_is_permutation_consistent_with_remap(dataset):
    s = class_stream(seed=11, dataset=dataset, n_tasks=5)
    raw = load_dataset(dataset)
    assert sorted(s.class_order) == list(range(10))
    assert list(s.class_order) != list(range(10))  # seeded shuffle (seed 11 is not the identity)
    position = {orig: j for j, orig in enumerate(s.class_order)}
    expected_train = torch.tensor([position[int(v)] for v in raw.train.y])
    expected_test = torch.tensor([position[int(v)] for v in raw.test.y])
    assert torch.equal(s.train.y, expected_train)
    assert torch.equal(s.test.y, expected_test)
    assert torch.equal(s.train.x, raw.train.x)  # all classes kept: images untouched, same order
    assert s.class_names == tuple(raw.class_names[c] for c in s.class_order)
    assert s.info["classes_per_task"] == [2] * 5


def test_same_seed_same_stream_different_seed_different_order():
    a, b = class_stream(seed=5), class_stream(seed=5)
    assert a.class_order == b.class_order
    assert torch.equal(a.train.y, b.train.y) and torch.equal(a.test.y, b.test.y)
    for ea, eb in zip(a, b):
        assert torch.equal(ea.classes, eb.classes)
        assert torch.equal(ea.train_idx, eb.train_idx)
        assert torch.equal(ea.test_idx, eb.test_idx)
    orders = {class_stream(seed=s).class_order for s in range(6)}
    assert len(orders) == 6  # every seed gives its own order
    assert class_stream(seed=5).class_order != class_stream(seed=6).class_order


def test_shuffle_false_gives_sorted_order():
    s = class_stream(seed=7, shuffle_classes=False)
    assert s.class_order == tuple(range(10))
    assert torch.equal(s.train.y, load_dataset(SYN).train.y)


def test_initial_classes_then_equal_steps():
    s = class_stream(seed=1, n_tasks=4, initial_classes=4)
    assert [e.classes.numel() for e in s] == [4, 2, 2, 2]
    assert [e.classes.tolist() for e in s] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert s.info["classes_per_task"] == [4, 2, 2, 2]
    _assert_partition([e.train_idx for e in s], len(s.train))
    s = class_stream(seed=1, n_tasks=2, initial_classes=6)
    assert [e.classes.numel() for e in s] == [6, 4]


@pytest.mark.parametrize(
    "kw,valid",
    [
        (dict(n_tasks=7), "[1, 2, 5, 10]"),  # 10 classes do not split into 7
        (dict(n_tasks=3), "[1, 2, 5, 10]"),
        (dict(n_tasks=11), "[1, 2, 5, 10]"),  # more tasks than classes
        (dict(n_tasks=4, initial_classes=3), "[2, 8]"),  # B3 leaves 7 classes for 3 tasks
        (dict(n_tasks=1, initial_classes=4), "[2, 3, 4, 7]"),  # B4 alone leaves 6 unused
    ],
)
def test_impossible_split_raises_with_suggestion(kw, valid):
    with pytest.raises(ClbenchError) as info:
        class_stream(**kw)
    msg = str(info.value)
    assert "n_tasks" in msg and valid in msg, msg
    assert SYN in msg  # names the dataset


def test_allow_uneven():
    s = class_stream(n_tasks=7, allow_uneven=True)
    sizes = [e.classes.numel() for e in s]
    assert sizes == [2, 2, 2, 1, 1, 1, 1]
    assert sorted(torch.cat([e.classes for e in s]).tolist()) == list(range(10))
    _assert_partition([e.train_idx for e in s], len(s.train))
    s = class_stream(n_tasks=4, initial_classes=3, allow_uneven=True)
    assert [e.classes.numel() for e in s] == [3, 3, 2, 2]
    with pytest.raises(ClbenchError):  # more tasks than classes stays impossible
        class_stream(n_tasks=11, allow_uneven=True)


def test_classes_subset():
    raw = load_dataset(SYN)
    subset = [7, 2, 9, 4]
    s = class_stream(seed=2, classes=subset, n_tasks=2)
    assert s.num_classes == 4 and sorted(s.class_order) == sorted(subset)
    keep_train = torch.isin(raw.train.y, torch.tensor(subset))
    assert len(s.train) == int(keep_train.sum())
    assert torch.equal(s.train.x, raw.train.x[keep_train])
    position = {orig: j for j, orig in enumerate(s.class_order)}
    assert s.train.y.tolist() == [position[int(v)] for v in raw.train.y[keep_train]]
    assert [e.classes.tolist() for e in s] == [[0, 1], [2, 3]]
    _assert_partition([e.train_idx for e in s], len(s.train))
    _assert_partition([e.test_idx for e in s], len(s.test))
    with pytest.raises(ClbenchError, match="classes"):
        class_stream(classes=[3, 10], n_tasks=1)


def test_explicit_class_order():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    s1, s2 = class_stream(seed=0, class_order=order), class_stream(seed=99, class_order=order)
    assert s1.class_order == tuple(order) == s2.class_order  # overrides the seed
    raw = load_dataset(SYN)
    assert torch.equal(s1.train.y, 9 - raw.train.y)
    # e.g. experience 0 holds original labels 9 and 8
    assert set(raw.train.y[s1[0].train_idx].tolist()) == {9, 8}
    # an explicit order may also restrict the classes
    s = class_stream(class_order=[3, 1], n_tasks=2)
    assert s.num_classes == 2 and len(s.train) == TRAIN_SIZES[3] + TRAIN_SIZES[1]
    for bad in ([1, 1, 2], [0, 10]):
        with pytest.raises(ClbenchError, match="class_order"):
            class_stream(class_order=bad, n_tasks=1)


def test_task_incremental_same_split_and_task_mask():
    c, t = class_stream(seed=4), class_stream(seed=4, protocol="task")
    assert t.protocol == "task" and t.n_tasks == 5
    assert c.class_order == t.class_order
    for ec, et in zip(c, t):
        assert torch.equal(ec.train_idx, et.train_idx) and torch.equal(ec.classes, et.classes)
    for k in range(len(t)):
        mask = t.class_mask(k)
        assert mask.shape == (5, 10) and mask.dtype == torch.bool
        for e in t:
            assert mask[e.task_id].nonzero().flatten().tolist() == e.classes.tolist()


def test_class_il_mask_is_classes_seen_so_far():
    s = class_stream(seed=4, n_tasks=4, initial_classes=4)
    for k in range(len(s)):
        mask = s.class_mask(k)
        assert mask.shape == (4, 10)
        seen = torch.cat([e.classes for e in s.experiences[: k + 1]]).tolist()
        for row in mask:
            assert row.nonzero().flatten().tolist() == sorted(seen)
    assert not bool(s.class_mask(0)[:, 4:].any())


# --------------------------------------------------------------------------- domain-incremental


def domain_stream(seed: int = 0, **kw):
    kw.setdefault("dataset", SYN)
    return build_stream(DomainConfig(**kw), seed=seed)


def test_permuted_domains():
    raw = load_dataset(SYN)
    s = domain_stream(seed=0, domain="permuted", n_tasks=4)
    assert s.protocol == "domain" and len(s) == 4 and s.num_classes == 10
    assert torch.equal(s.train.y, raw.train.y) and torch.equal(s.train.x, raw.train.x)
    perms = []
    for e in s:
        assert torch.equal(e.train_idx, torch.arange(len(raw.train)))
        assert torch.equal(e.test_idx, torch.arange(len(raw.test)))
        assert e.classes.tolist() == list(range(10))
        assert isinstance(e.transform, PixelPermutation)
        p = e.transform.perm
        assert torch.equal(p.sort().values, torch.arange(16))  # a real permutation of H*W
        perms.append(p)
        # applying it moves pixel p[j] to position j, in every channel
        x = raw.train.x[:5]
        out = e.transform(x)
        assert out.shape == x.shape and out.dtype == torch.uint8
        assert torch.equal(out.reshape(5, 1, 16), x.reshape(5, 1, 16)[:, :, p])
    assert len({tuple(p.tolist()) for p in perms}) == 4  # distinct domains
    assert bool((s.class_mask(0)).all())
    # seeded: same seed same permutations, different seed different ones
    again = domain_stream(seed=0, domain="permuted", n_tasks=4)
    assert all(torch.equal(a.transform.perm, b.transform.perm) for a, b in zip(s, again))
    other = domain_stream(seed=1, domain="permuted", n_tasks=4)
    assert not torch.equal(s[0].transform.perm, other[0].transform.perm)
    # first_identity leaves experience 0 unpermuted
    fi = domain_stream(seed=0, domain="permuted", n_tasks=3, first_identity=True)
    assert fi[0].transform is None and isinstance(fi[1].transform, PixelPermutation)


def test_permutation_applies_same_perm_to_every_channel():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    p = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    out = PixelPermutation(p)(x)
    for c in range(3):
        assert torch.equal(out[:, c].reshape(2, 16), x[:, c].reshape(2, 16)[:, p])


def test_rotated_domains_angles():
    s = domain_stream(domain="rotated", n_tasks=4)
    assert [e.transform.degrees for e in s] == [0.0, 45.0, 90.0, 135.0]  # default i * 180 / n_tasks
    s = domain_stream(domain="rotated", n_tasks=3, rotations=[0, 90, 270])
    assert [e.transform.degrees for e in s] == [0.0, 90.0, 270.0]
    assert all(torch.equal(e.train_idx, torch.arange(len(s.train))) for e in s)
    with pytest.raises(ClbenchError, match="rotations"):
        domain_stream(domain="rotated", n_tasks=3, rotations=[0, 90])


def test_rotation_identity_and_direction():
    raw = load_dataset(SYN)
    x = raw.train.x[:8]
    assert torch.equal(Rotation(0)(x), x)
    assert torch.equal(Rotation(360)(x), x)
    # a known image: a single bright pixel in the top-right corner of a 4x4 image
    img = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    img[0, 0, 0, 3] = 255
    out = Rotation(90)(img)
    # torchvision rotates counter-clockwise for positive angles: top-right -> top-left
    assert out[0, 0, 0, 0] == 255 and int(out.sum()) == 255
    assert torch.equal(out, torch.rot90(img, k=1, dims=(2, 3)))
    ramp = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    assert torch.equal(Rotation(90)(ramp), torch.rot90(ramp, k=1, dims=(2, 3)))
    assert torch.equal(Rotation(180)(ramp), torch.rot90(ramp, k=2, dims=(2, 3)))
    assert torch.equal(Rotation(90)(x), torch.rot90(x, k=1, dims=(2, 3)))


@pytest.mark.parametrize("dataset", [SYN, "digits"])
def test_split_domains(dataset):
    raw = load_dataset(dataset)
    s = domain_stream(seed=3, dataset=dataset, domain="split", n_tasks=5)
    assert s.protocol == "domain" and s.num_classes == 2 and len(s) == 5
    groups = s.info["groups"]
    assert len(groups) == 5 and all(len(g) == 2 for g in groups)
    assert sorted(c for g in groups for c in g) == list(range(10))
    assert tuple(c for g in groups for c in g) == s.class_order
    _assert_partition([e.train_idx for e in s], len(s.train))
    _assert_partition([e.test_idx for e in s], len(s.test))
    for e, group in zip(s, groups):
        assert e.classes.tolist() == [0, 1]
        # samples of this task are exactly those whose original label is in its group
        assert set(raw.train.y[e.train_idx].tolist()) == set(group)
        assert e.train_idx.numel() == int(torch.isin(raw.train.y, torch.tensor(group)).sum())
        # label within the task = position of the original label in the group
        for pos, orig in enumerate(group):
            sel = e.train_idx[raw.train.y[e.train_idx] == orig]
            assert bool((s.train.y[sel] == pos).all())
        assert set(s.test.y[e.test_idx].tolist()) == {0, 1}
    assert domain_stream(seed=3, dataset=dataset, domain="split", n_tasks=5).info["groups"] == groups
    assert domain_stream(seed=4, dataset=dataset, domain="split", n_tasks=5).info["groups"] != groups
    with pytest.raises(ClbenchError, match="n_tasks"):
        domain_stream(dataset=dataset, domain="split", n_tasks=3)


def test_datasets_as_domains():
    a, b = load_dataset(SYN), load_dataset("synthetic_test_b")
    s = domain_stream(domain="datasets", datasets=[SYN, "synthetic_test_b"])
    assert s.protocol == "domain" and len(s) == 2 and s.num_classes == 10
    assert len(s.train) == len(a.train) + len(b.train) and len(s.test) == len(a.test) + len(b.test)
    assert torch.equal(s.train.x[: len(a.train)], a.train.x) and torch.equal(s.train.x[len(a.train):], b.train.x)
    assert torch.equal(s.test.y[len(a.test):], b.test.y)
    assert torch.equal(s[0].train_idx, torch.arange(len(a.train)))
    assert torch.equal(s[1].train_idx, torch.arange(len(a.train), len(a.train) + len(b.train)))
    assert torch.equal(s[1].test_idx, torch.arange(len(a.test), len(a.test) + len(b.test)))
    assert s[0].classes.tolist() == list(range(10)) and s[1].classes.tolist() == list(range(8))
    _assert_partition([e.train_idx for e in s], len(s.train))
    assert s.info["datasets"] == [SYN, "synthetic_test_b"]


def test_datasets_as_domains_errors():
    with pytest.raises(ClbenchError, match="shape"):
        domain_stream(domain="datasets", datasets=[SYN, "synthetic_test_rgb"])
    with pytest.raises(ClbenchError, match="at least two"):
        domain_stream(domain="datasets", datasets=[SYN])
    with pytest.raises(ClbenchError, match="domain"):
        domain_stream(domain="rotatd")
    with pytest.raises(ClbenchError, match="Did you mean 'synthetic_test'"):
        domain_stream(domain="datasets", datasets=[SYN, "synthetic_tst"])


# --------------------------------------------------------------------------- eval subsets


def test_eval_subset():
    s = class_stream(seed=0, dataset="digits", n_tasks=2)
    e0, e1 = s[0], s[1]
    sub = e0.eval_subset(50, seed=0)
    assert sub.numel() == 50 and sub.unique().numel() == 50
    assert bool(torch.isin(sub, e0.test_idx).all())
    assert torch.equal(sub, sub.sort().values)
    assert torch.equal(sub, e0.eval_subset(50, seed=0))  # deterministic
    assert not torch.equal(sub, e0.eval_subset(50, seed=1))  # depends on the seed
    # a different experience draws a different pattern of positions
    pos0 = torch.searchsorted(e0.test_idx, sub)
    pos1 = torch.searchsorted(e1.test_idx, e1.eval_subset(50, seed=0))
    assert not torch.equal(pos0, pos1)
    # all of test_idx when size <= 0 or too large
    assert torch.equal(e0.eval_subset(0, seed=0), e0.test_idx)
    assert torch.equal(e0.eval_subset(10**6, seed=0), e0.test_idx)
    # domain-IL: experiences share test_idx but still get different subsets
    d = domain_stream(dataset="digits", domain="permuted", n_tasks=2)
    assert not torch.equal(d[0].eval_subset(100, seed=0), d[1].eval_subset(100, seed=0))


def test_stream_to_and_describe():
    s = class_stream(seed=0)
    moved = s.to("cpu")
    assert torch.equal(moved.train.x, s.train.x) and moved.experiences is s.experiences
    text = s.describe()
    assert "class-incremental" in text and text.count("Experience(") == 5
    assert s.image_shape == (1, 4, 4)
    assert dataclasses.is_dataclass(s)

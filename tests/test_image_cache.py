"""The image cache: bit-identical tensors, shared between loader workers, reused across runs (image_cache.py)."""
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dinomaly import dataset as ds
from dinomaly import image_cache
from dinomaly.errors import UserError
from dinomaly.image_cache import ImageCache, build_cache

from prepare_data.make_demo_data import make_demo_data


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = make_demo_data(str(tmp_path_factory.mktemp("cache_data")), size=72, seed=0, n_train=3, n_test_good=1,
                          n_test_bad=2)
    train = ds.mvtec_samples(root["mvtec"], "nut", "train") + ds.realiad_samples(root["realiad"], "weave", "train")[0]
    test = ds.mvtec_samples(root["mvtec"], "weave", "test")
    return train, test  # PNG and JPEG images, anomalous test images with masks


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_tensors_are_bit_identical(samples, mode, tmp_path):
    train, test = samples
    for items, cls in ((train, ds.TrainDataset), (test, ds.TestDataset)):
        cache = build_cache(mode, [s.image_path for s in items], 64, str(tmp_path))
        plain, cached = cls(items, 64, 56), cls(items, 64, 56, cache)
        for _ in range(2):  # filling, then reading back
            for i in range(len(items)):
                a, b = plain[i], cached[i]
                for x, y in zip(a if isinstance(a, tuple) else [a], b if isinstance(b, tuple) else [b]):
                    assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        assert cache.filled_count() == len(items)
        np.testing.assert_array_equal(cache.get(items[0].image_path),
                                      np.asarray(ds.resize(ds.load_image(items[0].image_path), 64)))


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_workers_fill_one_shared_cache(samples, mode, tmp_path):
    train = samples[0]
    cache = ImageCache([s.image_path for s in train], 64, mode, str(tmp_path))
    loader = DataLoader(ds.TrainDataset(train, 64, 56, cache), batch_size=2, num_workers=2,
                        multiprocessing_context="fork")
    assert sum(len(b) for b in loader) == len(train)
    assert cache.filled_count() == len(train)  # filled by the workers, seen by this process


def test_disk_cache_is_reused_until_an_image_changes(samples, tmp_path):
    paths = [s.image_path for s in samples[1]]
    first = ImageCache(paths, 64, "disk", str(tmp_path))
    for p in paths:
        first.get(p)
    again = ImageCache(paths, 64, "disk", str(tmp_path))
    assert again.file == first.file and again.filled_count() == len(paths)
    clone = pickle.loads(pickle.dumps(again))  # what a spawned worker receives
    np.testing.assert_array_equal(clone.get(paths[1]), first.get(paths[1]))
    os.utime(paths[0], ns=(0, 12345))  # another modification time: another cache
    changed = ImageCache(paths, 64, "disk", str(tmp_path))
    assert changed.file != first.file and changed.filled_count() == 0
    assert ImageCache(paths, 72, "disk", str(tmp_path)).file != first.file


def test_cache_errors(samples):
    paths = [s.image_path for s in samples[1]]
    cache = ImageCache(paths, 64, "memory")
    with pytest.raises(KeyError, match="not one of the"):
        cache.get("elsewhere.png")
    with pytest.raises(UserError, match="--cache_images disk"):
        pickle.dumps(cache)
    assert not cache.get(paths[0]).flags.writeable
    assert build_cache("none", paths, 64, None) is None


def test_a_cache_larger_than_the_free_memory_is_refused(samples, monkeypatch):
    monkeypatch.setattr(image_cache, "available_memory", lambda: 10 ** 6)
    with pytest.raises(UserError, match="needs 0.0 GB of memory.*use --cache_images disk or none"):
        ImageCache([s.image_path for s in samples[0]], 256, "memory")
    assert 0 < image_cache.available_memory()
    # several caches that each fit but not together
    paths = [s.image_path for s in samples[0]]
    one = image_cache.cache_bytes(len(paths), 64, 3)
    monkeypatch.setattr(image_cache, "available_memory", lambda: int(one / 0.8) + 1)
    parts = {"a": (paths, image_cache.PIL_RGB), "b": (paths, image_cache.PIL_RGB)}
    assert len(image_cache.build_caches("memory", {"a": parts["a"]}, 64, None)) == 1
    with pytest.raises(UserError, match="memory"):
        image_cache.build_caches("memory", parts, 64, None)
    assert image_cache.build_caches("none", parts, 64, None) == {}
    # under torchrun each process of the machine keeps its own copy: one that fits once, not twice
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"\(2 processes, one copy each\)"):
        image_cache.build_caches("memory", {"a": parts["a"]}, 64, None)

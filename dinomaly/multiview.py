"""Dinomaly2's multi-view evaluation (Real-IAD, Real-IAD Variety, MANTA-Tiny): the object level as the preview
code computes it, and Real-IAD's official sample level, streamed and mergeable across processes.

- Object (the views sharing a Sample.object_id, see dataset.realiad_samples and manta_samples): score = mean of
  the top int(V * 65536 * max_ratio) values of its V views' smoothed 256 x 256 maps taken together (max_ratio 0:
  their maximum), V the object's own number of views (the preview needs the same V for all objects); label = the
  maximum of its views' labels. O-AUROC, O-AP, O-F1max over the objects of a class.
- Sample (Real-IAD's ADEval tool): the views whose file names share the part before `_C<view>_`
  (`audiojack_0001_OK` for `audiojack_0001_OK_C1_20231021130209.jpg`, the group of ADEval's pattern for Real-IAD);
  score = the maximum of the views' image scores, label = the maximum of their labels. S-AUROC over the samples;
  NaN when a file name has no `_C<view>_` (MANTA-Tiny).

Streaming: of each view only its own top k values are kept (k: its object's), merged into the object's top k as
views arrive (the top k of a union lies within the union of the members' top k), so memory is bounded by the
objects, not by the maps.
"""
import math
import os
import re
from collections import Counter

import numpy as np

from .run import log
from .utils import OBJECT_METRIC_NAMES, binary_metrics

SAMPLE_KEY = re.compile(r"^(.+?)_C\d+_")  # file name -> Real-IAD sample


def sample_key(path: str) -> str | None:
    """The Real-IAD sample of an image: its file name before `_C<view>_`, or None."""
    m = SAMPLE_KEY.match(os.path.basename(path))
    return m.group(1) if m else None


def top_values(values: np.ndarray, k: int) -> np.ndarray:
    """The k largest of `values` (all of them when there are no more than k), in no particular order."""
    return values if values.size <= k else np.partition(values, values.size - k)[values.size - k:]


class ObjectAccumulator:
    """The object- and sample-level metrics of one class, fed batch by batch by any share of its views.

    samples: all the class's test samples (with object_id); pixels: the values per map (65536); max_ratio: the
    image score's share of the map (--max_ratio). Sharded use: like utils.ClassAccumulator, each process adds its
    views, and ObjectAccumulator.merge(states).compute() gives the single-process metrics exactly."""

    def __init__(self, samples: list, max_ratio: float, pixels: int, class_name: str = ""):
        self.class_name = class_name
        self.objects = [s.object_id for s in samples]  # by sample index
        self.samples = [sample_key(s.image_path) for s in samples]
        self.views = dict(Counter(self.objects))
        self.k = {o: int(v * pixels * max_ratio) if max_ratio else 1 for o, v in self.views.items()}
        self.top: dict[str, np.ndarray] = {}  # object -> the top k values of its views so far
        self.seen: Counter = Counter()  # object -> views added
        self.labels: dict[str, int] = {}  # object -> max view label
        self.sample_scores: dict[str, list] = {}  # Real-IAD sample -> [max view score, max view label]

    def add(self, indices: list[int], labels, maps, scores) -> None:
        """Views `indices` (into the class's samples) with their labels [B], smoothed maps [B, H, W] and image
        scores [B] (numpy arrays or CPU tensors)."""
        maps = np.asarray(maps, dtype=np.float32).reshape(len(indices), -1)
        for i, label, values, score in zip(indices, np.asarray(labels).tolist(), maps, np.asarray(scores).tolist()):
            o, k = self.objects[i], self.k[self.objects[i]]
            self._merge_object(o, top_values(values, k).copy(), 1, int(label))
            key = self.samples[i]
            if key is not None:
                self._merge_sample(key, float(score), int(label))

    def _merge_object(self, o: str, top: np.ndarray, seen: int, label: int) -> None:
        if o in self.top:
            top = top_values(np.concatenate([self.top[o], top]), self.k[o])
        self.top[o], self.labels[o] = top, max(label, self.labels.get(o, 0))
        self.seen[o] += seen

    def _merge_sample(self, key: str, score: float, label: int) -> None:
        old = self.sample_scores.get(key, [-math.inf, 0])
        self.sample_scores[key] = [max(old[0], score), max(old[1], label)]

    def state(self) -> dict:
        return {"class_name": self.class_name, "objects": self.objects, "samples": self.samples, "views": self.views,
                "k": self.k, "top": self.top, "seen": dict(self.seen), "labels": self.labels,
                "sample_scores": self.sample_scores}

    @classmethod
    def merge(cls, states: list[dict]) -> "ObjectAccumulator":
        """One accumulator of all the views behind `states` (from state(), one per process)."""
        acc = cls.__new__(cls)
        first = states[0]
        acc.class_name, acc.objects, acc.samples, acc.views, acc.k = (first[f] for f in
                                                                     ("class_name", "objects", "samples", "views", "k"))
        acc.top, acc.seen, acc.labels, acc.sample_scores = {}, Counter(), {}, {}
        for s in states:
            for o, top in s["top"].items():
                acc._merge_object(o, top, s["seen"][o], s["labels"][o])
            for key, (score, label) in s["sample_scores"].items():
                acc._merge_sample(key, score, label)
        return acc

    def object_scores(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(objects sorted, their labels, their scores: the mean of each object's top k values)."""
        missing = [o for o, v in self.views.items() if self.seen[o] != v]
        if missing:
            raise ValueError(f"{len(missing)} objects of {self.class_name} were not fed all their views "
                             f"(e.g. {missing[0]}: {self.seen[missing[0]]} of {self.views[missing[0]]})")
        objects = sorted(self.views)
        scores = [np.sort(self.top[o])[::-1].mean(dtype=np.float64) for o in objects]
        return objects, np.array([self.labels[o] for o in objects]), np.array(scores)

    def compute(self) -> dict[str, float]:
        """O-AUROC, O-AP, O-F1max and S-AUROC (NaN when one label is absent; S-AUROC also
        when a view's file name has no `_C<view>_`)."""
        counts = sorted(set(self.views.values()))
        if len(counts) > 1:
            log.warning(f"warning: {self.class_name}: objects have {counts[0]} to {counts[-1]} views; each object's "
                        f"score takes the top share of its own views' maps")
        _, labels, scores = self.object_scores()
        s_auroc = math.nan
        if self.sample_scores and None not in self.samples:
            s_labels, s_scores = zip(*((lab, sc) for sc, lab in self.sample_scores.values()))
            s_auroc = binary_metrics(s_labels, s_scores)[0]
        return dict(zip(OBJECT_METRIC_NAMES, (*binary_metrics(labels, scores), s_auroc)))

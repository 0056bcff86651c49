"""The one evaluation loop: per class, the maps and scores of an AnomalyMapper, the metrics (utils.py), the
thresholds (thresholds.py), the run folder's tables and pictures (report.py), and the class prototypes
(class_finder.py); shared by the processes under torchrun."""
import csv

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import class_finder, models, samples
from . import dataset as ds
from .anomaly_map import MAP_SIZE, AnomalyMapper, binarize_gt
from .errors import UserError
from .multiview import ObjectAccumulator
from .options import DataOptions, EvalOptions
from .report import ClassReport
from .run import Run, log, save_atomic
from .thresholds import Calibration, PixelSample
from .train import progress_off
from .training_data import image_cache
from .utils import IR_METRIC_NAMES, ClassAccumulator, mad, nanmean, write_metrics_csv


def evaluate(run: Run, mapper: AnomalyMapper, data: DataOptions, evaluation: EvalOptions, image_size: int,
             crop_size: int, tag: str = "") -> dict:
    """The one evaluation loop: per class, smoothed maps and scores from `mapper`, ground truth at 256, the
    seven metrics, streamed into a ClassAccumulator (no class's maps are kept). Under torchrun every process
    evaluates every world_size-th image and the first gathers the results: the metrics are the same as in one
    process. The first process prints the table and writes metrics<tag>.csv, scores<tag>.csv,
    thresholds<tag>.json and the pictures (report.py). With --multiview on, the metrics add the object and sample
    level (multiview.py). Images are resized to image_size and cropped to crop_size (the model's recipe).
    Returns {class: metrics} (empty on the other processes)."""
    results, score_rows, reports = {}, [], []
    calibration = Calibration(mapper.scoring_settings(), evaluation.false_alarm_rate)
    aupro = evaluation.aupro
    if run.world_size > 1:
        log.info(f"evaluation shared by {run.world_size} processes")
        model = mapper.model
        if model.test_mask == "on" and model.mask_rng == "cpu":
            log.warning("warning: CRR's test-time masks come from each process's CPU random stream (--mask_rng cpu), "
                        "so the metrics depend on the number of processes; --mask_rng device gives those of one "
                        "process")
    for name in ds.class_names(data.dataset, data.classes):
        shard = evaluate_shard(run, mapper, test_samples(data, run.options.seed, name, evaluation.multiview == "on"),
                               name, data, evaluation, image_size, crop_size)
        parts = run.gather(shard)
        if not run.is_main:
            continue
        results[name] = ClassAccumulator.merge([p[0] for p in parts], aupro=aupro).compute()
        if parts[0][4] is not None:
            results[name].update(ObjectAccumulator.merge([p[4] for p in parts]).compute())
        if parts[0][5] is not None:  # RGB + infrared: the infrared images' pixel metrics
            ir = ClassAccumulator.merge([p[5] for p in parts], aupro=aupro).compute()
            results[name].update({k: ir[k.removeprefix("IR-")] for k in IR_METRIC_NAMES})
        rows = [row for _, row in sorted(r for p in parts for r in p[1])]  # in the dataset's order
        labels, scores = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])
        pixels = PixelSample.merge([p[2] for p in parts]).arrays()
        entry = calibration.add(name, labels, scores, *pixels)
        log.info(samples.metrics_line(name, results[name], entry))
        too_few = samples.too_few_warning(name, entry)
        if too_few:
            log.warning(too_few)
        reports.append((ClassReport.merge([p[3] for p in parts]), name, entry, labels, scores, pixels[:2]))
        score_rows += rows
    if not run.is_main:
        return results
    mean = write_results(run, results, tag)
    run.events.scalars(run.events.step, {f"eval{tag}/{metric}/{name}": value
                                         for name, m in [*results.items(), ("mean", mean)]
                                         for metric, value in {**m, "mAD": mad(m)}.items()})
    with open(run.path(f"scores{tag}.csv"), "w", newline="", errors="backslashreplace") as f:
        csv.writer(f).writerows([["class", "image_path", "label", "score"], *score_rows])
    calibration.save(run.path(f"thresholds{tag}.json"))
    for report, *what in reports:  # the pictures last: a failing picture costs a picture, not the results
        report.save(run.dir, tag, *what)
    return results


def write_results(run: Run, results: dict, tag: str = "") -> dict:
    """The mean over the classes (logged when there are several) and metrics<tag>.csv: a row per class and the
    mean. Returns the mean."""
    mean = {k: nanmean([r[k] for r in results.values()]) for k in next(iter(results.values()))}
    if len(results) > 1:
        log.info(samples.metrics_line("Mean", mean))
    write_metrics_csv(run.path(f"metrics{tag}.csv"), results, mean)
    return mean


def evaluate_shard(run: Run, mapper: AnomalyMapper, class_samples: list[ds.Sample], name: str, data: DataOptions,
                   evaluation: EvalOptions, image_size: int,
                   crop_size: int) -> tuple[dict, list, PixelSample, ClassReport, dict | None, dict | None]:
    """This process's share of one class (images rank, rank + world_size, ...): (the accumulator's state, score
    rows with their index in `class_samples`, the pixel sample for calibration, the pictures' candidates, the object
    accumulator's state when the samples are views grouped into objects, else None, the infrared images' pixel
    accumulator's state for RGB + infrared pairs, else None). A pair's score is the mean of its two images' (the
    preview's object score, their sum, halved: the same ranking, on the maps' scale), its label the largest of its
    modalities'; its RGB image gives the pixel metrics, the pictures and the pixel threshold, its infrared image
    the IR-* metrics."""
    index = list(range(run.rank, len(class_samples), run.world_size))
    shard = [class_samples[i] for i in index]
    test_set = ds.TestDataset(shard, image_size, crop_size, image_cache(data, shard, image_size, ("disk",)))
    loader = DataLoader(test_set, batch_size=evaluation.batch_size, shuffle=False, num_workers=data.num_workers,
                        pin_memory=run.device.type == "cuda")
    acc, pixels, report = ClassAccumulator(evaluation.aupro), PixelSample(len(class_samples) * MAP_SIZE ** 2), \
        ClassReport(evaluation.save_heatmaps, pair_kind=class_samples[0].pair_kind)
    objects = ObjectAccumulator(class_samples, mapper.max_ratio, MAP_SIZE ** 2, name) \
        if class_samples[0].object_id is not None else None
    ir = ClassAccumulator(evaluation.aupro) if class_samples[0].pair_kind == "infrared" else None
    rows = []
    gt_mode, seed = evaluation.gt_binarize, run.options.seed

    def seeds(first: int, n: int) -> list[int] | None:  # the test-time mask seeds of images first .. first + n - 1
        return mask_seeds(seed, name, index[first:first + n]) if mapper.model.mask_rng == "device" else None

    batches = tqdm(loader, desc=f"eval {name}", leave=False, dynamic_ncols=True, disable=progress_off(run))
    with torch.no_grad():
        for first, (img, mask, label, has_mask, paths), amap, score in mapped_batches(mapper, batches, run.device,
                                                                                      seeds):
            ids = index[first:first + len(paths)]
            gt = binarize_gt(mask, MAP_SIZE, gt_mode)
            infrared = None
            if ir is not None:  # [RGB maps, infrared maps]: the model sees the pair's two images side by side
                b = len(paths)
                ir.add_pixels(amap[b:], gt[:, 1])
                infrared = gt[:, 1], amap[b:], score[:b], score[b:]
                amap, score = amap[:b], (score[:b] + score[b:]) / 2
            gt = gt[:, 0]
            acc.add(label, score, amap, gt, has_mask)
            pixels.add(amap[has_mask].numpy(), gt[has_mask].numpy(), [i for i, h in zip(ids, has_mask) if h])
            report.add(img, gt, amap, score, label, paths, infrared)
            if objects is not None:
                objects.add(ids, label, amap, score)
            rows += [(i, [name, p, int(l), s]) for i, p, l, s in zip(ids, paths, label.tolist(), score.tolist())]
    return acc.state(), rows, pixels, report, None if objects is None else objects.state(), \
        None if ir is None else ir.state()


def mapped_batches(mapper: AnomalyMapper, batches, device: torch.device, seeds):
    """(index of the batch's first image, batch, map [B, 256, 256], score [B]) on the CPU for each batch (images
    first); seeds(first, n) gives the test-time mask seeds of the n images from the first-th on. A batch's map is
    queued on the device, and its copy to the CPU after it, before the previous batch is handed over: on a GPU the
    next batch is computed while the caller accumulates metrics on the CPU. The results are those of one batch at
    a time."""
    pending, first = None, 0
    for batch in batches:
        amap, score = mapper(batch[0].to(device, non_blocking=True), seeds(first, len(batch[0])))
        copied = None
        if device.type == "cuda":
            copied = torch.cuda.Event()
            amap, score = amap.to("cpu", non_blocking=True), score.to("cpu", non_blocking=True)
            copied.record()
        if pending is not None:
            yield handed_over(*pending)
        pending = first, batch, amap[:, 0], score, copied
        first += len(batch[0])
    if pending is not None:
        yield handed_over(*pending)


def handed_over(first: int, batch, amap: torch.Tensor, score: torch.Tensor, copied):
    if copied is not None:
        copied.synchronize()  # the copies to the CPU have landed
    return first, batch, amap.cpu(), score.cpu()


def save_class_prototypes(run: Run, mapper: AnomalyMapper, data: DataOptions, image_size: int, crop_size: int,
                          batch_size: int):
    """class_prototypes.pt in the run folder, from the training images (class_finder): predict.py then finds
    each image's class and uses its thresholds without --class_name."""
    if not run.is_main:
        return
    seed = run.options.seed
    try:
        train = {c: samples.split_training(data, seed, c)[0] for c in ds.class_names(data.dataset, data.classes)}
    except UserError as e:  # e.g. an evaluation of an official model without its training images
        log.warning(f"warning: no {class_finder.FILE} written ({e}): predict.py will use the all-classes thresholds")
        return
    prototypes = class_finder.build(mapper, train, image_size, crop_size, run.device, batch_size, data.num_workers,
                                    seed)
    save_atomic(prototypes, run.path(class_finder.FILE))
    log.info(f"saved {run.path(class_finder.FILE)}: the prototypes of {len(train)} "
             f"class{'es' * (len(train) != 1)}, with which predict.py finds each image's class")


def test_samples(data: DataOptions, seed: int, class_name: str, multiview: bool) -> list[ds.Sample]:
    found, missing = samples.test_samples(data, seed, class_name, multiview)
    if missing:
        log.warning(f"warning: {class_name}: {missing} anomalous samples have no mask_path; " +
                    ("they count as normal views (the defect is not visible in them), as in the Dinomaly2 preview"
                     if multiview else "they count for the image metrics only"))
    return found


def mask_seeds(seed: int, class_name: str, indices: list[int]) -> list[int]:
    """Per-image seeds of CRR's test-time masks drawn on the device (--mask_rng device): a hash of the run's seed,
    the class and the image's index in it, so an image's mask does not depend on its batch or process."""
    return [models.mask_seed(f"{seed}/{class_name}/{i}".encode()) for i in indices]

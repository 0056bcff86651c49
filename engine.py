"""The shared engine behind every script: command line, run folder, one training loop, one evaluation loop.

The five user scripts only choose their dataset's defaults and call `dinomaly_main`, `crr_stage1_main`,
`crr_stage2_main` or `crr_test_main`.
"""
import argparse
import csv
import json
import logging
import math
import os
import random
import sys
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import dataset as ds
import models
from loss import focal_loss, global_cosine_hm, hard_mining_factor
from optimizers import StableAdamW, WarmCosineSchedule
from anomaly_map import MAP_SIZE, AnomalyMapper, binarize_gt
from errors import UserError
from utils import METRIC_NAMES, class_metrics, format_metrics, nanmean, write_metrics_csv
from visualize import save_heatmap

DATASET_CLASSES = {"mvtec": ds.MVTEC_CLASSES, "visa": ds.VISA_CLASSES, "realiad": ds.REALIAD_CLASSES}
log = logging.getLogger("anomaly")


# ----------------------------------------------------------------------------------------------- command line

def build_parser(description: str, defaults: dict, stage: str) -> argparse.ArgumentParser:
    """INTERFACE.md's flags. `stage` is one of dinomaly, crr_stage1, crr_stage2, crr_test."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", help="dataset root")
    p.add_argument("--dataset", choices=sorted(DATASET_CLASSES),
                   help="reader and default classes: mvtec and visa read the MVTec layout (also MPDD, BTAD and "
                        "your own data with --classes); realiad reads Real-IAD's JSON splits")
    p.add_argument("--classes", nargs="+", help="classes (folders) to use; default: the dataset's standard list")
    p.add_argument("--save_dir", default="./saved_results")
    p.add_argument("--save_name", help="run folder name under --save_dir")
    p.add_argument("--encoder", choices=list(models.ENCODERS),
                   help="encoder to train with (default dinov2reg_vit_base_14); when loading a checkpoint the "
                        "architecture comes from its config.json or tensor shapes, and this only checks it")
    p.add_argument("--encoder_weights", help="Meta DINOv2 weight file, or 'random' (default: "
                                             "backbones/weights/<Meta file name>)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--total_iters", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--image_size", type=int, default=448)
    p.add_argument("--crop_size", type=int, default=392)
    p.add_argument("--aupro", choices=["exact", "dinomaly"], help="AUPRO definition (SPEC 5)")
    p.add_argument("--gt_binarize", choices=["dinomaly", "crr"],
                   help="pixel ground truth at 256: nearest then >0 (dinomaly) or >=0.5, bilinear, >=0.5 (crr)")
    p.add_argument("--max_ratio", type=float, default=0.01, help="image score = mean of this top share of the map")
    p.add_argument("--save_heatmaps", type=int, default=0, metavar="N",
                   help="write image | ground truth | anomaly map PNGs for the first N anomalous test images of "
                        "each class, into <run>/heatmaps/<class>/")
    p.add_argument("--realiad_resolution", default="realiad_1024",
                   help="Real-IAD image folder: realiad_1024, realiad_512, realiad_256 or realiad_raw")
    p.add_argument("--json_dir", default="realiad_jsons",
                   help="Real-IAD split folder: realiad_jsons, realiad_jsons_sv, realiad_jsons_fuiad_0.1, ...")
    p.add_argument("--log_every", type=int, default=100, help="log the mean loss every N iterations")
    if stage in ("dinomaly", "crr_stage1"):
        p.add_argument("--eval_only", action="store_true", help="skip training; evaluate --checkpoint")
        p.add_argument("--dropout", type=float, help="bottleneck dropout rate")
        p.add_argument("--attn_eps", type=float, default=0.0,
                       help="epsilon in the linear-attention denominator (0 = official; 1e-6 avoids NaNs)")
        p.add_argument("--save_every", type=int, default=1000, help="also save model.pth every N iterations")
    p.add_argument("--checkpoint", help="reconstruction model (ours or official); default for CRR Stage II and "
                                        "test: <save_dir>/<save_name>/model.pth")
    if stage.startswith("crr"):
        p.add_argument("--mask_ratio", type=float, default=0.4, help="bottleneck masking ratio (SPEC 7.2)")
        p.add_argument("--test_mask", choices=["on", "off"], default="on",
                       help="bottleneck masking of the frozen model in eval mode (on = the released code, seeded)")
    if stage in ("crr_stage1", "crr_stage2"):
        p.add_argument("--anomaly_source_path", help="texture images for anomaly synthesis (e.g. DTD); optional")
        p.add_argument("--foreground_path", help="object masks restricting where anomalies go; optional")
    if stage == "crr_test":
        p.add_argument("--seg_checkpoint", help="segmentation network (default <run>/Seg_model_7999.pth)")
        p.add_argument("--fusion_alpha", type=float, default=0.7, help="fused map = a * recon + (1 - a) * seg")
    p.set_defaults(**defaults)
    return p


def run_main(fn, parser: argparse.ArgumentParser, argv=None):
    """Parse, run, and turn a UserError into one line on stderr and exit status 2."""
    args = parser.parse_args(argv)
    try:
        fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- run setup

class Run:
    """Device, distributed state, run folder and logging of one script invocation."""

    def __init__(self, args):
        self.args = args
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.device = self._device(args.device)
        self.is_main = self.rank == 0
        self.dir = os.path.join(args.save_dir, args.save_name)
        os.makedirs(self.dir, exist_ok=True)
        setup_logging(os.path.join(self.dir, "log.txt") if self.is_main else None)
        check_sizes(args.image_size, args.crop_size)
        seed_everything(args.seed + self.rank)
        log.info(f"run folder: {self.dir}  device: {self.device}  processes: {self.world_size}")

    def _device(self, requested: str | None) -> torch.device:
        if self.world_size > 1:
            backend = "nccl" if torch.cuda.is_available() and requested != "cpu" else "gloo"
            dist.init_process_group(backend)
            if backend == "nccl":
                local = int(os.environ.get("LOCAL_RANK", 0))
                torch.cuda.set_device(local)
                return torch.device("cuda", local)
            return torch.device("cpu")
        return resolve_device(requested)

    def save_config(self, name: str = "config.json"):
        """Training runs write config.json (which later stages read); other jobs their own file beside it."""
        if self.is_main:
            with open(os.path.join(self.dir, name), "w") as f:
                json.dump(vars(self.args), f, indent=2)

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()


def check_sizes(image_size: int, crop_size: int):
    """The crop must be a whole number of 14-px patches and fit in the resized image (SPEC 1)."""
    if crop_size % 14:
        raise UserError(f"--crop_size {crop_size} is not a multiple of the patch size 14")
    if not 14 <= crop_size <= image_size:
        raise UserError(f"--crop_size {crop_size} must be between 14 and --image_size {image_size}")


def resolve_device(requested: str | None) -> torch.device:
    """--device, or cuda when available, else the CPU with a warning."""
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("warning: no CUDA device found; running on the CPU, which is very slow")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown --device {requested}; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested} asked for, but no CUDA device is available; use --device cpu")
    return device


def setup_logging(log_file: str | None):
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def save_atomic(state_dict: dict, path: str):
    """Write through a temporary file so an interrupted save never leaves a broken checkpoint."""
    tmp = path + ".tmp"
    torch.save(state_dict, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- data

def class_names(args) -> list[str]:
    return list(args.classes or DATASET_CLASSES[args.dataset])


def check_data_path(args):
    if not os.path.isdir(args.data_path):
        raise UserError(f"dataset folder not found: {args.data_path}; pass --data_path")


def samples_for(args, class_name: str, phase: str) -> list[ds.Sample]:
    if args.dataset == "realiad":
        samples, missing = ds.realiad_samples(args.data_path, class_name, phase, args.realiad_resolution,
                                              args.json_dir)
        if missing and phase == "test":
            log.warning(f"warning: {class_name}: {missing} anomalous samples have no mask_path; they count for the "
                        f"image metrics only")
        return samples
    return ds.mvtec_samples(args.data_path, class_name, phase)


def train_samples(args) -> list[ds.Sample]:
    check_data_path(args)
    samples = [s for c in class_names(args) for s in samples_for(args, c, "train")]
    if getattr(args, "foreground_path", None):
        found = ds.attach_foreground(samples, args.foreground_path)
        log.info(f"foreground masks found for {found} of {len(samples)} training images")
    return samples


def train_loader(run: Run, dataset, batch_size: int) -> DataLoader:
    """Shuffled, drop_last; under torchrun each process gets batch_size / world_size of every batch."""
    if batch_size % run.world_size:
        raise UserError(f"--batch_size {batch_size} is not divisible by the {run.world_size} processes")
    if len(dataset) < batch_size:
        raise UserError(f"only {len(dataset)} training images, fewer than --batch_size {batch_size}")
    log.info(f"train images: {len(dataset)}")
    sampler = DistributedSampler(dataset, shuffle=True, seed=run.args.seed, drop_last=True) \
        if run.world_size > 1 else None
    g = torch.Generator()
    g.manual_seed(run.args.seed)
    return DataLoader(dataset, batch_size=batch_size // run.world_size, shuffle=sampler is None, sampler=sampler,
                      num_workers=run.args.num_workers, drop_last=True, generator=g,
                      pin_memory=run.device.type == "cuda",
                      persistent_workers=run.args.num_workers > 0 and not hasattr(dataset, "set_epoch"))


# ----------------------------------------------------------------------------------------------- training

def train_loop(run: Run, loader: DataLoader, total_iters: int, loss_fn, params: list, optimizer,
               schedule: WarmCosineSchedule | None = None, clip: float | None = None, on_iter_end=None):
    """The one training loop: per step forward + loss (loss_fn(batch, it)) -> zero_grad -> backward -> clip ->
    step; the learning rate of iteration `it` is schedule(it). on_iter_end(done) runs after each step."""
    it, epoch, losses = 0, 0, []
    bar = tqdm(total=total_iters, desc="train", disable=not run.is_main, dynamic_ncols=True)
    start = time.time()
    while it < total_iters:
        for obj in (loader.sampler, loader.dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        for batch in loader:
            if schedule is not None:
                schedule.apply(optimizer, it)
            loss = loss_fn(batch, it)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, max_norm=clip)
            optimizer.step()
            losses.append(loss.detach())  # read back only when logging: no device sync per step
            it += 1
            bar.update(1)
            if it % run.args.log_every == 0 or it == total_iters:
                mean_loss = torch.stack(losses).mean().item()
                if not math.isfinite(mean_loss):
                    raise RuntimeError(f"the loss became {mean_loss} before iteration {it}; try --attn_eps 1e-6")
                log.info(f"iter [{it}/{total_iters}], loss: {mean_loss:.4f}, "
                         f"lr: {optimizer.param_groups[0]['lr']:.3g}, {time.time() - start:.0f}s")
                losses = []
            if on_iter_end is not None:
                on_iter_end(it)
            if it == total_iters:
                break
        epoch += 1
    bar.close()


def ddp_wrap(run: Run, module: torch.nn.Module) -> torch.nn.Module:
    if run.world_size == 1:
        return module
    ids = [run.device.index] if run.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def train_reconstruction(run: Run, model: models.ViTill, loader: DataLoader, repair: bool):
    """Dinomaly training (SPEC 4); with `repair`, CRR Stage I (SPEC 7.3): batches are (img, aug_img, mask) and
    the loss adds the hard-mined distance between the clean encoder features and the decoding of aug_img."""
    args = run.args
    params = model.trainable_parameters()
    optimizer = StableAdamW([{"params": params}], lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4, amsgrad=True,
                            eps=1e-10)
    schedule = WarmCosineSchedule(2e-3, 2e-4, args.total_iters, warmup_iters=100)
    net = ddp_wrap(run, model)
    model.train()

    def loss_fn(batch, it):
        p = hard_mining_factor(it)
        if repair:
            return repair_loss(net, batch[0].to(run.device, non_blocking=True),
                               batch[1].to(run.device, non_blocking=True), p)
        en, de = net(batch.to(run.device, non_blocking=True))
        return global_cosine_hm(en, de, p=p, factor=0.1)

    def save(done):
        if run.is_main and (done % args.save_every == 0 or done == args.total_iters):
            save_atomic(model.state_dict(), os.path.join(run.dir, "model.pth"))

    train_loop(run, loader, args.total_iters, loss_fn, params, optimizer, schedule, clip=0.1, on_iter_end=save)
    log.info(f"saved {os.path.join(run.dir, 'model.pth')}")


def repair_loss(net, img: torch.Tensor, aug_img: torch.Tensor, p: float) -> torch.Tensor:
    """CRR Stage I: HM(en, de) + HM(en, de'), de' decoded from the synthetic image, both towards the clean
    image's encoder features. Both images go through one forward pass (every part of the model works per
    sample), which is also what DDP needs: one forward per backward."""
    b = img.shape[0]
    en, de = net(torch.cat([img, aug_img]))
    en = [e[:b] for e in en]
    de, de_aug = [d[:b] for d in de], [d[b:] for d in de]
    return global_cosine_hm(en, de, p=p, factor=0.1) + global_cosine_hm(en, de_aug, p=p, factor=0.1)


def reconstruction_model(run: Run, default_checkpoint: str | None = None, **kwargs) -> models.ViTill:
    """The model to evaluate or build on: --checkpoint (or the default), architecture from config.json beside
    it when present, else from the tensor shapes."""
    path = run.args.checkpoint or default_checkpoint
    if path is None:
        raise UserError("--eval_only needs --checkpoint PATH")
    return load_reconstruction(path, run.args.encoder, run.device, **kwargs)


def load_reconstruction(path: str, encoder: str | None, device: torch.device, **kwargs) -> models.ViTill:
    """A reconstruction model from `path`, checked against `encoder`, else against the config.json beside it."""
    config = os.path.join(os.path.dirname(path), "config.json")
    if encoder is None and os.path.isfile(config):
        with open(config) as f:
            encoder = json.load(f).get("encoder")
    model = models.load_model(path, encoder=encoder, **kwargs)
    log.info(f"loaded {path} ({model.encoder.cfg.embed_dim}-d encoder, {len(model.decoder)} decoder blocks)")
    return model.to(device)


def fresh_model(run: Run, **kwargs) -> models.ViTill:
    args = run.args
    args.encoder = args.encoder or "dinov2reg_vit_base_14"
    weights = args.encoder_weights or models.default_encoder_weights(args.encoder)
    model = models.build_model(args.encoder, weights, **kwargs)
    if weights == "random":
        log.warning("warning: the encoder has random weights (--encoder_weights random): a smoke run only")
    log.info(f"trainable parameters: {sum(p.numel() for p in model.trainable_parameters()):,}")
    return model.to(run.device)


# ----------------------------------------------------------------------------------------------- evaluation

def evaluate(run: Run, mapper: AnomalyMapper, aupro: str, gt_mode: str, tag: str = "") -> dict:
    """The one evaluation loop: per class, smoothed maps and scores from `mapper`, ground truth at 256, the
    seven metrics; prints the table and writes metrics<tag>.csv and scores<tag>.csv. Returns {class: metrics}."""
    args = run.args
    results, score_rows = {}, []
    for name in class_names(args):
        samples = samples_for(args, name, "test")
        loader = DataLoader(ds.TestDataset(samples, args.image_size, args.crop_size), batch_size=args.batch_size,
                            shuffle=False, num_workers=args.num_workers)
        labels, scores, px_maps, px_masks, shown = [], [], [], [], 0
        with torch.no_grad():
            for img, mask, label, has_mask, paths in tqdm(loader, desc=f"eval {name}", leave=False,
                                                          dynamic_ncols=True):
                amap, score = mapper(img.to(run.device))  # [B, 1, 256, 256], [B]
                gt = binarize_gt(mask, MAP_SIZE, gt_mode)
                amap, score = amap.cpu(), score.cpu()
                labels += label.tolist()
                scores += score.tolist()
                score_rows += [[name, p, int(l), s] for p, l, s in zip(paths, label.tolist(), score.tolist())]
                px_maps.append(amap[has_mask, 0].numpy())
                px_masks.append(gt[has_mask, 0].numpy())
                for i in [i for i, l in enumerate(label.tolist()) if l == 1][:args.save_heatmaps - shown]:
                    save_heatmap(os.path.join(run.dir, "heatmaps", name), paths[i], img[i], gt[i, 0], amap[i, 0],
                                 score[i].item())
                    shown += 1
        maps, masks = np.concatenate(px_maps), np.concatenate(px_masks)
        results[name] = class_metrics(np.array(labels), np.array(scores), masks if masks.any() else None, maps,
                                      aupro=aupro)
        log.info(format_metrics(name, results[name]))
    mean = {k: nanmean([r[k] for r in results.values()]) for k in METRIC_NAMES}
    log.info(format_metrics("Mean", mean))
    write_metrics_csv(os.path.join(run.dir, f"metrics{tag}.csv"), results, mean)
    with open(os.path.join(run.dir, f"scores{tag}.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["class", "image_path", "label", "score"], *score_rows])
    return results


# ----------------------------------------------------------------------------------------------- entry points

def train_and_evaluate(args, crr: bool):
    """Dinomaly (crr False) or CRR Stage I (crr True: reconstruction + repair with bottleneck masking): train
    one model on all classes unless --eval_only, save model.pth, evaluate the reconstruction map."""
    run = Run(args)
    model_kwargs = dict(attn_eps=args.attn_eps)
    if crr:
        model_kwargs.update(mask_ratio=args.mask_ratio, mask_in_eval=args.test_mask == "on")
    if args.eval_only:
        run.save_config("config_eval.json")
        model = reconstruction_model(run, **model_kwargs)
    else:
        model = fresh_model(run, dropout=args.dropout, **model_kwargs)
        train_set = synthetic_train_set(args) if crr else \
            ds.TrainDataset(train_samples(args), args.image_size, args.crop_size)
        loader = train_loader(run, train_set, args.batch_size)
        run.save_config()
        train_reconstruction(run, model, loader, repair=crr)
    run.barrier()
    if run.is_main:
        model.eval()
        seed_everything(args.seed)
        evaluate(run, AnomalyMapper(model, max_ratio=args.max_ratio), args.aupro, args.gt_binarize,
                 tag="_recon" if crr else "")


def dinomaly_main(args):
    train_and_evaluate(args, crr=False)


def crr_stage1_main(args):
    train_and_evaluate(args, crr=True)


def synthetic_train_set(args):
    """CRR's training images, each with a synthetic anomaly (SPEC 7.1)."""
    from synthesis import SyntheticAnomalyDataset, list_textures
    textures = list_textures(args.anomaly_source_path) if args.anomaly_source_path else None
    train_set = SyntheticAnomalyDataset(train_samples(args), args.image_size, args.crop_size, textures, args.seed)
    log.info(f"texture images for anomaly synthesis: {len(textures or [])}")
    return train_set


def stage1_model(run: Run) -> models.ViTill:
    """The frozen Stage-I model of CRR's later stages, in eval mode: --checkpoint or <run>/model.pth."""
    return reconstruction_model(run, os.path.join(run.dir, "model.pth"), mask_ratio=run.args.mask_ratio,
                                mask_in_eval=run.args.test_mask == "on").eval()


def crr_stage2_main(args):
    """CRR Stage II: train the segmentation network on the frozen Stage-I model's third output."""
    run = Run(args)
    run.save_config("config_stage2.json")
    model = stage1_model(run)
    model.requires_grad_(False)
    loader = train_loader(run, synthetic_train_set(args), args.batch_size)
    segnet = models.SegmentationNet(base_width=2 * model.encoder.cfg.embed_dim // 8).to(run.device)
    log.info(f"segmentation network parameters: {sum(p.numel() for p in segnet.parameters()):,}")
    net = ddp_wrap(run, segnet)
    optimizer = torch.optim.Adam(segnet.parameters(), lr=1e-4)
    segnet.train()

    def loss_fn(batch, it):
        aug_img, aug_mask = batch[1].to(run.device, non_blocking=True), batch[2].to(run.device, non_blocking=True)
        with torch.no_grad():
            en, de = model(aug_img)
            seg_in = models.segmentation_input(en, de)
        probs = torch.softmax(net(seg_in), dim=1)
        target = F.interpolate(aug_mask, size=probs.shape[-2:], mode="bilinear", align_corners=False) >= 0.5
        return focal_loss(probs, target)

    def save(done):
        if run.is_main and (done % 4000 == 0 or done == args.total_iters):
            names = [f"Seg_model_{done - 1}.pth"] if done % 4000 == 0 else []
            names += ["Seg_model_last.pth"] if done == args.total_iters else []
            for n in names:
                save_atomic(segnet.state_dict(), os.path.join(run.dir, n))
                log.info(f"saved {os.path.join(run.dir, n)}")

    train_loop(run, loader, args.total_iters, loss_fn, list(segnet.parameters()), optimizer, on_iter_end=save)


def crr_test_main(args):
    """CRR test: fused map 0.7 * reconstruction + 0.3 * segmentation, metrics, optional heatmaps."""
    run = Run(args)
    run.save_config("config_test.json")
    model = stage1_model(run)
    seg_path = args.seg_checkpoint or os.path.join(run.dir, "Seg_model_7999.pth")
    if args.seg_checkpoint is None and not os.path.isfile(seg_path):  # a shorter Stage II leaves only _last
        seg_path = os.path.join(run.dir, "Seg_model_last.pth")
    segnet = models.load_segmentation_net(seg_path, model.encoder.cfg.embed_dim).to(run.device).eval()
    log.info(f"loaded {seg_path}")
    seed_everything(args.seed)
    evaluate(run, AnomalyMapper(model, segnet, args.fusion_alpha, args.max_ratio), args.aupro, args.gt_binarize)

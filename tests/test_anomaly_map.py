"""Anomaly maps, smoothing, image scores and ground-truth binarisation against independent references."""
import numpy as np
import pytest
import torch

from dinomaly import anomaly_map, checkpoints, models

# The 1-D weights of the 5x5, sigma-4 smoothing kernel, computed by hand: exp(-x^2 / 32), x = -2..2, normalised.
KERNEL_WEIGHTS = np.array([0.187627, 0.206068, 0.212609, 0.206068, 0.187627])


def conv5x5_zero_pad(img, kernel):
    h, w = img.shape
    padded = np.zeros((h + 4, w + 4))
    padded[2:-2, 2:-2] = img
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            out[y, x] = np.sum(padded[y:y + 5, x:x + 5] * kernel)
    return out


def bilinear_align_corners_matrix(n_in, n_out):
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = o * (n_in - 1) / (n_out - 1)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[o, i0] += 1 - frac
        m[o, i1] += frac
    return m


def bilinear_half_pixel_matrix(n_in, n_out):
    """Bilinear with align_corners=False (pixel centres at i + 0.5; sources left of the first centre clamp)."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        m[o, i0] += 1 - (src - i0)
        m[o, i1] += src - i0
    return m


def cosine_distance_maps(en, de):
    """Per group 1 - cos along channels, float64: [B, h, w] each."""
    out = []
    for e, d in zip(en, de):
        e, d = e.double().numpy(), d.double().numpy()
        out.append(1 - (e * d).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(d, axis=1)))
    return out


def test_gaussian_smooth_kernel_and_naive_convolution():
    impulse = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    impulse[0, 0, 4, 4] = 1
    response = anomaly_map.gaussian_smooth(impulse)[0, 0].numpy()
    kernel = np.outer(KERNEL_WEIGHTS, KERNEL_WEIGHTS)
    np.testing.assert_allclose(response[2:7, 2:7], kernel, atol=2e-6)
    assert response.sum() == pytest.approx(1.0, abs=1e-12)

    maps = torch.rand(2, 1, 12, 10, generator=torch.Generator().manual_seed(0))
    out = anomaly_map.gaussian_smooth(maps)
    assert out.shape == maps.shape and out.dtype == torch.float32
    for b in range(2):
        ref = conv5x5_zero_pad(maps[b, 0].double().numpy(), kernel)
        np.testing.assert_allclose(out[b, 0].numpy(), ref, atol=1e-5)


def test_reconstruction_map_hand_cases():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)]
    same = anomaly_map.reconstruction_map(feats, [f.clone() for f in feats], 9)
    assert same.shape == (2, 1, 9, 9)
    np.testing.assert_allclose(same.numpy(), 0.0, atol=1e-6)
    opposite = anomaly_map.reconstruction_map(feats, [-f for f in feats], 9)
    np.testing.assert_allclose(opposite.numpy(), 2.0, atol=1e-6)


def test_reconstruction_map_random_vs_numpy():
    g = torch.Generator().manual_seed(1)
    en = [torch.randn(2, 8, 5, 5, generator=g) for _ in range(2)]
    de = [torch.randn(2, 8, 5, 5, generator=g) for _ in range(2)]
    out = anomaly_map.reconstruction_map(en, de, 13).numpy()
    interp = bilinear_align_corners_matrix(5, 13)
    ref = sum(np.einsum("oi,bij,pj->bop", interp, m, interp) for m in cosine_distance_maps(en, de)) / 2
    np.testing.assert_allclose(out[:, 0], ref, atol=1e-5)


def test_mapper_raw_maps_follow_the_formulas(tiny_encoder):
    """AnomalyMapper.raw_map against float64 references built from the model's features. Dinomaly: per group
    1 - cos, bilinear (align_corners=True) to the crop, mean, then bilinear (align_corners=False) to 256. CRR:
    alpha * (the same distances straight to 256, align_corners=True) + (1 - alpha) * softmax channel 1 of the
    segmentation network."""
    torch.manual_seed(0)
    model = checkpoints.build_model(tiny_encoder, "random").eval()
    segnet = models.segmentation_net(model.encoder.cfg.embed_dim).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        en, de = model(x)
        seg = torch.softmax(segnet(models.segmentation_input(en, de)), dim=1)[:, 1].double().numpy()
        dinomaly = anomaly_map.AnomalyMapper(model).raw_map(x)[:, 0].numpy()
        fused = {a: anomaly_map.AnomalyMapper(model, segnet, fusion_alpha=a).raw_map(x)[:, 0].numpy()
                 for a in (0.0, 0.7, 1.0)}
    dist = cosine_distance_maps(en, de)
    to_crop, to_256 = bilinear_align_corners_matrix(4, 56), bilinear_half_pixel_matrix(56, 256)
    at_crop = np.mean([np.einsum("oi,bij,pj->bop", to_crop, m, to_crop) for m in dist], axis=0)
    np.testing.assert_allclose(dinomaly, np.einsum("oi,bij,pj->bop", to_256, at_crop, to_256), atol=1e-5)
    straight = bilinear_align_corners_matrix(4, 256)
    recon = np.mean([np.einsum("oi,bij,pj->bop", straight, m, straight) for m in dist], axis=0)
    for a, got in fused.items():
        np.testing.assert_allclose(got, a * recon + (1 - a) * seg, atol=1e-5)
    assert np.abs(recon - seg).max() > 0.1  # the two parts differ, so the weights are seen


def test_top_ratio_score():
    maps = torch.rand(3, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    flat = np.sort(maps.flatten(1).double().numpy(), axis=1)[:, ::-1]
    np.testing.assert_allclose(anomaly_map.top_ratio_score(maps).double().numpy(), flat[:, :655].mean(1), rtol=1e-6)
    np.testing.assert_allclose(anomaly_map.top_ratio_score(maps, 0.1).double().numpy(), flat[:, :6553].mean(1),
                               rtol=1e-6)
    np.testing.assert_array_equal(anomaly_map.top_ratio_score(maps, 0).double().numpy(), flat[:, 0])


def test_binarize_gt_dinomaly_nearest():
    # 8x8 -> 4x4 nearest samples source rows/columns 0, 2, 4, 6.
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, :, 2] = 0.2  # faint 1-pixel line on a sampled column: kept (> 0)
    mask[0, 0, :, 5] = 1.0  # line on an unsampled column: gone
    expected = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    expected[..., 1] = True
    assert torch.equal(anomaly_map.binarize_gt(mask, 4), expected)
    # 4x4 -> 8x8: column 1 becomes columns 2 and 3.
    small = torch.zeros(1, 1, 4, 4)
    small[0, 0, :, 1] = 0.01
    expected = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    expected[..., 2:4] = True
    assert torch.equal(anomaly_map.binarize_gt(small, 8, mode="dinomaly"), expected)


def test_binarize_gt_crr_bilinear():
    # 8x8 -> 4x4 bilinear (align_corners=False): output column j reads source 2j+0.5, i.e. the mean
    # of source columns 2j and 2j+1 (rows likewise).
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, :, 3] = 1.0  # one column of the pair (2, 3): 0.5 -> kept (>= 0.5)
    mask[0, 0, :, 2] = 0.4  # below 0.5 before resizing: dropped
    mask[0, 0, :, 5] = 0.7  # binarised to 1 first, then 0.5 after resizing -> kept
    mask[0, 0, 0, 0] = 1.0  # a single pixel: 0.25 after resizing -> dropped
    expected = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    expected[..., 1:3] = True
    assert torch.equal(anomaly_map.binarize_gt(mask, 4, mode="crr"), expected)
    # The same mask under the Dinomaly rule (nearest, > 0): source columns 0, 2, 4, 6 and the corner.
    expected = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    expected[..., 1] = True
    expected[0, 0, 0, 0] = True
    assert torch.equal(anomaly_map.binarize_gt(mask, 4, mode="dinomaly"), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("crr", [False, True])
def test_maps_on_cuda_equal_the_cpu_maps(crr, tiny_encoder, monkeypatch):
    """fp32 on the GPU (TF32 off for cuDNN too) gives the CPU's maps and scores: the Dinomaly map, and CRR's fused
    map with test-time masks from the CPU generator (mask_rng "cpu"), the same masks on both devices."""
    torch.manual_seed(0)
    model = checkpoints.build_model(tiny_encoder, "random", mask_ratio=0.4 if crr else 0.0, mask_in_eval=crr).eval()
    segnet = models.segmentation_net(model.encoder.cfg.embed_dim).eval() if crr else None
    x = torch.randn(3, 3, 56, 56)
    results = []
    for device in ("cpu", "cuda"):
        mapper = anomaly_map.AnomalyMapper(model.to(device), segnet and segnet.to(device))
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # after the mapper set the fp32 defaults
        torch.manual_seed(1)
        with torch.no_grad():
            results.append([t.cpu() for t in mapper(x.to(device))])
    for on_cpu, on_cuda in zip(*results):
        torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-4, atol=1e-5)


def test_evaluation_hands_each_batch_over_with_its_own_maps(tiny_encoder):
    """evaluate.mapped_batches (the evaluation loop's one-batch-ahead pipeline): every batch comes back with the
    map and score of its own images, in order, and the seeds are asked for image by image."""
    from dinomaly import evaluate
    torch.manual_seed(0)
    mapper = anomaly_map.AnomalyMapper(checkpoints.build_model(tiny_encoder, "random").eval())
    batches = [(torch.randn(n, 3, 56, 56), f"batch {i}") for i, n in enumerate((2, 2, 1))]
    asked = []
    with torch.no_grad():
        out = list(evaluate.mapped_batches(mapper, batches, torch.device("cpu"), lambda i, n: asked.append((i, n))))
        expected = [mapper(img) for img, _ in batches]
    assert [b[1] for _, b, _, _ in out] == ["batch 0", "batch 1", "batch 2"] and asked == [(0, 2), (2, 2), (4, 1)]
    assert [first for first, _, _, _ in out] == [0, 2, 4]
    for (_, _, amap, score), (want_map, want_score) in zip(out, expected):
        torch.testing.assert_close(amap, want_map[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(score, want_score, rtol=0, atol=0)


@pytest.mark.parametrize("recenter", [False, True])
def test_features_alone_equal_those_of_the_full_forward(recenter):
    """AnomalyMapper.features (the encoder only, for class finding) gives exactly forward's pooled features."""
    from conftest import TINY_CFG
    torch.manual_seed(0)
    model = models.ViTill(TINY_CFG, recenter=recenter).eval()
    mapper = anomaly_map.AnomalyMapper(model)
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(mapper.features(x), mapper(x, features=True)[2])

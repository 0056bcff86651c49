"""Training losses: Dinomaly's hard-mined global cosine loss and CRR's focal loss."""
import torch
import torch.nn.functional as F


def hard_mining_factor(it: int, max_p: float = 0.9, ramp_iters: int = 1000) -> float:
    """Share p of the easiest positions whose gradient is down-weighted at iteration `it` (0-based)."""
    return min(max_p * it / ramp_iters, max_p)


def global_cosine_hm(en: list[torch.Tensor], de: list[torch.Tensor], p: float, factor: float = 0.1) -> torch.Tensor:
    """Mean over groups of the batch-mean global cosine distance between en_g and de_g ([B, D, h, w] each).

    Hard mining: positions whose channel-wise distance is below the k-th largest in the batch, k =
    int(numel * (1 - p)), pass only `factor` of their gradient into de_g.
    """
    loss = 0.0
    for e, d in zip(en, de):
        e = e.detach()
        with torch.no_grad():
            dist = 1 - F.cosine_similarity(e, d, dim=1).unsqueeze(1)  # [B, 1, h, w]
            k = int(dist.numel() * (1 - p))
            thresh = torch.topk(dist.reshape(-1), k=k)[0][-1]
            easy = dist < thresh
        loss = loss + torch.mean(1 - F.cosine_similarity(e.reshape(e.shape[0], -1), d.reshape(d.shape[0], -1)))
        if d.requires_grad:
            d.register_hook(lambda g, easy=easy: torch.where(easy, g * factor, g))
    return loss / len(en)


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on softmax probabilities [B, C, H, W] and an integer/0-1 target [B, 1, H, W]; mean over pixels."""
    num_classes = probs.shape[1]
    one_hot = F.one_hot(target.long().squeeze(1), num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    one_hot = one_hot.clamp(smooth, 1.0 - smooth)
    pt = (one_hot * probs).sum(dim=1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()

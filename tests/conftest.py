import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dinomaly import models  # noqa: E402
from dinomaly.encoders import EncoderConfig  # noqa: E402

# The devices a test runs on where it takes `device`: the CPU always, and CUDA where there is a GPU (run just those
# with `pytest -k cuda`).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA device"))]

# A tiny DINOv2-shaped encoder for fast tests: 8 blocks so that the 8 taps form the two groups of 4.
TINY = "dinov2reg_vit_tiny_test"
TINY_CFG = EncoderConfig(embed_dim=32, num_heads=2, depth=8, taps=tuple(range(8)), weight_file="tiny_test.pth",
                         pretrain_grid=6)


@pytest.fixture(autouse=True)
def tiny_encoder(monkeypatch):
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    yield TINY


def exit_status_of(main, argv) -> int:
    """A command's main run in-process on argv (each made a str): its exit status, 0 when it returns."""
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
from models.encoder import EncoderConfig  # noqa: E402

# A tiny DINOv2-shaped encoder for fast tests: 8 blocks so that the 8 taps form the two groups of 4.
TINY = "dinov2reg_vit_tiny_test"
TINY_CFG = EncoderConfig(embed_dim=32, num_heads=2, depth=8, taps=tuple(range(8)), weight_file="tiny_test.pth",
                         pretrain_grid=6)


@pytest.fixture(autouse=True)
def tiny_encoder(monkeypatch):
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    yield TINY

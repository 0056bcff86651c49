"""conformance/dinomaly2_preview.py, the check of Dinomaly2 against the authors' preview code, without the preview:
it imports (the engine names it calls exist), refuses a folder that is not the preview, and its helpers behave.
With DINOMALY2_PREVIEW=<the preview's folder> set, the quick run itself (a few minutes on two CPU cores)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "conformance"))
import dinomaly2_preview as conf  # noqa: E402

SCRIPT = os.path.join(ROOT, "conformance", "dinomaly2_preview.py")


def test_engine_names_the_script_calls_exist():
    from dinomaly import train
    for name in ("reconstruction_optimizer", "reconstruction_schedule", "train_step"):
        assert hasattr(train, name), name


def test_refuses_a_folder_without_the_preview(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--preview", str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "no models/uad.py" in r.stderr


def test_weight_gaps_relative_to_weights_and_to_the_update():
    w0 = [torch.zeros(3), torch.ones(2)]
    ref = [torch.tensor([1.0, 0.0, 0.0]), torch.ones(2)]  # the second tensor has not moved
    w = [torch.tensor([1.0, 0.1, 0.0]), torch.ones(2)]
    rel_w, rel_upd = conf.weight_gaps(w, ref, w0)
    assert rel_w == pytest.approx(0.1) and rel_upd == pytest.approx(0.1)


def test_generated_images_are_normalised_and_reproducible():
    a, b = conf.generated_images(3, 28, 5), conf.generated_images(3, 28, 5)
    assert a.shape == (3, 3, 28, 28) and torch.equal(a, b)
    assert not torch.equal(a, conf.generated_images(3, 28, 6))


@pytest.mark.skipif(not os.environ.get("DINOMALY2_PREVIEW"), reason="set DINOMALY2_PREVIEW to the preview's folder")
def test_quick_run_against_the_preview():
    r = subprocess.run([sys.executable, SCRIPT, "--preview", os.environ["DINOMALY2_PREVIEW"], "--quick"],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_stl_of_the_demo_data_reads_back_as_its_grid(tmp_path):
    from prepare_data.make_demo_pairs import SPACING, _save_stl
    h = np.arange(20 * 20, dtype=np.float64).reshape(20, 20) * 1e-4
    path = str(tmp_path / "s.stl")
    _save_stl(path, h, step=8)
    grid = {(x * SPACING, y * SPACING, h[y, x]) for y in (0, 8, 16) for x in (0, 8, 16)}
    got = conf.stl_vertices(path)
    assert os.path.getsize(path) == 84 + 50 * 2 * 2 * 2  # 2 x 2 cells, two triangles each
    assert len(got) == 9 and np.allclose(sorted(got.tolist()), sorted(grid), atol=1e-7)


def test_by_kind_keeps_the_order_within_each_folder():
    paths = [os.path.join("a", "2.png"), os.path.join("b", "1.png"), os.path.join("a", "10.png")]
    assert conf.by_kind(paths) == {"a": ["2.png", "10.png"], "b": ["1.png"]}

"""The installable library: `pip install .` gives the package `dinomaly` and its two commands, and they work from
a user's project that has modules of its own named like the repository's old top-level modules."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from dinomaly import models

from conftest import ROOT, TINY, TINY_CFG

USER_CODE = """
import json, sys
import models, utils, dataset                      # the user's own modules, not the package's
assert models.MINE and utils.MINE and dataset.MINE
import dinomaly
assert dinomaly.__file__.startswith(sys.argv[1]), dinomaly.__file__
assert "torch" not in sys.modules                  # importing the package is light
from dinomaly import Detector
from dinomaly import models as dm
from dinomaly.encoders import EncoderConfig
dm.ENCODERS[{tiny!r}] = EncoderConfig(embed_dim=32, num_heads=2, depth=8, taps=tuple(range(8)),
                                      weight_file="tiny_test.pth", pretrain_grid=6)
import numpy as np
r = Detector(sys.argv[2], threshold=0.5, device="cpu")(np.zeros((40, 30, 3), np.uint8))
print(json.dumps(dict(shape=list(r.anomaly_map.shape), score=r.score, anomalous=bool(r.is_anomalous))))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package built and installed from a copy of what a source distribution holds into a folder of its
    own (pip --target: the console scripts land in its bin/)."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    shutil.copytree(os.path.join(ROOT, "dinomaly"), src / "dinomaly",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    site = root / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--no-build-isolation", "--target", str(site), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return site


def run_in_user_project(site, tmp_path, *argv, code=None):
    """Run Python in a folder of the user's own (with models.py, utils.py and dataset.py of their own), with
    only the installed package on the path (not the repository)."""
    user = tmp_path / "user_project"
    user.mkdir(exist_ok=True)
    for name in ("models", "utils", "dataset"):
        (user / f"{name}.py").write_text("MINE = True\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    command = [sys.executable, "-c", code, *argv] if code else list(argv)
    return subprocess.run(command, cwd=user, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_holds_every_module_and_nothing_of_the_repository_around_it(installed):
    ours = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "dinomaly"))
            for f in fs if f.endswith(".py")}
    theirs = {os.path.relpath(os.path.join(d, f), installed) for d, _, fs in os.walk(installed / "dinomaly")
              for f in fs if f.endswith(".py")}
    assert ours == theirs and len(ours) > 25
    tops = {p.name for p in installed.iterdir()} - {"bin"}
    assert all(name == "dinomaly" or name.startswith("dinomaly-") for name in tops), tops


def test_detector_from_a_user_project_with_its_own_models_module(installed, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    torch.save(models.ViTill(TINY_CFG).state_dict(), run / "model.pth")
    (run / "config.json").write_text(json.dumps({"model": dict(encoder=TINY, image_size=56, crop_size=56)}))
    r = run_in_user_project(installed, tmp_path, str(installed), str(run), code=USER_CODE.format(tiny=TINY))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["shape"] == [40, 30] and out["anomalous"] == (out["score"] >= 0.5)


@pytest.mark.parametrize("command, flag", [("dinomaly-predict", "--class_name"), ("dinomaly-export", "--check_batch")])
def test_console_commands(installed, tmp_path, command, flag):
    exe = installed / "bin" / command
    r = run_in_user_project(installed, tmp_path, str(exe), "--help")
    assert r.returncode == 0 and flag in r.stdout, r.stderr[-2000:]
    image = tmp_path / "part.png"
    Image.new("RGB", (20, 20)).save(image)
    r = run_in_user_project(installed, tmp_path, str(exe), "--checkpoint", str(tmp_path / "missing"), "--out",
                            str(tmp_path / "o"), *(["--input", str(image)] if command == "dinomaly-predict" else []))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: checkpoint not found: {tmp_path / 'missing'}; pass a run folder or a model.pth as --checkpoint"]

"""One model per class (the class-separated setting, --per_class and dinomaly_sep.py): each class's model is the
one a run on that class alone trains, the table is theirs with their mean, prediction uses each image's class's
model, and --resume continues where the run stopped."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from dinomaly import Detector, cli, models, recipes
from dinomaly.errors import UserError

import dinomaly_mvtec_uni
import dinomaly_sep
from conftest import TINY, exit_status_of
from conftest import exit_status_of as cli_call
from prepare_data.make_demo_data import make_demo_data

CLASSES = ["weave", "nut"]
SMALL = ["--encoder", TINY, "--encoder_weights", "random", "--image_size", "64", "--crop_size", "56",
         "--num_workers", "0", "--device", "cpu", "--total_iters", "3", "--batch_size", "4"]


def call(module, argv):
    return exit_status_of(lambda a: cli.run_script(module, a), argv)


def table(path) -> dict:
    with open(path, newline="") as f:
        return {r["class"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp("data")), size=64, seed=0, n_train=8, n_test_good=2,
                          n_test_bad=2)["mvtec"]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The class-separated run and, for each class, a run on that class alone with the same settings."""
    save = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        from conftest import TINY_CFG
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        common = ["--data_path", data, "--classes", *CLASSES, *SMALL, "--save_dir", save]
        assert call(dinomaly_sep, [*common, "--save_name", "sep"]) == 0
        for c in CLASSES:  # the multi-class script on one class, with the class-separated script's optimiser
            assert call(dinomaly_mvtec_uni, ["--data_path", data, "--classes", c, *SMALL, "--save_dir", save,
                                             "--save_name", f"alone_{c}", "--adam_eps", "1e-8"]) == 0
    return save


def test_each_class_has_the_model_a_run_on_it_alone_trains(runs):
    for c in CLASSES:
        ours = torch.load(runs / "sep" / c / "model.pth", weights_only=True)
        alone = torch.load(runs / f"alone_{c}" / "model.pth", weights_only=True)
        assert ours.keys() == alone.keys() and all(torch.equal(ours[k], alone[k]) for k in ours)
    a = torch.load(runs / "sep" / "weave" / "model.pth", weights_only=True)
    b = torch.load(runs / "sep" / "nut" / "model.pth", weights_only=True)
    assert not torch.equal(a["decoder.0.mlp.fc1.weight"], b["decoder.0.mlp.fc1.weight"])


def test_the_table_holds_every_class_and_their_mean(runs):
    top = table(runs / "sep" / "metrics.csv")
    assert list(top) == [*CLASSES, "mean"]
    for c in CLASSES:
        assert top[c] == table(runs / "sep" / c / "metrics.csv")[c] == table(runs / f"alone_{c}" / "metrics.csv")[c]
    for k in ("I-AUROC", "P-AUROC", "mAD"):
        assert float(top["mean"][k]) == pytest.approx(np.mean([float(top[c][k]) for c in CLASSES]), abs=1e-12)


def test_the_log_has_each_class_once_and_one_mean(runs):
    log = (runs / "sep" / "log.txt").read_text()
    summary = log[log.index("one model per class, 2 classes:"):].splitlines()
    assert [line.split(":")[0] for line in summary[1:4]] == [*CLASSES, "Mean"]
    assert log.count("Mean: ") == 1 and log.count("the prototypes of 2 classes") == 1


def test_the_recipe_is_the_reference_scripts(runs):
    config = json.loads((runs / "sep" / "config.json").read_text())
    assert config["model"]["setting"] == "class-separated" and config["per_class"]
    assert config["training"]["adam_eps"] == 1e-8 and config["model"]["dropout"] == 0.2
    assert json.loads((runs / "sep" / "weave" / "config.json").read_text())["classes"] == ["weave"]
    def parse(module, argv):
        return cli.parse("", module.RECIPE, module.DEFAULTS, getattr(module, "DATASETS", None), argv)
    args = parse(dinomaly_sep, [])
    assert (args.recipe.total_iters, args.recipe.adam_eps, args.run.per_class, args.recipe.dropout) == \
        (5000, 1e-8, True, 0.2)
    real = parse(dinomaly_sep, ["--dataset", "realiad"])
    assert real.recipe.adam_eps == 1e-10 and real.run.save_name.startswith("vitill_realiad_sep")
    uni = parse(dinomaly_mvtec_uni, [])
    assert (uni.recipe.adam_eps, uni.run.per_class) == (recipes.DINOMALY.adam_eps, False) == (1e-10, False)


def test_predict_uses_each_images_class_model(runs, data):
    images = [os.path.join(data, c, "test", d, "000.png") for c, d in (("weave", "good"), ("nut", "good"),
                                                                      ("nut", os.listdir(os.path.join(data, "nut", "test"))[0]))]
    detector = Detector(str(runs / "sep"), device="cpu")
    got = detector.predict(images)
    weave, nut = (detector.members[c].mapper.model for c in CLASSES)
    assert weave.encoder is nut.encoder and weave.decoder is not nut.decoder  # one encoder for all the models
    for path, p in zip(images, got):
        c = path.split(os.sep)[-4]
        assert p.class_name == c
        alone = Detector(str(runs / "sep" / c), device="cpu")(path)
        assert p.score == pytest.approx(alone.score, rel=1e-5) and p.threshold == alone.threshold
        np.testing.assert_allclose(p.anomaly_map, alone.anomaly_map, rtol=1e-5, atol=1e-6)
    forced = Detector(str(runs / "sep"), device="cpu", class_name="weave")(images[1])
    assert forced.class_name == "weave"
    assert forced.score == pytest.approx(Detector(str(runs / "sep" / "weave"), device="cpu")(images[1]).score,
                                         rel=1e-5)


def test_the_service_on_a_class_separated_run(runs, data):
    httpx = pytest.importorskip("httpx")
    from dinomaly import serve
    image = os.path.join(data, "nut", "test", "good", "000.png")
    detector = Detector(str(runs / "sep"), device="cpu")
    s = serve.Background(serve.create_app(detector, serve.ServeOptions(str(runs / "sep"))))
    try:
        with open(image, "rb") as f:
            content = f.read()
        found = httpx.post(s.url + "/predict", content=content).json()["images"][0]
        given = httpx.post(s.url + "/predict", content=content, params={"class_name": "weave"}).json()["images"][0]
        assert sorted(httpx.get(s.url + "/info").json()["classes"]) == sorted(CLASSES)
        assert httpx.post(s.url + "/thresholds", json={"thresholds": {"nut": 1.0}}).status_code == 400
    finally:
        s.close()
    for answer, c in [(found, "nut"), (given, "weave")]:  # each class's own model decides
        alone = Detector(str(runs / "sep" / c), device="cpu")(image)
        assert answer["class"] == c and answer["threshold"] == alone.threshold
        assert answer["score"] == pytest.approx(alone.score, rel=1e-5)


def test_predict_command_on_a_class_separated_run(runs, data, tmp_path):
    out = tmp_path / "p"
    assert cli_call(cli.predict_main, ["--checkpoint", runs / "sep", "--input", os.path.join(data, "nut", "test"),
                                       "--out", out, "--device", "cpu", "--num_workers", "0"]) == 0
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["class"] == "nut" for r in rows)


def test_a_class_separated_run_needs_its_classes(runs, tmp_path, capsys):
    with pytest.raises(UserError, match="no class named bolt.*nut, weave"):
        Detector(str(runs / "sep"), device="cpu", class_name="bolt")
    assert cli_call(cli.export_main, ["--checkpoint", runs / "sep", "--out", tmp_path / "m.onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one model per class (nut, weave)" in err[0] and str(runs / "sep" / "nut") in err[0]


def test_resume_trains_only_what_is_missing(runs, data):
    run = runs / "resumed"
    common = ["--data_path", data, "--classes", *CLASSES, *SMALL, "--save_dir", runs, "--save_name", "resumed"]
    with pytest.MonkeyPatch.context() as mp:
        from conftest import TINY_CFG
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        assert call(dinomaly_sep, common) == 0
        first = (run / "weave" / "model.pth").stat().st_mtime_ns
        for name in ("model.pth", "metrics.csv", "train_state.pth"):
            os.remove(run / "nut" / name)
        assert call(dinomaly_sep, common) == 2  # the folder holds results: --resume or --overwrite
        assert call(dinomaly_sep, [*common, "--resume"]) == 0
        assert (run / "weave" / "model.pth").stat().st_mtime_ns == first
        assert table(run / "metrics.csv") == table(runs / "sep" / "metrics.csv")
        os.remove(run / "class_prototypes.pt")
        assert call(dinomaly_sep, [*common, "--resume"]) == 0  # all done: the table and the prototypes again
    assert table(run / "metrics.csv") == table(runs / "sep" / "metrics.csv")
    assert (run / "class_prototypes.pt").is_file()
    for c in CLASSES:  # each class folder is still a run of its own
        assert json.loads((run / c / "config.json").read_text())["model"]["setting"] == "class-separated"

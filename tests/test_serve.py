"""The HTTP service (dinomaly/serve.py) on a free loopback port, with a tiny run trained on generated data: served
results equal predict.py's, batching under concurrent clients changes nothing, every bad request is a 4xx and the
service goes on, the queue limit answers 503, a model failure is a 500 for its request alone, the token is
required, thresholds saved from the page are used by the Detector."""
import base64
import csv
import io
import json
import shutil
import struct
import threading
import zlib
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from dinomaly import cli, models, serve
from dinomaly.predict import Detector

from conftest import TINY, TINY_CFG

SIZE, CROP = 64, 56
LIMITS = dict(max_images=4, max_queue=3, max_mb=1.0, max_pixels=1_000_000)


@pytest.fixture(scope="module")
def run(tiny_run, demo64):
    """conftest's tiny Dinomaly run folder on two demo classes, and its test images."""
    tests = [p for c in ("weave", "nut") for p in sorted(Path(demo64["mvtec"]).glob(f"{c}/test/*/*.png"))]
    return tiny_run, tests


def start(folder, **options):
    """The service on a run folder, in this process, on a free loopback port."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        detector = Detector(str(folder), device="cpu")
    return serve.Background(serve.create_app(detector, serve.ServeOptions(str(folder), **options)))


@pytest.fixture(scope="module")
def service(run):
    s = start(run[0], max_wait_ms=100.0, **LIMITS)
    yield s
    s.close()


def predict_csv(folder, images, out, *flags):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        try:
            cli.predict_main(["--checkpoint", str(folder), "--input", *map(str, images), "--out", str(out),
                              "--device", "cpu", "--num_workers", "0", *flags])
        except SystemExit as e:
            assert e.code == 0
    with open(out / "predictions.csv", newline="") as f:
        return {r["image_path"]: r for r in csv.DictReader(f)}


def post(url, path, **params):
    return httpx.post(url + "/predict", content=path.read_bytes(), params=params, timeout=60)


def assert_same(answer, row):
    assert abs(answer["score"] - float(row["score"])) <= 1e-6
    assert answer["decision"] == row["decision"] and answer["threshold"] == float(row["threshold"])
    assert answer["class"] == row["class"]
    if row["class_confidence"]:
        assert abs(answer["class_confidence"] - float(row["class_confidence"])) <= 1e-6


def healthy(url):
    r = httpx.get(url + "/health")
    return r.status_code == 200 and r.json()["status"] == "ok"


def test_served_results_equal_predict_py(run, service, tmp_path):
    folder, images = run
    turned = tmp_path / "turned.jpg"  # a JPEG stored sideways with an EXIF orientation: both read it upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(images[0]).crop((0, 0, 64, 40)).save(turned, exif=exif)
    images = images + [turned]
    rows = predict_csv(folder, images, tmp_path / "p")
    assert len(rows) == len(images) >= 10
    for path in images:
        answer = post(service.url, path).json()["images"][0]
        assert_same(answer, rows[str(path)])
    assert (answer["width"], answer["height"]) == (40, 64)  # the last, turned upright
    # several images in one multipart request, with mask and overlay: the mask is predict.py's mask file
    files = [("image", (p.name, p.read_bytes(), "image/png")) for p in images[:3]]
    answer = httpx.post(service.url + "/predict", files=files, params=dict(mask=1, overlay=1), timeout=60).json()
    for a, p in zip(answer["images"], images[:3]):
        row = rows[str(p)]
        assert_same(a, row)
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(a["mask_png"]))))
        np.testing.assert_array_equal(mask, np.asarray(Image.open(tmp_path / "p" / row["mask"])))
        overlay = Image.open(io.BytesIO(base64.b64decode(a["overlay_png"])))
        with Image.open(tmp_path / "p" / row["overlay"]) as written:
            assert overlay.size == written.size
        assert a["area_share"] == pytest.approx((mask > 0).mean())
        assert (a["decision"] == "anomalous") == bool(a["boxes"])  # an anomalous image always shows a region
        for box in a["boxes"]:  # each box holds mask pixels on all four edges
            x, y, w, h = box["x"], box["y"], box["width"], box["height"]
            inside = mask[y:y + h, x:x + w] > 0
            assert inside.any(0)[[0, -1]].all() and inside.any(1)[[0, -1]].all()
        assert sum(b["area_share"] for b in a["boxes"]) == pytest.approx(a["area_share"])


def test_a_given_class_decides_as_predict_py_class_name(run, service, tmp_path):
    folder, images = run
    rows = predict_csv(folder, images[:4], tmp_path / "p", "--class_name", "nut")
    for path in images[:4]:
        a = post(service.url, path, class_name="nut").json()["images"][0]
        assert_same(a, rows[str(path)])
        assert a["class_given"] and a["class_confidence"] is None


def test_concurrent_requests_are_batched_with_the_same_scores(run, service):
    images = run[1][:8]
    alone = [post(service.url, p).json()["images"][0]["score"] for p in images]
    before = httpx.get(service.url + "/health").json()["batches"]
    barrier = threading.Barrier(len(images))

    def together(p):
        barrier.wait()
        return post(service.url, p)

    with ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(together, images))
    # the queue holds 3 images: those turned away got 503 and Retry-After, the others their scores
    served = [(a.json()["images"][0]["score"], s) for a, s in zip(answers, alone) if a.status_code == 200]
    assert all(a.status_code == 503 and a.headers["retry-after"] for a in answers if a.status_code != 200)
    assert len(served) >= 3
    for got, want in served:
        assert abs(got - want) <= 1e-6
    after = httpx.get(service.url + "/health").json()["batches"]
    grown = {k for k, v in after.items() if v > before.get(k, 0)}
    assert any(int(k) > 1 for k in grown)  # images of different requests were scored together


def bomb_png() -> bytes:
    """A valid tiny PNG whose header declares 30,000 x 30,000 pixels."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # type + 13 bytes of IHDR
    ihdr[4:12] = struct.pack(">II", 30000, 30000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_every_bad_request_is_a_4xx_and_the_service_goes_on(run, service):
    good = run[1][0].read_bytes()
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    url = service.url + "/predict"
    cases = {
        "not an image": (lambda: httpx.post(url, content=b"hello, this is text"), 415, "not an image"),
        "empty body": (lambda: httpx.post(url, content=b""), 400, "empty"),
        "truncated": (lambda: httpx.post(url, content=good[: len(good) // 2]), 400, "truncated"),
        "bomb": (lambda: httpx.post(url, content=bomb_png()), 413, "900,000,000 pixels"),
        "too large": (lambda: httpx.post(url, content=good + bytes(2 ** 20)), 413, "--max_mb"),
        "gif": (lambda: httpx.post(url, content=gif.getvalue()), 415, "GIF"),
        "unknown class": (lambda: httpx.post(url, content=good, params=dict(class_name="bolt")), 400, "bolt"),
        "too many": (lambda: httpx.post(url, files=[("image", (f"{i}.png", good, "image/png")) for i in range(5)]),
                     400, "--max_images"),
        "no file": (lambda: httpx.post(url, files={"note": (None, b"x")}), 400, "no file"),
        "bad flag": (lambda: httpx.post(url, content=good, params=dict(mask="maybe")), 422, "mask"),
        "unknown path": (lambda: httpx.get(service.url + "/nothing"), 404, None),
        "report outside": (lambda: httpx.get(service.url + "/report/model.pth"), 404, "model.pth"),
        "pairs of an image run": (lambda: httpx.post(service.url + "/pairs", json={"files": ["a/rgb/0.png"]}), 400,
                                  "scores single images"),
    }
    for name, (send, status, words) in cases.items():
        r = send()
        assert r.status_code == status, (name, r.text)
        message = r.json()["error"]
        assert "\n" not in message and (words is None or words in message), (name, message)
        assert healthy(service.url), name
    assert post(service.url, run[1][0]).status_code == 200


def test_the_queue_limit_answers_503(run, service):
    files = [("image", (f"{i}.png", run[1][0].read_bytes(), "image/png")) for i in range(4)]  # 4 > max_queue 3
    r = httpx.post(service.url + "/predict", files=files)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "--max_queue" in r.json()["error"]
    assert healthy(service.url) and httpx.get(service.url + "/health").json()["queue_depth"] == 0


def test_a_model_failure_is_a_500_for_its_request_alone(run, service, monkeypatch):
    detector = service.app.state.batcher.detector
    real = detector.predict_prepared

    def failing(batch, sizes, classes=None):
        if any(w == 77 for w, _ in sizes):
            raise RuntimeError("out of memory (simulated)")
        return real(batch, sizes, classes)

    monkeypatch.setattr(detector, "predict_prepared", failing)
    odd = io.BytesIO()
    Image.new("RGB", (77, 60), (90, 90, 90)).save(odd, "PNG")
    barrier = threading.Barrier(2)

    def send(content):
        barrier.wait()
        return httpx.post(service.url + "/predict", content=content, timeout=60)

    with ThreadPoolExecutor(2) as pool:  # in one batch (max_wait_ms 100): the other image is still served
        bad, ok = pool.map(send, [odd.getvalue(), run[1][0].read_bytes()])
    assert bad.status_code == 500 and "out of memory (simulated)" in bad.json()["error"]
    assert ok.status_code == 200 and ok.json()["images"][0]["score"] > 0
    assert healthy(service.url)


def test_info_describes_the_run(run, service):
    info = httpx.get(service.url + "/info").json()
    saved = json.loads((run[0] / "thresholds.json").read_text())
    assert info["classes"] == ["weave", "nut"] and info["method"] == "dinomaly" and info["encoder"] == TINY
    assert (info["image_size"], info["crop_size"]) == (SIZE, CROP)
    for c in info["classes"]:
        assert info["thresholds"][c]["threshold"] == saved["classes"][c]["image"]["threshold"]
    assert [m["class"] for m in info["metrics"]] == ["weave", "nut", "mean"]
    assert info["report"] and all(httpx.get(f"{service.url}/report/{f}").status_code == 200 for f in info["report"])
    with open(run[0] / "scores.csv", newline="") as f:
        want = [float(r["score"]) for r in csv.DictReader(f)]
    assert [r["score"] for r in httpx.get(service.url + "/test_scores").json()] == want and len(want) == len(run[1])
    assert httpx.get(service.url + "/openapi.json").json()["paths"]["/predict"]


def test_the_token_is_required_when_set(run):
    s = start(run[0], token="s3cret")
    try:
        for headers, params, status in [({}, {}, 401), ({"Authorization": "Bearer wrong"}, {}, 401),
                                        ({"Authorization": "Bearer s3cret"}, {}, 200), ({}, {"token": "s3cret"}, 200)]:
            for method, path in [("GET", "/health"), ("GET", "/info"), ("GET", "/"), ("POST", "/predict")]:
                content = run[1][0].read_bytes() if method == "POST" else None
                r = httpx.request(method, s.url + path, headers=headers, params=params, content=content)
                assert r.status_code == status, (path, headers, params)
    finally:
        s.close()


def test_saved_thresholds_are_used_by_the_service_and_the_detector(run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run[0], folder)
    s = start(folder)
    try:
        image = run[1][0]
        score = post(s.url, image, class_name="nut").json()["images"][0]["score"]
        r = httpx.post(s.url + "/thresholds", json={"thresholds": {"nut": score * 0.5}})
        assert r.status_code == 200 and r.json()["thresholds"]["nut"]["threshold"] == score * 0.5
        a = post(s.url, image, class_name="nut").json()["images"][0]
        assert a["threshold"] == score * 0.5 and a["decision"] == "anomalous"
        for bad in [{"thresholds": {"bolt": 1.0}}, {"thresholds": {"nut": -1}}, {"nut": 1.0}]:
            r = httpx.post(s.url + "/thresholds", json=bad)
            assert r.status_code == 400 and r.json()["error"]
    finally:
        s.close()
    saved = json.loads((folder / "thresholds.json").read_text())["classes"]["nut"]["image"]
    calibrated = json.loads((run[0] / "thresholds.json").read_text())["classes"]["nut"]["image"]["threshold"]
    assert saved["threshold"] == score * 0.5 and saved["method"] == "chosen"
    assert saved["calibrated_threshold"] == calibrated
    assert (folder / "thresholds.calibrated.json").read_bytes() == (run[0] / "thresholds.json").read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        assert Detector(str(folder), device="cpu", class_name="nut")(str(image)).threshold == score * 0.5


def test_the_command_refuses_a_busy_port_in_one_line(run, capsys):
    import socket
    taken = socket.create_server(("127.0.0.1", 0))
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as e:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        cli.serve_main(["--checkpoint", str(run[0]), "--port", str(taken.getsockname()[1]), "--device", "cpu"])
    taken.close()
    assert e.value.code == 2 and "pass another --port" in capsys.readouterr().err


def test_the_review_page_in_a_browser(run, browser, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run[0], folder)
    s = start(folder, token="s3cret")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(s.url + "/?token=s3cret")
        page.wait_for_selector("#threshold-table tbody tr[data-class=nut]")
        assert page.is_visible("#pick-files-button") and not page.is_visible("#pair-form")  # a run of images
        images = [run[1][0], run[1][-1]]  # a weave and a nut image
        page.set_input_files("#pick-files", [str(p) for p in images])
        page.wait_for_function("document.querySelectorAll('#cards .card').length === 2")
        shown = sorted(float(c.get_attribute("data-score")) for c in page.query_selector_all("#cards .card"))
        want = sorted(post_token(s.url, p)["score"] for p in images)
        assert shown == pytest.approx(want, abs=1e-6)
        assert all("score" in c.inner_text() for c in page.query_selector_all("#cards .card img ~ .body"))
        assert all(c.evaluate("img => img.naturalWidth > 0") for c in page.query_selector_all("#cards .card img"))
        row = "#threshold-table tr[data-class=nut]"
        before = page.inner_text(f"{row} .test-flagged")
        # the calibrated (F1-max) threshold is a test score: it flags at least one test image; the slider's top,
        # above every score, flags none
        assert before.startswith(tuple(f"{k} of" for k in range(1, 8)))
        page.fill(f"{row} input[type=range]", "1000")
        n = sum(1 for p in run[1] if "/nut/" in p.as_posix())
        assert page.inner_text(f"{row} .test-flagged") == f"0 of {n}" and page.inner_text(f"{row} .recall") == "0.000"
        assert page.inner_text(f"{row} .flagged") == "0 of 1"
        assert page.query_selector_all("#cards .card.anomalous") == [] or "weave" in page.inner_text("#cards")
        chosen = float(page.input_value(f"{row} input.value"))
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        page.click("#save")
        page.wait_for_function("document.querySelector('#saved').textContent.startsWith('saved to')")
        saved = json.loads((folder / "thresholds.json").read_text())["classes"]
        assert saved["nut"]["image"]["threshold"] == pytest.approx(chosen, rel=1e-5)
        assert saved["nut"]["image"]["method"] == "chosen" and "calibrated_threshold" not in saved["weave"]["image"]
        assert (folder / "thresholds.calibrated.json").exists()
        assert page.query_selector_all("#metrics tbody tr") and page.query_selector_all("#pictures img")
        assert not errors, errors
    finally:
        s.close()


def post_token(url, path):
    return httpx.post(url + "/predict", content=path.read_bytes(), headers={"Authorization": "Bearer s3cret"}
                      ).json()["images"][0]


def test_a_review_folder_is_listed_for_the_page(run, tmp_path):
    folder = tmp_path / "line3"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(run[1][0], folder / "a.png")
    shutil.copy(run[1][-1], folder / "sub" / "b.png")
    (folder / "notes.txt").write_text("not an image")
    s = start(run[0], review=str(folder))
    try:
        assert httpx.get(s.url + "/review_images").json() == ["a.png", "sub/b.png"]
        assert httpx.get(s.url + "/review_images/sub/b.png").content == run[1][-1].read_bytes()
        assert httpx.get(s.url + "/review_images/notes.txt").status_code == 404
    finally:
        s.close()

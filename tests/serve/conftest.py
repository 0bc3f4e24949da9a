"""Fixtures of the serving reliability tests: a bundle that is quick to build, and the probes of
``benchmarks/reliability_serve.py`` (the same code the reliability benchmark runs at full size)."""

import benchmark_scripts
import pytest
import torch


@pytest.fixture(scope="session")
def reliability():
    """``benchmarks/reliability_serve.py`` as a module (benchmarks/ is not a package)."""
    return benchmark_scripts.load("reliability_serve")


@pytest.fixture(scope="session")
def quick_bundle(shared, tmp_path_factory):
    """A ResNet-20 bundle with one untrained head (built directly: no recording, fitting or FLOP counting).

    What it answers does not matter to these tests, only that a real server serves it; its threshold lets
    some items exit early and the rest reach the backbone.
    """
    from selfxit.api import EarlyExitModel
    from selfxit.core.candidates import Candidate
    from selfxit.core.exits import ExitRecord
    from selfxit.core.heads import DEFAULT_HEAD, build_head
    from selfxit.zoo import load_backbone

    model, _ = load_backbone("cifar_resnet20")
    cand = Candidate("layer2", (32, 16, 16), 1)
    ee = EarlyExitModel(model, (3, 32, 32), 10, [cand], backbone_flops=2)
    torch.manual_seed(0)
    ee.set_records([ExitRecord(cand.name, build_head(DEFAULT_HEAD, cand.shape, ee.num_classes), 1.0, 0.105,
                               spec=DEFAULT_HEAD, shape=cand.shape, head_flops=1)])
    return ee.save(tmp_path_factory.mktemp("quick") / "bundle")


@pytest.fixture(scope="session")
def jpeg(shared) -> bytes:
    return (shared / "data" / "cifar10-test" / "cat" / "0000.jpg").read_bytes()

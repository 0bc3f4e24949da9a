"""What several commands share: the model arguments, loading the backbone, quieting libraries.

Nothing heavy is imported at module level: ``selfxit --help`` must answer without importing torch.
"""
from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path

DEFAULT_MODEL = "cifar_resnet56"


def quiet_libraries() -> None:
    """Keep NNI and DeepSpeed from importing frameworks we do not use, and from chattering."""
    os.environ.setdefault("NNI_FRAMEWORK", "none")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", module="deepspeed")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--model, --weights and --random-init, declared once for every command that loads a backbone."""
    p.add_argument("--model", required=required, default=DEFAULT_MODEL,
                   help="cifar_resnet20/32/44/56/110 or a torchvision classifier name")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=Path, help="checkpoint file (state dict) for the model "
                         "(default: the published weights; torchvision's default pretrained ones for its models)")
    weights.add_argument("--random-init", action="store_true", help="an untrained, randomly initialised network")


def augment_value(text: str):
    """``--augment``: a number of flip/shift copies (``2``) or a YAML mapping of the label-free augmentation
    (``'{copies: 2, mixup: 1, cutmix: 0, jitter: 0.2}'``, :class:`selfxit.fit.augment.AugmentConfig`'s keys)."""
    import yaml
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not a number or a YAML mapping: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, (int, dict)):
        raise argparse.ArgumentTypeError(f"expected a number of copies (e.g. 2) or a mapping such as "
                                         f"'{{copies: 2, mixup: 1}}'; got {text!r}")
    return value


def load_backbone(args):
    """(model, ModelInfo) for ``--model`` / ``--weights`` / ``--random-init``."""
    from selfxit.zoo import load_backbone as _load
    return _load(args.model, args.weights, random_init=getattr(args, "random_init", False))


def traffic_data(args, info, max_samples=None, seed=0):
    """The images of --data (default: the shared traffic folder) as the backbone's inputs."""
    from selfxit.zoo.data import ImageFolderData, default_traffic_dir
    root = Path(args.data) if args.data else default_traffic_dir()
    return ImageFolderData(root, info, max_samples=max_samples, seed=seed)


def loader(dataset, batch_size=256):
    """A DataLoader over ``dataset`` with a couple of decoding workers (JPEG decoding is the bottleneck)."""
    import torch
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=min(2, os.cpu_count() or 1))

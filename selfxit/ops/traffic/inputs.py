"""Logged records back to model inputs, decoded and preprocessed exactly as training data is.

Retrain re-runs the frozen backbone on logged traffic, so a logged JPEG must become the very tensor
that ``ImageFolderData`` would have produced from the same file: the same decoder
(:func:`selfxit.zoo.images.open_rgb`) and the same transform.
"""
from __future__ import annotations

import functools

import torch

from selfxit.ops.traffic.codec import TrafficRecord


@functools.lru_cache(maxsize=8)
def _transform(info):
    from selfxit.zoo.data import image_transform
    return image_transform(info)


def record_input(record: TrafficRecord, info) -> torch.Tensor:
    """The model input of a logged record: ``record.input`` as is, else its encoded image decoded and
    preprocessed exactly as ``ImageFolderData`` does for ``info`` (a ``selfxit.zoo.ModelInfo``).

    Raises ``selfxit.zoo.images.CorruptImageError`` (a ValueError) for bytes that do not decode.
    """
    from selfxit.zoo.images import open_rgb

    if record.input is not None:
        if tuple(record.input.shape) != tuple(info.input_size):
            raise ValueError(f"record input has shape {tuple(record.input.shape)}; {info.name} expects "
                             f"{tuple(info.input_size)}")
        return record.input
    if record.encoded is None:
        raise ValueError(f"the record at {record.timestamp} has neither an input tensor nor encoded image bytes")
    rgb = open_rgb(record.encoded, name=f"logged image at {record.timestamp} "
                                        f"({record.content_type or 'unknown type'})")
    return _transform(info)(rgb)


def record_inputs(records: list[TrafficRecord], info) -> torch.Tensor:
    """``record_input`` of each record, stacked into one batch [B, C, H, W] for the backbone."""
    if not records:
        raise ValueError("record_inputs needs at least one record")
    return torch.stack([record_input(r, info).float() for r in records])

"""Head construction checks (core/heads.py)."""
import pytest
import torch

from selfxit.core.heads import build_head


@pytest.mark.parametrize("conv, shape", [
    ({"out": 4, "kernel": 5, "stride": 1}, (3, 2, 2)),   # padding 2 on a 2x2 map: outputs that read only padding
    ({"out": 4, "kernel": 3, "stride": 3}, (3, 8, 2)),   # stride 3 across a width of 2: width was never checked
    ({"out": 4, "kernel": 7, "stride": 1}, (3, 8, 3)),   # padding 3 on a width of 3
])
def test_convs_that_do_not_fit_the_map_are_refused(conv, shape):
    with pytest.raises(ValueError, match="does not fit"):
        build_head({"kind": "conv_linear", "convs": [conv], "pool": 1, "hidden": []}, shape, 10)


@pytest.mark.parametrize("conv, shape", [
    ({"out": 4, "kernel": 3, "stride": 2}, (3, 2, 3)),
    ({"out": 4, "kernel": 5, "stride": 2}, (3, 8, 3)),
    ({"out": 4, "kernel": 1, "stride": 1}, (3, 1, 1)),
])
def test_convs_that_fit_are_built(conv, shape):
    head = build_head({"kind": "conv_linear", "convs": [conv], "pool": 1, "hidden": []}, shape, 10)
    assert head(torch.randn(2, *shape)).shape == (2, 10)

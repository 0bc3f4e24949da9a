"""The probed batch-invariant size that batch shrinking pads survivors up to."""
import pytest
import torch

from selfxit.core.exactness import invariant_rows


def _varies_below(threshold):
    """A 'backbone' whose rows get other last bits in batches smaller than ``threshold``."""
    def forward(x):
        out = x.flatten(1).sum(1, keepdim=True) * 1.0
        return out + 1e-6 if len(x) < threshold else out
    return forward


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 8])
def test_finds_the_smallest_stable_size(threshold):
    assert invariant_rows(_varies_below(threshold), torch.zeros(1, 3, 4, 4)) == max(threshold, 1)


def test_unstable_everywhere_warns_and_keeps_two_rows():
    calls = iter(range(10**6))

    def forward(x):  # other bits at every call
        return x.flatten(1)[:, :1] + next(calls) * 1e-6

    with pytest.warns(RuntimeWarning, match="change in their last bits with the batch size"):
        assert invariant_rows(forward, torch.zeros(1, 2), limit=4) == 2


def test_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    invariant_rows(_varies_below(2), torch.zeros(1, 3))
    assert torch.equal(torch.rand(3), expected)

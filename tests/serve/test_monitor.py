"""Shadow sampling and traffic logging of served micro-batches (selfxit.serve.monitor)."""
import numpy as np
import pytest
import torch
from torch import nn

from selfxit.core.runtime import FINAL, EarlyExitOutput
from selfxit.ops.traffic import TrafficLog, TrafficLogError
from selfxit.serve.monitor import MonitorConfig, TrafficMonitor


class Linear(nn.Module):
    """A 'backbone' whose answer is known: class = argmax of the first 3 input features."""

    def forward(self, x):
        return x.flatten(1)[:, :3] * 10


def _output(x, predictions, exits):
    """What the runner would return: early exits answer `predictions`, FINAL rows carry the backbone's softmax."""
    probs = torch.nn.functional.one_hot(torch.tensor(predictions), 3).float() * 0.9 + 0.1 / 3
    final = torch.tensor(exits) == FINAL
    probs[final] = Linear()(x[final]).softmax(1)
    return EarlyExitOutput(probs.argmax(1), probs, probs.log(), probs.max(1).values, torch.tensor(exits))


def _batch():
    x = torch.zeros(6, 3, 2, 2)
    truth = [0, 1, 2, 0, 1, 2]
    for i, c in enumerate(truth):
        x[i].view(-1)[c] = 1.0
    # rows 0-3 exit early (rows 0 and 2 right, 1 and 3 wrong), rows 4-5 go to the backbone
    return x, [0, 0, 2, 1, 1, 2], [0, 1, 0, 1, FINAL, FINAL]


def test_every_item_shadowed_measures_true_agreement_and_hit_rates():
    x, predictions, exits = _batch()
    monitor = TrafficMonitor(MonitorConfig(shadow_fraction=1.0, seed=0))
    monitor.observe(x, _output(x, predictions, exits), ["a", "b"], Linear(), "v1")
    snap = monitor.snapshot()
    assert snap["items"] == 6 and snap["shadow_samples"] == 6
    assert snap["hit_rates"] == pytest.approx({"a": 2 / 6, "b": 2 / 6, "final": 2 / 6})
    assert snap["live_agreement"] == pytest.approx(4 / 6)  # rows 1 and 3 disagree with the backbone
    assert snap["exit_agreement"]["a"] == {"agreement": 1.0, "samples": 2}
    assert snap["exit_agreement"]["b"] == {"agreement": 0.0, "samples": 2}
    assert monitor.live_agreement() == (pytest.approx(4 / 6), 6)


def test_no_shadowing_measures_hit_rates_only():
    x, predictions, exits = _batch()
    monitor = TrafficMonitor(MonitorConfig(shadow_fraction=0.0))
    monitor.observe(x, _output(x, predictions, exits), ["a", "b"], Linear(), "v1")
    assert monitor.live_agreement() is None and monitor.snapshot()["hit_rates"]["final"] == pytest.approx(1 / 3)


def test_logged_items_carry_input_backbone_softmax_exit_and_version(tmp_path):
    x, predictions, exits = _batch()
    encoded = [(b"\x89PNG fake", "image/png")] + [None] * 5
    monitor = TrafficMonitor(MonitorConfig(log=str(tmp_path / "log"), log_fraction=1.0, shadow_fraction=0.0))
    monitor.observe(x, _output(x, predictions, exits), ["a", "b"], Linear(), "v7", encoded)
    monitor.close()
    records = list(TrafficLog(tmp_path / "log").read())
    assert len(records) == 6 and monitor.snapshot()["logging"]["logged"] == 6
    by_input = sorted(records, key=lambda r: (r.encoded is None, r.prediction))
    assert by_input[0].encoded == b"\x89PNG fake" and by_input[0].input is None
    assert all(r.bundle_version == "v7" and r.source == "serve" for r in records)
    exits_logged = sorted(r.exit for r in records)
    assert exits_logged == ["a", "a", "b", "b", "final", "final"]
    for r in records:
        if r.exit == "final":  # answered by the backbone: its softmax is known without a shadow run
            assert r.backbone_probs is not None and int(np.argmax(r.backbone_probs)) == r.prediction
        else:
            assert r.backbone_probs is None and not r.shadow
    tensors = [r for r in records if r.input is not None]
    assert any(torch.equal(r.input, x[5]) for r in tensors)


class BrokenLog:
    def append(self, record):
        raise TrafficLogError("disk full while writing /nowhere/shard")

    def flush(self):
        return 0

    def close(self):
        pass


def test_a_failing_log_is_switched_off_with_the_reason_and_observe_goes_on():
    x, predictions, exits = _batch()
    monitor = TrafficMonitor(MonitorConfig(log_fraction=1.0, shadow_fraction=1.0), traffic_log=BrokenLog())
    monitor.observe(x, _output(x, predictions, exits), ["a", "b"], Linear(), "v1")
    monitor.observe(x, _output(x, predictions, exits), ["a", "b"], Linear(), "v1")
    snap = monitor.snapshot()
    assert snap["logging"]["enabled"] is False and "disk full" in snap["logging"]["error"]
    assert snap["items"] == 12 and snap["shadow_samples"] == 12  # monitoring still counts


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="shadow_fraction must be in"):
        MonitorConfig(shadow_fraction=1.5)

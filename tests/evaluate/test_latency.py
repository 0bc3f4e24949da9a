"""The one latency timer (selfxit.core.latency) that evaluate and the report share."""
import numpy as np
import torch

from selfxit.core.latency import alternate, time_batch
from selfxit.core.runtime import SampleResult
from selfxit.evaluate.evaluation import _latency_ratio


def test_alternate_warms_up_then_alternates_on_the_same_batches():
    calls = []
    runs = {"a": lambda x, cb: calls.append(("a", int(x[0]))), "b": lambda x, cb: calls.append(("b", int(x[0])))}
    batches = [torch.tensor([i]) for i in range(3)]
    timings = alternate(runs, batches)
    assert calls == [("a", 0), ("b", 0),  # warm-up on the first batch
                     ("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert all(len(t.batch_seconds) == 3 and t.total >= 0 for t in timings.values())
    assert all(not t.batch_seconds for t in alternate(runs, []).values())  # nothing to time, nothing run


def test_time_batch_stamps_samples_when_their_answer_arrives():
    def run(x, callback):
        callback(SampleResult(1, 0, 1.0, 0, torch.zeros(2)))  # sample 1 answered first
        sum(range(200_000))  # then some work before the batch ends
    elapsed, each = time_batch(run, torch.zeros(3, 2), per_sample=True)
    assert each[1] < elapsed and np.all(each[[0, 2]] == elapsed)  # unanswered samples count at the end
    _, plain = time_batch(lambda x, cb: None, torch.zeros(3, 2))
    assert np.all(plain == plain[0])


def test_evaluate_ratio_uses_the_shared_timer():
    class Model:
        backbone = staticmethod(lambda x: sum(range(20_000)))

        def __call__(self, x):
            return sum(range(2_000))

    ratio, backbone_ms = _latency_ratio(Model(), torch.zeros(8, 2), 2, 3)
    assert 0 < ratio < 1 and backbone_ms > 0
    assert np.isnan(_latency_ratio(Model(), torch.zeros(1, 2), 2, 3)[0])  # no full batch: nothing timed


def test_evaluate_times_the_no_fire_pass_against_the_same_runtime_backbone():
    """Models with ``no_fire`` and ``plain`` (EarlyExitModel) get the worst case measured in the same run, and
    the baseline is the backbone run their way."""
    calls = []

    class Model:
        backbone = staticmethod(lambda x: calls.append("eager"))

        def __call__(self, x):
            return sum(range(2_000))

        def plain(self):
            return lambda x: (calls.append("plain"), sum(range(20_000)))

        def no_fire(self):
            return lambda x: sum(range(40_000))

    from selfxit.evaluate.evaluation import _latency_ratios
    ratio, worst, backbone_ms = _latency_ratios(Model(), torch.zeros(8, 2), 2, 3)
    assert 0 < ratio < 1 < worst and backbone_ms > 0
    assert "eager" not in calls and calls.count("plain") == 4  # warm-up + 3 batches, never the bare backbone

"""The bucketed runtime: bucket ladder, stages, on-device compaction, padding exactness, fixed buckets, compile paths."""
import warnings

import pytest
import torch
from backbones import scrambled_resnet20
from torch import nn

import selfxit.core.buckets as bk
from selfxit.api import EarlyExitModel
from selfxit.core import fused
from selfxit.core.bucketed import BucketedRunner, RuntimeConfig
from selfxit.core.candidates import Candidate
from selfxit.core.engine import NEVER, Engine
from selfxit.core.heads import DEFAULT_HEAD, build_head
from selfxit.core.runtime import FINAL, EarlyExitRunner, Exit
from selfxit.core.stages import StageError, split_stages

LAYERS = {"layer1": (16, 32, 32), "layer2.2": (32, 16, 16), "layer3.1": (64, 8, 8)}


BACKBONE = scrambled_resnet20()
X = torch.randn(13, 3, 32, 32)
with torch.no_grad():
    REFERENCE = BACKBONE(X)


class RowHead(nn.Module):
    """A head that fires on chosen samples: the sample is named by the sum of its activation (a per-row key
    computed once from the backbone), so the answer does not depend on the batch it runs in."""

    def __init__(self, layer: str, fire: set[int]):
        super().__init__()
        self.inner = build_head(DEFAULT_HEAD, LAYERS[layer], 10)
        self.register_buffer("keys", torch.tensor([KEYS[layer][i] for i in sorted(fire)]) if fire else torch.empty(0))

    def forward(self, x):
        logits = self.inner(x)
        key = x.flatten(1).sum(dim=1, keepdim=True)
        fires = ((key - self.keys[None, :]).abs() < 1e-3 * (1 + self.keys.abs())).any(dim=1, keepdim=True) \
            if len(self.keys) else torch.zeros_like(key, dtype=torch.bool)
        return logits + 50.0 * fires * nn.functional.one_hot(logits.argmax(1), 10)


def _keys():
    modules = dict(BACKBONE.named_modules())
    keys, hooks = {}, []
    for name in LAYERS:
        hooks.append(modules[name].register_forward_hook(
            lambda m, i, out, name=name: keys.__setitem__(name, out.flatten(1).double().sum(1).tolist())))
    with torch.no_grad():
        BACKBONE(X)
    for h in hooks:
        h.remove()
    for name, values in keys.items():
        assert len({round(v, 1) for v in values}) == len(values), f"keys of {name} must be distinct"
    return keys


KEYS = _keys()


def _exits(pattern, threshold=0.99):
    return [Exit(name, RowHead(name, fire), 1.0, threshold) for name, fire in zip(LAYERS, pattern)]


def _config(**kw):
    kw.setdefault("max_batch", 16)
    return RuntimeConfig(engine="buckets", **kw)


# ---- the ladder -----------------------------------------------------------------------------------------

def test_default_ladder_is_powers_of_two_up_to_the_maximum():
    assert bk.ladder(16) == (1, 2, 4, 8, 16)
    assert bk.ladder(24) == (1, 2, 4, 8, 16, 24)
    assert bk.ladder(1) == (1,)
    assert bk.ladder(10, [8, 1, 12]) == (1, 8, 12)
    assert bk.bucket_for(5, (1, 2, 4, 8)) == 8 and bk.bucket_for(1, (1, 2)) == 1


def test_a_ladder_that_does_not_cover_the_maximum_batch_is_refused_at_start_up():
    with pytest.raises(ValueError, match="does not cover the maximum batch 64"):
        RuntimeConfig(engine="buckets", max_batch=64, buckets=(1, 8, 32)).validate()
    with pytest.raises(ValueError, match="does not cover the maximum batch 64"):
        EarlyExitModel(BACKBONE, (3, 32, 32), 10, [], 1).runtime = RuntimeConfig(
            engine="buckets", max_batch=64, buckets=(1, 8, 32))
    for bad in ([0, 4], [2, 2], ["4"]):
        with pytest.raises(ValueError, match="buckets must be"):
            bk.ladder(4, bad)
    with pytest.raises(ValueError, match="max_batch"):
        bk.ladder(0)
    with pytest.raises(ValueError, match="do not fit the largest bucket"):
        bk.bucket_for(9, (1, 8))


def test_runtime_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="engine"):
        RuntimeConfig(engine="graphs").validate()
    with pytest.raises(ValueError, match="compile"):
        RuntimeConfig(engine="buckets", compile="max").validate()
    with pytest.raises(ValueError, match="hit_rates"):
        RuntimeConfig(engine="buckets", sync="fixed").validate()
    with pytest.raises(ValueError, match="engine='buckets'"):
        RuntimeConfig(compile="all").validate()


def test_fixed_buckets_follow_the_hit_rates_and_never_grow():
    sizes = bk.ladder(128)
    fixed = bk.fixed_buckets([0.3, 0.3, 0.2], 128, sizes)
    assert fixed == sorted(fixed, reverse=True) and fixed[0] <= 128
    assert fixed[-1] >= 0.2 * 128  # 20% survive on average: the bucket holds them and their spread
    assert bk.fixed_buckets([0.0], 8, bk.ladder(8)) == [8]
    with pytest.raises(ValueError, match="hit rates"):
        bk.fixed_buckets([0.7, 0.6], 8, bk.ladder(8))


# ---- compaction -------------------------------------------------------------------------------------------

def test_compaction_puts_survivors_first_in_order_then_padding():
    keep = torch.tensor([False, True, False, True, True, False])
    take = bk.compaction(keep, 4)
    assert take.tolist()[:3] == [1, 3, 4] and not keep[take[3]]
    assert bk.full_order(keep).tolist() == [1, 3, 4, 0, 2, 5]
    assert bk.compaction(keep, 2).tolist() == [1, 3]  # a fixed bucket smaller than the survivors: the rest overflow
    assert bk.pad_rows(torch.ones(3, 2), 4).tolist() == [[1, 1], [1, 1], [1, 1], [0, 0]]


# ---- stages -------------------------------------------------------------------------------------------------

def test_stages_chained_are_the_backbone_bit_for_bit():
    stages = split_stages(BACKBONE, list(LAYERS))
    assert len(stages) == 4
    y = X
    with torch.no_grad():
        for stage in stages:
            y = stage(y)
    assert torch.equal(y, REFERENCE)
    assert torch.equal(split_stages(BACKBONE, [])[0](X), REFERENCE)


class _ReadsBatchAcrossExit(nn.Module):
    """Reads the batch size before the exit ``a`` and uses it after, as EfficientNet-Lite does."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        n = x.size(0)
        return self.b(self.a(x).view(n, -1))


class _ReusesInputAfterExit(_ReadsBatchAcrossExit):
    def forward(self, x):
        return self.b(self.a(x)) + x.sum()


def test_batch_size_reads_across_an_exit_are_recomputed_and_real_reuse_is_refused():
    model = _ReadsBatchAcrossExit().eval()
    first, second = split_stages(model, ["a"])
    x = torch.randn(5, 4)
    assert torch.equal(second(first(x)[:3]), model(x)[:3])  # the second stage runs at its own batch size
    with pytest.raises(StageError, match="computed before its input"):
        split_stages(_ReusesInputAfterExit(), ["a"])
    with pytest.raises(StageError, match="not in forward order"):
        split_stages(BACKBONE, ["layer3.1", "layer1"])


# ---- the runner ----------------------------------------------------------------------------------------------

PATTERNS = [
    [set(), set(), set()],                      # nothing fires
    [set(range(13)), set(), set()],             # everything at the first exit
    [{0, 5, 7}, {1, 2, 12}, {3}],               # a mix
    [set(range(1, 13)), set(), set()],          # a lone survivor
    [{0, 1, 2, 3, 4, 5, 6, 7, 8}, {9}, set()],  # survivors shrink to a small bucket
]


@pytest.mark.parametrize("sync", ["count", "fixed"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_bucketed_answers_match_the_hook_runtime(pattern, sync):
    exits = _exits(pattern)
    expected = EarlyExitRunner(BACKBONE, exits, 10)(X)
    runner = BucketedRunner(BACKBONE, exits, 10, _config(sync=sync, hit_rates=(0.5, 0.3, 0.1)))
    seen = []
    out = runner(X, callback=lambda r: seen.append(r.index))
    assert sorted(seen) == list(range(13))
    assert torch.equal(out.exit, expected.exit)
    assert torch.equal(out.predictions, expected.predictions)
    final = out.exit == FINAL
    assert torch.equal(out.predictions[final], REFERENCE[final].argmax(1))
    torch.testing.assert_close(out.logits[final], REFERENCE[final], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[~final], expected.logits[~final], rtol=1e-5, atol=1e-5)


def test_padding_rows_never_change_a_real_rows_answer(monkeypatch):
    exits = _exits(PATTERNS[2])
    runner = BucketedRunner(BACKBONE, exits, 10, _config())
    rows = X[:5]  # bucket 8: three padding rows
    clean = runner(rows)
    monkeypatch.setattr(bk, "pad_rows", lambda x, size: torch.cat([x, 1e3 * torch.randn(size - len(x), *x.shape[1:])]))
    noisy = runner(rows)
    assert torch.equal(clean.logits, noisy.logits) and torch.equal(clean.exit, noisy.exit)


def test_fixed_buckets_that_overflow_still_answer_every_sample():
    """Hit rates that promise 90% at the first exit while nothing fires: the fixed bucket overflows and the
    set-aside survivors finish after the one read at the end."""
    exits = _exits(PATTERNS[0])
    runner = BucketedRunner(BACKBONE, exits, 10, _config(sync="fixed", hit_rates=(0.9, 0.05, 0.0)))
    assert runner._fixed_sizes(16)[0] < 13
    out = runner(X)
    assert (out.exit == FINAL).all()
    torch.testing.assert_close(out.logits, REFERENCE, rtol=1e-5, atol=1e-5)


def test_batches_beyond_the_largest_bucket_run_in_chunks():
    exits = _exits(PATTERNS[2])
    out = BucketedRunner(BACKBONE, exits, 10, _config(max_batch=4))(X)
    assert torch.equal(out.exit, EarlyExitRunner(BACKBONE, exits, 10)(X).exit)


def test_warm_runs_every_bucket_and_names_the_bucket_on_out_of_memory(monkeypatch):
    runner = BucketedRunner(BACKBONE, _exits(PATTERNS[0]), 10, _config(max_batch=4))
    assert runner.warm(X[:1]) == [1, 2, 4]
    step = runner._steps[1]

    def oom(x, *args):
        if len(x) == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(x, *args)

    runner._steps[1] = oom
    with pytest.raises(RuntimeError, match="out of memory while warming bucket 4 of exit layer2.2"):
        runner.warm(X[:1])


def test_thresholds_move_without_rebuilding_and_no_fire_never_fires():
    engine = Engine(_config())
    exits = _exits(PATTERNS[2])
    runner = engine.runner(BACKBONE, exits, 10)
    exits[0].threshold = NEVER
    assert engine.runner(BACKBONE, exits, 10) is runner  # same steps, threshold moved in place
    assert not (runner(X).exit == 0).any()
    exits[0].threshold = 0.99
    assert (engine.no_fire(BACKBONE, exits, 10)(X).exit == FINAL).all()
    assert (engine.runner(BACKBONE, exits, 10)(X).exit == 0).sum() == 3
    torch.testing.assert_close(engine.plain(BACKBONE, 10)(X), REFERENCE, rtol=1e-5, atol=1e-5)


# ---- compile paths -------------------------------------------------------------------------------------------

def test_a_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(module, **kw):
        def run(*args):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    exits = _exits(PATTERNS[2])
    runner = BucketedRunner(BACKBONE, exits, 10, _config(compile="all"))
    with pytest.warns(RuntimeWarning, match="torch.compile of exit layer1 failed.*inductor exploded"):
        out = runner(X)
    assert torch.equal(out.exit, EarlyExitRunner(BACKBONE, exits, 10)(X).exit)
    heads_only = BucketedRunner(BACKBONE, exits, 10, _config(compile="heads"))
    with pytest.warns(RuntimeWarning, match="exit layer1 head failed"):
        heads_only(X)


def test_cuda_graphs_without_a_cuda_device_run_eagerly_with_a_warning():
    with pytest.warns(RuntimeWarning, match="needs a CUDA device"):
        runner = BucketedRunner(BACKBONE, _exits(PATTERNS[2]), 10, _config(compile="cudagraph"))
    assert all(isinstance(step, fused.Step) for step in runner._steps)


@pytest.mark.slow
def test_compiled_heads_give_the_eager_answers():
    """One real torch.compile (heads and decisions, bucket 1 and 2): the same exits, logits within 1e-4."""
    exits = _exits(PATTERNS[2])
    eager = BucketedRunner(BACKBONE, exits, 10, _config(max_batch=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile that falls back would hide the compiled path
        compiled = BucketedRunner(BACKBONE, exits, 10, _config(max_batch=2, compile="heads"))
        a, b = eager(X[:2]), compiled(X[:2])
    assert torch.equal(a.exit, b.exit)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)


# ---- the model's runtime option ---------------------------------------------------------------------------------

def _model(pattern):
    ee = EarlyExitModel(BACKBONE, (3, 32, 32), 10, [Candidate(n, s, 1) for n, s in LAYERS.items()], 10)
    ee.set_records(_exits(pattern))
    return ee


def test_the_default_runtime_stays_the_exact_hook_runtime():
    ee = _model(PATTERNS[2])
    assert ee.runtime.engine == "hooks" and ee.warm() == []
    out = ee(X)
    assert torch.equal(out.logits[out.exit == FINAL], REFERENCE[out.exit == FINAL])
    ee.runtime = _config()
    assert ee.warm(plain=True) == [1, 2, 4, 8, 16] and ee.warm_buckets == [1, 2, 4, 8, 16]
    bucketed = ee(X)
    assert torch.equal(bucketed.exit, out.exit)
    assert ee(X, shrink=False).exit_predictions is not None  # the no-shrink pass stays on the hook runtime


def test_a_model_moves_between_devices_or_says_why_not():
    ee = _model(PATTERNS[2])
    ee.runtime = _config()
    assert ee.to("cpu").device == torch.device("cpu") and len(ee(X).exit) == 13
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device here"):
            ee.to("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["off", "cudagraph", "reduce-overhead"])
def test_on_gpu_non_exited_samples_get_the_backbones_answer(mode, monkeypatch):
    """On the device: the same exits as on CPU, non-exited top-1 equal to the backbone's, logits within 1e-3
    (TF32 off, so that the scripted heads recognise their rows), and the model comes back to CPU intact."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ee = _model(PATTERNS[2])
    cpu = ee(X)
    try:
        ee.to("cuda")
        ee.runtime = _config(compile=mode)
        ee.warm(plain=True)
        out = ee(X.cuda())
        reference = BACKBONE(X.cuda()).cpu()
        plain = ee.plain()(X.cuda()).cpu()
    finally:
        ee.to("cpu")
    assert torch.equal(out.exit.cpu(), cpu.exit)
    final = (out.exit == FINAL).cpu()
    assert torch.equal(out.predictions.cpu()[final], reference[final].argmax(1))
    torch.testing.assert_close(out.logits.cpu()[final], reference[final], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(plain, reference, rtol=1e-3, atol=1e-3)
    assert torch.equal(ee(X).exit, cpu.exit)


@pytest.mark.gpu
def test_on_gpu_padding_and_the_no_sync_mode_change_no_answer():
    ee = _model(PATTERNS[2])
    try:
        ee.to("cuda")
        ee.runtime = _config(compile="cudagraph", sync="fixed", hit_rates=(0.2, 0.2, 0.1))
        ee.warm()
        x = X.cuda()
        whole, alone = ee(x), ee(x[:5])
        counted = ee._engine.runner(ee.backbone, ee.exits, 10).with_sync("count")(x)
    finally:
        ee.to("cpu")
    assert torch.equal(whole.exit[:5], alone.exit) and torch.equal(whole.predictions[:5], alone.predictions)
    assert torch.equal(whole.exit, counted.exit) and torch.equal(whole.predictions, counted.predictions)

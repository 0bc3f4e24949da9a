"""The nightly retrain job: publish rule, real retrain on logged ResNet-20 traffic, idempotence, kill safety."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import selfxit
from selfxit.core.runtime import FINAL
from selfxit.fit.distill import DistillConfig
from selfxit.fit.medial import MedialDataset
from selfxit.ops.retrain import BundleCheck, RetrainConfig, decide, parse_duration, retrain
from selfxit.ops.traffic import TrafficLog, TrafficRecord
from selfxit.ops.versions import BundleStore
from selfxit.zoo import load_backbone
from selfxit.zoo.data import ImageFolderData

# pinned, so that the setup does not depend on automatic candidate selection: heads on these layers of ResNet-20
# reach a usable agreement after 2 epochs on 140 images
LAYERS = ["conv1", "layer1", "layer2"]


def test_parse_duration():
    assert parse_duration("24h") == 86400 and parse_duration("30m") == 1800 and parse_duration("90s") == 90
    assert parse_duration("7d") == 7 * 86400 and parse_duration("15") == 15 and parse_duration(None) is None
    with pytest.raises(ValueError, match="not understood"):
        parse_duration("yesterday")


def test_publish_rule():
    good, stale_fast, slow = BundleCheck(0.6, 0.995, {}), BundleCheck(0.5, 0.95, {}), BundleCheck(0.9, 0.999, {})
    assert decide(slow, good, 0.01)[0]  # saves more, within tolerance
    publish, reason = decide(good, slow, 0.01)
    assert not publish and "fewer FLOPs" in reason
    publish, reason = decide(good, BundleCheck(0.4, 0.97, {}), 0.01)
    assert not publish and "drops" in reason
    publish, reason = decide(stale_fast, good, 0.01)  # the current bundle broke the promise: replace it
    assert publish and "breaks the tolerance" in reason


def test_config_is_validated():
    with pytest.raises(ValueError, match="holdout_fraction"):
        RetrainConfig(holdout_fraction=1.0)
    with pytest.raises(ValueError, match="tolerance"):
        RetrainConfig(tolerance=2)


@pytest.fixture(scope="module")
def setup(shared, tmp_path_factory):
    """A ResNet-20 bundle with every exit off (so any sensible candidate saves FLOPs) and a log of 700 images."""
    torch.set_num_threads(1)
    model, info = load_backbone("cifar_resnet20")
    images = ImageFolderData(shared / "data" / "cifar10-test", info, max_samples=900, seed=3)
    root = tmp_path_factory.mktemp("retrain")
    ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32), candidate_layers=LAYERS)
    ee.collect(torch.stack([images[i][0] for i in range(200)]), root / "medial", augment_copies=0, progress=False)
    ee.fit(0.2, distill=DistillConfig(epochs=2), method="joint", progress=False)
    ee.thresholds = {}
    current = ee.save(root / "current")
    log = TrafficLog(root / "log")
    now = time.time()
    for i in range(200, 900):
        log.append(TrafficRecord(timestamp=now - (900 - i), input=images[i][0], exit="final", source="collect"))
    log.close()
    probe = torch.stack([images[i][0] for i in range(200, 264)])  # logged traffic, to run bundles on
    return {"model": model, "info": info, "root": root, "current": current, "log": root / "log", "probe": probe}


@pytest.mark.slow
def test_retrain_publishes_a_better_bundle_and_a_second_run_on_the_same_window_does_nothing(setup):
    store = BundleStore(setup["root"] / "bundles")
    config = RetrainConfig(since=None, tolerance=0.2, min_records=100, epochs=5, augment_copies=1)
    result = retrain(setup["log"], store, setup["model"], setup["info"], config, current_bundle=setup["current"],
                     progress=False)
    assert result.records == 700 and result.holdout_records == 210 and result.train_records == 490
    assert result.current.flops_fraction == pytest.approx(1.0)  # every exit off
    assert result.published, result.reason
    assert result.candidate.flops_fraction < 1.0 and 1 - result.candidate.agreement <= 0.2
    assert result.version == "v000002" and store.current() == "v000002"  # v000001: the imported current bundle
    published = selfxit.load(store.current_path, setup["model"])
    assert published.provenance.retrain.window_digest == result.window_digest
    again = retrain(setup["log"], store, setup["model"], setup["info"], config, progress=False)
    assert not again.published and "already retrained" in again.reason
    assert [v.name for v in store.versions()] == ["v000001", "v000002"]


@pytest.mark.slow
def test_a_learned_gate_bundle_is_retrained_as_learned_gates(setup):
    model = setup["model"]
    ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32), candidate_layers=LAYERS)
    ee.medial = MedialDataset(setup["root"] / "medial")
    ee.fit(0.2, distill=DistillConfig(epochs=2), gate="learned", progress=False)
    ee.thresholds = {}  # every exit off, so a sensible candidate saves FLOPs
    current = ee.save(setup["root"] / "current-learned")
    store = BundleStore(setup["root"] / "bundles-learned")
    config = RetrainConfig(since=None, tolerance=0.2, min_records=100, epochs=5, augment_copies=1)
    result = retrain(setup["log"], store, model, setup["info"], config, current_bundle=current, progress=False)
    assert result.published, result.reason
    published = selfxit.load(store.current_path, model)
    assert published.gate == "learned" and published.thresholds and set(published.thresholds) <= set(published.gates)
    x = setup["probe"]
    out = published(x)
    assert torch.equal(out.exit, published(x, shrink=False).exit)  # the runtime shrinks on the gates' decisions
    with torch.no_grad():
        reference = model(x)
    final = out.exit == FINAL
    assert torch.equal(out.logits[final], reference[final])


def test_too_few_records_does_nothing(setup):
    store = BundleStore(setup["root"] / "few")
    result = retrain(setup["log"], store, setup["model"], setup["info"],
                     RetrainConfig(since=None, min_records=1000), current_bundle=setup["current"], progress=False)
    assert not result.published and "only 700 records" in result.reason
    assert store.current() == "v000001"


@pytest.mark.slow
def test_retrain_killed_halfway_leaves_the_published_bundle_untouched(setup):
    """kill -9 a real `selfxit retrain` process while it trains: the store is exactly as before."""
    store = BundleStore(setup["root"] / "killed")
    store.publish(setup["current"], reason="serving")
    before = (store.current_path / "manifest.json").read_bytes()
    script = textwrap.dedent("""
        import sys
        from selfxit import api, cli
        real_fit = api.EarlyExitModel.fit
        def fit(self, *a, **k):
            print("fitting", flush=True)
            sys.stdin.readline()  # killed here
            return real_fit(self, *a, **k)
        api.EarlyExitModel.fit = fit
        sys.exit(cli.main(sys.argv[1:]))
    """)
    cmd = [sys.executable, "-c", script, "retrain", "--log", str(setup["log"]), "--model", "cifar_resnet20",
           "--out", str(store.root), "--since", "all", "--min-records", "100", "--tolerance", "0.2", "--json"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.strip() == "fitting", line
    finally:
        proc.kill()
        proc.wait(30)
    assert store.current() == "v000001" and [v.name for v in store.versions()] == ["v000001"]
    assert (store.current_path / "manifest.json").read_bytes() == before
    selfxit.load(store.current_path, setup["model"])  # still a working bundle


def test_retrain_command_prints_json(setup, capsys):
    from selfxit.cli import main
    store = BundleStore(setup["root"] / "cli")
    code = main(["retrain", "--log", str(setup["log"]), "--bundle", str(setup["current"]), "--model", "cifar_resnet20",
                 "--out", str(store.root), "--since", "all", "--min-records", "1000", "--keep-log", "1d", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["published"] is False and "only 700 records" in out["reason"]
    assert out["log_records_pruned"] == 0  # every record is younger than a day
    assert main(["rollback", "--out", str(store.root)]) == 2  # only one version: a clear error, exit 2
    assert "oldest version" in capsys.readouterr().err


def _guard_state(path, alarmed, since=None):
    moves = [{"at": since, "kind": "tighten", "from_scale": 0.86, "to_scale": 0.84, "shadow_samples": 300,
              "wealth": 21.0}] if alarmed else []
    path.write_text(json.dumps({"active": True, "alarmed": alarmed, "scale": 0.84 if alarmed else 0.86,
                                "certified_scale": 0.86, "alarmed_since": since, "moves": moves,
                                "bundle_version": "v000001", "updated_at": "2026-01-01T00:00:00+00:00"}))
    return path


def test_guard_alarm_reads_the_state(tmp_path, setup):
    from selfxit.ops.retrain import guard_alarm

    run, why = guard_alarm(tmp_path / "missing.json", setup["log"], 100)
    assert not run and "no live guard state" in why
    run, why = guard_alarm(_guard_state(tmp_path / "calm.json", False), setup["log"], 100)
    assert not run and "not alarmed" in why
    old = time.time() - 10_000  # before every logged record
    run, why = guard_alarm(_guard_state(tmp_path / "alarm.json", True, old), setup["log"], 100)
    assert run and "700 records" in why
    run, why = guard_alarm(_guard_state(tmp_path / "alarm.json", True, old), setup["log"], 1000)
    assert not run and "only 700 records" in why
    run, why = guard_alarm(_guard_state(tmp_path / "late.json", True, time.time() + 5), setup["log"], 100)
    assert not run and "only 0 records" in why


def test_retrain_if_alarmed_does_nothing_without_an_alarm(setup, tmp_path, capsys):
    from selfxit.cli import main
    store = BundleStore(tmp_path / "bundles")
    args = ["retrain", "--if-alarmed", "--log", str(setup["log"]), "--bundle", str(setup["current"]),
            "--model", "cifar_resnet20", "--out", str(store.root), "--since", "all", "--min-records", "100"]
    assert main(args) == 0  # no guard.json in the log folder
    assert "no live guard state" in capsys.readouterr().out and store.current() is None
    state = _guard_state(tmp_path / "guard.json", False)
    assert main([*args, "--guard-state", str(state), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ran"] is False and "not alarmed" in out["reason"] and store.current() is None


def test_retrain_if_alarmed_runs_the_job_when_alarmed(setup, tmp_path, capsys):
    """Alarmed with enough records since the alarm: the job runs (here on an empty 1 s window, so it stops at
    its own record check, which proves it ran without training anything)."""
    from selfxit.cli import main
    store = BundleStore(tmp_path / "bundles")
    state = _guard_state(tmp_path / "guard.json", True, time.time() - 10_000)
    code = main(["retrain", "--if-alarmed", "--guard-state", str(state), "--log", str(setup["log"]), "--bundle",
                 str(setup["current"]), "--model", "cifar_resnet20", "--out", str(store.root), "--since", "1s",
                 "--min-records", "100", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    assert "alarmed since" in captured.err and "retraining" in captured.err
    out = json.loads(captured.out)
    assert out["published"] is False and "only 0 records" in out["reason"]


def test_read_guard_state_keeps_what_the_job_reads(tmp_path):
    from selfxit.ops.retrain import read_guard_state
    since = time.time() - 100
    state = read_guard_state(_guard_state(tmp_path / "guard.json", True, since))
    assert state["alarmed"] and state["scale"] == 0.84 and state["certified_scale"] == 0.86
    assert state["tightens"] == 1 and state["first_tighten"] == since and state["bundle_version"] == "v000001"
    (tmp_path / "torn.json").write_text('{"alarmed": tr')
    with pytest.raises(ValueError, match="could not be read"):
        read_guard_state(tmp_path / "torn.json")
    with pytest.raises(FileNotFoundError):
        read_guard_state(tmp_path / "missing.json")


def test_served_check_runs_the_current_bundle_at_the_guard_scale(setup):
    """The nightly job reads the guard's last scale: the current bundle is checked there (reported only)."""
    from selfxit.core.exits import CertifiedFamily
    from selfxit.ops.retrain import served_check
    current = selfxit.load(setup["current"], setup["model"])
    layer = next(iter(current.records))  # a trained head (the others of the setup are near chance)
    current.family = CertifiedFamily({layer: 0.0}, 1.0, [0.0, 0.5, 1.0], 0.2, 0.1)  # s = 1: threshold 0
    x = setup["probe"]
    with torch.no_grad():
        reference = setup["model"](x).argmax(1)
    alarmed = {"alarmed": True, "scale": 1.0, "tightens": 2, "bundle_version": None}
    check, note = served_check(current, alarmed, x, reference)
    assert check.exit_rates[layer] == pytest.approx(1.0) and check.flops_fraction < 0.5  # every sample exits
    assert "scale 1 of certified 1.0" in note and "2 alarm(s)" in note
    assert current.thresholds == {}  # the bundle's own thresholds are put back
    check, _ = served_check(current, {**alarmed, "scale": 0.0}, x, reference)
    assert (check.agreement, check.flops_fraction) == (1.0, 1.0)  # s = 0: the backbone alone
    assert served_check(current, {**alarmed, "alarmed": False}, x, reference) == (None, "")
    check, note = served_check(current, {**alarmed, "bundle_version": "v000007"}, x, reference)
    assert check is None and "v000007" in note


def test_every_retrain_reads_the_guard_state(setup, tmp_path, capsys):
    from selfxit.cli import main
    store = BundleStore(tmp_path / "bundles")
    state = _guard_state(tmp_path / "guard.json", True, time.time() - 10_000)
    code = main(["retrain", "--guard-state", str(state), "--log", str(setup["log"]), "--bundle", str(setup["current"]),
                 "--model", "cifar_resnet20", "--out", str(store.root), "--since", "all", "--min-records", "1000",
                 "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["guard"]["alarmed"] and out["guard"]["scale"] == 0.84 and out["guard"]["tightens"] == 1
    assert "only 700 records" in out["reason"]

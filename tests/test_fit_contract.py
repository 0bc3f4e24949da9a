"""fit's contract beyond its figures: FitConfig at the boundary, the caller's RNG, disjoint conformal
calibration, and bundles written by format 1 (the layout before exit records) still loading."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import selfxit
from selfxit.core.runtime import FINAL
from selfxit.fit import conformal, procedure
from selfxit.fit.config import FitConfig, FitConfigError
from selfxit.fit.distill import DistillConfig
from selfxit.zoo import load_backbone
from selfxit.zoo.data import ImageFolderData


@pytest.fixture(scope="module")
def collected(shared, tmp_path_factory):
    model, info = load_backbone("cifar_resnet20")
    traffic = ImageFolderData(shared / "data" / "cifar10-test", info, max_samples=300, seed=4)
    ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32), max_candidates=3)
    ee.collect(torch.utils.data.DataLoader(traffic, batch_size=100), tmp_path_factory.mktemp("medial"),
               augment_copies=1, progress=False)
    images = torch.stack([traffic[i][0] for i in range(16)])
    return ee, model, images


FAST = FitConfig(tolerance=0.1, distill=DistillConfig(epochs=2), method="joint")


def test_fit_leaves_the_callers_random_stream_alone(collected):
    ee, *_ = collected
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    ee.fit(config=FAST, retrain=True, progress=False)
    assert torch.equal(torch.rand(5), expected)  # fit seeded its heads locally, not the global generator


def test_conformal_sets_are_calibrated_on_samples_that_did_not_choose_the_scale(collected, monkeypatch):
    ee, *_ = collected
    seen = {}
    real = conformal.calibrate_cascade

    def spy(layers, active, log_probs, taken, top1, *args, **kwargs):
        seen["rows"] = len(taken)
        seen["streamed"] = callable(log_probs) and not isinstance(log_probs, torch.Tensor)
        return real(layers, active, log_probs, taken, top1, *args, **kwargs)

    monkeypatch.setattr(conformal, "calibrate_cascade", spy)
    report = ee.fit(config=FAST.replace(method="certified"), progress=False)
    tune, val = len(ee.medial.indices("tune")), len(ee.medial.indices("val"))
    assert tune != val and seen["rows"] == tune  # 'val' certified the scale; the sets use 'tune'
    assert report.conformal_split == "tune"
    assert seen["streamed"]  # scored from the store on demand: no [heads, rows, classes] tensor held by the fit


def test_fit_config_round_trips_through_yaml(tmp_path):
    config = FitConfig(tolerance=0.02, max_exits=2, gate="learned", near_chance_margin=0.1, design_factor=2.0,
                       distill=DistillConfig(epochs=3))
    path = tmp_path / "fit.yaml"
    import yaml
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert FitConfig.from_file(path) == config
    assert FitConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    several = FitConfig(design_factor=[1, 1.5])  # a list of factors: kept as a tuple, written as a list
    assert several.design_factor == (1.0, 1.5)
    path.write_text(yaml.safe_dump(several.to_dict()))
    assert FitConfig.from_file(path) == several


def test_the_documented_config_file_is_the_default_config():
    """The YAML example in selfxit.fit.config's docstring states the defaults (max_exits 4, not the old 3)."""
    import re

    import yaml

    from selfxit.fit import config as config_module
    documented = {}
    for line in config_module.__doc__.splitlines():
        match = re.match(r"^    (\w+): (.+?)\s*(#.*)?$", line)
        if match and match.group(1) != "gate_config":  # its example is abridged ("...")
            documented[match.group(1)] = yaml.safe_load(match.group(2))
    assert {"tolerance", "max_exits", "design_factor", "distill"} <= set(documented)
    assert FitConfig.from_dict(documented) == FitConfig()
    assert FitConfig().max_exits == 4


@pytest.mark.parametrize("raw, match", [
    ({"tolerence": 0.01}, "unknown keys \\['tolerence'\\]"),
    ({"tolerance": 2}, "tolerance must be in \\(0, 1\\)"),
    ({"method": "magic"}, "method must be one of"),
    ({"gate": "learned", "method": "joint"}, "needs method='certified'"),
    ({"distill": {"epochs": 0}}, "distill"),
    ({"gate_config": {"colour": 1}}, "gate_config: unknown keys"),
    ({"design_factor": 0.5}, "design_factor must be a number >= 1"),
    ({"design_factor": []}, "non-empty list"),
    ({"design_factor": [1.0, 0.9]}, "design_factor must be a number >= 1"),
    ({"design_factor": True}, "design_factor must be a number >= 1"),
])
def test_fit_config_names_the_bad_key(raw, match):
    with pytest.raises(FitConfigError, match=match):
        FitConfig.from_dict(raw)


def test_fit_keyword_overrides_are_checked(collected):
    ee, *_ = collected
    with pytest.raises(FitConfigError, match="unknown fit settings"):
        ee.fit(0.05, colour="red")


def _write_format1(ee, path):
    """A bundle exactly as format 1 wrote it: parallel heads/exits/gates sections and a free-form meta."""
    path.mkdir()
    manifest = {
        "format_version": 1, "created": "2026-11-01T00:00:00+00:00",
        "backbone_fingerprint": selfxit.core.bundle.backbone_fingerprint(ee.backbone),
        "input_shape": list(ee.input_shape), "num_classes": ee.num_classes, "backbone_flops": ee.backbone_flops,
        "flops_counter": "deepspeed.profiling.flops_profiler (residual python adds not counted)",
        "candidates": [c.to_dict() for c in ee.candidates],
        "heads": {n: {"spec": r.spec, "temperature": r.temperature, "head_flops": r.head_flops,
                      "shape": list(r.shape)} for n, r in ee.records.items()},
        "exits": [{"layer": n, "threshold": th} for n, th in ee.thresholds.items()],
        "gate": "confidence", "gates": {}, "conformal": ee.conformal.to_dict(), "tolerance": ee.tolerance,
        "report": None, "meta": {"model": "cifar_resnet20", "seed": 4, "version": "v000007"},
    }
    tensors = {f"{n}/{k}": v.contiguous() for n, r in ee.records.items() for k, v in r.head.state_dict().items()}
    save_file(tensors, path / "heads.safetensors")
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_format_1_bundle_still_loads_and_answers_the_same(collected, tmp_path):
    ee, model, images = collected
    ee.fit(config=FAST.replace(near_chance_margin=-1), progress=False)  # keep every head, however weak
    assert len(ee.records) >= 2
    ee.thresholds = {name: 0.2 for name in ee.records}  # exits fire, so the heads are exercised
    _write_format1(ee, tmp_path / "old")
    old = selfxit.load(tmp_path / "old", model)
    assert old.thresholds == ee.thresholds and old.temperatures == ee.temperatures
    assert old.provenance.version == "v000007" and old.provenance.seed == 4
    a, b = ee(images), old(images)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.exit, b.exit) and (a.exit != FINAL).any()
    old.save(tmp_path / "new")  # and it is rewritten as format 2
    assert json.loads((tmp_path / "new" / "manifest.json").read_text())["format_version"] == 2
    assert torch.equal(selfxit.load(tmp_path / "new", model)(images).logits, a.logits)


def test_pruned_heads_leave_no_trace_in_any_record(collected):
    ee, *_ = collected
    report = ee.fit(config=FAST.replace(near_chance_margin=0.9), progress=False)  # every head near chance
    assert not any(h.kept for h in report.heads)
    assert ee.records == {} and ee.heads == {} and ee.temperatures == {} and ee.head_flops == {}
    assert ee.thresholds == {} and np.isfinite(report.chosen_val.flops_fraction)
    assert procedure.head_specs(ee.candidates, None, {}) == {c.name: selfxit.core.heads.DEFAULT_HEAD
                                                            for c in ee.candidates}


def test_the_certified_family_is_kept_and_gives_the_chosen_thresholds(collected, tmp_path):
    ee, model, _ = collected
    ee.fit(config=FAST.replace(method="certified", tolerance=0.2, near_chance_margin=-1), progress=False)
    family = ee.family
    assert family is not None and family.tolerance == 0.2 and family.scales[0] == 0.0
    assert set(family.shape) <= set(ee.records)
    if family.scale is None:
        assert ee.thresholds == {}
    else:
        chosen = {k: v for k, v in family.thresholds(family.scale).items() if k in ee.thresholds}
        assert chosen == pytest.approx(ee.thresholds)
        assert family.stricter(family.scale) < family.scale and family.looser(family.scale) == family.scale
    assert family.thresholds(0.0) == {layer: 1.0 for layer in family.shape}  # s = 0: no exit fires
    ee.save(tmp_path / "b")
    assert selfxit.load(tmp_path / "b", model).family == family

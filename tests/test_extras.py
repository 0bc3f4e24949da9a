"""Optional extras: a missing one gets an error naming the pip install; loading and running need none."""
import subprocess
import sys

import pytest

from selfxit.extras import EXTRAS, MissingExtraError, require_extra


def test_require_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'selfxit\[report\]'"):
        require_extra("report", "the report")
    with pytest.raises(ValueError, match="unknown extra"):
        require_extra("colour")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_serve_without_its_extra_says_what_to_install():
    code = ("import sys\nsys.modules['fastapi'] = None\nfrom selfxit.cli import main\n"
            "sys.exit(main(['serve', '--bundle', 'nowhere', '--model', 'cifar_resnet20']))")
    out = _run(code)
    assert out.returncode == 2 and "pip install 'selfxit[serve]'" in out.stderr


@pytest.mark.slow
def test_core_runs_with_no_optional_library_installed(tmp_path):
    """wrap, fit's pieces, save, load and run import none of NNI, DeepSpeed, FastAPI, matplotlib."""
    blocked = sorted({m for mods in EXTRAS.values() for m in mods})
    code = f"""
import sys
for name in {blocked!r}:
    sys.modules[name] = None
import warnings, torch, selfxit
from selfxit.core.exits import ExitRecord
from selfxit.core.heads import DEFAULT_HEAD, build_head
from selfxit.zoo.cifar_resnet import cifar_resnet
model = cifar_resnet('cifar_resnet20').eval()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32))
assert any('selfxit[flops]' in str(w.message) for w in caught), 'no warning about the missing FLOP counter'
cand = ee.candidates[2]
ee.set_records([ExitRecord(cand.name, build_head(DEFAULT_HEAD, cand.shape, 10), 1.0, 0.0, spec=DEFAULT_HEAD,
                           shape=cand.shape, head_flops=1)])
ee.save({str(tmp_path / 'b')!r})
out = selfxit.load({str(tmp_path / 'b')!r}, model)(torch.randn(4, 3, 32, 32))
assert (out.exit == 0).all()
print('ok')
"""
    out = _run(code)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]

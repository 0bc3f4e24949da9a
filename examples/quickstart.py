"""The Python API end to end on a small sample of the shared CIFAR-10 images (about a minute on 2 cores).

    .venv/bin/python examples/quickstart.py [--max-samples 2000] [--tolerance 0.05]
"""
import argparse
import tempfile

import torch

import selfxit
from selfxit.zoo import load_backbone
from selfxit.zoo.data import ImageFolderData, default_traffic_dir

parser = argparse.ArgumentParser()
parser.add_argument("--max-samples", type=int, default=2000)
parser.add_argument("--tolerance", type=float, default=0.05)
args = parser.parse_args()

model, info = load_backbone("cifar_resnet56")  # the shared pretrained weights
ee = selfxit.wrap(model, torch.zeros(1, *info.input_size))
print("candidate exit layers:", [c.name for c in ee.candidates])

traffic = ImageFolderData(default_traffic_dir(), info, max_samples=args.max_samples)
ee.collect(torch.utils.data.DataLoader(traffic, batch_size=256))  # labels are kept for reporting only
report = ee.fit(tolerance=args.tolerance)
print(f"exits {list(ee.thresholds)}; certified at {report.confidence_level:.0%} confidence")
print(f"val: FLOPs {report.chosen_val.flops_fraction:.3f}, agreement {report.chosen_val.agreement:.4f}")
if report.chosen_test:
    print(f"held-back test: FLOPs {report.chosen_test.flops_fraction:.3f}, agreement {report.chosen_test.agreement:.4f}")

x = torch.stack([traffic[i][0] for i in range(8)])
out = ee(x, callback=lambda r: print(f"  sample {r.index}: class {r.prediction} at exit {r.exit}"))
print("exits taken:", out.exit.tolist())

with tempfile.TemporaryDirectory() as folder:
    again = selfxit.load(ee.save(f"{folder}/bundle"), model)
    assert torch.equal(again(x).predictions, out.predictions)
    print("bundle saved and reloaded")

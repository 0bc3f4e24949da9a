"""The live guard on a real server: how fast it alarms after a shift, what it costs and what it gives back.

A real ``selfxit serve`` process serves the ResNet-56 5% bundle (built with ``selfxit enable`` on 4,000 of the
shared CIFAR-10 images unless ``--bundle`` is given). The benchmark streams all 10,000 shared images to it as
PNG uploads, in seeded orders (a new order each pass when the stream needs more items than there are), clean
up to ``--shift-at`` and shifted (:func:`selfxit.ops.shift.apply_shift`) from there on. Each run
``SHIFT:FRACTION`` of ``--runs`` serves one stream with ``--guard --shadow-fraction FRACTION`` until
``--after-alarm`` items after the first alarm (or ``--max-items``); then the same stream, as long as the
longest guarded run of that shift, is served without ``--guard``. Measured:

* items and guard shadow samples from the shift to the first alarm (a tighten), read from ``/v1/monitor``
  after every request (an upper bound: shadow runs finish after the answers went out), and any alarm before
  the shift (a false alarm);
* the fixed-size test the delay is held against: the smallest n at which a one-sided binomial test of
  "disagreement <= T" at the same alpha has power 0.8 at the disagreement the unguarded server showed on the
  shifted items;
* live agreement with the backbone (run in this process on the same tensors) per window of ``--window``
  items, guard on and off, and the lowest window that starts after the alarm;
* FLOPs (from the exit each item took): on the clean items, guard on minus off (plus the guard's heads on
  shadow items); after the alarm, the FLOPs given back (guard on minus off on the same items).

The delay of one live run is one draw: ``--delay-runs`` offline replays feed the guard the server's shadow pass
of the shifted images (after ``shift_at x fraction`` clean samples) in seeded orders, for its distribution.
False alarms on clean traffic are counted offline over ``--clean-orders`` seeded orders of all the clean
images, each replayed ``--clean-passes`` times into one fresh :class:`~selfxit.serve.live_guard.LiveGuard`,
every item a shadow sample (the no-shrink pass the server runs, here in this process: shadow fraction 1, the
most evidence per item, is the worst case).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/live_guard.py --runs blur:0.5 blur:0.1 blur:0.02 brightness:0.1
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NNI_FRAMEWORK", "none")

import selfxit  # noqa: E402
from selfxit.cli.common import quiet_libraries  # noqa: E402
from selfxit.evaluate.evaluation import cost_per_exit  # noqa: E402
from selfxit.ops.shift import apply_shift  # noqa: E402
from selfxit.serve.guarding import BundleGuard  # noqa: E402
from selfxit.serve.live_guard import GuardConfig, LiveGuard  # noqa: E402
from selfxit.settings import shared_dir  # noqa: E402
from selfxit.zoo import load_backbone  # noqa: E402
from selfxit.zoo.data import IMAGE_EXTENSIONS, image_transform  # noqa: E402


def fixed_test_size(tolerance: float, drop: float, alpha: float, power: float = 0.8) -> int | None:
    """Smallest n at which the one-sided binomial test of ``p <= tolerance`` at level ``alpha`` rejects with
    probability ``power`` when the disagreement is ``drop`` (None when ``drop <= tolerance``)."""
    from scipy.stats import binom
    if drop <= tolerance:
        return None
    for n in range(10, 200_000):
        critical = int(binom.isf(alpha, n, tolerance)) + 1  # reject when the count reaches it: P0 <= alpha
        if binom.sf(critical - 1, n, drop) >= power:
            return n
    return None


class Pool:
    """Every shared image, clean and under each shift: PNG bytes to send, tensors and backbone classes."""

    def __init__(self, files, transform, model, shifts: list[str], strength: float | None):
        from PIL import Image
        self.png: dict[str, list[bytes]] = {}
        self.reference: dict[str, np.ndarray] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        rgbs = []
        for path in files:
            with Image.open(path) as img:
                rgbs.append(img.convert("RGB"))
        for kind in ["clean", *shifts]:
            images = rgbs if kind == "clean" else [apply_shift(im, kind, 0, strength) for im in rgbs]
            pngs = []
            for im in images:
                buf = io.BytesIO()
                im.save(buf, format="PNG")  # lossless: the server decodes the very pixels the backbone saw here
                pngs.append(buf.getvalue())
            x = torch.stack([transform(im) for im in images])
            with torch.inference_mode():
                self.reference[kind] = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)]).numpy()
            self.png[kind], self.tensors[kind] = pngs, x

    def stream(self, n: int, shift_at: int, shift: str, seed: int) -> tuple[list[str], np.ndarray]:
        """(kind per item, pool index per item): seeded orders, a new one each pass."""
        rng = np.random.default_rng(seed)
        size = len(self.reference["clean"])
        order = np.concatenate([rng.permutation(size) for _ in range(n // size + 1)])[:n]
        return ["clean" if k < shift_at else shift for k in range(n)], order


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(bundle: Path, model: str, pool: Pool, kinds, order, batch: int, extra: list[str], shift_at: int,
           after_alarm: int | None, log_dir: Path) -> dict:
    """Stream the items to a fresh server, ``batch`` per request (a request boundary at the shift); with the
    guard on, stop ``after_alarm`` items after the first tighten after the shift."""
    import httpx
    port = _free_port()
    out = open(log_dir / f"server-{port}.log", "w+")
    cmd = [sys.executable, "-m", "selfxit", "serve", "--bundle", str(bundle), "--model", model, "--port", str(port),
           "--threads", "1", "--max-wait-ms", "1", "--reload-poll-s", "0", "--log-level", "warning",
           "--max-queue-wait-ms", "600000", *extra]  # one client in turn: the queue never holds another request
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    guarded = "--guard" in extra
    n = len(order)
    classes, exits = np.full(n, -1), ["?"] * n
    failed, trace, stop = 0, [], n
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    out.seek(0)
                    raise RuntimeError(f"server exited {proc.returncode}: {out.read()[-2000:]}")
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not come up")
                time.sleep(0.2)
            t0, start = time.perf_counter(), 0
            while start < stop:
                end = min(start + batch, stop, shift_at if start < shift_at else stop)
                files = [("files", (f"{k}.png", pool.png[kinds[k]][order[k]], "image/png")) for k in range(start, end)]
                for _ in range(30):  # admission control answers 503 + Retry-After on a loaded machine: wait it out
                    r = client.post("/v1/predict", files=files)
                    if r.status_code != 503:
                        break
                    time.sleep(float(r.headers.get("Retry-After", "1")))
                if r.status_code != 200:
                    failed += 1
                else:
                    for item in r.json()["items"]:
                        classes[start + item["index"]] = item["class"]
                        exits[start + item["index"]] = item["exit"]
                start = end
                if guarded:
                    g = client.get("/v1/monitor").json()["guard"]
                    trace.append((end, g["shadow_samples"], g["tightened"], g["relaxed"], g["scale"]))
                    if after_alarm is not None and stop == n and end > shift_at and g["tightened"] > _before(trace, shift_at):
                        stop = min(n, end + after_alarm)
            seconds = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
        out.close()
    return {"classes": classes[:stop], "exits": exits[:stop], "failed": failed, "trace": trace, "seconds": seconds,
            "items": stop}


def _before(trace, shift_at: int) -> int:
    return max((t for items, _, t, *_ in trace if items <= shift_at), default=0)


def _alarm(trace, shift_at: int) -> dict:
    """Items and shadow samples from the shift to the first tighten, and tightens before the shift."""
    at_shift = next((s for items, s, *_ in trace if items >= shift_at), None)
    before = _before(trace, shift_at)
    first = next(((items, s) for items, s, t, *_ in trace if t > before and items > shift_at), None)
    final = trace[-1] if trace else (0, 0, 0, 0, None)
    return {"false_alarms": before, "delay_items": None if first is None else first[0] - shift_at,
            "delay_shadow": None if first is None or at_shift is None else first[1] - at_shift,
            "alarm_item": None if first is None else first[0], "final_scale": final[4], "tightens": final[2],
            "relaxes": final[3], "shadow_at_shift": at_shift}


def _windows(agree: np.ndarray, window: int) -> list[float]:
    return [float(np.mean(agree[i:i + window])) for i in range(0, len(agree) - window + 1, window)]


def shadow_outputs(ee, x: torch.Tensor) -> tuple[list, list, list]:
    """(backbone class, every family exit's top-1, scores) per image: the server's no-shrink shadow pass."""
    bg = BundleGuard(ee, GuardConfig(alpha=0.05, base_shadow=1.0, max_shadow=1.0))
    with torch.inference_mode():
        outs = [bg.shadow(x[i:i + 256]) for i in range(0, len(x), 256)]
    return (torch.cat([o.logits.argmax(1) for o in outs]).tolist(),
            torch.cat([o.exit_predictions for o in outs], 1).t().tolist(),
            torch.cat([o.exit_confidence for o in outs], 1).float().t().tolist())


def offline_delays(ee, clean, shifted, before: int, runs: int, alpha: float, seed: int, cap: int = 30_000) -> list:
    """Shadow samples from the shift to the first alarm over ``runs`` seeded replays: ``before`` clean samples,
    then shifted ones (the outputs of :func:`shadow_outputs`), each run a fresh guard (None: no alarm by ``cap``)."""
    rng = np.random.default_rng(seed)
    delays = []
    for _ in range(runs):
        guard = LiveGuard(ee.family, GuardConfig(alpha=alpha, base_shadow=1.0, max_shadow=1.0))
        for i in rng.integers(0, len(clean[0]), before):
            guard.observe(clean[0][i], clean[1][i], clean[2][i])
        delay = None
        for k, i in enumerate(np.concatenate([rng.permutation(len(shifted[0])) for _ in range(cap // len(shifted[0]) + 1)])[:cap]):
            move = guard.observe(shifted[0][i], shifted[1][i], shifted[2][i])
            if move is not None and move.kind == "tighten":
                delay = k + 1
                break
        delays.append(delay)
    return delays


def clean_false_alarms(ee, outputs, orders: int, passes: int, alpha: float, seed: int) -> tuple[int, int, float]:
    """(alarms, samples fed, clean disagreement at the certified scale) over ``orders`` seeded orders of the
    clean images, each replayed ``passes`` times into one fresh guard, every item a shadow sample."""
    backbone, preds, scores = outputs
    probe = LiveGuard(ee.family, GuardConfig(alpha=alpha, base_shadow=1.0, max_shadow=1.0))
    drop = float(np.mean([probe.disagrees(probe.scale, b, p, s) for b, p, s in zip(backbone, preds, scores)]))
    rng = np.random.default_rng(seed)
    alarms = fed = 0
    for _ in range(orders):
        guard = LiveGuard(ee.family, GuardConfig(alpha=alpha, base_shadow=1.0, max_shadow=1.0))
        for i in np.concatenate([rng.permutation(len(backbone)) for _ in range(passes)]):
            fed += 1
            move = guard.observe(backbone[i], preds[i], scores[i])
            if move is not None and move.kind == "tighten":
                alarms += 1
                break
    return alarms, fed, drop


def _fmt(v, spec=".4f"):
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def plot_windows(rows: list[dict], path: Path, window: int, shift_at: int, tolerance: float) -> None:
    """Live agreement per window, guard on against off, one panel per shift, with the shift, each alarm and the
    target line (1 - T - 0.01) marked: where a reader would rather look than read the window lists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = list(dict.fromkeys(r["shift"] for r in rows))
    fig, axes = plt.subplots(len(shifts), 1, figsize=(9, 3.2 * len(shifts)), squeeze=False)
    for ax, shift in zip(axes[:, 0], shifts):
        for r in (r for r in rows if r["shift"] == shift):
            starts = np.arange(len(r["windows"])) * window
            off = r["run"] == "off"  # drawn wide and pale: until the alarm both serve the same answers
            ax.step(starts, r["windows"], where="post", label=f"guard {r['run']}", linewidth=3 if off else 1.2,
                    color="silver" if off else None)
            if r.get("alarm_item") is not None:
                ax.axvline(r["alarm_item"], linestyle=":", linewidth=1, color=ax.lines[-1].get_color())
        ax.axvline(shift_at, color="black", linewidth=1, label="shift")
        ax.axhline(1 - tolerance - 0.01, color="red", linestyle="--", linewidth=1, label="target 1 - T - 0.01")
        ax.set(title=f"{shift}: agreement with the backbone per {window} items (dotted: alarms)", xlabel="item",
               ylabel="agreement")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="a certified bundle (default: build the ResNet-56 5%% one)")
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--data", type=Path, default=shared_dir() / "data" / "cifar10-test")
    p.add_argument("--runs", nargs="+", default=["blur:0.5", "blur:0.1", "blur:0.02", "brightness:0.1"],
                   help="SHIFT:SHADOW_FRACTION, one guarded stream each")
    p.add_argument("--shift-at", type=int, default=3000, help="first shifted item")
    p.add_argument("--max-items", type=int, default=80_000, help="longest stream")
    p.add_argument("--after-alarm", type=int, default=5000, help="items served after the first alarm, then stop")
    p.add_argument("--strength", type=float, help="shift strength (default: apply_shift's)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--max-shadow", type=float, help="--guard-max-shadow (default: the server's)")
    p.add_argument("--window", type=int, default=500)
    p.add_argument("--batch", type=int, default=64, help="items per request")
    p.add_argument("--clean-orders", type=int, default=10)
    p.add_argument("--clean-passes", type=int, default=5, help="replays of all clean images per order")
    p.add_argument("--delay-runs", type=int, default=50, help="offline replays of the shift, per run, for the "
                                                                   "distribution of the delay (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--json-out", type=Path, help="also write the measured figures here")
    p.add_argument("--plot", type=Path, help="draw agreement per window, guard on and off, into this PNG")
    p.add_argument("--plot-from", type=Path, nargs="+", help="only draw --plot from these --json-out files "
                                                             "(no server is run)")
    args = p.parse_args(argv)
    if args.plot_from:
        if not args.plot:
            p.error("--plot-from needs --plot PNG")
        rows, tolerance = [], 0.05
        for f in args.plot_from:
            d = json.loads(f.read_text())
            rows += d["rows"]
            settings = d.get("settings", {})
            tolerance = settings.get("tolerance", tolerance)
            args.window, args.shift_at = settings.get("window", args.window), settings.get("shift_at", args.shift_at)
        plot_windows(rows, args.plot, args.window, args.shift_at, tolerance)
        print(f"wrote {args.plot}")
        return
    quiet_libraries()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    work = args.work or Path(tempfile.mkdtemp(prefix="live_guard-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = [(r.split(":")[0], float(r.split(":")[1])) for r in args.runs]
    bundle = args.bundle
    if bundle is None:
        bundle = work / "bundle"
        if not (bundle / "manifest.json").exists():
            cmd = [sys.executable, "-m", "selfxit", "enable", "--model", args.model, "--data", str(args.data),
                   "--tolerance", "0.05", "--max-samples", "4000", "--out", str(bundle)]
            print("building the bundle:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    model, info = load_backbone(args.model)
    ee = selfxit.load(bundle, model)
    if ee.family is None or ee.family.scale is None:
        raise SystemExit(f"{bundle}: no certified family/scale, nothing to guard")
    tol = ee.family.tolerance
    cost = dict(zip([*ee.thresholds, "final"], cost_per_exit(ee) / ee.backbone_flops))
    guard_heads = sum(ee.head_flops[layer] for layer in ee.family.shape) / ee.backbone_flops
    files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    t0 = time.perf_counter()
    shifts = sorted({s for s, _ in runs})
    pool = Pool(files, image_transform(info), model, shifts, args.strength)
    print(f"pool: {len(files)} images, clean + {shifts}; bundle {bundle}: certified scale {ee.family.scale} on "
          f"{list(ee.family.shape)} ({time.perf_counter() - t0:.0f} s)", flush=True)

    results, rows = {}, []
    for shift in shifts:
        kinds, order = pool.stream(args.max_items, args.shift_at, shift, args.seed)
        ref = np.array([pool.reference[k][i] for k, i in zip(kinds, order)])
        served = {}
        for s, f in runs:
            if s != shift:
                continue
            extra = ["--guard", "--shadow-fraction", str(f), "--guard-alpha", str(args.alpha)]
            extra += ["--guard-max-shadow", str(args.max_shadow)] if args.max_shadow is not None else []
            served[f] = _serve(bundle, args.model, pool, kinds, order, args.batch, extra, args.shift_at,
                               args.after_alarm, work)
            print(f"{shift} @ {f:g}: {served[f]['items']} items in {served[f]['seconds']:.0f} s; "
                  f"{_alarm(served[f]['trace'], args.shift_at)}", flush=True)
        longest = max(r["items"] for r in served.values())
        off = _serve(bundle, args.model, pool, kinds, order[:longest], args.batch, ["--shadow-fraction", "0"],
                     args.shift_at, None, work)
        print(f"{shift} guard off: {longest} items in {off['seconds']:.0f} s", flush=True)
        off_agree = off["classes"] == ref[:longest]
        off_cost = np.array([cost.get(e, np.nan) for e in off["exits"]])
        drop = float(1 - off_agree[args.shift_at:].mean())
        n_fixed = fixed_test_size(tol, drop, args.alpha)
        rows.append({"shift": shift, "run": "off", "items": longest, "failed": off["failed"],
                     "clean_agree": float(off_agree[:args.shift_at].mean()), "shift_agree": 1 - drop,
                     "flops_clean": float(np.nanmean(off_cost[:args.shift_at])), "fixed_n": n_fixed,
                     "windows": _windows(off_agree, args.window)})
        for f, run in served.items():
            m = run["items"]
            agree = run["classes"] == ref[:m]
            run_cost = np.array([cost.get(e, np.nan) for e in run["exits"]])
            alarm = _alarm(run["trace"], args.shift_at)
            row = {"shift": shift, "run": f"on@{f:g}", "fraction": f, "items": m, "failed": run["failed"],
                   "clean_agree": float(agree[:args.shift_at].mean()), "shift_agree": float(agree[args.shift_at:].mean()),
                   "flops_clean": float(np.nanmean(run_cost[:args.shift_at])),
                   "flops_clean_vs_off": float(np.nanmean(run_cost[:args.shift_at]) - np.nanmean(off_cost[:args.shift_at]))
                   + f * guard_heads, "fixed_n": n_fixed, "windows": _windows(agree, args.window), **alarm}
            at = alarm["alarm_item"]
            if at is not None:
                starts = range(0, m - args.window + 1, args.window)
                late = [row["windows"][j] for j, s0 in enumerate(starts) if s0 >= at]
                row["min_window_after_alarm"] = min(late) if late else None
                row["windows_after_alarm"] = len(late)
                row["after_agree"] = float(agree[at:].mean())
                row["after_agree_off"] = float(off_agree[at:m].mean())
                row["given_back"] = float(np.nanmean(run_cost[at:]) - np.nanmean(off_cost[at:m]))
            rows.append(row)
        results[shift] = {"drop_off": drop, "fixed_n": n_fixed}

    t1 = time.perf_counter()
    outputs = {kind: shadow_outputs(ee, x) for kind, x in pool.tensors.items()}
    for shift in shifts:
        for s, f in runs:
            if s == shift and args.delay_runs:
                delays = offline_delays(ee, outputs["clean"], outputs[shift], int(round(args.shift_at * f)),
                                        args.delay_runs, args.alpha, args.seed + 3)
                found = np.array([d for d in delays if d is not None])
                n2 = 2 * results[shift]["fixed_n"] if results[shift]["fixed_n"] else None
                results[shift][f"offline@{f:g}"] = {
                    "runs": len(delays), "no_alarm": sum(d is None for d in delays),
                    "mean": float(found.mean()) if len(found) else None,
                    "median": float(np.median(found)) if len(found) else None,
                    "p90": float(np.percentile(found, 90)) if len(found) else None,
                    "within_2n": float(np.mean([d is not None and n2 is not None and d <= n2 for d in delays]))}
    alarms, fed, clean_drop = clean_false_alarms(ee, outputs["clean"], args.clean_orders, args.clean_passes,
                                                 args.alpha, args.seed + 2)
    print(f"offline replays in {time.perf_counter() - t1:.0f} s", flush=True)

    print(f"\nlive guard, {args.model}, tolerance {tol:g}, alpha {args.alpha:g}, certified scale {ee.family.scale}, "
          f"shift at item {args.shift_at}, {args.batch} PNG images per request, windows of {args.window} items\n")
    print("| shift | run | items | failed | alarm: items / shadow samples after shift | fixed test n (2n) | "
          "false alarms before shift | tightens / relaxes / final scale | agreement clean / shifted | "
          "lowest window after alarm | after alarm: agreement on vs off | FLOPs given back after alarm | "
          "clean FLOPs on - off |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        on = r["run"] != "off"
        n2 = f"{r['fixed_n']} ({2 * r['fixed_n']})" if r["fixed_n"] else "-"
        print(f"| {r['shift']} | {r['run']} | {r['items']} | {r['failed']} | "
              f"{_fmt(r.get('delay_items'), 'd')} / {_fmt(r.get('delay_shadow'), 'd')} | {n2} | "
              f"{r.get('false_alarms', '-')} | "
              f"{(str(r['tightens']) + ' / ' + str(r['relaxes']) + ' / ' + _fmt(r['final_scale'], 'g')) if on else '-'} | "
              f"{r['clean_agree']:.4f} / {r['shift_agree']:.4f} | {_fmt(r.get('min_window_after_alarm'), '.3f')} | "
              f"{(_fmt(r.get('after_agree')) + ' vs ' + _fmt(r.get('after_agree_off'))) if on else '-'} | "
              f"{_fmt(r.get('given_back'), '+.4f') if on else '-'} | "
              f"{_fmt(r.get('flops_clean_vs_off'), '+.4f') if on else _fmt(r['flops_clean'])} |")
    print("\nagreement per window (first item of the window):")
    for r in rows:
        print(f"{r['shift']} {r['run']}: " + " ".join(f"{i * args.window}:{a:.3f}" for i, a in enumerate(r["windows"])))
    for shift, res in results.items():
        for key, d in res.items():
            if key.startswith("offline@"):
                print(f"\n{shift}, {key}: shadow samples from the shift to the alarm over {d['runs']} offline replays of "
                      f"the shadow pass ({key[8:]} x {args.shift_at} clean samples first): mean {_fmt(d['mean'], '.0f')}, "
                      f"median {_fmt(d['median'], '.0f')}, p90 {_fmt(d['p90'], '.0f')}, no alarm {d['no_alarm']}, "
                      f"within 2n = {2 * res['fixed_n'] if res['fixed_n'] else '-'}: {d['within_2n']:.2f}")
    print(f"\nclean replays (offline, every item a shadow sample): {alarms} false alarms in {args.clean_orders} "
          f"orders of {args.clean_passes} x {len(pool.tensors['clean'])} items ({fed} samples fed); clean "
          f"disagreement at the certified scale {clean_drop:.4f}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "shifts": results, "clean_alarms": alarms,
                                             "clean_fed": fed, "clean_drop": clean_drop,
                                             "settings": {"tolerance": tol, "window": args.window,
                                                          "shift_at": args.shift_at, "scale": ee.family.scale}},
                                            indent=1))
    if args.plot:
        plot_windows(rows, args.plot, args.window, args.shift_at, tol)


if __name__ == "__main__":
    main()

"""The nightly job's heavy steps on Ray: recording with an actor pool, heads as parallel Ray tasks, and collect.

``selfxit retrain --ray`` (``RetrainConfig.ray_workers``) and ``selfxit collect --ray`` call these; everything
else (reading the window, the hold-out, validation, the publish rule, the bundle store) is
:mod:`selfxit.ops.retrain` itself, so both paths publish by the same rule.

- :func:`record`: Ray Data hands chunks of the traffic (128 rows, as the single-process recorder's batches) to a
  pool of backbone actors (``map_batches`` with ``concurrency``); each chunk is recorded into the one medial
  dataset by its own writer (:class:`selfxit.fit.medial.MedialWriter`, ``join=True``, named by its first row),
  and the driver finishes it once every chunk is written. Chunk names fix the row order, and each chunk's
  augmented copies start from the state the single-process recorder's generator has at that batch
  (:func:`augment_states`), so the dataset is the single-process one, row for row, whichever actor recorded what.
- :func:`train_heads`: one Ray task per candidate layer, each running the single-process head training
  (:func:`selfxit.fit.procedure.train_heads`) on that layer alone; the fit then reuses those heads.
- :func:`collect_folder`: ``selfxit collect --ray``: Ray Data reads an image folder's files, backbone actors
  compute the softmax and append the records to the traffic log, each actor to its own shard.

Ray must already be initialised (:func:`selfxit.ops.ray_cluster.connect`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from selfxit.extras import require_extra

CHUNK = 128  # rows per recorded chunk: the batch size of EarlyExitModel.collect


class _ChunkRecorder:
    """A Ray Data actor: records chunks [start, start + CHUNK) of the shared traffic into the medial dataset."""

    def __init__(self, model_ref, inputs_ref, plan: dict, threads: int = 1):
        import ray
        torch.set_num_threads(threads)
        self.backbone = ray.get(model_ref[0]).eval()
        self.inputs = ray.get(inputs_ref[0])
        self.plan = plan

    def __call__(self, batch: dict) -> dict:
        from selfxit.core.heads import reducer
        from selfxit.fit.augment import AugmentConfig, augmented_copies
        from selfxit.fit.medial import MedialWriter
        from selfxit.fit.record import reducing_capture
        p = self.plan
        augmentation = AugmentConfig(**p["augment"])
        layers, shapes = p["layers"], [tuple(s) for s in p["shapes"]]
        reducers = [reducer(s, r) for s, r in zip(shapes, p["reductions"])]
        split = np.asarray(p["split"])
        done = []
        for start, state in zip(np.asarray(batch["start"]).tolist(), batch["state"]):
            rows = np.arange(start, min(start + CHUNK, len(self.inputs)))
            x = torch.from_numpy(self.inputs[rows])
            writer = MedialWriter(p["root"], layers, shapes, p["num_samples"], p["num_classes"], p["seed"],
                                  reductions=p["reductions"], dtype=p["dtype"], writer=f"c{start:010d}", join=True,
                                  num_traffic=p["num_traffic"], budget=p["budget"])
            generator = torch.Generator()
            generator.set_state(torch.from_numpy(np.asarray(state, dtype=np.uint8)))
            labels = np.full(len(rows), -1)
            with writer, torch.no_grad(), reducing_capture(self.backbone, layers, reducers, getattr(torch, p["dtype"])) as store:
                probs = self.backbone(x).softmax(dim=1)
                writer.append([store.pop(n) for n in layers], probs, split[rows], rows, labels)
                train = split[rows] == p["train_code"]
                for copy, _mixed in augmented_copies(x[torch.from_numpy(train)], generator, augmentation) \
                        if train.any() else ():
                    probs = self.backbone(copy).softmax(dim=1)
                    writer.append([store.pop(n) for n in layers], probs, split[rows][train], rows[train], labels[train])
                writer.close(finalize=False)
            done.append(writer.filled)
        return {"rows": np.asarray(done)}


def augment_states(split: np.ndarray, seed: int, augment_copies) -> list[tuple[int, np.ndarray]]:
    """(first row, augmentation generator state) of every chunk: the state the single-process recorder's one
    generator has when it reaches that batch, found by drawing what :func:`selfxit.fit.augment.augmented_copies`
    draws for each earlier batch (it depends only on the number of the batch's train rows), so the augmented
    copies are the same. ``augment_copies``: an int or :class:`~selfxit.fit.augment.AugmentConfig`."""
    from selfxit.fit.augment import AugmentConfig, augmented_copies
    from selfxit.fit.medial import SPLITS
    augmentation = AugmentConfig.coerce(augment_copies)
    generator = torch.Generator().manual_seed(seed)  # EarlyExitModel.collect's (one process: rank 0)
    out = []
    for start in range(0, len(split), CHUNK):
        out.append((start, generator.get_state().numpy().copy()))
        train = int((split[start:start + CHUNK] == SPLITS["train"]).sum())
        for _ in augmented_copies(torch.zeros(train, 3, 9, 9), generator, augmentation) if train else ():
            pass  # the draws of a batch of this many train rows
    return out


def record(candidate, inputs: torch.Tensor, out_dir: str | Path, seed: int = 0, augment_copies=2,
           workers: int = 2, cpus_per_worker: float = 1.0, threads: int = 1):
    """The medial dataset of ``inputs`` for ``candidate`` (an EarlyExitModel), recorded by ``workers`` backbone
    actors; the same candidates, storage plan, splits and row order as ``candidate.collect`` (default heads)."""
    require_extra("ray", "retrain --ray")
    import ray

    from selfxit.fit.medial import SPLITS, MedialWriter, finalize_medial
    from selfxit.fit.medial.budget import DEFAULT_ROW_BUDGET, plan_storage
    from selfxit.fit.record import assign_splits
    n = len(inputs)
    if n < 10:
        raise ValueError(f"need at least 10 traffic samples to split train/val/test; got {n}")
    layers, shapes = [c.name for c in candidate.candidates], [tuple(c.shape) for c in candidate.candidates]
    storage = plan_storage(layers, shapes, None, DEFAULT_ROW_BUDGET, "float16")
    from selfxit.fit.augment import AugmentConfig
    augmentation = AugmentConfig.coerce(augment_copies)
    split = assign_splits(n, seed)
    total = n + augmentation.rows_per_train_sample * int((split == SPLITS["train"]).sum())
    plan = {"root": str(out_dir), "layers": layers, "shapes": shapes, "reductions": storage.reductions,
            "num_samples": total, "num_classes": candidate.num_classes, "seed": seed, "dtype": "float16",
            "num_traffic": n, "budget": DEFAULT_ROW_BUDGET, "split": split.tolist(), "augment": augmentation.to_dict(),
            "train_code": SPLITS["train"]}
    creator = MedialWriter(out_dir, layers, shapes, total, candidate.num_classes, seed, reductions=storage.reductions,
                           writer="driver", num_traffic=n, budget=DEFAULT_ROW_BUDGET)  # creates the dataset
    creator.close(finalize=False)
    model_ref, inputs_ref = ray.put(candidate.backbone), ray.put(inputs.float().contiguous().numpy())
    chunks = ray.data.from_items([{"start": s, "state": state} for s, state in augment_states(split, seed,
                                                                                           augmentation)])
    out = chunks.map_batches(_ChunkRecorder, batch_size=1, concurrency=workers, num_cpus=cpus_per_worker,
                             fn_constructor_args=([model_ref], [inputs_ref], plan, threads))
    written = int(sum(int(b["rows"]) for b in out.iter_rows()))
    if written != total:
        raise RuntimeError(f"the recorders wrote {written} of {total} rows")
    return finalize_medial(out_dir)


def _train_one(location: str, candidate, spec: dict, distill, num_classes: int, warm, threads: int):
    """One candidate's head, trained exactly as the single-process fit trains it (a Ray task)."""
    from selfxit.fit.config import FitConfig
    from selfxit.fit.medial import SPLITS, MedialDataset
    from selfxit.fit.procedure import train_heads
    torch.set_num_threads(threads)
    medial = MedialDataset(location)
    rows = {name: medial.indices(name) for name in SPLITS}
    records = train_heads([candidate], medial, rows, {candidate.name: spec}, {}, FitConfig(distill=distill),
                           num_classes, {candidate.name: warm} if warm is not None else None, False)
    return records[candidate.name]


def train_heads(candidate, specs: dict[str, dict], distill, warm_start: dict | None = None,
                cpus_per_task: float = 1.0, threads: int = 1) -> list:
    """A trained :class:`~selfxit.core.exits.ExitRecord` per candidate layer, one Ray task each, in parallel."""
    require_extra("ray", "retrain --ray")
    import ray
    task = ray.remote(num_cpus=cpus_per_task)(_train_one)
    location = str(candidate.medial.location)
    refs = [task.remote(location, c, specs[c.name], distill, candidate.num_classes,
                        (warm_start or {}).get(c.name), threads) for c in candidate.candidates if c.name in specs]
    return ray.get(refs)


class _FolderLogger:
    """A Ray Data actor: decodes images, runs the backbone, appends the records to its own traffic-log shard."""

    def __init__(self, model_ref, info, log: str, encode: Callable, threads: int = 1):
        import ray

        from selfxit.ops.traffic import TrafficLog
        torch.set_num_threads(threads)
        self.backbone, self.info = ray.get(model_ref[0]).eval(), info
        self.log, self.encode = TrafficLog(log), encode

    def __call__(self, batch: dict) -> dict:
        import time

        from selfxit.ops.traffic import TrafficRecord, record_input
        from selfxit.zoo.images import CorruptImageError
        records, corrupt = [], 0
        for path, index in zip(batch["path"], batch["index"]):
            try:
                encoded, ctype, meta = self.encode(Path(path), int(index))
                record = TrafficRecord(timestamp=0.0, encoded=encoded, content_type=ctype, exit="final",
                                       source="collect", meta=meta)
                records.append((record, record_input(record, self.info)))
            except (OSError, CorruptImageError):
                corrupt += 1
        if records:
            with torch.inference_mode():
                probs = torch.softmax(self.backbone(torch.stack([x for _, x in records])).float(), dim=1).numpy()
            now = time.time()
            for (record, _), p in zip(records, probs):
                record.timestamp, record.backbone_probs, record.prediction = now, p, int(p.argmax())
                self.log.append(record)
            self.log.flush()  # durable before the batch counts as done
        return {"records": np.asarray([len(records)]), "corrupt": np.asarray([corrupt])}

    def __del__(self):
        try:
            self.log.close()
        except Exception:
            pass


def collect_folder(model, info, images: list[tuple[Path, int]], log: str, encode: Callable, workers: int = 2,
                   batch_size: int = 64, cpus_per_worker: float = 1.0, threads: int = 1) -> dict:
    """``selfxit collect --ray``: log every image of ``images`` ((path, index) in the order traffic arrives) with
    the backbone's softmax, on ``workers`` backbone actors; ``encode(path, index) -> (bytes, content type, meta)``
    gives each record's bytes (the file, or its shifted copy). Returns the counts."""
    require_extra("ray", "collect --ray")
    import ray
    model_ref = ray.put(model)
    items = ray.data.from_items([{"path": str(p), "index": i} for p, i in images])
    out = items.map_batches(_FolderLogger, batch_size=batch_size, concurrency=workers, num_cpus=cpus_per_worker,
                            fn_constructor_args=([model_ref], info, str(log), encode, threads))
    counts = {"records": 0, "corrupt": 0}
    for row in out.iter_rows():
        counts["records"] += int(row["records"])
        counts["corrupt"] += int(row["corrupt"])
    return counts

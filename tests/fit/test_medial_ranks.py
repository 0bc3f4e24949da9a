"""Several processes fill one medial dataset: independent writers, and torch.distributed ranks (gloo, CPU)."""
import datetime
import json
import multiprocessing
import os
import socket
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import selfxit
from selfxit.fit.medial import MedialDataset, MedialIncompleteWarning, MedialWriter

N = 48
GRID = {"kind": "pool_mlp", "pool": 4, "hidden": [256]}  # store the default head's input (6x6 maps -> 4x4 grids)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.down(torch.relu(self.conv(x))).mean((2, 3)))


class Traffic(torch.utils.data.Dataset):
    """Deterministic images; ``die_at`` kills the process that loads that sample (a rank that dies)."""

    def __init__(self, die_at: int | None = None):
        self.die_at = die_at

    def __len__(self):
        return N

    def __getitem__(self, i):
        if i == self.die_at:
            os._exit(3)
        return torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(i))


def _model():
    torch.manual_seed(0)
    return selfxit.wrap(Net().eval(), torch.zeros(1, 3, 12, 12), candidate_layers=["conv", "down"])


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str, report: str, die_at: int | None) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        ee = _model()
        data = torch.utils.data.DataLoader(Traffic(die_at if rank == 1 else None), batch_size=4)
        ds = ee.collect(data, out, augment_copies=1, progress=False, shard_mb=0.002, rank_timeout=15, heads=GRID)
        result = {"rows": ds.meta.num_samples, "complete": ds.complete}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result = {"error": f"{type(exc).__name__}: {exc}"}
    with open(f"{report}.{rank}", "w") as f:
        json.dump(result, f)
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - the peer may be gone
        pass


def _launch(tmp_path, die_at=None):
    ctx = multiprocessing.get_context("spawn")
    port, out, report = _port(), str(tmp_path / "medial"), str(tmp_path / "report")
    procs = [ctx.Process(target=_rank, args=(r, 2, port, out, report, die_at)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        if p.is_alive():
            p.kill()
    results = {}
    for r in range(2):
        if os.path.exists(f"{report}.{r}"):
            with open(f"{report}.{r}") as f:
                results[r] = json.load(f)
    return out, results, [p.exitcode for p in procs]


def _originals(ds: MedialDataset) -> dict[int, int]:
    """source -> row of its un-augmented recording (the first row of each source: copies follow it)."""
    out = {}
    for row, source in enumerate(ds.source.tolist()):
        out.setdefault(source, row)
    return out


def test_two_gloo_ranks_record_one_dataset(tmp_path):
    out, results, codes = _launch(tmp_path)
    assert codes == [0, 0], results
    assert results[0] == results[1] == {"rows": results[0]["rows"], "complete": True}, results
    ranked = MedialDataset(out)
    alone = _model().collect(torch.utils.data.DataLoader(Traffic(), batch_size=4), tmp_path / "alone",
                             augment_copies=1, progress=False, heads=GRID)
    assert ranked.meta.num_samples == alone.meta.num_samples == ranked.meta.expected_rows
    assert sorted(ranked.source.tolist()) == sorted(alone.source.tolist())  # every sample, its copies too
    a, b = _originals(ranked), _originals(alone)
    sources = sorted(a)
    ra, rb = [a[s] for s in sources], [b[s] for s in sources]
    np.testing.assert_array_equal(ranked.split[ra], alone.split[rb])
    for name in ("conv", "down"):
        np.testing.assert_allclose(ranked.activations(name, ra).astype(np.float32),
                                   alone.activations(name, rb).astype(np.float32), rtol=2e-3, atol=2e-3)
    assert torch.allclose(ranked.teacher(ra), alone.teacher(rb), atol=1e-5)
    assert {s.writer for s in ranked.shards} == {"r0000", "r0001"}


def test_a_rank_that_dies_is_named_and_the_complete_shards_read_back(tmp_path):
    out, results, codes = _launch(tmp_path, die_at=41)  # rank 1 records odd samples: it dies at its 21st
    assert codes[1] == 3 and 1 not in results
    error = results[0]["error"]
    assert "MedialStoreError" in error and "a rank died or hung" in error and "collect again" in error, error
    assert "1" in error.split("(a rank died")[1]  # gloo's monitored barrier names the missing rank
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.warns(MedialIncompleteWarning, match="rows lost") as warned:
        ds = MedialDataset(out)
    assert ds.lost_rows > 0 and f"{ds.lost_rows:,} rows lost" in str(warned[0].message)
    assert set(ds.source[ds.source % 2 == 0].tolist()) == set(range(0, N, 2))  # rank 0 finished its share
    assert ds.activations("down").shape == (ds.meta.num_samples, 16, 4, 4)


def _writer(root: str, name: str, rows: list[int]) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(len(name))
    writer = MedialWriter(root, ["a"], [(2, 4, 4)], N, 3, 0, writer=name, join=True, shard_bytes=256,
                          reductions=[{"reduce": "grid", "grid": [2, 2]}])
    for start in range(0, len(rows), 5):
        chunk = np.asarray(rows[start:start + 5])
        writer.append([torch.from_numpy(chunk[:, None, None, None] + np.zeros((1, 2, 4, 4), np.float32))],
                      torch.from_numpy(rng.dirichlet(np.ones(3), len(chunk)).astype(np.float32)),
                      np.zeros(len(chunk), np.uint8), chunk, np.full(len(chunk), -1))
    writer.close(finalize=False)


def test_independent_writer_processes_fill_one_dataset(tmp_path):
    root = str(tmp_path / "m")
    main = MedialWriter(root, ["a"], [(2, 4, 4)], N, 3, 0, writer="w0", shard_bytes=256,
                        reductions=[{"reduce": "grid", "grid": [2, 2]}])
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(root, f"w{k}", list(range(k, N, 3)))) for k in (1, 2)]
    for p in procs:
        p.start()
    _writer_rows = list(range(0, N, 3))
    for start in range(0, len(_writer_rows), 5):
        chunk = np.asarray(_writer_rows[start:start + 5])
        main.append([torch.from_numpy(chunk[:, None, None, None] + np.zeros((1, 2, 4, 4), np.float32))],
                    torch.full((len(chunk), 3), 1 / 3), np.zeros(len(chunk), np.uint8), chunk, np.full(len(chunk), -1))
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = main.close()  # the last writer finalizes: every row is in
    assert ds.complete and sorted(ds.source.tolist()) == list(range(N))
    assert len({s.writer for s in ds.shards}) == 3 and len(ds.shards) >= 6
    stored = ds.activations("a")
    assert stored.shape == (N, 2, 2, 2)  # full maps were reduced by the writer
    np.testing.assert_array_equal(stored[:, 0, 0, 0], ds.source.astype(np.float16))

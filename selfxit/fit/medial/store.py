"""The medial dataset: per candidate, the reduction of its activation that its head consumes, plus the
backbone's softmax, in shards on a local folder or any fsspec URL.

Layout of a medial dataset::

    recording.json              written first: candidates, full and stored shapes, reductions, classes, seed,
                                traffic samples and the rows expected (what is being recorded)
    shards/<writer>-<seq>.shard blocks of rows (see :mod:`selfxit.fit.medial.shards`): split (0 train, 1 tune,
                                2 val, 3 test; see SPLITS), source (traffic sample index), label (-1 when
                                unknown; reporting only), backbone softmax (float32), one array per candidate
    writers/<writer>.json       a writer's rows and shards, written when it finished
    manifest.json               written last, when every expected row is in: the meta and the shard list

Rows are numbered in shard order (writers by name, then sequence), which for one writer is the order
they were appended. Several processes (torchrun ranks, or any processes with distinct writer names)
fill one dataset at once, each with its own :class:`MedialWriter`; one of them finalizes it.

Memory stays bounded: a writer holds at most a few shards of rows (``shard_bytes``); a reader holds
only the per-row index (split, source, label, checksums: 17 + 4 x arrays bytes per row) and reads the
rows it is asked for. A dataset without a manifest (a recorder was killed, a rank died) reads back its
complete shards with a warning that says how many rows were lost.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec

import selfxit.fit.medial.shards as shard_format
from selfxit.fit.medial.budget import stored_bytes

SPLITS = {"train": 0, "tune": 1, "val": 2, "test": 3}
FORMAT_VERSION = 2
SHARD_BYTES = 32 * 1024 * 1024  # a writer cuts a shard when its buffered rows reach this
RECORDING, MANIFEST, SHARDS, WRITERS = "recording.json", "manifest.json", "shards", "writers"


class MedialStoreError(RuntimeError):
    """The medial dataset cannot be written or read where it was asked to be (the message says what to fix)."""


class MedialShardError(MedialStoreError):
    """Shards of the medial dataset are missing or damaged."""


class MedialIncompleteWarning(UserWarning):
    """The medial dataset holds fewer rows than were recorded into it (its recording did not finish)."""


@dataclass
class MedialMeta:
    """What a medial dataset holds. ``shapes`` are the candidates' full activation shapes; ``stored_shapes``
    what each stores per row under its ``reductions``."""

    candidates: list[str]
    shapes: list[tuple[int, ...]]
    num_samples: int  # rows (readable rows, for a dataset whose recording did not finish)
    num_classes: int
    seed: int
    format_version: int = FORMAT_VERSION
    reductions: list[dict] = field(default_factory=list)
    stored_shapes: list[tuple[int, ...]] = field(default_factory=list)
    dtype: str = "float16"
    num_traffic: int | None = None  # traffic samples behind the rows (each once, train ones augmented too)
    expected_rows: int | None = None  # rows the recording announced
    budget: int | None = None  # bytes per row it was checked against

    @property
    def bytes_per_row(self) -> dict[str, int]:
        """Stored activation bytes per row of each candidate."""
        return {n: stored_bytes(s, r, dtype=self.dtype) for n, s, r in zip(self.candidates, self.shapes,
                                                                            self.reductions)}

    def to_json(self) -> dict:
        out = asdict(self)
        out["shapes"] = [list(s) for s in self.shapes]
        out["stored_shapes"] = [list(s) for s in self.stored_shapes]
        return out

    @classmethod
    def from_json(cls, raw: dict) -> "MedialMeta":
        raw = dict(raw)
        raw["shapes"] = [tuple(s) for s in raw["shapes"]]
        raw["stored_shapes"] = [tuple(s) for s in raw.get("stored_shapes", [])]
        return cls(**raw)


def fs_of(root: str | Path):
    """(fsspec filesystem, path on it, how to name it in messages) of a local folder or URL."""
    text = str(root)
    try:
        fs, path = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as exc:  # unknown protocol, or its package is not installed
        raise MedialStoreError(f"cannot use {text!r} for the medial dataset: {exc}. Use a local folder or a URL "
                               "whose fsspec backend is installed (e.g. s3fs for s3://)") from None
    return fs, path.rstrip("/") or path, text


def write_json(fs, path: str, data: dict) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/{shard_format.TMP_PREFIX}{name}"
    with fs.open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1))
    fs.mv(tmp, path)


def read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "r") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise MedialStoreError(f"{path} is damaged ({exc}); collect the medial dataset again") from None


def create_medial(root: str | Path, meta: MedialMeta) -> None:
    """Start a medial dataset at ``root`` (replacing whatever is there): write ``recording.json``. Raises
    :class:`MedialStoreError` saying what to fix when the location cannot be written; nothing is left then."""
    fs, path, name = fs_of(root)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.makedirs(f"{path}/{SHARDS}", exist_ok=True)
        fs.makedirs(f"{path}/{WRITERS}", exist_ok=True)
        write_json(fs, f"{path}/{RECORDING}", meta.to_json())
    except (OSError, PermissionError, ValueError, NotImplementedError) as exc:
        try:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        except Exception:  # noqa: BLE001 - best effort; the error below is the one to act on
            pass
        raise MedialStoreError(f"cannot write the medial dataset to {name}: {type(exc).__name__}: {exc}. Check that "
                               "the location exists and is writable (permissions, credentials), or pass another "
                               "out_dir") from exc



def listing(fs, path: str) -> dict[str, int]:
    """{file name: size} of the complete shards under ``path``/shards."""
    try:
        entries = fs.ls(f"{path}/{SHARDS}", detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(shard_format.SUFFIX) and not name.startswith(shard_format.TMP_PREFIX):
            out[name] = int(e["size"])
    return out


def read_indices(fs, path: str, names: list[str], sizes: dict[str, int]):
    """(shard indices, {name: problem}) for the named shards."""
    paths = [f"{path}/{SHARDS}/{n}" for n in names]
    indices: list[shard_format.ShardIndex] = []
    bad: dict[str, str] = {}
    if not names:
        return indices, bad
    prefixes = fs.cat_ranges(paths, [0] * len(paths), [min(shard_format.PREFIX_BYTES, sizes[n]) for n in names],
                             on_error="return")  # concurrent on remote (async) filesystems
    for name, p, prefix in zip(names, paths, prefixes):
        if isinstance(prefix, BaseException):
            bad[name] = f"cannot be read ({type(prefix).__name__}: {prefix})"
            continue
        try:
            indices.append(shard_format.parse(p, prefix, sizes[name],
                                              lambda start, end, p=p: fs.cat_file(p, start, end)))
        except (shard_format.ShardError, ValueError, KeyError) as exc:
            bad[name] = str(exc).replace(f"shard {p} is ", "") if isinstance(exc, shard_format.ShardError) else \
                f"damaged ({type(exc).__name__}: {exc})"
    return indices, bad

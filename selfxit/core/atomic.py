"""The one atomic writer: a file or a folder appears complete under its name, or not at all.

Writers stage under a hidden sibling name that carries the host and process id
(``.<name>.tmp-<host>-<pid>-<random>``), fsync, then rename into place. :func:`stale_temporaries`
finds what a crashed writer left behind: staging names whose process no longer runs on this host.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def temporary_name(final: str | Path) -> Path:
    """A hidden sibling of ``final`` whose name says which host and process writes it."""
    final = Path(final)
    return final.with_name(f".{final.name}{TMP_MARK}{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (staged, fsync'ed, renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), mode)


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``path`` whole (the old one is removed).

    Every file written into it is fsync'ed before the rename. On any error (or a signal that raises)
    the staging folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(path)
    staging.mkdir(mode=0o755)
    old = temporary_name(path.with_name(path.name + ".old"))
    try:
        yield staging
        for f in staging.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists() or path.is_symlink():
            os.replace(path, old)
            try:
                os.replace(staging, path)
            except BaseException:
                os.replace(old, path)  # put the previous one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(folder: str | Path) -> list[Path]:
    """Staging files and folders in ``folder`` left by writers on this host that no longer run."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host, stale = _host(), []
    for entry in folder.iterdir():
        name = entry.name
        if not name.startswith(".") or TMP_MARK not in name:
            continue
        owner = name.rsplit(TMP_MARK, 1)[1].split("-")
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit():
            continue  # another host's writer, or not our naming: never touch it
        if not _pid_alive(int(owner[1])):
            stale.append(entry)
    return stale


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove :func:`stale_temporaries` of ``folder``; returns what was removed."""
    removed = []
    for entry in stale_temporaries(folder):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed

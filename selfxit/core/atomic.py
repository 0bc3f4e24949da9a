"""The one atomic writer: a file or a folder appears complete under its name, or not at all.

Writers stage under a hidden sibling name that carries the host and process id
(``.<name>.tmp-<host>-<pid>-<random>``), fsync, then rename into place. :func:`stale_temporaries`
finds what a crashed writer left behind: staging names whose process no longer runs on this host
(a name from another host, or one that does not parse, is never touched). :func:`work_dir` makes a
private working folder ``<parent>/selfxit-<host>-<pid>-<random>`` whose leftovers
:func:`remove_stale_work_dirs` removes in the same way.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import warnings
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"
OLD_TAG = "old"  # staged_dir moves the folder it replaces aside as .<name>.tmp-old-<host>-<pid>-<random>


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def owner_tag() -> str:
    """``<host>-<pid>`` of this process, as it appears in temporary and work folder names."""
    return f"{_host()}-{os.getpid()}"


def temporary_name(final: str | Path, tag: str = "") -> Path:
    """A hidden sibling of ``final`` whose name says which host and process writes it."""
    final = Path(final)
    tag = f"{tag}-" if tag else ""
    return final.with_name(f".{final.name}{TMP_MARK}{tag}{owner_tag()}-{secrets.token_hex(4)}")


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
    old = temporary_name(path, tag=OLD_TAG)  # if we die between the two renames, the next cleanup puts it back
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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie not yet reaped counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid we can ask about: assume it runs
    return True


_pid_alive = pid_alive  # the old private name


def _dead_owner(owner: str) -> bool:
    """Whether ``<host>-<pid>-<random>`` names a process of this host that no longer runs."""
    parts = owner.split("-")
    return len(parts) == 3 and parts[0] == _host() and parts[1].isdigit() and not pid_alive(int(parts[1]))


def stale_temporaries(folder: str | Path) -> list[Path]:
    """Staging files and folders in ``folder`` left by writers on this host that no longer run."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if not name.startswith(".") or TMP_MARK not in name:
            continue
        owner = name.rsplit(TMP_MARK, 1)[1].removeprefix(OLD_TAG + "-")
        if _dead_owner(owner):  # another host's writer, or not our naming: never touched
            stale.append(entry)
    return stale


def _remove(entry: Path) -> bool:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            entry.unlink()
    return not (entry.exists() or entry.is_symlink())


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove :func:`stale_temporaries` of ``folder``; returns what was removed.

    A folder that :func:`staged_dir` had moved aside (``.<name>.tmp-old-...``) is put back under
    ``<name>`` instead when nothing took that name (its writer died between its two renames). Files
    that cannot be removed (a read-only location) are left and not reported.
    """
    removed = []
    for entry in stale_temporaries(folder):
        rest = entry.name.rsplit(TMP_MARK, 1)[1]
        final = entry.with_name(entry.name[1:].rsplit(TMP_MARK, 1)[0])
        if rest.startswith(OLD_TAG + "-") and not (final.exists() or final.is_symlink()):
            try:
                os.replace(entry, final)
            except OSError:
                continue  # cannot put it back: leave it as it is rather than lose it
            fsync_dir(entry.parent)
            warnings.warn(f"{final}: restored the previous version that a writer killed mid-replace "
                          f"had moved aside to {entry.name}", stacklevel=2)
            continue
        if _remove(entry):
            removed.append(entry)
    return removed


WORK_PREFIX = "selfxit-"


def work_dir(parent: str | Path) -> Path:
    """A new, empty private folder ``<parent>/selfxit-<host>-<pid>-<random>`` for one process's working data.

    The caller removes it when done; :func:`remove_stale_work_dirs` removes those of dead processes.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f"{WORK_PREFIX}{owner_tag()}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    return path


def remove_stale_work_dirs(parent: str | Path) -> list[Path]:
    """Remove the :func:`work_dir` folders under ``parent`` whose process (on this host) no longer runs,
    and stale temporaries there; returns what was removed. Nothing else in ``parent`` is touched, so it
    may be a shared folder."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    stale = [e for e in sorted(parent.iterdir())
             if e.name.startswith(WORK_PREFIX) and _dead_owner(e.name[len(WORK_PREFIX):])]
    return [e for e in stale if _remove(e)] + remove_stale_temporaries(parent)

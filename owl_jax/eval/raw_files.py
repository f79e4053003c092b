"""Which raw files a dataset build read, so a later run can tell whether the build is stale.

    rec = Recorder()
    data = rec.read(path)                 # while building: every file read ...
    rec.exists(other)                     # ... and every path looked for and not found
    rec.save(raw_dir, build_dir)          # -> <build_dir>/raw_files.json
    changes(build_dir, raw_dir)           # later: [] when nothing changed, else the changed paths

`raw_files.json` maps each path (relative to the raw dir) to None (looked for, not there) or
{"size", "sha256", "stat": [mtime_ns, ctime_ns] or None}. A path has changed when it appeared,
disappeared, or its contents hash differently. Hashing every file on every run would read the
whole dataset again, so a file whose size, mtime and ctime all equal the recorded ones is taken as
unchanged without reading it: every write moves a file's ctime, and unlike mtime no tool
(`cp -p`, `rsync -a`, `tar`, `touch`) can set it back. Any other file is re-hashed, and one whose
contents are the same only gets its new stat recorded (a `touch` or a copy costs no rebuild).
Stats taken less than `RACY_NS` after the file last changed are not recorded (a coarse file-system
clock could give a second write the same times), so such files are always re-hashed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

FILENAME = "raw_files.json"
RACY_NS = 2_000_000_000


def _stat(st: os.stat_result) -> list[int] | None:
    """[mtime_ns, ctime_ns] when they can vouch for the contents later, else None."""
    if st.st_ctime_ns >= time.time_ns() - RACY_NS:
        return None
    return [st.st_mtime_ns, st.st_ctime_ns]


def _entry(st: os.stat_result, sha256: str) -> dict:
    return {"size": st.st_size, "sha256": sha256, "stat": _stat(st)}


def hash_file(path: str) -> tuple[os.stat_result, str]:
    """(stat taken before reading, sha256 of the contents)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        return st, hashlib.file_digest(f, "sha256").hexdigest()


class Recorder:
    """Collects every file a build reads (with its size and hash) and every path it looks for."""

    def __init__(self):
        self.files: dict[str, dict | None] = {}     # path as given -> entry, None when absent

    def read(self, path: str) -> bytes:
        """The file's bytes (OSError when it cannot be read: recorded as absent)."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())   # before reading: a later write moves ctime past it
                data = f.read()
        except OSError:
            self.files[path] = None
            raise
        self.files[path] = _entry(st, hashlib.sha256(data).hexdigest())
        return data

    def exists(self, path: str) -> bool:
        """Whether `path` exists; an absent one is recorded (a file found is recorded when read)."""
        if os.path.exists(path):
            return True
        self.files.setdefault(path, None)
        return False

    def save(self, raw_dir: str, build_dir: str) -> str:
        files = {os.path.relpath(p, raw_dir): e for p, e in sorted(self.files.items())}
        return _write(build_dir, files)


def _write(build_dir: str, files: dict) -> str:
    path = os.path.join(build_dir, FILENAME)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, ensure_ascii=False)
    os.replace(path + ".tmp", path)     # a reader never sees half a file
    return path


def _now(path: str, old: dict | None) -> tuple[bool, dict | None]:
    """(whether the file at `path` differs from its recorded entry `old`, its entry now)."""
    if old is None:
        return os.path.exists(path), None
    try:
        st = os.stat(path)
        if st.st_size != old["size"]:
            return True, old
        if old["stat"] is not None and old["stat"] == [st.st_mtime_ns, st.st_ctime_ns]:
            return False, old
        st, digest = hash_file(path)
    except OSError:     # gone, or no longer a readable file
        return True, old
    return digest != old["sha256"], _entry(st, digest)


def changes(build_dir: str, raw_dir: str) -> list[str] | None:
    """The recorded paths (relative to `raw_dir`) whose presence or contents differ from when the
    build in `build_dir` read them: [] when none do, None when the build has no record. Refreshes
    the recorded stats of files whose contents are unchanged."""
    try:
        with open(os.path.join(build_dir, FILENAME), encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    changed, refreshed = [], {}
    for rel, old in files.items():
        differs, entry = _now(os.path.join(raw_dir, rel), old)
        if differs:
            changed.append(rel)
        refreshed[rel] = entry
    if not changed and refreshed != files:
        _write(build_dir, refreshed)
    return changed

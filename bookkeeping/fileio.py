"""Atomic writes: a file or a folder is either the old one or the whole new one, never half-written."""

import json
import os
import shutil
import uuid
from contextlib import contextmanager


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write; when the block ends without an error, the
    file is flushed to disk and renamed to `path` in one step. On an error it is removed. The
    temporary name is this write's own, so writers of the same file (study seeds run side by side)
    never rename each other's half-written file: the last complete one wins."""
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(os.path.dirname(os.path.abspath(path)))  # the rename itself
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def fsync(path):
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp, folder):
    """Put the complete directory tmp in the place of `folder` (which may exist): its files are
    flushed to disk, then two renames, the old folder removed last."""
    for name in os.listdir(tmp):
        if os.path.isfile(os.path.join(tmp, name)):
            fsync(os.path.join(tmp, name))
    old = folder + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync(os.path.dirname(os.path.abspath(folder)))
    shutil.rmtree(old, ignore_errors=True)


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def read_json(path):
    """The JSON object of path, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def write_jsonl(path, rows):
    """Write rows (dicts) as JSONL, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

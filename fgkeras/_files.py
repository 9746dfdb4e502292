"""Durable files, shared by the index, the exports and the server: one way to fsync, write atomically
and make directories that a serving process running as another user can read."""

import os
import tempfile


def fsync_dir(path):
    """Flushes a directory's entries (a rename or a new file in it) to disk; a no-op where directories
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory: nothing more can be done there
        pass
    finally:
        os.close(fd)


def fsync_tree(directory):
    """fsyncs every file under `directory`, then every directory, deepest first."""
    for parent, _, files in os.walk(directory, topdown=False):
        for filename in files:
            with open(os.path.join(parent, filename), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(parent)


def make_temp_dir(parent, prefix):
    """A new, uniquely named directory in `parent` with the umask's default mode (`mkdtemp` makes
    0700, which a TF Serving process running as another user cannot read once it is renamed into place)."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path


def write_atomic(path, data):
    """Writes `data` (bytes) to `path` so that a reader sees the old file or the new one, never a part:
    a temporary file beside it, fsynced, renamed over `path`, the directory fsynced."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsync_dir(parent)


def preview(values, limit=5):
    """`[a, b, c, ...]`: the first `limit` values of a list for an error message."""
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"

"""Durable files, shared by the index, the exports and the server: one way to fsync, write atomically
and make directories that a serving process running as another user can read."""

import ctypes
import errno
import os
import shutil
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


def swap_in(staging, directory):
    """Puts the complete directory `staging` at `directory` with one atomic rename.

    An existing `directory` is exchanged with it (Linux `renameat2(RENAME_EXCHANGE)`) and then
    removed. Where there is no atomic exchange, the old directory is moved aside first: a crash
    between the two renames leaves the old one at `.<name>.old-*` and the new one at `staging`,
    neither at `directory`, so nothing half-written is ever read from there.
    """
    parent = os.path.dirname(directory)
    if not os.path.exists(directory):
        os.rename(staging, directory)
    elif exchange(staging, directory):
        shutil.rmtree(staging)  # now the previous directory
    else:
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(parent)


def exchange(a, b):
    """Atomically exchanges two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"renameat2 exchange of {a} and {b} failed: {os.strerror(code)}")


def preview(values, limit=5):
    """`[a, b, c, ...]`: the first `limit` values of a list for an error message."""
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"

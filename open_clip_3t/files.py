"""Writing files so that existence means completeness: every file the package writes goes through `write_atomic`
(a temporary name in the same folder, fsync, rename), so a killed job, a full disk or a read-only folder never leaves
a half-written file under the real name; `unwritable` tells, before any work, whether a folder can take files at all."""
import errno
import os
import socket
import time


def tmp_name(path):
    """A temporary name beside `path`, unique across the processes and nodes sharing the file system."""
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def abandoned(tmp, after_s=3600):
    """Whether the temporary file `tmp` (a `tmp_name`) was left by a writer that is gone: a process of this host that
    no longer runs, or, for another host's, one untouched for `after_s` seconds. Removing a live writer's temporary
    file would make its rename fail."""
    host, _, pid = tmp.rpartition(".tmp.")[2].rpartition(".")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # a live process of another user
            return False
        return False
    try:
        return time.time() - os.path.getmtime(tmp) > after_s
    except FileNotFoundError:
        return False


def write_atomic(path, data, exclusive=False):
    """Write `data` (bytes, str, or a function that writes to a binary file object) to `path` atomically; returns
    `path`. With `exclusive`, an existing `path` is left as it is (create-exclusive: the first of several writers
    wins) and False is returned. The temporary file is removed on any failure."""
    path = os.fspath(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # atomic, and fails if another writer was first
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
        _fsync_folder(os.path.dirname(path) or ".")
    except OSError as e:
        if e.filename is None:  # a write or fsync error (a full disk) names no file: name the one being written
            e.filename = path
        raise
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return path


def _fsync_folder(folder):
    """Make a rename in `folder` durable (a crash right after it keeps the new name); a no-op where the file system
    cannot open folders."""
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


def unwritable(folder, probe_bytes=4096):
    """Why files cannot be written into `folder` (created later if it does not exist yet), as one short line such as
    'Read-only file system' or 'No space left on device'; None if they can. Writes, fsyncs and removes a probe file of
    `probe_bytes` in the folder, or in its nearest existing parent when it does not exist (which is then left
    uncreated): a read-only or full file system is found before any work, and nothing is left behind."""
    folder = os.path.abspath(os.fspath(folder))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    probe = os.path.join(existing, f".open_clip_3t-probe.{socket.gethostname()}.{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror or errno.errorcode.get(e.errno, str(e))
    finally:
        if os.path.lexists(probe):
            os.remove(probe)
    return None

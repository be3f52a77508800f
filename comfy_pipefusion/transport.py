"""Transport between the ComfyUI process and the worker group (both sides use this module).

- ``run_root()``: the private run directory (mode 0700, owned by this user) where every group keeps its
  control socket, authkey, pid file and log.
- ``ShmTensor``: a tensor in a ``multiprocessing.shared_memory`` segment, mapped without copies. Names are
  ``pf_<owner pid>_<pid namespace>_<128 random bits>``: unguessable, and sweepable once the owner is dead.
  A pid means something only in its pid namespace (containers sharing /dev/shm each have their own), so
  a segment is ours to judge only when its namespace is ours and its file is owned by our uid. Only the
  creator unlinks; attaching processes just close.
- ``listen``/``connect``/``send``/``recv``: JSON messages over an AF_UNIX socket. The authkey challenge
  (HMAC) runs before any message is read, and messages are never unpickled.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
import tempfile
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import Client, Listener
from pathlib import Path

import torch

log = logging.getLogger("comfy_pipefusion.transport")
SHM_PREFIX = "pf_"
# a segment, or a weights file for the ranks (nodes/weights.py: the same name + .safetensors), swept alike
_SHM_NAME = re.compile(r"pf_(\d{1,10})_([0-9a-f]{1,16})_[0-9a-f]{32}(?:\.safetensors)?")
SHM_DIR = Path("/dev/shm")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}


def _private(path: Path) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def run_root() -> Path:
    """This user's private run directory: ``comfy-pipefusion-<uid>`` in PIPEFUSION_RUN_DIR, XDG_RUNTIME_DIR
    or the temp directory. A chosen directory that another user owns or others can enter is refused. In the
    shared temp directory anyone can create that name first: then a fresh private one is made beside it
    (``mkdtemp``: an unpredictable name, created atomically with mode 0700, so it cannot be squatted)."""
    chosen = os.environ.get("PIPEFUSION_RUN_DIR") or os.environ.get("XDG_RUNTIME_DIR")
    base = Path(chosen or tempfile.gettempdir())
    root = base / f"comfy-pipefusion-{os.getuid()}"
    try:
        root.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError:
        if chosen:
            raise
    if _private(root):
        return root
    if chosen:
        st = root.lstat()
        raise PermissionError(f"{root} must be a directory owned by uid {os.getuid()} with mode 0700 "
                              f"(found mode {oct(st.st_mode & 0o777)}, uid {st.st_uid}); remove it and retry")
    log.warning("%s is not a private directory of uid %d (another user may have created it); using a fresh "
                "private directory beside it", root, os.getuid())
    return Path(tempfile.mkdtemp(prefix=f"{root.name}-", dir=base))


def fallback_roots(base: Path) -> list[Path]:
    """This user's private run directories that ``run_root`` made in ``base`` when the usual one was taken."""
    return sorted(p for p in base.glob(f"comfy-pipefusion-{os.getuid()}-*") if _private(p))


def private_dir(parent: Path, prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o700)
    return path


def write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


class ShmFull(RuntimeError):
    """/dev/shm has no room for a segment; the message says how much is needed and how to make room."""

    def __init__(self, nbytes: int, exc: OSError) -> None:
        try:
            st = os.statvfs(SHM_DIR)
            free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
            where = f"{SHM_DIR} has {_mib(free)} free of {_mib(total)}"
        except OSError:
            where = f"{SHM_DIR} is not usable"
        super().__init__(f"shared memory is full: a {_mib(nbytes)} segment does not fit ({where}; "
                         f"{exc.strerror}). Free space in {SHM_DIR} or enlarge it (docker: --shm-size)")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


class ShmTensor:
    """A tensor living in a shared memory segment."""

    def __init__(self, shm: shared_memory.SharedMemory, shape, dtype: str, owner: bool) -> None:
        self.shm, self.shape, self.dtype, self.owner = shm, tuple(shape), dtype, owner
        n = _numel(self.shape)
        self.tensor = torch.frombuffer(shm.buf, dtype=DTYPES[dtype], count=n).view(self.shape) if n else \
            torch.empty(self.shape, dtype=DTYPES[dtype])

    @classmethod
    def create(cls, shape, dtype: str = "float32") -> "ShmTensor":
        """A new segment, its pages reserved up front: on a full /dev/shm this raises ShmFull, where
        writing into a sparse mapping would kill the process with SIGBUS."""
        nbytes = max(1, torch.empty((), dtype=DTYPES[dtype]).element_size() * _numel(shape))
        name = f"{SHM_PREFIX}{os.getpid()}_{pid_namespace()}_{secrets.token_hex(16)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        try:
            os.posix_fallocate(shm._fd, 0, nbytes)
        except OSError as exc:
            shm.close()
            shm.unlink()
            raise ShmFull(nbytes, exc) from None
        return cls(shm, shape, dtype, owner=True)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "ShmTensor":
        dtype = next(k for k, v in DTYPES.items() if v == t.dtype)
        seg = cls.create(tuple(t.shape), dtype)
        seg.tensor.copy_(t)
        return seg

    @classmethod
    def attach(cls, desc: dict) -> "ShmTensor":
        if not _SHM_NAME.fullmatch(desc["name"]):
            raise ValueError(f"not a comfy-pipefusion segment name: {desc['name']!r}")
        shm = shared_memory.SharedMemory(name=desc["name"])
        # Python < 3.13 registers attached segments with the resource tracker, which would unlink them
        # when this process exits; the creator owns them.
        try:
            resource_tracker.unregister(shm._name, "shared_memory")
        except Exception:
            pass
        return cls(shm, desc["shape"], desc["dtype"], owner=False)

    def describe(self) -> dict:
        return {"name": self.shm.name, "shape": list(self.shape), "dtype": self.dtype}

    def close(self) -> None:
        """Release the mapping; the owner also unlinks the segment. Safe to call twice."""
        self.tensor = None
        if self.shm is None:
            return
        try:
            self.shm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
        self.shm = None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def pid_namespace() -> str:
    """This process's pid namespace (hex inode of /proc/self/ns/pid; '0' where it cannot be read)."""
    try:
        return format(os.stat("/proc/self/ns/pid").st_ino, "x")
    except OSError:
        return "0"


def shm_segments(owner_pid: int | None = None) -> list[str]:
    """Names of our segments in /dev/shm (our pid namespace, files of our uid), optionally of one owner pid."""
    if not SHM_DIR.is_dir():
        return []
    ns, uid, out = pid_namespace(), os.getuid(), []
    for p in SHM_DIR.iterdir():
        m = _SHM_NAME.fullmatch(p.name)
        if not m or m.group(2) != ns or (owner_pid is not None and int(m.group(1)) != owner_pid):
            continue
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == uid:
            out.append(p.name)
    return out


def segment_owner(name: str) -> int:
    """The owner pid in a segment's name."""
    return int(name.split("_")[1])


def unlink_segment(name: str) -> None:
    """Remove one of our segments; an error other than 'already gone' is raised."""
    if _SHM_NAME.fullmatch(name):
        try:
            os.unlink(SHM_DIR / name)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------------------- control

def listen(path: Path, authkey: bytes) -> Listener:
    if len(str(path).encode()) > 100:
        raise ValueError(f"control socket path {path} is longer than AF_UNIX allows (about 100 bytes); "
                         "set PIPEFUSION_RUN_DIR to a shorter directory")
    return Listener(address=str(path), family="AF_UNIX", authkey=authkey)


def connect(path: Path, authkey: bytes):
    return Client(address=str(path), family="AF_UNIX", authkey=authkey)


def send(conn, kind: str, **payload) -> None:
    conn.send_bytes(json.dumps({"type": kind, **payload}).encode())


def recv(conn) -> dict:
    msg = json.loads(conn.recv_bytes(maxlength=1 << 24).decode())
    if not isinstance(msg, dict) or "type" not in msg:
        raise ValueError("malformed control message")
    return msg

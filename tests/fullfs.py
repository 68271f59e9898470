"""A real filesystem that fills up, for the tests of full-disk failures.

``small_filesystem(tmp_path, size_bytes)`` gives a directory on a tmpfs of ``size_bytes`` when this
process may mount one (root in a container that allows it), so writes there fail with a real ENOSPC
from the kernel, whichever library writes (safetensors, torch.save, json). Where mounting is not
allowed, the directory is an ordinary one and ``preexec`` (for ``subprocess.run(preexec_fn=...)``) caps
the size of every file the child process writes with ``RLIMIT_FSIZE`` (a write past it fails with
EFBIG; SIGXFSZ is ignored so that it is an error, not a kill): a weaker stand-in, said in ``kind``.

    with small_filesystem(tmp_path, 2_000_000) as fs:
        fs.leave_free(300_000)          # tmpfs only: a ballast file leaves this many bytes free
        subprocess.run([...], preexec_fn=fs.preexec)
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SmallFS:
    path: Path
    kind: str  # "tmpfs" (a real full filesystem) or "rlimit" (a per-file size limit in the child)
    size: int

    @property
    def preexec(self):
        """``preexec_fn`` for the child process: nothing on a tmpfs, the file-size limit otherwise."""
        if self.kind == "tmpfs":
            return None
        size = self.size

        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

        return limit

    def free(self) -> int:
        return shutil.disk_usage(self.path).free

    def leave_free(self, nbytes: int) -> None:
        """Fill the filesystem with a ballast file until ``nbytes`` are left (tmpfs only)."""
        if self.kind != "tmpfs":
            return
        ballast = self.path / ".ballast"
        extra = self.free() - nbytes
        if extra > 0:
            with open(ballast, "ab") as f:
                f.write(b"\0" * extra)

    def release(self) -> None:
        """Remove the ballast: the disk has room again."""
        (self.path / ".ballast").unlink(missing_ok=True)


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def small_filesystem(tmp_path: Path, size_bytes: int):
    """A directory that fills up at ``size_bytes`` (see the module docstring); unmounted afterwards."""
    path = Path(tmp_path) / "smallfs"
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if _can_mount():
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        mounted = proc.returncode == 0
    try:
        yield SmallFS(path, "tmpfs" if mounted else "rlimit", size_bytes)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)

"""One POSIX shared-memory segment mapped into this process: create (owner) or open (client), and unmap.

The owner asks for transparent huge pages (MADV_HUGEPAGE: used when
/sys/kernel/mm/transparent_hugepage/shmem_enabled allows it), then faults every page in with
MADV_POPULATE_WRITE, which fails cleanly when /dev/shm is full (instead of a SIGBUS on first touch later);
kernels without it (< 5.14) reserve with posix_fallocate instead. Clients map with MAP_POPULATE up to
POPULATE_MAX; larger regions are populated lazily (populating costs ~95 ms per GiB here, and `post` runs in the
caller's thread: a 64 GiB pool would stall the first operation for seconds): the endpoint populates each 2 MiB
chunk ahead of the first request that reaches it (endpoint.py, "First touch"), which halves a first pass's cost
against letting the copies fault page by page. Sizes are rounded to 2 MiB from 2 MiB up so huge pages can back them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from dataclasses import dataclass, field

from rdmapool import _shmatomics as native
from rdmapool.transport.shm import cuda

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
HUGE = 2 * 1024 * 1024
POPULATE_MAX = 256 * 1024 * 1024


def mapped_size(length: int) -> int:
    unit = HUGE if length >= HUGE else PAGE
    return -(-length // unit) * unit


@dataclass(eq=False)
class Segment:
    path: str
    mm: mmap.mmap
    addr: int
    size: int
    writable: bool
    cuda_registered: bool = False
    huge_advised: bool = False
    closed: bool = field(default=False)

    @classmethod
    def create(cls, path: str, length: int, mode: int, cuda_mode: str) -> Segment:
        size = mapped_size(length)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow the isolation boundary
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            huge = _advise_huge(mm, size)
            _populate(mm, fd, size)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        os.close(fd)
        seg = cls(path, mm, native.address(mm, True)[0], size, True, huge_advised=huge)
        try:
            seg.cuda_registered = cuda.host_register(seg.addr, size, False, cuda_mode)
        except BaseException:
            seg.close()
            seg.unlink()
            raise
        return seg

    @classmethod
    def open(cls, path: str, length: int, writable: bool, cuda_mode: str) -> Segment:
        """Map an existing segment; FileNotFoundError when it was unlinked (deregistered or owner gone)."""
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < length:
                raise OSError(f"shm segment {path} has {size} bytes, the region needs {length}")
            mm = _map(fd, size, writable, populate=size <= POPULATE_MAX)
        finally:
            os.close(fd)
        seg = cls(path, mm, native.address(mm, False)[0], size, writable)
        try:
            seg.cuda_registered = cuda.host_register(seg.addr, size, not writable, cuda_mode)
        except BaseException:
            seg.close()
            raise
        return seg

    def close(self) -> None:
        """Unmap. If the application still holds views of the mapping, the pages stay mapped until the last
        view is dropped (unmapping under a live view would crash the process); the name is gone regardless."""
        if self.closed:
            return
        self.closed = True
        if self.cuda_registered:
            cuda.host_unregister(self.addr)
            self.cuda_registered = False
        try:
            self.mm.close()
        except BufferError:
            log.debug("shm: %s still has exported views; it is unmapped when they are released", self.path)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _map(fd: int, size: int, writable: bool, populate: bool) -> mmap.mmap:
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    return mmap.mmap(fd, size, flags=flags, prot=prot)


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _populate(mm: mmap.mmap, fd: int, size: int) -> None:
    try:
        mm.madvise(MADV_POPULATE_WRITE)
        return
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: kernel too old; anything else: out of memory / space
            mm.close()
            raise OSError(errno.ENOSPC, f"cannot back {size} bytes of shared memory: {exc.strerror}") from exc
    os.posix_fallocate(fd, 0, size)


def _advise_huge(mm: mmap.mmap, size: int) -> bool:
    if size < HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
        return True
    except OSError:
        return False

"""Step transactions: a rank's last committed steps, kept where its death cannot reach them.

At each commit a rank copies its live state into one of ``depth`` preallocated slots. Ranks can be
one step apart when a fault strikes (a rank that finished step C+1 while a peer died inside it),
and every rank must return to the last step *every* rank finished, so the ring holds two steps by
default. Partial updates need no detection of their own: whatever a failed step changed
(parameters mid-``optimizer.step``, moments) is overwritten by the copy of the recovery point.

A slot is one flat byte buffer laid out by ``Layout``: the replicated tensors, then the unique
ones, each region with its own xxh3 checksum, computed while the bytes are copied. The slot's
header (step, layout, checksums, the pickled meta) is written after the data and removed before
the data is overwritten, so a slot with a header always holds a whole committed step.

Where the slots live: in a directory of the node's shared memory (``/dev/shm``, owned by the node
agent), so a snapshot outlives the process that wrote it and a replacement on the same node
restores from it at memory speed with no network at all; or in process memory, when there is no
such directory or it has no room (then only copies held by peers survive the process).

The copy runs off the training thread, on a background thread that then seals the slot
(checksums, header). On CUDA that thread issues the device-to-host copies on a side stream, once
the training thread says so (``start``: the transaction defers them until the next step's first
forward is queued, see ``StepTransaction``), and the optimizer's step waits for them on the GPU
(``wait_read``), not on the host; on the CPU it copies and hashes, and the optimizer's step waits
for the seal. Either way the copy overlaps the next step's forward and backward.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

import torch
import xxhash

from .background import Worker
from .integration import RankState
from .layout import (PARTS, BlockHasher, ChecksumError, Layout, bytes_of, checksum, dumps_meta,
                     loads_meta)

log = logging.getLogger("fr_megatron.snapshot")

CHUNK = 256 << 10  # copy and hash in pieces that stay in the CPU's cache between the two

class Slot:
    """One committed step's bytes and header, in a file of ``directory`` or in process memory."""

    def __init__(self, directory: Optional[str], name: str):
        self.base = os.path.join(directory, name) if directory else None
        self.buf = torch.empty(0, dtype=torch.uint8)
        self.header: Optional[dict] = None
        self.layout: Optional[Layout] = None
        self._registered = False  # buf is page-locked for CUDA copies
        # parts this process has checked against the header since the slot was sealed: a
        # replacement checks what it inherited before offering it, and need not read it twice
        self.verified: set[str] = set()
        if self.base and os.path.exists(self.base + ".hdr"):
            self._adopt()

    @property
    def step(self) -> Optional[int]:
        return None if self.header is None else self.header["step"]

    def _adopt(self) -> None:
        """Take over the slot a previous process of this rank left in shared memory."""
        try:
            with open(self.base + ".hdr", "rb") as f:
                header = pickle.load(f)
            layout = Layout.from_json(header["layout"])
            if os.path.getsize(self.base + ".bin") < layout.total:
                raise ValueError("data file shorter than its layout")
            self.buf = self._map(layout.total)
            self.layout, self.header = layout, header
        except Exception as e:  # noqa: BLE001 - whatever is wrong, the slot is not a step
            log.warning("snapshot slot %s left by a previous process is unusable: %s", self.base, e)
            self.invalidate()

    def _map(self, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.from_file(self.base + ".bin", shared=True, size=nbytes, dtype=torch.uint8)

    def ensure(self, layout: Layout, pin: bool = False) -> None:
        """Make room for ``layout`` (reusing the buffer when it fits exactly)."""
        if self.layout is not None and self.buf.numel() == layout.total and \
                (self._registered or not pin):
            self.layout = layout
            return
        self._unregister()
        if self.base is None:
            self.buf = torch.empty(layout.total, dtype=torch.uint8, pin_memory=pin)
        else:
            # a new file: views of the old one stay valid while anybody holds them
            self.buf = torch.empty(0, dtype=torch.uint8)
            try:
                os.unlink(self.base + ".bin")
            except FileNotFoundError:
                pass
            fd = os.open(self.base + ".bin", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if layout.total:
                    os.posix_fallocate(fd, 0, layout.total)  # ENOSPC now, not SIGBUS later
            finally:
                os.close(fd)
            self.buf = self._map(layout.total)
            if pin and layout.total:
                self._register()
        self.layout = layout

    def _register(self) -> None:
        rc = torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), self.buf.numel(), 0)
        self._registered = int(getattr(rc, "value", rc)) == 0

    def _unregister(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self._registered = False

    def invalidate(self) -> None:
        self.header = None
        self.verified = set()
        if self.base:
            try:
                os.unlink(self.base + ".hdr")
            except FileNotFoundError:
                pass

    def seal(self, header: dict) -> None:
        if self.base:
            tmp = self.base + ".hdr.tmp"
            with open(tmp, "wb") as f:
                pickle.dump(header, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, self.base + ".hdr")
        self.header = header
        self.verified = set()

    def copy_from(self, src: "Slot") -> None:
        """Make this slot hold ``src``'s sealed step: bytes, then header (the old header goes
        first, so a copy cut short is no step)."""
        self.invalidate()
        self.ensure(src.layout)
        self.buf.copy_(src.buf[:src.layout.total])
        self.seal(dict(src.header))

    def region(self, part: str) -> torch.Tensor:
        s, e = self.layout.spans[part]
        return self.buf[s:e]

    def verify(self, parts: Iterable[str]) -> None:
        """Raise ``ChecksumError`` unless ``parts`` (and the meta) match their checksums."""
        sums = self.header["sums"]
        for part in parts:
            if part in self.verified:
                continue
            got = checksum(self.region(part))
            if got != sums[part]:
                raise ChecksumError(f"checksum mismatch in the {part} state of step "
                                    f"{self.step}: written {sums[part]}, read {got}")
            self.verified.add(part)
        if "meta" in sums and xxhash.xxh3_128(self.header["meta"]).hexdigest() != sums["meta"]:
            raise ChecksumError(f"checksum mismatch in the meta state of step {self.step}")

    def state(self) -> RankState:
        views = self.layout.views(self.buf)
        return RankState(views.get("replicated", {}), views.get("unique", {}), self.meta())

    def meta(self) -> dict:
        return loads_meta(self.header["meta"])

    def remove(self) -> None:
        self.invalidate()
        self._unregister()
        if self.base:
            try:
                os.unlink(self.base + ".bin")
            except FileNotFoundError:
                pass


def rank_ring(depth: int, directory: Optional[str], rank: int) -> "SnapshotRing":
    """Job rank ``rank``'s own snapshots: found again under this name by its replacement on the
    same node, and by the ranks left after it left the world (``reshard_exchange``)."""
    return SnapshotRing(depth, directory, f"rank{rank}")


class SnapshotRing:
    """The last ``depth`` committed steps of one rank (or a holder's copies of one ward)."""

    def __init__(self, depth: int = 2, directory: Optional[str] = None, name: str = "rank",
                 parts: tuple[str, ...] = PARTS):
        self.depth, self.directory, self.name, self.parts = depth, directory, name, parts
        self.slots = [Slot(directory, f"{name}.slot{i}") for i in range(depth)]
        self._stream = None
        self._sealed = threading.Event()  # cleared while a write is being sealed
        self._sealed.set()
        self._error: Optional[BaseException] = None
        self._copied = None  # the CUDA event of the last write's device-to-host copy
        self._issued = threading.Event()  # set once the last write's copies are issued
        self._issued.set()
        self._lock = threading.Lock()
        self._pending = None  # the last write's sealing, until ``start``
        self._sealer = Worker("fr-snapshot-seal")

    @property
    def in_shared_memory(self) -> bool:
        return self.directory is not None

    def steps(self) -> list[int]:
        """The sealed steps (a write in progress is waited for)."""
        self.settle()
        return sorted(s.step for s in self.slots if s.step is not None)

    def __contains__(self, step: int) -> bool:
        return self._find(step) is not None

    def _find(self, step: int) -> Optional[Slot]:
        for s in self.slots:
            if s.step == step:
                return s
        return None

    def slot(self, step: int) -> Slot:
        s = self._find(step)
        if s is None:
            raise KeyError(f"step {step} is not in the snapshot ring ({self.steps()})")
        return s

    def take(self, step: int) -> Slot:
        """The slot ``step`` is written to: its own, a free one, or the oldest step's."""
        self.wait()
        s = self._find(step) or next((s for s in self.slots if s.step is None), None) or \
            min(self.slots, key=lambda s: s.step)
        s.invalidate()
        return s

    # ---- writing ------------------------------------------------------------------------
    def reserve(self, live: RankState) -> bool:
        """Allocate the free slots for ``live``'s layout now, at start-up: a node whose shared
        memory cannot hold them finds out here, and the ring moves to process memory and says
        so, instead of failing in a commit. Returns whether the ring is in shared memory."""
        layout = Layout.of(live, self.parts)
        on_gpu = any(t.is_cuda for part in self.parts for t in getattr(live, part).values())
        try:
            for s in self.slots:
                if s.step is None:
                    s.ensure(layout, on_gpu)
        except OSError as e:  # ENOSPC: the node's shared memory is full
            self._to_process_memory(layout, e)
            for s in self.slots:
                s.ensure(layout, on_gpu)
        return self.in_shared_memory

    def _to_process_memory(self, layout: Layout, error: OSError) -> None:
        log.warning("snapshots of %s do not fit in %s (%d MB needed: %s); keeping them in "
                    "process memory, where they do not outlive the process (give the directory "
                    "more room, e.g. docker --shm-size, or set snapshot_dir)", self.name,
                    self.directory, (layout.total * self.depth) >> 20, error)
        for s in self.slots:
            s.remove()
        self.directory = None
        self.slots = [Slot(None, f"{self.name}.slot{i}") for i in range(self.depth)]

    def write(self, step: int, live: RankState, defer: bool = False) -> None:
        """Copy ``live`` into a slot as step ``step``, sealed in the background (``wait``); the
        tensors of ``live`` must not change until then. ``defer``: the copy waits for
        ``start`` (a wait on the training thread starts it too)."""
        layout = Layout.of(live, self.parts)
        tensors = {n: t for part in self.parts for n, t in getattr(live, part).items()}
        on_gpu = any(t.is_cuda for t in tensors.values())
        slot = self.take(step)
        try:
            slot.ensure(layout, pin=on_gpu)
        except OSError as e:
            self._to_process_memory(layout, e)
            slot = self.take(step)
            slot.ensure(layout, pin=on_gpu)
        meta = dumps_meta(live.meta)
        header = {"step": step, "layout": layout.to_json(), "meta": meta,
                  "sums": {"meta": xxhash.xxh3_128(meta).hexdigest()}}
        if on_gpu:
            # the copies read the state once the step's last kernels are done; the sealing
            # thread issues them, when ``start`` says so
            if self._stream is None:
                device = next(t.device for t in tensors.values() if t.is_cuda)
                self._stream = torch.cuda.Stream(device=device)
            ready = torch.cuda.Event()
            ready.record()
            self._copied = None
            self._issued.clear()

            def fill():
                try:
                    self._copied = self._copy_on_side_stream(slot, layout, tensors, ready)
                finally:
                    self._issued.set()
                self._copied.synchronize()
                for part in self.parts:
                    header["sums"][part] = checksum(slot.region(part))
        else:
            def fill():
                for part in self.parts:
                    header["sums"][part] = _copy_and_hash(layout, part, tensors, slot.buf)
        self._seal_in_background(slot, header, fill, deferred=defer)

    def start(self) -> None:
        """Start the last write's copy if it waits for this (``write(defer=True)``)."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._sealer.submit(pending)

    def _copy_on_side_stream(self, slot: Slot, layout: Layout, tensors: dict, ready):
        """Issue the device-to-host copies on the side stream, after ``ready`` (an event of the
        training stream); the event that marks them done. CPU tensors are copied at once."""
        self._stream.wait_event(ready)
        with torch.cuda.stream(self._stream):
            for part in self.parts:
                for e in layout.regions[part]:
                    t = tensors[e.name]
                    slot.buf[e.offset:e.offset + e.nbytes].copy_(bytes_of(t), non_blocking=True)
                    if t.is_cuda:  # the allocator must not reuse it before the copy is done
                        t.record_stream(self._stream)
            done = torch.cuda.Event()
            done.record(self._stream)
        return done

    def _seal_in_background(self, slot: Slot, header: dict, fill, deferred: bool) -> None:
        """Run ``fill`` (the copy and its checksums) on a thread, then write the header: the
        training thread goes on with the next step meanwhile (the live tensors do not change
        until its optimizer phase, which waits). ``deferred``: only once ``start`` is called."""
        def seal():
            try:
                fill()
                _corrupt_for_tests(slot)
                slot.seal(header)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait
                self._error = e
            finally:
                self._sealed.set()

        self._sealed.clear()
        with self._lock:
            self._pending = seal
        if not deferred:
            self.start()

    def settle(self, start: bool = True) -> None:
        """Block until the last ``write`` has sealed or failed, leaving a failure for ``wait``
        to hand to the training thread. ``start``: start a deferred write first (a thread other
        than the training thread waits for the training thread to start it)."""
        if start:
            self.start()
        self._sealed.wait()

    def wait_read(self) -> None:
        """Make the training thread's next work wait until the last ``write`` no longer reads
        the live tensors. On a GPU the thread waits only until the copies are issued (CPU
        tensors among them are copied by then) and the training stream waits, on the GPU, for
        the device-to-host copies; the checksums of the host copy run on. On the CPU the thread
        waits until the write is sealed (there the copy and its checksums are one pass)."""
        self.start()
        self._issued.wait()
        if self._copied is not None:
            torch.cuda.current_stream().wait_event(self._copied)
        else:
            self.wait()

    def wait(self, start: bool = True) -> None:
        """Block until the last ``write`` is sealed; any thread may wait (``settle``)."""
        self.settle(start)
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    # ---- reading ------------------------------------------------------------------------
    def get(self, step: int, verify: bool = True) -> RankState:
        """The state of ``step`` as views into its slot (copy them out before the slot is
        reused); checksums verified first."""
        self.wait()
        s = self.slot(step)
        if verify:
            s.verify(self.parts)
        return s.state()

    def validate(self) -> list[tuple[int, str]]:
        """Check every sealed slot's checksums; drop the ones that fail. Returns what was
        dropped (step, reason): a replacement runs this on the slots its predecessor left."""
        def check(s: Slot) -> Optional[tuple[int, str]]:
            try:
                s.verify(self.parts)
            except ChecksumError as e:
                step = s.step
                s.invalidate()
                return step, str(e)
            return None

        sealed = [s for s in self.slots if s.step is not None]
        if len(sealed) < 2:
            results = [check(s) for s in sealed]
        else:  # xxh3 releases the GIL: the slots are read at once
            with ThreadPoolExecutor(len(sealed), thread_name_prefix="fr-validate") as pool:
                results = list(pool.map(check, sealed))
        return [r for r in results if r is not None]

    # ---- handing over to a replacement ----------------------------------------------------
    def hand_over(self, directory: str) -> int:
        """Write the sealed steps held in process memory to files in ``directory`` (a node
        directory of the agent's), where this rank's replacement takes them over
        (``take_over``): a rank that leaves as faulty passes on its snapshots even when they are
        not in shared memory. Returns the bytes written."""
        if self.in_shared_memory:
            return 0
        self.settle()
        written = 0
        for i, s in enumerate(self.slots):
            if s.header is None:
                continue
            Slot(directory, f"{self.name}.slot{i}").copy_from(s)
            written += s.layout.total
        return written

    def take_over(self, directory: str) -> list[int]:
        """Load into process memory the steps that this ring's previous process handed over in
        ``directory``, and remove the files. Returns the steps taken; their checksums are
        checked before they are offered, as for any inherited slot (``validate``)."""
        if self.in_shared_memory:
            return []
        for i, s in enumerate(self.slots):
            name = f"{self.name}.slot{i}"
            if not os.path.exists(os.path.join(directory, name + ".hdr")):
                continue
            handed = Slot(directory, name)
            if handed.header is not None:
                s.copy_from(handed)
            handed.remove()
        return self.steps()

    def drop_after(self, step: int) -> None:
        self.wait()
        for s in self.slots:
            if s.step is not None and s.step > step:
                s.invalidate()

    def nbytes(self) -> int:
        return sum(s.buf.numel() for s in self.slots)

    def close(self, remove: bool = False) -> None:
        self.wait()
        if remove:
            for s in self.slots:
                s.remove()


def _copy_and_hash(layout: Layout, part: str, tensors: dict, buf: torch.Tensor) -> str:
    """Copy ``part``'s tensors into ``buf`` at their offsets and return the region's checksum,
    hashing each piece while it is still in the CPU's cache (torch and xxhash release the GIL)."""
    if not layout.size(part):
        return "0"
    h = BlockHasher()
    for e in layout.regions[part]:
        src, dst = bytes_of(tensors[e.name]), buf[e.offset:e.offset + e.nbytes]
        for off in range(0, e.nbytes, CHUNK):
            d = dst[off:off + CHUNK]
            d.copy_(src[off:off + CHUNK])
            h.update(d.numpy())
    return h.hexdigest()


def _corrupt_for_tests(slot: Slot) -> None:
    """``FR_CORRUPT_SNAPSHOTS=1``: flip one byte after checksumming, as bad memory would."""
    if os.environ.get("FR_CORRUPT_SNAPSHOTS") == "1" and slot.layout.total:
        slot.buf[slot.layout.total // 2] ^= 0xFF

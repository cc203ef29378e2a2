"""A training process's link to the control plane: messages out, plans in, beats to its agent.

Three connections, one per thread that uses them: the main thread's store client (fault reports,
events, injection claims, the plans it reads), the plan monitor's (cut at close, so its wait for
the next plan ends at once) and the heartbeat's Unix socket to the node agent. Every message is
signed with the job's token (``protocol.auth``).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import Callable, Optional

from ..config import FlashRecoveryConfig
from ..protocol import keys
from ..protocol.auth import Signer
from ..protocol.node_beats import BeatSender
from ..protocol.store import connect, connect_cuttable, shutdown_sockets
from .errors import RecoveryImpossible
from .heartbeat import Heartbeat, PlanMonitor

log = logging.getLogger("fr_megatron.runtime")


class ControlLink:
    """``status()`` is the rank's heartbeat body; ``on_plan(plan)`` runs on the monitor thread
    when a newer generation's plan appears; ``orphaned(seconds)`` when the agent has been
    unreachable for twice the node timeout (nobody supervises the rank any more)."""

    def __init__(self, rank: int, host: str, port: int, token: bytes, agent_socket: str,
                 cfg: FlashRecoveryConfig, status: Callable[[], dict],
                 orphaned: Callable[[float], None]):
        self.rank, self.host, self.port = rank, host, port
        self.signer = Signer(token, f"rank{rank}")
        self.store = connect(host, port)
        self._beats = BeatSender(agent_socket)
        self._mon_store, self._mon_fds = connect_cuttable(host, port)
        self.heartbeat = Heartbeat(self._beats.send, self.signer, rank, cfg.heartbeat_interval,
                                   status, orphan_timeout=2 * cfg.node_timeout, orphaned=orphaned)
        self.monitor: Optional[PlanMonitor] = None

    def start(self, generation: Callable[[], int], on_plan: Callable[[dict], None]) -> None:
        """First beat (an error names the agent when there is none), then both threads."""
        try:
            self.heartbeat.beat()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise RuntimeError(f"rank {self.rank} cannot reach its node agent at "
                               f"{self._beats.path}: {e} (start this script with "
                               "`fr-megatron run`)") from e
        except OSError as e:  # a busy agent: the heartbeat thread sends the next beat
            log.warning("rank=%d first heartbeat not sent: %s", self.rank, e)
        self.heartbeat.start()
        self.monitor = PlanMonitor(self._mon_store, self.signer, generation, on_plan)
        self.monitor.start()
        # daemon threads caught inside a C++ store call at interpreter exit abort the process
        # ("terminate called without an active exception"): stop them first
        atexit.register(self.stop)

    def stop(self) -> None:
        self.heartbeat.stop()
        if self.monitor is not None:
            self.monitor.stop()
        shutdown_sockets(self._mon_fds)  # its wait for the next plan fails now
        for t in (self.heartbeat, self.monitor):
            if t is not None and t.is_alive() and t is not threading.current_thread():
                t.join(5)
        self._beats.close()

    def beat_now(self) -> None:
        """One beat from the calling thread (the report of what comes next must carry it)."""
        try:
            self.heartbeat.beat()
        except OSError:
            pass

    # ---- messages ---------------------------------------------------------------------------
    def send(self, kind: str, **body) -> None:
        try:
            self.store.queue_push(keys.EVENTS, self.signer.sign(kind, rank=self.rank, **body))
        except Exception as e:  # noqa: BLE001 - a controller that is gone is the agent's to judge
            log.warning("rank=%d cannot reach the controller: %s", self.rank, e)

    def claim(self, key: str) -> bool:
        """Whether this rank is the first to claim ``key`` (an injection fires once per job)."""
        return self.store.add(key, 1) == 1

    def mark_finished(self) -> None:
        self.store.set(keys.finished(self.rank), b"1")

    # ---- plans ------------------------------------------------------------------------------
    def latest_generation(self) -> int:
        try:
            if self.store.check([keys.GENERATION]):
                return int(self.signer.verify(self.store.get(keys.GENERATION))["generation"])
        except Exception:  # noqa: BLE001 - no generation published yet
            pass
        return 0

    def plan_for(self, generation: int) -> dict:
        return self.signer.verify(self.store.get(keys.plan(generation)))

    def wait_plan(self, after: int, notice: Callable[[], Optional[dict]],
                  timeout: float = 600.0) -> dict:
        """The first plan of a generation newer than ``after`` (the notice the monitor handed
        over, or the newest it saw)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            plan = notice() or (self.monitor.latest if self.monitor else None)
            if plan and plan["generation"] > after:
                return plan
            time.sleep(0.002)
        raise RecoveryImpossible(f"no recovery plan from the controller within {timeout:.0f}s")

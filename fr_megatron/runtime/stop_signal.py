"""A rank that saves a checkpoint and exits on SIGTERM, as Megatron-LM's ``--exit-signal-handler``.

When a job is stopped (Ctrl-C or SIGTERM to a launcher, Slurm's scancel, a preemption), the
controller sends SIGTERM to every rank through its agent if the ranks said they save on it,
and waits for them to exit (``stop_timeout``); else it ends the job at once. A SIGTERM that
reaches one rank alone (``kill -TERM``) stops the whole job the same way: the rank tells the
controller, and its own handler (the script's) does the save. See README, "Stopping a job".
"""

from __future__ import annotations

import logging
import signal
import threading

from ..protocol import keys
from ..protocol.store import connect

log = logging.getLogger("fr_megatron.runtime")


def save_on_stop(session) -> None:
    """Declare that ``session``'s rank saves and exits on SIGTERM, and chain a notice to the
    controller in front of the script's SIGTERM handler (install that handler first)."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        # the controller is told from a thread on a connection of its own: this runs between
        # two bytecodes of the main thread, which may be inside a store call
        threading.Thread(target=_tell_controller, args=(session,), daemon=True).start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    session.send("saves_on_stop")


def _tell_controller(session) -> None:
    try:
        connect(session.host, session.port, 5.0).queue_push(keys.EVENTS, session.signer.sign(
            "stop_requested", rank=session.rank, signal="SIGTERM", by=f"rank {session.rank}"))
    except Exception as e:  # noqa: BLE001 - the rank still saves and exits
        log.warning("rank=%d could not tell the controller of its SIGTERM: %s", session.rank, e)

"""The node's shared-memory directory, where the ranks keep their snapshots and held copies.

The node agent owns it: it makes one directory per job and node under ``snapshot_dir``
(``/dev/shm`` by default, a tmpfs), hands its path to every worker and spare
(``FR_SNAPSHOT_DIR``), and removes it when the job ends on the node. What a rank writes there
outlives the rank, so its replacement on the same node restores from it. The directory records
its agent's pid: an agent removes the directories of agents that are gone (a launcher killed
with SIGKILL cannot clean up after itself).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Optional

import psutil

log = logging.getLogger("fr_megatron.agent")

ENV = "FR_SNAPSHOT_DIR"
# a node directory (in the launcher's run directory) where a rank that leaves as faulty writes
# the snapshots it kept in process memory, and its replacement on the node takes them from
HANDOVER_ENV = "FR_HANDOVER_DIR"
PREFIX = "fr-megatron-"
_OWNER = "agent.pid"


def make(base: Optional[str], job: str, node: int) -> Optional[str]:
    """This node's directory for ``job``, or None (ranks then keep snapshots in process memory)."""
    if not base:
        return None
    if not os.path.isdir(base) or not os.access(base, os.W_OK):
        log.warning("node=%d snapshot_dir %s is not a writable directory: ranks keep their "
                    "snapshots in process memory and copy unique state to peers", node, base)
        return None
    sweep_stale(base)
    path = os.path.join(base, f"{PREFIX}{job}-node{node}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    with open(os.path.join(path, _OWNER), "w") as f:
        f.write(str(os.getpid()))
    return path


def remove(path: Optional[str]) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def sweep_stale(base: str) -> None:
    """Remove the job directories in ``base`` whose agent process no longer exists."""
    try:
        names = [n for n in os.listdir(base) if n.startswith(PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        try:
            with open(os.path.join(path, _OWNER)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if not psutil.pid_exists(pid):
            log.info("removing %s, left by agent pid %d that is gone", path, pid)
            remove(path)

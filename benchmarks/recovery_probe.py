"""``recipes/megatron/pretrain_gpt.py`` with a read-out of the runtime's host buffers at the end.

Run under ``fr-megatron run`` in place of the recipe (same arguments); ``benchmarks.recovery``
does. It changes nothing while training: just before ``on_train_end`` it reads, from the live
runtime objects of this rank, the bytes held by the snapshot ring (``Session.ring``) and by the
redundant copies this rank keeps for its wards (``Session.copies``), next to the size of the state
they protect (``MegatronIntegration.capture()``), plus the process's resident memory and the CPU
seconds of each of its threads (``thread_cpu``: the runtime's ``fr-*`` threads), and writes
them as JSON to ``$FR_BENCH_PROBE_DIR/rank<R>.json`` (a replacement process overwrites its
predecessor's file when it finishes). Without ``--flash-recovery`` only the resident memory is
recorded, and the rank marks itself finished in the controller's store (see ``_mark_finished``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "megatron" / "pretrain_gpt.py"


def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # noqa: BLE001 - psutil missing: fall back to /proc
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process so far by thread name (Python's name where the thread is
    Python's, the kernel's otherwise, e.g. gloo's), same names summed."""
    import threading

    import psutil

    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for t in psutil.Process().threads():
        name = names.get(t.id)
        if name is None:
            try:
                with open(f"/proc/self/task/{t.id}/comm") as f:
                    name = f.read().strip()
            except OSError:
                name = "?"
        name = name.split("_")[0] if name.startswith("fr-copies") else name
        out[name] = round(out.get(name, 0.0) + t.user_time + t.system_time, 3)
    return out


def read_out(hooks) -> dict:
    """What this rank's runtime holds now (called before the session closes)."""
    import torch.distributed as dist

    out = {"rank": int(os.environ.get("RANK", -1)), "pid": os.getpid(),
           "replacement": os.environ.get("FR_REPLACEMENT") == "1",
           "rss_bytes": _rss_bytes(),
           "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "flash_recovery": False, "thread_cpu_s": thread_cpu()}
    session = hooks.session()
    if session is None:
        return out
    from fr_megatron.runtime.layout import Layout

    live = session.integration.capture()
    layout = Layout.of(live)
    ring = session.tx.ring
    copies = session.tx.copies
    ring_meta = sum(len(ring.slot(s).header["meta"]) for s in ring.steps())
    out.update({
        "flash_recovery": True,
        "world_size": dist.get_world_size() if dist.is_initialized() else None,
        "snapshot_depth": session.cfg.snapshot_depth,
        "replicas": session.cfg.replicas,
        "state": {"replicated_bytes": layout.nbytes("replicated"),
                  "unique_bytes": layout.nbytes("unique"),
                  "meta_pickled_bytes": len(pickle.dumps(live.meta)),
                  "replicated_tensors": len(live.replicated),
                  "unique_tensors": len(live.unique)},
        "ring": {"steps": ring.steps(), "tensor_bytes": ring.nbytes(),
                 "meta_pickled_bytes": ring_meta, "shared_memory": ring.in_shared_memory},
        "copies": {"wards": list(copies.wards), "holders": list(copies.holders),
                   "held": {str(w): s for w, s in copies.held_steps().items()},
                   "data_bytes": copies.nbytes()},
    })
    return out


def _mark_finished() -> None:
    """Without ``--flash-recovery`` nothing tells the agent that this rank finished, and it
    takes the exit 0 for an early exit and respawns the rank; set the key ``Session.close``
    sets (after training, so no step is timed with it)."""
    from fr_megatron.config import parse_address
    from fr_megatron.protocol import keys
    from fr_megatron.protocol.store import connect

    host, port = parse_address(os.environ["FR_CONTROLLER"], "FR_CONTROLLER")
    connect(host, port).set(keys.finished(int(os.environ["RANK"])), b"1")


def main() -> int:
    spec = importlib.util.spec_from_file_location("pretrain_gpt", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    hooks = recipe.flash_recovery
    probe_dir = os.environ.get("FR_BENCH_PROBE_DIR")
    original_end = hooks.on_train_end

    def on_train_end():
        if probe_dir:
            rec = read_out(hooks)
            path = Path(probe_dir) / f"rank{rec['rank']}.json"
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, path)
        if hooks.session() is None and "FR_CONTROLLER" in os.environ:
            _mark_finished()
        return original_end()

    hooks.on_train_end = on_train_end
    return recipe.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

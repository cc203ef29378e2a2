"""Start the ranks of a worker script forked from one process that imported what they import.

    python tests/forked_ranks.py SPEC.json

SPEC: ``preload`` (module names, imported in order), ``script`` and ``argv``, and per rank its
``env`` (added to this process's) and ``log`` (its stdout and stderr). Each rank runs the script as
``__main__`` (``launcher.template.run_script``, as the worker template runs a job's script), but
starts with the preloaded modules in place: ranks that each import megatron-core or DeepSpeed on the
same two cores take seconds longer to start. Exits 0 when every rank exited 0, else 1, after
printing each rank's exit code. Killing this process's session stops the ranks with it.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import sys
import traceback

from fr_megatron.launcher.template import run_script


def _run_rank(script: str, argv: list[str], env: dict, log: str) -> int:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(env)
    try:
        run_script([script, *argv])
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a rank's error goes to its log, as python prints it
        traceback.print_exc()
        return 1
    finally:
        atexit._run_exitfuncs()  # what the interpreter's exit would run; os._exit follows
        sys.stdout.flush()
        sys.stderr.flush()


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    for name in spec["preload"]:
        importlib.import_module(name)
    pids = []
    for rank in spec["ranks"]:
        pid = os.fork()
        if pid == 0:
            os._exit(_run_rank(spec["script"], spec["argv"], rank["env"], rank["log"]))
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print(json.dumps(codes))
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())

"""A warm spare: a process with the interpreter up and torch imported, waiting for a rank.

The agent keeps a few of these per node. Importing torch (and a framework) costs a fresh process
1-2 s on CPU and 6-8 s with a CUDA context; a spare has paid that before the fault. It reads one
assignment (JSON line: environment and argv) from stdin, which only its agent holds, then runs the
training script as ``__main__`` exactly as a freshly spawned worker would.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys


DEFAULT_PRELOAD = "torch,torch.distributed,fr_megatron.runtime"
# a spare for a megatron-core job: megatron-core loaded as its peers load it (``megatron.preload``)
MEGATRON_PRELOAD = f"{DEFAULT_PRELOAD},fr_megatron.megatron.preload"


def preload(modules: str) -> None:
    for name in filter(None, (m.strip() for m in modules.split(","))):
        try:
            importlib.import_module(name)
        except Exception as e:  # a preload is an optimisation, never a failure
            print(f"fr-megatron spare: preload {name} failed: {e}", file=sys.stderr)


def main() -> None:
    preload(os.environ.get("FR_SPARE_PRELOAD", DEFAULT_PRELOAD))
    line = sys.stdin.readline()
    if not line.strip():
        return  # the agent closed our stdin: the job is over
    assignment = json.loads(line)
    os.environ.update(assignment["env"])
    sys.argv = list(assignment["argv"])
    sys.stdin = open(os.devnull)
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()

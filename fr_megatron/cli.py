"""``fr-megatron``: run, controller, demo, patch, bench."""

from __future__ import annotations

import sys

COMMANDS = {
    "run": ("fr_megatron.launcher.launch", "launch a training script with flash recovery"),
    "controller": ("fr_megatron.launcher.controller", "host a job's store and decide recoveries"),
    "demo": ("fr_megatron.demo", "the fault-injected tiny-GPT demo on CPU"),
    "patch": ("fr_megatron.megatron.patch_tool", "apply the Megatron-LM patch"),
    "bench": ("benchmarks.__main__", "run the benchmarks"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
        out = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        if argv and argv[0] not in ("-h", "--help"):
            print(f"fr-megatron: unknown command {argv[0]!r}", file=out)
        print("usage: fr-megatron COMMAND [args]\n\ncommands:\n" + "\n".join(lines), file=out)
        return 0 if out is sys.stdout else 2
    import importlib
    import os

    # before torch loads: the control plane waits on store keys with short timeouts by design,
    # and c10d would log every one of them as a warning
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    mod = importlib.import_module(COMMANDS[argv[0]][0])
    return int(mod.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

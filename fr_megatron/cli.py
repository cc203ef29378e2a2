"""``fr-megatron``: run, controller, demo, patch, bench, config."""

from __future__ import annotations

import sys
from typing import NamedTuple

class Command(NamedTuple):
    module: str  # imported only when its command runs; its main(argv) runs it
    help: str


COMMANDS = {
    "run": Command("fr_megatron.launcher.launch", "launch a training script with flash recovery"),
    "controller": Command("fr_megatron.launcher.controller",
                          "host a job's store and decide recoveries"),
    "demo": Command("fr_megatron.demo", "the fault-injected tiny-GPT demo on CPU"),
    "patch": Command("fr_megatron.megatron.patch_tool", "apply the Megatron-LM patch"),
    "bench": Command("benchmarks.__main__", "run the benchmarks"),
    "config": Command("fr_megatron.config_reference",
                      "print the configuration reference (Markdown)"),
}


def _find_benchmarks() -> str | None:
    """``benchmarks/`` is not installed with the package: it sits next to ``fr_megatron/`` in the
    source checkout. Put that checkout first on sys.path (an editable install runs from it, from
    any directory); an error message when there is none."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if (root / "benchmarks" / "__main__.py").is_file():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        return None
    try:
        if importlib.util.find_spec("benchmarks.__main__") is not None:
            return None
    except ImportError:
        pass
    return ("fr-megatron bench: the benchmarks are not part of the installed package; they live "
            "in the repository's benchmarks/ folder. Install fr_megatron from a checkout "
            "(pip install -e .) or run `python -m benchmarks` from the repository root.")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<11} {c.help}" for name, c in COMMANDS.items()]
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
    if argv[0] == "bench":
        err = _find_benchmarks()
        if err:
            print(err, file=sys.stderr)
            return 2
    mod = importlib.import_module(COMMANDS[argv[0]].module)
    return int(mod.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

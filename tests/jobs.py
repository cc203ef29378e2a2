"""Running real ``fr-megatron run`` jobs from tests: processes, gloo, the controller's store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TORCH_RECIPE = REPO / "recipes" / "torch_ddp" / "train.py"


@dataclass
class Job:
    rc: int
    output: str
    report: dict | None
    result: dict | None
    journal: list[dict]


def run_job(tmp: Path, script: Path, script_args: list[str], nproc: int = 4, spares: int = 1,
            inject: str | None = None, extra: list[str] = (), timeout: float = 240,
            env: dict | None = None, name: str = "job", wandb_dir: Path | None = None) -> Job:
    out = tmp / f"{name}.pt"
    report = tmp / f"{name}.report.json"
    journal = tmp / f"{name}.journal.jsonl"
    cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nproc-per-node", str(nproc),
           "--spares", str(spares), "--report", str(report), "--journal", str(journal), *extra]
    env = dict(env or {})
    if wandb_dir is None:
        cmd.append("--no-wandb")
    else:  # the controller logs recoveries to an offline wandb run in wandb_dir
        env["FR_CONFIG"] = json.dumps({"wandb": {"enabled": True, "mode": "offline",
                                                 "dir": str(wandb_dir), "project": "fr-tests"}})
    if inject:
        cmd += ["--inject", inject]
    cmd += [str(script), *script_args]
    if "--out" not in script_args:
        cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})
    from fr_megatron.events import Journal

    return Job(proc.returncode, proc.stdout + proc.stderr,
               json.loads(report.read_text()) if report.exists() else None,
               torch.load(out, weights_only=False) if out.exists() else None,
               Journal.read(str(journal)) if journal.exists() else [])


def assert_same_training(a: dict, b: dict) -> None:
    """Bit-identical losses, parameters and optimizer state."""
    assert a["losses"] == b["losses"], (a["losses"], b["losses"])
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), f"parameter {k} differs"
    sa, sb = a["optim"]["state"], b["optim"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}/{k} differs"

"""Running real ``fr-megatron run`` jobs from tests: processes, gloo, the controller's store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
TORCH_RECIPE = REPO / "recipes" / "torch_ddp" / "train.py"
TORCH_STEPS = ["--steps", "8"]  # the fault runs of TORCH_RECIPE and their shared baseline
MEGATRON_RECIPE = REPO / "recipes" / "megatron" / "pretrain_gpt.py"
DEEPSPEED_RECIPE = REPO / "recipes" / "deepspeed" / "train_tiny.py"
# what a job's workers and spares import before the script runs (the worker template imports it
# once per node, so its workers do not import it each on the same cores); the tests of spares
# that learn their imports pass preload=""
MEGATRON_PRELOAD = "fr_megatron.megatron.preload"
# DeepSpeed, and the module whose import compiles Muon with torch.compile (imported by the first
# deepspeed.initialize, ~2.6 s); megatron-core's parallel_state as well for ``--mpu megatron``
DEEPSPEED_PRELOAD = "deepspeed,deepspeed.runtime.zero.muon.muon_optimizer,fr_megatron.deepspeed"


def default_preload(script: Path, script_args: list[str]) -> str:
    """The --preload list of a job of ``script``: what its ranks import anyway."""
    if Path(script) == MEGATRON_RECIPE:
        return MEGATRON_PRELOAD
    if Path(script) == DEEPSPEED_RECIPE:
        args = list(script_args)
        mpu = args[args.index("--mpu") + 1] if "--mpu" in args else None
        return DEEPSPEED_PRELOAD + (",megatron.core.parallel_state" if mpu == "megatron" else "")
    return ""


def fork_ranks(tmp: Path, script: Path, argv: list[str], envs: list[dict], preload: list[str],
               timeout: float, env: dict | None = None) -> None:
    """Run one rank of ``script`` per entry of ``envs``, forked from a process that imported
    ``preload`` (``tests/forked_ranks.py``) with ``env`` added to its environment (what the
    imports read, such as ``DS_ACCELERATOR`` or ``OMP_NUM_THREADS``), each logging to
    ``tmp/rank<r>.log``. Fails the test with the first failed rank's log when one did not exit
    0 within ``timeout``."""
    tmp.mkdir(parents=True, exist_ok=True)
    logs = [tmp / f"rank{r}.log" for r in range(len(envs))]
    spec = tmp / "ranks.json"
    spec.write_text(json.dumps({"preload": preload, "script": str(script), "argv": argv,
                                "ranks": [{"env": env, "log": str(log)}
                                          for env, log in zip(envs, logs)]}))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "forked_ranks.py"),
                             str(spec)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[tests/jobs.py] ranks killed after their {timeout:.0f} s timeout"
    if proc.returncode != 0:
        try:
            codes = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            codes = []  # the forking process itself failed, or ran past the timeout
        failed = next((r for r, c in enumerate(codes) if c != 0), 0)
        log = logs[failed].read_text()[-4000:] if logs[failed].exists() else ""
        raise AssertionError(f"ranks exited with {codes or '?'}: {out[-2000:]}\n"
                             f"rank {failed}'s log:\n{log}")


@dataclass
class Job:
    rc: int
    output: str
    report: dict | None
    result: dict | None
    journal: list[dict]
    stacks: str = ""  # of every process of a job that ran past its timeout

    def failure(self, tail: int = 4000) -> str:
        """What a failing assertion shows: the log's tail, and where a hung job was stuck."""
        return self.output[-tail:] + ("\n" + self.stacks if self.stacks else "")


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port free on ``addr`` now, for a store or a launcher's controller."""
    with socket.socket() as sock:
        sock.bind((addr, 0))
        return sock.getsockname()[1]


def node_beat(host: str, port: int, token: bytes, node: int) -> dict:
    """The ranks' heartbeats in ``node``'s signed beat in the job's store (rank as a string ->
    beat); empty while the store or the beat does not exist yet."""
    from fr_megatron.protocol import keys
    from fr_megatron.protocol.auth import Signer
    from fr_megatron.protocol.store import connect

    try:
        store = connect(host, port, 5.0)
        if not store.check([keys.agent(node)]):
            return {}
    except ConnectionError:
        return {}  # the store is not up yet
    return Signer(token, "test").verify(store.get(keys.agent(node))).get("ranks", {})


def run_job(tmp: Path, script: Path, script_args: list[str], nproc: int = 4, spares: int = 1,
            inject: str | None = None, extra: list[str] = (), timeout: float = 240,
            env: dict | None = None, name: str = "job", wandb_dir: Path | None = None,
            preload: str | None = None) -> Job:
    """``preload``: the --preload list; by default ``default_preload``'s."""
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
    if preload is None:
        preload = default_preload(script, script_args)
    if preload:
        cmd += ["--preload", preload]
    cmd += [str(script), *script_args]
    if "--out" not in script_args:
        cmd += ["--out", str(out)]
    # own session so a timeout kills the launcher, its workers and spares, and the test still
    # gets the log of the job that hung
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **env}, start_new_session=True)
    stacks = ""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = _stacks(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[tests/jobs.py] job killed after its {timeout:.0f} s timeout\n"
    from fr_megatron.events import Journal

    return Job(proc.returncode, output,
               json.loads(report.read_text()) if report.exists() else None,
               torch.load(out, weights_only=False) if out.exists() else None,
               Journal.read(str(journal)) if journal.exists() else [], stacks)


def _stacks(pid: int) -> str:
    """Python stacks of a hung job's processes (py-spy), for the failure message."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        return "(install py-spy to see the stacks of a hung job)"
    out = []
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return ""
    for p in procs:
        try:
            dump = subprocess.run([spy, "dump", "--pid", str(p.pid)], capture_output=True,
                                  text=True, timeout=20)
            out.append(f"==== pid {p.pid} {' '.join(p.cmdline()[-4:])}\n{dump.stdout}{dump.stderr}")
        except (psutil.Error, subprocess.TimeoutExpired) as e:
            out.append(f"==== pid {p.pid}: {e}")
    return "\n".join(out)


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


# The plain torch recipe after a shrink (tests/test_shrink.py, test_node_loss.py): fp32 additions
# in another order change a step's gradient in its last bits (a few ulp, about 1e-7 relative), and
# Adam's normalised updates carry that on without growing it over a few steps (the runs differ by
# about 3e-8). One micro-batch of four dropped from step 4 on moves the parameters by 2e-2 and the
# loss by 0.1 by step 8: 1e-5 tells the two apart with margin on both sides.
TOLERANCE = 1e-5


def assert_same_samples_close_training(base: dict, shrunk: dict, first_shrunk_step: int) -> None:
    """Every step took each micro-batch of the global batch exactly once; the steps before the
    shrink are bit-identical to the fault-free run, and the ones after it within TOLERANCE."""
    total = len(base["taken"][1])
    for step, taken in shrunk["taken"].items():
        assert taken == [1.0] * total, f"step {step} took micro-batches {taken}"
    assert shrunk["losses"].keys() == base["losses"].keys()
    for step, loss in shrunk["losses"].items():
        if step < first_shrunk_step:
            assert loss == base["losses"][step], step
        else:
            assert abs(loss - base["losses"][step]) <= TOLERANCE, (step, loss, base["losses"])
    for k, p in shrunk["params"].items():
        assert (p - base["params"][k]).abs().max().item() <= TOLERANCE, k


def assert_stuck_survivors_recovered(stuck: list[dict], journal: list[dict]) -> set[int]:
    """Check the faults of survivors that the abort left inside a gloo operation (a message cut
    in the middle): each reports itself stuck and is recovered with no step lost. Under
    ``--shrink always`` its replica leaves with it, unless removing every replica of that
    generation's lost ranks would leave none whole: the controller then journals
    ``shrink_skipped`` and replaces them instead. Returns the job ranks replaced so."""
    skipped = {e["generation"] for e in journal if e["event"] == "shrink_skipped"}
    replaced = set()
    for f in stuck:
        assert (f["kind"], f["steps_lost"]) == ("stuck", 0), f
        if f["action"] == "replace":
            assert f["generation"] in skipped, (f, skipped)
            replaced.add(f["rank"])
        else:
            assert f["action"] == "shrink", f
    return replaced


def node_launcher(tmp: Path, port: int, node_rank: int, script: Path, script_args: list[str],
                  extra: list[str] = (), nproc: int = 4, spares: int = 1,
                  env: dict | None = None) -> subprocess.Popen:
    """A launcher of one node on this machine, with the job's controller at ``port`` on node 0,
    which logs to an offline wandb run in tmp."""
    preload = default_preload(script, script_args)
    cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nnodes", "1", "--node-rank",
           str(node_rank), "--nproc-per-node", str(nproc), "--controller", f"127.0.0.1:{port}",
           "--token-file", str(tmp / "token"), "--spares", str(spares), *extra,
           *(["--preload", preload] if preload else []), str(script), *script_args]
    wandb = {"enabled": node_rank == 0, "mode": "offline", "dir": str(tmp), "project": "fr-tests"}
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(tmp / f"node{node_rank}.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {}),
                                 "FR_CONFIG": json.dumps({"wandb": wandb})})


def shrink_then_grow(tmp: Path, script: Path, script_args: list[str], inject: str,
                     nproc: int = 4, spares: int = 1, env: dict | None = None
                     ) -> tuple[list[int], str]:
    """Node 0 runs the job with ``--shrink always`` and ``inject``; once it has recovered from
    the shrink, a spare node joins, and the job grows back. Returns the launchers' exit codes
    and the tails of their logs; the report and journal are ``tmp/report.json``,
    ``tmp/journal.jsonl``."""
    from fr_megatron.events import Journal
    from fr_megatron.protocol.auth import new_token, write_token_file

    write_token_file(str(tmp / "token"), new_token())
    port = free_port()
    journal = tmp / "journal.jsonl"
    nodes = [node_launcher(tmp, port, 0, script, script_args, nproc=nproc, spares=spares, extra=[
        "--shrink", "always", "--inject", inject, "--report", str(tmp / "report.json"),
        "--journal", str(journal)], env=env)]
    try:
        assert Journal.wait_for(str(journal), "recovered", 120,
                                lambda: nodes[0].poll() is None), "the shrink never recovered"
        nodes.append(node_launcher(tmp, port, 1, script, script_args, nproc=nproc,
                                   spares=spares, extra=["--spare-node"], env=env))
        rcs = [nodes[0].wait(240), nodes[1].wait(60)]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = "".join((tmp / f"node{n}.log").read_text()[-3000:] for n in range(len(nodes)))
    return rcs, logs

"""The control plane at 4,800 and 16,384 ranks: the real controller against simulated nodes.

Recovery at scale is only as fast as the one controller process: it reads every node's beat
(the agent's liveness with its ranks' newest heartbeats inside, ``protocol.node_beats``),
decides, and wakes every agent with one store key. No training job fits that scale here, so this
runs the real ``Controller`` (in this process, in its own threads, with the TCPStore it hosts on
loopback) against a few simulator processes that each play many nodes: per node one store
connection for the node beat (``NodeAgent._beat``: a signed ``agent_heartbeat`` with an
increasing ``seq`` and the 8 rank entries the agent relays) and one connection on which a thread
waits for the next plan exactly as the agent's ``_plan_watch`` does (``agent.watch_plan``: one
long ``wait`` on the generation's wake key, then ``get`` and ``verify``). One extra agent is a spare
node. The ranks' own beats to their agent stay on their node and are not simulated.

(a) heartbeat load: store requests/s and key writes/s the simulators send over a steady window,
    the beat interval they achieved, the time of one ``multi_get`` of every node beat key,
    the controller's real sweep (its ``multi_get`` calls are timed by wrapping its store client;
    sweep = time between two sweeps minus the loop's wait) and the CPU of this process (the
    controller's threads and the store server; the simulators run elsewhere).
(b) detection: one node's agent and ranks fall silent at T; T -> the controller's plan of
    generation 1 (``decided_t`` in the plan), whose faults must name that node's ranks
    ("node_lost"). Without the node-liveness protocol in the controller no plan comes: that is
    reported as "not detected" and the plan is triggered by signed "crash" fault events instead.
(c) propagation: plan ``decided_t`` -> the last live agent holding the verified plan.

Target (printed, never asserted): under 2 s from the fault to every agent on the new generation
at 16,384 ranks. Rank entries cycle through a ring built at start-up (changing ``seq`` and
step); node beats are signed when sent. Simulator threads share a GIL per process, so the
wake-up of many agents in one process is serialised a little; both the wake time and the
verified time are reported.

    python -m benchmarks.control_plane [--nodes 600,2048] [--quick] [--procs 4]
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # before torch loads (also in the children)

import argparse
import gc
import multiprocessing as mp
import queue
import resource
import secrets
import statistics
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from .common import RESULTS, table, write

NPROC = 8
TARGET_S = 2.0
HANG_TIMEOUT = 600.0  # in the rank heartbeats: the silent node must be found as a lost node
PHASES = ("forward", "backward", "grad_reduce", "optimizer")
RING = 4


def raise_nofile() -> dict:
    """Soft RLIMIT_NOFILE up to the hard limit; returns both before and after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return {"soft_before": soft, "hard": hard, "soft_after": resource.getrlimit(
        resource.RLIMIT_NOFILE)[0]}


# ---- simulator process ----------------------------------------------------------------------
class _Sim:
    """Many nodes in one process: one heartbeat thread for all, one plan watcher per node."""

    def __init__(self, wid: int, spec: dict, sh: dict, q):
        self.wid, self.spec, self.sh, self.q = wid, spec, sh, q
        self.nodes: list[int] = spec["nodes"]
        self.spare = set(spec["spare_nodes"])
        self.lock = threading.Lock()
        self.watch_req = 0
        self.seen: list[tuple] = []
        self.errors: list[str] = []

    def dead(self, node: int) -> bool:
        return node == self.sh["stop_node"].value and time.time() >= self.sh["stop_t"].value

    def run(self):
        from fr_megatron.protocol import keys
        from fr_megatron.protocol.auth import Signer
        from fr_megatron.protocol.store import connect

        lim = raise_nofile()
        threading.stack_size(512 * 1024)
        s, token = self.spec, self.spec["token"].encode()  # as read_token() gives it
        t0 = time.time()
        with ThreadPoolExecutor(s["connect_threads"]) as ex:
            hb = list(ex.map(lambda _: connect(s["host"], s["port"], 120.0), self.nodes))
            watch = list(ex.map(lambda _: connect(s["host"], s["port"], 120.0), self.nodes))
        connect_s = time.time() - t0
        # ranks: a ring of RING entries each, as the agent relays them; agents sign live
        t1 = time.time()
        ring = []
        for node in self.nodes:
            ranks = [] if node in self.spare else list(range(node * NPROC, (node + 1) * NPROC))
            ring.append([{str(r): _rank_entry(r, k, s["interval"]) for r in ranks}
                         for k in range(RING)])
        agents = [Signer(token, f"agent{n}") for n in self.nodes]
        self.q.put(("ready", self.wid, {"connect_s": connect_s, "sign_ring_s": time.time() - t1,
                                        "nofile": lim, "pid": os.getpid()}))
        watchers = [threading.Thread(target=self.watch, args=(n, w, Signer(token, "x"), keys),
                                     daemon=True) for n, w in zip(self.nodes, watch)]
        for t in watchers:
            t.start()
        pid = os.getpid()
        for n, c, sg in zip(self.nodes, hb, agents):  # as NodeAgent.run does before its beats
            c.queue_push(keys.EVENTS, sg.sign("agent_started", node=n, spare=n in self.spare,
                                              pid=pid))
        self.beat(hb, ring, agents, keys, pid)
        until = time.time() + 3.0  # watchers still in their long wait are daemons: let them be
        for t in watchers:
            t.join(max(0.0, until - time.time()))
        with self.lock:
            self.q.put(("done", self.wid, {"seen": list(self.seen), "errors": self.errors[:5]}))

    def beat(self, hb, ring, agents, keys, pid):
        """``NodeAgent._beat``: one signed node beat with the node's rank entries in it."""
        s, sh, w = self.spec, self.sh, self.wid
        interval, n = s["interval"], len(self.nodes)
        req = writes = late = k = 0
        base = time.time()
        while not sh["shutdown"].value:
            start = base + k * interval
            for i, node in enumerate(self.nodes):
                d = start + i * interval / n - time.time()
                if d > 0:
                    time.sleep(d)
                if sh["shutdown"].value:
                    break
                if self.dead(node):
                    continue
                try:
                    hb[i].set(keys.agent(node), agents[i].sign(
                        "agent_heartbeat", node=node, seq=k + 1, pid=pid,
                        spare=node in self.spare, ranks=ring[i][k % RING]))
                    req, writes = req + 1, writes + 1
                except Exception as e:  # the store went away: the benchmark is ending
                    self.errors.append(f"beat node {node}: {e}")
                    sh["shutdown"].value = 1
                    break
            k += 1
            behind = time.time() - (base + k * interval)
            if behind > interval:  # a whole interval late: go on from now, do not burst
                late += 1
                base += behind
            sh["hb_req"][w], sh["key_writes"][w], sh["rounds"][w] = req, writes, k
            sh["late"][w] = late
            with self.lock:
                sh["watch_req"][w] = self.watch_req

    def watch(self, node, client, signer, keys):
        """The agent's ``_plan_watch``: its own turn (``agent.watch_plan``), then verify."""
        from fr_megatron.launcher.agent import watch_plan

        g = 1
        while not self.sh["shutdown"].value and not self.dead(node):
            try:
                raw = watch_plan(client, g)
                t_wake = time.time()
                if self.dead(node):
                    return  # a lost node's agent sees nothing
                nreq = 2  # the wait and its cancel, or the wait and the get
                done = False
                if raw is not None:
                    body = signer.verify(raw)
                    done = body["kind"] == "done"
                    if not done:
                        t_seen = time.time()
                        with self.lock:
                            self.seen.append((node, g, t_wake, t_seen, body.get("decided_t")))
                            self.sh["seen"][self.wid] += 1
                        g += 1
                with self.lock:
                    self.watch_req += nreq
                if done:
                    return
            except Exception as e:
                if not self.sh["shutdown"].value:
                    with self.lock:
                        self.errors.append(f"watch node {node}: {e}")
                return


def _rank_entry(rank: int, k: int, interval: float) -> dict:
    """What the agent relays of a rank's beat (``node_beats.rank_entry`` of what
    ``Heartbeat.beat`` sends with ``Session._status``): step k, a training phase."""
    return {"rank": rank, "pid": 100000 + rank, "seq": k + 1, "hb_interval": interval,
            "generation": 0, "step": k, "phase": PHASES[k % len(PHASES)], "state": "running",
            "committed": k - 1, "inject_t": None, "hang_timeout": HANG_TIMEOUT}


def _sim_main(wid, spec, sh, q):
    # the simulators stand in for thousands of other machines: on a shared few cores they must
    # not take the CPU the controller would have on its own host
    os.nice(spec.get("nice", 0))
    try:
        _Sim(wid, spec, sh, q).run()
    except BaseException:
        q.put(("error", wid, traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()
        os._exit(0)  # daemon threads inside a C++ store call must not run interpreter teardown


# ---- the controller side --------------------------------------------------------------------
class _TimedClient:
    """The controller's store client, with every ``multi_get`` timed (start, seconds, keys)."""

    def __init__(self, inner, log: list):
        self._inner, self._log = inner, log

    def multi_get(self, ks):
        t0, p0 = time.time(), time.perf_counter()
        v = self._inner.multi_get(ks)
        self._log.append((t0, time.perf_counter() - p0, len(ks)))
        return v

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _wait(pred, deadline: float, step: float = 0.05) -> bool:
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def _cpu_threads(proc) -> dict:
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def run_scale(nodes: int, *, procs: int = 2, interval: float | None = None,
              node_timeout: float | None = None, window: float = 5.0, spares: int = 1,
              connect_threads: int = 64, sim_nice: int = 0, say=print) -> dict:
    """One scale: controller + simulators, (a) window, (b) node loss, (c) propagation."""
    import psutil

    from fr_megatron.config import FlashRecoveryConfig
    from fr_megatron.launcher import controller as ctl_mod
    from fr_megatron.protocol import keys
    from fr_megatron.protocol.auth import Signer
    from fr_megatron.protocol.store import connect, wait_key

    world = nodes * NPROC
    nofile = raise_nofile()
    fields = FlashRecoveryConfig.model_fields
    has_liveness = "node_timeout" in fields
    cfg_kw = {"wandb": {"enabled": False}, "journal": None}
    if interval is not None:
        cfg_kw["heartbeat_interval"] = interval
    if node_timeout is not None and has_liveness:
        cfg_kw["node_timeout"] = node_timeout
    cfg = FlashRecoveryConfig(**cfg_kw)
    interval = cfg.heartbeat_interval
    node_timeout = getattr(cfg, "node_timeout", None)
    loop_wait = max(0.02, interval / 4)  # Controller._heartbeat_loop's wait between sweeps
    token = secrets.token_hex(32)
    row: dict = {"nodes": nodes, "ranks": world, "spare_nodes": spares, "interval_s": interval,
                 "node_timeout_s": node_timeout, "procs": procs,
                 "load_before": list(os.getloadavg())}
    proc = psutil.Process()
    t_scale = time.time()

    mg_log: list = []
    real_connect = ctl_mod.connect
    ctl_mod.connect = lambda h, p, timeout=30.0: _TimedClient(real_connect(h, p, timeout), mg_log)
    ctl = serve_t = None
    workers: list = []
    ctx = mp.get_context("spawn")
    sh = {"stop_node": ctx.Value("i", -1, lock=False), "stop_t": ctx.Value("d", 0.0, lock=False),
          "shutdown": ctx.Value("i", 0, lock=False)}
    for name in ("hb_req", "key_writes", "rounds", "late", "watch_req", "seen"):
        sh[name] = ctx.Array("q", procs, lock=False)
    q = ctx.Queue()
    try:
        ctl = ctl_mod.Controller(world, nodes, NPROC, "127.0.0.1", 0, token.encode(), cfg)
        serve_t = threading.Thread(target=ctl.serve, name="fr-serve", daemon=True)
        serve_t.start()
        all_nodes = list(range(nodes + spares))
        spare_nodes = all_nodes[nodes:]
        share = [all_nodes[i::procs] for i in range(procs)]
        for wid in range(procs):
            spec = {"host": ctl.host, "port": ctl.port, "token": token, "nodes": share[wid],
                    "spare_nodes": [n for n in share[wid] if n in spare_nodes],
                    "interval": interval, "nice": sim_nice,
                    "connect_threads": connect_threads}
            p = ctx.Process(target=_sim_main, args=(wid, spec, sh, q), daemon=True)
            p.start()
            workers.append(p)
        conns = 2 * len(all_nodes)
        say(f"[control_plane] {nodes} nodes x {NPROC} = {world} ranks (+{spares} spare node): "
            f"{procs} simulator processes opening {conns} store connections ...")
        infos, msgs = {}, {}
        deadline = time.time() + 120 + 0.05 * conns

        def pump(until: float, want: str, n: int) -> None:
            while len(msgs.get(want, {})) < n and time.time() < until:
                try:
                    kind, wid, body = q.get(timeout=0.2)
                except queue.Empty:
                    if not all(p.is_alive() for p in workers) and want != "done":
                        raise RuntimeError("a simulator process died")
                    continue
                if kind == "error":
                    raise RuntimeError(f"simulator {wid} failed:\n{body}")
                msgs.setdefault(kind, {})[wid] = body

        pump(deadline, "ready", procs)
        if len(msgs.get("ready", {})) < procs:
            raise RuntimeError("simulators did not connect in time")
        infos = msgs["ready"]
        row["connect_s"] = round(max(i["connect_s"] for i in infos.values()), 2)
        row["nofile"] = {"controller": nofile, "simulators": infos[0]["nofile"]}
        say(f"[control_plane] {nodes} nodes: connected in {row['connect_s']} s "
            f"(+{time.time() - t_scale - row['connect_s']:.1f} s start-up); warming up ...")

        # warm-up: every key written, every agent registered, two full controller sweeps
        me = connect(ctl.host, ctl.port, 60.0)
        ag_keys = [keys.agent(n) for n in all_nodes]
        agents = getattr(ctl, "agents", None)
        full_sweep = len(all_nodes)  # keys in one sweep: one node beat per node

        def warm():
            full = [e for e in mg_log if e[2] == full_sweep]
            return (me.check(ag_keys) and len(full) >= 2
                    and (agents is None or len(agents) == len(all_nodes)))

        if not _wait(warm, time.time() + 60 + world / 500, 0.2):
            raise RuntimeError(
                "the controller did not see every node in time: node keys "
                f"{me.check(ag_keys)}, full sweeps "
                f"{sum(e[2] == full_sweep for e in mg_log)}, agents registered "
                f"{None if agents is None else len(agents)}/{len(all_nodes)}; journal tail "
                f"{ctl.journal.records[-3:]}")
        time.sleep(2 * interval)

        # (a) steady window
        say(f"[control_plane] {nodes} nodes: steady window of {window:.0f} s ...")
        ids = {t.name: t.native_id for t in threading.enumerate()}

        def counters():
            return {k: sum(sh[k]) for k in ("hb_req", "key_writes", "watch_req")}

        sims = [psutil.Process(i["pid"]) for i in infos.values()]

        def sim_cpu():
            return sum(sum(p.cpu_times()[:2]) for p in sims)

        c0, r0, th0, s0 = counters(), list(sh["rounds"]), _cpu_threads(proc), sim_cpu()
        cpu0, w0 = proc.cpu_times(), time.time()
        n_log0 = len(mg_log)
        time.sleep(window)
        # a slow controller: go on until three of its sweeps fall in the window
        _wait(lambda: sum(1 for e in mg_log[n_log0:] if e[2] == full_sweep) >= 3,
              w0 + window + 45.0, 0.1)
        cpu1, w1 = proc.cpu_times(), time.time()
        c1, r1, th1, s1 = counters(), list(sh["rounds"]), _cpu_threads(proc), sim_cpu()
        span = w1 - w0
        row["window_s"] = round(span, 1)
        row["sim_cpu_pct"] = round(100.0 * (s1 - s0) / span, 1)
        pct = lambda s: round(100.0 * s / span, 1)  # noqa: E731
        row["hb_req_per_s"] = round((c1["hb_req"] - c0["hb_req"]) / span, 1)
        row["key_writes_per_s"] = round((c1["key_writes"] - c0["key_writes"]) / span, 1)
        row["watch_req_per_s"] = round((c1["watch_req"] - c0["watch_req"]) / span, 1)
        rounds = [b - a for a, b in zip(r0, r1)]
        row["beat_interval_achieved_s"] = round(span / max(min(rounds), 1), 3)
        row["late_rounds"] = int(sum(sh["late"]))
        row["ctl_cpu_pct"] = pct(cpu1.user + cpu1.system - cpu0.user - cpu0.system)
        by = {}
        for name, tid in (("heartbeat_loop", ids.get("fr-heartbeats")),
                          ("events_loop", ids.get("fr-events")), ("serve", ids.get("fr-serve"))):
            if tid in th0 and tid in th1:
                by[name] = pct(th1[tid] - th0[tid])
        own = {ids.get(n) for n in ("fr-heartbeats", "fr-events", "fr-serve")}
        by["store_server_and_other"] = pct(sum(v - th0.get(t, 0.0) for t, v in th1.items()
                                               if t not in own))
        row["ctl_cpu_by_thread_pct"] = by
        hb_tid = ids.get("fr-heartbeats")
        hb_cpu = th1.get(hb_tid, 0.0) - th0.get(hb_tid, 0.0)
        sweeps = [e for e in mg_log[n_log0:] if e[2] == full_sweep and w0 <= e[0] <= w1]
        periods = [b[0] - a[0] for a, b in zip(sweeps, sweeps[1:])]
        row["ctl_multi_get_ms"] = round(1e3 * statistics.median(e[1] for e in sweeps), 2) \
            if sweeps else None
        row["sweep_period_s"] = round(statistics.median(periods), 3) if periods else None
        row["sweep_ms"] = round(1e3 * (statistics.median(periods) - loop_wait), 1) \
            if periods else None
        row["sweep_max_ms"] = round(1e3 * (max(periods) - loop_wait), 1) if periods else None
        row["keeps_up"] = bool(periods) and statistics.median(periods) <= interval
        # CPU the heartbeat thread spent per sweep: the work itself, whatever else the machine
        # runs (a loaded machine stretches the wall-clock sweep, not this)
        row["sweep_cpu_ms"] = round(1e3 * hb_cpu / len(sweeps), 1) if sweeps else None
        # one multi_get of every node beat from a client of our own, and the verify work the
        # controller does on the values when all changed (timed here, while it runs)
        times, vt = [], []
        checker = Signer(token.encode(), "bench")
        for _ in range(3):
            p0 = time.perf_counter()
            vals = me.multi_get(ag_keys)
            times.append(time.perf_counter() - p0)
        p0 = time.perf_counter()
        for v in vals:
            checker.verify(v)
        vt.append(time.perf_counter() - p0)
        row["multi_get_ms"] = round(1e3 * statistics.median(times), 2)
        row["verify_all_ms"] = round(1e3 * vt[0], 1)
        say(f"[control_plane] {nodes} nodes: {row['hb_req_per_s']:.0f} heartbeat req/s "
            f"({row['key_writes_per_s']:.0f} key writes/s), sweep {row['sweep_ms']} ms, "
            f"controller CPU {row['ctl_cpu_pct']} %")

        # (b) one node falls silent
        lost = nodes // 2
        lost_ranks = list(range(lost * NPROC, (lost + 1) * NPROC))
        T = time.time() + 0.05
        sh["stop_t"].value = T
        sh["stop_node"].value = lost
        row["lost_node"] = lost
        # the controller notices the silence at a sweep and decides after the next: allow three
        # of its sweeps (as slow as they were up to now) beyond the node timeout
        full = [e[0] for e in mg_log if e[2] == full_sweep][-6:]
        period = max((b - a for a, b in zip(full, full[1:])), default=window)
        budget = min((node_timeout or 3.0) + 3 * max(period, interval) + 5, 120.0)
        say(f"[control_plane] {nodes} nodes: node {lost} silent at T; waiting up to "
            f"{budget:.1f} s for the plan (node_timeout {node_timeout}) ...")
        detected = wait_key(me, keys.plan(1), budget)
        row["trigger"] = "node_lost" if detected else "fault events (fallback)"
        if not detected:
            row["detect_s"] = None
            say(f"[control_plane] {nodes} nodes: not detected in {budget:.1f} s; "
                "pushing signed crash fault events to open generation 1")
            for r in lost_ranks:
                me.queue_push(keys.EVENTS, Signer(token.encode(), f"agent{lost}").sign(
                    "fault", rank=r, pid=100000 + r, fault="crash", fault_t=time.time(),
                    node=lost, generation=0, step=0, phase="forward"))
            if not wait_key(me, keys.plan(1), 30.0):
                raise RuntimeError("no plan for generation 1 even after fault events")
        plan = checker.verify(me.get(keys.plan(1)))
        decided = float(plan["decided_t"])
        named = sorted(f["rank"] for f in plan.get("faults", []))
        kinds = sorted({f.get("kind") for f in plan.get("faults", [])})
        row["plan_fault_ranks"] = named
        row["plan_fault_kinds"] = kinds
        row["plan_names_lost_ranks"] = set(lost_ranks) <= set(named)
        if detected:
            row["detect_s"] = round(decided - T, 3)

        # (c) every live agent holds the plan
        expect = len(all_nodes) - 1
        _wait(lambda: sum(sh["seen"]) >= expect, time.time() + 30.0, 0.02)
        sh["shutdown"].value = 1
        pump(time.time() + 15.0, "done", procs)
        seen = [s for body in msgs.get("done", {}).values() for s in body["seen"] if s[1] == 1]
        row["sim_errors"] = [e for body in msgs.get("done", {}).values() for e in body["errors"]]
        row["agents_expected"] = expect
        row["agents_saw_plan"] = len({s[0] for s in seen if s[0] != lost})
        if seen:
            row["see_plan_wake_s"] = round(max(s[2] for s in seen) - decided, 3)
            row["see_plan_s"] = round(max(s[3] for s in seen) - decided, 3)
            row["see_plan_p50_s"] = round(statistics.median(s[3] for s in seen) - decided, 3)
        else:
            row["see_plan_wake_s"] = row["see_plan_s"] = row["see_plan_p50_s"] = None
        complete = row["agents_saw_plan"] == expect and seen
        row["fault_to_all_s"] = round(row["detect_s"] + row["see_plan_s"], 3) \
            if detected and complete else None
        row["target_s"] = TARGET_S
        row["met"] = None if row["fault_to_all_s"] is None else row["fault_to_all_s"] < TARGET_S
        say(f"[control_plane] {nodes} nodes: plan of generation 1 by {row['trigger']}, detect "
            f"{row['detect_s']} s, last agent {row['see_plan_s']} s after the decision "
            f"({row['agents_saw_plan']}/{expect} agents)")
    finally:
        sh["shutdown"].value = 1
        for p in workers:
            p.join(10.0)
            if p.is_alive():
                p.terminate()
                p.join(5.0)
        ctl_mod.connect = real_connect
        if ctl is not None:
            _stop_controller(ctl, serve_t)
        del ctl
        gc.collect()
    row["load_after"] = list(os.getloadavg())
    row["scale_wall_s"] = round(time.time() - t_scale, 1)
    return row


def _stop_controller(ctl, serve_t) -> None:
    """Stop the controller and let its threads end (its events thread waits in queue_pop)."""
    from fr_megatron.protocol import keys
    from fr_megatron.protocol.store import connect

    ctl.stop()
    if serve_t is not None:
        serve_t.join(10.0)
    try:
        connect(ctl.host, ctl.port, 5.0).queue_push(keys.EVENTS, b"{}")  # wakes queue_pop
    except Exception:
        pass
    for t in threading.enumerate():
        if t.name in ("fr-events", "fr-heartbeats"):
            t.join(5.0)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["ranks"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    a = ax[0][0]
    a.plot(x, [r["hb_req_per_s"] for r in rows], "o-", label="heartbeat requests/s")
    a.plot(x, [r["key_writes_per_s"] for r in rows], "s-", label="heartbeat key writes/s")
    a.plot(x, [r["watch_req_per_s"] for r in rows], "^-", label="plan-watch requests/s")
    a.set_title("(a) store load from the simulated nodes")
    a = ax[0][1]
    a.plot(x, [r["sweep_ms"] for r in rows], "o-", label="controller sweep (ms)")
    a.plot(x, [r["multi_get_ms"] for r in rows], "s-", label="multi_get of all node beats (ms)")
    a.plot(x, [r["sweep_cpu_ms"] for r in rows], "^-", label="CPU per sweep (ms)")
    a.axhline(1e3 * rows[0]["interval_s"], color="grey", ls="--", label="heartbeat interval")
    a.set_title("(a) controller heartbeat sweep")
    a = ax[1][0]
    a.plot(x, [r["ctl_cpu_pct"] for r in rows], "o-", label="controller process CPU %")
    a.plot(x, [r["sim_cpu_pct"] for r in rows], "s-", label="simulator processes CPU %")
    a.axhline(100, color="grey", ls="--", label="one core")
    a.set_title("(a) CPU (controller: its threads and the store server)")
    a = ax[1][1]
    for key, lab in (("detect_s", "fault -> plan (detect)"),
                     ("see_plan_s", "plan -> last agent"), ("fault_to_all_s", "fault -> all")):
        a.plot(x, [r.get(key) if r.get(key) is not None else float("nan") for r in rows], "o-",
               label=lab)
    a.axhline(TARGET_S, color="red", ls="--", label=f"target {TARGET_S:.0f} s")
    a.set_title("(b)/(c) node loss to every agent on the new generation (s)")
    for a in ax.flat:
        a.set_xscale("log")
        a.set_xlabel("ranks")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.suptitle("fr_megatron control plane vs simulated ranks (loopback, %d CPUs, 1-min load "
                 "%s)" % (os.cpu_count(), ", ".join(f"{r['load_before'][0]:.0f}" for r in rows)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLS = ["scale", "ranks", "hb_req_per_s", "key_writes_per_s", "beat_interval_achieved_s",
        "multi_get_ms", "sweep_ms", "sweep_cpu_ms", "keeps_up", "ctl_cpu_pct", "sim_cpu_pct",
        "detect_s", "see_plan_s", "fault_to_all_s", "target_s", "met", "load_1m"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", default="600,2048", help="node counts (8 ranks per node)")
    p.add_argument("--quick", action="store_true", help="64 and 256 nodes, short windows")
    p.add_argument("--procs", type=int, default=None, help="simulator processes (default 2, 4 "
                                                           "from 1,000 nodes on)")
    p.add_argument("--window", type=float, default=None, help="steady window, s (default 6; 3 "
                                                              "with --quick)")
    p.add_argument("--interval", type=float, default=None,
                   help="heartbeat interval, s (default: the config default)")
    p.add_argument("--node-timeout", type=float, default=None,
                   help="the controller's node timeout, s (default: the config default)")
    p.add_argument("--sim-nice", type=int, default=0,
                   help="niceness of the simulator processes, which play remote machines (on 2 "
                        "cores, 10 starved their own beats and nodes were declared lost)")
    p.add_argument("--spares", type=int, default=1, help="spare nodes (the lost node's ranks go "
                                                         "to one)")
    a = p.parse_args(argv)
    nodes = [64, 256] if a.quick and a.nodes == p.get_default("nodes") else \
        [int(n) for n in a.nodes.split(",") if n.strip()]
    if not nodes or min(nodes) < 2:
        p.error("--nodes: give node counts of at least 2, e.g. 600,2048")
    window = a.window or (3.0 if a.quick else 6.0)
    t0 = time.time()
    rows = []
    for n in nodes:
        procs = a.procs or (2 if n < 1000 else 4)
        row = run_scale(n, procs=procs, interval=a.interval, node_timeout=a.node_timeout,
                        window=window, spares=a.spares, sim_nice=a.sim_nice,
                        say=lambda s: print(s, flush=True))
        row["scale"] = f"{n} x {NPROC}"
        row["load_1m"] = round(row["load_before"][0], 1)
        rows.append(row)
    print(f"\nControl plane vs simulated nodes ({os.cpu_count()} CPUs, loopback; heartbeat "
          f"interval {rows[0]['interval_s']} s, node timeout {rows[0]['node_timeout_s']} s)\n")
    print(table(rows, COLS))
    for r in rows:
        verdict = "n/a (not detected)" if r["fault_to_all_s"] is None else \
            ("met" if r["met"] else "not met")
        print(f"- {r['ranks']} ranks: fault -> every agent {r['fault_to_all_s']} s "
              f"(target < {TARGET_S} s at 16,384 ranks: {verdict}); plan by {r['trigger']}, "
              f"names the lost node's ranks: {r['plan_names_lost_ranks']}; "
              f"{r['agents_saw_plan']}/{r['agents_expected']} agents saw it; load "
              f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "control_plane.png"
    plot(rows, png)
    path = write("control_plane", {
        "config": {"nodes": nodes, "nproc_per_node": NPROC, "window_s": window,
                   "quick": a.quick, "ring": RING, "sim_nice": a.sim_nice,
                   "spares": a.spares, "hang_timeout_in_beats_s": HANG_TIMEOUT},
        "targets": {"fault_to_all_agents_s": TARGET_S, "at_ranks": 16384},
        "columns": COLS, "rows": rows, "plot": str(png.name),
        "wall_s": round(time.time() - t0, 1)})
    print(f"\nwrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

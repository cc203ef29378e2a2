"""The store key layout of a job: the one place that names every key.

The controller hosts a TCPStore that outlives every rank. Control traffic uses the ``fr/``
namespace; each generation's process groups rendezvous under their own prefix ``gen{g}/``,
because gloo cannot reuse a prefix once a peer of it has died.
"""

EVENTS = "fr/events"                 # queue: agents and workers -> controller (signed messages)
GENERATION = "fr/generation"         # the current generation, a signed plan summary


def plan(generation: int) -> str:
    """Signed plan that opens ``generation``; ranks and agents wait on this key."""
    return f"fr/plan/{generation}"


def agent_wake(generation: int) -> str:
    """What an agent waits on: the signed plan of ``generation``, or the signed ``done`` when the
    job ends first. One key for both lets an idle agent block in one long wait instead of
    polling for the end, which at thousands of nodes would be most of the store's load."""
    return f"fr/agent_wake/{generation}"


def agent(node: int) -> str:
    """The node's beat: its agent's liveness and its ranks' newest heartbeats
    (``protocol.node_beats``); the only heartbeat key a node writes."""
    return f"fr/agent/{node}"


def finished(rank: int) -> str:
    """Set by ``rank`` when it has trained its last step: its exit is its end, not a fault."""
    return f"fr/finished/{rank}"


def injection_fired(index: int) -> str:
    return f"fr/inject/fired/{index}"


def generation_prefix(generation: int) -> str:
    """Prefix of the process-group rendezvous of ``generation``."""
    return f"gen{generation}/"


def startup_record(rank: int) -> str:
    """What ``rank``'s start-up collectives returned (``runtime.startup_calls``), pickled."""
    return f"fr/startup/{rank}"


def startup_digest(rank: int) -> str:
    """Signed SHA-256 of ``startup_record(rank)``: a replacement verifies it before unpickling."""
    return f"fr/startup/{rank}/digest"


MODULES = "fr/modules"               # what rank 0 had imported once training started (zlib JSON)
MODULES_DIGEST = "fr/modules/digest"  # signed SHA-256 of MODULES: an agent checks it before use

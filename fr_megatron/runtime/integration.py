"""The contract between the framework-agnostic runtime and one training framework.

The runtime never imports Megatron-core or DeepSpeed. Everything it must know about the
training state and the framework's communicator groups goes through an ``Integration``:
what state a rank holds (and which part of it has a replica on data-parallel peers), how to
drop the framework's groups before the world is torn down, and how to rebuild them on the new
generation's default group with the same topology, rebinding every cached reference.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch


@dataclass
class RankState:
    """A rank's training state, split by where a copy of it can be found.

    ``replicated``: tensors that are bit-identical on every rank of ``Integration.replica_ranks()``
    (parameters under data parallelism, a non-sharded optimizer's moments). A replacement takes
    them from a live replica.

    ``unique``: tensors that no data-parallel replica holds (distributed-optimizer / ZeRO shards
    of fp32 master weights and moments, and the parameter shards such an optimizer updates).
    Only ``Integration.shard_replica_ranks()`` hold them too (optimizer instances: redundancy by
    computation); where none is in another failure domain, they are copied to a peer there
    (``runtime.failure_domains``).

    ``meta``: small picklable values (RNG states, LR scheduler, loss scaler, counters, data
    position). Treated as unique.

    Tensors are the live ones (no copies): the runtime copies them into its own buffers and
    ``Integration.restore`` copies values back in place, so references held elsewhere stay valid.
    """

    replicated: dict[str, torch.Tensor] = field(default_factory=dict)
    unique: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Integration(abc.ABC):
    """One training framework, as the runtime sees it."""

    name: str = "integration"
    # whether the job can go on with fewer data-parallel replicas (a shrink): its state is
    # then re-partitioned over the ranks left, and its data split over them (``batch_split``)
    shrinkable: bool = False
    # what a job of this integration needs to be shrinkable, named when it is not
    shrink_needs: str = ""

    @abc.abstractmethod
    def replica_ranks(self) -> list[int]:
        """Global ranks (this one included) whose ``RankState.replicated`` equals this rank's."""

    def shard_replica_ranks(self) -> list[int]:
        """Global ranks (this one included) whose ``RankState.unique`` equals this rank's because
        they compute the same update (megatron-core's distributed-optimizer instances)."""
        import torch.distributed as dist

        return [dist.get_rank()]

    @abc.abstractmethod
    def capture(self) -> RankState:
        """The live state of this rank (tensors not copied)."""

    @abc.abstractmethod
    def restore(self, state: RankState) -> None:
        """Copy ``state`` into the live state in place (same names and shapes as ``capture``).
        Every rank restores at the same time, so it may run collectives (re-assembling what
        ``capture`` left out because peers hold it)."""

    def shard_layout(self):
        """What range of which parameter each ``unique`` tensor holds (``reshard.ShardLayout``),
        for a job whose partition of that state depends on the data-parallel size; None when it
        does not. With a layout, ``restore(state, old_shards=...)`` takes the unique state from
        the shards of another partition after a shrink or grow."""
        return None

    def left_out_bytes(self) -> int:
        """Bytes of this rank's training state that ``capture`` leaves out because ``restore``
        rebuilds them from peers (parameters a distributed optimizer all-gathers): with what
        ``capture`` holds, the rank's whole state, the yardstick for the runtime's memory."""
        return 0

    def teardown(self) -> None:
        """Forget the framework's groups; called before the runtime destroys the old world."""

    def rebuild(self) -> None:
        """Recreate the framework's groups on the new default group and rebind cached references."""

    def old_group_references(self, old_groups: list[Any]) -> int:
        """How many references to ``old_groups`` the framework's objects still hold (must be 0)."""
        return 0

    def install_phase_marks(self, mark) -> None:
        """Mark phases inside the framework's own step with ``mark(name)`` (e.g. where it reduces
        gradients); called once by ``Session.attach``."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers whose ``step`` is the first thing of a training step to change
        the captured state: the runtime waits there (a step pre-hook) until the last commit's
        snapshot, still being copied in the background, is sealed."""
        return []

    def group_kinds(self) -> dict[str, list[Any]]:
        """This generation's groups by kind (``inject.GROUP_KINDS``: "tp", "dp", ...), for
        injections at the nth operation on a group of a kind; kinds the framework does not have
        are left out (the runtime adds "world")."""
        return {}

    def load_checkpoint(self, directory: str) -> Optional[int]:
        """Load the framework's latest disk checkpoint in ``directory`` (every rank calls it, on
        the new world); the step loaded, or None when there is none or the framework has no
        checkpoint format. The fallback when a rank's state is lost with every copy of it."""
        return None


def resized_to(built_for: Optional[int], now: Optional[int], resize, what: str) -> Optional[int]:
    """The data-parallel size ``now`` when a job built for ``built_for`` must build ``what``
    again for it (a shrink or a grow), None when the size did not change; an error when the
    job gave no ``resize`` to do it with."""
    if now == built_for:
        return None
    if resize is None:
        raise RuntimeError(f"the data-parallel size changed from {built_for} to {now}, and the "
                           f"job gave no way to build {what} again")
    return now


def check_shrink_policy(policy: str, integration) -> None:
    """``shrink: always`` is refused at start-up for a job that cannot shrink: its ranks would
    be replaced after all, against what the setting says."""
    from ..config import ConfigError

    if policy == "always" and not integration.shrinkable:
        needs = integration.shrink_needs
        raise ConfigError(
            f"shrink: 'always' removes a lost rank's data-parallel replica instead of replacing "
            f"it, and this job of the {integration.name} integration cannot re-partition its "
            "state over fewer replicas" + (f" without {needs}" if needs else "") + "; use "
            "'no-spare' (the default: such a job stops when no replacement can be placed) or "
            "'never'")


class TorchIntegration(Integration):
    """Plain torch.distributed: a module and an optimizer, replicated on every rank.

    DistributedDataParallel binds its process group at construction, so the integration owns
    the wrapper: ``model`` is rebuilt on every new generation and training code must use
    ``integration.model`` rather than keep its own reference to the wrapper.
    """

    name = "torch"
    shrinkable = True  # every rank holds the whole state: a shrink re-partitions nothing

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 extra_state=None, ddp: bool = True, **ddp_kwargs):
        self.module = module
        self.optimizer = optimizer
        self.extra_state = extra_state  # object with state_dict()/load_state_dict(), e.g. a scheduler
        self.ddp, self.ddp_kwargs = ddp, ddp_kwargs
        self.model = self._wrap()

    def _wrap(self):
        if not self.ddp:
            return self.module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(self.module, **self.ddp_kwargs)

    def replica_ranks(self) -> list[int]:
        import torch.distributed as dist

        return list(range(dist.get_world_size()))

    def rebuild(self) -> None:
        self.model = self._wrap()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def teardown(self) -> None:
        self.model = None

    def old_group_references(self, old_groups) -> int:
        pg = getattr(self.model, "process_group", None)
        return sum(pg is g for g in old_groups)

    def capture(self) -> RankState:
        state = RankState()
        for name, p in self.module.named_parameters():
            state.replicated[f"param/{name}"] = p.data
        for i, st in enumerate(self._opt_states()):
            for k, v in st.items():
                if torch.is_tensor(v):
                    state.replicated[f"optim/{i}/{k}"] = v
        if self.extra_state is not None:
            state.meta["extra"] = self.extra_state.state_dict()
        return state

    def restore(self, state: RankState) -> None:
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.data.copy_(state.replicated[f"param/{name}"])
            for i, st in enumerate(self._opt_states()):
                prefix = f"optim/{i}/"
                saved = {k[len(prefix):]: v for k, v in state.replicated.items()
                         if k.startswith(prefix)}
                if not saved:
                    st.clear()  # the recovery point precedes this parameter's first update
                for k, v in saved.items():
                    if torch.is_tensor(st.get(k)) and st[k].shape == v.shape:
                        st[k].copy_(v)
                    else:
                        st[k] = v.clone()
        if self.extra_state is not None and "extra" in state.meta:
            self.extra_state.load_state_dict(state.meta["extra"])

    def _opt_states(self):
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return [self.optimizer.state[p] for p in params]

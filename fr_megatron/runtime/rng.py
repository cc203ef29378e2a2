"""A process's random number generators, taken and put back as one record.

Python's ``random``, NumPy's global generator, torch's CPU generator and the current CUDA
device's. The keys are Megatron-LM's checkpoint names (its ``get_rng_state``), so a disk
checkpoint and the runtime's snapshots carry the same record. A framework's own generators
(megatron-core's RNG tracker) are its integration's.
"""

from __future__ import annotations

import random
from typing import Any

import torch


def capture() -> dict[str, Any]:
    state: dict[str, Any] = {"random_rng_state": random.getstate(),
                             "torch_rng_state": torch.get_rng_state()}
    try:
        import numpy as np

        state["np_rng_state"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict[str, Any]) -> None:
    random.setstate(state["random_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "np_rng_state" in state:
        import numpy as np

        np.random.set_state(state["np_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])

"""How a warm spare imports megatron-core: as the job's CPU ranks do.

A spare learns the modules its job's ranks imported (``protocol.modules``) and imports this
module in megatron-core's place (``cpu.import_megatron_core`` registers it); ``--preload
fr_megatron.megatron.preload`` imports it at the spare's start already.

A spare imports by module name. Naming ``megatron.core`` there would load it
with the real ``torch.compile`` around the fusion kernels, while the CPU ranks it may replace load
it through ``cpu.import_megatron_core`` (eager kernels): a replacement must run the code its
peers run. Importing this module loads megatron-core the way the ranks do, with the parts a GPT
training step needs, and torch's dynamo: building the first optimizer imports it
(``torch.optim.Optimizer.__init__`` is wrapped in ``torch._disable_dynamo``), 1-2 s that a
replacement would otherwise spend while its peers wait for it.
"""

from .cpu import import_megatron_core

import_megatron_core()

import megatron.core.models.gpt  # noqa: E402,F401
import megatron.core.models.gpt.gpt_layer_specs  # noqa: E402,F401  (0.1 s in a model build)
import megatron.core.optimizer  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401

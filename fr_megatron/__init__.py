"""fr_megatron: fast, checkpoint-free failure recovery for Megatron-core and DeepSpeed training.

Layout, by the idea each part owns:

- ``protocol/``  the control protocol: store key layout, signed messages, job token.
- ``launcher/``  the control plane: controller (decides), node agent (supervises), warm spares.
- ``runtime/``   inside each training process: heartbeats, the recovery state machine,
                 communicator rebuild, step transactions, redundant copies, peer transfer.
- ``megatron/``, ``deepspeed/``  the only modules that know a training framework.
"""

__version__ = "0.1.0"

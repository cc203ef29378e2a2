"""The Megatron-core integration: CPU mode, the parallel_state hook, group rebind, the
integration the runtime uses, phase markers, training-loop hooks and the Megatron-LM patch."""

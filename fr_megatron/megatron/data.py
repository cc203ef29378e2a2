"""Training data the way Megatron-LM's ``train()`` reads it, for the tiny job.

Megatron-LM builds its training loader once, at start-up, from ``args.consumed_train_samples``
(``MegatronPretrainingSampler``: each data-parallel rank takes its slice of every
``micro_batch_size x dp`` samples), wraps the iterator in megatron-core's ``RerunDataIterator``
and hands that to ``train()``. Where the stream stands is then only known to the iterator. The
recipe builds its data the same way (``--dataloader-type single``, the default), so the recovery
tests exercise what a Megatron-LM job needs: a redone step reads its micro-batches again, and a
replacement, whose loader was built at its own start-up position, is moved to its peers'
(``training_hooks._MegatronLM``).

The samples are synthetic: sample ``i`` is a pure function of (seed, i), so two runs read the same
tokens and a fault-free run can be compared bit for bit with a recovered one.
"""

from __future__ import annotations

from typing import Iterator

import torch


def micro_batch(tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors the tiny GPT's forward step takes, for ``tokens``/``labels`` of shape (b, s)."""
    b, s = tokens.shape
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones(b, s, dtype=torch.float32),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
        "attention_mask": torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1),
    }


def learnable_labels(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A rule the model can learn, so the loss goes down."""
    return (tokens * 3 + 1) % vocab_size


class SyntheticTokens(torch.utils.data.Dataset):
    """``num_samples`` sequences; sample ``i`` depends only on (seed, i)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length = num_samples, seq_length
        self.vocab_size, self.seed = vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * int(i) + 17)
        return torch.randint(0, self.vocab_size, (self.seq_length,), generator=gen)


class PretrainingSampler:
    """Megatron-LM's ``MegatronPretrainingSampler``: batches of sample indices for one
    data-parallel rank, starting after ``consumed_samples``, one micro-batch per item."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} is outside the dataset's "
                             f"{total_samples} samples: load a checkpoint of this run, or raise "
                             "--train-iters")
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.rank, self.size = micro_batch_size, data_parallel_rank, data_parallel_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.mbs * self.size)

    def __iter__(self) -> Iterator[list[int]]:
        chunk = self.mbs * self.size
        for start in range(self.consumed, self.total - chunk + 1, chunk):
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))


def train_data_iterator(*, consumed_samples: int, total_samples: int, micro_batch_size: int,
                        seq_length: int, vocab_size: int, seed: int):
    """A ``RerunDataIterator`` over a loader of this rank's micro-batches from
    ``consumed_samples`` on, as Megatron-LM's ``build_train_valid_test_data_iterators`` gives
    ``train()`` (megatron-core's parallel state must be initialised)."""
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import RerunDataIterator

    dataset = SyntheticTokens(total_samples, seq_length, vocab_size, seed)
    sampler = PretrainingSampler(total_samples, consumed_samples, micro_batch_size,
                                 parallel_state.get_data_parallel_rank(),
                                 parallel_state.get_data_parallel_world_size())

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        tokens = torch.stack([dataset[i] for i in indices])
        # the samples' numbers travel with them: a test can tell which samples a step read
        return {**micro_batch(tokens, learnable_labels(tokens, vocab_size)),
                "sample_ids": torch.tensor(indices)}

    # a generator of its own: iter(loader) draws a seed from it, and drawing from the global
    # one would shift dropout's random stream wherever the loader is built (after a checkpoint
    # load, the RNG states it restored)
    loader = torch.utils.data.DataLoader(range(total_samples), batch_sampler=sampler,
                                         collate_fn=collate,
                                         num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    return RerunDataIterator(iter(loader))

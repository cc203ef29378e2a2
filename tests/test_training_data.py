"""The recipe's Megatron-LM-style training data and the hooks' data log, in one process.

The multi-process fault tests (test_megatron_recovery, test_checkpoint) check the positions end to
end, bit for bit; these pin the pieces: the sampler hands each data-parallel rank its slice of
every ``micro_batch_size x dp`` samples from the consumed ones on, and the data log moves back
(only within what it kept) and ahead (by reading and dropping).
"""

from __future__ import annotations

import pytest

from fr_megatron.megatron.data import PretrainingSampler, SyntheticTokens
from fr_megatron.megatron.training_hooks import _DataLog


@pytest.mark.timeout(10)
def test_sampler_slices_each_micro_batch_by_data_parallel_rank():
    got = [list(PretrainingSampler(20, 4, 2, r, 2)) for r in range(2)]
    assert got[0] == [[4, 5], [8, 9], [12, 13], [16, 17]]
    assert got[1] == [[6, 7], [10, 11], [14, 15], [18, 19]]
    assert len(PretrainingSampler(20, 4, 2, 0, 2)) == 4
    assert list(PretrainingSampler(20, 20, 2, 0, 2)) == []  # resumed at the last iteration
    with pytest.raises(ValueError, match="consumed_samples=24 .* raise --train-iters"):
        PretrainingSampler(20, 24, 2, 0, 2)


@pytest.mark.timeout(10)
def test_samples_depend_only_on_seed_and_index():
    a, b = SyntheticTokens(10, 8, 64, seed=3), SyntheticTokens(10, 8, 64, seed=3)
    assert all((a[i] == b[i]).all() for i in range(10))
    assert not (a[1] == a[2]).all() and not (a[1] == SyntheticTokens(10, 8, 64, seed=4)[1]).all()


@pytest.mark.timeout(10)
def test_data_log_seeks_back_within_what_it_kept_and_reads_ahead():
    log = _DataLog(iter(range(100)))
    for it in range(4):  # four iterations of 3 micro-batches, the last two kept
        log.mark(it, keep=1)
        assert [next(log) for _ in range(3)] == [3 * it, 3 * it + 1, 3 * it + 2]
    assert log.delivered == 12 and log.fetched == [6, 7, 8, 9, 10, 11]
    assert log.seek(7) and log.delivered == 7
    assert [next(log) for _ in range(6)] == [7, 8, 9, 10, 11, 12]
    assert not log.seek(2)  # older than what is kept: refused, nothing moved
    assert log.delivered == 13
    assert log.seek(20) and next(log) == 20 and log.delivered == 21
    # queued micro-batches count as not handed out: reading ahead takes them first
    assert log.seek(20) and list(log.queued) == [20]
    assert log.seek(22) and not log.queued and next(log) == 22

"""The one sampler walker (``miu_hooks.integrations.loaders``) on Accelerate's real loaders.

``accelerate.data_loader.prepare_data_loader`` builds the same objects as
``accelerator.prepare`` without starting processes: ``num_processes=2,
process_index=r`` gives rank r's ``DataLoaderShard`` over a
``BatchSamplerShard``; ``skip_first_batches`` adds the ``SkipBatchSampler`` a
Trainer puts on top when it resumes mid-epoch; ``use_seedable_sampler`` makes
Accelerate leave a second ``sampler`` reference on the shard.
"""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import (
    BatchSamplerShard,
    DataLoaderShard,
    SkipBatchSampler,
    prepare_data_loader,
    skip_first_batches,
)
from torch.utils.data import BatchSampler, DataLoader

from miu_hooks.errors import ConfigError
from miu_hooks.integrations.hf_state import install_sampler
from miu_hooks.integrations.loaders import (
    batch_sampler_chain,
    index_sampler,
    replace_index_sampler,
)
from miu_hooks.sampling import GroupReweightSampler

pytestmark = pytest.mark.integration

N = 12
GROUPS = torch.arange(N) % 3


def shard(nproc: int, rank: int, seedable: bool = False, skip: int = 0) -> DataLoaderShard:
    base = DataLoader(list(range(N)), batch_size=2, shuffle=True)
    loader = prepare_data_loader(
        base,
        num_processes=nproc,
        process_index=rank,
        put_on_device=False,
        use_seedable_sampler=seedable,
    )
    return skip_first_batches(loader, skip) if skip else loader


def reweight(n: int) -> GroupReweightSampler:
    train = torch.cat([GROUPS, torch.tensor([2, 2, 2])])
    return GroupReweightSampler(GROUPS, train, num_samples=n, num_groups=3, seed=0)


@pytest.mark.parametrize(
    ("nproc", "skip", "kinds"),
    [
        (1, 0, [BatchSampler]),
        (1, 1, [SkipBatchSampler, BatchSampler]),
        (2, 0, [BatchSamplerShard, BatchSampler]),
        (2, 1, [SkipBatchSampler, BatchSamplerShard, BatchSampler]),
    ],
)
@pytest.mark.parametrize("seedable", [False, True])
def test_walker_finds_and_replaces_the_index_sampler(nproc, skip, kinds, seedable):
    loaders = [shard(nproc, r, seedable, skip) for r in range(nproc)]
    for loader in loaders:
        chain = batch_sampler_chain(loader)
        assert [type(n) for n in chain] == kinds
        assert index_sampler(loader) is chain[-1].sampler
        sampler = reweight(N)
        replace_index_sampler(loader, sampler)
        assert index_sampler(loader) is sampler
        # no stale reference is left for Accelerate to read (get_sampler, set_epoch)
        assert loader.get_sampler() in (None, sampler)
        assert seedable is False or nproc == 1 or chain[-2].sampler is sampler
        for node in chain:
            if hasattr(node, "sampler"):
                assert node.sampler is sampler
        assert len(loader) == N // 2 // nproc - skip  # batches of 2, split over ranks
    # rank r draws batches r, r + nproc, ... of one REWEIGHT stream (epoch 3), skipped ones off
    # As in a Trainer run: the Trainer sets the loader's epoch (which DataLoaderShard applies
    # again when iteration starts) and the callback its sampler's (Accelerate's set_epoch looks
    # only two levels down, missing the sampler below a SkipBatchSampler and a plain shard).
    for loader in loaders:
        loader.set_epoch(3)
        index_sampler(loader).set_epoch(3)
    reference = reweight(N)
    reference.set_epoch(3)
    drawn = list(reference)
    batches = [drawn[i : i + 2] for i in range(0, N, 2)]
    expected = [batches[rank::nproc][skip:] for rank in range(nproc)]
    assert [[b.tolist() for b in loader] for loader in loaders] == expected


def test_install_sampler_keeps_the_step_count_and_an_existing_reweight_sampler():
    loader = shard(2, 0, seedable=True)
    steps = len(loader)
    sampler = install_sampler(loader, reweight)
    assert isinstance(sampler, GroupReweightSampler) and len(sampler) == N
    assert len(loader) == steps
    assert install_sampler(loader, lambda n: pytest.fail("rebuilt")) is sampler


def test_a_loader_without_batch_sampler_is_refused():
    class Batches:  # an iterable of ready batches, as some custom loaders are
        def __iter__(self):
            return iter([[0, 1]])

    assert batch_sampler_chain(Batches()) == [] and index_sampler(Batches()) is None
    with pytest.raises(ConfigError):
        replace_index_sampler(Batches(), reweight(2))
    with pytest.raises(ConfigError, match="reweight=False"):
        install_sampler(Batches(), reweight)

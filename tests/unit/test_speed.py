"""Speed paths give the results of the plain paths (docs/method.md §3.3, §4).

* batched fetching of tensor-backed data (:mod:`miu_hooks.batched`): the same
  batches as a ``DataLoader`` reading item by item, hence bit-equal weights;
* T_o's scores of cached features from a T_o forward instead of the score table:
  equal to float round-off;
* a tuning step computed once while T_o is T_u's exact copy and z_o equals z_u:
  bit-equal critics and weights;
* a row's features reused within a tuning phase (``tune_features="reuse"``): the
  critics and weights of fresh forwards on a model whose features do not depend on
  the batch, to float round-off.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset
from toy_problem import toy_net, toy_split

import miu_hooks.batched as batched_mod
from miu_hooks import MIUConfig, TrainConfig, attach, unlearn
from miu_hooks.batched import BatchedIndexedDataset, BatchedTensorView, batched, collate
from miu_hooks.data import GroupTensorDataset, IndexedDataset, dataset_groups, indexed
from miu_hooks.engine import MIUHandle, _cycle
from miu_hooks.methods.base import SeededLoader, ShuffleSampler

pytestmark = pytest.mark.unit

CFG = MIUConfig(epochs=3, forget_epochs=2, batch_size=16, mine_hidden=16, mine_warmup_iters=6,
                mine_iters=2, lr=0.05, device="cpu")  # fmt: skip


def _tensors(n: int, seed: int, dtype: torch.dtype = torch.float32) -> GroupTensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return GroupTensorDataset(torch.randn(n, 3, generator=gen).to(dtype),
                              torch.randint(0, 2, (n,), generator=gen),
                              torch.randint(0, 4, (n,), generator=gen))  # fmt: skip


def _nested() -> IndexedDataset:
    a, b = _tensors(40, 0), _tensors(13, 1)
    return indexed(ConcatDataset([Subset(a, list(range(0, 40, 3))), b, Subset(b, [12, 0, 5])]))


def _assert_same_batches(fast: DataLoader, slow: DataLoader) -> None:
    n = 0
    for x, y in zip(fast, slow, strict=True):
        assert len(x) == len(y)
        for u, v in zip(x, y, strict=True):
            assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v)
        n += 1
    assert n > 1


def test_batched_loader_yields_the_item_by_item_batches() -> None:
    data = _nested()
    fast = SeededLoader(data, sampler=ShuffleSampler(len(data), seed=3), batch_size=7)
    assert isinstance(fast.dataset, BatchedIndexedDataset)
    assert fast.dataset.dataset is data.dataset  # same .dataset as the IndexedDataset
    slow = DataLoader(data, batch_sampler=fast.batch_sampler)  # the same index batches
    _assert_same_batches(fast, slow)
    plain = _tensors(30, 2)
    fast = SeededLoader(plain, sampler=ShuffleSampler(30, seed=1), batch_size=8)
    assert isinstance(fast.dataset, BatchedTensorView)
    _assert_same_batches(fast, DataLoader(plain, batch_sampler=fast.batch_sampler))
    assert torch.equal(dataset_groups(fast.dataset), plain.groups)


def test_batched_loader_in_worker_processes() -> None:
    data = _nested()
    fast = SeededLoader(data, sampler=ShuffleSampler(len(data), seed=3), batch_size=7,
                        num_workers=1)  # fmt: skip
    _assert_same_batches(fast, DataLoader(data, batch_sampler=fast.batch_sampler))


def test_a_foreign_loader_over_a_batched_view_sees_the_items() -> None:
    """A loader with another collate_fn (e.g. built by a launcher) collates the plain items."""
    data = _nested()
    view = batched(data)
    assert isinstance(view, BatchedIndexedDataset)
    items = view.__getitems__([4, 0])
    for got, want in zip(items, [data[4], data[0]], strict=True):
        assert len(got) == len(want) == 4
        assert all(torch.equal(torch.as_tensor(u), torch.as_tensor(v))
                   for u, v in zip(got, want, strict=True))  # fmt: skip
    assert isinstance(items[0][3], int)  # positions stay ints, as IndexedDataset's
    order = [5, 1, 7, 2]
    seen = next(iter(DataLoader(view, batch_sampler=[order], collate_fn=list)))
    assert [int(item[3]) for item in seen] == order
    _assert_same_batches(DataLoader(view, batch_sampler=[order, [0, 3]]),
                         DataLoader(data, batch_sampler=[order, [0, 3]]))  # fmt: skip


def test_batched_reads_negative_and_rejects_out_of_range_positions() -> None:
    view = batched(_tensors(5, 0))
    x = collate(view.__getitems__([-1, 0]))[0]
    assert torch.equal(x, torch.stack([view[4][0], view[0][0]]))
    with pytest.raises(IndexError, match="index 5"):
        view.__getitems__([0, 5])


def test_only_plain_tensor_data_are_batched() -> None:
    class Augmented(TensorDataset):
        def __getitem__(self, i):  # type: ignore[no-untyped-def]
            x, y, g = super().__getitem__(i)
            return x + 1, y, g

    aug = Augmented(torch.zeros(4, 2), torch.zeros(4).long(), torch.zeros(4).long())
    assert batched(aug) is aug
    mixed = ConcatDataset([_tensors(4, 0), _tensors(4, 1, torch.float64)])  # dtypes differ
    assert batched(mixed) is mixed
    items = [(torch.zeros(2), 0, 1)] * 3
    assert batched(items) is items
    loader = SeededLoader(
        _tensors(6, 0), sampler=ShuffleSampler(6), batch_size=2, collate_fn=lambda b: b
    )  # the caller's collate_fn wins
    assert isinstance(loader.dataset, GroupTensorDataset)


@pytest.mark.parametrize("method", ["miu", "finetune_reweight", "scrub"])
def test_batched_fetching_gives_bit_equal_weights(method: str, monkeypatch) -> None:
    _, retain, forget = toy_split()
    if method == "miu":
        cfg: TrainConfig = CFG
    else:
        cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, device="cpu")
    if method == "scrub":
        from miu_hooks import SCRUBConfig

        cfg = SCRUBConfig(epochs=2, forget_epochs=1, batch_size=16, device="cpu")
    fast = unlearn(toy_net(), retain, forget, config=cfg, num_groups=4, method=method)
    monkeypatch.setattr(batched_mod, "ENABLED", False)
    slow = unlearn(toy_net(), retain, forget, config=cfg, num_groups=4, method=method)
    for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_direct_original_scores_match_the_table(monkeypatch) -> None:
    """A run scoring T_o per retain step equals one reading T_o's score table."""
    _, retain, forget = toy_split()
    runs = {}
    for mode in ("table", "direct"):
        monkeypatch.setattr(MIUHandle, "original_scoring", mode)
        logs: list[dict[str, float]] = []
        model = unlearn(toy_net(), retain, forget, config=CFG, num_groups=4,
                        on_epoch_end=lambda _e, log, logs=logs: logs.append(log))  # fmt: skip
        runs[mode] = (model.state_dict(), logs)
    (wt, lt), (wd, ld) = runs["table"], runs["direct"]
    for k in wt:
        assert torch.allclose(wt[k], wd[k], rtol=1e-5, atol=1e-6), k
    for a, b in zip(lt, ld, strict=True):
        assert a["miu/mi_original"] == pytest.approx(b["miu/mi_original"], rel=1e-5, abs=1e-6)


def test_auto_scoring_picks_the_cheaper_way() -> None:
    full, _, _ = toy_split()
    with attach(toy_net(), CFG, num_groups=4) as handle:
        assert not handle.uses_score_table()  # no cache: a forward
        handle.build_feature_cache(DataLoader(IndexedDataset(full), batch_size=32), len(full))
        assert handle.uses_score_table()  # retain rows unknown (Trainer, Accelerate)
        n, d, g = len(full), 12, 4
        handle.retain_rows_per_epoch = n  # N·(d+|G|) > N·(d+2): a forward per step
        assert not handle.uses_score_table()
        handle.retain_rows_per_epoch = -(-n * (d + g) // (d + 2))  # just enough rows
        assert handle.uses_score_table()


def _tuned(tie: bool, monkeypatch, cfg: MIUConfig = CFG) -> tuple[MIUHandle, list[float]]:
    monkeypatch.setattr(MIUHandle, "tie_critics", tie)
    full, _, _ = toy_split()
    handle = attach(toy_net(), cfg, num_groups=4)
    loader = DataLoader(IndexedDataset(full), batch_size=16, shuffle=False)
    handle.build_feature_cache(loader, len(full))
    handle.tune(iter(list(loader) * 3), 12)
    return handle, list(handle.pop_logs().values())


@pytest.mark.parametrize("on", ["original", "unlearned"])
def test_tied_tuning_leaves_the_critics_bit_equal(on: str, monkeypatch) -> None:
    cfg = CFG.replace(tune_original_on=on)
    tied, logs_t = _tuned(True, monkeypatch, cfg)
    assert tied.tied_steps == 12  # z_u == z_o on every step
    plain, logs_p = _tuned(False, monkeypatch, cfg)
    assert plain.tied_steps == 0
    assert logs_t == logs_p
    for name in ("critic_model", "critic_original", "opt_critic_model", "opt_critic_original"):
        a, b = getattr(tied, name).state_dict(), getattr(plain, name).state_dict()
        if name.startswith("opt"):
            a, b = a["state"], b["state"]
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]), (name, k)
        else:
            for k in a:
                assert torch.equal(a[k], b[k]), (name, k)
    tied.remove()
    plain.remove()


def test_tuning_unties_when_the_features_differ(monkeypatch) -> None:
    """After the model moved, z_u != z_o: both critics are tuned, as without the tie."""
    handles = []
    for tie in (True, False):
        handle, _ = _tuned(tie, monkeypatch)
        with torch.no_grad():
            handle.model[0].weight.add_(0.1)
        full, _, _ = toy_split()
        loader = DataLoader(IndexedDataset(full), batch_size=16)
        handle.tune(iter(list(loader)), 3)
        handles.append(handle)
    assert not handles[0]._critics_identical()
    assert [h.tied_steps for h in handles] == [12, 0]  # none after the model moved
    for name in ("critic_model", "critic_original"):
        a, b = (getattr(h, name).state_dict() for h in handles)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    for h in handles:
        h.remove()


def test_tied_tuning_whole_run_bit_equal(monkeypatch) -> None:
    _, retain, forget = toy_split()
    out, tied = [], []
    real = MIUHandle.remove

    def remove(self: MIUHandle) -> None:
        tied.append(self.tied_steps)
        real(self)

    monkeypatch.setattr(MIUHandle, "remove", remove)
    for tie in (True, False):
        monkeypatch.setattr(MIUHandle, "tie_critics", tie)
        out.append(unlearn(toy_net(), retain, forget, config=CFG, num_groups=4).state_dict())
    assert tied[0] == CFG.mine_warmup_iters and tied[-1] == 0  # the first phase was tied
    for k in out[0]:
        assert torch.equal(out[0][k], out[1][k]), k


# -- opt-in settings (they change what a run computes; docs/method.md §4) -----------------


def test_opt_in_settings_are_validated() -> None:
    from miu_hooks import ConfigError

    for bad in ({"critic_width": "wide"}, {"tune_original": "never"}, {"mine_warmup_tol": 0.0},
                {"tune_features": "stale"},
                {"mine_warmup_tol": -1.0}):  # fmt: skip
        with pytest.raises(ConfigError):
            MIUConfig(**bad)
    cfg = MIUConfig()
    assert (cfg.critic_width, cfg.mine_warmup_tol, cfg.tune_original) == (
        "fixed",
        None,
        "every_epoch",
    )  # the defaults compute what they did before


def test_critic_width_follows_the_feature_width() -> None:
    from miu_hooks.engine import critic_hidden

    feature = MIUConfig(critic_width="feature")
    assert [critic_hidden(feature, d) for d in (2, 64, 200, 768)] == [32, 128, 400, 512]
    assert critic_hidden(feature.replace(mine_hidden=64), 200) == 64  # never above mine_hidden
    assert critic_hidden(MIUConfig(), 2) == 512
    with attach(toy_net(), CFG.replace(critic_width="feature", mine_hidden=512),
                num_groups=4) as handle:  # fmt: skip
        assert handle.critic_model is not None and handle.critic_original is not None
        assert handle.critic_model.first.out_features == 32  # 12-wide features
        assert handle.critic_original.first.out_features == 32


def _tune_loader() -> DataLoader:
    full, _, _ = toy_split()
    return DataLoader(IndexedDataset(full), batch_size=16, shuffle=False)


def test_warmup_stops_once_the_estimate_settles() -> None:
    loader = _tune_loader()
    cfg = CFG.replace(mine_warmup_iters=100, forget_epochs=0)
    net = toy_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    runs = {}
    for tol in (None, 10.0, 1e-9):  # never / at the first chance / never in practice
        with attach(toy_net(), cfg.replace(mine_warmup_tol=tol), num_groups=4) as handle:
            handle.epoch_start(0, optimizer=opt, forget_loader=[], tune_loader=loader)
            runs[tol] = (handle.warmup_steps, handle.counters["tune"])
    assert runs[None] == (100, 100)
    assert runs[10.0] == (30, 30)  # three windows of 10 steps: two small moves
    assert runs[1e-9] == (100, 100)


def test_tune_original_warmup_leaves_the_original_critic_after_the_first_phase() -> None:
    loader = _tune_loader()
    cfg = CFG.replace(forget_epochs=0)
    opt = torch.optim.SGD(toy_net().parameters(), lr=0.1)
    states = {}
    for when in ("every_epoch", "warmup"):
        with attach(toy_net(), cfg.replace(tune_original=when), num_groups=4) as handle:
            handle.epoch_start(0, optimizer=opt, forget_loader=[], tune_loader=loader)
            assert handle.critic_original is not None and handle.critic_model is not None
            first = {k: v.clone() for k, v in handle.critic_original.state_dict().items()}
            model_first = handle.critic_model.first.weight.clone()
            handle.epoch_start(1, optimizer=opt, forget_loader=[], tune_loader=loader)
            same = all(torch.equal(v, handle.critic_original.state_dict()[k])
                       for k, v in first.items())  # fmt: skip
            states[when] = same
            assert not torch.equal(model_first, handle.critic_model.first.weight)  # T_u tuned
    assert states == {"every_epoch": False, "warmup": True}
    _, retain, forget = toy_split()  # a whole run with the setting
    unlearn(toy_net(), retain, forget, config=CFG.replace(tune_original="warmup"), num_groups=4)


# -- features reused within a tuning phase (MIUConfig.tune_features) ----------------------


def test_phase_features_answer_only_batches_whose_rows_were_all_seen() -> None:
    from miu_hooks.data import Batch
    from miu_hooks.phase_features import PhaseFeatures

    def batch(*rows: int) -> Batch:
        n = len(rows)
        return Batch(torch.zeros(n, 2), torch.zeros(n), torch.zeros(n), torch.tensor(rows))

    memo = PhaseFeatures(size=5)
    assert memo.lookup(batch(0, 1)) is None  # nothing stored yet
    memo.store(batch(0, 1), torch.tensor([[10.0], [11.0]]))
    memo.store(batch(4), torch.tensor([[14.0]]))
    assert memo.lookup(batch(1, 4, 0)) is None and memo.verified is None  # not checked yet
    memo.store(batch(4, 0), torch.tensor([[14.0], [10.0 + 1e-7]]))  # the check: round-off
    assert memo.verified is True
    assert memo.lookup(batch(1, 4, 0)).reshape(-1).tolist() == [11.0, 14.0, 10.0]
    assert memo.lookup(batch(1, 2)) is None  # row 2 was never stored
    assert memo.lookup(batch(1, 5)) is None  # not a position of D: a forward, no error
    no_index = Batch(torch.zeros(1, 2), torch.zeros(1), torch.zeros(1))
    assert memo.lookup(no_index) is None
    memo.store(no_index, torch.tensor([[1.0]]))  # ignored
    assert memo.reused == 1
    other = PhaseFeatures(size=5)
    other.store(batch(0, 1), torch.tensor([[10.0], [11.0]]))
    other.store(batch(1), torch.tensor([[11.5]]))  # another value for a row seen: no reuse
    assert other.verified is False and other.table is None
    assert other.lookup(batch(0, 1)) is None
    other.store(batch(2), torch.tensor([[12.0]]))  # nothing is kept any more
    assert other.table is None
    short = PhaseFeatures(size=5, steps=2)  # 2 batches of 2 rows: no row can come back
    short.store(batch(0, 1), torch.tensor([[10.0], [11.0]]))
    assert short.table is None and short.lookup(batch(0, 1)) is None


class _Forwards:
    """Counts the model's forwards while tuning (a forward hook, removed by ``close``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        self.handle = model.register_forward_hook(self._count)

    def _count(self, *_: object) -> None:
        self.n += 1

    def close(self) -> None:
        self.handle.remove()


def _warmup(features: str, bn: bool = False, cache: bool = True,
            steps: int = 20) -> tuple[MIUHandle, int, torch.nn.Module]:  # fmt: skip
    full, _, _ = toy_split()  # 96 rows: 6 batches of 16 per pass
    net = toy_net(bn)
    handle = attach(net, CFG.replace(tune_features=features), num_groups=4)
    if cache:
        handle.build_feature_cache(DataLoader(IndexedDataset(full), batch_size=16), len(full))
    loader = SeededLoader(indexed(full), sampler=ShuffleSampler(len(full), seed=5),
                          batch_size=16)  # fmt: skip
    count = _Forwards(net)
    try:
        done = handle.tune(_cycle(loader, 0), steps)  # each pass over D reshuffled
    finally:
        count.close()
    assert done == steps
    return handle, count.n, net


def test_reused_features_give_the_fresh_critics_and_skip_the_forwards() -> None:
    """MLP without BatchNorm: a row's features are the same on every draw, so reusing
    them leaves the critics as fresh forwards make them, with 7 forwards instead of 20
    (one pass of 6 batches, then the first batch drawn again, computed as the check)."""
    fresh, n_fresh, _ = _warmup("fresh")
    reuse, n_reuse, _ = _warmup("reuse")
    assert (n_fresh, n_reuse) == (20, 7)
    assert (fresh.reused_steps, reuse.reused_steps) == (0, 13)
    assert reuse.tied_steps == fresh.tied_steps == 20  # z_u still equals the cached z_o
    for name in ("critic_model", "critic_original"):
        a, b = getattr(fresh, name).state_dict(), getattr(reuse, name).state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{name}.{k}")
    fresh.remove()
    reuse.remove()


def test_nothing_is_reused_without_the_cache_or_when_the_batch_changes_a_row() -> None:
    """Without the cache (the data may be augmented) every step runs a forward. With
    BatchNorm in train mode a row's features depend on its batch: the check fails, every
    step runs a forward, and the critics are those of fresh features, bit for bit."""
    handle, n, _ = _warmup("reuse", cache=False)
    assert (n, handle.reused_steps) == (20, 0)
    handle.remove()
    fresh, n_fresh, _ = _warmup("fresh", bn=True)
    reuse, n_reuse, net = _warmup("reuse", bn=True)
    assert (n_fresh, n_reuse, reuse.reused_steps) == (20, 20, 0)
    for name in ("critic_model", "critic_original"):
        a, b = getattr(fresh, name).state_dict(), getattr(reuse, name).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    before = toy_net(bn=True).state_dict()
    for k, v in net.state_dict().items():  # BatchNorm statistics restored after tuning
        assert torch.equal(v, before[k]), k
    fresh.remove()
    reuse.remove()


def test_a_single_step_phase_keeps_no_table() -> None:
    handle, n, _ = _warmup("reuse", steps=1)
    assert (n, handle.reused_steps) == (1, 0)
    assert handle._phase_features(1) is None and handle._phase_features(2) is not None
    handle.remove()


def test_whole_run_with_reused_features_matches_fresh_features() -> None:
    _, retain, forget = toy_split()
    cfg = CFG.replace(seed=3, mine_warmup_iters=20)  # 20 steps of 16 on 96 rows: reuse
    out = [unlearn(toy_net(), retain, forget, config=cfg.replace(tune_features=f),
                   num_groups=4).state_dict() for f in ("fresh", "reuse")]  # fmt: skip
    for k in out[0]:
        torch.testing.assert_close(out[0][k], out[1][k], rtol=0, atol=1e-5, msg=k)


# -- critic gradients clipped while tuning (MIUConfig.mine_max_grad_norm) ------------------


def _one_step_update(max_norm: float | None, tie: bool, monkeypatch) -> list[float]:
    """Norm of each critic's change after one tuning step on features scaled by 1e3."""
    monkeypatch.setattr(MIUHandle, "tie_critics", tie)
    full, _, _ = toy_split()
    cfg = CFG.replace(mine_max_grad_norm=max_norm, mine_lr=0.01, tune_original_on="unlearned")
    net = toy_net()
    with torch.no_grad():
        net[0].weight.mul_(1e3)  # huge features: huge critic gradients
    with attach(net, cfg, num_groups=4) as handle:
        loader = DataLoader(IndexedDataset(full), batch_size=32)
        handle.tune(iter(list(loader)), 1)  # builds the critics on the first batch
        before = [torch.cat([p.detach().reshape(-1).clone() for p in c.parameters()])
                  for c in (handle.critic_model, handle.critic_original)]  # fmt: skip
        handle.tune(iter(list(loader)), 1)
        after = [torch.cat([p.detach().reshape(-1) for p in c.parameters()])
                 for c in (handle.critic_model, handle.critic_original)]  # fmt: skip
    return [float((a - b).norm()) for a, b in zip(after, before, strict=True)]


@pytest.mark.parametrize("tie", [True, False])
def test_a_tuning_step_moves_each_critic_at_most_lr_times_the_bound(tie, monkeypatch) -> None:
    """SGD with momentum: the second step's change is lr·(g₂ + 0.9·g₁), each g clipped to
    the bound, so at most 0.01·1.9·10 = 0.19 per critic; unclipped it is far larger."""
    clipped = _one_step_update(10.0, tie, monkeypatch)
    free = _one_step_update(None, tie, monkeypatch)
    assert all(0 < d <= 0.01 * 1.9 * 10.0 + 1e-6 for d in clipped), clipped
    assert all(d > 10 * 0.19 for d in free), free


def test_clipping_is_validated_and_on_by_default() -> None:
    from miu_hooks import ConfigError

    assert MIUConfig().mine_max_grad_norm == 10.0
    assert MIUConfig(mine_max_grad_norm=None).mine_max_grad_norm is None
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError):
            MIUConfig(mine_max_grad_norm=bad)

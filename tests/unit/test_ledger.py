"""``miu_hooks.ledger``: the record of repeated deletion requests, checked against plain loops."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_model
from torch import nn
from torch.utils.data import Dataset, Subset

import miu_hooks as mh
from miu_hooks.cli.inputs import read_forget_list
from miu_hooks.errors import DataError, EmptyForgetSetError, LedgerError, OriginalMismatchError
from miu_hooks.functional import group_weights
from miu_hooks.ledger import FORMAT, Ledger, ids_sha256, sha256_file, sha256_path, weights_sha256

pytestmark = pytest.mark.unit

H = "0" * 64


def served(ledger: Ledger, *requests: list[int]) -> Ledger:
    for k, ids in enumerate(requests):
        ledger.add_request(ids, method="miu", model_in_sha256=f"{k:064x}",
                           model_out_sha256=f"{k + 1:064x}")  # fmt: skip
    return ledger


def test_requests_accumulate_and_new_ids_leave_out_earlier_ones() -> None:
    ledger = served(Ledger(H), [5, 3, 9], [9, 1], [2, 3, 7])
    entries = ledger.requests
    assert [e.ids for e in entries] == [(5, 3, 9), (9, 1), (2, 3, 7)]
    assert [e.new_ids for e in entries] == [(5, 3, 9), (1,), (2, 7)]
    assert [e.forgotten for e in entries] == [3, 4, 6]
    assert ledger.forgotten.tolist() == [1, 2, 3, 5, 7, 9]
    assert len(ledger) == 3
    assert ledger.new_ids([4, 9, 0]).tolist() == [4, 0]
    assert entries[1].model_in_sha256 == entries[0].model_out_sha256
    assert entries[0].forget_sha256 == ids_sha256([5, 3, 9])  # the default digest
    ledger.forgotten[:] = -1  # a copy: the ledger is unchanged
    assert ledger.forgotten.tolist() == [1, 2, 3, 5, 7, 9]


def test_a_request_with_nothing_new_is_refused() -> None:
    ledger = served(Ledger(H), [1, 2])
    with pytest.raises(EmptyForgetSetError, match="forgotten by earlier requests"):
        ledger.add_request([2, 1], method="miu", model_in_sha256=H, model_out_sha256=H)
    with pytest.raises(EmptyForgetSetError, match="lists no id"):
        ledger.add_request([], method="miu", model_in_sha256=H, model_out_sha256=H)
    with pytest.raises(DataError, match="unique"):
        ledger.new_ids([3, 3])
    with pytest.raises(LedgerError, match="sha256"):
        ledger.add_request([4], method="miu", model_in_sha256="abc", model_out_sha256=H)
    assert len(ledger) == 1


def test_retain_mask_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    sample_ids = rng.permutation(np.arange(500, 560))
    ledger = served(Ledger(H), sample_ids[:7].tolist(), sample_ids[5:12].tolist())
    pending = sample_ids[20:23].tolist()
    mask = ledger.retain_mask(sample_ids, pending)
    gone = set(sample_ids[:12].tolist()) | set(pending)
    assert mask.tolist() == [int(i) not in gone for i in sample_ids]
    with pytest.raises(DataError, match="not in the data"):
        ledger.retain_mask(sample_ids, [10_000])
    with pytest.raises(LedgerError, match="not in this data"):
        ledger.retain_mask(sample_ids[3:])  # other data: earlier ids are missing


def test_split_gives_the_union_and_reweight_targets_the_original_mixture() -> None:
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    data = mh.GroupTensorDataset(torch.arange(12.0).view(12, 1), groups // 2, groups)
    ledger = served(Ledger(H), [4, 5])
    retain, forget = ledger.split(data, [6, 9])
    assert isinstance(retain, mh.GroupTensorDataset)
    assert forget.tensors[0].view(-1).tolist() == [4.0, 5.0, 6.0, 9.0]
    assert retain.tensors[0].view(-1).tolist() == [0, 1, 2, 3, 7, 8, 10, 11]
    # unlearn() builds D = retain + forget, so REWEIGHT gets N_g(D) / N_g(D_r(k)).
    train = torch.cat([retain.groups, forget.groups])
    weights = group_weights(train, retain.groups, 4)
    n_d = torch.bincount(groups, minlength=4).double()
    n_r = torch.bincount(retain.groups, minlength=4).double()
    assert torch.allclose(weights.double(), n_d / n_r)
    assert weights.tolist() == pytest.approx([1.0, 1.0, 4.0, 4 / 3])


class Items(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return torch.zeros(1), 0, i % 2


def test_split_of_other_datasets_and_sample_ids() -> None:
    ledger = served(Ledger(H), [102])
    retain, forget = ledger.split(Items(), [105], sample_ids=[100, 101, 102, 103, 104, 105])
    assert isinstance(retain, Subset) and isinstance(forget, Subset)
    assert retain.indices == [0, 1, 3, 4] and forget.indices == [2, 5]
    retain, forget = served(Ledger(H), [0]).split(Items())  # positions as ids
    assert len(retain) == 5 and forget.indices == [0]


def test_save_load_round_trip(tmp_path: Path) -> None:
    ledger = served(Ledger(H, original_path="/models/orig.safetensors", data_sha256="1" * 64),
                    [3, 1], [1, 8])  # fmt: skip
    path = ledger.save(tmp_path / "ledger.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]  # no temporary file
    again = Ledger.load(path)
    assert again.to_dict() == ledger.to_dict()
    assert again.requests == ledger.requests
    assert json.loads(path.read_text())["format"] == FORMAT
    assert ledger.forgotten_csv() == "id\n1\n3\n8\n"
    csv = tmp_path / "forgotten.csv"
    csv.write_text(ledger.forgotten_csv())
    assert read_forget_list(csv).ids.tolist() == [1, 3, 8]  # a valid forget list


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(format="other/9"), "not a"),
        (lambda d: d["original"].update(sha256="xyz"), "sha256"),
        (lambda d: d.update(forgotten=7), "forgotten"),
        (lambda d: d["requests"][1].update(ids=[1, 8, 3], new_ids=[8, 3]), "forgotten before"),
        (lambda d: d["requests"][0].update(forgotten=5), "add up"),
        (lambda d: d["requests"][0].pop("method"), "malformed"),
        (lambda d: d["requests"][0].update(new_ids=[4]), "subset"),
    ],
)
def test_inconsistent_ledgers_are_refused(tmp_path: Path, edit: object, match: str) -> None:
    data = served(Ledger(H), [3, 1], [1, 8]).to_dict()
    edit(data)  # type: ignore[operator]
    (tmp_path / "ledger.json").write_text(json.dumps(data))
    with pytest.raises(LedgerError, match=match):
        Ledger.load(tmp_path / "ledger.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LedgerError, match="not valid JSON"):
        Ledger.load(tmp_path / "bad.json")


def test_original_and_data_checks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    save_model(model, str(tmp_path / "orig.safetensors"))
    (tmp_path / "data.bin").write_bytes(b"abc")
    ledger = Ledger.start(tmp_path / "orig.safetensors", data=tmp_path / "data.bin")
    assert ledger.original_path == str((tmp_path / "orig.safetensors").resolve())
    assert (
        ledger.original_sha256
        == hashlib.sha256((tmp_path / "orig.safetensors").read_bytes()).hexdigest()
    )
    assert ledger.data_sha256 == hashlib.sha256(b"abc").hexdigest()
    (tmp_path / "moved").mkdir()
    (tmp_path / "orig.safetensors").rename(tmp_path / "moved" / "o.safetensors")
    assert ledger.locate_original(tmp_path / "moved" / "o.safetensors").name == "o.safetensors"
    assert ledger.original_path.endswith("moved/o.safetensors")
    with torch.no_grad():
        model.bias += 1
    save_model(model, str(tmp_path / "other.safetensors"))
    with pytest.raises(OriginalMismatchError, match="not the original"):
        ledger.locate_original(tmp_path / "other.safetensors")
    assert isinstance(OriginalMismatchError("x"), (LedgerError, ValueError, mh.MIUError))
    ledger.check_data(hashlib.sha256(b"abc").hexdigest())
    with pytest.raises(LedgerError, match="data differ"):
        ledger.check_data("f" * 64)
    in_memory = Ledger.start(model)
    assert in_memory.original_path is None and in_memory.original_sha256 == weights_sha256(model)


def test_digests(tmp_path: Path) -> None:
    (tmp_path / "f.csv").write_text("id\n4\n7\n")
    assert (
        ids_sha256([4, 7])
        == sha256_file(tmp_path / "f.csv")
        == read_forget_list(tmp_path / "f.csv").sha256
    )
    folder = tmp_path / "ds"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.arrow").write_bytes(b"1")
    (folder / "sub" / "b.json").write_bytes(b"2")
    first = sha256_path(folder)
    (folder / "sub" / "b.json").rename(folder / "b.json")  # same bytes, other layout
    assert sha256_path(folder) != first
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    assert weights_sha256(a) == weights_sha256(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-6
    assert weights_sha256(a) != weights_sha256(b)
    assert weights_sha256(a.to(torch.bfloat16)) != weights_sha256(b)

import copy

import pytest
import torch
from model_trace import hooks_of
from safetensors.torch import save_file, save_model
from torch import nn

from miu_hooks import CheckpointError, FeatureTap, load_original, load_weights, save_weights

pytestmark = pytest.mark.unit


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def test_load_original_is_frozen_eval_copy_with_weights(tmp_path):
    src = _net()
    path = tmp_path / "orig.safetensors"
    save_model(src, str(path))
    model = _net()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    orig = load_original(model, path)
    assert orig is not model and not orig.training
    assert not any(p.requires_grad for p in orig.parameters())
    assert torch.equal(orig[0].weight, src[0].weight)
    assert not torch.equal(model[0].weight, src[0].weight)  # the model is untouched
    assert model.training


def test_load_original_copies_no_hooks():
    model = _net()
    fired = []
    with FeatureTap(model) as tap:
        model[3].register_forward_hook(lambda *a: fired.append(1))
        orig = load_original(model)
        orig(torch.randn(3, 4))
        assert tap.peek() is None and not fired
    assert hooks_of(orig) == {}


def test_rejects_mismatched_keys_with_diff(tmp_path):
    path = tmp_path / "bad.safetensors"
    state = {k: v.clone() for k, v in _net().state_dict().items()}
    state["extra.weight"] = torch.zeros(1)
    del state["3.bias"]
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_original(_net(), path)
    msg = str(err.value)
    assert "missing 1: 3.bias" in msg and "unexpected 1: extra.weight" in msg


def test_rejects_shape_mismatch(tmp_path):
    path = tmp_path / "shape.safetensors"
    other = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    save_model(other, str(path))
    with pytest.raises(CheckpointError, match=r"3.weight \(3, 6\) vs model \(2, 6\)"):
        load_weights(_net(), path)


def test_rejects_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_original(_net(), tmp_path / "none.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    good = tmp_path / "good.safetensors"
    save_model(_net(), str(good))
    bad.write_bytes(good.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_original(_net(), bad)


def test_tied_weights_roundtrip(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    src = Tied()
    path = save_weights(src, tmp_path / "tied.safetensors", {"k": "v"})
    dst = load_weights(Tied(), path)
    assert torch.equal(dst.a.weight, src.a.weight) and dst.a.weight is dst.b.weight


def test_save_weights_atomic_and_metadata(tmp_path):
    from safetensors import safe_open

    path = save_weights(_net(), tmp_path / "out" / "m.safetensors", {"method": "miu"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["method"] == "miu"
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]


def test_deepcopy_of_model_is_not_needed_by_caller():
    model = _net()
    snapshot = copy.deepcopy(model.state_dict())
    load_original(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k])

import pytest
import torch
from model_trace import assert_no_trace, hooks_of, snapshot
from torch import nn

from miu_hooks import FeatureModuleNotFoundError, FeatureTap, resolve_features, resolve_head

pytestmark = pytest.mark.unit


class TorchvisionStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class TimmStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.head = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 2))
        self.fc = nn.Linear(2, 2)  # decoy: get_classifier() wins

    def get_classifier(self):
        return self.head[1]

    def forward(self, x):
        return self.head(self.body(x))


class HeadStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 7)
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        return self.head(self.body(x))


class NoHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


CASES = [
    (lambda: nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 2)), (2, 6), "2", 9),
    (TorchvisionStyle, (2, 3, 8, 8), "fc", 4),
    (TimmStyle, (2, 6), "head.1", 5),
    (HeadStyle, (2, 6), "head", 7),
]


@pytest.mark.parametrize(("factory", "shape", "name", "dim"), CASES)
def test_finds_head_and_leaves_no_hooks(factory, shape, name, dim):
    model = factory()
    before = snapshot(model)
    with FeatureTap(model) as tap:
        assert tap.name == name
        out = model(torch.randn(*shape))
        z = tap.pop()
        assert z.shape == (shape[0], dim) and z.dtype == torch.float32
        assert out.shape[0] == shape[0]
    assert_no_trace(model, before, same_values=True)


def test_hf_style_classifier_and_flattening():
    class HFResNetLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))

        def forward(self, x):
            return self.classifier(self.pool(x))

    model = HFResNetLike()
    with FeatureTap(model) as tap:
        model(torch.randn(4, 3, 5, 5))
        assert tap.name == "classifier.1"  # the Linear after the Flatten
        assert tap.pop().shape == (4, 3)
    with FeatureTap(model, "classifier") as tap:  # the override is tapped as given
        model(torch.randn(4, 3, 5, 5))
        assert tap.pop().shape == (4, 3)  # (B, C, 1, 1) flattened


class RobertaLikeHead(nn.Module):
    """dense -> tanh -> out_proj on the first token of the sequence."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(5, 5)
        self.out_proj = nn.Linear(5, 3)

    def forward(self, x):
        return self.out_proj(torch.tanh(self.dense(x[:, 0])))


class TextClassifier(nn.Module):
    def __init__(self, num_labels=3):
        super().__init__()
        self.config = type("Config", (), {"num_labels": num_labels})()
        self.embed = nn.Linear(4, 5)
        self.classifier = RobertaLikeHead()

    def forward(self, x):
        return self.classifier(self.embed(x))


def test_composite_head_taps_the_logits_layer_input():
    model = TextClassifier()
    x = torch.randn(2, 7, 4)
    assert resolve_features(model) == ("classifier.out_proj", model.classifier.out_proj)
    assert resolve_features(model, "classifier")[0] == "classifier"  # override kept
    with FeatureTap(model) as tap:
        logits = model(x)
        z = tap.pop()
    pooled = torch.tanh(model.classifier.dense(model.embed(x)[:, 0]))  # by hand
    assert z.shape == (2, 5) and torch.equal(z, pooled)
    torch.testing.assert_close(model.classifier.out_proj(z), logits)


def test_composite_head_picks_the_linear_with_num_labels_outputs():
    head = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.Linear(2, 6))
    model = nn.Module()
    model.classifier = head
    assert resolve_features(model, num_classes=2)[0] == "classifier.2"
    assert resolve_features(model)[0] == "classifier.3"  # unknown: the last Linear
    assert resolve_features(model, num_classes=5)[0] == "classifier"  # none emits 5: the head


def test_last_linear_with_num_classes():
    model = nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 4), nn.Identity())
    assert resolve_head(model, num_classes=3)[0] == "0"
    assert resolve_head(model)[0] == "1"


def test_override_by_name_and_by_module():
    model = TorchvisionStyle()
    assert resolve_head(model, "features.1")[0] == "features.1"
    assert resolve_head(model, model.features)[0] == "features"
    with pytest.raises(FeatureModuleNotFoundError, match="'nope' not found"):
        resolve_head(model, "nope")
    with pytest.raises(FeatureModuleNotFoundError, match="not a submodule"):
        resolve_head(model, nn.Linear(2, 2))


def test_no_head_found():
    with pytest.raises(FeatureModuleNotFoundError, match="pass feature_module"):
        resolve_head(NoHead())


def test_keeps_only_last_value_and_pop_clears():
    model = HeadStyle()
    tap = FeatureTap(model)
    try:
        model(torch.randn(2, 6))
        x = torch.randn(3, 6)
        model(x)
        assert tap.pop().shape == (3, 7)
        with pytest.raises(RuntimeError, match="did not fire"):
            tap.pop()
    finally:
        tap.remove()
    tap.remove()  # idempotent
    assert hooks_of(model) == {}


def test_pop_without_forward_raises_clear_error():
    with FeatureTap(HeadStyle()) as tap, pytest.raises(RuntimeError, match="feature tap on 'head'"):
        tap.pop()


def test_removed_even_when_forward_raises():
    model = HeadStyle()
    with pytest.raises(RuntimeError, match="mat1 and mat2"), FeatureTap(model):
        model(torch.randn(2, 5))
    assert hooks_of(model) == {}


def test_train_guard_and_capturing_scope():
    model = HeadStyle()
    with FeatureTap(model, when="train") as tap:
        model.eval()
        model(torch.randn(2, 6))
        assert tap.peek() is None
        model.train()
        with torch.no_grad():
            model(torch.randn(2, 6))
        assert tap.peek() is None
        with tap.capturing(), torch.no_grad():
            model(torch.randn(2, 6))
        assert tap.pop().shape == (2, 7)
        model(torch.randn(2, 6))
        assert tap.pop().requires_grad


def test_feature_gradient_flows_through_cast():
    model = HeadStyle()
    with FeatureTap(model) as tap:
        model(torch.randn(2, 6))
        tap.pop().sum().backward()
    assert model.body.weight.grad is not None


def test_state_dict_and_outputs_unchanged():
    model = TorchvisionStyle()
    x = torch.randn(2, 3, 8, 8)
    keys = list(model.state_dict())
    ref = model(x)
    with FeatureTap(model):
        assert torch.equal(model(x), ref)
        assert list(model.state_dict()) == keys
    assert type(model) is TorchvisionStyle

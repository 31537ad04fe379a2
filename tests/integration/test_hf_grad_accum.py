"""Gradient accumulation 2 x B gives the same first update as one batch of 2B, MI term included.

The MI estimate is a batch statistic, so it only decomposes exactly over
micro-batches when each micro-batch *is* the full batch's sample, in the same
proportions: the retain set here holds copies of one labelled image and the
marginal groups are drawn as ``arange(n) % |G|`` (B is a multiple of |G|).
Then the exact update with the MI term correctly scaled is the same for both
set-ups, and a mis-scaled term (e.g. not multiplied by ``n / num_items_in_batch``
when the Trainer passes ``num_items_in_batch`` into a ViT) would double its
gradient under accumulation. A run with λ = 0 shows the MI term moves the
update by far more than the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments, ViTConfig
from transformers import ViTForImageClassification as ViT

from miu_hooks.config import MIUConfig
from miu_hooks.data import GroupTensorDataset
from miu_hooks.engine import MIUHandle
from miu_hooks.integrations.hf import MIUCallback, MIUTrainer, as_trainer_dataset

pytestmark = pytest.mark.integration

B = 8


@pytest.fixture(autouse=True)
def _deterministic_marginals(monkeypatch):
    monkeypatch.setattr(
        MIUHandle,
        "_marginal",
        lambda self, n, device: torch.arange(n, device=device) % self.num_groups,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 8, 8, generator=gen)
    retain = GroupTensorDataset(
        image.repeat(4 * B, 1, 1, 1), torch.ones(4 * B, dtype=torch.long), torch.full((4 * B,), 3)
    )
    forget = GroupTensorDataset(
        torch.randn(4, 3, 8, 8, generator=gen), torch.ones(4, dtype=torch.long), torch.full((4,), 3)
    )
    return as_trainer_dataset(retain), as_trainer_dataset(forget)


def tiny_vit():
    """A one-layer ViT for 8x8 inputs (random init; seed set by the caller)."""
    return ViT(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=8,
            patch_size=4,
            num_labels=2,
        )
    )


def logged_args(tmp_path, **overrides):
    """CPU TrainingArguments logging every step, batch B, nothing saved or reported."""
    return TrainingArguments(
        **{
            "output_dir": str(tmp_path),
            "per_device_train_batch_size": B,
            "use_cpu": True,
            "report_to": "none",
            "save_strategy": "no",
            "disable_tqdm": True,
            "logging_steps": 1,
            "remove_unused_columns": False,
            **overrides,
        }
    )


def first_update(tmp_path, *, ga: int, batch: int, route: str, mi_weight: float = 50.0):
    retain, forget = data()
    torch.manual_seed(0)
    model = tiny_vit()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / f"{route}_{ga}_{batch}_{mi_weight}"),
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        seed=0,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        remove_unused_columns=False,
    )
    # Independent critics disagree from the first step, so the MI term is non-zero
    # without a forget pass (shared critics agree exactly until the features move).
    cfg = MIUConfig(
        mi_weight=mi_weight,
        forget_epochs=0,
        mine_warmup_iters=0,
        mine_hidden=16,
        num_sensitive=2,
        critic_init="independent",
    )
    common = dict(model=model, args=args, train_dataset=retain)
    if route == "callback":
        callback = MIUCallback(forget, config=cfg, num_groups=4, batch_size=2 * B)
        trainer = Trainer(**common, callbacks=[callback])
    else:
        trainer = MIUTrainer(
            **common, forget_dataset=forget, miu_config=cfg, num_groups=4, miu_batch_size=2 * B
        )
        callback = trainer.miu
    trainer.train()
    assert callback.hooks.terms_added == ga if route == "callback" else True
    callback.remove()
    return torch.cat(
        [(p.detach() - before[k]).reshape(-1) for k, p in model.named_parameters()]
    ), callback


@pytest.mark.parametrize("route", ["callback", "mixin"])
def test_accumulation_matches_double_batch(tmp_path, route):
    acc, cb_acc = first_update(tmp_path, ga=2, batch=B, route=route)
    big, _ = first_update(tmp_path, ga=1, batch=2 * B, route=route)
    no_mi, _ = first_update(tmp_path, ga=1, batch=2 * B, route=route, mi_weight=0.0)
    scale = float(big.abs().max())
    assert float((acc - big).abs().max()) <= 2e-5 * scale  # measured: 2e-6
    assert float((no_mi - big).abs().max()) >= 1e-2 * scale  # the MI term matters here
    if route == "callback":
        # ViT divides its loss by num_items_in_batch: the callback saw that and scaled the term
        assert cb_acc.hooks.loss_normalized is True


def test_callback_and_mixin_routes_give_the_same_update(tmp_path):
    via_callback, _ = first_update(tmp_path, ga=2, batch=B, route="callback")
    via_mixin, _ = first_update(tmp_path, ga=2, batch=B, route="mixin")
    assert torch.allclose(via_callback, via_mixin, rtol=1e-5, atol=1e-8)


def test_bf16_mixed_precision_keeps_the_loss_relation(tmp_path):
    """Under the Trainer's bf16 autocast the term still equals lambda * calibration, in fp32."""
    retain, forget = data()
    torch.manual_seed(0)
    model = tiny_vit()
    seen = []
    probe = model.register_forward_hook(
        lambda m, a, out: seen.append(out.loss.detach()) if out.loss is not None else None
    )
    args = logged_args(tmp_path, max_steps=2, gradient_accumulation_steps=2, bf16=True)
    cfg = MIUConfig(mi_weight=50.0, forget_epochs=1, mine_warmup_iters=2, mine_hidden=16)
    callback = MIUCallback(forget, config=cfg, num_groups=4)
    trainer = Trainer(model=model, args=args, train_dataset=retain, callbacks=[callback])
    trainer.train()
    probe.remove()
    assert callback.handle.runtime.precision == "bf16"
    assert callback.hooks.terms_added == 4 and callback.hooks.loss_normalized is True
    records = [h for h in trainer.state.log_history if "loss" in h]
    # per step: the two micro-batch losses (each CE * 1/2) plus 2 * (1/2) * lambda * calibration
    for step, rec in enumerate(records):
        ce = float(seen[2 * step] + seen[2 * step + 1])
        assert rec["loss"] == pytest.approx(ce + 50.0 * rec["miu/calibration"], rel=1e-3)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    callback.remove()


def test_forget_steps_use_the_trainers_fp16_scaler():
    """The callback's own steps scale, unscale (before clipping) and step like a plain fp32 step."""
    import types

    from miu_hooks.integrations.hf_state import make_runtime

    def one_step(scaler):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 2)
        # what the callback is handed: Accelerate's wrapper with .optimizer and .scaler
        wrapper = types.SimpleNamespace(
            optimizer=torch.optim.SGD(lin.parameters(), lr=0.1), scaler=scaler
        )
        args = types.SimpleNamespace(
            device=torch.device("cpu"), bf16=False, fp16=scaler is not None
        )
        runtime = make_runtime(args, wrapper)
        runtime.backward(lin(torch.randn(3, 4)).pow(2).sum())
        norm = runtime.clip_grad_norm(wrapper, lin.parameters(), 0.5)
        runtime.step(wrapper)
        return torch.cat([p.detach().reshape(-1) for p in lin.parameters()]), float(norm), runtime

    plain, norm, _ = one_step(None)
    scaled, scaled_norm, runtime = one_step(torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert runtime.precision == "fp16" and runtime.scaler is not None
    assert scaled_norm == pytest.approx(norm) and norm > 0.5  # unscaled before clipping
    assert torch.allclose(scaled, plain)


@pytest.mark.parametrize("route", ["callback", "mixin"])
def test_adaptive_clip_scales_the_term_in_the_trainer_loss(tmp_path, route):
    """With clip="adaptive" each step's loss is CE + s * lambda * calibration, MINE's s < 1."""
    retain, forget = data()
    torch.manual_seed(0)
    model = tiny_vit()
    seen = []
    probe = model.register_forward_hook(  # placed before MIU's hook: the model's own CE
        lambda m, a, out: seen.append(float(out.loss.detach())) if out.loss is not None else None
    )
    args = logged_args(tmp_path, max_steps=3)
    lam = 1e4  # large enough that the calibration gradient dominates the CE gradient
    cfg = MIUConfig(
        mi_weight=lam,
        forget_epochs=0,
        mine_warmup_iters=2,
        mine_hidden=16,
        clip="adaptive",
        critic_init="independent",  # a non-zero term from the first step
    )
    common = dict(model=model, args=args, train_dataset=retain)
    if route == "callback":
        callback = MIUCallback(forget, config=cfg, num_groups=4)
        trainer = Trainer(**common, callbacks=[callback])
    else:
        trainer = MIUTrainer(**common, forget_dataset=forget, miu_config=cfg, num_groups=4)
        callback = trainer.miu
    trainer.train()
    probe.remove()
    callback.remove()
    records = [h for h in trainer.state.log_history if "loss" in h]
    assert len(records) == len(seen) == 3
    for ce, rec in zip(seen, records, strict=True):
        s, term = rec["miu/adaptive_scale"], lam * rec["miu/calibration"]
        assert 0.0 < s <= 1.0
        assert rec["loss"] == pytest.approx(ce + s * term, rel=1e-3, abs=1e-4)
    clipped = [r for r in records if r["miu/adaptive_scale"] < 0.5]
    assert clipped  # the rule acted: the unscaled term would give a clearly larger loss
    assert all((1 - r["miu/adaptive_scale"]) * lam * r["miu/calibration"] > 1e-2 for r in clipped)

"""The contrastive objective: log N at identical embeddings, temperature learnt and clamped."""

from __future__ import annotations

import math

import torch
from open_clip.loss import ClipLoss, SigLipLoss

import training.model as M
from training.train import MAX_LOGIT_SCALE, clamp_logit_scale, param_groups, train_step


def test_clip_loss_is_log_n_when_all_embeddings_are_equal():
    for n in (2, 8, 33):
        feats = torch.nn.functional.normalize(torch.ones(n, 16), dim=-1)
        loss = ClipLoss()(feats, feats.clone(), torch.tensor(1 / 0.07))
        assert math.isclose(loss.item(), math.log(n), rel_tol=1e-5)


def test_loss_is_lower_when_pairs_match():
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    matched = ClipLoss()(feats, feats, torch.tensor(10.0)).item()
    shuffled = ClipLoss()(feats, feats.roll(1, 0), torch.tensor(10.0)).item()
    assert matched < math.log(8) < shuffled


def _micro_batch(n=4):
    model, _, _, tok = M.create("witforge-micro")
    torch.manual_seed(1)
    images = torch.randn(n, 3, 32, 32)
    texts = tok([f"a photo of thing {i}" for i in range(n)])
    return model, images, texts


def test_gradient_reaches_logit_scale_and_init_is_one_over_0_07():
    model, images, texts = _micro_batch()
    assert math.isclose(model.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-5)
    train_step(model, ClipLoss(), [(images, texts)], lambda: torch.autocast("cpu",
                                                                             enabled=False))
    g = model.logit_scale.grad
    assert g is not None and g.abs().item() > 0


def test_siglip_loss_trains_bias_too():
    model, _, _, tok = M.create("witforge-micro", loss="siglip")
    images, texts = torch.randn(4, 3, 32, 32), tok(["a", "b", "c", "d"])
    train_step(model, SigLipLoss(), [(images, texts)], lambda: torch.autocast("cpu",
                                                                               enabled=False))
    assert model.logit_bias.grad.abs().item() > 0


def test_clamp_holds_after_a_step_that_pushes_the_scale_up():
    model, images, texts = _micro_batch()
    opt = torch.optim.SGD([model.logit_scale], lr=1000.0)
    model.logit_scale.grad = torch.full_like(model.logit_scale, -1.0)  # push scale up hard
    opt.step()
    assert model.logit_scale.item() > MAX_LOGIT_SCALE
    clamp_logit_scale(model)
    assert math.isclose(model.logit_scale.exp().item(), 100.0, rel_tol=1e-5)


def test_accumulated_gradient_equals_full_batch_gradient():
    model, images, texts = _micro_batch(8)
    off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    train_step(model, ClipLoss(), [(images, texts)], off)
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    train_step(model, ClipLoss(), [(images[:4], texts[:4]), (images[4:], texts[4:])], off)
    for n, p in model.named_parameters():
        if n in full:
            assert torch.allclose(p.grad, full[n], atol=1e-5, rtol=1e-3), n


def test_no_weight_decay_on_gains_biases_and_logit_scale():
    model, _, _, _ = M.create("witforge-micro")
    no_decay, decay = param_groups(model, 0.2)
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.2
    ids = {id(p) for p in no_decay["params"]}
    named = dict(model.named_parameters())
    assert id(named["logit_scale"]) in ids
    assert all(id(p) in ids for n, p in named.items() if n.endswith(".bias") or p.ndim < 2)
    assert all(id(p) not in ids for p in decay["params"])
    assert any(n.endswith("attn.in_proj_weight") and id(p) not in ids for n, p in named.items())

"""Parity with the authors' implementation on ../shared/fixtures/upstream-tiny (../shared/CALM_SPEC.md, section 8)."""

from __future__ import annotations

import pytest
import torch
from calm_transformers.evaluate_calm import brier_scores, calm_brier_scores
from calm_transformers.utils_calm import vocab_argmax
from conftest import PARITY

TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor, name: str | None = None) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.float() - b.float()).abs().max().item()
    if name is not None:
        PARITY[name] = diff
    return diff


def test_autoencoder_encode(fixture_model, reference):
    mean, log_std = fixture_model.ae_model.encode(reference["input_ids"])
    assert max_diff(mean, reference["ae_mean"], "ae_mean") < TOL
    assert max_diff(log_std, reference["ae_log_std"], "ae_log_std") < TOL


def test_autoencoder_decode(fixture_model, reference):
    logits = fixture_model.ae_model.decode(reference["ae_mean"])
    assert max_diff(logits, reference["ae_logits_at_mean"], "ae_logits_at_mean") < TOL
    expected = reference["ae_logits_at_mean"].argmax(-1)
    assert torch.equal(fixture_model.ae_model.decode_tokens(reference["ae_mean"]), expected)
    states = fixture_model.ae_model.decoder(reference["ae_mean"]).flatten(0, 1)
    blocked = vocab_argmax(states, fixture_model.ae_model.encoder.embed_tokens.weight, block_size=7)  # 46 blocks
    assert torch.equal(blocked, expected.flatten())


def test_backbone_hidden_states(fixture_model, reference):
    with torch.no_grad():
        out = fixture_model(reference["input_ids"], output_hidden_states=True)
    assert max_diff(out.last_hidden_state, reference["lm_hidden"], "lm_hidden") < TOL
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_head_samples(fixture_model, reference):
    hidden = reference["lm_hidden"].unsqueeze(0).repeat(3, 1, 1, 1)
    with torch.no_grad():
        out = fixture_model.generative_head.sample(hidden, noise=reference["head_noise"] - 0.5)
    assert max_diff(out, reference["head_out"], "head_out") < TOL


def test_training_energy_loss(fixture_model, reference):
    fixture_model.train()
    try:
        out = fixture_model(
            reference["input_ids"],
            labels=reference["input_ids"],
            loss_noise=(reference["loss_target_eps"], reference["loss_head_noise"] - 0.5),
        )
    finally:
        fixture_model.eval()
    assert max_diff(out.loss, reference["loss"], "loss") < 2e-5  # |loss| ~ 51: float32 rounding
    out.loss.backward()
    grads = [p.grad for p in fixture_model.generative_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in fixture_model.ae_model.parameters())  # the autoencoder is frozen
    fixture_model.zero_grad(set_to_none=True)


def test_eval_loss_and_brier(fixture_model, reference):
    with torch.no_grad():
        out = fixture_model(
            reference["input_ids"],
            labels=reference["input_ids"],
            loss_noise=(reference["eval_randn"][0], reference["eval_rand"][0] - 0.5),
        )
    assert max_diff(out.loss, reference["eval_loss"], "eval_loss") < 2e-5
    # The authors' eval forward scores Brier with the first two of the loss's head samples: the same draws here.
    brier = calm_brier_scores(fixture_model, reference["input_ids"], noise=reference["eval_rand"][0][:2] - 0.5)
    assert max_diff(brier, reference["eval_brier"], "eval_brier") < TOL


def test_brier_estimator(fixture_model, reference):
    tokens = fixture_model.ae_model.decode_tokens(reference["brier_latents"])  # [2, B, P*K]
    k = fixture_model.config.patch_size
    a, b = (t.reshape(-1, k) for t in tokens)
    targets = reference["brier_targets"].reshape(-1, k)
    assert max_diff(brier_scores(a, b, targets), reference["brier_expected"], "brier_expected") < TOL


def test_generation_replays_reference(fixture_model, reference):
    draws = iter(reference["gen_noise"])
    out = fixture_model.generate(
        reference["gen_prompt"],
        max_length=20,
        do_sample=True,
        temperature=1.0,
        noise_sampler=lambda shape, device, dtype: next(draws) - 0.5,
    )
    assert out.tolist() == reference["gen_output"].tolist()


def test_wrong_noise_shape_is_rejected(fixture_model, reference):
    with pytest.raises(ValueError, match="noise must have shape"):
        fixture_model.generative_head.sample(reference["lm_hidden"], noise=torch.zeros(2, 6, 3))

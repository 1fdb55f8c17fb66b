"""The diffusion and flow-matching heads against the authors' outputs: ../shared/fixtures/upstream-tiny-diffusion and
upstream-tiny-flow (CALM_SPEC.md section 9.9; each folder's README.md lists the recorded keys).

Every head-level output is compared within 1e-5 (max abs diff, recorded in PARITY). The fixtures were made on
another CPU: the network agrees to a few float32 ulps (BLAS summation order), which the diffusion sampler's first
step multiplies by about 316 (CALM_SPEC section 9.6). Its trajectory is therefore checked step by step, each step
replayed from the recorded state, within 1e-5 times that step's gain; the samples themselves within 1e-5.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch
from calm_transformers import CALMConfig, CALMForCausalLM
from calm_transformers.convert_checkpoint import (
    AE_PREFIX,
    config_from_reference,
    load_reference_checkpoint,
    read_config,
    read_state_dict,
    state_dict_from_reference,
)
from calm_transformers.evaluate_calm import brier_scores, calm_brier_scores
from calm_transformers.heads_calm import (
    HEADS,
    DiffusionHead,
    FlowHead,
    GaussianDiffusion,
    cosine_betas,
    space_timesteps,
)
from conftest import PARITY, SHARED, require_shared, tiny_config, tiny_model

TOL = 1e-5
HEAD_TYPES = ("diffusion", "flow")
HEAD_PREFIX = "generative_head."


def max_diff(a: torch.Tensor, b: torch.Tensor, name: str | None = None) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.double() - b.double()).abs().max().item()
    if name is not None:
        PARITY[name] = max(diff, PARITY.get(name, 0.0))
    return diff


# ---------------------------------------------------------------------------------------------------------------
# Loading the fixtures


def fixture_folder(head_type: str) -> Path:
    return require_shared(SHARED / "fixtures" / f"upstream-tiny-{head_type}")


def fixture_config(fixture: str, **overrides: object) -> CALMConfig:
    """The config of the fixture of that head as a CALMConfig: the converter reads the head from `architectures`."""
    folder = fixture_folder(fixture)
    config = config_from_reference(read_config(folder / "calm"), read_config(folder / "autoencoder"))
    assert config.head_type == fixture
    for name, value in overrides.items():
        setattr(config, name, value)
    config._validate()
    return config


@functools.cache
def checkpoint(head_type: str) -> dict[str, torch.Tensor]:
    return state_dict_from_reference(read_state_dict(fixture_folder(head_type) / "calm"), prefix=AE_PREFIX)


@functools.cache
def reference(head_type: str) -> dict:
    return torch.load(fixture_folder(head_type) / "reference.pt", weights_only=True)


def load_head(head_type: str, **overrides: object) -> DiffusionHead | FlowHead:
    """A head built from the fixture's config, with the checkpoint's `generative_head.*` weights (strict)."""
    head = HEADS[head_type](fixture_config(head_type, **overrides))
    weights = {k[len(HEAD_PREFIX) :]: v for k, v in checkpoint(head_type).items() if k.startswith(HEAD_PREFIX)}
    head.load_state_dict(weights, strict=True)
    return head.eval()


@functools.cache
def fixture_model(head_type: str) -> CALMForCausalLM:
    """The fixture's whole CALM, read by the converter (the head from `architectures`, every key strict)."""
    folder = fixture_folder(head_type)
    return load_reference_checkpoint(folder / "calm", folder / "autoencoder").eval()


class TimestepRecorder:
    """Records the timesteps the network embeds, one value per network call (all rows of a call share it)."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.calls: list[torch.Tensor] = []
        self.handle = head.net.time_embed.register_forward_hook(lambda module, args, out: self.calls.append(args[0]))

    def per_call(self) -> torch.Tensor:
        self.handle.remove()
        assert all((t == t.flatten()[0]).all() for t in self.calls)
        return torch.stack([t.flatten()[0] for t in self.calls])


def sample_noise(ref: dict, head_type: str) -> torch.Tensor:
    """The recorded draws of `head_sample`, as its `noise` (rows as lm_hidden's [2, 6])."""
    if head_type == "flow":
        return ref["head_sample_noise"].reshape(2, 6, -1)  # x at t = 0
    draws = torch.cat([ref["head_sample_x_T"].unsqueeze(0), ref["head_sample_noise"]])  # [1 + S, 12, l]
    return draws.reshape(draws.shape[0], 2, 6, -1)


# ---------------------------------------------------------------------------------------------------------------
# The network and its checkpoint keys


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_checkpoint_keys_and_shapes(head_type):
    head = HEADS[head_type](fixture_config(head_type))
    expected = {k[len(HEAD_PREFIX) :]: v.shape for k, v in checkpoint(head_type).items() if k.startswith(HEAD_PREFIX)}
    assert {k: v.shape for k, v in head.state_dict().items()} == expected
    assert not any(isinstance(v, torch.Tensor) for v in vars(head).values())  # the schedules are not buffers


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_network(head_type):
    ref, head = reference(head_type), load_head(head_type)
    recorder = TimestepRecorder(head)
    with torch.no_grad():
        out = head.net(ref["net_x"], ref["net_t"], ref["net_c"])
    assert torch.equal(recorder.calls[0], ref["net_t_int"])  # the flow net embeds floor(1000 t)
    recorder.handle.remove()
    assert torch.equal(ref["net_c"], ref["lm_hidden"].flatten(0, 1))
    assert max_diff(out, ref["net_out"], f"{head_type}_net_out") < TOL


def test_diffusion_schedules():
    ref, head = reference("diffusion"), load_head("diffusion")
    assert max_diff(head.train_diffusion.betas, ref["diff_train_betas"], "diffusion_train_betas") < 1e-15
    assert max_diff(head.sample_diffusion.betas, ref["diff_gen_betas"], "diffusion_gen_betas") < 1e-15
    assert torch.equal(head.sample_diffusion.timestep_map, ref["diff_gen_timestep_map"])
    assert space_timesteps(1000, 25) == ref["variant_steps_timestep_map"].tolist()  # 166.5 -> 166: ties to even
    # The training betas are recomputed from abar; they equal the clipped cosine betas to float64 rounding.
    assert max_diff(torch.tensor(cosine_betas(), dtype=torch.float64), ref["diff_train_betas"]) < 1e-15
    assert cosine_betas()[-1] == 0.999 and head.sample_diffusion.betas[-1] > 0.999  # respaced: not clipped


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_loss_terms(head_type):
    ref, head = reference(head_type), load_head(head_type)
    assert torch.equal(ref["head_loss_c"], ref["lm_hidden"].flatten(0, 1))
    with torch.no_grad():
        terms = head.loss_terms(
            ref["head_loss_x_start"], ref["head_loss_t"], ref["head_loss_noise"], ref["head_loss_c"]
        )
    assert max_diff(terms["loss"], ref["head_loss"], f"{head_type}_head_loss") < TOL
    if head_type == "diffusion":  # t = 0 rows (the discretized image NLL) and t = 1, 999 rows
        assert max_diff(terms["mse"], ref["head_loss_mse"], "diffusion_head_loss_mse") < TOL
        assert max_diff(terms["vb"], ref["head_loss_vb"], "diffusion_head_loss_vb") < TOL


def test_diffusion_vb_gradient_reaches_the_variance_only():
    ref, head = reference("diffusion"), load_head("diffusion")
    outputs = []
    handle = head.net.register_forward_hook(lambda module, args, out: outputs.append(out))
    terms = head.loss_terms(*(ref[f"head_loss_{k}"] for k in ("x_start", "t", "noise", "c")))
    handle.remove()
    for term, grows in (("mse", "eps"), ("vb", "v")):
        eps_grad, v_grad = torch.autograd.grad(terms[term].sum(), outputs[0], retain_graph=True)[0].chunk(2, dim=-1)
        assert (eps_grad.abs().sum() > 0) == (grows == "eps") and (v_grad.abs().sum() > 0) == (grows == "v")


def test_diffusion_t0_switch():
    ref = reference("diffusion")
    inputs = [ref[f"head_loss_{k}"] for k in ("x_start", "t", "noise", "c")]
    with torch.no_grad():
        authors = load_head("diffusion").loss_terms(*inputs)
        kl_only = load_head("diffusion", diffusion_t0_nll=False).loss_terms(*inputs)
    at_zero = ref["head_loss_t"] == 0
    assert torch.equal(authors["vb"][~at_zero], kl_only["vb"][~at_zero])
    assert (authors["vb"][at_zero] - kl_only["vb"][at_zero]).abs().min() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_sample(head_type):
    ref, head = reference(head_type), load_head(head_type)
    noise = sample_noise(ref, head_type)
    assert noise.shape == head.noise_shape((2, 6))
    recorder = TimestepRecorder(head)
    with torch.no_grad():
        latents = head.sample(ref["lm_hidden"], noise=noise)
    assert torch.equal(recorder.per_call(), ref["head_sample_t_int"])
    assert max_diff(latents, ref["head_sample"], f"{head_type}_head_sample") < TOL


def test_flow_trajectory():
    ref, head = reference("flow"), load_head("flow")
    with torch.no_grad():
        states = torch.stack(list(head.sample_loop(ref["lm_hidden"], sample_noise(ref, "flow"))))  # [10, 2, 6, l]
    assert max_diff(states.flatten(1, 2), ref["head_sample_traj"], "flow_head_sample_traj") < TOL


def test_diffusion_trajectory_step_by_step():
    """Each reverse step, replayed from the recorded state: within 1e-5 times the step's gain, the factor by which
    an error in the predicted noise moves x (sqrt(1 / abar - 1) * coef1: about 316 at the first step, < 1.5 after)."""
    ref, head = reference("diffusion"), load_head("diffusion")
    diffusion = head.sample_diffusion.to("cpu", torch.float32)
    gains = (diffusion.sqrt_recipm1_alphas_cumprod * diffusion.posterior_mean_coef1).double().clamp(min=1.0)
    hidden = ref["lm_hidden"].flatten(0, 1)
    states = torch.cat([ref["head_sample_x_T"].unsqueeze(0), ref["head_sample_traj"]])  # [101, 12, l]
    worst = 0.0
    for draw, k in enumerate(reversed(range(100)), start=1):
        with torch.no_grad():
            x = head.p_sample(diffusion, states[draw - 1], k, hidden, ref["head_sample_noise"][draw - 1])
        worst = max(worst, max_diff(x, states[draw]) / gains[k].item())
    PARITY["diffusion_traj_step_over_gain"] = worst
    assert worst < TOL
    assert 300 < gains[99] < 330 and gains[:98].max() < 1.5


def test_diffusion_temperature_variant():
    """The head temperature scales the per-step noise only (not x_T), replaying head_sample's draws."""
    ref = reference("diffusion")
    noise = sample_noise(ref, "diffusion")
    with torch.no_grad():
        warm = load_head("diffusion").sample(ref["lm_hidden"], noise=noise, temperature=ref["variant_temp"].item())
        cool = load_head("diffusion", diffusion_temperature=0.5).sample(ref["lm_hidden"], noise=noise)
    assert ref["variant_temp"].item() == 0.5 and torch.equal(warm, cool)
    assert max_diff(warm, ref["variant_temp_sample"], "diffusion_variant_temp_sample") < TOL


def test_diffusion_25_step_variant():
    """Respacing to 25 steps, replaying x_T and the first 25 step noises. Its first step multiplies an error in the
    predicted noise by about 1330 (316 with 100 steps), so float32 itself is off by ~5e-4 here: the sample must agree
    with the authors' within 1e-5 or within the float32 error of this computation (measured against float64)."""
    ref = reference("diffusion")
    head = load_head("diffusion", diffusion_steps=25)
    noise = sample_noise(ref, "diffusion")[:26]
    with torch.no_grad():
        latents = head.sample(ref["lm_hidden"], noise=noise)
        exact = copy.deepcopy(head).double().sample(ref["lm_hidden"].double(), noise=noise.double())
    assert torch.equal(head.sample_diffusion.timestep_map, ref["variant_steps_timestep_map"])
    float32_error = max_diff(latents, exact, "diffusion_variant_steps_float32_error")
    assert max_diff(latents, ref["variant_steps_sample"], "diffusion_variant_steps_sample") < max(TOL, float32_error)


def test_flow_euler_variant():
    """The authors' dead Euler branch: 20 steps of 0.05 (flow_solver="euler", flow_steps=20)."""
    ref, head = reference("flow"), load_head("flow", flow_solver="euler", flow_steps=20)
    recorder = TimestepRecorder(head)
    with torch.no_grad():
        latents = head.sample(ref["lm_hidden"], noise=sample_noise(ref, "flow"))
    assert torch.equal(recorder.per_call(), ref["variant_euler_t_int"])
    assert max_diff(latents, ref["variant_euler_sample"], "flow_variant_euler_sample") < TOL


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_generation_latents(head_type):
    """Each generation step's head sample at T = 1, from its backbone state and recorded draws."""
    ref, head = reference(head_type), load_head(head_type)
    for step in range(3):
        noise = ref["gen_noise"][step]
        if head_type == "diffusion":
            noise = torch.cat([ref["gen_x_T"][step].unsqueeze(0), noise])  # [101, B, l]
        assert noise.shape == head.noise_shape((2,))
        with torch.no_grad():
            latents = head.sample(ref["gen_hidden"][step], noise=noise)
        assert max_diff(latents, ref["gen_latents"][step], f"{head_type}_gen_latents") < TOL


# ---------------------------------------------------------------------------------------------------------------
# The forward losses


def forward_draws(ref: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ref[f"{prefix}_target_eps"], ref[f"{prefix}_t"], ref[f"{prefix}_noise"]


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_training_loss(head_type):
    """The training-mode forward loss: targets from the autoencoder's encoder in training mode (bfloat16 token
    embeddings) on chunks 1..P-1, conditions from the backbone on chunks 0..P-2, rows sample-major.

    The training-mode posterior is not recorded: ours carries float32 rounding of another summation order (the
    encoder's eval-mode mean differs from the recorded one by ~1e-6), times std up to 10 in the targets. So the loss
    (up to 77) is compared within 1e-6 relative (a few float32 ulps) and each row within 1e-5 of its value; with the
    recorded posterior, the eval-mode loss agrees within 1e-5 absolute (test_eval_loss_and_brier_draws)."""
    ref, head, model = reference(head_type), load_head(head_type), fixture_model(head_type)
    k, d = model.config.patch_size, model.config.hidden_size
    input_ids = ref["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids[:, :-k]).last_hidden_state  # [B, P-1, d]
        model.ae_model.encoder.train()
        try:
            mean, log_std = model.ae_model.encoder(input_ids[:, k:])  # [B, P-1, l]
        finally:
            model.ae_model.encoder.eval()
    assert max_diff(hidden, ref["lm_hidden"][:, :-1], f"{head_type}_lm_hidden") < TOL  # causal: the same states
    hidden, mean, log_std = hidden.reshape(-1, d), mean.flatten(0, 1), log_std.flatten(0, 1)  # positions row-major

    hidden.requires_grad_(True)
    loss = head.loss(hidden, mean, log_std, noise=forward_draws(ref, "loss"))
    assert max_diff(loss.detach(), ref["loss"], f"{head_type}_loss") < 1e-6 * ref["loss"].abs()
    with torch.no_grad():
        rows = head.loss_terms(*rows_of(head, hidden, mean, log_std, ref, "loss"))
    scale = ref["loss_rows"].abs()  # each term's error relative to its row's loss
    for term in ("loss", "mse", "vb") if head_type == "diffusion" else ("loss",):
        key = "loss_rows" if term == "loss" else f"loss_{term}"
        expected = ref[key]
        max_diff(rows[term], expected, f"{head_type}_{key}")
        assert ((rows[term] - expected).abs() < TOL * scale).all(), term
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def rows_of(head: DiffusionHead | FlowHead, hidden, mean, log_std, ref: dict, prefix: str) -> tuple:
    """The arguments of `loss_terms` for the rows of one recorded forward call."""
    target_eps, t, noise = forward_draws(ref, prefix)
    x_start, conditions = head.training_rows(hidden, mean, log_std, target_eps)
    return x_start, t, noise, conditions


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_eval_loss_and_brier_draws(head_type):
    """The eval-mode forward: the same loss (autoencoder in eval mode: the recorded posterior), then two head samples
    per position from draws laid out [.., 2, n, l] (sample-major), decoded and scored as Brier-1..4."""
    ref, head = reference(head_type), load_head(head_type)
    hidden = ref["lm_hidden"][:, :-1].flatten(0, 1)  # [n, d]
    mean, log_std = ref["ae_mean"][:, 1:].flatten(0, 1), ref["ae_log_std"][:, 1:].flatten(0, 1)
    with torch.no_grad():
        loss = head.loss(hidden, mean, log_std, noise=forward_draws(ref, "eval"))
    assert max_diff(loss, ref["eval_loss"], f"{head_type}_eval_loss") < TOL

    assert ref["eval_extra_draws"] == []  # K = 4: no roll-forward draws
    noise = eval_sample_noise(ref, head_type, hidden.shape[0], head.latent_size)
    model = fixture_model(head_type)
    with torch.no_grad():
        latents = head.sample(hidden.expand(2, -1, -1), noise=noise)  # [2, n, l]
        tokens = model.ae_model.decode_tokens(latents.unsqueeze(-2))  # [2, n, K]
    k = model.config.patch_size
    targets = ref["input_ids"][:, k:].reshape(-1, k)
    assert torch.equal(brier_scores(tokens[0], tokens[1], targets), ref["eval_brier"])


def eval_sample_noise(ref: dict, head_type: str, n: int, latent_size: int) -> torch.Tensor:
    """The eval call's draws for its two Brier samples per position, as `sample` takes them for hidden [2, n, d]."""
    if head_type == "diffusion":
        return torch.cat([ref["eval_sample_x_T"].unsqueeze(0), ref["eval_sample_noise"]]).reshape(-1, 2, n, latent_size)
    return ref["eval_sample_noise"].reshape(2, n, latent_size)


# ---------------------------------------------------------------------------------------------------------------
# The whole model: forward, BrierLM and generate replaying the recorded draws


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_model_forward_losses(head_type):
    """forward(labels=...) hands the head the same rows in training mode (autoencoder in training mode too) and in
    eval mode; tolerances as in test_training_loss."""
    ref, model = reference(head_type), fixture_model(head_type)
    ids = ref["input_ids"]
    model.train()
    try:
        loss = model(ids, labels=ids, loss_noise=forward_draws(ref, "loss")).loss
    finally:
        model.eval()
    assert max_diff(loss.detach(), ref["loss"], f"{head_type}_model_loss") < 1e-6 * ref["loss"].abs()
    with torch.no_grad():
        eval_loss = model(ids, labels=ids, loss_noise=forward_draws(ref, "eval")).loss
    assert max_diff(eval_loss, ref["eval_loss"], f"{head_type}_model_eval_loss") < 1e-6 * ref["eval_loss"].abs()


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_model_brier_scores(head_type):
    ref, model = reference(head_type), fixture_model(head_type)
    n = ref["input_ids"].shape[0] * (ref["input_ids"].shape[1] // model.config.patch_size - 1)
    noise = eval_sample_noise(ref, head_type, n, model.config.latent_size)
    brier = calm_brier_scores(model, ref["input_ids"], noise=noise)
    assert max_diff(brier, ref["eval_brier"], f"{head_type}_eval_brier") < TOL


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_generation_replays_the_recorded_draws(head_type):
    """generate at T = 1 with the recorded draws gives the authors' tokens, token for token."""
    ref, model = reference(head_type), fixture_model(head_type)
    steps = iter(range(3))

    def recorded(shape, device, dtype):
        step = next(steps)
        noise = ref["gen_noise"][step]
        if head_type == "diffusion":
            noise = torch.cat([ref["gen_x_T"][step].unsqueeze(0), noise])
        assert tuple(noise.shape) == tuple(shape)
        return noise.to(device, dtype)

    prompt = ref["gen_prompt"]
    out = model.generate(
        prompt, max_length=prompt.shape[1] + 12, temperature=1.0, noise_sampler=recorded, prompt_alignment="reference"
    )
    assert torch.equal(out, ref["gen_output"])


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.slow
def test_converter_reads_and_verifies_the_authors_checkpoints(head_type, tmp_path):
    """calm-convert on the authors' diffusion / flow checkpoint: the head from `architectures`, verified in a fresh
    process as energy checkpoints are; the folder then generates with remote code at T < 1 (the pool)."""
    from calm_transformers.convert_checkpoint import convert
    from transformers import AutoModelForCausalLM

    folder = fixture_folder(head_type)
    out = convert(folder / "calm", tmp_path / "out", folder / "autoencoder", progress=False)
    assert json.loads((out / "config.json").read_text())["head_type"] == head_type
    assert (out / "heads_calm.py").is_file()  # the code remote code needs
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model.generative_head).__name__ == type(fixture_model(head_type).generative_head).__name__
    prompt = reference(head_type)["gen_prompt"]
    torch.manual_seed(0)
    out = model.generate(prompt, max_new_tokens=8, temperature=0.5, num_candidates=4)
    assert out.shape == (2, prompt.shape[1] + 8)


# ---------------------------------------------------------------------------------------------------------------
# Without recorded draws: dtypes, reproducibility, init, errors


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_bfloat16_head_samples_and_trains_on_cpu(head_type):
    head = load_head(head_type).to(torch.bfloat16)
    hidden = reference(head_type)["lm_hidden"][:, :-1].to(torch.bfloat16)  # [2, 5, d]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = head.sample(hidden, generator=generator)
        pool = head.sample(hidden[:, -1], generator=generator, num_samples=3)
    assert latents.shape == (2, 5, head.latent_size) and latents.dtype == torch.bfloat16
    assert pool.shape == (2, 3, head.latent_size) and torch.isfinite(pool).all()
    assert torch.isfinite(latents).all() and latents.float().std() > 0

    hidden = hidden.flatten(0, 1).detach().requires_grad_(True)
    mean, log_std = torch.randn(2, 10, head.latent_size, generator=generator)
    loss = head.loss(hidden, mean, log_std, generator=generator)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad.float()).all()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in head.parameters())


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_sampling_is_reproducible_with_a_seeded_generator(head_type):
    head, hidden = load_head(head_type), reference(head_type)["lm_hidden"]
    with torch.no_grad():
        first, again, other = (head.sample(hidden, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    mean, log_std = reference(head_type)["ae_mean"][0, 1:], reference(head_type)["ae_log_std"][0, 1:]
    with torch.no_grad():
        losses = [
            head.loss(hidden[0, :-1], mean, log_std, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)
        ]
    assert losses[0] == losses[1] and losses[0] != losses[2]


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_init_weights_gives_a_zero_output(head_type):
    torch.manual_seed(0)
    head = HEADS[head_type](tiny_config(head_type=head_type))
    head.init_weights()
    x, c = torch.randn(3, head.latent_size), torch.randn(3, 32)
    t = torch.tensor([0, 500, 999]) if head_type == "diffusion" else torch.tensor([0.0, 0.5, 0.999])
    assert torch.equal(head.net(x, t, c), torch.zeros(3, head.net.final_layer.linear.out_features))
    assert head.net.input_proj.weight.abs().sum() > 0 and head.net.res_blocks[0].mlp[0].bias.abs().sum() == 0
    assert head.net.time_embed.mlp[0].weight.std() < 0.03


def test_schedules_stay_on_the_cpu_when_built_on_the_meta_device():
    """transformers 5 builds models under `torch.device("meta")`: the float64 tables must still hold numbers."""
    with torch.device("meta"):
        head = DiffusionHead(tiny_config(head_type="diffusion"))
    assert head.net.input_proj.weight.is_meta
    reference_head = DiffusionHead(tiny_config(head_type="diffusion"))
    for name, table in vars(head.sample_diffusion).items():
        if isinstance(table, torch.Tensor):
            assert table.device.type == "cpu" and torch.equal(table, getattr(reference_head.sample_diffusion, name))


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_wrong_noise_shapes_are_rejected(head_type):
    head = load_head(head_type)
    hidden = reference(head_type)["lm_hidden"]
    with pytest.raises(ValueError, match="noise must have shape"):
        head.sample(hidden, noise=torch.zeros(2, 6, 3))
    with pytest.raises(ValueError, match="loss noise must have shapes"):
        head.loss(
            hidden[0], hidden[0, :, :16], hidden[0, :, :16], noise=(torch.zeros(1), torch.zeros(1), torch.zeros(1))
        )


def test_flow_floor_time_switch():
    """flow_floor_time=False embeds 1000 t unrounded: the same network where 1000 t is an integer (t = 0)."""
    ref = reference("flow")
    floor_head, smooth_head = load_head("flow"), load_head("flow", flow_floor_time=False)
    recorder = TimestepRecorder(smooth_head)
    with torch.no_grad():
        smooth = smooth_head.net(ref["net_x"], ref["net_t"], ref["net_c"])
        floor = floor_head.net(ref["net_x"], ref["net_t"], ref["net_c"])
    recorder.handle.remove()
    assert recorder.calls[0].is_floating_point() and torch.equal(recorder.calls[0], ref["net_t"] * 1000)
    assert torch.equal(smooth[0], floor[0]) and (smooth - floor).abs().amax(-1)[4] > 1e-4  # t = 0 and 0.9999999


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("head_type", "mixture", "head_type must be"),
        ("diffusion_steps", 0, "diffusion_steps must be a positive integer"),
        ("diffusion_steps", 1001, "at most 1000"),
        ("flow_steps", 2.5, "flow_steps must be a positive integer"),
        ("flow_solver", "rk4", "flow_solver must be"),
        ("flow_floor_time", "yes", "flow_floor_time must be True or False"),
        ("diffusion_t0_nll", 1, "diffusion_t0_nll must be True or False"),
        ("diffusion_temperature", -1.0, "diffusion_temperature must be"),
    ],
)
def test_config_rejects_bad_head_settings(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_config_defaults_are_the_authors():
    config = CALMConfig()
    assert config.head_type == "energy" and config.diffusion_steps == 100 and config.flow_steps == 10
    assert config.flow_solver == "midpoint" and config.flow_floor_time and config.diffusion_t0_nll
    assert config.diffusion_temperature == 1.0
    assert tiny_config(head_type="flow", num_samples=1).num_samples == 1  # only the energy score needs pairs
    assert GaussianDiffusion.respaced(cosine_betas(), 100).timestep_map[:7].tolist() == [0, 10, 20, 30, 40, 50, 61]


@pytest.mark.parametrize("head_type", ["energy", *HEAD_TYPES])
def test_bfloat16_model_trains_and_generates_on_cpu(head_type):
    """The whole model in bfloat16 on the CPU, no autocast: a training step's loss and gradients are finite, and
    generate samples at T = 1 and through the pool at T < 1."""
    model = tiny_model(head_type=head_type, diffusion_steps=5).to(torch.bfloat16).train()
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.generative_head.parameters()
    )
    model.eval()
    for temperature in (1.0, 0.5):
        out = model.generate(ids[:, :5], max_new_tokens=8, temperature=temperature, num_candidates=6)
        assert out.shape == (2, 13) and ((out >= 0) & (out < 96)).all()


@pytest.mark.parametrize("head_type", ["energy", *HEAD_TYPES])
def test_a_new_model_starts_with_the_authors_head_init(head_type):
    """CALMForCausalLM(config) gives its head the authors' init on transformers 4.57 and 5.x alike (5.x never visits
    the head module itself, only its layers): the layers they zero are zero, so a fresh head outputs exactly 0."""
    model = CALMForCausalLM(tiny_config(head_type=head_type))
    head = model.generative_head
    zeroed = [head.final_layer.linears[-1]] if head_type == "energy" else [head.net.final_layer.linear]
    zeroed += [] if head_type == "energy" else [block.adaLN_modulation[-1] for block in head.net.res_blocks]
    assert all(not layer.weight.any() and not layer.bias.any() for layer in zeroed)
    hidden = torch.randn(3, model.config.hidden_size)
    if head_type == "energy":
        assert not head.sample(hidden).any()
    else:
        assert not head.net(torch.randn(3, model.config.latent_size), torch.tensor([0, 5, 9]), hidden).any()


def test_every_head_type_has_a_head_and_energy_levels():
    """HEADS covers every head_type the config accepts; energy levels measure any head, even with num_samples = 1
    (allowed for the iterative heads, whose loss draws one target per sample; the energy score needs pairs)."""
    from calm_transformers.configuration_calm import HEAD_TYPES
    from calm_transformers.evaluate_calm import energy_levels

    assert set(HEADS) == set(HEAD_TYPES)
    model = tiny_model(head_type="flow", num_samples=1, flow_steps=2)
    levels = energy_levels(model, torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert all(math.isfinite(value) for value in levels.values()), levels

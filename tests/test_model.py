"""The model classes on their own: save/load round trips, remote code, training behaviour and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from calm_transformers import CALMAutoencoder, CALMAutoencoderConfig, CALMConfig, CALMForCausalLM
from conftest import REPO, require_shared, run_python, tiny_config, tiny_model


@pytest.mark.parametrize("patch_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, patch_size, dtype):
    model = tiny_model(patch_size=patch_size, num_heads=4, num_kv_heads=2, rope_theta=5e5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    # The model file and every file it imports, each one a flat sibling (no package import at load time).
    assert {"configuration_calm.py", "modeling_calm.py", "generation_calm.py", "utils_calm.py"} <= files
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_theta"] == 5e5 and saved["rope_parameters"]["rope_theta"] == 5e5
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_calm.CALMForCausalLM"

    loaded = CALMForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    assert next(loaded.parameters()).dtype == dtype
    ids = torch.randint(0, 90, (2, 3 * patch_size))
    with torch.no_grad():
        expected = model.to(dtype)(ids).last_hidden_state
        got = loaded(ids).last_hidden_state
    assert torch.equal(expected, got)
    assert loaded.config.rope_parameters["rope_theta"] == 5e5
    assert loaded.transformer.rotary_emb.inv_freq[1].item() == pytest.approx(
        1 / 5e5 ** (2 / loaded.config.head_dim), rel=1e-5
    )


def test_autoencoder_standalone_round_trip(tmp_path):
    torch.manual_seed(0)
    ae = CALMAutoencoder(
        CALMAutoencoderConfig(vocab_size=50, hidden_size=16, intermediate_size=32, latent_size=4)
    ).eval()
    ae.save_pretrained(tmp_path)
    loaded = CALMAutoencoder.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50, (3, 8))
    mean, log_std = loaded.encode(ids)
    assert mean.shape == log_std.shape == (3, 2, 4)
    assert loaded.decode(mean).shape == (3, 8, 50)
    assert torch.equal(loaded.decode_tokens(mean), ae.decode(mean).argmax(-1))


def test_autoencoder_training_loss_and_accuracy():
    torch.manual_seed(0)
    ae = CALMAutoencoder(CALMAutoencoderConfig(vocab_size=50, hidden_size=16, intermediate_size=32, latent_size=4))
    ids = torch.randint(0, 50, (2, 8))
    ae.train()
    out = ae(ids, labels=ids)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert ae.encoder.embed_tokens.weight.grad is not None
    ae.eval()
    with torch.no_grad():
        out = ae(ids, labels=ids)
    assert torch.equal(out.accuracy, (out.logits.argmax(-1) == ids).float().mean())
    labels = ids.clone()
    labels[:, :4] = -100  # ignored positions do not count
    with torch.no_grad():
        masked = ae(ids, labels=labels)
    assert torch.equal(masked.accuracy, (out.logits.argmax(-1) == ids)[:, 4:].float().mean())


@pytest.mark.slow
def test_remote_code_in_fresh_process(tmp_path):
    """A saved CALM folder, and a saved autoencoder folder, load in a fresh process through remote code alone:
    AutoModelForCausalLM and AutoModel (the whole CALM, whose forward gives the backbone states) on the CALM folder,
    AutoConfig and AutoModel on the autoencoder's."""
    model = tiny_model(patch_size=4)
    model.save_pretrained(tmp_path)
    model.ae_model.save_pretrained(tmp_path / "ae")
    ids = torch.randint(0, 90, (2, 8))
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    torch.save({"ids": ids, "expected": expected}, tmp_path / "probe.pt")
    code = f"""
import torch, transformers
from transformers import AutoModelForCausalLM
probe = torch.load({str(tmp_path / "probe.pt")!r})
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
with torch.no_grad():
    got = model(probe['ids']).last_hidden_state
print('DIFF', (got - probe['expected']).abs().max().item())
base = transformers.AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
assert type(base).__name__ == 'CALMForCausalLM' and type(base).__module__.startswith('transformers_modules')
ae_config = transformers.AutoConfig.from_pretrained({str(tmp_path / "ae")!r}, trust_remote_code=True)
ae = transformers.AutoModel.from_pretrained({str(tmp_path / "ae")!r}, trust_remote_code=True)
assert type(ae_config).__name__ == 'CALMAutoencoderConfig' and type(ae).__name__ == 'CALMAutoencoder'
assert type(ae).__module__.startswith('transformers_modules'), type(ae).__module__
"""
    # An empty module cache, and no way to import the installed package: only the folder's code can be used.
    out = run_python(code, cwd=tmp_path, env_extra={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert "DIFF 0.0" in out


def test_auto_classes_know_calm_once_the_package_is_imported(tmp_path):
    """`import calm_transformers` registers CALM with the Auto classes: a package-only folder (no code copies, no
    auto_map) loads through AutoConfig / AutoModelForCausalLM / AutoModel without trust_remote_code."""
    from calm_transformers.train_calm import strip_remote_code
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model = tiny_model(patch_size=4)
    model.save_pretrained(tmp_path / "lm")
    model.ae_model.save_pretrained(tmp_path / "ae")
    for folder in ("lm", "ae"):
        strip_remote_code(tmp_path / folder)
        assert "auto_map" not in json.loads((tmp_path / folder / "config.json").read_text())
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "lm"), CALMConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert type(loaded) is CALMForCausalLM
    expected = model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    assert type(AutoModel.from_pretrained(tmp_path / "ae")) is CALMAutoencoder


def test_gradient_flows_through_backbone_and_head():
    model = tiny_model(patch_size=2)
    model.train()
    ids = torch.randint(0, 90, (2, 12))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert model.transformer.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.embed_proj[0].weight.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.ae_model.parameters())


def test_gradient_checkpointing_recomputes_each_layer_with_the_same_gradients():
    """What `Trainer(gradient_checkpointing=True)` turns on: the same loss and gradients, each layer recomputed."""
    ids = torch.randint(0, 90, (2, 16))

    def loss_and_grads(checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
        model = tiny_model().train()
        calls = []
        if checkpointing:
            model.gradient_checkpointing_enable()
            for layer in model.transformer.layers:  # count the layers that go through the checkpoint function
                checkpoint = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = lambda *a, _f=checkpoint, **k: calls.append(1) or _f(*a, **k)
        torch.manual_seed(1)  # the same noise for the energy loss
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads, len(calls)

    loss, grads, _ = loss_and_grads(False)
    checkpointed_loss, checkpointed_grads, calls = loss_and_grads(True)
    assert calls == tiny_config().num_hidden_layers
    assert checkpointed_loss == loss and grads.keys() == checkpointed_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_samples_share_the_hidden_state_projection(dtype):
    """sample(hidden [B, d], num_samples=N) projects each hidden state once: the same samples as N expanded copies
    (to rounding), the same draws from a generator, and a clear error for noise of the wrong shape."""
    head = tiny_model().generative_head.to(dtype)
    hidden = torch.randn(3, head.hidden_embd.in_features, dtype=dtype)
    noise = torch.rand(3, 5, head.noise_size) - 0.5
    with torch.no_grad():
        shared = head.sample(hidden, noise, num_samples=5)  # [3, 5, l]
        expanded = head.sample(hidden.unsqueeze(1).expand(3, 5, -1), noise)
        drawn = head.sample(hidden, generator=torch.Generator().manual_seed(0), num_samples=5)
        redrawn = head.sample(hidden.unsqueeze(1).expand(3, 5, -1), generator=torch.Generator().manual_seed(0))
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.05}
    assert shared.shape == (3, 5, head.final_layer.linears[-1].out_features)
    torch.testing.assert_close(shared, expanded, **tolerance)
    torch.testing.assert_close(drawn, redrawn, **tolerance)
    with pytest.raises(ValueError, match=r"noise must have shape \(3, 5, 8\)"):
        head.sample(hidden, noise[:, :4], num_samples=5)


def test_every_linear_is_a_plain_nn_linear():
    """The model's modules stay standard, so that peft, quantizers and offload hooks see what they expect, and bf16
    outputs are F.linear's."""
    model = tiny_model().bfloat16()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)
    x = torch.randn(1, 1, model.config.hidden_size, dtype=torch.bfloat16)
    layer = model.transformer.layers[0].mlp.gate_proj
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))


def test_loaded_model_has_a_frozen_autoencoder(tmp_path):
    """Built or loaded, the autoencoder is frozen: only the backbone, embed_proj and the head train (and
    num_parameters(only_trainable=True) counts them alone)."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = CALMForCausalLM.from_pretrained(tmp_path)
    for candidate in (model, loaded):
        assert not any(p.requires_grad for p in candidate.ae_model.parameters())
        trainable = sum(p.numel() for n, p in candidate.named_parameters() if not n.startswith("ae_model."))
        assert candidate.num_parameters(only_trainable=True) == trainable


def test_token_logits_do_not_exist_and_say_so():
    """CALM has no token logits: `.logits` and output_logits name the problem and what to use instead."""
    model = tiny_model()
    out = model(torch.tensor([[5, 6, 7, 8]]))
    with pytest.raises(AttributeError, match="CALM has no token logits.*generate_until.*calm-eval"):
        _ = out.logits
    with pytest.raises(ValueError, match="CALM has no token logits"):
        model(torch.tensor([[5, 6, 7, 8]]), output_logits=True)


def test_labels_minus_100_skip_chunks():
    model = tiny_model(patch_size=4)
    ids = torch.randint(0, 90, (1, 16))
    labels = ids.clone()
    labels[:, 12:] = -100  # the last target chunk is skipped
    draws = dict(loss_noise=(torch.randn(100, 2, 8), torch.rand(4, 2, 8) - 0.5))
    with torch.no_grad():
        skipped = model(ids, labels=labels, **draws).loss
        shorter = model(ids[:, :12], labels=ids[:, :12], **draws).loss
    torch.testing.assert_close(skipped, shorter)


def test_config_errors():
    ae = CALMAutoencoderConfig(vocab_size=96, latent_size=8, patch_size=4)
    with pytest.raises(ValueError, match="latent_size"):
        CALMConfig(vocab_size=96, latent_size=16, patch_size=4, autoencoder_config=ae)
    with pytest.raises(ValueError, match="patch_size"):
        CALMConfig(vocab_size=96, latent_size=8, patch_size=2, autoencoder_config=ae)
    with pytest.raises(ValueError, match="vocab_size"):
        CALMConfig(vocab_size=97, latent_size=8, patch_size=4, autoencoder_config=ae)
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        tiny_config(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="divisible by num_key_value_heads"):
        tiny_config(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="positive integer"):
        tiny_config(num_mlp_layers=0)
    with pytest.raises(ValueError, match="positive integer"):
        CALMAutoencoderConfig(hidden_size=-1)


def test_config_has_no_generation_parameters(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)  # transformers 5 refuses configs with generation parameters
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {"temperature", "max_length", "top_k", "do_sample"} & set(saved)
    assert CALMConfig.from_pretrained(tmp_path).autoencoder_config.latent_size == 8


def test_input_errors():
    model = tiny_model(patch_size=4)
    with pytest.raises(ValueError, match="not a multiple of patch_size=4"):
        model(torch.randint(0, 90, (1, 6)))
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        model(torch.randint(0, 90, (8,)))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.full((1, 8), 96))
    with pytest.raises(ValueError, match="out of range"):
        model.ae_model.encode(torch.full((1, 8), -1))
    with pytest.raises(ValueError, match="latent_size=8"):
        model.ae_model.decode(torch.zeros(1, 2, 5))


def test_root_config_is_calm_m():
    saved = json.loads((REPO / "config.json").read_text())
    assert set(saved) <= set(CALMConfig().to_dict()) | {"auto_map", "architectures", "transformers_version"}, "stale"
    assert saved["auto_map"]["AutoModel"] == saved["auto_map"]["AutoModelForCausalLM"]
    config = CALMConfig.from_pretrained(REPO)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (1024, 2752, 16)
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_mlp_layers) == (16, 16, 4)
    assert config.autoencoder_config.vocab_size == 128257 and config.autoencoder_config.latent_size == 128
    with torch.device("meta"):
        model = CALMForCausalLM(config)
    lm = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("ae_model."))
    ae = sum(p.numel() for p in model.ae_model.parameters())
    assert round(lm / 1e6) == 372 and round(ae / 1e6) == 76  # spec: 371M (+75M autoencoder)


def test_reference_checkpoint_errors(tmp_path):
    from calm_transformers.convert_checkpoint import CheckpointError, load_reference_checkpoint

    fixture = require_shared()
    with pytest.raises(CheckpointError, match="autoencoder checkpoint, not a CALM"):
        load_reference_checkpoint(fixture / "autoencoder")
    # A CALM checkpoint without ae_model.* weights and no autoencoder folder.
    sd = torch.load(fixture / "calm" / "pytorch_model.bin", weights_only=True)
    (tmp_path / "calm").mkdir()
    (tmp_path / "calm" / "config.json").write_text((fixture / "calm" / "config.json").read_text())
    torch.save({k: v for k, v in sd.items() if not k.startswith("ae_model.")}, tmp_path / "calm" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no autoencoder weights"):
        load_reference_checkpoint(tmp_path / "calm")
    # Unexpected keys are named.
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "calm" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unexpected keys.*extra.weight"):
        load_reference_checkpoint(tmp_path / "calm")
    # The autoencoder's own weights (no ae_model.* in the CALM file) are enough.
    torch.save({k: v for k, v in sd.items() if not k.startswith("ae_model.")}, tmp_path / "calm" / "pytorch_model.bin")
    model = load_reference_checkpoint(tmp_path / "calm", fixture / "autoencoder")
    assert isinstance(model, CALMForCausalLM)

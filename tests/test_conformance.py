"""CALM behaves as transformers' own models do where a user (or transformers' common model tests) can tell:
output flags from the config, tuples with return_dict=False, loading info, composite configs, torch.export."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from calm_transformers import CALMAutoencoder, CALMConfig, CALMForCausalLM
from conftest import require_shared, run_python, tiny_config, tiny_model
from packaging import version

TRANSFORMERS_5 = version.parse(transformers.__version__).major >= 5


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def ids():
    return torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))


def test_output_flags_default_to_the_config(model, ids):
    """output_hidden_states / output_attentions left at None read config.output_*, as for LlamaForCausalLM."""
    model.config._attn_implementation = "eager"  # attention weights are returned by eager attention only
    assert model(ids).hidden_states is None and model(ids).attentions is None
    model.config.output_hidden_states = model.config.output_attentions = True
    out = model(ids)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert len(out.attentions) == model.config.num_hidden_layers
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    out = model(ids, labels=ids)  # the training forward too
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1 and out.loss is not None
    assert model(ids, output_hidden_states=False).hidden_states is None  # an explicit argument wins


@pytest.mark.skipif(not TRANSFORMERS_5, reason="capturing chosen layers is a transformers 5 feature of LlamaModel")
def test_output_hidden_states_of_chosen_layers(model, ids):
    every = model(ids, output_hidden_states=True).hidden_states
    chosen = model(ids, output_hidden_states=[0, -1]).hidden_states
    assert len(chosen) == len(every) and chosen[1] is None
    assert torch.equal(chosen[0], every[0]) and torch.equal(chosen[-1], every[-1])


def test_return_dict_false_gives_tuples(model, ids):
    def seeded(module, **kwargs):  # the loss draws noise: the same draws for both calls
        torch.manual_seed(0)
        return module(ids, **kwargs)

    out = seeded(model, labels=ids, return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], seeded(model, labels=ids).loss)
    model.config.return_dict = False
    out = model(ids)
    assert isinstance(out, tuple) and torch.equal(out[0], model(ids, return_dict=True).last_hidden_state)
    ae = CALMAutoencoder(model.config.autoencoder_config)
    out = seeded(ae, labels=ids, return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], seeded(ae, labels=ids).loss)


def test_from_pretrained_with_loading_info(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded, info = CALMForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, CALMForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(p.requires_grad for p in loaded.ae_model.parameters())  # the autoencoder stays frozen


def test_composite_config_round_trips():
    """The nested autoencoder config is written whole by to_dict and read back, as transformers' composite configs."""

    def saved(config) -> dict:
        # transformers 4.57 writes the attention implementation asked for at load time (None here) into to_dict.
        fields = {k: v for k, v in config.to_dict().items() if k not in ("attn_implementation", "transformers_version")}
        if isinstance(fields.get("autoencoder_config"), dict):
            fields["autoencoder_config"] = saved(
                CALMConfig.sub_configs["autoencoder_config"](**fields["autoencoder_config"])
            )
        return fields

    config = tiny_config()
    nested = config.to_dict()["autoencoder_config"]  # a plain dict with every field, as transformers' composite configs
    assert set(config.autoencoder_config.to_dict()) - {"transformers_version"} <= set(nested)
    assert saved(config)["autoencoder_config"] == saved(config.autoencoder_config)
    assert saved(CALMConfig.from_dict(config.to_dict())) == saved(config)


def test_torch_export_of_forward(model, ids):
    """forward traces without data-dependent branches (the id range check runs in eager mode only)."""
    assert CALMForCausalLM._can_compile_fullgraph
    exported = torch.export.export(model, (ids,), kwargs={"use_cache": False})
    got = exported.module()(ids, use_cache=False)
    got = got.last_hidden_state if hasattr(got, "last_hidden_state") else got[0]
    torch.testing.assert_close(got, model(ids, use_cache=False).last_hidden_state)


def test_folders_of_other_models_are_refused(model, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "llama")
    with pytest.raises(
        ValueError, match="not a CALMConfig .model_type 'llama', LlamaForCausalLM.*AutoModelForCausalLM"
    ):
        CALMForCausalLM.from_pretrained(tmp_path / "llama")
    # A CALM folder holds an autoencoder: CALMAutoencoder loads it from there (transformers' nested-config lookup).
    model.save_pretrained(tmp_path / "calm")
    ae = CALMAutoencoder.from_pretrained(tmp_path / "calm")
    assert torch.equal(ae.encoder.squeeze_layer.weight, model.ae_model.encoder.squeeze_layer.weight)
    ae.save_pretrained(tmp_path / "autoencoder")
    with pytest.raises(ValueError, match="not a CALMConfig .model_type 'calm_autoencoder'.*CALMAutoencoder"):
        CALMForCausalLM.from_pretrained(tmp_path / "autoencoder")
    with pytest.raises(ValueError, match="checkpoint of the authors' code.*calm-convert"):
        CALMForCausalLM.from_pretrained(require_shared() / "calm")


@pytest.mark.slow
def test_autoencoder_of_a_remote_code_model_saves_with_its_auto_map(model, tmp_path):
    """An autoencoder saved from a model that was itself loaded with remote code loads with remote code alone."""
    model.save_pretrained(tmp_path / "calm")
    code = f"""
import json, torch
from transformers import AutoModel, AutoModelForCausalLM
calm = AutoModelForCausalLM.from_pretrained({str(tmp_path / "calm")!r}, trust_remote_code=True)
assert type(calm).__module__.startswith("transformers_modules"), type(calm).__module__
calm.ae_model.save_pretrained({str(tmp_path / "ae")!r})
print(json.dumps(json.load(open({str(tmp_path / "ae" / "config.json")!r}))["auto_map"]))
ae = AutoModel.from_pretrained({str(tmp_path / "ae")!r}, trust_remote_code=True)
ids = torch.randint(3, 90, (1, 8))
assert torch.equal(ae.encode(ids)[0], calm.ae_model.encode(ids)[0])
"""
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    auto_map = json.loads(run_python(code, cwd=tmp_path, env_extra=env).splitlines()[-1])
    assert auto_map["AutoConfig"].endswith("CALMAutoencoderConfig") and auto_map["AutoModel"].endswith(
        "CALMAutoencoder"
    )


def test_resizing_the_vocabulary_is_refused(model):
    """resize_token_embeddings would leave the autoencoder with the old vocabulary: a clear error, not a broken
    model; resizing to the same size (as some tools do) is a no-op."""
    assert model.resize_token_embeddings(model.config.vocab_size) is model.get_input_embeddings()
    with pytest.raises(NotImplementedError, match="cannot resize its vocabulary .96 -> 106.*--stage autoencoder"):
        model.resize_token_embeddings(106)
    assert model.get_input_embeddings().num_embeddings == 96

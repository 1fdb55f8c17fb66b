"""Load the authors' CALM checkpoints (spec section 6) into `CALMForCausalLM`.

The authors' training scripts save `config.json` + pickled `pytorch_model.bin` (possibly sharded); released Hub
repos may hold safetensors instead. Pickles are only ever opened with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

try:  # as part of the installed package
    from .configuration_calm import CALMAutoencoderConfig, CALMConfig
    from .modeling_calm import CALMAutoencoder, CALMForCausalLM
except ImportError:  # run as a script from the repository root
    from configuration_calm import CALMAutoencoderConfig, CALMConfig
    from modeling_calm import CALMAutoencoder, CALMForCausalLM

# Fields of the authors' configs that are not model architecture (or that we set ourselves).
_DROPPED_FIELDS = ("architectures", "ae_path", "model_type", "torch_dtype", "dtype", "transformers_version",
                   "pretraining_tp", "_name_or_path", "auto_map")
AE_PREFIX = "ae_model."


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as the authors' CALM or autoencoder checkpoint."""


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a checkpoint folder?")
    return json.loads(path.read_text())


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: model.safetensors, pytorch_model.bin, or either sharded with an index."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _load_pickle),
    ):
        index_path = folder / index_name
        if index_path.is_file():
            shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            state_dict: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise CheckpointError(f"{index_path} lists the shard {shard}, which is missing from {folder}.")
                state_dict.update(loader(str(folder / shard)))
            return state_dict
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return _load_pickle(str(folder / "pytorch_model.bin"))
    raise CheckpointError(
        f"no weights in {folder}: expected model.safetensors, pytorch_model.bin, or a sharded index "
        "(model.safetensors.index.json / pytorch_model.bin.index.json)."
    )


def _load_pickle(path: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an UnpicklingError for anything but plain tensors
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint (weights_only=True failed: "
            f"{str(error).splitlines()[0]}). Only load pickles from sources you trust."
        ) from error


def autoencoder_config_from_reference(ae_config: dict[str, Any]) -> CALMAutoencoderConfig:
    fields = {k: v for k, v in ae_config.items() if k not in _DROPPED_FIELDS}
    return CALMAutoencoderConfig(**fields)


def config_from_reference(calm_config: dict[str, Any], ae_config: dict[str, Any]) -> CALMConfig:
    """Translate the authors' `EnergyTransformer` config (+ autoencoder config) into a `CALMConfig`."""
    head_type = calm_config.get("model_type", "energy")
    if head_type != "energy":
        raise NotImplementedError(
            f"this checkpoint has a {head_type!r} generative head; only the energy head is supported yet "
            "(the diffusion and flow-matching heads of the reference code are not)."
        )
    fields = {k: v for k, v in calm_config.items() if k not in _DROPPED_FIELDS}
    return CALMConfig(**fields, head_type="energy", autoencoder_config=autoencoder_config_from_reference(ae_config))


def state_dict_from_reference(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The authors' keys -> ours: drop the duplicated head (`mlp_generator.*` = `generative_head.*`) and the tied
    `decoder.lm_head_weight` (= the encoder embedding), after checking that the copies agree."""
    state_dict = dict(state_dict)
    for key in [k for k in state_dict if k.startswith("mlp_generator.")]:
        twin = "generative_head." + key[len("mlp_generator.") :]
        copy = state_dict.pop(key)
        if twin not in state_dict:
            state_dict[twin] = copy
        elif not torch.equal(copy, state_dict[twin]):
            raise CheckpointError(f"{key} and {twin} should be the same tensor but differ.")
    tied = prefix + "decoder.lm_head_weight"
    if tied in state_dict:
        head = state_dict.pop(tied)
        embedding = state_dict.get(prefix + "encoder.embed_tokens.weight")
        if embedding is not None and not torch.equal(head, embedding):
            raise CheckpointError(f"{tied} differs from {prefix}encoder.embed_tokens.weight; they should be tied.")
    return state_dict


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into `model`, with errors that list missing / unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(
                f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
            )
        hint = ""
        if missing and all(k.startswith(AE_PREFIX) for k in missing):
            hint = " The autoencoder weights are missing: pass the autoencoder folder (--autoencoder)."
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts) + "." + hint)
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"shape mismatch for {key} in {source}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[key].shape)}."
            )
    model.load_state_dict(state_dict, strict=True)


def load_reference_autoencoder(folder: str | Path, dtype: torch.dtype | None = None) -> CALMAutoencoder:
    """The authors' autoencoder folder (`architectures: ["Autoencoder"]`) as a `CALMAutoencoder`."""
    config = read_config(folder)
    if "Autoencoder" not in (config.get("architectures") or ["Autoencoder"]):
        raise CheckpointError(f"{folder} is not an autoencoder checkpoint (architectures: {config.get('architectures')}).")
    model = CALMAutoencoder(autoencoder_config_from_reference(config))
    load_into(model, state_dict_from_reference(read_state_dict(folder)), str(folder))
    return model.to(dtype) if dtype is not None else model


def load_reference_checkpoint(
    calm_folder: str | Path, autoencoder_folder: str | Path | None = None, dtype: torch.dtype | None = None
) -> CALMForCausalLM:
    """Build a `CALMForCausalLM` from the authors' CALM checkpoint folder.

    The autoencoder comes from `autoencoder_folder` when given (its weights win over any `ae_model.*` tensors in
    the CALM checkpoint, which must then agree with them), else from the `ae_model.*` weights inside the CALM
    checkpoint. The config's `ae_path` (a path on the authors' machines) is ignored.
    """
    calm_config = read_config(calm_folder)
    architectures = calm_config.get("architectures") or []
    if "Autoencoder" in architectures:
        raise CheckpointError(
            f"{calm_folder} holds an autoencoder checkpoint, not a CALM language model; pass it as the autoencoder."
        )
    state_dict = state_dict_from_reference(read_state_dict(calm_folder), prefix=AE_PREFIX)
    if autoencoder_folder is not None:
        ae_config = read_config(autoencoder_folder)
        if "Autoencoder" not in (ae_config.get("architectures") or ["Autoencoder"]):
            raise CheckpointError(f"{autoencoder_folder} is not an autoencoder checkpoint.")
        ae_state = state_dict_from_reference(read_state_dict(autoencoder_folder))
        for key, tensor in ae_state.items():
            inner = state_dict.get(AE_PREFIX + key)
            if inner is not None and (inner.shape != tensor.shape or not torch.equal(inner, tensor)):
                raise CheckpointError(
                    f"the CALM checkpoint's {AE_PREFIX}{key} differs from the autoencoder folder's {key}: "
                    "they are different autoencoders. Pass the autoencoder the model was trained with."
                )
            state_dict[AE_PREFIX + key] = tensor
    else:
        if not any(k.startswith(AE_PREFIX) for k in state_dict):
            raise CheckpointError(
                f"{calm_folder} holds no autoencoder weights (ae_model.*) and none was given: pass the autoencoder "
                "folder (--autoencoder / autoencoder_folder)."
            )
        ae_config = _autoencoder_config_from_weights(calm_config, state_dict)
    model = CALMForCausalLM(config_from_reference(calm_config, ae_config))
    load_into(model, state_dict, str(calm_folder))
    model.eval()
    return model.to(dtype) if dtype is not None else model


def _autoencoder_config_from_weights(calm_config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict:
    """Without the autoencoder's config.json, read its shape off the `ae_model.*` tensors."""
    embed = state_dict[AE_PREFIX + "encoder.embed_tokens.weight"]
    gate = state_dict[AE_PREFIX + "encoder.encoder_layers.0.mlp.gate_proj.weight"]

    def count(prefix: str) -> int:
        return len({k.split(".")[3] for k in state_dict if k.startswith(AE_PREFIX + prefix)})

    return {
        "vocab_size": embed.shape[0],
        "hidden_size": embed.shape[1],
        "intermediate_size": gate.shape[0],
        "num_encoder_layers": count("encoder.encoder_layers."),
        "num_decoder_layers": count("decoder.decoder_layers."),
        "latent_size": state_dict[AE_PREFIX + "decoder.latent_to_hidden.weight"].shape[1],
        "patch_size": calm_config.get("patch_size", 4),
        "rms_norm_eps": calm_config.get("rms_norm_eps", 1e-6),
        "pad_token_id": calm_config.get("pad_token_id"),
        "bos_token_id": calm_config.get("bos_token_id"),
        "eos_token_id": calm_config.get("eos_token_id"),
    }

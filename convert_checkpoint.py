"""Convert the authors' CALM checkpoints into a safe, self-contained Hub model folder.

    calm-convert --calm DIR [--autoencoder DIR] --output DIR [--tokenizer DIR] [--dtype bfloat16] \
        [--max-shard-size 5GB] [--push-to-hub REPO_ID [--private]] [--force] [--no-verify]

(or `python -m calm_transformers.convert_checkpoint ...`).

Reading: the authors' training scripts save `config.json` + pickled `pytorch_model.bin` (possibly sharded); released
Hub repos may hold safetensors instead. Pickles are only ever opened with `torch.load(..., weights_only=True)`.
`load_reference_checkpoint` builds a `CALMForCausalLM` from such a folder.

Writing: `convert` saves that model with `save_pretrained` (safetensors, sharded above `max_shard_size`, with the
code files `trust_remote_code` needs and CALM's generation defaults), adds the tokenizer (with `[PAD]`) and a model
card, checks the result in a fresh process, and only then moves it into place.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .configuration_calm import AUTHORS_ARCHITECTURES, HEAD_TYPES, CALMAutoencoderConfig, CALMConfig
from .modeling_calm import CALMForCausalLM
from .utils_calm import DTYPES, save_tokenizer

# Fields of the authors' configs that are not model architecture (or that we set ourselves).
_DROPPED_FIELDS = (
    "architectures",
    "ae_path",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "pretraining_tp",
    "_name_or_path",
    "auto_map",
)
AE_PREFIX = "ae_model."
# The authors' CALM classes and their generative heads (`CALMConfig.head_type`).
AUTHORS_HEADS = dict(zip(AUTHORS_ARCHITECTURES, HEAD_TYPES, strict=True))

# Verification compares the converted folder, loaded in a fresh process, with the source model cast to the output
# dtype: the same code on the same weights, so the difference is normally exactly 0. float32 allows an absolute 1e-5;
# bfloat16 / float16 allow about one unit of their precision, relative to the output's largest magnitude.
VERIFY_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
PAD_TOKEN = "[PAD]"
PAPER_URL = "https://arxiv.org/abs/2510.27688"
CODE_URL = "https://github.com/shaochenze/calm"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as the authors' CALM or autoencoder checkpoint."""


class ConversionError(RuntimeError):
    """The output cannot be written as asked, or the written folder does not reproduce the source model."""


# ----------------------------------------------------------------------------------------------------------------
# Reading the authors' checkpoints


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a checkpoint folder?")
    return json.loads(path.read_text())


def read_state_dict(folder: str | Path, progress: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: model.safetensors, pytorch_model.bin, or either sharded with an index."""
    folder = Path(folder)
    files, loader = _weight_files(folder)
    state_dict: dict[str, torch.Tensor] = {}
    for path in tqdm(files, desc=f"Loading {folder.name}", unit="file", disable=not progress):
        state_dict.update(loader(str(path)))
    return state_dict


def _weight_files(folder: Path) -> tuple[list[Path], Any]:
    for index_name, loader in (
        ("model.safetensors.index.json", _load_safetensors),
        ("pytorch_model.bin.index.json", _load_pickle),
    ):
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path} has no weight_map; it is not a sharded checkpoint index.")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (folder / shard).is_file():
                    raise CheckpointError(f"{index_path} lists the shard {shard}, which is missing from {folder}.")
            return [folder / shard for shard in shards], loader
    for name, loader in (("model.safetensors", _load_safetensors), ("pytorch_model.bin", _load_pickle)):
        if (folder / name).is_file():
            return [folder / name], loader
    raise CheckpointError(
        f"no weights in {folder}: expected model.safetensors, pytorch_model.bin, or a sharded index "
        "(model.safetensors.index.json / pytorch_model.bin.index.json)."
    )


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as error:  # a truncated or corrupted file
        raise CheckpointError(f"could not read {path} as safetensors: {error}") from error


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
    """Translate the authors' CALM config (+ autoencoder config) into a `CALMConfig` with the checkpoint's head."""
    fields = {k: v for k, v in calm_config.items() if k not in _DROPPED_FIELDS}
    return CALMConfig(
        **fields, head_type=head_type_of(calm_config), autoencoder_config=autoencoder_config_from_reference(ae_config)
    )


def head_type_of(calm_config: dict[str, Any]) -> str:
    """The generative head of one of the authors' CALM configs: their saved configs name it only in `architectures`
    (`model_type` is dropped on saving, CALM_SPEC section 9.1); an explicit `model_type` (a hand-edited config) is
    honoured, and must agree with `architectures`."""
    from_architectures = {AUTHORS_HEADS[a] for a in calm_config.get("architectures") or [] if a in AUTHORS_HEADS}
    model_type = calm_config.get("model_type") or None
    if len(from_architectures) > 1 or (model_type and from_architectures and {model_type} != from_architectures):
        raise CheckpointError(
            f"the config's architectures {calm_config.get('architectures')} and model_type {model_type!r} name "
            "different generative heads; fix config.json to name one."
        )
    return model_type or (from_architectures.pop() if from_architectures else "energy")


def check_calm_config(calm_config: dict[str, Any], folder: str | Path) -> None:
    """Fail before reading any weights when `folder` is not one of the authors' CALM checkpoints.

    Their config's `model_type`, when there is one, names the generative head ("energy", "diffusion" or "flow"), not
    a transformers model.
    """
    architectures = calm_config.get("architectures") or []
    if "Autoencoder" in architectures:
        raise CheckpointError(
            f"{folder} holds an autoencoder checkpoint, not a CALM language model; pass it as the autoencoder."
        )
    head_type = head_type_of(calm_config)
    if head_type not in HEAD_TYPES or (architectures and not set(architectures) & set(AUTHORS_HEADS)):
        hint = " It is already converted: load it with from_pretrained." if head_type == "calm" else ""
        raise CheckpointError(
            f"{folder} is not the authors' CALM checkpoint (model_type {head_type!r}, architectures {architectures}); "
            f"expected architectures {sorted(AUTHORS_HEADS)} (model_type, if any, 'energy', 'diffusion' or 'flow')."
            f"{hint}"
        )


def check_autoencoder_config(ae_config: dict[str, Any], folder: str | Path) -> None:
    if "Autoencoder" not in (ae_config.get("architectures") or ["Autoencoder"]):
        raise CheckpointError(
            f"{folder} is not an autoencoder checkpoint (architectures: {ae_config.get('architectures')})."
        )


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
        for kind, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{kind} keys ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}")
        hint = ""
        if missing and all(k.startswith(AE_PREFIX) for k in missing):
            hint = " The autoencoder weights are missing: pass the autoencoder folder (--autoencoder)."
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts) + "." + hint)
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"shape mismatch for {key} in {source}: checkpoint {tuple(tensor.shape)}, "
                f"model {tuple(expected[key].shape)}."
            )
    model.load_state_dict(state_dict, strict=True)


def load_reference_checkpoint(
    calm_folder: str | Path,
    autoencoder_folder: str | Path | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> CALMForCausalLM:
    """Build a `CALMForCausalLM` from the authors' CALM checkpoint folder.

    The autoencoder comes from `autoencoder_folder` when given (its weights win over any `ae_model.*` tensors in
    the CALM checkpoint, which must then agree with them), else from the `ae_model.*` weights inside the CALM
    checkpoint. The config's `ae_path` (a path on the authors' machines) is ignored.
    """
    calm_config = read_config(calm_folder)
    check_calm_config(calm_config, calm_folder)
    if autoencoder_folder is not None:
        ae_config = read_config(autoencoder_folder)
        check_autoencoder_config(ae_config, autoencoder_folder)
    state_dict = state_dict_from_reference(read_state_dict(calm_folder, progress), prefix=AE_PREFIX)
    if autoencoder_folder is not None:
        ae_state = state_dict_from_reference(read_state_dict(autoencoder_folder, progress))
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


# ----------------------------------------------------------------------------------------------------------------
# Writing a self-contained model folder


def convert(
    calm: str | Path,
    output: str | Path,
    autoencoder: str | Path | None = None,
    tokenizer: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    verify: bool = True,
    push_to_hub: str | None = None,
    private: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the authors' checkpoint folder(s) into a model folder that loads with `trust_remote_code=True`.

    Everything is written to a temporary folder beside `output`, verified, and only then renamed to `output`: an
    interrupted or failed run leaves no half-written folder, and with `force` an existing `output` is replaced only
    once the new one is complete. `dtype` defaults to the checkpoint's own (`torch_dtype` in its config.json).
    The tokenizer comes from `tokenizer`, else from tokenizer files in the CALM folder; without one, the folder
    has no tokenizer. Returns the output folder.
    """
    output_as_given = output  # for the conversion command in the model card
    calm, output = Path(calm), Path(output).absolute()  # absolute: `--output .` still has a name and a parent
    autoencoder = Path(autoencoder) if autoencoder is not None else None
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    for flag, folder in (("--calm", calm), ("--autoencoder", autoencoder), ("--tokenizer", tokenizer)):
        if folder is not None and not folder.is_dir():
            raise CheckpointError(f"{flag} {folder}: no such folder.")
    _check_output(output, [calm, autoencoder, tokenizer], force)
    calm_config = read_config(calm)
    check_calm_config(calm_config, calm)
    torch_dtype = resolve_dtype(dtype, calm_config)
    if tokenizer is None and any((calm / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = calm
    # The tokenizer first: it is quick to load and to check against the config, the weights are not.
    tok = load_tokenizer(tokenizer, calm_config) if tokenizer is not None else None
    if tok is None:
        print(f"warning: no tokenizer in {calm} and no --tokenizer: the output will have no tokenizer files.")

    model = load_reference_checkpoint(calm, autoencoder, progress=progress)
    # float32 outputs before the cast, to report what the lower precision costs (informational only).
    float32_outputs = None
    if verify and torch_dtype != torch.float32:
        float32_outputs = probe_outputs(model, make_probe(model.config))
    dtype_name = str(torch_dtype).removeprefix("torch.")
    # Parameters only: like from_pretrained(dtype=...), which leaves the float32 rotary buffers alone.
    parameters = list(model.parameters())
    for param in tqdm(parameters, desc=f"Converting to {dtype_name}", unit="tensor", disable=not progress):
        param.data = param.data.to(torch_dtype)
    command = _conversion_command(
        calm, autoencoder, tokenizer if tokenizer != calm else None, output_as_given, dtype_name, max_shard_size,
        push_to_hub, private,
    )  # fmt: skip

    def card() -> str:
        return model_card(model, push_to_hub or output.name, shlex.join(command), tok is not None)

    _write_folder(model, tok, output, force, card, float32_outputs, verify, max_shard_size)
    if push_to_hub:
        push_folder_to_hub(output, push_to_hub, private)
    return output


def _write_folder(
    model: CALMForCausalLM,
    tok: Any,
    output: Path,
    force: bool,
    card: Callable[[], str],
    float32_outputs: dict[str, torch.Tensor] | None,
    verify: bool,
    max_shard_size: int | str,
) -> None:
    """Write weights, tokenizer and card to a temporary folder beside `output`, verify it, then rename it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        print(f"Writing {output} (via {staging.name})")
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        _check_saved_weights(staging, model)
        if tok is not None:
            save_tokenizer(tok, staging)
        (staging / "README.md").write_text(card(), encoding="utf-8")
        if verify:
            verify_conversion(model, staging, float32_outputs)
        _match_umask(staging)
        _move_into_place(staging, output, force)
    except BaseException:  # also KeyboardInterrupt: never leave a half-written folder behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"Wrote {output}")


def _conversion_command(
    calm: Path,
    autoencoder: Path | None,
    tokenizer: Path | None,
    output: str | Path,
    dtype_name: str,
    max_shard_size: int | str,
    push_to_hub: str | None,
    private: bool,
) -> list[str]:
    """The `calm-convert` command that reproduces a conversion, for the model card."""
    command = ["calm-convert", "--calm", str(calm)]
    for flag, value in (("--autoencoder", autoencoder), ("--tokenizer", tokenizer)):
        if value is not None:
            command += [flag, str(value)]
    command += ["--output", str(output), "--dtype", dtype_name]
    if str(max_shard_size) != "5GB":
        command += ["--max-shard-size", str(max_shard_size)]
    if push_to_hub:
        command += ["--push-to-hub", push_to_hub] + (["--private"] if private else [])
    return command


def resolve_dtype(dtype: str | torch.dtype | None, calm_config: dict[str, Any]) -> torch.dtype:
    """The output dtype: `dtype` if given, else the checkpoint's own (float32 when its config does not say)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConversionError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}.")
        return dtype
    if dtype is None:
        return DTYPES.get(calm_config.get("torch_dtype") or calm_config.get("dtype"), torch.float32)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def _check_output(output: Path, inputs: list[Path | None], force: bool) -> None:
    resolved = output.resolve()
    for folder in inputs:
        if folder is not None and (folder.resolve() == resolved or resolved in folder.resolve().parents):
            raise ConversionError(f"--output {output} would replace the input folder {folder}; choose another output.")
    if not os.path.lexists(output):
        return
    if not force:
        raise ConversionError(
            f"{output} already exists; pass --force to replace it (the old folder is kept until the new one is "
            "complete)."
        )
    # --force replaces an earlier conversion, not an arbitrary folder given by mistake.
    if not output.is_dir() or (any(output.iterdir()) and not (output / "config.json").is_file()):
        raise ConversionError(
            f"refusing to replace {output}: it is not a model folder (no config.json). Choose another output."
        )


def _match_umask(folder: Path) -> None:
    """mkdtemp makes the staging folder private (0700); give the output the permissions of any new folder."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _move_into_place(staging: Path, output: Path, force: bool) -> None:
    """Rename the complete `staging` folder to `output`; an old `output` is set aside until that has succeeded."""
    if not os.path.lexists(output):
        os.rename(staging, output)
        return
    if not force:  # it appeared while we were converting
        raise ConversionError(f"{output} appeared during the conversion; pass --force to replace it.")
    backup = output.with_name(f".{output.name}.replaced-{staging.name.rsplit('-', 1)[-1]}")
    os.rename(output, backup)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(backup, output)
        raise
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup)
    else:
        backup.unlink()


def _check_saved_weights(folder: Path, model: torch.nn.Module) -> None:
    """Every tensor of the model is saved exactly once (no duplicated head or tied copies, nothing missing)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    saved: dict[str, str] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                if key in saved:
                    raise ConversionError(f"{key} is saved twice, in {saved[key]} and {name}.")
                saved[key] = name
    expected = set(model.state_dict())
    if set(saved) != expected:
        raise ConversionError(
            f"the saved weights do not match the model: missing {sorted(expected - set(saved))[:10]}, "
            f"extra {sorted(set(saved) - expected)[:10]}."
        )


def load_tokenizer(folder: str | Path, calm_config: dict[str, Any]) -> Any:
    """The tokenizer in `folder`, made to match the model: `[PAD]` added if it has no pad token, padding on the left
    (generation left-pads batches). Raises if its vocabulary or special tokens do not match the model's config."""
    from transformers import AutoTokenizer, PretrainedConfig

    try:
        # A bare config: the folder's config.json may be the authors' (model_type "energy" is not a transformers
        # model type), which AutoTokenizer must not try to read.
        tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left", config=PretrainedConfig())
    except Exception as error:
        raise CheckpointError(
            f"could not load a tokenizer from {folder}: {error}. "
            "(A Llama 3 tokenizer.model needs `pip install tiktoken`.)"
        ) from error
    if tokenizer.pad_token is None:
        # The released models add one `[PAD]` token after the Llama 3 vocabulary (id 128256).
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    vocab_size = calm_config.get("vocab_size")
    if len(tokenizer) != vocab_size:
        raise CheckpointError(
            f"the tokenizer in {folder} has {len(tokenizer)} tokens (with its pad token), but the model's embeddings "
            f"have {vocab_size} rows: it is not the tokenizer this model was trained with. Pass the right --tokenizer "
            "(the released CALM models use the Llama 3 tokenizer, to which [PAD] is added)."
        )
    for name in ("pad", "bos", "eos"):
        model_id, token_id = calm_config.get(f"{name}_token_id"), getattr(tokenizer, f"{name}_token_id")
        model_ids = model_id if isinstance(model_id, list) else [model_id]
        if model_id is not None and token_id is not None and token_id not in model_ids:
            raise CheckpointError(
                f"the tokenizer's {name} token {getattr(tokenizer, f'{name}_token')!r} has id {token_id}, but the "
                f"model's {name}_token_id is {model_id}: pass the tokenizer the model was trained with."
            )
    return tokenizer


MODEL_CARD = """---
library_name: transformers
pipeline_tag: text-generation
tags:
- calm
- continuous-autoregressive-language-model
- custom_code
---

# {name}

A CALM (Continuous Autoregressive Language Model) in the Hugging Face `transformers` format. CALM
([Shao, Li, Meng and Zhou, 2025]({paper_url})) predicts one continuous vector per chunk of
{k} tokens instead of one token at a time: an autoencoder maps each chunk to a vector and back, and
a Llama backbone with an energy head predicts the next chunk's vector. Converted from the authors' checkpoint
(code: {code_url}) with `calm-convert` from `calm-transformers`.

| | |
|---|---|
| Parameters | {lm_millions:.0f}M language model + {ae_millions:.0f}M autoencoder |
| Tokens per step (K) | {k} |
| Backbone | {layers} layers, hidden size {hidden}, {heads} |
| Energy head | {head_blocks} blocks, noise size {noise}, latent size {latent} |
| Vocabulary | {vocab} tokens |
| Weights | {dtype}, safetensors |

## Usage

The model code ships with the weights, so loading needs `trust_remote_code=True`.

```python
from transformers import pipeline

generator = pipeline("text-generation", model="{name}", trust_remote_code=True)
print(generator("The capital of France is", max_new_tokens=32)[0]["generated_text"])
```
{tokenizer_note}
Each step samples a whole chunk of {k} tokens. `temperature` must be in (0, 1]: below 1, each step
draws `num_candidates` candidate chunks and picks one with probability proportional to its estimated probability to
the power 1/T; `temperature=1.0` draws a single chunk. The defaults (`generation_config.json`) are the authors':
`temperature=0.5`, `num_candidates=200`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)  # 5.x reads the model config
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
inputs = tokenizer(["The capital of France is", "Once upon a time"], return_tensors="pt", padding=True)
output = model.generate(**inputs, max_new_tokens=32, temperature=0.5, num_candidates=200)
print(tokenizer.batch_decode(output, skip_special_tokens=True))
```

## Conversion

```bash
{command}
```

The converter loads the original weights with `weights_only=True`, writes safetensors, and checks that this folder,
loaded in a fresh process, reproduces the original model's autoencoder, backbone and head outputs.

## Citation

```bibtex
@article{{shao2025calm,
  title={{Continuous Autoregressive Language Models}},
  author={{Shao, Chenze and Li, Darren and Meng, Fandong and Zhou, Jie}},
  journal={{arXiv preprint arXiv:2510.27688}},
  year={{2025}}
}}
```
"""

NO_TOKENIZER_NOTE = (
    "\n> This folder has no tokenizer: load one separately (the released CALM models use the Llama 3 tokenizer "
    "plus a `[PAD]` token) and pass it as `tokenizer=` to `pipeline`.\n"
)


def model_card(model: CALMForCausalLM, name: str, command: str, has_tokenizer: bool) -> str:
    """README.md of the output folder: Hub metadata, what the model is, usage, and how it was converted."""
    config = model.config
    ae_params = sum(p.numel() for p in model.ae_model.parameters())
    lm_params = sum(p.numel() for p in model.parameters()) - ae_params
    return MODEL_CARD.format(
        name=name,
        command=command,
        paper_url=PAPER_URL,
        code_url=CODE_URL,
        k=config.patch_size,
        lm_millions=lm_params / 1e6,
        ae_millions=ae_params / 1e6,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=f"{config.num_attention_heads} heads ({config.num_key_value_heads} key-value heads)",
        head_blocks=config.num_mlp_layers,
        noise=config.noise_size,
        latent=config.latent_size,
        vocab=config.vocab_size,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        tokenizer_note="" if has_tokenizer else NO_TOKENIZER_NOTE,
    )


# ----------------------------------------------------------------------------------------------------------------
# Verification in a fresh process


def make_probe(config: CALMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (2 rows of 8 chunks) and the seed of the head's draws, the same for every call."""
    generator = torch.Generator().manual_seed(seed)
    num_chunks = 8
    return {
        "input_ids": torch.randint(0, config.vocab_size, (2, num_chunks * config.patch_size), generator=generator),
        "noise_seed": torch.tensor(seed),
    }


@torch.no_grad()
def probe_outputs(model: Any, probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outputs compared by the verification. Self-contained: its source also runs in the fresh process."""
    ids = probe["input_ids"]
    mean, log_std = model.ae_model.encode(ids)
    hidden = model(ids).last_hidden_state
    head = model.generative_head
    noise = head.draw_noise(hidden.shape[:-1], torch.Generator().manual_seed(int(probe["noise_seed"])))
    return {
        "autoencoder mean": mean,
        "autoencoder log_std": log_std,
        "decoder logits": model.ae_model.decode(mean),
        "backbone hidden": hidden,
        "head sample": head.sample(hidden, noise.to(hidden.dtype)),
    }


# Run by `verify_conversion` in a fresh Python process, with probe_outputs' source pasted in at PROBE_OUTPUTS.
_VERIFY_SCRIPT = """
from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM

PROBE_OUTPUTS

folder, probe_path, result_path, dtype, attn_implementation = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(
    folder, trust_remote_code=True, dtype=getattr(torch, dtype), attn_implementation=attn_implementation or None
).eval()
if not type(model).__module__.startswith("transformers_modules"):
    sys.exit(f"{folder} loaded as {type(model).__module__}, not with the folder's own code")
outputs = probe_outputs(model, torch.load(probe_path, weights_only=True))
torch.save({name: value.float() for name, value in outputs.items()}, result_path)
"""


def verify_conversion(
    model: CALMForCausalLM, folder: str | Path, float32_outputs: dict[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """Load `folder` with `AutoModelForCausalLM(trust_remote_code=True)` in a fresh offline process and compare its
    outputs on random ids with `model`'s (the source, at the output dtype). Prints the max abs differences; raises
    `ConversionError` above `VERIFY_TOLERANCE`. `float32_outputs` (the source in float32) are reported alongside."""
    dtype = next(model.parameters()).dtype
    probe = make_probe(model.config)
    expected = probe_outputs(model, probe)
    with tempfile.TemporaryDirectory() as scratch:
        torch.save(probe, os.path.join(scratch, "probe.pt"))
        script = _VERIFY_SCRIPT.replace("PROBE_OUTPUTS", inspect.getsource(probe_outputs))
        # Offline, and an empty module cache: only the folder's own files can be used.
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_MODULES_CACHE": os.path.join(scratch, "modules"),
        }
        args = [
            str(Path(folder).resolve()),
            os.path.join(scratch, "probe.pt"),
            os.path.join(scratch, "result.pt"),
            str(dtype).removeprefix("torch."),
            model.config._attn_implementation or "",
        ]
        result = subprocess.run(
            [sys.executable, "-c", script, *args], cwd=scratch, env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise ConversionError(f"the converted folder does not load in a fresh process:\n{result.stderr[-3000:]}")
        got = torch.load(os.path.join(scratch, "result.pt"), weights_only=True)

    tolerance = VERIFY_TOLERANCE[dtype]
    print(
        f"Verification: the output loaded with AutoModelForCausalLM (trust_remote_code=True, "
        f"{str(dtype).removeprefix('torch.')}) in a fresh process; max abs difference from the source model:"
    )
    diffs, failed = {}, []
    for name, want in expected.items():
        want = want.float()
        diffs[name] = (got[name] - want).abs().max().item()
        limit = tolerance if dtype == torch.float32 else tolerance * max(1.0, want.abs().max().item())
        line = f"  {name:<20} {diffs[name]:.3e}  (tolerance {limit:.1e})"
        if float32_outputs is not None:
            line += f"   vs float32: {(got[name] - float32_outputs[name].float()).abs().max().item():.3e}"
        print(line)
        if not diffs[name] <= limit:  # also catches NaN
            failed.append(name)
    if failed:
        raise ConversionError(
            f"verification failed: {', '.join(failed)} differ from the source model beyond the tolerance "
            "(convert() then writes nothing)."
        )
    return diffs


# ----------------------------------------------------------------------------------------------------------------
# Publishing and the command line


def push_folder_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> None:
    """Create the Hub repository (if needed) and upload `folder` to it. The token comes from HF_TOKEN or `hf auth
    login`, as usual for huggingface_hub."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        # private=None keeps the Hub's default visibility (e.g. an organisation's) when --private is not given.
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message="Upload CALM model converted with calm-convert"
        )
    except Exception as error:
        raise ConversionError(
            f"{folder} is complete, but uploading it to {repo_id} failed: {error}. "
            f"Retry with `hf upload {repo_id} {folder}`."
        ) from error
    print(f"Uploaded {folder} to https://huggingface.co/{repo_id}")


def _shard_size(value: str) -> int | str:
    from transformers.utils.hub import convert_file_size_to_int

    size = int(value) if value.isdigit() else value
    try:
        convert_file_size_to_int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size; use e.g. 5GB, 500MB or a byte count.") from None
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calm-convert",
        description="Convert the authors' CALM checkpoints into a safe, self-contained Hugging Face model folder "
        "(safetensors, remote code, tokenizer, model card), verified in a fresh process.",
    )
    parser.add_argument("--calm", required=True, metavar="DIR", help="CALM checkpoint folder (config.json + weights)")
    parser.add_argument(
        "--autoencoder",
        metavar="DIR",
        help="the autoencoder checkpoint folder; if the CALM checkpoint also holds ae_model.* weights, they must agree",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer folder (default: tokenizer files in the CALM folder, if any)"
    )
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights dtype (default: the checkpoint's own)")
    parser.add_argument(
        "--max-shard-size", type=_shard_size, default="5GB", metavar="SIZE", help="shard above this size (default 5GB)"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the output in a fresh process")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private needs --push-to-hub")
    try:
        convert(
            args.calm,
            args.output,
            autoencoder=args.autoencoder,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            force=args.force,
            verify=not args.no_verify,
            push_to_hub=args.push_to_hub,
            private=args.private,
        )
    except (CheckpointError, ConversionError, NotImplementedError, OSError) as error:
        print(f"calm-convert: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

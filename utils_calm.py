"""Helpers that both the CALM model (`modeling_calm.py`) and its generation (`generation_calm.py`) use.

A leaf module: it imports neither of them, so that the two import in one direction only (the model imports the
generation mixin). It holds the input checks, the chunk-level mask and positions, the transformers-version
differences of `LlamaModel`'s signature, the one speed kernel of the package (`vocab_argmax`), and the small
tables and savers the command-line tools share.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaModel


def cache_kwarg(forward: object) -> str:
    """The KV-cache keyword of a model's `forward`: `cache` in recent transformers 5, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


CACHE_KWARG = cache_kwarg(LlamaModel.forward)
# transformers 4.57's LlamaModel takes the cache slots to write as `cache_position`; 5.x caches count them.
TAKES_CACHE_POSITION = "cache_position" in inspect.signature(LlamaModel.forward).parameters

# Up to this many rows, `vocab_argmax` projects onto the whole vocabulary in one matmul.
FEW_ROWS = 8

# The chat template of the tokenizers trained here: a plain transcript ("User: ...", "Assistant: ..."), which a model
# trained on plain text can continue; servers' chat endpoints need one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, patch_size: int | None = None, hint: str = "") -> None:
    """Raise a clear error for ids a CALM model cannot read. With `patch_size`: require whole chunks (`hint` is
    added to that error)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}.")
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must have shape [batch_size, sequence_length], got {tuple(input_ids.shape)}; "
            "for a single sequence use input_ids.unsqueeze(0)."
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    if patch_size is not None and input_ids.shape[1] % patch_size != 0:
        raise ValueError(
            f"input length {input_ids.shape[1]} is not a multiple of patch_size={patch_size}: the model reads whole "
            f"chunks of {patch_size} tokens. Pad the input to a multiple of {patch_size} (and mask the padding with "
            f"attention_mask), or use generate(), which aligns prompts of any length.{hint}"
        )
    # Reading the ids' values is a data-dependent branch that torch.compile / torch.export cannot trace: checked in
    # eager mode only (an out-of-range id then fails in the embedding lookup).
    if input_ids.numel() > 0 and not torch.compiler.is_compiling():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is out of range [0, {vocab_size}): the tokenizer does not match this model "
                f"(vocab_size={vocab_size}). Use the tokenizer saved with the model."
            )


def chunk_mask_of(token_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Token mask [B, P*K] -> chunk mask [B, P] (long): a chunk is attended if any of its tokens is."""
    if token_mask.dim() != 2 or token_mask.shape[1] % patch_size != 0:
        raise ValueError(
            f"attention_mask must be a token-level [batch_size, length] mask with length a multiple of "
            f"patch_size={patch_size}, got {tuple(token_mask.shape)}."
        )
    return token_mask.reshape(token_mask.shape[0], -1, patch_size).any(-1).long()


def positions_of(chunk_mask: torch.Tensor) -> torch.Tensor:
    """Chunk mask [B, P] -> position ids [B, P]: padded (left) chunks take position 0, the first real chunk too."""
    return (chunk_mask.long().cumsum(-1) - 1).clamp(min=0)


def vocab_argmax(states: torch.Tensor, weight: torch.Tensor, block_size: int = 4096) -> torch.Tensor:
    """argmax_v weight[v] . states[i] -> token ids [n] (the first maximum on ties, as `argmax`); states [n, a].

    The logits are made and reduced one vocabulary block at a time, so that a pool of candidates never holds
    all [n, V] logits: reducing them costs more than the matmul behind them. A few rows (one chunk per row at T = 1)
    take one matmul, which is faster there (docs/performance.md).
    """
    if states.shape[0] <= FEW_ROWS:
        return F.linear(states, weight).argmax(-1)
    best_value = best_index = None
    for start in range(0, weight.shape[0], block_size):
        value, index = (weight[start : start + block_size] @ states.T).max(0)  # [n]; max: the first maximum
        if best_value is None:
            best_value, best_index = value, index
            continue
        better = value > best_value  # strictly: on ties the lower token id stays
        best_value = torch.where(better, value, best_value)
        best_index = torch.where(better, index + start, best_index)
    return best_index


def folder_problem(name: str, needs: str | None = "config.json", hub_ok: bool = True) -> str | None:
    """A message if `name` is plainly a local path (not a Hub id such as `org/model`) but no folder is there, or a
    folder without the file `needs` (a model's config.json); None otherwise. With `hub_ok=False` only an existing
    local folder will do."""
    path = Path(name).expanduser()
    if path.is_dir():
        if needs and not (path / needs).is_file():
            return f"{name} has no {needs}: pass a folder written by save_pretrained or calm-convert."
    elif not hub_ok:
        return f"no folder at {name}: pass an existing local folder."
    elif path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        return f"no folder at {name}: pass an existing folder, or a Hub id such as org/model."
    return None


def device_problem(name: str) -> str | None:
    """A message if tensors cannot go to device `name` here (unknown name, no such GPU, torch built without it)."""
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError, NotImplementedError) as error:  # what torch raises for each of those
        return f"--device {name} is not usable here ({str(error).splitlines()[0]}); use e.g. --device cpu."
    return None


def save_tokenizer(tokenizer: object, folder: str | Path) -> None:
    """`tokenizer.save_pretrained(folder)`, written so that both transformers 4.x and 5.x load it."""
    tokenizer.save_pretrained(str(folder))
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    # transformers 5 names its fast tokenizers "TokenizersBackend", a class 4.x lacks; both know this name.
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # how it was loaded on this machine, not part of the tokenizer
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def code_files() -> list[Path]:
    """The code files a saved CALM folder needs for `trust_remote_code`: the model file and what it imports, as
    transformers' own `save_pretrained` finds them."""
    from transformers.dynamic_module_utils import get_relative_import_files

    model_file = Path(__file__).with_name("modeling_calm.py")
    return [model_file, *map(Path, get_relative_import_files(str(model_file)))]

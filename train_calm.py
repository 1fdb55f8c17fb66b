"""Train CALM with Hugging Face `Trainer`: a BPE tokenizer, the autoencoder, the energy LM, and a Llama baseline.

Stages (paper sections 2 and 3), each its own run of this script:

    tokenizer    byte-level BPE with the special tokens BOS, EOS and [PAD], trained on the training documents
    autoencoder  CALMAutoencoder on `BOS + text + EOS` documents, each right-padded with [PAD] to a multiple of K
    lm           CALMForCausalLM (energy loss) on `BOS + text` documents, with the trained autoencoder frozen inside
    ar           LlamaForCausalLM on the same `BOS + text` blocks: the discrete baseline

The last `--num-eval-docs` documents are held out: the autoencoder is scored by token reconstruction accuracy on
them, the language models by BrierLM. Data-parallel training works with torchrun (gloo on CPU, NCCL on GPU):

    torchrun --nproc_per_node 2 -m calm_transformers.train_calm --stage lm --data docs.jsonl \
        --autoencoder ae/ --output-dir lm/
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from .configuration_calm import CALMAutoencoderConfig, CALMConfig
from .evaluate_calm import energy_levels, evaluate_brierlm, load_documents, pack_documents
from .modeling_calm import CALMAutoencoder, CALMForCausalLM
from .utils_calm import CHAT_TEMPLATE, code_files, folder_problem, save_tokenizer

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|begin_of_text|>", "<|end_of_text|>", "[PAD]"
STAGES = ("tokenizer", "autoencoder", "lm", "ar")

# Default model shapes of each stage, small enough for a CPU (overridable with --set key=value).
DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    "autoencoder": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "latent_size": 64,
        "patch_size": 4,
    },
    "lm": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "noise_size": 64,
        "num_mlp_layers": 2,
        "num_samples": 8,
        "max_position_embeddings": 512,
    },
    "ar": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
}
# No weight decay for the autoencoder: a rare token's embedding would decay between the few steps that update it.
DEFAULT_WEIGHT_DECAY = {"autoencoder": 0.0, "lm": 0.1, "ar": 0.1}
CONFIG_CLASSES = {"autoencoder": CALMAutoencoderConfig, "lm": CALMConfig, "ar": LlamaConfig}


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and data


def train_tokenizer(documents: list[str], vocab_size: int = 2048, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes, no unknown token) with BOS, EOS and [PAD] as ids 0, 1, 2.

    Like the Llama 3 tokenizer the released CALM models use, it adds BOS in front of every text it encodes (the
    models are trained on `BOS + text`). Padding is on the left, as generation needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not documents:
        raise ValueError("train_tokenizer needs at least one document.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        chat_template=CHAT_TEMPLATE,
    )


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int, int]:
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if None in ids:
        raise ValueError(
            f"the tokenizer needs a BOS, an EOS and a pad token (got ids {ids}); train one with `--stage tokenizer`."
        )
    return ids


def autoencoder_blocks(
    tokenizer: PreTrainedTokenizerFast, documents: list[str], patch_size: int, block_size: int
) -> torch.Tensor:
    """The autoencoder's data (paper section 2): each document as `BOS + text + EOS`, right-padded with [PAD] to a
    multiple of `patch_size`, all concatenated and cut into rows of `block_size` tokens. [n_blocks, block_size].

    Every chunk of K tokens then lies inside one document. The last row is completed with [PAD] chunks, so that
    no document token is lost (this matters for held-out accuracy).
    """
    if block_size <= 0 or block_size % patch_size:
        raise ValueError(f"block_size ({block_size}) must be a positive multiple of patch_size ({patch_size}).")
    bos, eos, pad = _special_ids(tokenizer)
    ids: list[int] = []
    for text in documents:
        doc = [bos, *tokenizer(text, add_special_tokens=False)["input_ids"], eos]
        ids += doc + [pad] * (-len(doc) % patch_size)
    ids += [pad] * (-len(ids) % block_size)
    return torch.tensor(ids, dtype=torch.long).reshape(-1, block_size)


class BlockDataset(Dataset):
    """Rows of token ids as `{"input_ids", "labels"}` examples (the models shift or chunk the labels themselves)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


class RandomChunkCollator:
    """Batches examples, replacing a random `fraction` of the chunks by chunks of uniformly random tokens.

    For the autoencoder on a small corpus: a token that occurs a handful of times in the training text (typically a
    BPE intermediate, or one from an unusual word) is otherwise never learnt, and the held-out text has some. The
    autoencoder's job is to compress *any* chunk, so random chunks are valid training data that cover the vocabulary.
    """

    def __init__(self, fraction: float, vocab_size: int, patch_size: int) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"the random chunk fraction must be in [0, 1), got {fraction}.")
        self.fraction, self.vocab_size, self.patch_size = fraction, vocab_size, patch_size

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = torch.stack([example["input_ids"] for example in examples])
        chunks = ids.reshape(ids.shape[0], -1, self.patch_size)
        replace = torch.rand(chunks.shape[:2]) < self.fraction
        chunks = torch.where(replace[..., None], torch.randint(0, self.vocab_size, chunks.shape), chunks)
        ids = chunks.reshape(ids.shape)
        return {"input_ids": ids, "labels": ids.clone()}


# ----------------------------------------------------------------------------------------------------------------
# Models


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["hidden_size=128", "rope_theta=5e5", "hidden_act=gelu"]` -> a dict; values are JSON, else strings."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value (e.g. --set hidden_size=128), got {item!r}.")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def stage_config_fields(stage: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe's config fields for `stage`, with `overrides` applied; unknown field names are an error."""
    config_class = CONFIG_CLASSES[stage]
    known = set(config_class().to_dict()) | {"head_dim"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; known fields: {sorted(known)}"
        raise ValueError(f"--set {unknown[0]}=...: {config_class.__name__} has no field {unknown[0]!r}{hint}.")
    return {**DEFAULT_CONFIGS[stage], **overrides}


def build_autoencoder(tokenizer: PreTrainedTokenizerFast, **fields: Any) -> CALMAutoencoder:
    bos, eos, pad = _special_ids(tokenizer)
    config = CALMAutoencoderConfig(
        vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **fields
    )
    return CALMAutoencoder(config)


def build_calm(autoencoder: CALMAutoencoder, **fields: Any) -> CALMForCausalLM:
    """A new CALM language model around a trained autoencoder (copied in and frozen)."""
    ae_config = autoencoder.config
    for name in ("vocab_size", "patch_size", "latent_size"):
        if name in fields and fields[name] != getattr(ae_config, name):
            raise ValueError(f"{name} is set by the autoencoder ({getattr(ae_config, name)}); do not override it.")
    config = CALMConfig(
        vocab_size=ae_config.vocab_size,
        patch_size=ae_config.patch_size,
        latent_size=ae_config.latent_size,
        bos_token_id=ae_config.bos_token_id,
        eos_token_id=ae_config.eos_token_id,
        pad_token_id=ae_config.pad_token_id,
        autoencoder_config=ae_config,
        **fields,
    )
    model = CALMForCausalLM(config)
    model.ae_model.load_state_dict(autoencoder.state_dict())
    model.ae_model.requires_grad_(False)
    return model


def build_llama(tokenizer: PreTrainedTokenizerFast, **fields: Any) -> LlamaForCausalLM:
    bos, eos, pad = _special_ids(tokenizer)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **fields)
    return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def training_flops_per_row(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> int:
    """Measured FLOPs of one forward + backward pass on `batch` (matmuls and attention), per row.

    Counted with torch's FlopCounterMode on the real model, so that it includes what `6 * params * tokens` misses
    for CALM: the K-times-cheaper backbone, the N head samples per position and the frozen encoder's forward.
    """
    from torch.utils import flop_counter

    aten = torch.ops.aten
    # CPU attention kernels are not in torch's table; count them like the GPU ones (dense, causality ignored).
    # The formulas receive the shapes of the operator's arguments.
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: (
            lambda q, k, v, *args, **kwargs: flop_counter.sdpa_flop_count(q, k, v)
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda grad, q, k, v, *args, **kwargs: flop_counter.sdpa_backward_flop_count(grad, q, k, v)
        ),
    }
    was_training = model.training
    model.train()
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return counter.get_total_flops() // batch["input_ids"].shape[0]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def reconstruction_accuracy(
    autoencoder: CALMAutoencoder, blocks: torch.Tensor, batch_size: int = 16, noise_std: float = 0.0, seed: int = 0
) -> float:
    """Fraction of non-[PAD] tokens the autoencoder reconstructs (decoder on the posterior mean, argmax).

    `noise_std` > 0 adds Gaussian noise to the mean first: the LM's predictions are never exact, so a usable
    latent space must tolerate some noise (the released autoencoder stays near 100% up to sigma 0.75).
    """
    generator = torch.Generator().manual_seed(seed)
    device = autoencoder.device
    correct = total = 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)
        mean, _ = autoencoder.encode(ids)
        if noise_std > 0:
            mean = mean + noise_std * torch.randn(mean.shape, generator=generator).to(mean)
        predicted = autoencoder.decode_tokens(mean)
        keep = ids != autoencoder.config.pad_token_id
        correct += int((predicted == ids)[keep].sum())
        total += int(keep.sum())
    return correct / max(total, 1)


def stage_metrics(stage: str, model: PreTrainedModel, blocks: torch.Tensor, batch_size: int, seed: int) -> dict:
    """Held-out metrics: reconstruction accuracy for the autoencoder, Brier-1..4 and BrierLM for the LMs, and the
    energy levels of `energy_levels` for CALM."""
    if stage == "autoencoder":
        return {
            "accuracy": reconstruction_accuracy(model, blocks, batch_size),
            "accuracy_noise_0.3": reconstruction_accuracy(model, blocks, batch_size, noise_std=0.3, seed=seed),
        }
    result = evaluate_brierlm(model, blocks, batch_size=batch_size, seed=seed, progress=False)
    metrics = {"brierlm": result["brierlm"], **{f"brier{n}": value for n, value in enumerate(result["brier"], 1)}}
    if stage == "lm":  # how much of its context the model uses, beside the context-free and oracle levels
        metrics.update(energy_levels(model, blocks, batch_size=batch_size, seed=seed))
    return metrics


class CALMTrainer(Trainer):
    """`Trainer` whose evaluation is the stage's held-out metric (computed on the main process only)."""

    def __init__(self, *args: Any, metric_fn: Callable[[PreTrainedModel, torch.Tensor], dict], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metric_fn = metric_fn

    def evaluate(self, eval_dataset: Dataset | None = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        metrics: dict[str, float] = {}
        if self.is_world_process_zero():
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.metric_fn(model, dataset.blocks).items()}
            model.train(was_training)
            self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


# ----------------------------------------------------------------------------------------------------------------
# The script


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calm-train", description=__doc__.split("\n\n")[0].replace("`", ""))
    parser.add_argument("--stage", choices=STAGES, required=True, help="what to train (see the description above)")
    parser.add_argument("--data", required=True, help="documents: JSONL with a text field (one per line), or text")
    parser.add_argument("--text-field", default="text", help="the JSON field holding each document (default: text)")
    parser.add_argument("--num-eval-docs", type=int, default=6, help="the last N documents are held out (default 6)")
    parser.add_argument("--output-dir", required=True, help="folder for the trained model and its results.json")
    parser.add_argument("--tokenizer", help="tokenizer folder (autoencoder and ar stages)")
    parser.add_argument("--autoencoder", help="trained autoencoder folder (lm stage); its tokenizer is used")
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokenizer stage: BPE vocabulary size")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config field (repeatable), e.g. --set hidden_size=128 --set num_hidden_layers=4",
    )
    parser.add_argument(
        "--random-chunks",
        type=float,
        default=0.2,
        help="autoencoder stage: fraction of training "
        "chunks replaced by random tokens, to learn the whole vocabulary (default 0.2)",
    )
    parser.add_argument("--block-size", type=int, default=512, help="tokens per training row (a multiple of K)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training blocks (default: 1)")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per device per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default: the authors' 3e-4)")
    parser.add_argument(
        "--lr-scheduler",
        default="constant_with_warmup",
        help="transformers' lr_scheduler_type (default: the authors' constant_with_warmup)",
    )
    parser.add_argument("--warmup-steps", type=int, default=2000, help="default: the authors' 2000")
    parser.add_argument("--weight-decay", type=float, help="default: 0 for the autoencoder, 0.1 for the LMs")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default: 1.0)")
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast, as the authors train (CPU or GPU; default: float32)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    parser.add_argument("--eval-steps", type=int, default=0, help="evaluate every N optimizer steps (0: at the end)")
    parser.add_argument(
        "--eval-blocks",
        type=int,
        default=0,
        help="held-out blocks for evaluation during training (0: all); the final evaluation always uses all",
    )
    parser.add_argument("--eval-batch-size", type=int, default=8, help="blocks per evaluation batch (default: 8)")
    parser.add_argument("--logging-steps", type=int, default=10, help="log the training loss every N steps")
    parser.add_argument(
        "--save-steps",
        type=int,
        default=0,
        help="save a checkpoint (model, optimiser, scheduler, random state) in --output-dir every N steps, keeping "
        "the last two (default 0: none)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint in --output-dir, with the same arguments as the interrupted run",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--no-remote-code",
        action="store_true",
        help="save without copies of the modeling code "
        "(the folder then loads with calm_transformers installed, not with trust_remote_code)",
    )
    return parser


def _load_tokenizer(folder: str | None, flag: str) -> PreTrainedTokenizerFast:
    if folder is None:
        raise ValueError(f"this stage needs {flag} (a folder with a tokenizer); train one with --stage tokenizer.")
    if problem := folder_problem(folder, needs=None, hub_ok=False):
        raise ValueError(f"{flag}: {problem}")
    # Not AutoTokenizer: transformers 5 reads the folder's config.json first and asks about its remote code.
    return PreTrainedTokenizerFast.from_pretrained(folder)


def strip_remote_code(folder: str | Path) -> None:
    """Make a saved CALM folder package-only: no copies of the modeling code, no `auto_map` pointing to them.

    Such a folder loads with `calm_transformers` installed (`CALMForCausalLM.from_pretrained(folder)`).
    """
    folder = Path(folder)
    for path in code_files():
        (folder / path.name).unlink(missing_ok=True)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("auto_map", None)
    config.get("autoencoder_config", {}).pop("auto_map", None)  # inherited from the autoencoder's own folder
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _split_documents(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The training documents and the last `--num-eval-docs`, held out."""
    documents = load_documents(args.data, text_field=args.text_field)
    if not 0 <= args.num_eval_docs < len(documents):
        raise ValueError(f"--num-eval-docs must be in [0, {len(documents)}) for {len(documents)} documents.")
    split = len(documents) - args.num_eval_docs
    return documents[:split], documents[split:]


def _model_and_data(
    args: argparse.Namespace, fields: dict[str, Any], train_docs: list[str], eval_docs: list[str]
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, torch.Tensor, torch.Tensor, Callable | None]:
    """The stage's new model, its tokenizer, training and held-out blocks, and the batch collator (or None)."""
    if args.stage == "autoencoder":
        tokenizer = _load_tokenizer(args.tokenizer, "--tokenizer")
        model = build_autoencoder(tokenizer, **fields)
        k = model.config.patch_size
        collator = RandomChunkCollator(args.random_chunks, model.config.vocab_size, k) if args.random_chunks else None
        blocks = [autoencoder_blocks(tokenizer, docs, k, args.block_size) for docs in (train_docs, eval_docs)]
        return model, tokenizer, blocks[0], blocks[1], collator
    if args.stage == "lm":
        if args.autoencoder is None:
            raise ValueError("--stage lm needs --autoencoder (the folder written by --stage autoencoder).")
        if problem := folder_problem(args.autoencoder, hub_ok=False):
            raise ValueError(f"--autoencoder: {problem}")
        tokenizer = _load_tokenizer(args.tokenizer or args.autoencoder, "--autoencoder")
        model = build_calm(CALMAutoencoder.from_pretrained(args.autoencoder), **fields)
        if args.block_size % model.config.patch_size:
            raise ValueError(f"--block-size must be a multiple of patch_size={model.config.patch_size}.")
    else:
        tokenizer = _load_tokenizer(args.tokenizer, "--tokenizer")
        model = build_llama(tokenizer, **fields)
    train_blocks = pack_documents(tokenizer, train_docs, args.block_size)
    eval_blocks = pack_documents(tokenizer, eval_docs, args.block_size) if eval_docs else train_blocks[:0]
    return model, tokenizer, train_blocks, eval_blocks, None


def _training_arguments(args: argparse.Namespace, has_eval: bool) -> TrainingArguments:
    """Trainer's arguments for the stage: the optimiser settings of the command line, single or data-parallel."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun or accelerate
    return TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay if args.weight_decay is not None else DEFAULT_WEIGHT_DECAY[args.stage],
        adam_beta2=0.95,
        max_grad_norm=args.max_grad_norm,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),  # also what makes bf16 autocast allowed on CPU
        seed=args.seed,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if args.eval_steps and has_eval else "no",
        eval_steps=args.eval_steps or None,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or None,
        save_total_limit=2,
        report_to="none",
        # Every micro-batch full: the loss is a mean per micro-batch, so equal sizes make accumulation exact.
        dataloader_drop_last=True,
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=args.no_progress,
    )


def _checkpoint_to_resume(args: argparse.Namespace) -> str | None:
    if not args.resume:
        return None
    if (checkpoint := last_complete_checkpoint(args.output_dir)) is None:
        raise ValueError(
            f"--resume: no complete checkpoint-* folder in {args.output_dir} (the run needs --save-steps)."
        )
    return checkpoint


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest `checkpoint-N` of `folder` written to the end (Trainer writes trainer_state.json last): a run killed
    while saving leaves an incomplete one, which is skipped."""
    complete = [path for path in Path(folder).glob("checkpoint-*") if (path / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda path: int(path.name.split("-")[-1]))) if complete else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one stage; save the result to `args.output_dir` and return its results (also written as results.json)."""
    output_dir = Path(args.output_dir)
    train_docs, eval_docs = _split_documents(args)
    if args.stage == "tokenizer":
        if args.overrides:
            raise ValueError("--set has no meaning for the tokenizer stage; use --vocab-size.")
        tokenizer = train_tokenizer(train_docs, args.vocab_size)
        save_tokenizer(tokenizer, output_dir)
        return {"stage": "tokenizer", "vocab_size": len(tokenizer), "train_documents": len(train_docs)}

    fields = stage_config_fields(args.stage, parse_overrides(args.overrides))
    torch.manual_seed(args.seed)
    model, tokenizer, train_blocks, eval_blocks, collator = _model_and_data(args, fields, train_docs, eval_docs)
    if train_blocks.shape[0] == 0:
        raise ValueError(f"the training documents give no full block of {args.block_size} tokens; lower --block-size.")
    training_args = _training_arguments(args, has_eval=bool(eval_docs))
    eval_subset = eval_blocks[: args.eval_blocks] if args.eval_blocks else eval_blocks
    trainer = CALMTrainer(
        model=model,
        args=training_args,
        train_dataset=BlockDataset(train_blocks),
        data_collator=collator,
        eval_dataset=BlockDataset(eval_subset),
        metric_fn=lambda m, blocks: stage_metrics(args.stage, m, blocks, args.eval_batch_size, args.seed),
    )
    sample = {key: value[None].to(model.device) for key, value in BlockDataset(train_blocks)[0].items()}
    flops_per_row = training_flops_per_row(model, sample)

    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=_checkpoint_to_resume(args))
    train_seconds = time.perf_counter() - start
    rows_seen = trainer.state.global_step * args.batch_size * args.grad_accum * training_args.world_size

    results: dict[str, Any] = {
        "stage": args.stage,
        "command": args.command,
        "config": fields,
        "train_documents": len(train_docs),
        "eval_documents": len(eval_docs),
        "train_tokens": train_blocks.numel(),
        "eval_tokens": eval_blocks.numel(),
        "steps": trainer.state.global_step,
        "rows_seen": rows_seen,
        "world_size": training_args.world_size,
        "train_seconds": round(train_seconds, 1),
        "train_loss": train_output.training_loss,
        "train_flops": flops_per_row * rows_seen,
        "parameters_trainable": count_parameters(model, trainable_only=True),
        "parameters_total": count_parameters(model),
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        # Saved before the final evaluation, so that a run whose evaluation fails keeps its model.
        model.save_pretrained(output_dir)  # not trainer.save_model, which also pickles the training arguments
        if args.no_remote_code:
            strip_remote_code(output_dir)
        save_tokenizer(tokenizer, output_dir)
        if eval_docs:
            model.eval()
            results["eval"] = stage_metrics(args.stage, model, eval_blocks, args.eval_batch_size, args.seed)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = shlex.join(["calm-train", *argv])
    try:
        results = run(args)
    except (ValueError, FileNotFoundError) as error:  # bad arguments or data: a message, not a traceback
        parser.error(str(error))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under torchrun: leave the process group before exiting; one left to interpreter shutdown can abort a
        # rank ("terminate called without an active exception", seen about 1 run in 6 with gloo on 2 processes).
        torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

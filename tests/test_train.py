"""Training: data preparation, the Trainer stages of train_calm.py, gradient accumulation, DDP, the shipped model."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from calm_transformers import CALMAutoencoder, CALMAutoencoderConfig, CALMForCausalLM
from calm_transformers.evaluate_calm import brierlm, pack_documents
from calm_transformers.train_calm import (
    BlockDataset,
    RandomChunkCollator,
    autoencoder_blocks,
    main,
    parse_overrides,
    stage_config_fields,
    train_tokenizer,
)
from calm_transformers.utils_calm import CHAT_TEMPLATE, code_files, save_tokenizer
from conftest import HANG_TIMEOUT, SHARED, SHIPPED, require_shared, run_python, tiny_config
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments

WORDS = "zero one two three four five six seven eight nine".split()
TINY = {  # --set overrides that make each stage's model tiny
    "autoencoder": ["hidden_size=32", "intermediate_size=64", "latent_size=8", "ae_dropout=0.05"],
    "lm": [
        "hidden_size=32",
        "intermediate_size=64",
        "num_hidden_layers=1",
        "num_attention_heads=2",
        "num_key_value_heads=2",
        "noise_size=8",
        "num_mlp_layers=1",
        "num_samples=4",
        "num_target_samples=16",
    ],
    "ar": [
        "hidden_size=32",
        "intermediate_size=64",
        "num_hidden_layers=1",
        "num_attention_heads=2",
        "num_key_value_heads=2",
    ],
}


def counting_documents(num_documents: int, seed: int = 0) -> list[str]:
    """Learnable text: runs of counting words (`three four five ...`) from random starts, of random lengths."""
    rng = random.Random(seed)
    documents = []
    for _ in range(num_documents):
        start, length = rng.randrange(10), rng.randrange(20, 60)
        documents.append(" " + " ".join(WORDS[(start + i) % 10] for i in range(length)))
    return documents


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(counting_documents(20), vocab_size=300), folder)
    return AutoTokenizer.from_pretrained(folder)


def test_tokenizer_saves_and_loads_as_fast_tokenizer(tokenizer, tmp_path):
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and 259 < len(tokenizer) <= 300  # bytes + 3 specials + merges
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "[PAD]",
    )
    assert tokenizer.padding_side == "left"
    text = " three four five\n = Héllo ✓ ="  # byte-level: any text round-trips, no unknown token
    encoded = tokenizer(text)
    assert encoded["input_ids"][0] == tokenizer.bos_token_id  # BOS is added, as in training data
    assert set(encoded) == {"input_ids", "attention_mask"}
    assert tokenizer.decode(encoded["input_ids"], skip_special_tokens=True) == text
    batch = tokenizer([" one", " one two three"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0
    save_tokenizer(tokenizer, tmp_path)  # re-saving keeps a class name that transformers 4.x and 5.x both load
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_autoencoder_blocks_layout(tokenizer):
    documents = [" one two", " three four five six seven", " eight"]
    blocks = autoencoder_blocks(tokenizer, documents, patch_size=4, block_size=8)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    expected: list[int] = []
    for text in documents:
        doc = [bos, *tokenizer(text, add_special_tokens=False)["input_ids"], eos]
        expected += doc + [pad] * (-len(doc) % 4)
    expected += [pad] * (-len(expected) % 8)
    assert blocks.shape == (len(expected) // 8, 8) and blocks.flatten().tolist() == expected
    assert pad in expected  # the documents do need padding
    # Each document starts a chunk and ends in its own chunk: no chunk mixes two documents.
    chunks = blocks.reshape(-1, 4)
    for chunk in chunks.tolist():
        inner = chunk[1:] if chunk[0] == bos else chunk
        assert bos not in inner
        if eos in chunk:
            assert all(t == pad for t in chunk[chunk.index(eos) + 1 :])
    assert int((blocks == bos).sum()) == int((blocks == eos).sum()) == len(documents)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        autoencoder_blocks(tokenizer, documents, patch_size=4, block_size=10)


def test_lm_blocks_layout(tokenizer):
    documents = counting_documents(3, seed=1)
    blocks = pack_documents(tokenizer, documents, block_size=16)
    stream = [
        t
        for text in documents
        for t in [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    ]
    assert blocks.shape == (len(stream) // 16, 16)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]  # BOS + text, no EOS, tail dropped
    assert tokenizer.eos_token_id not in blocks and tokenizer.pad_token_id not in blocks


def test_random_chunk_collator_replaces_whole_chunks():
    torch.manual_seed(0)
    blocks = torch.arange(2 * 400 * 4).reshape(2, 1600) + 1000  # ids >= 1000: a replaced token is < 1000
    examples = list(BlockDataset(blocks))
    batch = RandomChunkCollator(0.25, vocab_size=1000, patch_size=4)(examples)
    assert torch.equal(batch["labels"], batch["input_ids"])  # the autoencoder reconstructs what it reads
    replaced = (batch["input_ids"] < 1000).reshape(2, 400, 4)
    assert torch.equal(replaced.all(-1), replaced.any(-1))  # whole chunks or nothing
    assert 0.2 < replaced.all(-1).float().mean() < 0.3
    assert torch.equal(RandomChunkCollator(0.0, 1000, 4)(examples)["input_ids"], blocks)
    with pytest.raises(ValueError, match="fraction"):
        RandomChunkCollator(1.0, 1000, 4)


def test_overrides_are_parsed_and_checked():
    assert parse_overrides(["hidden_size=64", "rope_theta=5e5", "hidden_act=gelu", "tie_word_embeddings=true"]) == {
        "hidden_size": 64,
        "rope_theta": 5e5,
        "hidden_act": "gelu",
        "tie_word_embeddings": True,
    }
    assert stage_config_fields("lm", {"num_hidden_layers": 2})["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["hidden_size"])
    with pytest.raises(ValueError, match="CALMConfig has no field 'hiden_size' .did you mean 'hidden_size'"):
        stage_config_fields("lm", {"hiden_size": 64})


@pytest.mark.parametrize(
    "options,message",
    [
        (["--stage", "lm", "--autoencoder", "{tmp}/missing"], "--autoencoder: no folder at {tmp}/missing"),
        (["--stage", "lm", "--autoencoder", "{tmp}"], "--autoencoder: {tmp} has no config.json"),
        (["--stage", "autoencoder", "--tokenizer", "{tmp}/missing"], "--tokenizer: no folder at {tmp}/missing"),
        (["--stage", "lm", "--autoencoder", "nosuch"], "--autoencoder: no folder at nosuch: pass an existing local"),
    ],
)
def test_cli_names_a_missing_folder(options, message, tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "one short document"}) + "\n")
    argv = ["--data", str(data), "--num-eval-docs", "0", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main([*argv, *(option.format(tmp=tmp_path) for option in options)])
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@contextlib.contextmanager
def one_thread():
    """Tiny models train faster on one thread, and far faster when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    """The script's four stages in a row on counting text: tokenizer, autoencoder, CALM LM, Llama baseline."""
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in counting_documents(24)))
    common = [
        "--data",
        str(data),
        "--num-eval-docs",
        "3",
        "--block-size",
        "32",
        "--no-progress",
        "--warmup-steps",
        "0",
        "--lr-scheduler",
        "constant",
        "--logging-steps",
        "5",
        "--eval-batch-size",
        "4",
    ]
    stages = {
        "tokenizer": ["--vocab-size", "300"],
        "autoencoder": [
            "--tokenizer",
            str(root / "tokenizer"),
            "--max-steps",
            "80",
            "--lr",
            "1e-2",
            "--batch-size",
            "8",
        ],
        "lm": [
            "--autoencoder",
            str(root / "autoencoder"),
            "--max-steps",
            "30",
            "--lr",
            "3e-3",
            "--batch-size",
            "4",
            "--eval-steps",
            "15",
            "--eval-blocks",
            "1",
            "--no-remote-code",
        ],
        "ar": ["--tokenizer", str(root / "tokenizer"), "--max-steps", "30", "--lr", "3e-3", "--batch-size", "4"],
    }
    for stage, argv in stages.items():
        overrides = [arg for item in TINY.get(stage, []) for arg in ("--set", item)]
        with one_thread():
            assert main(["--stage", stage, "--output-dir", str(root / stage), *common, *argv, *overrides]) == 0
    return {stage: root / stage for stage in stages}


def _losses(folder) -> list[float]:
    log_history = json.loads((folder / "results.json").read_text())["log_history"]
    return [entry["loss"] for entry in log_history if "loss" in entry]


@pytest.mark.parametrize("stage", ["autoencoder", "lm", "ar"])
@pytest.mark.slow
def test_stage_trains_saves_and_evaluates(pipeline, stage):
    folder = pipeline[stage]
    results = json.loads((folder / "results.json").read_text())
    losses = _losses(folder)
    assert len(losses) >= 6 and losses[-1] < 0.8 * losses[0], losses
    batch_size = 8 if stage == "autoencoder" else 4
    assert results["world_size"] == 1 and results["rows_seen"] == results["steps"] * batch_size
    assert results["train_flops"] > 0 and results["parameters_trainable"] > 0
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    assert PreTrainedTokenizerFast.from_pretrained(folder).pad_token == "[PAD]"
    if stage == "autoencoder":
        assert 0.5 < results["eval"]["accuracy"] <= 1.0  # counting text is easy to reconstruct after 80 steps
    else:
        brier = {"brierlm", "brier1", "brier2", "brier3", "brier4"}
        levels = {"model", "context_free", "oracle", "shuffled", "context_learned"}  # CALM's energy levels
        assert set(results["eval"]) == (brier | levels if stage == "lm" else brier)
        assert all(-1.0 <= results["eval"][f"brier{n}"] <= 1.0 for n in range(1, 5))
        assert results["eval"]["brierlm"] == pytest.approx(brierlm([results["eval"][f"brier{n}"] for n in range(1, 5)]))
    if stage == "ar":  # counting is learnt by a Llama in 30 steps: far above chance (about 0 for a random model)
        assert results["eval"]["brier1"] > 0.2


@pytest.mark.slow
def test_lm_stage_freezes_the_trained_autoencoder(pipeline):
    """The CALM folder holds the trained autoencoder's weights, unchanged by LM training (frozen), in one file."""
    autoencoder = load_file(str(pipeline["autoencoder"] / "model.safetensors"))
    calm = load_file(str(pipeline["lm"] / "model.safetensors"))
    for name, tensor in autoencoder.items():
        assert torch.equal(calm[f"ae_model.{name}"], tensor), name
    results = json.loads((pipeline["lm"] / "results.json").read_text())
    assert results["parameters_trainable"] == results["parameters_total"] - sum(t.numel() for t in autoencoder.values())
    assert any("eval_brierlm" in entry for entry in results["log_history"])  # evaluated during training too
    # --no-remote-code: no copies of the code, and no auto_map pointing to them.
    assert not list(pipeline["lm"].glob("*.py"))
    saved_config = json.loads((pipeline["lm"] / "config.json").read_text())
    assert "auto_map" not in saved_config and "auto_map" not in saved_config["autoencoder_config"]
    model = CALMForCausalLM.from_pretrained(pipeline["lm"]).eval()
    ids = AutoTokenizer.from_pretrained(pipeline["lm"])(" three four five", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=8, num_candidates=4).shape == (1, ids.shape[1] + 8)


class GradientRecorder(TrainerCallback):
    """Keeps a copy of the gradients at the (only) optimizer step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _trainer_gradients(model, dataset, collator, batch_size: int, accumulation: int, tmp_path):
    recorder = GradientRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[recorder])
    with one_thread():
        trainer.train()
    return recorder.grads, trainer.state.log_history[0]["loss"]


def _autoencoder_case():
    torch.manual_seed(0)
    config = CALMAutoencoderConfig(vocab_size=40, hidden_size=16, intermediate_size=32, latent_size=4, ae_dropout=0.0)
    model = CALMAutoencoder(config)
    ids = torch.randint(0, 40, (4, 16))
    # The latent's noise is drawn per example, so that any split into micro-batches sees the same draws.
    examples = [{"input_ids": ids[i], "labels": ids[i], "latent_noise": torch.randn(4, 4)} for i in range(4)]
    return model, examples, None


def _lm_case():
    model = CALMForCausalLM(tiny_config(num_samples=3, num_target_samples=5))
    ids = torch.randint(0, 90, (4, 12))  # 3 chunks: 2 target chunks per row
    examples = [
        {
            "input_ids": ids[i],
            "labels": ids[i],
            "loss_noise": (torch.randn(5, 2, 8), torch.rand(3, 2, 8) - 0.5),  # target draws, head draws
        }
        for i in range(4)
    ]

    def collate(batch):
        # forward() takes the draws as [samples, targets in row-major (row, chunk) order, dim].
        out = {key: torch.stack([example[key] for example in batch]) for key in ("input_ids", "labels")}
        draws = [torch.stack([example["loss_noise"][i] for example in batch]) for i in range(2)]
        return {**out, "loss_noise": tuple(draw.transpose(0, 1).flatten(1, 2) for draw in draws)}

    return model, examples, collate


@pytest.mark.parametrize("case", [_autoencoder_case, _lm_case])
def test_gradient_accumulation_matches_full_batch(case, tmp_path):
    """2 micro-batches of 2 with accumulation give the gradients and loss of one batch of 4 (mean of means)."""
    model, examples, collate = case()
    batch = (collate or torch.utils.data.default_collate)(examples)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    for batch_size, accumulation in ((4, 1), (2, 2)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(initial[n])
        grads, logged_loss = _trainer_gradients(model, examples, collate, batch_size, accumulation, tmp_path)
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            message = f"{name} ({batch_size} x {accumulation})"
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=message)
        assert logged_loss == pytest.approx(loss.item(), rel=1e-3)


@pytest.mark.slow
def test_data_parallel_two_processes_on_gloo(pipeline, tmp_path):
    """torchrun with 2 CPU processes: DDP over gloo, each process reads its share of every global batch."""
    data = pipeline["tokenizer"].parent / "docs.jsonl"
    overrides = [arg for item in TINY["autoencoder"] for arg in ("--set", item)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "calm_transformers.train_calm",
        "--stage",
        "autoencoder",
        "--data",
        str(data),
        "--tokenizer",
        str(pipeline["tokenizer"]),
        "--output-dir",
        str(tmp_path),
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--logging-steps",
        "1",
        "--no-progress",
        *overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=HANG_TIMEOUT, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 3
    assert results["rows_seen"] == 3 * 2 * 2  # global batch = per-device batch x processes
    assert result.stdout.count('"world_size": 2') == 1  # only the main process reports


@pytest.mark.slow
def test_sample_report_counts_known_words_of_calm_and_llama(pipeline):
    """scripts/sample_report.py (the shipped model's known-word share) on a CALM and on its Llama baseline."""
    require_shared(SHARED / "data")
    import sample_report

    assert sample_report.words("O, Romeo! 'tis I.") == ["o", "romeo", "tis", "i"]
    vocabulary = sample_report.known_words()
    assert {"romeo", "tis", "thou"} <= vocabulary and "xqzvk" not in vocabulary
    for stage in ("lm", "ar"):
        with one_thread():
            result = sample_report.report(str(pipeline[stage]), max_new_tokens=8)
        for part in result["temperatures"].values():
            assert len(part["samples"]) == 20 and part["words"] > 0
            assert 0 <= part["known_word_share"] <= 1


@pytest.mark.slow
def test_decode_diagnostics_on_the_shipped_autoencoder():
    """scripts/decode_diagnostics.py (docs/training.md): held-out text is real words, and so is what the shipped
    autoencoder decodes from each chunk's own posterior; N(0, I) draws decode to far fewer."""
    require_shared(SHARED / "data")
    import decode_diagnostics as diagnostics

    tokenizer = PreTrainedTokenizerFast.from_pretrained(SHIPPED)
    documents = diagnostics.load_documents(diagnostics.SHAKESPEARE)[-2:]
    blocks = pack_documents(tokenizer, documents, 256)[:4]
    with one_thread():
        shares = diagnostics.decoded_word_shares(diagnostics.load_autoencoder(str(SHIPPED)), tokenizer, blocks)
    # The oracle is bounded by the autoencoder: it reconstructs 95.4% of held-out tokens (docs/training.md).
    assert shares["text"] > 0.95 and shares["oracle"] > 0.9
    assert shares["prior"] < shares["oracle"] - 0.1


def test_shipped_model_loads_and_generates():
    files = {p.name for p in SHIPPED.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= files
    # The code remote-code loading needs is linked, not copied: one copy of the model code in the repository.
    for path in code_files():
        assert (SHIPPED / path.name).resolve() == path.resolve(), path.name
    # A small download: 8.5M float32 parameters, 3.1M of them the embeddings of its 8192 tokens (docs/training.md).
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 40 * 2**20
    model = CALMForCausalLM.from_pretrained(SHIPPED).eval()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED, trust_remote_code=True)
    assert model.config.vocab_size == len(tokenizer)
    inputs = tokenizer(["The king", "My lord, I"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    output = model.generate(**inputs, max_new_tokens=16, num_candidates=50)
    assert output.shape == (2, inputs["input_ids"].shape[1] + 16)
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(len(text.split()) >= 3 for text in texts), texts


@pytest.mark.slow
def test_shipped_model_card_snippet_runs_with_remote_code_alone(tmp_path):
    """The card's pipeline snippet, in a fresh offline process with an empty module cache and the package hidden:
    the folder's own code files are all it needs."""
    card = (SHIPPED / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    folder = tmp_path / SHIPPED.name
    folder.symlink_to(SHIPPED)
    code = "import sys; sys.modules['calm_transformers'] = None  # as on a machine without the package\n" + snippet
    out = run_python(code, cwd=tmp_path, env_extra={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert len(out.split()) >= 5, out
    assert "Do you wish to run the custom code" not in out  # no prompt, no wait: every loader trusts the code


@pytest.mark.parametrize("head_type", ["diffusion", "flow"])
@pytest.mark.slow
def test_lm_stage_trains_the_authors_other_heads(pipeline, head_type, tmp_path):
    """`calm-train --stage lm --set head_type=...` trains a diffusion or flow head on the same autoencoder; the folder
    reloads with that head, scores BrierLM and generates at T < 1 (the pool)."""
    data = pipeline["lm"].parent / "docs.jsonl"
    argv = ["--stage", "lm", "--output-dir", str(tmp_path / head_type), "--data", str(data), "--num-eval-docs", "3",
            "--block-size", "32", "--no-progress", "--autoencoder", str(pipeline["autoencoder"]), "--max-steps", "8",
            "--batch-size", "4", "--eval-blocks", "1", "--logging-steps", "2", "--set", f"head_type={head_type}",
            *(arg for item in TINY["lm"] for arg in ("--set", item)), "--set", "diffusion_steps=10"]  # fmt: skip
    with one_thread():
        assert main(argv) == 0
    results = json.loads((tmp_path / head_type / "results.json").read_text())
    losses = _losses(tmp_path / head_type)
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert all(-1.0 <= results["eval"][f"brier{n}"] <= 1.0 for n in range(1, 5))
    model = CALMForCausalLM.from_pretrained(tmp_path / head_type).eval()
    assert model.config.head_type == head_type and model.config.diffusion_steps == 10
    torch.manual_seed(0)
    assert model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=8, temperature=0.5, num_candidates=4).shape == (
        1,
        11,
    )


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_same_losses(pipeline, tmp_path, capsys, monkeypatch):
    """calm-train killed mid-run (SIGKILL, after its first checkpoint) and restarted with --resume logs the losses an
    uninterrupted run logs: the model, optimiser, scheduler, data order and random draws all continue."""
    data = pipeline["lm"].parent / "docs.jsonl"

    def argv(folder) -> list[str]:
        return ["--stage", "lm", "--output-dir", str(folder), "--data", str(data), "--num-eval-docs", "3",
                "--block-size", "32", "--no-progress", "--autoencoder", str(pipeline["autoencoder"]),
                "--max-steps", "24", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "0", "--logging-steps", "1",
                "--save-steps", "4", *(arg for item in TINY["lm"] for arg in ("--set", item))]  # fmt: skip

    with one_thread():
        assert main(argv(tmp_path / "whole")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "calm_transformers.train_calm", *argv(tmp_path / "killed")]
    log = tmp_path / "killed.log"
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    first = tmp_path / "killed" / "checkpoint-4" / "trainer_state.json"  # written last in a checkpoint
    try:
        for _ in range(HANG_TIMEOUT * 10):  # bounded: until the first checkpoint is complete
            if first.is_file() or process.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        process.kill()
        process.wait()
    assert first.is_file(), log.read_text()[-3000:]
    assert not (tmp_path / "killed" / "results.json").is_file(), "killed after it finished"
    checkpoint = max(int(path.name.split("-")[1]) for path in (tmp_path / "killed").glob("checkpoint-*"))
    steps_run = []
    training_step = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", lambda *a, **k: steps_run.append(1) or training_step(*a, **k))
    with one_thread():
        assert main([*argv(tmp_path / "killed"), "--resume"]) == 0
    assert len(steps_run) <= 24 - 4 and checkpoint >= 4  # it went on from a checkpoint, not from the start
    whole, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "killed")  # the log continues the checkpoint's
    assert len(whole) == 24 and resumed == pytest.approx(whole, rel=1e-6)
    with pytest.raises(SystemExit):
        main([*argv(tmp_path / "fresh"), "--resume"])
    assert "no complete checkpoint-* folder" in capsys.readouterr().err


def test_trained_and_shipped_tokenizers_have_the_chat_template(tokenizer):
    """Servers' chat endpoints need a chat template: every tokenizer calm-train writes has the plain transcript one,
    and so has the shipped model's."""
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (SHIPPED / "chat_template.jinja").read_text().rstrip("\n") == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == tokenizer.bos_token + "User: Hi\nAssistant:"

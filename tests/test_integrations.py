"""The clients users combine CALM with: accelerate (offload, 2-process DDP), peft, Trainer, lm-evaluation-harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from calm_transformers import CALMForCausalLM
from conftest import HANG_TIMEOUT, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.slow  # conversions, training runs or subprocesses: minutes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny CALM with a word-level tokenizer (ids 3..94 are words w3..w94, [PAD] = 95)."""
    path = tmp_path_factory.mktemp("calm")
    model = tiny_model(patch_size=4)
    model.generation_config.num_candidates = 16
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_offloaded_generate_equals_in_memory(folder, tmp_path):
    """accelerate's disk offload (weights on "meta" until each module runs): the same tokens as in memory."""
    pytest.importorskip("accelerate")
    model = CALMForCausalLM.from_pretrained(folder).eval()
    offloaded = CALMForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=str(tmp_path)
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for settings in ({"temperature": 1.0}, {"temperature": 0.5}):
        expected = model.generate(prompt, max_new_tokens=8, generator=torch.Generator().manual_seed(0), **settings)
        got = offloaded.generate(prompt, max_new_tokens=8, generator=torch.Generator().manual_seed(0), **settings)
        assert got.tolist() == expected.tolist(), settings


def test_unmasked_left_padded_batch_equals_masked(folder):
    """Without attention_mask, padding is inferred from the pad token, as transformers' generate does."""
    model = CALMForCausalLM.from_pretrained(folder).eval()
    pad = model.config.pad_token_id
    batch = torch.tensor([[pad, pad, pad, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    mask = (batch != pad).long()
    kwargs = dict(max_new_tokens=8, temperature=1.0, eos_token_id=None)
    masked = model.generate(batch, attention_mask=mask, generator=torch.Generator().manual_seed(0), **kwargs)
    unmasked = model.generate(batch, generator=torch.Generator().manual_seed(0), **kwargs)
    assert unmasked.tolist() == masked.tolist()


def test_peft_lora_trains_saves_reloads_and_merges(folder, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import Trainer, TrainingArguments

    model = CALMForCausalLM.from_pretrained(folder)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    lora = peft.get_peft_model(model, config)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the autoencoder and the base weights stay frozen
    ids = torch.randint(3, 95, (8, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", save_strategy="no", use_cpu=True, logging_steps=1,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_B" in n}
    Trainer(model=lora, args=args, train_dataset=data).train()
    assert any(not torch.equal(p, before[n]) for n, p in lora.named_parameters() if n in before)
    lora.save_pretrained(tmp_path / "adapter")

    reloaded = peft.PeftModel.from_pretrained(CALMForCausalLM.from_pretrained(folder), tmp_path / "adapter").eval()
    lora.eval()
    with torch.no_grad():
        expected = lora(ids[:2]).last_hidden_state
        torch.testing.assert_close(reloaded(ids[:2]).last_hidden_state, expected)
        merged = reloaded.merge_and_unload()
        assert type(merged) is CALMForCausalLM
        torch.testing.assert_close(merged(ids[:2]).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    assert merged.generate(ids[:1, :6], max_new_tokens=4).shape == (1, 10)


TWO_PROCESS_SCRIPT = """
import os, pathlib, sys, torch
from accelerate import Accelerator
from transformers import Trainer, TrainingArguments
from calm_transformers import CALMForCausalLM

folder, mode, out = sys.argv[1:]
model = CALMForCausalLM.from_pretrained(folder)  # a loaded model: its autoencoder must be frozen
torch.manual_seed(0)
data = [{"input_ids": row, "labels": row} for row in torch.randint(3, 95, (16, 16))]
if mode == "accelerate":
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    world = accelerator.num_processes
else:
    args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                             gradient_checkpointing=True, report_to="none", save_strategy="no", ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    world = trainer.args.world_size
# one file per process: the two processes' stdout lines can interleave
pathlib.Path(out).mkdir(parents=True, exist_ok=True)
pathlib.Path(out, f"done-{os.environ['RANK']}").write_text(str(world))
"""


@pytest.mark.parametrize("mode", ["accelerate", "trainer"])
def test_two_process_training_of_a_loaded_model(folder, tmp_path, mode):
    """DDP over gloo on 2 CPU processes: a plain Accelerator loop, and Trainer with gradient checkpointing. Both fail
    ("parameters that were not used in producing loss") if a loaded model's autoencoder is trainable."""
    pytest.importorskip("accelerate")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TWO_PROCESS_SCRIPT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, str(folder), mode, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    done = sorted(path.name for path in (tmp_path / "out").glob("done-*"))
    assert done == ["done-0", "done-1"], result.stdout[-2000:]
    assert all((tmp_path / "out" / name).read_text() == "2" for name in done)  # each process saw a world of 2


LM_EVAL_TASK = """
task: calm_words
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["w94"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture
def lm_eval_model(folder):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    model = CALMForCausalLM.from_pretrained(folder).eval()
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(folder), batch_size=2)


def test_lm_eval_generate_until_task_runs(lm_eval_model, tmp_path, monkeypatch):
    """The README's lm-evaluation-harness recipe: a generate_until task from a local YAML + JSONL file."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "calm_words.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}", "target": f" w{i + 2}"}) + "\n" for i in (5, 9)))
    (tmp_path / "calm_words.yaml").write_text(LM_EVAL_TASK.format(data=data))
    results = lm_eval.simple_evaluate(
        model=lm_eval_model, tasks=["calm_words"], task_manager=TaskManager(include_path=str(tmp_path))
    )
    assert "exact_match,none" in results["results"]["calm_words"]


def test_lm_eval_loglikelihood_names_the_problem(lm_eval_model):
    """Token likelihoods do not exist for CALM: one clear error, naming what to use instead."""
    from lm_eval.api.instance import Instance

    request = Instance("loglikelihood", doc={}, arguments=("w5 w6", " w7"), idx=0)
    with pytest.raises((ValueError, AttributeError), match="CALM has no token logits.*generate_until.*calm-eval"):
        lm_eval_model.loglikelihood([request])

"""`pipeline("text-generation", trust_remote_code=True)` on a saved folder, in a fresh offline process."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_python, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.slow  # conversions, training runs or subprocesses: minutes

WORDS = [f"w{i}" for i in range(3, 95)]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calm_pipeline")
    model = tiny_model(patch_size=4)
    model.generation_config.num_candidates = 16
    with torch.no_grad():  # EOS (2) and [PAD] (95) score 0 while some other token scores > 0: never emitted
        model.ae_model.encoder.embed_tokens.weight[[2, 95]] = 0.0
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


SCRIPT = r"""
import json, threading, torch, transformers
from transformers import pipeline, TextIteratorStreamer, AutoTokenizer
folder = FOLDER
pipe = pipeline("text-generation", model=folder, trust_remote_code=True)
assert type(pipe.model).__module__.startswith("transformers_modules"), type(pipe.model).__module__
tok = pipe.tokenizer
report = {"version": transformers.__version__}

torch.manual_seed(0)
one = pipe("w5 w6 w7", max_new_tokens=6, do_sample=True, temperature=0.5)
report["one"] = one[0]["generated_text"]

prompts = ["w5 w6 w7 w8 w9", "w10", "w11 w12 w13 w14 w15 w16 w17 w18 w19"]
torch.manual_seed(0)
batch = pipe(prompts, batch_size=3, max_new_tokens=7, return_full_text=False, do_sample=False)
report["batch_new"] = [b[0]["generated_text"] for b in batch]
batch_full = pipe(prompts, batch_size=3, max_new_tokens=5, return_full_text=True)
report["batch_full"] = [b[0]["generated_text"] for b in batch_full]
report["single_new"] = [pipe(p, max_new_tokens=7, return_full_text=False, do_sample=False)[0]["generated_text"]
                        for p in prompts]

streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
result = {}
thread = threading.Thread(target=lambda: result.update(out=pipe("w20 w21 w22 w23 w24 w25", max_new_tokens=9,
                          return_full_text=False, streamer=streamer)))
thread.start()
report["streamed"] = "".join(streamer)
thread.join()
report["stream_returned"] = result["out"][0]["generated_text"]
print("REPORT" + json.dumps(report))
"""


def run_pipeline(folder) -> dict:
    out = run_python(
        SCRIPT.replace("FOLDER", repr(str(folder))), cwd=folder, env_extra={"HF_MODULES_CACHE": str(folder / "modules")}
    )
    return json.loads(out.split("REPORT", 1)[1])


def words(text: str) -> list[str]:
    return [w for w in text.split() if w]


def test_pipeline_text_generation(model_folder):
    report = run_pipeline(model_folder)
    assert report["one"].startswith("w5 w6 w7")
    assert len(words(report["one"][len("w5 w6 w7") :])) == 6  # 5.x joins prompt + new text without a space

    prompts = ["w5 w6 w7 w8 w9", "w10", "w11 w12 w13 w14 w15 w16 w17 w18 w19"]
    for new, full, prompt in zip(report["batch_new"], report["batch_full"], prompts, strict=True):
        assert not new.strip().startswith(prompt)  # return_full_text=False drops the prompt
        assert len(words(new)) == 7  # max_new_tokens=7 is not a multiple of K=4: the last chunk is cut
        assert full.startswith(prompt) and len(words(full[len(prompt) :])) == 5
    assert all(set(words(t)) <= set(WORDS) for t in report["batch_new"] + report["single_new"])
    assert [len(words(t)) for t in report["single_new"]] == [7, 7, 7]
    assert report["streamed"].strip() == report["stream_returned"].strip()
    assert len(words(report["streamed"])) == 9

"""calm-serve: the shipped model behind transformers' OpenAI-compatible server, through the `openai` client.

One server (`python -m calm_transformers.serve`, as `calm-serve`) on 127.0.0.1 and a free port serves the module's
tests; each text it answers is compared with CALM's `generate` called here with the same prompt, settings and seed.
Then the loader alone (no server), and benchmarks/load_serve.py in small.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from calm_transformers import CALMForCausalLM, serve
from conftest import REPO, run_python

pytestmark = [
    pytest.mark.slow,  # about 25 s: a server and its model's process start, twice
    pytest.mark.skipif(serve.serving_problem() is not None, reason=f"calm-serve {serve.serving_problem()}"),
]

MODEL = "calm_tiny_shakespeare"  # as the README's command names it, from the repository root
STARTUP_SECONDS = 240
WAIT_SECONDS = 120  # for any one answer
# torch threads in the server's model process and for `generate` here: the same text needs the same arithmetic, and
# on a small CPU shared with other work, more threads than free cores make OpenMP spin, many times slower.
THREADS = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start calm-serve on a free port of 127.0.0.1 and wait for /health; yield its URL; stop it by its PID."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [sys.executable, "-m", "calm_transformers.serve", MODEL, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as output:
        process = subprocess.Popen(
            [*command, "--device", "cpu"],
            cwd=REPO,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS)},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"calm-serve did not start (exit code {process.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()  # SIGTERM to its own PID: uvicorn shuts down, and stops the model's process
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return json.load(response) == {"status": "ok"}
    except OSError:
        return False


@pytest.fixture(scope="module")
def client(server: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=WAIT_SECONDS)


@pytest.fixture(scope="module")
def local() -> Iterator[tuple]:
    """The shipped model and tokenizer, loaded here as calm-generate loads them, to generate on the server's threads."""
    from transformers import AutoTokenizer

    path, threads = REPO / MODEL, torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield CALMForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    torch.set_num_threads(threads)


def generate_tokens(local: tuple, prompt: str | list[dict], seed: int, **settings: object) -> list[int]:
    """The tokens CALM's `generate` writes for a prompt (or chat messages, through the chat template) with `seed`."""
    model, tokenizer = local
    if isinstance(prompt, str):
        inputs = tokenizer(prompt, return_tensors="pt")
    else:
        inputs = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    if "stop_strings" in settings:
        settings["tokenizer"] = tokenizer
    torch.manual_seed(seed)
    return model.generate(**inputs, **settings)[0, inputs["input_ids"].shape[1] :].tolist()


def generate_text(local: tuple, prompt: str | list[dict], seed: int, **settings: object) -> str:
    """The text of `generate_tokens`, decoded as the server decodes it."""
    return local[1].decode(generate_tokens(local, prompt, seed, **settings), skip_special_tokens=True)


def streamed_text(stream, chat: bool = False) -> tuple[list[str], str | None]:
    """The pieces of text a stream sent, and its finish reason."""
    pieces, finish_reason = [], None
    for chunk in stream:  # bounded by the request's max_tokens, and by the client's timeout
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text = choice.delta.content if chat else choice.text
        if text:
            pieces.append(text)
        finish_reason = choice.finish_reason or finish_reason
    return pieces, finish_reason


def test_completions_give_generates_text_for_the_same_prompt_and_seed(client, local):
    prompt, settings = "My lord, the king", {"max_tokens": 16, "temperature": 0.5, "seed": 3}
    expected = generate_text(local, prompt, seed=3, max_new_tokens=16, temperature=0.5)

    reply = client.completions.create(model=MODEL, prompt=prompt, **settings)
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "length"
    # The prompt got the special tokens calm-generate gives it (BOS).
    assert reply.usage.prompt_tokens == len(local[1](prompt).input_ids) == 1 + len(local[1].tokenize(prompt))

    stream = client.completions.create(model=MODEL, prompt=prompt, stream=True, **settings)
    pieces, finish_reason = streamed_text(stream)
    assert "".join(pieces) == expected and len(pieces) > 1  # chunk by chunk
    assert finish_reason == "length"


def test_chat_completions_and_responses_use_the_chat_template(client, local):
    messages = [{"role": "user", "content": "Who goes there?"}]
    expected = generate_text(local, messages, seed=5, max_new_tokens=12)

    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=5)
    assert reply.choices[0].message.content == expected

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=5, stream=True)
    pieces, finish_reason = streamed_text(stream, chat=True)
    assert "".join(pieces) == expected and finish_reason == "length"

    response = client.responses.create(
        model=MODEL, input=messages[0]["content"], max_output_tokens=12, extra_body={"seed": 5}
    )
    assert response.output_text == expected


def test_temperature_zero_is_the_most_frequent_chunk_of_the_pool(client, local):
    # The server sends do_sample=False with temperature 0: the most frequent of a pool of sampled chunks.
    expected = generate_text(local, "Good morrow", seed=2, max_new_tokens=8, do_sample=False)
    reply = client.completions.create(model=MODEL, prompt="Good morrow", max_tokens=8, temperature=0, seed=2)
    assert reply.choices[0].text == expected


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_ends_the_text_at_the_stop_string(client, local, stream):
    prompt, stop = "My lord", "."
    tokens = generate_tokens(local, prompt, seed=0, max_new_tokens=64, stop_strings=stop)
    expected = local[1].decode(tokens, skip_special_tokens=True)
    # The text ends with the token that completes the stop string: transformers' server answers it whole, for every
    # model (OpenAI's leaves the stop string out).
    assert stop in expected and stop not in local[1].decode(tokens[:-1], skip_special_tokens=True)

    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, seed=0, stop=stop, stream=stream)
    if stream:
        pieces, finish_reason = streamed_text(reply)
        text = "".join(pieces)
    else:
        text, finish_reason = reply.choices[0].text, reply.choices[0].finish_reason
        assert reply.usage.completion_tokens == len(tokens)
    assert text == expected and finish_reason == "stop"


def test_concurrent_requests_are_all_answered_none_mixed_up(client, local):
    requests = [(f"{word}, my lord", seed) for seed, word in enumerate(["Hark", "Stay", "Speak", "Come"] * 2)]
    expected = [generate_text(local, prompt, seed=seed, max_new_tokens=8) for prompt, seed in requests]

    def ask(request: tuple[str, int]) -> str:
        prompt, seed = request
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=seed).choices[0].text

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        answers = list(pool.map(ask, requests, timeout=WAIT_SECONDS * 2))
    assert answers == expected


@pytest.mark.parametrize(
    "endpoint,settings,message",
    [
        ("completions", {"temperature": 2.0}, r"temperature must be in \(0, 1\] for CALM \(got 2.0\)"),
        ("completions", {"temperature": 2.0, "stream": True}, r"temperature must be in \(0, 1\]"),
        ("completions", {"n": 2}, "n=2 is not supported: CALM answers one sequence per request"),
        ("completions", {"logprobs": 2}, "logprobs=2 is not supported: CALM has no token probabilities"),
        ("chat", {"n": 2}, "n=2 is not supported: CALM answers one sequence per request"),
        ("chat", {"top_p": 0.5}, "top_p=0.5 is not supported: CALM has no token logits"),
    ],
)
def test_a_bad_request_gets_a_400_that_names_the_problem(client, endpoint, settings, message):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as error:
        if endpoint == "chat":
            messages = [{"role": "user", "content": "Hi"}]
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, **settings)
        else:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, **settings)
    assert error.value.status_code == 400 and re.search(message, error.value.response.json()["detail"])
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=4).choices[0].text  # still serving


def test_a_stream_cancelled_midway_leaves_the_server_serving(client, server):
    stream = client.completions.create(model=MODEL, prompt="Now", max_tokens=1500, stream=True)
    for received, _ in enumerate(stream, start=1):
        if received == 2:
            break
    stream.close()  # the client leaves: the server cancels the generation
    assert _healthy(server)
    reply = client.completions.create(model=MODEL, prompt="Then", max_tokens=8, seed=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8


def test_models_are_listed(client):
    assert [model.id for model in client.models.list()] == [MODEL]


def test_the_readme_client_snippet_runs(server):
    readme = (REPO / "README.md").read_text()
    # tests/test_readme.py runs ```python blocks without a server; this one is fenced apart for this test to run.
    (snippet,) = re.findall(r"```python \(with calm-serve running\)\n(.*?)```", readme, flags=re.S)
    assert "http://127.0.0.1:8000/v1" in snippet
    out = run_python(snippet.replace("http://127.0.0.1:8000/v1", f"{server}/v1"), cwd=REPO)
    assert out.strip()


# The loader, without a server


@pytest.fixture
def folder_without_code(tmp_path: Path) -> Path:
    """The shipped model without its code files, and with a tokenizer that adds no BOS and has no chat template."""
    from transformers import AutoTokenizer

    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(REPO / MODEL / name)
    tokenizer = AutoTokenizer.from_pretrained(REPO / MODEL)
    tokenizer.add_bos_token, tokenizer.chat_template = False, None
    tokenizer.save_pretrained(tmp_path)
    assert tokenizer("Hi").input_ids[0] != tokenizer.bos_token_id
    return tmp_path


def test_the_loader_loads_a_calm_folder_without_code_and_adds_bos(folder_without_code: Path):
    loader = serve.CALMModelLoader(device="cpu")
    model, tokenizer = loader.load_model_and_processor(str(folder_without_code))
    assert isinstance(model, CALMForCausalLM)
    assert tokenizer("Hi").input_ids[0] == tokenizer.bos_token_id
    with pytest.raises(ValueError, match="chat_template is not set"):  # the server's 400 for chat without one
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_continuous_batching_says_why_calm_cannot_use_it(folder_without_code: Path):
    loader = serve.CALMModelLoader(device="cpu", continuous_batching=True)
    with pytest.raises(ValueError, match="one position per token"):
        loader.load_model_and_processor(str(folder_without_code))


def test_the_shipped_chat_template_is_a_transcript(local):
    tokenizer = local[1]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who goes there?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|begin_of_text|>System: Be brief.\nUser: Who goes there?\nAssistant:"


def test_calm_serve_is_the_installed_command():
    command = shutil.which("calm-serve", path=str(Path(sys.executable).parent)) or pytest.fail("no calm-serve")
    help_text = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "calm-serve" in help_text and "--port" in help_text and "--device" in help_text


def test_the_load_script_runs(tmp_path: Path):
    """benchmarks/load_serve.py end to end, small: its rows and JSON (no claim about speed)."""
    output = tmp_path / "load.json"
    small = ["--requests", "2", "--max-tokens", "4", "--concurrency", "1", "2", "--rounds", "1", "--output", output]
    run = subprocess.run(
        [sys.executable, "benchmarks/load_serve.py", *map(str, small)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=STARTUP_SECONDS + 120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(output.read_text())["results"]
    assert len(results) == 4 and all(row["requests"] == 2 and row["requests_per_s"] > 0 for row in results.values())

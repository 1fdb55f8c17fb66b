"""`calm-generate`, the README's first command: text from the shipped model, and clear errors for bad arguments."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from calm_transformers.cli import DEFAULT_MODEL, main
from conftest import HANG_TIMEOUT, REPO


def test_streams_a_continuation_of_the_prompt(capsys):
    assert main(["The history of the city", "--max-new-tokens", "12", "--num-candidates", "16", "--seed", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The history of the city")
    assert len(text.split()) > len("The history of the city".split())  # new words were streamed after the prompt


def test_seed_makes_the_output_reproducible(capsys):
    runs = []
    for _ in range(2):
        main(["The", "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "3"])
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--temperature", "2"], r"temperature must be in \(0, 1\]"),
        (["--num-candidates", "0"], "num_candidates"),
        (["--device", "nowhere"], "--device nowhere is not usable here"),
        (["--model", "./no-such-model"], "no folder at ./no-such-model"),
        (["--model", "/no/such/model"], "no folder at /no/such/model"),
    ],
)
def test_bad_arguments_say_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["Hi", "--max-new-tokens", "4", *argv])
    assert re.search(message, capsys.readouterr().err)


def test_a_folder_without_a_model_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["Hi", "--model", str(tmp_path)])
    assert f"{tmp_path} has no config.json" in capsys.readouterr().err


def test_a_folder_without_weights_says_what_could_not_be_loaded(tmp_path, capsys):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # the shipped model, less its weights
        shutil.copy(DEFAULT_MODEL / name, tmp_path / name)
    with pytest.raises(SystemExit):
        main(["Hi", "--model", str(tmp_path)])
    error = capsys.readouterr().err
    assert f"could not load --model {tmp_path}" in error and "model.safetensors" in error


def test_console_script_runs_the_readme_command():
    """The installed `calm-generate` (pip install -e .), as the README's quick start runs it, in a fresh process."""
    script = Path(sys.executable).parent / "calm-generate"
    if not script.exists():
        pytest.fail(f"calm-generate is not installed beside {sys.executable}: run `pip install -e .` first")
    result = subprocess.run(
        [str(script), "The history of the city", "--max-new-tokens", "8", "--seed", "0"],
        capture_output=True,
        text=True,
        cwd=REPO.parent,
        timeout=HANG_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The history of the city")


@pytest.mark.parametrize(
    "module",
    ["cli", "train_calm", "evaluate_calm", "convert_checkpoint"],
)
def test_help_is_plain_text_and_every_option_has_a_help(module, capsys):
    """--help reads as plain text (no Markdown backticks) and says what each option is for."""
    import importlib

    parser_of = importlib.import_module(f"calm_transformers.{module}")
    with pytest.raises(SystemExit):
        parser_of.main(["--help"])
    text = capsys.readouterr().out
    assert "`" not in text
    options = text.split("options:", 1)[1]
    # An option line without help ends right after its metavar: "  --name NAME" alone on its line, and the next
    # line starts another option.
    lines = [line for line in options.splitlines() if line.strip()]
    for line, following in zip(lines, lines[1:] + ["  --"], strict=True):
        if line.lstrip().startswith("-") and following.lstrip().startswith("-"):
            assert "  " in line.strip(), f"{module}: no help for {line.strip()!r}"


def test_a_folder_of_another_model_is_refused(tmp_path, capsys):
    """A Llama folder is not loaded as a CALM with random weights: one line names what it is and what to use."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=2048, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, tmp_path / name)
    with pytest.raises(SystemExit) as exit_info:
        main(["Hi", "--model", str(tmp_path), "--max-new-tokens", "4"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "not a CALMConfig (model_type 'llama', LlamaForCausalLM)" in error and "AutoModelForCausalLM" in error

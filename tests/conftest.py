"""Shared test helpers: the `../shared` fixtures and tiny random CALM models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CALM_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "upstream-tiny"
SHIPPED = REPO / "calm_tiny_shakespeare"  # the small trained CALM the package ships

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(REPO / "scripts"))  # the scripts' modules, which tests import by name

from calm_transformers import CALMAutoencoderConfig, CALMConfig, CALMForCausalLM  # noqa: E402

PARITY: dict[str, float] = {}
# Subprocesses of the tests are stopped after this long: a guard against a hang, not a speed limit (a cold, busy
# 2-core machine runs the slowest of them in a few minutes).
HANG_TIMEOUT = 3600


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "slow: trains, converts or runs subprocesses (minutes); -m 'not slow' is the fast tier"
    )


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the measured parity figures (max abs diff against the authors' outputs) after the run."""
    if PARITY:
        terminalreporter.write_line(
            "parity with the reference (max abs diff): "
            + ", ".join(f"{name} {value:.2e}" for name, value in PARITY.items())
        )


def require_shared(path: Path = FIXTURE) -> Path:
    """Fail loudly (never pass silently) when a test needs ../shared and it is not there."""
    if not path.exists():
        pytest.fail(
            f"{path} is missing: this test needs the project's shared folder (fixtures, data, tokenizers) beside the "
            "checkout as ../shared, or CALM_SHARED=/path/to/shared."
        )
    return path


def require_torch_compile() -> None:
    """Skip, saying why, where the compile tests cannot run: inductor needs a C++ compiler on CPU, and the tests
    use torch.compiler.set_stance (torch >= 2.6)."""
    import shutil

    if not any(map(shutil.which, ("g++", "c++", "clang++"))):
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++ or clang++): none found")
    if not hasattr(torch.compiler, "set_stance"):
        pytest.skip(f"needs torch.compiler.set_stance (torch >= 2.6), torch is {torch.__version__}")


@pytest.fixture(scope="session")
def reference() -> dict:
    return torch.load(require_shared() / "reference.pt", weights_only=True)


@pytest.fixture(scope="session")
def fixture_model() -> CALMForCausalLM:
    from calm_transformers.convert_checkpoint import load_reference_checkpoint

    return load_reference_checkpoint(require_shared() / "calm", require_shared() / "autoencoder").eval()


# The generation tests of device-agnostic code run on the CPU here and in CI, and also on a CUDA GPU where there is
# one (`pytest -k cuda`; benchmarks/gpu_checks.sh). Skipped, saying so, where there is none.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def tiny_config(
    patch_size: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    rope_theta: float = 5e5,
    vocab_size: int = 96,
    hidden_size: int = 32,
    **overrides,
) -> CALMConfig:
    ae = CALMAutoencoderConfig(
        vocab_size=vocab_size,
        hidden_size=24,
        intermediate_size=48,
        num_encoder_layers=2,
        num_decoder_layers=2,
        latent_size=8,
        patch_size=patch_size,
        pad_token_id=vocab_size - 1,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        rope_theta=rope_theta,
        patch_size=patch_size,
        latent_size=8,
        noise_size=8,
        num_mlp_layers=2,
        num_samples=4,
        pad_token_id=vocab_size - 1,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=64,
        autoencoder_config=ae,
    )
    fields.update(overrides)
    return CALMConfig(**fields)


def tiny_model(seed: int = 0, **config_kwargs) -> CALMForCausalLM:
    torch.manual_seed(seed)
    model = CALMForCausalLM(tiny_config(**config_kwargs)).eval()
    # Random weights with a non-zero head output (the authors' init zeroes it), so that different noise (and, for the
    # iterative heads, different hidden states) gives different chunks.
    with torch.no_grad():
        if model.config.head_type == "energy":
            model.generative_head.final_layer.linears[-1].weight.normal_(0, 0.5)
        for name, weight in model.generative_head.named_parameters():
            if name.endswith("weight") and weight.dim() == 2 and not weight.any():
                weight.normal_(0, 0.5)
    return model


def tiny_tokenizer(vocab_size: int = 96, pad_token: bool = True):
    """A word-level tokenizer for the tiny models: `<unk>` 0, `<s>` 1 (BOS), `</s>` 2 (EOS), words `w3`, `w4`, ...,
    and `[PAD]` as the last id (left padding); without `pad_token`, no [PAD] (as the Llama 3 tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    last_word = vocab_size - 1 if pad_token else vocab_size
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, last_word)}}
    if pad_token:
        vocab["[PAD]"] = vocab_size - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if pad_token:
        specials.update(pad_token="[PAD]", padding_side="left")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def on_device(model: CALMForCausalLM, device: str) -> CALMForCausalLM:
    """`model` itself on the CPU; a copy on another device (module-scoped fixtures stay on the CPU)."""
    import copy

    return model if device == "cpu" else copy.deepcopy(model).to(device)


def run_python(code: str, cwd: Path, env_extra: dict | None = None) -> str:
    """Run `code` in a fresh offline Python process; return its stdout (fail the test on error)."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env_extra or {})}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT
    )
    if result.returncode != 0:
        pytest.fail(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}")
    return result.stdout

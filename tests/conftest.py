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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from calm_transformers import CALMAutoencoderConfig, CALMConfig, CALMForCausalLM  # noqa: E402

PARITY: dict[str, float] = {}


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
    # Random weights with a non-zero head output, so that different noise gives different chunks.
    with torch.no_grad():
        last = model.generative_head.final_layer.linears[-1]
        last.weight.normal_(0, 0.5)
    return model


def on_device(model: CALMForCausalLM, device: str) -> CALMForCausalLM:
    """`model` itself on the CPU; a copy on another device (module-scoped fixtures stay on the CPU)."""
    import copy

    return model if device == "cpu" else copy.deepcopy(model).to(device)


def run_python(code: str, cwd: Path, env_extra: dict | None = None, timeout: int = 240) -> str:
    """Run `code` in a fresh offline Python process; return its stdout (fail the test on error)."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env_extra or {})}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        pytest.fail(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}")
    return result.stdout

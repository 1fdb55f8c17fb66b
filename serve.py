"""calm-serve: CALM models behind an OpenAI-compatible API, served by transformers' own server (`transformers serve`).

calm-serve calm_tiny_shakespeare --port 8000
python -m calm_transformers.serve MODEL [the options of `transformers serve`: --host, --device, --dtype, ...]

All of it is transformers' server: its command line, FastAPI app, model process, request validation, streaming and
endpoints (/v1/completions, /v1/chat/completions, /v1/responses, /v1/models, /health). This module adds what CALM
needs, each piece a workaround for a limitation of that server, named where it is (docs/serving.md); it can go when
transformers lifts them.
"""

from __future__ import annotations

import sys

import transformers
from packaging import version
from transformers import PreTrainedModel

from .configuration_calm import CALMConfig
from .generation_calm import inverse_temperature
from .modeling_calm import CALMForCausalLM

NEEDS = "5.25"  # the server this module knows (transformers/cli/serving); 4.57's `transformers serve` is another
SERVER_AVAILABLE = version.parse(transformers.__version__) >= version.parse(NEEDS)
if SERVER_AVAILABLE:
    from transformers.cli.serving import model_manager
    from transformers.cli.serving.utils import BaseHandler, parse_model_id

    ModelLoader = model_manager.ModelLoader
else:  # main() stops with what is needed
    ModelLoader = BaseHandler = object

# OpenAI request fields that transformers' server ignores for every model (a line in its log) and CALM cannot honour:
# their values that ask for nothing, and why others get a 400 rather than a reply that means something else.
ONE_SEQUENCE = "CALM answers one sequence per request: send several requests, with different seeds"
NO_PROBABILITIES = "CALM has no token probabilities: it draws whole chunks of K tokens from its energy head"
NO_LOGITS = (
    "CALM has no token logits to act on: shape the sampling with temperature in (0, 1] (0: the most frequent chunk "
    "of a pool)"
)
UNSUPPORTED_FIELDS = {
    "n": ((1,), ONE_SEQUENCE),
    "best_of": ((1,), ONE_SEQUENCE),
    "logprobs": ((False, 0), NO_PROBABILITIES),
    "top_logprobs": ((0,), NO_PROBABILITIES),
    "top_p": ((1,), NO_LOGITS),
    "frequency_penalty": ((0,), NO_LOGITS),
    "presence_penalty": ((0,), NO_LOGITS),
    "logit_bias": (({},), NO_LOGITS),
}


def serving_problem() -> str | None:
    """Why transformers' server cannot run here (transformers too old, or its serving extra missing), or None."""
    if not SERVER_AVAILABLE:
        found = transformers.__version__
        return f"needs transformers >= {NEEDS} (found {found}): pip install 'calm-transformers[serve]'"
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        return "needs transformers' serving extra: pip install 'calm-transformers[serve]'"
    return None


def is_calm(config: object) -> bool:
    """Whether a model's config is CALM's."""
    return getattr(config, "model_type", None) == CALMConfig.model_type


class CALMModelLoader(ModelLoader):
    """transformers' `ModelLoader` (how the server loads a model, its config and its tokenizer), for CALM models.

    The server hands its loader to the model's process, which it starts with multiprocessing's "spawn": unpickling
    this class there imports this module, so the process that loads the model has CALM's classes."""

    def __init__(self, *args: object, continuous_batching: bool = False, **kwargs: object) -> None:
        super().__init__(*args, continuous_batching=continuous_batching, **kwargs)
        self.continuous_batching = continuous_batching

    def _load_model(
        self, model_id: str, tqdm_class: type | None = None, progress_callback: object = None
    ) -> PreTrainedModel:
        # transformers 5.25's `ModelLoader._load_model` takes the class `getattr(transformers, architectures[0])`,
        # which finds transformers' own classes only, never a remote-code or registered one. CALM's class loads any
        # CALM folder (with or without code files) and Hub id, as `calm-generate` does.
        config, _ = self.load_config(model_id)
        if not is_calm(config):
            return super()._load_model(model_id, tqdm_class, progress_callback)
        if self.continuous_batching:
            raise ValueError(
                "CALM cannot run with --continuous-batching: transformers' paged cache holds one position per token, "
                "CALM's backbone one per chunk of K tokens (docs/serving.md). Leave the option out."
            )
        repo, revision, _ = parse_model_id(model_id)
        return CALMForCausalLM.from_pretrained(
            repo,
            revision=revision,
            dtype=self.dtype,
            device_map=self.device,
            attn_implementation=self.attn_implementation,
            quantization_config=self.get_quantization_config(),
            tqdm_class=tqdm_class,
        )

    def load_processor(self, model_id: str) -> object:
        # CALM models are trained on BOS + text, and `calm-generate` puts BOS in front of a prompt whose tokenizer
        # does not (the Llama 3 tokenizer of converted models, in transformers 5); the server tokenizes prompts as
        # they are. Such a tokenizer adds BOS here, so that the same prompt and seed give the same text.
        tokenizer = super().load_processor(model_id)
        if is_calm(self.load_config(model_id)[0]) and tokenizer.bos_token_id is not None:
            if tokenizer("").input_ids[:1] != [tokenizer.bos_token_id]:
                tokenizer.add_bos_token = True
        return tokenizer


def check_calm_request(handler: BaseHandler, body: dict) -> None:
    """transformers' validation of a request; then for a CALM model, a 400 for the settings it cannot honour.

    transformers 5.25's server ignores `n`, `logprobs`, ... (a line in its log), and passes `temperature` on to
    `generate`, whose error a stream reports only after its 200: the client would not know."""
    validate_request(handler, body)
    if not is_calm(handler.model_manager.get_engine(body.get("model")).model_config):
        return
    for field, (inert, why) in UNSUPPORTED_FIELDS.items():
        if body.get(field) not in (None, *inert):
            # The server answers a ValueError with a 400 and its message.
            raise ValueError(f"{field}={body[field]!r} is not supported: {why}.")
    if body.get("temperature") not in (None, 0):
        inverse_temperature(float(body["temperature"]))  # a ValueError that names CALM's range


def main(argv: list[str] | None = None) -> None:
    """`transformers serve`'s command, with its options, as `calm-serve`."""
    problem = serving_problem()
    if problem:
        sys.exit(f"calm-serve: {problem}")
    from transformers.cli.transformers import app

    app.get_command(None, "serve").main(args=argv, prog_name="calm-serve")


if __name__ == "__main__":
    # `python -m calm_transformers.serve` runs this file as __main__: the classes the server's processes unpickle
    # must be the installed module's, which installs itself on import.
    from calm_transformers.serve import main as installed_main

    installed_main()
elif __name__ == "calm_transformers.serve" and SERVER_AVAILABLE:
    # On import, so that the processes the server spawns have them too (they import this module to unpickle its
    # loader): the server builds its loader from `model_manager.ModelLoader`, and every endpoint validates requests
    # with `BaseHandler._validate_request`.
    validate_request = BaseHandler._validate_request
    model_manager.ModelLoader = CALMModelLoader
    BaseHandler._validate_request = check_calm_request

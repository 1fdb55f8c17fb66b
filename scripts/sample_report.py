"""Samples of a CALM model at T = 0.5 and T = 1, and the share of its words that are real words.

    python scripts/sample_report.py calm_tiny_shakespeare [--output scratch/samples.json]

Any causal LM folder works too (e.g. the Llama baseline of the shipped model), sampled token by token at the same
temperatures.

For each of 20 varied prompts, 64 new tokens are generated (seed fixed). The generated text is lower-cased, its
punctuation stripped and split on whitespace; a word counts as known if it occurs, treated the same way, in the
corpora of ../shared/data (Shakespeare's works and the WikiText-103 test set). Prints the share of known words per
temperature and every sample verbatim.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from calm_transformers.evaluate_calm import is_calm_model, load_documents, load_model
from transformers import AutoTokenizer

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CORPORA = ("shakespeare_works.json", "wikitext_document_level-test.json")
PROMPTS = [
    "The king",
    "My lord,",
    "What is the matter",
    "I will not",
    "O, she is",
    "Enter HAMLET",
    "Good morrow",
    "Come, let us",
    "Thou art",
    "The night is",
    "Why, how now,",
    "If music be",
    "Here comes the",
    "I pray you, sir,",
    "Farewell, and",
    "There is no",
    "The queen hath",
    "Speak, man,",
    "Let me see",
    "And so",
]
WORD = re.compile(r"[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased whitespace-separated words with punctuation stripped (apostrophes too, on both sides)."""
    return [w for w in WORD.sub(" ", text.lower()).split() if w]


def known_words(data: Path = SHARED_DATA) -> set[str]:
    vocabulary: set[str] = set()
    for name in CORPORA:
        for document in load_documents(data / name):
            vocabulary.update(words(document))
    return vocabulary


def report(model_path: str, seed: int = 0, max_new_tokens: int = 64) -> dict:
    model = load_model(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calm = is_calm_model(model)
    vocabulary = known_words()
    result: dict = {"model": model_path, "seed": seed, "max_new_tokens": max_new_tokens, "temperatures": {}}
    for temperature in (0.5, 1.0):
        samples, known, total = [], 0, 0
        for index, prompt in enumerate(PROMPTS):
            inputs = tokenizer(prompt, return_tensors="pt")
            generator = torch.Generator().manual_seed(seed + index)
            if calm:
                output = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator
                )
            else:  # a token-level model: transformers' sampling, seeded through the global generator
                torch.manual_seed(seed + index)
                output = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0,
                    pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
            text = tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
            generated = words(text)
            known += sum(w in vocabulary for w in generated)
            total += len(generated)
            samples.append({"prompt": prompt, "continuation": text})
        result["temperatures"][str(temperature)] = {
            "known_word_share": known / max(total, 1),
            "words": total,
            "samples": samples,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a CALM folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    result = report(args.model, args.seed)
    for temperature, part in result["temperatures"].items():
        print(f"T = {temperature}: {100 * part['known_word_share']:.1f}% known words of {part['words']}")
        for sample in part["samples"]:
            print(f"  {sample['prompt']!r} -> {sample['continuation']!r}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

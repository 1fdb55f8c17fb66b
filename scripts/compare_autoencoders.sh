#!/usr/bin/env bash
# Autoencoders on Shakespeare's works (latent size, kl_weight), same schedule: held-out accuracy, accuracy with noise
# on the latent, the context-free and oracle energy levels an LM would learn between, and the share of real words
# in text decoded from latents that are not exactly a chunk's (scripts/decode_diagnostics.py; docs/training.md).
#   scripts/compare_autoencoders.sh [WORK_DIR]      # about 15 minutes on 2 CPU cores; trained ones are reused
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
W=${1:-/tmp/compare_autoencoders}
D=../shared/data/shakespeare_works.json
T=(python -m calm_transformers.train_calm --data $D --num-eval-docs 2 --no-progress --seed 0)
[ -d $W/tok ] || "${T[@]}" --stage tokenizer --vocab-size 2048 --output-dir $W/tok
for v in "l64_kl1e-3 latent_size=64 kl_weight=0.001" "l32_kl1e-3 latent_size=32 kl_weight=0.001" \
         "l64_kl1e-2 latent_size=64 kl_weight=0.01" "l64_kl5e-2 latent_size=64 kl_weight=0.05" \
         "l64_kl1e-1 latent_size=64 kl_weight=0.1"; do
  set -- $v; name=$1; shift
  sets=(); for s in "$@"; do sets+=(--set $s); done
  [ -f $W/$name/results.json ] || "${T[@]}" --stage autoencoder --tokenizer $W/tok --output-dir $W/$name \
     --batch-size 4 --max-steps 1200 --lr 3e-3 --warmup-steps 50 --lr-scheduler cosine --logging-steps 400 \
     --set hidden_size=128 --set intermediate_size=256 "${sets[@]}" > $W/$name.log 2>&1
  python - $W/$name <<'PY'
import sys, json, runpy
from transformers import PreTrainedTokenizerFast
from calm_transformers import CALMAutoencoder
from calm_transformers.train_calm import build_calm, lm_blocks
from calm_transformers.evaluate_calm import energy_levels, load_documents
diagnostics = runpy.run_path("scripts/decode_diagnostics.py")
ae = CALMAutoencoder.from_pretrained(sys.argv[1]).eval(); tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
blocks = lm_blocks(tok, load_documents(diagnostics["SHAKESPEARE"])[-2:], 512)[:16]
m = build_calm(ae, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
levels = energy_levels(m, blocks)
shares = diagnostics["decoded_word_shares"](ae, tok, blocks)
r = json.load(open(sys.argv[1] + "/results.json"))
print(sys.argv[1], r["eval"], "context_free %.3f oracle %.3f" % (levels["context_free"], levels["oracle"]),
      "real words: context-free chunks %.3f prior %.3f" % (shares["context_free"], shares["prior"]))
PY
done

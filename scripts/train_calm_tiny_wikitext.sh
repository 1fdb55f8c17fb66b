#!/usr/bin/env bash
# Trains calm_tiny_wikitext/ (the default model of `calm-generate`) and its Llama baseline from scratch on CPU:
# a BPE tokenizer, the autoencoder, the energy LM, and a Llama of the same training FLOPs (autoencoder + LM),
# on the WikiText-103 test documents with the last 6 held out. Each stage writes results.json into its folder
# (held-out metrics, training time, measured training FLOPs, parameter counts, loss history).
#
#   scripts/train_calm_tiny_wikitext.sh [DATA] [WORK_DIR]
#
# Then copies the CALM model into calm_tiny_wikitext/ (its model card, README.md, is written by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/wikitext_document_level-test.json}
WORK=${2:-/tmp/calm_tiny_wikitext}
TRAIN=(nice -n 10 python -m calm_transformers.train_calm --data "$DATA" --num-eval-docs 6 --no-progress --seed 0)

"${TRAIN[@]}" --stage tokenizer --vocab-size 2048 --output-dir "$WORK/tokenizer"
"${TRAIN[@]}" --stage autoencoder --tokenizer "$WORK/tokenizer" --output-dir "$WORK/autoencoder" \
  --batch-size 2 --max-steps 2500 --lr 3e-3 --warmup-steps 20 --logging-steps 250
# 720 steps x 8 blocks of 512 tokens = 8 epochs.
"${TRAIN[@]}" --stage lm --autoencoder "$WORK/autoencoder" --output-dir "$WORK/lm" --no-remote-code \
  --batch-size 8 --max-steps 720 --lr 2e-3 --warmup-steps 30 --logging-steps 30 --eval-steps 180 --eval-blocks 20
# 500 steps x 8 blocks: the training FLOPs of the autoencoder + the LM above (see the results.json files).
"${TRAIN[@]}" --stage ar --tokenizer "$WORK/tokenizer" --output-dir "$WORK/ar" \
  --batch-size 8 --max-steps 500 --lr 2e-3 --warmup-steps 30 --logging-steps 30

mkdir -p calm_tiny_wikitext
cp "$WORK"/lm/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json} calm_tiny_wikitext/

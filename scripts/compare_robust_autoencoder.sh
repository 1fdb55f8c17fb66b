#!/usr/bin/env bash
# Does a more noise-robust autoencoder, or a decaying learning rate, make the shipped model write more real words?
# Trains an autoencoder with kl_weight 0.05 (the shipped one: 0.01), then two CALM LMs on it side by side, one thread
# each, with the shipped recipe: one with its constant learning rate, one with cosine decay. Then the samples and
# known-word shares of both (docs/training.md; results in docs/experiments/robust_autoencoder/).
#   scripts/compare_robust_autoencoder.sh TOKENIZER_DIR [WORK_DIR]    # about 90 minutes on 2 CPU cores
# TOKENIZER_DIR: the tokenizer of scripts/train_calm_tiny_shakespeare.sh (WORK_DIR/tokenizer there).
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENIZER=$1
WORK=${2:-/tmp/compare_robust_autoencoder}
export HF_HUB_OFFLINE=1
TRAIN=(python -m calm_transformers.train_calm --data ../shared/data/shakespeare_works.json --num-eval-docs 2
       --no-progress --seed 0)
OMP_NUM_THREADS=2 "${TRAIN[@]}" --stage autoencoder --tokenizer "$TOKENIZER" --output-dir "$WORK/ae" \
  --set hidden_size=128 --set intermediate_size=256 --set latent_size=64 --set kl_weight=0.05 \
  --batch-size 4 --max-steps 3000 --lr 3e-3 --lr-scheduler cosine --warmup-steps 100 --logging-steps 500
LM=(--stage lm --autoencoder "$WORK/ae" --set hidden_size=256 --set intermediate_size=688 --set num_hidden_layers=4
    --set num_attention_heads=4 --set num_key_value_heads=4 --set max_position_embeddings=512 --batch-size 8
    --max-steps 3000 --lr 1e-3 --warmup-steps 300 --logging-steps 100 --eval-steps 500 --eval-blocks 16)
export OMP_NUM_THREADS=1
"${TRAIN[@]}" "${LM[@]}" --output-dir "$WORK/lm_constant" > "$WORK/lm_constant.log" 2>&1 &
"${TRAIN[@]}" "${LM[@]}" --lr-scheduler cosine --output-dir "$WORK/lm_cosine" > "$WORK/lm_cosine.log" 2>&1 &
wait
for run in constant cosine; do
  python scripts/sample_report.py "$WORK/lm_$run" --output "$WORK/samples_$run.json" | grep "known words"
done

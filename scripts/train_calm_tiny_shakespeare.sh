#!/usr/bin/env bash
# Rebuilds calm_tiny_shakespeare/ (the default model of `calm-generate`) and its Llama baseline from nothing but
# ../shared/data and this project, on the CPU: a BPE tokenizer of 8192 tokens, the autoencoder (K = 4), the LM with
# the flow-matching head, and a Llama trained for the same FLOPs (autoencoder + LM), on Shakespeare's works with the
# last 2 (The Two Gentlemen of Verona, The Winter's Tale) held out. Each stage writes results.json (held-out metrics,
# time, measured FLOPs, the loss and evaluation history); the LM's also holds its energy levels (how much context it
# uses). docs/training.md says why these settings: the comparison of K, heads, head sizes and vocabularies.
#
#   scripts/train_calm_tiny_shakespeare.sh [WORK_DIR]      # default /tmp/calm_tiny_shakespeare
#
# A stage already finished in WORK_DIR is kept, and the LM and the Llama resume from their last checkpoint, so a
# second call goes on where a killed one stopped. Then copies the CALM model into calm_tiny_shakespeare/ (its card,
# README.md, is written by hand), writes the plot of held-out BrierLM against training FLOPs and the samples of the
# card. The CALM LM and the Llama train side by side, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/calm_tiny_shakespeare}
DATA=../shared/data/shakespeare_works.json
LM_STEPS=${LM_STEPS:-4000}
AR_STEPS=${AR_STEPS:-2180}  # a Llama step costs 2.1x an LM step: the FLOPs of the autoencoder and the LM
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
TRAIN=(python -m calm_transformers.train_calm --data "$DATA" --num-eval-docs 2 --no-progress --seed 0)
SMALL_LM=(--set hidden_size=256 --set intermediate_size=688 --set num_hidden_layers=4 --set num_attention_heads=4
          --set num_key_value_heads=4)
resume() { if ls -d "$WORK/$1"/checkpoint-* > /dev/null 2>&1; then echo --resume; fi; }
start=$(date +%s)

[ -f "$WORK/tokenizer/tokenizer.json" ] ||
  "${TRAIN[@]}" --stage tokenizer --vocab-size 8192 --output-dir "$WORK/tokenizer"
[ -f "$WORK/autoencoder/results.json" ] ||
  OMP_NUM_THREADS=2 "${TRAIN[@]}" --stage autoencoder --tokenizer "$WORK/tokenizer" --output-dir "$WORK/autoencoder" \
    --set hidden_size=128 --set intermediate_size=256 --set latent_size=64 --set kl_weight=0.01 \
    --batch-size 4 --max-steps 3000 --lr 3e-3 --lr-scheduler cosine --warmup-steps 100 --logging-steps 500
# The LM and the baseline: the authors' optimiser (AdamW 0.9 / 0.95, weight decay 0.1, clip 1.0, constant lr after
# warm-up), with a larger lr and a shorter warm-up for models this small (docs/training.md).
[ -f "$WORK/lm/results.json" ] ||
  "${TRAIN[@]}" --stage lm --autoencoder "$WORK/autoencoder" --output-dir "$WORK/lm" "${SMALL_LM[@]}" \
    --set head_type=flow --set max_position_embeddings=512 --batch-size 8 --max-steps "$LM_STEPS" --lr 1e-3 \
    --warmup-steps 300 --logging-steps 100 --eval-steps $((LM_STEPS / 6)) --eval-blocks 16 \
    --save-steps 500 $(resume lm) > "$WORK/lm.log" 2>&1 &
[ -f "$WORK/ar/results.json" ] ||
  "${TRAIN[@]}" --stage ar --tokenizer "$WORK/tokenizer" --output-dir "$WORK/ar" "${SMALL_LM[@]}" \
    --batch-size 8 --max-steps "$AR_STEPS" --lr 1e-3 --warmup-steps 300 --logging-steps 100 \
    --eval-steps $((AR_STEPS / 6)) --eval-blocks 16 --save-steps 500 $(resume ar) > "$WORK/ar.log" 2>&1 &
wait
echo "trained in $(( ($(date +%s) - start) / 60 )) min"

mkdir -p calm_tiny_shakespeare
cp "$WORK"/lm/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json} \
  "$WORK"/lm/chat_template.jinja calm_tiny_shakespeare/
for code in modeling_calm.py configuration_calm.py generation_calm.py heads_calm.py utils_calm.py; do
  ln -sf "../$code" "calm_tiny_shakespeare/$code"  # remote code, linked: one copy of the model code
done
python scripts/plot_brierlm.py "$WORK"/{autoencoder,lm,ar}/results.json --output docs/brierlm_vs_flops.png
# Samples at T = 0.5 and T = 1 for the card, and the share of known words in them.
python scripts/sample_report.py calm_tiny_shakespeare --output "$WORK/samples.json"
python scripts/sample_report.py "$WORK/ar" --output "$WORK/samples_ar.json"

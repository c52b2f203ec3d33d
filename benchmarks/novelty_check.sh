#!/usr/bin/env bash
# Encoder novelty on another simulated screen (synth.seed=1): its own data, ensemble and three encoders, then
# benchmarks/encoder_novelty.py --part default (README "Novelty from the self-supervised encoder"). About 20 min on
# 2 cores. Run from the repository root with the project's environment on PATH.
set -euo pipefail
R=data/novelty_check
S=(--set "index.manifest=$R/raw/manifest.csv" --set "index.out=$R/index/cells.parquet" --set "split.out=$R/index/splits.parquet")
spatial synth --set synth.seed=1 --out "$R/raw" --no-progress
spatial index "${S[@]}" --no-progress
spatial split "${S[@]}" --metrics "$R/split.json"
spatial train --splits "$R/index/splits.parquet" "${S[@]}" --out models/novelty_check_ensemble --metrics "$R/train.json" --no-progress
for s in 0 1 2; do
  spatial pretrain "${S[@]}" --set train.seed=$s --out "models/novelty_check_pretrain_s$s" --no-progress
done
python benchmarks/encoder_novelty.py --part default --raw "$R/raw" "${S[@]}" --model models/novelty_check_ensemble \
  --encoder models/novelty_check_pretrain_s{0,1,2}/encoder.pt --out reports/uncertainty_study/synth_seed1
mv reports/uncertainty_study/synth_seed1/encoder_default.json reports/uncertainty_study/encoder_default_synth_seed1.json
rmdir reports/uncertainty_study/synth_seed1

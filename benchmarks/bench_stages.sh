#!/usr/bin/env bash
# Wall time of each stage of config/seaad_scgpt.yaml through the `superweights` CLI, on the
# demo generator's SEA-AD-shaped cells and a random checkpoint at released scGPT size
# (benchmarks/make_checkpoint.py): preprocess with the checkpoint's vocabulary, fine-tune
# (EPOCHS epochs, 1,200 genes per cell, lr 1e-4, batch 32), probe, ablate, the cell map and
# the base confirmation (N_NULL null draws per null, on EVAL_CELLS held-out cells; their time
# grows linearly in both). HVGs use the streamed `seurat` score; the cell map needs scanpy and
# is skipped where it is not installed.
#   bash benchmarks/bench_stages.sh WORK_DIR [N_CELLS] [EPOCHS] [LAYERS] [D_MODEL] [EVAL_CELLS] [N_NULL]
set -euo pipefail
work=$1; cells=${2:-20000}; epochs=${3:-1}; layers=${4:-12}; d=${5:-512}; evals=${6:-1000}
nulls=${7:-99}
mkdir -p "$work"
sw=(python3 -m superweights.cli)
stage() {  # stage NAME COMMAND...: run it, print its wall time
    local name=$1 start; shift; start=$EPOCHREALTIME
    "$@" > "$work/$name.log" 2>&1 || { tail -5 "$work/$name.log"; exit 1; }
    awk -v n="$name" -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%-12s %8.1f s\n", n, b - a }'
}
long=(--max-seq-len 1200 --batch-size 32)  # later stages cut cells as the checkpoint records:
batch=(--batch-size 32)                    # 1,200 (fine-tuned; the random base records none)
stage checkpoint python3 benchmarks/make_checkpoint.py --out "$work/base" --layers "$layers" --d-model "$d"
stage demo-data "${sw[@]}" demo-data --out "$work/raw.h5ad" --n-cells "$cells" --n-donors 28
stage preprocess "${sw[@]}" preprocess "$work/raw.h5ad" --out "$work/tok.h5ad" --vocab "$work/base" --n-hvg 1200 --max-cells-per-type "$cells" \
    --hvg-flavor seurat
stage finetune "${sw[@]}" finetune "$work/tok.h5ad" --init "$work/base" --out-dir "$work/ft" \
    --epochs "$epochs" --lr 0.0001 --weight-decay 0.0 --warmup-fraction 0.0 --mask-ratio 0.0 "${long[@]}"
stage probe "${sw[@]}" probe --checkpoint "$work/ft/checkpoint" --data "$work/tok.h5ad" --out "$work/probe" "${batch[@]}"
stage ablate "${sw[@]}" ablate --checkpoint "$work/ft/checkpoint" --data "$work/tok.h5ad" \
    --candidates "$work/probe/candidates.tsv" --out "$work/ablate" --max-cells "$evals" --n-null "$nulls" "${batch[@]}"
if python3 -c "import scanpy" 2> /dev/null; then
    stage cells "${sw[@]}" cells --cells "$work/ablate/cells.h5ad" --data "$work/tok.h5ad" --out "$work/cells"
else
    echo "cells        skipped (no scanpy)"
fi
stage probe_base "${sw[@]}" probe --checkpoint "$work/base" --data "$work/tok.h5ad" --out "$work/base_probe" "${batch[@]}"
stage confirm_base "${sw[@]}" confirm --checkpoint "$work/base" --data "$work/tok.h5ad" \
    --candidates "$work/base_probe/candidates.tsv" --out "$work/base_confirm" \
    --score masked-expression --max-cells "$evals" --n-null "$nulls" "${batch[@]}"
python3 -c "import json,sys; m=json.load(open('$work/ft/metrics.json')); print('test cells', m['n_cells'], 'accuracy', round(m['accuracy'], 3))"

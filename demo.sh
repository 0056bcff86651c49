#!/usr/bin/env bash
# The demo on a CPU in a few minutes: creates or reuses .venv, writes a small synthetic dataset to demo_data/,
# trains on it with a randomly initialised ViT-S at 112 px, prints the metric table and runs predict.py on the
# weave test images.
#   bash demo.sh        Dinomaly (dinomaly_mvtec_uni.py) on the MVTec-layout copy
#   bash demo.sh crr    CRR Stage I -> Stage II -> test on the Real-IAD-layout copy
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
.venv/bin/python prepare_data/make_demo_data.py --out demo_data
SMALL=(--classes weave woodgrain nut --encoder_weights random --image_size 128 --crop_size 112 --batch_size 8
       --num_workers 1 --log_every 25 --save_heatmaps 2)
if [ "${1:-dinomaly}" = crr ]; then
    COMMON=(--data_path demo_data/realiad_demo --save_name demo_crr "${SMALL[@]}")
    .venv/bin/python crr_realiad_stage1.py "${COMMON[@]}" --encoder dinov2reg_vit_small_14 --total_iters 100 \
        --foreground_path demo_data/realiad_demo/realiad_1024_DISthresh
    .venv/bin/python crr_realiad_stage2.py "${COMMON[@]}" --total_iters 20 --batch_size 2  # a 256-px conv net: slow on a CPU
    .venv/bin/python crr_realiad_test.py "${COMMON[@]}"
    echo "results and heatmaps: saved_results/demo_crr/"
else
    .venv/bin/python dinomaly_mvtec_uni.py --data_path demo_data/mvtec_demo --save_name demo \
        --encoder dinov2reg_vit_small_14 --total_iters 150 "${SMALL[@]}"
    .venv/bin/python predict.py --checkpoint saved_results/demo --input demo_data/mvtec_demo/weave/test \
        --class_name weave --out saved_results/demo/predictions --num_workers 1
    echo "results, thresholds and pictures: saved_results/demo/; predictions for new images: saved_results/demo/predictions/"
fi

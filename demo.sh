#!/usr/bin/env bash
# The demo on a CPU in a few minutes: creates or reuses .venv, writes a small synthetic dataset to demo_data/,
# trains on it with a randomly initialised ViT-S at 112 px, prints the metric table and runs predict.py on the
# test images of the three classes, without --class_name: each image's class is found.
#   bash demo.sh        Dinomaly (dinomaly_mvtec_uni.py) on the MVTec-layout copy
#   bash demo.sh crr    CRR Stage I -> Stage II -> test on the Real-IAD-layout copy
#   bash demo.sh dinomaly2           Dinomaly2 (dinomaly2_2d.py) on the MVTec-layout copy
#   bash demo.sh dinomaly2_fewshot   Dinomaly2 few-shot (dinomaly2_fewshot.py, 4 images per class)
#   bash demo.sh dinomaly2_multiview Dinomaly2 multi-view (dinomaly2_multiview.py) on a Real-IAD-layout copy with
#                                    objects of five views: image, pixel, object and sample metrics
#   bash demo.sh dinomaly2_mvtec3d   Dinomaly2 RGB + depth (dinomaly2_mvtec3d.py) on generated point clouds in MVTec
#                                    3D-AD's layout (prepare_data/make_demo_pairs.py; dents seen in the depth only)
#   bash demo.sh dinomaly2_mulsen    Dinomaly2 RGB + infrared (dinomaly2_mulsen.py) on generated pairs in MulSen-AD's
#                                    layout (hot spots seen in the infrared image only)
#   bash demo.sh own    Dinomaly on plain folders of good images only (demo_data/own_parts/<class>/*.png)
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
CLASSES=(weave woodgrain nut)
TESTS=(demo_data/mvtec_demo/weave/test demo_data/mvtec_demo/woodgrain/test demo_data/mvtec_demo/nut/test)
predict_all() {  # the trained run $1 on the test images of every class
    .venv/bin/python predict.py --checkpoint "$1" --input "${TESTS[@]}" --out "$1/predictions" --num_workers 1
    echo "results, thresholds and pictures: $1/; predictions for new images: $1/predictions/"
}
.venv/bin/python prepare_data/make_demo_data.py --out demo_data
LOADER=(--batch_size 8 --num_workers 1)
DATA=(--classes "${CLASSES[@]}" "${LOADER[@]}")
MODEL=(--encoder dinov2reg_vit_small_14 --encoder_weights random --image_size 128 --crop_size 112 --log_every 25)
case "${1:-dinomaly}" in
crr)
    RUN=(--data_path demo_data/realiad_demo --save_name demo_crr "${DATA[@]}")
    # no DTD textures here: anomalies are made from the images themselves (--anomaly_source_path none)
    .venv/bin/python crr_realiad_stage1.py "${RUN[@]}" "${MODEL[@]}" --overwrite --anomaly_source_path none --total_iters 100 \
        --save_heatmaps 2
    .venv/bin/python crr_realiad_stage2.py "${RUN[@]}" --overwrite --anomaly_source_path none --total_iters 20 --batch_size 2 \
        --log_every 5  # a 256-px conv net: slow on a CPU
    .venv/bin/python crr_realiad_test.py "${RUN[@]}" --save_heatmaps 2
    predict_all saved_results/demo_crr
    ;;
dinomaly2)
    .venv/bin/python dinomaly2_2d.py --data_path demo_data/mvtec_demo --save_name demo_dinomaly2 --overwrite \
        "${DATA[@]}" "${MODEL[@]}" --total_iters 150 --save_heatmaps 2
    predict_all saved_results/demo_dinomaly2
    ;;
dinomaly2_fewshot)
    .venv/bin/python dinomaly2_fewshot.py --data_path demo_data/mvtec_demo --save_name demo_fewshot --overwrite \
        --shot 4 "${DATA[@]}" "${MODEL[@]}" --total_iters 150 --save_heatmaps 2
    predict_all saved_results/demo_fewshot
    ;;
dinomaly2_multiview)
    .venv/bin/python prepare_data/make_demo_data.py --out demo_data/multiview --views 5
    .venv/bin/python dinomaly2_multiview.py --data_path demo_data/multiview/realiad_demo --save_name demo_multiview \
        --overwrite "${DATA[@]}" "${MODEL[@]}" --total_iters 150 --save_heatmaps 2
    echo "results, thresholds and pictures: saved_results/demo_multiview/"
    ;;
dinomaly2_mvtec3d)
    .venv/bin/python prepare_data/make_demo_pairs.py --out demo_data
    .venv/bin/python dinomaly2_mvtec3d.py --data_path demo_data/mvtec3d_demo --classes dome block --save_name demo_mvtec3d \
        --overwrite "${LOADER[@]}" "${MODEL[@]}" --total_iters 150 --save_heatmaps 2 --cache_images memory
    echo "results, thresholds and pictures: saved_results/demo_mvtec3d/"
    ;;
dinomaly2_mulsen)
    .venv/bin/python prepare_data/make_demo_pairs.py --out demo_data
    .venv/bin/python dinomaly2_mulsen.py --data_path demo_data/mulsen_demo --classes dome block --save_name demo_mulsen \
        --overwrite "${LOADER[@]}" "${MODEL[@]}" --total_iters 150 --save_heatmaps 2
    echo "results, thresholds and pictures: saved_results/demo_mulsen/"
    ;;
own)
    # your own data: one folder of good images per class, no test set, no defects, no masks (the classes are
    # found in the folder; a share of each class's images is held out to set its threshold)
    rm -rf demo_data/own_parts
    for c in "${CLASSES[@]}"; do
        mkdir -p "demo_data/own_parts/$c" && cp demo_data/mvtec_demo/"$c"/train/good/*.png "demo_data/own_parts/$c/"
    done
    .venv/bin/python dinomaly_mvtec_uni.py --data_path demo_data/own_parts --save_name demo_own --overwrite \
        "${LOADER[@]}" "${MODEL[@]}" --total_iters 150
    predict_all saved_results/demo_own
    ;;
*)
    .venv/bin/python dinomaly_mvtec_uni.py --data_path demo_data/mvtec_demo --save_name demo --overwrite "${DATA[@]}" \
        "${MODEL[@]}" --total_iters 150 --save_heatmaps 2
    predict_all saved_results/demo
    ;;
esac

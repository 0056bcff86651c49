#!/usr/bin/env bash
# Behaviour fingerprint of a checkout, for a change that must not change behaviour (a refactor): on small demo data
# and a random ViT-S, three training steps of Dinomaly, Dinomaly2 (2D and few-shot) and CRR Stage I, two of
# Stage II, the CRR test, an --eval_only evaluation and three predict.py runs; prints the hash of every model,
# score table, metric table, thresholds file, prototype file and predictions table (paths made relative) and
# the loss lines. Compare two checkouts:
#   diff <(bash conformance/same_outputs.sh /tmp/a OLD_CHECKOUT) <(bash conformance/same_outputs.sh /tmp/b .)
# Usage: same_outputs.sh WORK_DIR [CHECKOUT] (default: this checkout); uses this checkout's .venv.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "$1"); REPO=$(cd "${2:-$HERE}" && pwd); PY="$HERE/.venv/bin/python"
rm -rf "$OUT" && mkdir -p "$OUT" && cd "$REPO"
$PY prepare_data/make_demo_data.py --out "$OUT/data" --size 64 --n_train 8 --n_test_good 3 --n_test_bad 3 >/dev/null
C=(--classes weave nut --num_workers 0 --device cpu --save_dir "$OUT/runs")
M=(--encoder dinov2reg_vit_small_14 --encoder_weights random --image_size 64 --crop_size 56 --log_every 1 --batch_size 4)
MV="$OUT/data/mvtec_demo"; RI="$OUT/data/realiad_demo"
run() { local log=$1; shift; $PY "$@" > "$OUT/$log.log" 2>&1 || { echo "failed: $*" >&2; tail -3 "$OUT/$log.log" >&2; exit 1; }; }
run d1 dinomaly_mvtec_uni.py --data_path "$MV" --save_name d1 "${C[@]}" "${M[@]}" --total_iters 3
run d1e dinomaly_mvtec_uni.py --data_path "$MV" --save_name d1e --eval_only --checkpoint "$OUT/runs/d1" "${C[@]}" --batch_size 4
run d2 dinomaly2_2d.py --data_path "$MV" --save_name d2 "${C[@]}" "${M[@]}" --total_iters 3
run fs dinomaly2_fewshot.py --data_path "$MV" --save_name fs --shot 2 "${C[@]}" "${M[@]}" --total_iters 3
R=(--data_path "$RI" --save_name crr "${C[@]}" --anomaly_source_path none)
run c1 crr_realiad_stage1.py "${R[@]}" "${M[@]}" --total_iters 3
run c2 crr_realiad_stage2.py "${R[@]}" --total_iters 2 --batch_size 2 --log_every 1
run c3 crr_realiad_test.py --data_path "$RI" --save_name crr "${C[@]}"
P=(--num_workers 0 --device cpu)
run p1 predict.py --checkpoint "$OUT/runs/d1" --input "$MV/nut/test" "$MV/weave/test" --out "$OUT/p1" "${P[@]}"
run p2 predict.py --checkpoint "$OUT/runs/crr" --input "$MV/nut/test" --out "$OUT/p2" "${P[@]}"
run p3 predict.py --checkpoint "$OUT/runs/d2" --input "$MV/nut/test" --out "$OUT/p3" "${P[@]}" --image_size 72
cd "$OUT"
for f in runs/*/model.pth runs/*/Seg_model_last.pth runs/*/class_prototypes.pt; do echo "$(sha256sum < "$f" | cut -c1-16) $f"; done
for f in runs/*/scores*.csv runs/*/metrics*.csv runs/*/thresholds*.json p*/predictions.csv; do
    echo "$(sed "s#$OUT##g" "$f" | sha256sum | cut -c1-16) $f"
done
grep -h "iter \[" ./*.log | sed -E 's/, data wait [0-9]+%//; s/, [0-9]+s$//'

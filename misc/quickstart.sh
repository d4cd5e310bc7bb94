#!/usr/bin/env bash
# The whole DiM pipeline on real data that needs no download (scikit-learn's digits), with a schedule
# small enough for a 2-core CPU in a few minutes (stage 1 at lr 1e-3 instead of 1e-4 so that 10 epochs
# suffice to make the generator class-conditional). Outputs go to results/quickstart-* and logs/quickstart-*.
# Usage: bash misc/quickstart.sh [extra flags for all three stages, e.g. --device cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMALL=(--data digits --width 32 --ipc 10 --test-interval 25 --no-progress "$@")

echo "== stage 1: conditional GAN (gen_condense.py)"
$PY gen_condense.py "${SMALL[@]}" --tag quickstart-gan --lr 1e-3 --epochs 10 --eval-interval 10 --epochs-eval 50 --print-freq 22
echo "== stage 2: pool matching (pool_match.py)"
$PY pool_match.py "${SMALL[@]}" --tag quickstart-match --match logit --match-aug \
    --weight results/quickstart-gan/model_dict_9.pth --epochs 1 --eval-interval 1 --epochs-match-train 4 \
    --epochs-eval 50 --print-freq 11
echo "== stage 3: validation (validate.py): classifiers trained on generated images only"
EVAL=(--ipc 50 --batch-size 64 --epochs-eval 30 --test-interval 10 --eval-model convnet resnet10)
G=results/quickstart-match/last.pth  # the generator of the last epoch (no selection on the test set)
$PY validate.py "${SMALL[@]}" "${EVAL[@]}" --tag quickstart-test --pretrain-weight $G
echo "== the same, on one fixed set of 50 generated images per class (what a distilled set would store)"
$PY validate.py "${SMALL[@]}" "${EVAL[@]}" --tag quickstart-fixed --pretrain-weight $G --protocol fixed
echo "== baseline: the same classifiers on 50 random real training images per class, same code"
$PY validate.py "${SMALL[@]}" "${EVAL[@]}" --tag quickstart-random --baseline random
echo "== DiM beside its baseline (top-1 % on the 360 real test digits)"
$PY misc/compare.py results/quickstart-{test,fixed,random}/eval.json

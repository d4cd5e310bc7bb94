#!/usr/bin/env bash
# The whole DiM pipeline on real data that needs no download (scikit-learn's digits), on a schedule made
# for 2 CPU cores (about 5 minutes): stage 1 at width 16, Adam lr 1e-3, batch 64, 24 epochs (528 GAN
# iterations), the cheapest schedule measured whose generator draws the class it is asked for in at least
# 90% of the draws (docs/QUICKSTART.md: how the schedule was chosen). Outputs go to results/quickstart-*
# and logs/quickstart-*.
# Usage: bash misc/quickstart.sh [extra flags for all three stages, e.g. --device cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "== [$((SECONDS / 60)) min $((SECONDS % 60)) s] $*"; }
SMALL=(--data digits --width 16 --ipc 10 --test-interval 25 --no-progress "$@")
EPOCHS=24

step "stage 1: conditional GAN (gen_condense.py)"
$PY gen_condense.py "${SMALL[@]}" --tag quickstart-gan --lr 1e-3 --batch-size 64 --epochs $EPOCHS \
    --eval-interval $EPOCHS --epochs-eval 10 --print-freq 132
step "stage 2: pool matching (pool_match.py)"
$PY pool_match.py "${SMALL[@]}" --tag quickstart-match --match logit --match-aug \
    --weight results/quickstart-gan/model_dict_$((EPOCHS - 1)).pth --epochs 1 --eval-interval 1 \
    --epochs-match-train 4 --epochs-eval 10 --print-freq 11
G=results/quickstart-match/last.pth  # the generator of the last epoch (no selection on the test set)
step "class conditioning: a ConvNet-3 trained on the real digits classifies 100 draws per class (misc/diagnose.py)"
$PY misc/diagnose.py --pretrain-weight $G --tag quickstart-diagnose
step "stage 3: validation (validate.py): classifiers trained on generated images only"
EVAL=(--ipc 50 --batch-size 64 --epochs-eval 20 --test-interval 10 --eval-model convnet resnet10)
$PY validate.py "${SMALL[@]}" "${EVAL[@]}" --tag quickstart-test --pretrain-weight $G
step "the same, on one fixed set of 50 generated images per class (what a distilled set would store)"
$PY validate.py "${SMALL[@]}" "${EVAL[@]}" --tag quickstart-fixed --pretrain-weight $G --protocol fixed
step "baseline: the same classifiers on 50 random real training images per class, same code"
$PY validate.py "${SMALL[@]}" "${EVAL[@]}" --tag quickstart-random --baseline random
step "done. Final top-1 (%) on the 360 real test digits:"
$PY misc/compare.py --brief results/quickstart-{test,fixed,random}/eval.json \
    --diagnose results/quickstart-diagnose/diagnose.json
echo "How to read it: on the fly (the paper's protocol) trains on a fresh generated batch at every step, so it"
echo "sees many more distinct images than a fixed set and is not a storage comparison; hold the fixed set of"
echo "generated images against the random real subset of the same size, and read the conditioning column as how"
echo "often the generator draws the class it is asked for (misc/diagnose.py's judge, a ConvNet-3 trained on real digits)."
echo "Samples of the evaluated generator (one column per class): results/quickstart-match/outputs/img_0.png"

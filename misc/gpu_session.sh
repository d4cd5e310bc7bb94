#!/usr/bin/env bash
# The GPU measurements docs/PERFORMANCE.md is waiting for, in one command, from the repository root:
#
#   bash misc/gpu_session.sh OUT_DIR                 # every part below, in this order
#   bash misc/gpu_session.sh OUT_DIR tests graphs    # only some parts
#
# Parts:
#   tests    the fast-path equivalence tests on the GPU (TF32 off, deterministic cuDNN), CUDA graphs included
#   bench    the reference's way (plain) against the fast path, all five pool models, with the bf16-vs-fp32
#            loss check
#   graphs   the fast path with stage 2's pool steps replayed from CUDA graphs (pool_match.py --cuda-graphs)
#   compile  the fast path with torch.compile (stage 1 and validation)
# Everything goes to OUT_DIR: session.log (all output) and one bench_<part>.json per benchmark part. The
# exit status is the number of parts that failed.
set -u -o pipefail
out=${1:?usage: bash misc/gpu_session.sh OUT_DIR [tests] [bench] [graphs] [compile]}
shift
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests bench graphs compile)
mkdir -p "$out"
log="$out/session.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
failed=0
for part in "${parts[@]}"; do
    echo "=== $part ($(date -u +%FT%TZ))" | tee -a "$log"
    start=$SECONDS
    case $part in
        tests)   DIM_TEST_DEVICE=cuda python -m pytest -q tests/test_fastpath.py ;;
        bench)   python misc/benchmark.py --device cuda --configs plain fast --pool-models all --json "$out/bench_bench.json" ;;
        graphs)  python misc/benchmark.py --device cuda --configs fast --cuda-graphs on --pool-models all --json "$out/bench_graphs.json" ;;
        compile) python misc/benchmark.py --device cuda --configs fast --compile --loops stage1 validation --json "$out/bench_compile.json" ;;
        *)       echo "unknown part $part (tests, bench, graphs, compile)"; false ;;
    esac 2>&1 | tee -a "$log"
    status=$?
    echo "=== $part: exit $status after $((SECONDS - start)) s" | tee -a "$log"
    [ $status -eq 0 ] || failed=$((failed + 1))
done
exit $failed

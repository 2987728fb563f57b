#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command: the kernel and GPU tests, then the kernel, AR,
# DiT and end-to-end benchmarks on the wide preset (released widths, 2 layers per stack).
#
#   bash benchmarks/gpu_run.sh [OUT_DIR] [STAGES]     STAGES: any of tests,kernels,ar,dit,speed
#
# For a machine without internet where the project is not installed: wheels of the missing
# packages in .whl/ are installed into a private folder first, and the project runs from the
# checkout (PYTHONPATH), so nothing is built or downloaded. Logs and JSON go to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/gpu}
stages=${2:-tests,kernels,ar,dit,speed}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/glm-image-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/glm-image-site
fi
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 GLM_IMAGE_CACHE=${GLM_IMAGE_CACHE:-/tmp/glm-image-cache}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton, transformers, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" | tee -a "$out/device.txt"

run() {  # name, command...: log to OUT_DIR/name.log, keep going on failure
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - start)) s"
    tail -n 12 "$out/$name.log"
}

case ",$stages," in *,tests,*)
    run tests python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_ops_triton.py \
        tests/test_decode.py tests/test_device_and_ops.py ;;
esac
case ",$stages," in *,kernels,*)
    run kernels python3 benchmarks/bench_kernels.py --out "$out/bench_kernels.json" ;;
esac
case ",$stages," in *,ar,*)
    run ar-tiny python3 -m glm_image.cli bench ar --model tiny --size 1024x1024 --device cuda \
        --dtype bfloat16 --out "$out/bench_ar_tiny.json"
    run ar-wide python3 -m glm_image.cli bench ar --model wide --size 1024x1024 --max-tokens 256 \
        --device cuda --dtype bfloat16 --out "$out/bench_ar_wide.json" ;;
esac
case ",$stages," in *,dit,*)
    run dit python3 -m glm_image.cli bench dit --model wide --size 1024x1024 --device cuda \
        --dtype bfloat16 --out "$out/bench_dit.json" ;;
esac
case ",$stages," in *,speed,*)
    run speed python3 -m glm_image.cli bench speed --model wide --sizes 1024x1024 --steps 10 \
        --batch 1,4 --compare-reference --out "$out/bench_speed.json" ;;
esac

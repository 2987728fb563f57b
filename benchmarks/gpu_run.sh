#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command: the kernel and GPU tests, then the AR, DiT,
# end-to-end, quantization, kernel and memory benchmarks on the wide preset (released widths, 2
# layers per stack; random weights, so acceptance rates and cache hits are not the released model's).
#
#   bash benchmarks/gpu_run.sh [OUT_DIR] [STAGES]
#
# STAGES (default: all, in this order, most wanted first):
#   full       the released size (glm-image-random: released configs, weights drawn on the device
#              from a seed): ours exact against diffusers, ours fast, batch 4, the large size and
#              the planner against measured peaks, one process per part, merged into OUT/full.json
#              (glm_image/bench/full.py). GPU_RUN_STEPS (default 10) steps are timed and 50
#              projected; GPU_RUN_LAYERS caps every stack's depth (dry runs); GPU_RUN_LARGE_SIZE
#              (default 2048x2048); GPU_RUN_FULL_PARTS (default exact,fast,batch,large,memory).
#              A CPU dry run at released widths:
#              GPU_RUN_DEVICE=cpu GPU_RUN_LAYERS=2 GPU_RUN_SIZE=256x256 GPU_RUN_STEPS=2 bash benchmarks/gpu_run.sh OUT full
#   tests      the kernel, quantized-kernel, self-check, decode-step and Jacobi tests on the GPU
#   ar         AR decode: transformers' generate, ours sequential, ours Jacobi with windows 8 and 32;
#              then ours sequential against Jacobi at the released depth (glm-image-random)
#   dit        one CFG denoising step: diffusers against ours in bf16, int8 and fp8
#   speed      end to end against diffusers' pipeline, batch 1 and 4
#   fast       end to end, ours uncached against ours with every speed-up on (Jacobi, int8,
#              fbcache): per-stage seconds, DiT forwards computed, PSNR against uncached
#   arquant    AR decode under int8, fp8 and ar=int4 (tok/s against our bf16 in the same run)
#   memory     the memory planner's estimate against torch.cuda.max_memory_allocated, per stage
#   offload    every residency (resident, dit_offload, swap, offload) in a fresh process: measured
#              peak against the planner's estimate, and the DiT's time with its blocks streamed
#              against resident (benchmarks/bench_offload.py -> bench_offload.json); and the
#              released preset's plans at 12GB / 16GB / 24GiB int8 on this device (plan_*.json).
#              GPU_RUN_OFFLOAD_STEPS (default 4), GPU_RUN_OFFLOAD_RESIDENCIES (default all). A CPU
#              dry run: GPU_RUN_MODEL=tiny GPU_RUN_DEVICE=cpu GPU_RUN_SIZE=64x64 ... OUT offload
#   gemv       the decode GEMM (issue 24) through the AR's linears at 1, 4, 16, 64 and 128 rows:
#              dense bf16, torch's paths and our int8 / int4 kernel at each launch of its sweep,
#              with the share of the card's HBM bandwidth (goal: 75% at 1 row, 60% at 64); the
#              kernel's LAUNCH default should be the fastest launch it names
#   w8a8       the DiT's linears at 8192 rows (1024x1024 with guidance): bf16 against int8 W8A8,
#              fp8 with the fused activation quantization, the old paths, torchao's configs and
#              torch.compile (benchmarks/bench_w8a8.py; goal: fp8 1.25x, int8 1.15x a DiT step)
#   graphs     device graphs kept per bucket (issue 24): four AR calls through GlmImage per
#              decoding, a new shape's first call against its second (captures expected 1, 1, 0,
#              0; benchmarks/bench_graph_reuse.py)
#   window     Jacobi window attention (issue 24): the window kernel at W = 4, 8, 16 against
#              decode attention and the dense-mask path it replaced (released heads, a 4608-slot
#              cache), then a W=8 window forward against a sequential one at the released widths
#              with 4 layers, bf16 and int8, graphs and eager (benchmarks/bench_window.py; goal:
#              ratio <= 1.2 at batch 1 and 4)
#   kernels    our Triton kernels against their torch twins, per op
#   lora       an unmerged LoRA adapter's cost per AR token and per DiT step at rank 16 and 64
#              (mid widths and the released widths with one layer per stack; random adapters)
#   continuous continuous batching: AR tokens/s with 16 rows running in the scheduler against 1,
#              batched rows with a graph per bucket of rows and eager (bench_continuous.py; goal:
#              16 rows >= 8x one), then images/s and p50/p99 latency under open-loop Poisson
#              arrivals at 0.8 of the measured capacity, continuous against static batching, in the
#              server process and with the stages in two worker processes (load_server.py --load); GPU_RUN_CONTINUOUS_TOKENS (256) / _REQUESTS (32) / _STEPS (10)
#   scaling    bench speed on 2, 4 and 8 GPUs where the machine has them (skipped on one): the AR
#              tensor parallel over all of them with the DiT CFG-parallel x Ulysses over the same
#              ones, then the stages on separate halves; each JSON has per-stage times and the
#              all-reduce / all-to-all share (`comm`); compare with `speed` (one GPU)
#
# The whole run keeps inside GPU_RUN_BUDGET seconds (default 540: one device command may take
# 600): each stage gets at most its own cap and what is left; a stage past it is stopped and the
# next begins. Logs and JSON go to OUT_DIR. GPU_RUN_MODEL / _SIZE / _DEVICE / _DTYPE override wide /
# 1024x1024 / cuda / bfloat16 (a dry run on a CPU: GPU_RUN_MODEL=tiny GPU_RUN_DEVICE=cpu ...).
#
# For a machine without internet where the project is not installed: wheels of the missing
# packages in .whl/ are installed into a private folder first, and the project runs from the
# checkout (PYTHONPATH), so nothing is built or downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/gpu}
stages=${2:-full,tests,ar,dit,speed,fast,arquant,memory,offload,gemv,w8a8,window,graphs,kernels,lora,continuous,scaling}
model=${GPU_RUN_MODEL:-wide}
size=${GPU_RUN_SIZE:-1024x1024}
device=${GPU_RUN_DEVICE:-cuda}
dtype=${GPU_RUN_DTYPE:-bfloat16}
# A CPU dry run (it checks the script, not the speed) gets each stage's cap times 6 and 40 minutes
# in all: drawing the released widths' weights alone takes a CPU about a minute a part.
capscale=1
[ "$device" = cpu ] && capscale=6
deadline=$((SECONDS + ${GPU_RUN_BUDGET:-$([ "$device" = cpu ] && echo 2400 || echo 540)}))
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/glm-image-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/glm-image-site
fi
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 GLM_IMAGE_CACHE=${GLM_IMAGE_CACHE:-/tmp/glm-image-cache}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
    python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"
} | tee "$out/device.txt"

run() {  # name, cap in seconds, command...: log to OUT_DIR/name.log, keep going on failure
    local name=$1 cap=$2
    shift 2
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped (the run's budget is spent)" | tee -a "$out/skipped.txt"
        return
    fi
    cap=$((cap * capscale))
    [ "$cap" -gt "$left" ] && cap=$left
    echo "== $name (at most $cap s): $*"
    local start=$SECONDS
    timeout -k 10 "$cap" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - start)) s$([ $rc -eq 124 ] && echo ' (stopped at its cap)')"
    tail -n 14 "$out/$name.log"
}

common=(--model "$model" --device "$device" --dtype "$dtype")
want() { case ",$stages," in *,$1,*) return 0 ;; esac; return 1; }

if want full; then
    # float32 on a CPU unless asked (its bfloat16 matmuls are slow); the GPU serves bfloat16
    fdtype=$dtype
    [ "$device" = cpu ] && [ -z "${GPU_RUN_DTYPE:-}" ] && fdtype=float32
    # the large case: 2048x2048 on an accelerator; on a CPU (a dry run) twice the size per side
    large=${GPU_RUN_LARGE_SIZE:-2048x2048}
    if [ "$device" = cpu ] && [ -z "${GPU_RUN_LARGE_SIZE:-}" ]; then
        large="$((2 * ${size%x*}))x$((2 * ${size#*x}))"
    fi
    full=(--device "$device" --dtype "$fdtype" --size "$size" --steps "${GPU_RUN_STEPS:-10}"
        --large-size "$large")
    [ -n "${GPU_RUN_LAYERS:-}" ] && full+=(--layers "$GPU_RUN_LAYERS")
    [ -n "${GPU_RUN_PRESET:-}" ] && full+=(--preset "$GPU_RUN_PRESET")  # tests: small widths
    mkdir -p "$out/full"
    declare -A fullcap=([exact]=300 [fast]=90 [batch]=90 [large]=120 [memory]=90)
    parts=${GPU_RUN_FULL_PARTS:-exact,fast,batch,large,memory}
    for part in ${parts//,/ }; do
        run "full-$part" "${fullcap[$part]:-90}" python3 benchmarks/bench_full.py "$part" "${full[@]}" \
            --out "$out/full/$part.json"
    done
    python3 benchmarks/bench_full.py merge --parts-dir "$out/full" --out "$out/full.json" --device "$device" \
        >"$out/full-merge.log" 2>&1 && echo "== full: $out/full.json" || tail -n 14 "$out/full-merge.log"
fi
# The preset's random checkpoint is written once (tens of seconds for wide), outside any stage's cap.
[ "$stages" = full ] || run checkpoint 150 python3 -c "from glm_image.hub import resolve_checkpoint; print(resolve_checkpoint('$model'))"
if want tests; then
    run tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_ops_triton.py \
        tests/test_quant_kernels.py tests/test_selfcheck.py tests/test_device_and_ops.py \
        tests/test_window_attention.py tests/test_w8a8.py tests/test_quant_choice.py
    run tests-graphs 40 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_decode.py tests/test_jacobi.py
fi
if want ar; then
    run ar 100 python3 -m glm_image.cli bench ar "${common[@]}" --size "$size" --max-tokens 256 \
        --ar-decoding sequential,jacobi --jacobi-window 8,32 --out "$out/bench_ar.json"
    # Jacobi's tokens/s against sequential at the released depth (glm-image-random: the released
    # architecture, its weights drawn on the device: random, so acceptance is not the released
    # model's); a CPU dry run checks the command on the stage's model instead
    released=glm-image-random
    [ "$device" = cpu ] && released=$model
    run ar-released 150 python3 -m glm_image.cli bench ar --model "$released" --device "$device" \
        --dtype "$dtype" --size "$size" --max-tokens 256 --ar-decoding sequential,jacobi \
        --jacobi-window 8,32 --out "$out/bench_ar_released.json"
fi
if want dit; then
    for q in none int8 fp8; do
        run "dit-$q" 35 python3 -m glm_image.cli bench dit "${common[@]}" --size "$size" --quantize "$q" \
            --out "$out/bench_dit_$q.json"
    done
fi
if want speed; then
    run speed 110 python3 -m glm_image.cli bench speed "${common[@]}" --sizes "$size" --steps 10 \
        --batch 1,4 --repeats 2 --max-ar-tokens 256 --compare-reference --out "$out/bench_speed.json"
fi
if want fast; then
    run fast 80 python3 -m glm_image.cli bench speed "${common[@]}" --sizes "$size" --steps 20 \
        --repeats 2 --max-ar-tokens 256 --ar-decoding jacobi --quantize int8 --dit-cache fbcache \
        --dit-cache-threshold 0.9 --out "$out/bench_fast.json"
fi
if want arquant; then
    run arquant 70 python3 -m glm_image.cli bench ar "${common[@]}" --size "$size" --max-tokens 256 \
        --no-reference --quantize int8 --out "$out/bench_ar_int8.json"
    run arquant-fp8 40 python3 -m glm_image.cli bench ar "${common[@]}" --size "$size" --max-tokens 256 \
        --no-reference --quantize fp8 --out "$out/bench_ar_fp8.json"
    run arquant-int4 40 python3 -m glm_image.cli bench ar "${common[@]}" --size "$size" --max-tokens 256 \
        --no-reference --quantize ar=int4 --out "$out/bench_ar_int4.json"
fi
if want memory; then
    run memory 60 python3 benchmarks/bench_quant.py memory --model "$model" --device "$device" \
        --size "${size%%x*}" --schemes "none;int8" --out "$out/bench_memory.json"
fi
if want offload; then
    for budget in 12GB 16GB 24GiB; do  # meta byte counts only: the released size is never built
        run "plan-$budget" 60 bash -c "python3 -m glm_image.cli info --preset glm-image --quantize int8 \
            --max-memory $budget --device $device --json > '$out/plan_$budget.json'"
    done
    odtype=$dtype  # float32 on a CPU unless asked, as the full stage
    [ "$device" = cpu ] && [ -z "${GPU_RUN_DTYPE:-}" ] && odtype=float32
    run offload 150 python3 benchmarks/bench_offload.py --model "$model" --device "$device" --dtype "$odtype" \
        --size "$size" --steps "${GPU_RUN_OFFLOAD_STEPS:-4}" --out "$out/bench_offload.json" \
        ${GPU_RUN_OFFLOAD_RESIDENCIES:+--residencies "$GPU_RUN_OFFLOAD_RESIDENCIES"}
fi
if want gemv; then
    gemv=(--device "$device")
    [ "$device" = cpu ] && gemv=(--dry-run)  # small widths, the kernel in Triton's interpreter
    run gemv 120 python3 benchmarks/bench_quant.py gemv "${gemv[@]}" --out "$out/bench_gemv.json"
fi
if want w8a8; then
    w8a8=(--device "$device")
    [ "$device" = cpu ] && w8a8=(--dry-run)  # tiny widths, the kernels' torch twins
    run w8a8 120 python3 benchmarks/bench_w8a8.py "${w8a8[@]}" --out "$out/bench_w8a8.json"
fi
if want window; then
    window=(--sweep 128,256,512,1024)
    [ "$device" = cpu ] && window=(--dry-run --batch 2 --windows 8)  # the script, in the interpreter
    run window 150 python3 benchmarks/bench_window.py "${window[@]}" --out "$out/bench_window.json"
fi
if want graphs; then
    run graphs 90 python3 benchmarks/bench_graph_reuse.py "${common[@]}" --size "$size" \
        --out "$out/bench_graph_reuse.json"
fi
if want kernels; then
    run kernels 40 python3 benchmarks/bench_kernels.py --out "$out/bench_kernels.json"
fi
if want lora; then
    lora=(--preset mid,released1)
    [ "$device" = cpu ] && lora=(--preset tiny --iters 2 --repeats 1)  # a dry run checks the script
    run lora 90 python3 benchmarks/bench_lora.py "${lora[@]}" --device "$device" --dtype "$dtype" \
        --out "$out/bench_lora.json"
fi
if want continuous; then
    run continuous-ar 150 python3 benchmarks/bench_continuous.py "${common[@]}" --size "$size" --rows 1,16 \
        --modes batched --decode-steps auto,eager \
        --max-tokens "${GPU_RUN_CONTINUOUS_TOKENS:-256}" --out "$out/bench_continuous_ar.json"
    w=${size%x*} h=${size#*x}
    run continuous-load 150 python3 benchmarks/load_server.py --model "$model" --device "$device" \
        --load 0.8 --requests "${GPU_RUN_CONTINUOUS_REQUESTS:-32}" --steps "${GPU_RUN_CONTINUOUS_STEPS:-10}" \
        --sizes "${size},${h}x${w}" --max-batch 4 --max-rows 16 \
        --batching continuous,static,continuous-stages,static-stages --out "$out/bench_continuous_load.json"
fi
if want scaling; then
    gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
    for n in 2 4 8; do
        if [ "$n" -gt "$gpus" ]; then
            echo "== scaling-$n: skipped (this machine has $gpus GPU(s))"
            continue
        fi
        flags=(--ar-tp "$n" --dit-cfg-parallel)  # DiT: CFG x 2, then Ulysses over the rest
        [ "$n" -ge 4 ] && flags+=(--dit-sp $((n / 2)))
        run "scaling-$n" 90 python3 -m glm_image.cli bench speed "${common[@]}" --sizes "$size" --steps 10 \
            --repeats 2 --max-ar-tokens 256 "${flags[@]}" --out "$out/bench_scaling_$n.json"
        half=$((n / 2))  # the stages on separate halves of the devices
        split=(--placement separate)
        [ "$half" -ge 2 ] && split+=(--ar-tp "$half" --dit-cfg-parallel)
        [ "$half" -ge 4 ] && split+=(--dit-sp $((half / 2)))
        run "scaling-$n-separate" 90 python3 -m glm_image.cli bench speed "${common[@]}" --sizes "$size" \
            --steps 10 --repeats 2 --max-ar-tokens 256 "${split[@]}" --out "$out/bench_scaling_${n}_separate.json"
    done
fi
echo "== done in $SECONDS s"

#!/usr/bin/env bash
# The GPU checks, as one script of at most ~8 minutes on one H100 or H200 (CUDA build of torch preinstalled there).
#
#   bash bench/gpu.sh            # writes bench/results/gpu-<date>/ (and $OUT/ when set: the device tool's folder)
#
# 1. pytest -m gpu                              the tests that need CUDA
# 2. the default demo on CUDA                   compress run (pipelines/default.yaml), its report
# 3. gptq of the Llama-3-8B shape, bf16 output random-initialised float32 weights (bench/scale.py writes them), 128 x 2048
#    calibration tokens: wall time, peak CUDA memory against the planner's prediction
# 4. the same with offload: always              one block at a time on the GPU
# 5. int8 on CUDA                               LLM.int8() of SmolLM2-135M through bitsandbytes' CUDA kernels
# Each step's log and manifest go to the results folder; a failed step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
RES="${OUT:-bench/results/gpu-$(date +%Y%m%d)}"
mkdir -p "$RES"
nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
python -m pip install -q -e ".[dev]" > "$RES/install.log" 2>&1 && compress zoo fetch --all >> "$RES/install.log" 2>&1

step() {  # name, command...
  local name=$1; shift
  local t0=$(date +%s)
  timeout 240 "$@" > "$RES/$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$RES/summary.txt"
}

step pytest-gpu python -m pytest -m gpu -q
step demo compress run --out "$RES/runs" --force -q
cp "$RES/runs/default/report.md" "$RES/demo-report.md" 2>/dev/null

# the 8B shape as bench/scale.py generates it (float32, 30 GiB, ~100 s to write); the gptq stage computes in fp32
# and stores bfloat16 with dtype: bfloat16
python bench/scale.py --generate 8b --into /tmp/scale-data/llama-3-8b --seed 0 > "$RES/scale-write.log" 2>&1
for mode in never always; do
  cat > "$RES/gptq-8b-$mode.yaml" <<EOF
name: gptq-8b-$mode
model: /tmp/scale-data/llama-3-8b
offload: $mode
data: {calibration: zoo:austen}
stages:
  - gptq: {bits: 4, group_size: 128, nsamples: 128, seq_len: 2048, dtype: bfloat16}
EOF
  compress plan "$RES/gptq-8b-$mode.yaml" > "$RES/gptq-8b-$mode-plan.txt" 2>&1
  step "gptq-8b-$mode" compress run "$RES/gptq-8b-$mode.yaml" --out "$RES/runs" --force -q
  cp "$RES/runs/gptq-8b-$mode/01-gptq/manifest.json" "$RES/gptq-8b-$mode-manifest.json" 2>/dev/null
done

cat > "$RES/int8.yaml" <<EOF
name: int8-cuda
model: zoo:smollm2-135m
data: {calibration: zoo:austen}
eval: {perplexity: [zoo:austen], seq_len: 512, max_tokens: 20480}
stages:
  - int8: {}
EOF
step int8 compress run "$RES/int8.yaml" --out "$RES/runs" --force -q
cp "$RES/runs/int8-cuda/01-int8/manifest.json" "$RES/int8-manifest.json" 2>/dev/null
rm -rf "$RES/runs"
cat "$RES/summary.txt"

#!/usr/bin/env bash
# Runs `ruvllm bench` and llama.cpp (llama-cpp-python, compiled locally with GGML_NATIVE) on the
# same model in one session and prints the ratios.
#   scripts/compare_llama_cpp.sh [MODEL-NAME-OR-PATH] [THREADS] [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-smollm2-135m}
threads=${2:-2}
reps=${3:-5}
venv=${LLAMA_PEER_VENV:-$HOME/.venvs/llama-peer-noamx}
if ! "$venv/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
  echo "installing llama-cpp-python==0.3.36 into $venv (compiles llama.cpp: several minutes)" >&2
  python3 -m venv "$venv"
  # GGML_NATIVE=ON enables AMX on this Xeon, and the AMX build segfaults in its first eval here
  # (the VM does not grant AMX tile state); so: every AVX-512 extension the CPU has, AMX off.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    "$venv/bin/pip" install --quiet --no-cache-dir llama-cpp-python==0.3.36 numpy
fi
cargo build --release --quiet -p ruvllm
path=$(./target/release/ruvllm list | awk -v m="$model" '$1==m {getline; print $2}')
[ -f "$model" ] && path=$model
[ -n "$path" ] && [ -f "$path" ] || { ./target/release/ruvllm pull "$model"; path=$(./target/release/ruvllm list | awk -v m="$model" '$1==m {getline; print $2}'); }
ours=$(./target/release/ruvllm bench -m "$path" -t "$threads" -r "$reps" -o json)
peer=$("$venv/bin/python" scripts/llama_cpp_bench.py "$path" -t "$threads" -r "$reps" 2>/dev/null)
python3 - "$ours" "$peer" <<'PY'
import json, sys
ours, peer = json.loads(sys.argv[1]), json.loads(sys.argv[2])
key = lambda r: "pp%d" % r["n_prompt"] if r["n_prompt"] else "tg%d" % r["n_gen"]
p = {key(r): r for r in peer}
print("| model | test | ruvllm t/s | llama.cpp t/s | ratio |")
print("| --- | --- | ---: | ---: | ---: |")
for r in ours:
    k = key(r); q = p[k]
    print("| %s | %s | %.1f ± %.1f | %.1f ± %.1f | %.2f× |" % (r["model_filename"], k, r["avg_ts"], r["stddev_ts"], q["avg_ts"], q["stddev_ts"], r["avg_ts"] / q["avg_ts"]))
PY

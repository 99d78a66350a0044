#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need (the two models,
# through `ruvllm pull`; a Python virtual environment with gguf-py, the dequantization
# reference), then `cargo test`. Tests that need a model fail rather than skip here.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo --version
python3 --version

# Python side: gguf-py (the dequantization reference) and the server suite's clients (the
# official openai client, pytest, a Prometheus text parser, an OpenAPI validator).
if ! .venv/bin/python -c "import gguf, numpy, openai, pytest, prometheus_client, openapi_spec_validator" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check gguf==0.19.0 numpy -r tests/server/requirements.txt
fi
export RUVLLM_REF_PYTHON="$PWD/.venv/bin/python"

cargo build --release --locked --workspace
for m in smollm2-135m gemma3-270m; do
  ./target/release/ruvllm pull "$m"
done

export RUVLLM_REQUIRE_MODELS=1
# SIMD tiers: the default run uses the best tier; kernel tests also compare every lower tier.
cargo test --release --locked --workspace

# The HTTP server against the real openai client (starts its own `ruvllm serve` processes).
.venv/bin/python -m pytest -q tests/server

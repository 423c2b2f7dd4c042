#!/usr/bin/env bash
# GPU check (`make gpu-check`): on a machine with CUDA, run the `gpu`-marked tests and a short serving
# benchmark of our server (CUDA, bf16, c=1,32,64), print the table and save it as
# bench/results/gpu-<date>.md. Works offline with whatever python/torch the machine has:
#   - python: $PYTHON, else .venv/bin/python if its torch sees CUDA, else python3;
#   - missing project packages are installed from wheels in $GPU_WHEELS (default .gpu-kit/wheels) into
#     a scratch folder on PYTHONPATH when such wheels are there, else reported by name;
#   - model: $SMOLLM2_MODEL, else the default GGUF, else a random-weight copy of the real model built
#     from .gpu-kit/model (config + tokenizer, same shapes, so the timings hold but the text is noise).
# Every step says what it does; a failed step is reported and the script goes on where it can.
# Exit status: 0 when all ran and passed, 1 otherwise.
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (the gpu tests then skip): a dry run of this script.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
KIT=${GPU_KIT:-$ROOT/.gpu-kit}
WHEELS=${GPU_WHEELS:-$KIT/wheels}
SCRATCH=${GPU_SCRATCH:-/tmp/smollm2-gpu}
STAMP=$(date +%Y-%m-%d-%H%M)
FAILED=()
DEVICE=${GPU_CHECK_DEVICE:-cuda}
LEVELS=${GPU_CHECK_CONCURRENCY:-1,32,64}          # the serving benchmark's
ENGINE_LEVELS=${GPU_CHECK_CONCURRENCY:-1,8,32,64}  # the offline engine benchmark's
step() { echo; echo "== $*"; }
fail() { echo "!! $*"; FAILED+=("$*"); }

step "choosing python"
has_cuda() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ] && has_cuda .venv/bin/python; then PY=.venv/bin/python
else PY=python3; fi
echo "python: $PY ($($PY --version 2>&1))"
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "!! torch is not importable with $PY: install a CUDA build of torch (or set PYTHON=...)"; exit 1
fi
echo "torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
if [ "$DEVICE" = cpu ]; then
  echo "GPU_CHECK_DEVICE=cpu: a dry run of this script on the CPU"
  GPU_NAME="CPU (dry run)"
elif ! has_cuda "$PY"; then
  echo "!! torch.cuda.is_available() is False with $PY: no usable GPU here; nothing to check"; exit 1
else
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  GPU_NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
fi

step "checking the project's packages"
MODULES="numpy fastapi uvicorn pydantic tokenizers prometheus_client gguf safetensors jinja2 httpx pytest pytest_asyncio"
missing() { "$PY" - $MODULES <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
MISSING=$(missing)
if [ -n "$MISSING" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "missing: $MISSING -> installing the wheels in $WHEELS into $SCRATCH/site (no index, no deps)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SCRATCH/site" "$WHEELS"/*.whl \
    || fail "pip install from $WHEELS"
  export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
  MISSING=$(missing)
fi
if [ -n "$MISSING" ]; then
  echo "!! still missing: $MISSING"
  echo "   install them (pip install -e '.[dev]') or put their wheels in $WHEELS (see bench/NOTES.md)"
  exit 1
fi
echo "all present: $MODULES"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Packages pull in others (fastapi -> opentelemetry...): importing the app shows what is still missing.
if ! ERR=$("$PY" -c 'import server.app' 2>&1); then
  echo "!! the server does not import: $(echo "$ERR" | tail -1)"
  echo "   install the missing package (pip install -e '.[dev]') or add its wheel to $WHEELS"
  exit 1
fi
echo "server.app imports"

step "choosing the model"
MODEL=${SMOLLM2_MODEL:-}
MODEL_NOTE="the model given in SMOLLM2_MODEL"
if [ -z "$MODEL" ]; then
  MODEL=$("$PY" -c 'from model.defaults import default_model_path as p; print(p() if p().is_file() else "")')
  MODEL_NOTE="the default GGUF (real weights)"
fi
if [ -z "$MODEL" ] && [ -f "$KIT/model/config.json" ]; then
  MODEL="$SCRATCH/random-model"
  MODEL_NOTE="random weights in the real model's shapes (timings valid, text is noise)"
  echo "no default GGUF here (it cannot be fetched offline): building $MODEL from $KIT/model"
  "$PY" - "$KIT/model" "$MODEL" <<'EOF' || fail "building the random-weight model"
import shutil, sys
from pathlib import Path
import torch
from model.config import SmolLM2Config
from model.modeling import SmolLM2ForCausalLM
from model.weights import write_hf_folder
import json
src, out = Path(sys.argv[1]), Path(sys.argv[2])
config = SmolLM2Config.from_hf_dict(json.loads((src / "config.json").read_text()))
torch.manual_seed(0)
model = SmolLM2ForCausalLM(config).to(torch.bfloat16)
write_hf_folder(config, model.state_dict(), out)
for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    if (src / name).is_file():
        shutil.copy(src / name, out / name)
print("wrote", out)
EOF
fi
if [ -z "$MODEL" ]; then
  fail "no model: no default GGUF and no $KIT/model; the serving benchmark is skipped"
else
  echo "model: $MODEL ($MODEL_NOTE)"
fi

step "pytest -m gpu (limit 150 s)"
# Only the files that hold gpu tests: other test modules may import dev-only packages this machine lacks.
GPU_TESTS=$(grep -rlE "mark\.gpu|marks=.*gpu" tests --include='test_*.py' | sort)
if [ -z "$GPU_TESTS" ]; then
  echo "(no test file marks a test gpu yet)"
else
  echo "files: $(echo $GPU_TESTS)"
  # shellcheck disable=SC2086
  SMOLLM2_MODEL="$MODEL" timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS
  rc=$?
  if [ $rc -eq 5 ]; then echo "(no test selected)"; elif [ $rc -ne 0 ]; then fail "pytest -m gpu (rc=$rc)"; fi
fi

if [ -n "$MODEL" ]; then
  step "engine offline benchmark: $DEVICE bf16, c=$ENGINE_LEVELS, transformers fp32 at 32 (limit 120 s)"
  PYTHONUNBUFFERED=1 timeout 120 "$PY" -m bench.engine_bench --device "$DEVICE" --model "$MODEL" \
    --concurrency "$ENGINE_LEVELS" --baseline 32 --repeat 1 --out bench/results || fail "engine benchmark (rc=$?)"

  step "serving benchmark: ours on $DEVICE bf16, c=$LEVELS (limit 150 s)"
  SMOLLM2_MODEL="$MODEL" SMOLLM2_DEVICE=$DEVICE SMOLLM2_DTYPE=bfloat16 PYTHONUNBUFFERED=1 timeout 150 \
    "$PY" -m bench.serve_bench --peers ours --concurrency "$LEVELS" --requests-per-client 2 \
    --deadline 40 --label gpu --out bench/results || fail "serving benchmark (rc=$?)"
  REPORT=$(ls -t bench/results/gpu-*.md 2>/dev/null | head -1)
  if [ -n "$REPORT" ]; then
    printf -- '- device: %s; torch %s; python %s\n- model: %s (%s)\n' "$GPU_NAME" \
      "$("$PY" -c 'import torch; print(torch.__version__)')" "$("$PY" --version 2>&1)" "$MODEL" "$MODEL_NOTE" \
      >> "$REPORT"
    echo "saved $REPORT"
  fi
fi

step "summary"
if [ ${#FAILED[@]} -eq 0 ]; then echo "gpu check: all steps ran and passed"; exit 0; fi
printf 'gpu check: %d step(s) failed:\n' ${#FAILED[@]}; printf '  - %s\n' "${FAILED[@]}"
exit 1

#!/usr/bin/env bash
# Copyright The nl_lightning developers.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# The GPU check: precision equivalence on CUDA, NestedDDPStrategy and FSDP2 on one device, and 200 steps of each
# gpu_text_* recipe (tokens/s, peak memory, model-FLOPs utilisation). See docs/scaling_out_gpu.md.
#
# Usage:
#   bash scripts/gpu_check.sh [OUT_DIR] [gpu_check.py options]
#   bash scripts/gpu_check.sh                                   # -> benchmarks/results/gpu_check/gpu_check.json
#   bash scripts/gpu_check.sh /tmp/check --sections precision   # one section
#   bash scripts/gpu_check.sh --cpu-dry-run                     # every section on the CPU at tiny sizes
#
# OUT_DIR is the first argument when it does not start with '-', else $OUT when set, else benchmarks/results/gpu_check.
# The interpreter is $PYTHON when set, else .venv/bin/python when present, else python3. The exit status is the
# Python script's: 0 all checks passed, 1 a check failed, 2 a check was unavailable, 3 no CUDA device.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

out_dir="${OUT:-benchmarks/results/gpu_check}"
if [[ $# -gt 0 && "$1" != -* ]]; then
    out_dir="$1"
    shift
fi

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then
        python=.venv/bin/python
    else
        python=python3
    fi
fi

mkdir -p "$out_dir"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi >"$out_dir/nvidia-smi.txt" 2>&1 || true
fi

echo "[gpu_check.sh] python: $python; results: $out_dir/gpu_check.json" >&2
"$python" scripts/gpu_check.py --out "$out_dir" "$@" 2>&1 | tee "$out_dir/gpu_check.log"

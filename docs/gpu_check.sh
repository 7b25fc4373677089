#!/usr/bin/env bash
# One prepared GPU check, one table (docs/gpu_check.py; at most 8 minutes on one H100). On a machine with no GPU:
# the same steps at tiny sizes on the CPU, the same table, in under 3 minutes. Run from a clean clone after the
# README's install; extra arguments go to docs/gpu_check.py (--smoke: its smallest form).
set -euo pipefail
cd "$(dirname "$0")/.."
python docs/gpu_check.py "$@"

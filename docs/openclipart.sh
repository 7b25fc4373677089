#!/usr/bin/env bash
# Every method on real images: Debian's openclipart-png, converted to a CSV and to shards
# (docs/openclipart.md holds the table this printed). From the repository root, in its venv:
#   apt-get install openclipart-png && python docs/convert_folder.py /usr/share/openclipart/png --out /tmp/oc
#   bash docs/openclipart.sh /tmp/oc
# Runs go to runs/oc/ (each ~3-4 min on 2 cores); a finished run is not run again.
set -uo pipefail
OC=${1:?usage: bash docs/openclipart.sh CONVERTED_FOLDER}
C=$OC/pairs.csv
S="$OC/shards/pairs-{00000..00008}.tar"
COMMON="--steps 300 --teacher-steps 300 --val-frac 0.1"
mkdir -p runs/oc
run() {  # name, then the command: its output in runs/oc/NAME.log, its wall time in runs/oc/times.txt
  local name=$1; shift
  [ -e "runs/oc/$name/results.json" ] && return
  local t0=$(date +%s.%N)
  "$@" > "runs/oc/$name.log" 2>&1
  echo "$name rc=$? wall=$(python -c "print(round($(date +%s.%N) - $t0, 1))") s :: $*" >> runs/oc/times.txt
}
[ -e runs/oc/hfclip/config.json ] || python -c "import test_all; test_all.tiny_hf_clip('runs/oc/hfclip')"  # random, as in the tests
run clip-csv python train.py --method clip --data "$C" $COMMON --out runs/oc/clip-csv
run clip-shards python train.py --method clip --data "$S" $COMMON --out runs/oc/clip-shards
run kclip-csv python train.py --method kclip --data "$C" $COMMON --out runs/oc/kclip-csv
run kclip-shards python train.py --method kclip --data "$S" $COMMON --out runs/oc/kclip-shards
run cid-csv python train.py --method cid --data "$C" $COMMON --balance-threshold 0.99 --out runs/oc/cid-csv
if [ ! -e runs/oc/cid-shards/results.json ]; then  # killed (SIGKILL) 8 s into its teacher store build, then resumed
  t0=$(date +%s.%N)
  setsid python train.py --method cid --data "$S" $COMMON --balance-threshold 0.99 --out runs/oc/cid-shards > runs/oc/cid-shards-killed.log 2>&1 &
  pid=$!
  until grep -q "teacher store (" runs/oc/cid-shards-killed.log || ! kill -0 $pid 2>/dev/null; do sleep 1; done
  sleep 8; kill -9 -- -$pid; wait $pid
  echo "cid-shards-killed killed at wall=$(python -c "print(round($(date +%s.%N) - $t0, 1))") s" >> runs/oc/times.txt
  run cid-shards python train.py --method cid --data "$S" $COMMON --balance-threshold 0.99 --out runs/oc/cid-shards --resume
fi
run cid-shards-2rank torchrun --nproc_per_node 2 train.py --method cid --data "$S" $COMMON --balance-threshold 0.99 --workers 1 --out runs/oc/cid-shards-2rank
# A random CLIP sees every image alike (cos >= 0.99): balance would remove 97% and stop with one line
run cid-hf-shards python train.py --method cid --data "$S" $COMMON --teacher runs/oc/hfclip --no-balance --out runs/oc/cid-hf-shards
run cid-hf-csv python train.py --method cid --data "$C" $COMMON --teacher runs/oc/hfclip --no-balance --out runs/oc/cid-hf-csv
python - <<'EOF'
import json, os
print("| run | pairs kept | seconds | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 |\n|---|---|---|---|---|---|---|")
for name in ["clip-csv", "clip-shards", "kclip-csv", "kclip-shards", "cid-csv", "cid-shards", "cid-shards-2rank",
             "cid-hf-shards", "cid-hf-csv"]:
    r = json.load(open(os.path.join("runs/oc", name, "results.json")))
    kept = r.get("kept_pairs", "all")
    print(f"| {name} | {kept} | {r['seconds']:.0f} | {r['retrieval_i2t_r1']:.1f} | {r['retrieval_i2t_r5']:.1f} | "
          f"{r['retrieval_t2i_r1']:.1f} | {r['retrieval_t2i_r5']:.1f} |")
EOF

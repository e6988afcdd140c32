#!/bin/bash
# the three measurement runs, one after the other
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 SPEECHLM_PROGRESS_INTERVAL=30
PY=/work/main/.venv/bin/python
for spec in "w1:--tasks 4 --workers 1" "w2:--tasks 4 --workers 2"; do
  name=${spec%%:*}; args=${spec#*:}
  rm -rf /work/exp/corpus/runs/$name
  s=$(date +%s.%N)
  $PY -m speechlm.cli build clean-text /work/exp/corpus/input --out /work/exp/corpus/runs/$name $args
  e=$(date +%s.%N)
  echo "RUN $name wall_s $(echo "$e - $s" | bc)"
done
rm -rf /work/exp/corpus/runs/dedup_only
s=$(date +%s.%N)
$PY -m speechlm.cli build clean-text /work/exp/corpus/input --out /work/exp/corpus/runs/dedup_only --tasks 4 --workers 2 \
  --set language.enabled=false --set gopher_repetition.enabled=false --set gopher_quality.enabled=false \
  --set c4.enabled=false --set fineweb.enabled=false --set tts.enabled=false
e=$(date +%s.%N)
echo "RUN dedup_only wall_s $(echo "$e - $s" | bc)"

#!/usr/bin/env bash
# Active learning with nlm: train -> select the most uncertain 10% of a pool -> have it answered -> train again.
#
#   docs/active_learning_loop.sh ROUNDS TEACHER STUDENT_INIT LABELLED.jsonl POOL.jsonl WORKDIR
#
# LABELLED.jsonl: {"prompt", "completion"} records you have. POOL.jsonl: records to choose from; they may be
# prompt-only ({"prompt": ...}): then the student's own greedy answer is what teacher and student are compared on.
# The selected prompts are answered by the teacher (`nlm teacher-generate`); replace that step with your
# annotators' answers if you have them. Each round retrains the student from STUDENT_INIT on everything so far.
set -euo pipefail
rounds=$1; teacher=$2; student_init=$3; labelled=$4; pool=$5; work=$6
mkdir -p "$work"
cp "$labelled" "$work/train-0.jsonl"
cp "$pool" "$work/pool-0.jsonl"
student=$student_init
for ((r = 0; r < rounds; r++)); do
  # 1. train (distil) the student on what is labelled so far
  nlm train --teacher_model "$teacher" --student_model "$student_init" --train_file "$work/train-$r.jsonl" \
    --output_dir "$work/runs" --run_name "round-$r" --overwrite
  student="$work/runs/round-$r/final"
  # 2. the 10% of the remaining pool on which teacher and this student disagree most (near-duplicates skipped)
  nlm data select --teacher "$teacher" --student "$student" --data "$work/pool-$r.jsonl" --fraction 0.1 \
    --by disagreement --diverse --output "$work/selected-$r.jsonl" --scores "$work/scores-$r.jsonl"
  # 3. answers for the selected prompts: the teacher's (or send selected-$r.jsonl to annotators instead)
  nlm teacher-generate --teacher_model "$teacher" --data "$work/selected-$r.jsonl" --output "$work/answered-$r.jsonl" \
    --temperature 0 --overwrite
  # 4. the next round trains on everything answered so far; the selected records leave the pool
  cat "$work/train-$r.jsonl" "$work/answered-$r.jsonl" > "$work/train-$((r + 1)).jsonl"
  grep -vxF -f "$work/selected-$r.jsonl" "$work/pool-$r.jsonl" > "$work/pool-$((r + 1)).jsonl" || true
done
echo "final student: $student"

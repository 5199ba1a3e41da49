#!/usr/bin/env bash
# Submit sharded preprocessing: one array task per input file, then a merge that runs only if all succeeded.
#
#   slurm/preprocess_submit.sh --output-prefix data/corpus --tokenizer-model tok.model [sbatch options --] raw/*.jsonl
#
# Options before `--` that are not ours go to both sbatch calls (e.g. --partition=cpu --cpus-per-task=8).
# Prints the two job ids: "ARRAY_ID MERGE_ID".
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix= tok= sbatch_opts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --output-prefix) prefix=$2; shift 2;;
    --tokenizer-model) tok=$2; shift 2;;
    --) shift; break;;
    -*) sbatch_opts+=("$1"); shift;;
    *) break;;
  esac
done
[ -n "$prefix" ] && [ -n "$tok" ] && [ $# -gt 0 ] || {
  echo "usage: $0 --output-prefix PREFIX --tokenizer-model TOK.model [sbatch options --] INPUT..." >&2; exit 2; }
[ -f "$tok" ] || { echo "$0: tokenizer model $tok not found" >&2; exit 2; }
for f in "$@"; do [ -f "$f" ] || { echo "$0: input $f not found" >&2; exit 2; }; done
mkdir -p "$prefix.shards"
list=$prefix.shards/inputs.txt
for f in "$@"; do case "$f" in /*) echo "$f";; *) echo "$PWD/$f";; esac; done > "$list"
export GROWLENGTH_DIR=${GROWLENGTH_DIR:-$(dirname "$here")} INPUT_LIST=$list OUTPUT_PREFIX=$prefix TOKENIZER_MODEL=$tok
array=$(sbatch --parsable "${sbatch_opts[@]}" --array=0-$(($# - 1)) --export=ALL "$here/preprocess.sbatch")
merge=$(sbatch --parsable --job-name=growlength-merge --output=growlength-merge-%j.out "${sbatch_opts[@]}" \
        --dependency=afterok:"${array%%;*}" --kill-on-invalid-dep=yes --export=ALL,STEP=merge "$here/preprocess.sbatch")
echo "${array%%;*} ${merge%%;*}"

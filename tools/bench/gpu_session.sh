#!/usr/bin/env bash
# One call on a lent GPU machine (about 7 minutes, at most 9): install the carried wheels
# offline, run the CUDA-marked tests, time one training step of every registered objective at
# base size (HuBERT base in bf16, batch 8 x 15 s, first), and measure the training input
# pipeline alone against those step rates. Everything lands in $OUT (7 files); the summary is
# printed last.
#
#   here, once:      bash tools/bench/gpu_wheels.sh        # fills the git-ignored .whl/
#   on the machine:  bash tools/bench/gpu_session.sh       # run with carry [".whl"]
#   smoke test here: OUT=/tmp/s bash tools/bench/gpu_session.sh --cpu-smoke [--corpus DIR]
#
# --cpu-smoke runs the same steps small on the CPU with the current Python and packages (no
# install, no CUDA tests, two objectives at tiny size); --corpus DIR reuses a corpus made by
# `mmssl synth` instead of generating one. Data preparation (corpus, MFCC k-means labels) runs
# in the background while the CUDA tests run, on half the cores.
#
# $OUT: summary.md (the tables), prep.log (install, corpus, labels), pytest_cuda.log,
# steps.jsonl + steps.log (tools/bench/pretrain_step.py, one JSON line per objective),
# loader.jsonl + loader.log (tools/bench/loader.py).
set -uo pipefail

OUT=${OUT:?set OUT to the folder for the results}
PY=${PYTHON:-python3}
SMOKE=0
CORPUS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --corpus) CORPUS=$2; shift ;;
        *) echo "usage: gpu_session.sh [--cpu-smoke] [--corpus DIR]" >&2; exit 2 ;;
    esac
    shift
done

START=$(date +%s)
DEADLINE=$((START + 530))  # the tool allows 600 s a command: keep a margin for the summary
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORK=$(mktemp -d)

# steps that may not finish in the time left are cut short, and the session goes on
limited() {  # limited SECONDS LOG COMMAND...: run with at most SECONDS (and what is left)
    local want=$1 log=$2 left
    shift 2
    left=$((DEADLINE - $(date +%s)))
    [ "$want" -lt "$left" ] || want=$left
    if [ "$want" -le 5 ]; then
        echo "skipped (no time left): $*" | tee -a "$log"
        return 124
    fi
    timeout --kill-after=5 "$want" "$@" >>"$log" 2>&1
}

if [ "$SMOKE" = 1 ]; then
    SIZE=tiny; DEVICE=cpu; STEP_ARGS=(--steps 1 --warmup 1 --batch-size 2 --seconds 2)
    OBJECTIVES="hubert av_hubert"; WORKERS=1; BATCHES=3; CORPUS_SIZE=tiny; RECORDS=16
    LOADER_KEYS=(model.size=tiny data.max_seconds_per_batch=8 objective.num_classes=16); K=16
else
    SIZE=base; DEVICE=cuda; STEP_ARGS=(--steps 5 --warmup 2)
    WORKERS=4,14; BATCHES=20; CORPUS_SIZE=demo; RECORDS=1200; LOADER_KEYS=(); K=100
    {
        echo "== install (offline, from .whl)"
        nvidia-smi -L
        "$PY" --version
        ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl: run tools/bench/gpu_wheels.sh and carry .whl"; exit 1; }
        # resolving against what is installed keeps torch; if a requirement pin is not met by
        # the image (and cannot be fetched), install the wheels alone and let the imports decide
        "$PY" -m pip install -q --no-index --no-cache-dir --find-links .whl .whl/*.whl ||
            "$PY" -m pip install -q --no-index --no-cache-dir --no-deps .whl/*.whl
        "$PY" -c "import av, open_clip, omegaconf, jiwer, espeakng_loader, torch; import mmssl.cli
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'av', av.__version__)"
    } >"$OUT/prep.log" 2>&1 || { cat "$OUT/prep.log"; exit 1; }
    OBJECTIVES=$("$PY" -c "import mmssl.objectives
from mmssl.registry import OBJECTIVES
print(' '.join(['hubert'] + [n for n in OBJECTIVES.names() if n != 'hubert']))")
fi

# data preparation in the background: a corpus (or the one given), then MFCC k-means labels
(
    if [ -n "$CORPUS" ]; then
        MANIFEST=$CORPUS/av/train.jsonl
    else
        CORPUS=$WORK/corpus
        "$PY" -m mmssl.cli synth --size "$CORPUS_SIZE" --workers $(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 )) \
            --quiet --out "$CORPUS" || exit 1
        # its first RECORDS training records, beside train.jsonl so relative paths hold: more than
        # the loader's batches need, while MFCC k-means over all 2000 of the demo takes minutes
        MANIFEST=$CORPUS/av/bench.jsonl
        head -n "$RECORDS" "$CORPUS/av/train.jsonl" >"$MANIFEST"
    fi
    echo "$MANIFEST" >"$WORK/manifest_path"
    OMP_NUM_THREADS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 )) "$PY" -m mmssl.cli kmeans \
        --manifest "$MANIFEST" --features mfcc --k "$K" --device cpu --out "$WORK/km" || exit 1
) >>"$OUT/prep.log" 2>&1 &
PREP=$!

if [ "$SMOKE" = 1 ]; then
    echo "skipped: no GPU in --cpu-smoke" >"$OUT/pytest_cuda.log"
else
    limited 150 "$OUT/pytest_cuda.log" "$PY" -m pytest -m cuda -q -p no:cacheprovider tests
fi

# the step benchmarks time the GPU: wait for the CPU-heavy preparation first
wait "$PREP"
PREP_RC=$?
: >"$OUT/steps.jsonl"
for name in $OBJECTIVES; do
    if [ "$name" = hubert ] && [ "$SMOKE" = 0 ]; then
        args=(--batch-size 8 --seconds 15 --precision bf16)  # the reference configuration
    else
        args=("${STEP_ARGS[@]}")
    fi
    : >"$WORK/step.out"
    limited 60 "$WORK/step.out" "$PY" tools/bench/pretrain_step.py --objective "$name" --size "$SIZE" \
        --device "$DEVICE" "${args[@]}" || echo "$name: failed or timed out" >>"$WORK/step.out"
    { echo "== $name"; cat "$WORK/step.out"; } >>"$OUT/steps.log"
    grep '^{' "$WORK/step.out" >>"$OUT/steps.jsonl"  # its one JSON result line
done

if [ "$PREP_RC" = 0 ]; then
    limited 240 "$OUT/loader.log" "$PY" tools/bench/loader.py --manifest "$(cat "$WORK/manifest_path")" \
        --labels "$WORK/km" --objectives av_hubert,hubert --workers "$WORKERS" --batches "$BATCHES" \
        --step-json "$OUT/steps.jsonl" --out "$OUT/loader.jsonl" --quiet ${LOADER_KEYS[@]+"${LOADER_KEYS[@]}"}
else
    echo "skipped: the corpus or its labels failed (see prep.log)" >"$OUT/loader.log"
fi

{
    echo "# GPU session $(date -u +%F) ($(( $(date +%s) - START )) s)"
    echo
    echo "## CUDA tests"
    echo
    tail -n 3 "$OUT/pytest_cuda.log"
    echo
    echo "## Training step and loader"
    echo
    if grep -q '^training step' "$OUT/loader.log"; then
        sed -n '/^training step/,$p' "$OUT/loader.log"
    else
        tail -n 5 "$OUT/loader.log"
        [ -s "$OUT/loader.jsonl" ] && { echo; cat "$OUT/loader.jsonl"; }
        echo
        cat "$OUT/steps.jsonl"
    fi
    failed=$(grep -c "failed or timed out" "$OUT/steps.log")
    echo
    echo "objectives timed: $(wc -l <"$OUT/steps.jsonl"), failed: $failed (steps.log)"
} >"$OUT/summary.md"
rm -rf "$WORK"
cat "$OUT/summary.md"

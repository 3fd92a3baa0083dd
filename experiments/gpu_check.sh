#!/usr/bin/env bash
# The GPU measurements of README's "GPU" table in one short run, for a lent GPU machine
# with jax, flax, optax, orbax, chex and torch already there (wheels of anything else,
# ml_collections at least, in .whl/). Usage, from the repository root:
#   OUT=/some/folder bash experiments/gpu_check.sh
# Writes under $OUT, most wanted first: round_fisher_im2col.md (the full pfl_resfim round,
# fp32, with fisher.conv=im2col and fisher.chunk_size=8: time, compile, XLA's memory
# analysis per device), round_fisher_layers.md (the same with fisher.grads=layers, its
# chunk 8), round.md (the same round at the defaults), trace_*.md (where that round's
# device time goes, with the trace itself when under 15 MB), stepfisher.md (train step,
# client_axis=map, fp32 and bf16, and per-example Fisher by vmap(grad) and by layers,
# ours and the PyTorch anchor on the same GPU) and log.txt (the JSON files go to /tmp:
# the device tool brings back 8 files). Each part has its own time limit (550 s in all)
# and the benchmark writes its files after every group of rows, so a slow part keeps
# what it measured.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the output folder}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
B="python3 experiments/benchmark.py ${BENCH_ARGS:-}"   # BENCH_ARGS=--quick: a CPU dry run
# One part: a time limit, then its JSON moves to /tmp (the device tool returns 8 files).
part() { date; timeout "$@"; mv -f "$OUT"/*.json /tmp/ 2>/dev/null; }
part 120 $B --parts=round --precision=fp32 --repeats=3 --set=fisher.conv=im2col \
  --set=fisher.chunk_size=8 --out="$OUT/round_fisher_im2col"
part 120 $B --parts=round --precision=fp32 --repeats=3 --set=fisher.grads=layers \
  --out="$OUT/round_fisher_layers"
part 130 $B --parts=round --precision=fp32 --repeats=3 --trace=/tmp/trace --out="$OUT/round"
for t in /tmp/trace/*/plugins/profile/*/perfetto_trace.json.gz; do
  [ -f "$t" ] || continue
  name=$(basename "$(dirname "$(dirname "$(dirname "$(dirname "$t")")")")")
  python3 experiments/trace_summary.py "$t" > "$OUT/trace_$name.md"
  [ "$(stat -c %s "$t")" -lt 15000000 ] && cp "$t" "$OUT/trace_$name.json.gz"
done
part 180 $B --parts=step,fisher --conv=xla --step_axis=map --anchor=torch --repeats=10 \
  --out="$OUT/stepfisher"
date; cat "$OUT"/*.md

#!/usr/bin/env bash
# Nightly retrain: ingest today's export, train warm from the last good run, point `latest` at it.
#
#   EXPORT=/data/exports/ratings FORMAT=parquet RUNS=/data/funkflow/runs \
#     scripts/nightly.sh configs/my.yaml [--scheduler-file /shared/scheduler.json] [--set KEY=VALUE ...]
#
# Safe to re-run: every stage is skipped when up to date, a crashed run takes up its own
# checkpoint, and a second copy started while one runs exits 75 (the run directory is locked).
# Exit codes are funkflow's (sysexits): a scheduler retries 75 and alerts on the others.
# From cron, one at a time (flock -n skips a night rather than queue behind a slow one):
#   15 2 * * *  flock -n /var/lock/funkflow-nightly.lock /opt/funkflow/scripts/nightly.sh \
#                 /etc/funkflow/nightly.yaml >> /var/log/funkflow/nightly.jsonl 2>&1
set -euo pipefail

config=${1:?usage: nightly.sh CONFIG [funkflow run flags...]}
shift
: "${EXPORT:?set EXPORT to the ratings export: a file, directory or URL}"
FORMAT=${FORMAT:-parquet}
RUNS=${RUNS:-runs/nightly}
WARM_EPOCHS=${WARM_EPOCHS:-3}
today=${RUN_DATE:-$(date -u +%F)}

args=(--run-dir "$RUNS/$today" --set "data.source=$EXPORT" --set "data.format=$FORMAT" --set data.generate=null)
# Warm start from the newest earlier run that finished (its model exists), if any.
mkdir -p "$RUNS"
previous=""
for run in "$RUNS"/*/; do
  name=$(basename "$run")
  if [ "$name" != "$today" ] && [ "$name" != latest ] && [ -f "$run/model/model.json" ]; then
    previous=${run%/}   # the glob is sorted, and run directories are named by date: the last is the newest
  fi
done
if [ -n "$previous" ]; then
  args+=(--set "train.init_from=$previous" --set "train.epochs=$WARM_EPOCHS")
fi

funkflow --log-format json run "$config" "${args[@]}" "$@"
ln -sfn "$today" "$RUNS/latest.tmp" && mv -T "$RUNS/latest.tmp" "$RUNS/latest"   # atomic switch

#!/usr/bin/env bash
# A long fuzzing campaign: every target for SECONDS (default 900) each, two lanes in parallel,
# at the lowest CPU priority so it only takes idle time. Work corpora grow in fuzz/corpus/
# (not committed); crashes land in fuzz/artifacts/<target>/. Prints executions per target.
#   bash fuzz/campaign.sh [SECONDS]
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-900}
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none || exit 1
logs=$(mktemp -d)
# Scratch directories of the recovery and config targets (a crashed run leaves its own).
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export TMPDIR="$scratch"
lane() {
  for target in "$@"; do
    mkdir -p "corpus/$target"
    corpora=("corpus/$target" "seeds/$target")
    [ -d "regressions/$target" ] && corpora+=("regressions/$target")
    nice -n 19 cargo fuzz run -s none "$target" "${corpora[@]}" -- \
      -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$logs/$target.log" 2>&1
    rc=$?
    runs=$(grep -E '^stat::number_of_executed_units' "$logs/$target.log" | awk '{print $2}')
    echo "campaign: $target runs=${runs:-?} exit=$rc"
  done
}
lane upstream_event options_update http_upgrade proxy_v2 config_toml v2_frame &
lane frame_decoder subscribe_query frame_roundtrip recovery subscribe_events_query &
wait
echo "campaign: logs in $logs"

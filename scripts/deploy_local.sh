#!/usr/bin/env bash
# A dpsign-fl deployment on this machine (loopback, no TLS): one flower-superlink,
# N flower-supernodes, each with its own partition and its own privacy-ledger file.
# For trying the deployment path; a real one runs one SuperNode per device, with
# TLS and SuperNode authentication (docs/deployment.md).
#
#   scripts/deploy_local.sh start DIR [NODES]        start; PIDs in DIR/*.pid, logs in DIR/*.log
#   scripts/deploy_local.sh run DIR [RUN-CONFIG]     flwr run . (from the repository) and wait
#   scripts/deploy_local.sh stop DIR                 SIGTERM every recorded PID, wait until gone
#
# Environment: LINK_PORT (SuperLink port, default 47000; SuperNodes use LINK_PORT+1..N).
# Ledger files DIR/ledgers/node<i>.json survive `stop`: delete them only with the data.
set -euo pipefail

command=${1:?usage: deploy_local.sh start|run|stop DIR ...}
dir=${2:?usage: deploy_local.sh start|run|stop DIR ...}
repo=$(cd "$(dirname "$0")/.." && pwd)
link_port=${LINK_PORT:-47000}
connection=local-deployment

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

start_one() {  # name, command...
    local name=$1; shift
    mkdir -p "$dir/$name-home"
    FLWR_HOME="$dir/$name-home" setsid "$@" > "$dir/$name.log" 2>&1 < /dev/null &
    echo $! > "$dir/$name.pid"
}

case $command in
start)
    nodes=${3:-3}
    mkdir -p "$dir/ledgers" "$dir/cli-home"
    dir=$(cd "$dir" && pwd)
    start_one superlink flower-superlink --insecure --host 127.0.0.1 --port "$link_port" \
        --disable-runtime-dependency-installation
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$link_port/health" > /dev/null && break
        sleep 0.1
    done
    curl -sf "http://127.0.0.1:$link_port/health" > /dev/null || { echo "SuperLink not healthy; see $dir/superlink.log"; exit 1; }
    for i in $(seq 0 $((nodes - 1))); do
        start_one "node$i" flower-supernode --insecure --superlink "127.0.0.1:$link_port" \
            --port $((link_port + 1 + i)) \
            --node-config "partition-id=$i num-partitions=$nodes ledger-path=\"$dir/ledgers/node$i.json\""
    done
    cat > "$dir/cli-home/config.toml" <<TOML
[superlink]
default = "$connection"

[superlink.$connection]
address = "127.0.0.1:$link_port"
insecure = true
TOML
    echo "started SuperLink on 127.0.0.1:$link_port and $nodes SuperNodes; run: $0 run $dir"
    ;;
run)
    dir=$(cd "$dir" && pwd)
    nodes=$(ls "$dir"/node*.pid | wc -l)
    cd "$repo"
    export FLWR_HOME="$dir/cli-home"
    run_id=$(flwr run . "$connection" --format json --run-config \
        "min-available-nodes=$nodes min-train-nodes=$nodes results-dir='$dir/results' ${3:-}" \
        | python -c 'import json, sys; print(json.load(sys.stdin)["run-id"])')
    flwr log "$run_id" "$connection" --stream
    # `flwr log --stream` (like `flwr run --stream`) exits 0 even when the run failed.
    status=$(flwr ls "$connection" --run-id "$run_id" --format json \
        | python -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])')
    echo "run $run_id: $status (results in $dir/results)"
    [ "$status" = "finished:completed" ]
    ;;
stop)
    # SIGTERM each recorded PID; its flower-superexec child exits by itself once the
    # parent is gone: wait (at most 30 s each) for both, then SIGKILL what is left.
    for pid_file in "$dir"/node*.pid "$dir"/superlink.pid; do
        [ -f "$pid_file" ] || continue
        pid=$(cat "$pid_file")
        children=$(pgrep -P "$pid" || true)
        kill -TERM "$pid" 2> /dev/null || true
        for waited in $pid $children; do
            for _ in $(seq 1 300); do kill -0 "$waited" 2> /dev/null || break; sleep 0.1; done
            if kill -0 "$waited" 2> /dev/null; then kill -KILL "$waited"; fi
        done
        rm -f "$pid_file"
    done
    echo "stopped"
    ;;
*)
    echo "unknown command $command (start, run or stop)"; exit 2
    ;;
esac

#!/usr/bin/env bash
# Run the lab scenarios on the Vagrant VMs, from the host (next to the Vagrantfile).
#
#   ./run-scenarios.sh failover      # writers on every client, client3 cut off and fenced
#   ./run-scenarios.sh split-brain   # needs STORAGED_LAB_CLIENTS=2 at 'vagrant up'
#
# The same story as 'storaged lab scenario' on one machine, with the same
# pieces: links cut with blackhole routes, storaged.lab.writer logging
# acknowledged writes, fence state read on the storage nodes and
# storaged.lab.check reading the shared LU (here the multipath device of
# the kernel initiator) at the end.  The acknowledged-write logs are copied
# to ./scenario-acks on the host.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

NET=${STORAGED_LAB_NET:-192.168.56}
CLIENTS=${STORAGED_LAB_CLIENTS:-3}
PY=/storaged/.venv/bin/python
SD="/storaged/.venv/bin/storaged --dir /var/lib/storaged"
DEV=/dev/mapper/36001405000000000000000000005ab01
T0=$(date +%s.%N)

stamp() { printf '%s +%7.3fs  %s\n' "$(date +%T.%3N)" \
    "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { print a - b }')" "$*"; }
on() { local vm=$1; shift; vagrant ssh "$vm" -c "sudo $*" -- -q 2>/dev/null; }
ip_of() { case $1 in client*) echo "$NET.$((20 + ${1#client}))" ;; storage*) echo "$NET.$((10 + ${1#storage}))" ;; esac; }

cut() {  # cut VICTIM OTHER...: blackhole routes both ways (storage stays reachable)
    local v=$1; shift
    for o in "$@"; do
        on "$v" ip route add blackhole "$(ip_of "$o")/32"
        on "$o" ip route add blackhole "$(ip_of "$v")/32"
    done
}

heal() {
    local v=$1; shift
    for o in "$@"; do
        on "$v" ip route del blackhole "$(ip_of "$o")/32" || true
        on "$o" ip route del blackhole "$(ip_of "$v")/32" || true
    done
}

fenced() {  # fenced NODE: true when every storage node says so
    for s in storage1 storage2; do
        on "$s" "$SD fence status $1" >/dev/null && return 1
    done
    return 0
}

wait_for() {  # wait_for WHAT TIMEOUT CMD...
    local what=$1 timeout=$2; shift 2
    local end=$(($(date +%s) + timeout))
    until "$@"; do
        [ "$(date +%s)" -lt "$end" ] || { stamp "$what: NOT reached within ${timeout}s"; return 1; }
        sleep 0.5
    done
    stamp "$what"
}

writers() {  # start a writer on every client (pid in /run/lab-writer.pid)
    for i in $(seq "$CLIENTS"); do
        on "client$i" "sh -c 'mkdir -p /var/tmp/acks; rm -f /var/tmp/acks/client$i.jsonl; \
            nohup $PY -m storaged.lab.writer /mnt/shared/w-client$i \
            /var/tmp/acks/client$i.jsonl client$i >/dev/null 2>&1 & echo \$! >/run/lab-writer.pid'"
    done
    stamp "writers started on $CLIENTS clients"
}

stop_writers() {
    for i in $(seq "$CLIENTS"); do
        on "client$i" "sh -c 'kill \$(cat /run/lab-writer.pid) 2>/dev/null; rm -f /run/lab-writer.pid'"
    done
    stamp "writers stopped"
}

check() {  # gather every client's log on the host and on client1, then read the LU there
    rm -rf scenario-acks && mkdir -p scenario-acks
    for i in $(seq "$CLIENTS"); do
        on "client$i" cat "/var/tmp/acks/client$i.jsonl" >"scenario-acks/client$i.jsonl" || true
    done
    on client1 "sh -c 'rm -rf /var/tmp/all-acks && mkdir -p /var/tmp/all-acks'"
    for f in scenario-acks/*.jsonl; do
        vagrant ssh client1 -c "sudo tee /var/tmp/all-acks/$(basename "$f") >/dev/null" <"$f"
    done
    on client1 "$PY -m storaged.lab.check $DEV /var/tmp/all-acks" | grep -v '^CHECK-JSON'
}

failover() {
    local victim=client$CLIENTS others=()
    for i in $(seq $((CLIENTS - 1))); do others+=("client$i"); done
    writers
    sleep 5
    stamp "cut $victim from ${others[*]}"
    cut "$victim" "${others[@]}"
    wait_for "$victim fenced at the SAN" 60 fenced "$victim"
    wait_for "survivors' view without $victim" 60 \
        sh -c "vagrant ssh client1 -c 'sudo $SD cluster status' -- -q 2>/dev/null \
               | grep -q 'members \[$(seq -s ', ' $((CLIENTS - 1)))\]'"
    sleep 5
    stop_writers
    stamp "portal failover: not run (needs floating portal addresses, storaged vip)"
    check
    heal "$victim" "${others[@]}"
    stamp "links healed; unfence with: vagrant ssh storage1 -c 'sudo $SD fence on $victim' \
(and storage2), then restart storaged-fs on $victim"
}

split_brain() {
    [ "$CLIENTS" = 2 ] || { echo "split-brain needs STORAGED_LAB_CLIENTS=2 (vagrant up)" >&2; exit 2; }
    stamp "cut client1 <-> client2"
    cut client1 client2
    wait_for "client2 fenced at the SAN" 60 fenced client2
    sleep 5
    if fenced client1; then stamp "FAILED: both sides fenced"; exit 1; fi
    stamp "exactly one side survived: client1 keeps its access"
    heal client1 client2
}

case "${1:-}" in
    failover) failover ;;
    split-brain) split_brain ;;
    *) echo "usage: $0 failover|split-brain" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Configure one lab VM for its role, after scripts/setup.sh installed everything.
# Nothing is installed here: setup.sh is the only install path.
#
#   provision.sh storage|client INDEX STORAGE_IPS CLIENT_IPS   (comma-separated lists)
#
# Idempotent: running it again (vagrant provision) reapplies the same configuration.
set -euo pipefail

ROLE=$1 INDEX=$2
IFS=, read -r -a STORAGE_IPS <<<"$3"
IFS=, read -r -a CLIENT_IPS <<<"$4"
ROOT=/storaged
SD="$ROOT/.venv/bin/storaged --dir /var/lib/storaged"
IQN=iqn.2026-11.org.storaged.lab:shared
# One LU identity on every storage node, so multipath sees one LU with a path per node.
WWN=6001405000000000000000000005ab01
SERIAL=storagedlab0001
FENCE_PW=${STORAGED_LAB_FENCE_PASSWORD:-lab-fencer-secret}   # a lab, not production
ME_IP() { if [ "$ROLE" = storage ]; then echo "${STORAGE_IPS[$((INDEX - 1))]}";
          else echo "${CLIENT_IPS[$((INDEX - 1))]}"; fi; }
log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

unit() {  # unit NAME DESCRIPTION EXECSTART [EXECSTOP] [ENV]
    cat >"/etc/systemd/system/$1.service" <<EOF
[Unit]
Description=$2
After=network-online.target ${6:-}
Wants=network-online.target

[Service]
Type=simple
ExecStart=$3
${4:+ExecStop=$4}
${5:+Environment=$5}
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable "$1.service"
    systemctl restart "$1.service"
}

storage() {
    local ip tpgt=$INDEX peer=$((3 - INDEX))
    ip=$(ME_IP)
    mkdir -p /srv/storaged /etc/storaged
    [ -e /srv/storaged/shared.img ] || truncate -s 1G /srv/storaged/shared.img
    log "storage$INDEX: target $IQN on $ip:3260 (TPGT $tpgt), LU $WWN"
    cat >/etc/storaged/lab-config.json <<EOF
{"format": "storaged-config", "version": 1,
 "backstores": [{"name": "shared", "kind": "file", "path": "/srv/storaged/shared.img",
                 "size": 1073741824, "serial": "$SERIAL", "wwn": "$WWN", "wce": false}],
 "targets": [{"iqn": "$IQN", "tpgt": $tpgt, "portals": ["$ip:3260"],
              "luns": {"0": "shared"}, "open_access": true}]}
EOF
    systemctl stop storaged-lab 2>/dev/null || true
    $SD config restore /etc/storaged/lab-config.json
    # ALUA: storage1 owns the data (active/optimized); storage2's port is standby.
    # When HA storage groups land (one LU served by both, shared reservations),
    # failover moves active/optimized to storage2: see README.md.
    if [ "$INDEX" = 1 ]; then
        $SD alua group create 2 --remote --state standby --port "$IQN,2" || true
    else
        $SD alua group create 2 --state standby --port "$IQN,2" || true
        $SD alua group create 3 --remote --state active/optimized --port "$IQN,1" || true
    fi
    local i=1
    for _ in "${CLIENT_IPS[@]}"; do
        $SD fence map "client$i" --initiator "iqn.2026-11.org.storaged.lab:client$i"
        i=$((i + 1))
    done
    $SD mgmt listen "$ip:3261"
    printf '%s\n' "$FENCE_PW" | $SD mgmt user-add fencer --password-stdin --replace \
        || printf '%s\n' "$FENCE_PW" | $SD mgmt user-add fencer --password-stdin
    unit storaged-lab "storaged lab storage node" "$SD serve"
}

client() {
    local nodes=() i=1 ips=()
    for ip in "${CLIENT_IPS[@]}"; do nodes+=("--node=$i=$ip:7870"); i=$((i + 1)); done
    for ip in "${STORAGE_IPS[@]}"; do ips+=("$ip:3261"); done
    log "client$INDEX: open-iscsi initiator iqn.2026-11.org.storaged.lab:client$INDEX"
    echo "InitiatorName=iqn.2026-11.org.storaged.lab:client$INDEX" >/etc/iscsi/initiatorname.iscsi
    cat >/etc/multipath.conf <<'EOF'
defaults {
    user_friendly_names no
    find_multipaths no
}
devices {
    device {
        vendor "STORAGED"
        product ".*"
        path_grouping_policy group_by_prio
        prio alua
        hardware_handler "1 alua"
        path_checker tur
        failback immediate
        no_path_retry 12
    }
}
EOF
    systemctl restart iscsid multipathd
    for ip in "${STORAGE_IPS[@]}"; do
        iscsiadm -m discovery -t sendtargets -p "$ip:3260" >/dev/null
        iscsiadm -m node -T "$IQN" -p "$ip:3260" --login 2>/dev/null || true  # already logged in
        iscsiadm -m node -T "$IQN" -p "$ip:3260" --op update -n node.startup -v automatic
    done
    local dev=/dev/mapper/3$WWN
    for _ in $(seq 60); do [ -b "$dev" ] && break; multipath -r >/dev/null 2>&1; sleep 1; done
    [ -b "$dev" ] || { echo "multipath device $dev did not appear" >&2; exit 1; }
    multipath -ll "3$WWN"
    mkdir -p /etc/storaged /mnt/shared
    printf '%s\n' "$FENCE_PW" >/etc/storaged/fencer.pw
    chmod 600 /etc/storaged/fencer.pw
    local two=()
    [ ${#CLIENT_IPS[@]} = 2 ] && two=(--two-node)
    $SD cluster init lab "--id=$INDEX" "${nodes[@]}" "${two[@]}"
    local names=() n=1
    for _ in "${CLIENT_IPS[@]}"; do names+=("--node-name=$n=client$n"); n=$((n + 1)); done
    $SD cluster fencing --fencer agent --agent "$ROOT/.venv/bin/fence_storaged" \
        --option "ip=$(IFS=,; echo "${ips[*]}")" --option username=fencer \
        --option "password_script=cat /etc/storaged/fencer.pw" "${names[@]}" \
        $([ ${#CLIENT_IPS[@]} = 2 ] && echo --node-delay-ms=1=3000)
    if [ "$INDEX" = 1 ]; then
        # mkfs refuses a device that holds a filesystem: a re-provision keeps the data.
        $ROOT/.venv/bin/storaged fs mkfs "$dev" "--journals=${#CLIENT_IPS[@]}" --label=lab \
            || true
    fi
    unit storaged-fs "storaged shared filesystem on /mnt/shared" \
        "$SD fs mount $dev /mnt/shared --cluster /var/lib/storaged --foreground" \
        "$ROOT/.venv/bin/storaged fs umount /mnt/shared" "" \
        "iscsid.service multipathd.service"
}

case "$ROLE" in
    storage) storage ;;
    client) client ;;
    *) echo "usage: $0 storage|client INDEX STORAGE_IPS CLIENT_IPS" >&2; exit 2 ;;
esac

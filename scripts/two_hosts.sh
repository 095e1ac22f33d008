#!/usr/bin/env bash
# Two "hosts" on one machine: two network namespaces joined by a veth pair, so that
# a torchrun per host talks to the other over real TCP through a link that can be
# slowed (tc tbf) or cut (ip link set down) in the middle of a run. Needs root and
# iproute2.
#
#   scripts/two_hosts.sh up                  # create both hosts and the link
#   scripts/two_hosts.sh run 0 CMD...        # run CMD on host 0 (1: on host 1)
#   scripts/two_hosts.sh limit 50mbit        # tbf on both ends of the link
#   scripts/two_hosts.sh unlimit             # remove it
#   scripts/two_hosts.sh cut                 # the link goes down (both ends)
#   scripts/two_hosts.sh mend                # and up again
#   scripts/two_hosts.sh status              # addresses, links and qdiscs
#   scripts/two_hosts.sh down                # kill what runs there, remove all (idempotent)
#
# A two-node torchrun across them (each line in its own terminal):
#
#   scripts/two_hosts.sh run 0 torchrun --nnodes=2 --nproc-per-node=1 \
#       --rdzv-backend=c10d --rdzv-endpoint=10.77.0.1:29400 --rdzv-conf=is_host=1 \
#       --local-addr=10.77.0.1 demo.py --force-cpu
#   scripts/two_hosts.sh run 1 torchrun --nnodes=2 --nproc-per-node=1 \
#       --rdzv-backend=c10d --rdzv-endpoint=10.77.0.1:29400 --rdzv-conf=is_host=0 \
#       --local-addr=10.77.0.2 demo.py --force-cpu
#
# Both namespaces share the machine's hostname, so each torchrun must be told its
# own address (--local-addr: it becomes MASTER_ADDR on the node of rendezvous rank
# 0) and whether it hosts the rendezvous store (is_host). `run` sets
# GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the host's veth, and EPMOE_HOST_ADDR
# and EPMOE_PEER_ADDR to its own and the other host's address.
#
# Names and addresses (environment, defaults):
#   EPMOE_NS0=epmoe_h0  EPMOE_NS1=epmoe_h1        namespaces
#   EPMOE_VETH0=epmoe_v0 EPMOE_VETH1=epmoe_v1     veth ends (15 characters at most)
#   EPMOE_ADDR0=10.77.0.1 EPMOE_ADDR1=10.77.0.2 EPMOE_PREFIX=24
#   EPMOE_TBF_BURST=64kb EPMOE_TBF_LATENCY=100ms  tbf's bucket and queue (see tc-tbf(8));
#                                                 raise the burst above rate/HZ for >250mbit
set -euo pipefail

NS=("${EPMOE_NS0:-epmoe_h0}" "${EPMOE_NS1:-epmoe_h1}")
VETH=("${EPMOE_VETH0:-epmoe_v0}" "${EPMOE_VETH1:-epmoe_v1}")
ADDR=("${EPMOE_ADDR0:-10.77.0.1}" "${EPMOE_ADDR1:-10.77.0.2}")
PREFIX=${EPMOE_PREFIX:-24}
BURST=${EPMOE_TBF_BURST:-64kb}
LATENCY=${EPMOE_TBF_LATENCY:-100ms}

die() { echo "two_hosts.sh: $*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}

need_root() {
    command -v ip >/dev/null || die "needs iproute2 ('ip' is not on PATH)"
    [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces and veth)"
}

exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }

node_index() {
    [[ ${1:-} == 0 || ${1:-} == 1 ]] || die "NODE must be 0 or 1, got '${1:-}'"
    echo "$1"
}

cmd_down() {
    local i pids
    for i in 0 1; do
        exists "${NS[i]}" || continue
        # A namespace lives on while a process holds it: end what still runs there
        # (only processes inside this namespace, by pid), then remove it with its veth end.
        pids=$(ip netns pids "${NS[i]}" 2>/dev/null || true)
        if [[ -n $pids ]]; then
            kill -TERM $pids 2>/dev/null || true
            for _ in 1 2 3 4 5 6 7 8 9 10; do
                pids=$(ip netns pids "${NS[i]}" 2>/dev/null || true)
                [[ -z $pids ]] && break
                sleep 0.2
            done
            [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "${NS[i]}" 2>/dev/null || true
    done
}

cmd_up() {
    local i
    cmd_down
    ip netns add "${NS[0]}"
    ip netns add "${NS[1]}" || { cmd_down; die "could not create namespace ${NS[1]}"; }
    # Created straight inside the namespaces: the names never meet the machine's own links.
    ip link add "${VETH[0]}" netns "${NS[0]}" type veth peer name "${VETH[1]}" netns "${NS[1]}" \
        || { cmd_down; die "could not create the veth pair ${VETH[0]} <-> ${VETH[1]}"; }
    for i in 0 1; do
        ip -n "${NS[i]}" link set lo up
        ip -n "${NS[i]}" addr add "${ADDR[i]}/$PREFIX" dev "${VETH[i]}"
        ip -n "${NS[i]}" link set "${VETH[i]}" up
    done
    echo "host 0: ${NS[0]} ${VETH[0]} ${ADDR[0]}/$PREFIX <-> host 1: ${NS[1]} ${VETH[1]} ${ADDR[1]}/$PREFIX"
}

cmd_run() {
    local i
    i=$(node_index "${1:-}")
    shift
    [[ $# -gt 0 ]] || die "run NODE CMD...: no command given"
    exists "${NS[i]}" || die "host $i (${NS[i]}) does not exist; run '$0 up' first"
    exec ip netns exec "${NS[i]}" env \
        GLOO_SOCKET_IFNAME="${VETH[i]}" NCCL_SOCKET_IFNAME="${VETH[i]}" \
        EPMOE_HOST_ADDR="${ADDR[i]}" EPMOE_PEER_ADDR="${ADDR[1 - i]}" "$@"
}

each_end() {  # each_end CMD...: run "ip -n NS CMD... dev VETH" style commands on both ends
    local i
    for i in 0 1; do
        exists "${NS[i]}" || die "host $i (${NS[i]}) does not exist; run '$0 up' first"
        "$@" "$i"
    done
}

limit_end() { tc -n "${NS[$2]}" qdisc replace dev "${VETH[$2]}" root tbf rate "$1" \
                 burst "$BURST" latency "$LATENCY"; }
unlimit_end() { tc -n "${NS[$1]}" qdisc del dev "${VETH[$1]}" root 2>/dev/null || true; }
link_end() { ip -n "${NS[$2]}" link set "${VETH[$2]}" "$1"; }

cmd_status() {
    local i
    for i in 0 1; do
        if exists "${NS[i]}"; then
            echo "host $i: ${NS[i]}"
            ip -n "${NS[i]}" -brief addr show dev "${VETH[i]}" || true
            tc -n "${NS[i]}" qdisc show dev "${VETH[i]}" || true
            echo "  processes: $(ip netns pids "${NS[i]}" | tr '\n' ' ')"
        else
            echo "host $i: ${NS[i]} does not exist"
        fi
    done
}

sub=${1:-}
[[ -n $sub ]] || usage
shift
case $sub in
    up) need_root; cmd_up ;;
    down) need_root; cmd_down ;;
    run) need_root; cmd_run "$@" ;;
    limit)
        need_root
        [[ $# -eq 1 ]] || die "limit RATE: one rate, as tc writes it (100mbit, 1gbit, 500kbit)"
        command -v tc >/dev/null || die "needs tc (iproute2)"
        each_end limit_end "$1"
        ;;
    unlimit) need_root; each_end unlimit_end ;;
    cut) need_root; each_end link_end down ;;
    mend) need_root; each_end link_end up ;;
    status) need_root; cmd_status ;;
    -h|--help|help) usage ;;
    *) echo "two_hosts.sh: unknown command '$sub'" >&2; usage ;;
esac

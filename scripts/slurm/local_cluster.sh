#!/usr/bin/env bash
# local_cluster.sh -- a real SLURM cluster on this machine (one node, or several: one slurmd
# daemon per node, each on its own port), for tests and for trying the sbatch launchers on a
# workstation (Debian/Ubuntu, run as root).
#
# Usage:
#   scripts/slurm/local_cluster.sh start    # install (if needed) + start munged, slurmctld, slurmd(s);
#                                           # waits until `srun -N<nodes> hostname` works, then
#                                           # prints `export SLURM_CONF=...` on stdout, so:
#                                           #   eval "$(scripts/slurm/local_cluster.sh start)"
#   scripts/slurm/local_cluster.sh stop     # stop only the daemons this script started (PID files)
#   scripts/slurm/local_cluster.sh status   # daemons running? + sinfo
#   scripts/slurm/local_cluster.sh env      # print the `export SLURM_CONF=...` line again
#
# Environment (all optional):
#   LOCAL_SLURM_DIR            state dir: slurm.conf, logs, spool, PID files, munge socket
#                              [/tmp/open_clip_3t_slurm]
#   LOCAL_SLURM_CTLD_PORT      SlurmctldPort [6817]
#   LOCAL_SLURM_SLURMD_PORT    SlurmdPort [6818]; node i of several listens on this port + i - 1
#   LOCAL_SLURM_NODES          number of nodes [1]; several are several slurmd daemons on this
#                              machine, each NodeAddr=127.0.0.1 (their names do not resolve: the
#                              launchers meet at a node's NodeAddr, as on clusters whose names don't)
#   LOCAL_SLURM_NODE           node name [$(hostname -s)]; with several nodes, their prefix [n]:
#                              n1, n2, ...
#   LOCAL_SLURM_PARTITION      partition name [local]
#   LOCAL_SLURM_CPUS           CPUs of each node [$(nproc)]
#   LOCAL_SLURM_MEMORY_MB      RealMemory [90% of MemTotal]
#   LOCAL_SLURM_GPUS           gres gpu count [number of /dev/nvidia<N> devices]; if set > 0 on
#                              a machine without such devices, a count-only gpu gres is
#                              configured so `--gres=gpu:N` / `--gpus-per-node` are accepted
#   LOCAL_SLURM_CRED_EXPIRE    AuthInfo cred_expire, also the requeue delay [10]
#   LOCAL_SLURM_START_TIMEOUT  seconds to wait for a working `srun` [90]
#
# Exit codes: 0 ok; 1 failure (daemon did not come up; logs are printed);
#             3 cannot run here (not root, or packages cannot be installed) -- one-line reason
#             on stderr, starting with "local_cluster: unavailable:". `status` exits 1 when
#             not all daemons run.
#
# Facts this relies on: no systemd (service starts are blocked in containers), so the
# daemons are started directly; each cluster gets its own munged (own socket in the state
# dir, AuthInfo=socket=...), so two clusters in different LOCAL_SLURM_DIRs with different
# ports can run side by side. A requeued job waits cred_expire seconds before it may start
# again (default 120 s; here 10 s). `start` wipes the previous job state (fresh job ids).
# Several nodes need a SLURM built with multiple-slurmd support (Debian's is): each slurmd
# is started with `-N NAME` and has its own port, PID file, log and spool dir (%n in slurm.conf).
# The nodes of a cluster that runs are its slurm.conf's: `stop`/`status` read them from there.
set -euo pipefail

readonly PACKAGES=(munge slurmctld slurmd slurm-client)
readonly EXIT_UNAVAILABLE=3

STATE_DIR="${LOCAL_SLURM_DIR:-/tmp/open_clip_3t_slurm}"
CTLD_PORT="${LOCAL_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${LOCAL_SLURM_SLURMD_PORT:-6818}"
NODE_COUNT="${LOCAL_SLURM_NODES:-1}"
PARTITION="${LOCAL_SLURM_PARTITION:-local}"
CRED_EXPIRE="${LOCAL_SLURM_CRED_EXPIRE:-10}"
START_TIMEOUT="${LOCAL_SLURM_START_TIMEOUT:-90}"

CONF="$STATE_DIR/slurm.conf"
MUNGE_DIR="$STATE_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MUNGE_KEY=/etc/munge/munge.key
LOG_DIR="$STATE_DIR/log"
PID_DIR="$STATE_DIR/pid"
declare -A PIDFILE=(
    [munged]="$MUNGE_DIR/munged.pid"
    [slurmctld]="$PID_DIR/slurmctld.pid"
)
declare -A LOGFILE=(
    [munged]="$MUNGE_DIR/munged.log"
    [slurmctld]="$LOG_DIR/slurmctld.log"
)
declare -A NODE_OF=()   # slurmd daemon -> its node
DAEMONS=()              # start order; stop in reverse (set_nodes)
NODES=()

export SLURM_CONF="$CONF"
# Do not let an enclosing SLURM job (e.g. pytest run inside sbatch) leak into our clients.
unset SLURM_JOB_ID SLURM_JOBID SLURM_STEP_ID SLURM_NODELIST SLURM_JOB_NODELIST 2>/dev/null || true

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }
unavailable() { echo "local_cluster: unavailable: $*" >&2; exit "$EXIT_UNAVAILABLE"; }

# --- PID bookkeeping ---------------------------------------------------------------
# A daemon counts as "ours" only if the PID in its PID file is alive, its command name
# starts with the daemon's name, and its command line mentions our state dir (every
# daemon is started with a path inside it). This guards against stale PID files whose
# PID was reused by an unrelated process.
our_pid() {  # our_pid NAME -> prints the PID and returns 0 if our daemon NAME runs
    local name="${1%%@*}" pidfile="${PIDFILE[$1]}" pid comm cmdline
    [[ -r "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == "$name"* ]] || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *"$STATE_DIR/"* ]] || return 1
    echo "$pid"
}

running_count() {
    local n=0 d
    for d in "${DAEMONS[@]}"; do our_pid "$d" >/dev/null && n=$((n + 1)); done
    echo "$n"
}

print_env() {
    echo "export SLURM_CONF=$CONF"
}

log_tails() {
    local d
    for d in "${DAEMONS[@]}"; do
        if [[ -f "${LOGFILE[$d]}" ]]; then
            echo "----- tail ${LOGFILE[$d]} -----" >&2
            tail -n 25 "${LOGFILE[$d]}" >&2 || true
        fi
    done
}

# --- nodes ---------------------------------------------------------------------------
# set_nodes NAME... : the cluster's nodes. One node keeps the single-node file names (pid/slurmd.pid,
# log/slurmd.log); several get one daemon each, slurmd@NAME, with files named by node (%n in slurm.conf).
set_nodes() {
    NODES=("$@")
    DAEMONS=(munged slurmctld)
    local n d
    for n in "${NODES[@]}"; do
        if ((${#NODES[@]} == 1)); then d=slurmd; else d="slurmd@$n"; fi
        DAEMONS+=("$d")
        NODE_OF[$d]="$n"
        if ((${#NODES[@]} == 1)); then
            PIDFILE[$d]="$PID_DIR/slurmd.pid"
            LOGFILE[$d]="$LOG_DIR/slurmd.log"
        else
            PIDFILE[$d]="$PID_DIR/slurmd-$n.pid"
            LOGFILE[$d]="$LOG_DIR/slurmd-$n.log"
        fi
    done
}

configured_nodes() {  # LOCAL_SLURM_NODES nodes (a fresh start)
    local i names=()
    [[ "$NODE_COUNT" =~ ^[1-9][0-9]*$ ]] || die "LOCAL_SLURM_NODES=$NODE_COUNT: give a number of nodes >= 1"
    if ((NODE_COUNT == 1)); then
        names=("${LOCAL_SLURM_NODE:-$(hostname -s)}")
    else
        for ((i = 1; i <= NODE_COUNT; i++)); do names+=("${LOCAL_SLURM_NODE:-n}$i"); done
    fi
    set_nodes "${names[@]}"
}

existing_nodes() {  # the nodes of this state dir's slurm.conf, if there is one; else configured_nodes
    local names=""
    [[ -r "$CONF" ]] && names="$(sed -n 's/^NodeName=\([^ ]*\) NodeAddr=.*/\1/p' "$CONF")"
    if [[ -n "$names" ]]; then
        # shellcheck disable=SC2086  # one name per line
        set_nodes $names
    else
        configured_nodes
    fi
}

node_list() {  # n1,n2 (sinfo -n, PartitionName Nodes=)
    local IFS=,
    echo "${NODES[*]}"
}

# --- installation --------------------------------------------------------------------
have_packages() {
    command -v munged >/dev/null && command -v slurmctld >/dev/null &&
        command -v slurmd >/dev/null && command -v srun >/dev/null && command -v sbatch >/dev/null
}

install_packages() {
    have_packages && return 0
    command -v apt-get >/dev/null || unavailable "SLURM not installed and no apt-get to install it"
    log "installing ${PACKAGES[*]} (apt-get) ..."
    local out="$STATE_DIR/apt.log"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${PACKAGES[@]}" >"$out" 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update >>"$out" 2>&1 || true
        apt-get install -y --no-install-recommends "${PACKAGES[@]}" >>"$out" 2>&1 ||
            unavailable "apt-get install ${PACKAGES[*]} failed (see $out): $(tail -n 1 "$out")"
    fi
    have_packages || unavailable "packages installed but daemons not found on PATH"
}

# --- configuration -------------------------------------------------------------------
ensure_munge_key() {
    if [[ ! -s "$MUNGE_KEY" ]]; then
        log "creating munge key $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$(dirname "$MUNGE_KEY")" "$MUNGE_KEY"
    chmod 0700 "$(dirname "$MUNGE_KEY")"
    chmod 0400 "$MUNGE_KEY"
}

gpu_count() {
    if [[ -n "${LOCAL_SLURM_GPUS:-}" ]]; then echo "$LOCAL_SLURM_GPUS"; return; fi
    local n=0 f
    for f in /dev/nvidia[0-9]*; do [[ -e "$f" ]] && n=$((n + 1)); done
    echo "$n"
}

write_config() {
    local cpus mem_mb gpus gres_line="" gres_types="" i node_lines="" slurmd_pid slurmd_log slurmd_spool
    cpus="${LOCAL_SLURM_CPUS:-$(nproc)}"
    mem_mb="${LOCAL_SLURM_MEMORY_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)}"
    gpus="$(gpu_count)"
    rm -f "$STATE_DIR/gres.conf"
    if ((gpus > 0)); then
        gres_types="GresTypes=gpu"
        gres_line="Gres=gpu:$gpus"
        if [[ -e /dev/nvidia$((gpus - 1)) ]]; then
            echo "NodeName=$(node_list) Name=gpu File=/dev/nvidia[0-$((gpus - 1))]" >"$STATE_DIR/gres.conf"
        else
            # No GPUs here: fake device files (slurmd wants one File per gpu; a count-only
            # gres is reported as 0). /dev/null's numbers if mknod works, else plain files
            # (slurmd then logs "not a valid character or block device", harmless).
            local i dev="$STATE_DIR/fake_gpu"
            rm -rf "$dev" && mkdir -p "$dev"
            for ((i = 0; i < gpus; i++)); do
                mknod "$dev/nvidia$i" c 1 3 2>/dev/null || touch "$dev/nvidia$i"
            done
            echo "NodeName=$(node_list) Name=gpu File=$dev/nvidia[0-$((gpus - 1))]" >"$STATE_DIR/gres.conf"
        fi
    fi
    for i in "${!NODES[@]}"; do
        node_lines+="NodeName=${NODES[$i]} NodeAddr=127.0.0.1 NodeHostname=$(hostname) Port=$((SLURMD_PORT + i))"
        node_lines+=" CPUs=$cpus RealMemory=$mem_mb $gres_line State=UNKNOWN"$'\n'
    done
    slurmd_pid="${PIDFILE[slurmd]:-$PID_DIR/slurmd-%n.pid}"
    slurmd_log="${LOGFILE[slurmd]:-$LOG_DIR/slurmd-%n.log}"
    slurmd_spool="$STATE_DIR/spool/slurmd"
    ((${#NODES[@]} == 1)) || slurmd_spool+="-%n"
    cat >"$CONF" <<EOF
# Generated by scripts/slurm/local_cluster.sh -- test cluster of ${#NODES[@]} node(s). Do not edit:
# rewritten on every fresh start.
ClusterName=open_clip_3t_local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# own munged socket; cred_expire is also how long a requeued job waits before restarting
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE_DIR/spool/ctld
SlurmdSpoolDir=$slurmd_spool
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=${LOGFILE[slurmctld]}
SlurmdLogFile=$slurmd_log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups, no systemd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
# scheduling: fast cycles, CPUs as the consumable resource, shareable between jobs
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
$gres_types
ReturnToService=2
JobRequeue=1
KillWait=2
MinJobAge=5
InactiveLimit=0
Waittime=0
SlurmdTimeout=60
SlurmctldTimeout=60
${node_lines}PartitionName=$PARTITION Nodes=$(node_list) Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    chmod 0644 "$CONF"
}

# --- start / stop --------------------------------------------------------------------
start_munged() {
    our_pid munged >/dev/null && return 0
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "${PIDFILE[munged]}"
    runuser -u munge -- munged \
        --socket="$MUNGE_SOCKET" --pid-file="${PIDFILE[munged]}" \
        --log-file="${LOGFILE[munged]}" --seed-file="$MUNGE_DIR/munged.seed" \
        --key-file="$MUNGE_KEY" ||
        { log_tails; die "munged failed to start"; }
    wait_for_pid munged 15
    # munge round trip through our socket
    local i
    for i in $(seq 1 50); do
        munge -n --socket="$MUNGE_SOCKET" 2>/dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    log_tails
    die "munged runs but munge/unmunge through $MUNGE_SOCKET fails"
}

wait_for_pid() {  # wait_for_pid NAME SECONDS
    local name="$1" deadline=$((SECONDS + $2))
    until our_pid "$name" >/dev/null; do
        if ((SECONDS >= deadline)); then log_tails; die "$name did not start (no live PID in ${PIDFILE[$name]})"; fi
        sleep 0.2
    done
}

start_slurmctld() {
    our_pid slurmctld >/dev/null && return 0
    rm -f "${PIDFILE[slurmctld]}"
    slurmctld -f "$CONF" || { log_tails; die "slurmctld failed to start"; }
    wait_for_pid slurmctld 20
}

start_slurmd() {  # start_slurmd DAEMON (slurmd, or slurmd@NODE)
    our_pid "$1" >/dev/null && return 0
    rm -f "${PIDFILE[$1]}"
    mkdir -p "$STATE_DIR/spool/slurmd$( ((${#NODES[@]} == 1)) || echo "-${NODE_OF[$1]}")"
    slurmd -f "$CONF" -N "${NODE_OF[$1]}" || { log_tails; die "slurmd of node ${NODE_OF[$1]} failed to start"; }
    wait_for_pid "$1" 20
}

wait_until_usable() {
    # sinfo may report the node idle before slurmd has registered: only a real job step counts.
    local deadline=$((SECONDS + START_TIMEOUT)) out
    while :; do
        if scontrol ping >/dev/null 2>&1 &&
            out="$(timeout 20 srun --quiet -N"${#NODES[@]}" -n"${#NODES[@]}" -t 1 -J local_cluster_check \
                bash -c 'echo "$SLURMD_NODENAME"' 2>&1 | tr '\n' ' ')"; then
            log "srun works (ran on ${out})"
            return 0
        fi
        if ((SECONDS >= deadline)); then
            log "last srun output: ${out:-<none>}"
            sinfo -N -l >&2 2>/dev/null || true
            log_tails
            die "cluster not usable after ${START_TIMEOUT}s"
        fi
        # a node that slurmctld rejected (e.g. configured CPUs/gres it does not have) never
        # becomes usable: fail now with the reason instead of at the timeout
        local state
        state="$(sinfo -h -N -n "$(node_list)" -o '%N|%T|%E' 2>/dev/null | grep '|inval' | head -n1 || true)"
        if [[ -n "$state" ]]; then
            log_tails
            die "node ${state%%|*} rejected by slurmctld: ${state##*|}"
        fi
        sleep 1
    done
}

cmd_start() {
    local t0=$SECONDS n
    n="$(running_count)"
    if ((n == ${#DAEMONS[@]})); then
        log "already running (state dir $STATE_DIR, node(s) $(node_list))"
        print_env
        return 0
    fi
    [[ "$(id -u)" == 0 ]] || unavailable "must be root to start the local SLURM cluster (uid $(id -u))"
    mkdir -p "$STATE_DIR"
    chmod 0755 "$STATE_DIR"
    install_packages
    id munge >/dev/null 2>&1 || unavailable "no 'munge' user (munge package broken?)"
    ensure_munge_key

    if ((n == 0)); then
        # fresh start: new config (the nodes LOCAL_SLURM_NODES asks for), empty job state (job ids
        # restart at 1), rotated logs
        configured_nodes
        rm -rf "$STATE_DIR/spool"
        mkdir -p "$STATE_DIR/spool/ctld" "$LOG_DIR" "$PID_DIR" "$MUNGE_DIR"
        local f
        for f in "$LOG_DIR"/*.log "${LOGFILE[munged]}" "$STATE_DIR/jobcomp.txt"; do
            if [[ -f "$f" ]]; then mv -f "$f" "$f.old"; fi
        done
        write_config
    else
        log "$n of ${#DAEMONS[@]} daemons running; starting the missing ones"
    fi
    chown munge:munge "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"

    start_munged
    start_slurmctld
    local d
    for d in "${DAEMONS[@]}"; do
        if [[ "$d" == slurmd* ]]; then start_slurmd "$d"; fi
    done
    wait_until_usable
    log "started in $((SECONDS - t0))s; state dir $STATE_DIR; partition '$PARTITION', node(s) $(node_list)"
    log "use it with:  eval \"\$($0 env)\"   (sets SLURM_CONF)"
    print_env
}

cancel_jobs() {
    # Jobs of this cluster would outlive slurmd (slurmstepd keeps running): cancel them first.
    our_pid slurmctld >/dev/null && our_pid munged >/dev/null || return 0
    local jobs deadline=$((SECONDS + 15))
    jobs="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')" || return 0
    [[ -n "${jobs// /}" ]] || return 0
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    while [[ -n "$(squeue -h -o %A 2>/dev/null)" ]] && ((SECONDS < deadline)); do sleep 0.5; done
}

cmd_stop() {
    local d pid pids=() names=()
    cancel_jobs
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d="${DAEMONS[$i]}"
        if pid="$(our_pid "$d")"; then
            log "stopping $d (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$d")
        else
            log "$d not running (by this script in $STATE_DIR)"
        fi
    done
    # wait for them to exit; SIGKILL after 20 s
    local deadline=$((SECONDS + 20)) alive
    while :; do
        alive=()
        for i in "${!pids[@]}"; do
            [[ -d "/proc/${pids[$i]}" ]] && alive+=("$i")
        done
        ((${#alive[@]} == 0)) && break
        if ((SECONDS >= deadline)); then
            for i in "${alive[@]}"; do
                log "${names[$i]} (pid ${pids[$i]}) still alive after 20 s; SIGKILL"
                kill -KILL "${pids[$i]}" 2>/dev/null || true
            done
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    for d in "${DAEMONS[@]}"; do rm -f "${PIDFILE[$d]}"; done
    log "stopped"
}

cmd_status() {
    local d pid rc=0
    for d in "${DAEMONS[@]}"; do
        if pid="$(our_pid "$d")"; then
            echo "$d: running (pid $pid)"
        else
            echo "$d: not running"
            rc=1
        fi
    done
    echo "state dir: $STATE_DIR"
    if ((rc == 0)); then
        echo "SLURM_CONF=$CONF"
        sinfo -N -l 2>&1 || rc=1
    fi
    return "$rc"
}

main() {
    existing_nodes
    case "${1:-}" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        env) print_env ;;
        *)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
            exit 2
            ;;
    esac
}

main "$@"

#!/usr/bin/env bash
# launch/torchrun.sh: run ONE dtrain peer, as a torchrun job of one or more nodes, or as one plain process.
#
#   launch/torchrun.sh [options] [hydra overrides...]
#
# Several such jobs (in different clusters, clouds, containers) that name the same coordinator form
# one dtrain run. Every setting comes from an option or from the environment (options win):
#
#   --nnodes N            NNODES            nodes in this peer (default 1)
#   --nproc-per-node N    NPROC_PER_NODE    ranks on this node (default 1; 1 node x 1 rank: no torchrun at all)
#   --node-rank R         NODE_RANK         this node's rank (optional: the c10d rendezvous assigns one)
#   --rdzv-endpoint H:P   RDZV_ENDPOINT     rendezvous of a multi-node peer (host:port on one of its nodes)
#   --rdzv-id ID          RDZV_ID           rendezvous id (default dtrain-<peer id>)
#                         RDZV_BACKEND      default c10d
#   --coordinator H:P     DTRAIN_COORDINATOR  join this coordinator (adds outer=diloco unless outer= is given)
#   --peer-id ID          DTRAIN_PEER_ID    stable peer id (default with a coordinator: this host's name;
#                                           required for a multi-node peer)
#   --run-dir DIR         DTRAIN_RUN_DIR    checkpoints and metrics (default with a coordinator: runs/<peer id>;
#                                           a multi-node peer needs it on a shared filesystem)
#                         DTRAIN_TOKEN      the run's token: read by dtrain itself, never put on a command line
#                         DTRAIN_TOKEN_FILE a file whose first line is this peer's token (its own identity token,
#                                           from dtrain-certs with a cluster secret): passed on as DTRAIN_TOKEN
#                         DTRAIN_IDENTITY_DIR
#                                           this peer's identity from a dtrain-certs directory, by its peer id:
#                                           <id>.pem / <id>.key (DTRAIN_TLS_CERT / _KEY; then ca.pem is
#                                           DTRAIN_TLS_CA and DTRAIN_TLS_CLIENT_CA) and <id>.token
#                                           (DTRAIN_TOKEN_FILE, unless DTRAIN_TOKEN is set), each unless set
#                         DTRAIN_BIND_HOST  data-plane bind address (control.host; e.g. 0.0.0.0)
#                         DTRAIN_DATA_PORT  data-plane port (control.port; 0: the OS picks)
#                         DTRAIN_ADVERTISE  host[:port] other peers use to reach this one (control.advertise;
#                                           a bare host gets DTRAIN_DATA_PORT)
#                         DTRAIN_REGION     control.region
#                         DTRAIN_TLS_CA, DTRAIN_TLS_CERT, DTRAIN_TLS_KEY, DTRAIN_TLS_SERVER_NAME  control.tls.*
#                         DTRAIN_TLS_CLIENT_CA  control.tls.client_ca: mutual TLS on this peer's Peer service
#                                           (other peers' calls are bound to their certificates' peer ids)
#   --dry-run             DRY_RUN=1         print the command (one shell-quoted line) and exit 0
#                         TORCHRUN, DTRAIN_TRAIN  the torchrun and dtrain-train commands (defaults: on PATH)
#
# A peer started again on the same run dir resumes: resume=true is added when
# <run dir>/checkpoints/latest.pt exists. An override given on the command line (peer_id=, run_dir=,
# resume=, outer=, control.*=) always wins over the value this script would add.
#
# SIGTERM / SIGINT: the peer leaves the run gracefully (finishes its step, Leave, checkpoint, exit 0).
# One process: it is exec'd, so it gets the signal itself. A torchrun job: the signal is passed to the
# workers (the children of the torchrun agent), so that they leave and the agent then exits 0; the
# agent runs in a session of its own, so Ctrl-C in a terminal does not reach it directly. A signal that
# comes before the agent has started all its workers stops the agent instead (it stops those it has
# started and exits non-zero).
#
# Exit status: that of the peer; 2 for a bad option or environment value (one line on stderr).
set -euo pipefail

PROG=torchrun.sh
die() { echo "$PROG: error: $*" >&2; exit 2; }
is_posint() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
is_hostport() { [[ $1 =~ ^[^[:space:]:]+:[0-9]+$ || $1 =~ ^\[[0-9a-fA-F:.]+\]:[0-9]+$ ]]; }

# ---------------------------------------------------------------- options
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --nnodes|--nproc-per-node|--node-rank|--rdzv-endpoint|--rdzv-id|--coordinator|--peer-id|--run-dir)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case $1 in
        --nnodes) NNODES=$2 ;;
        --nproc-per-node) NPROC_PER_NODE=$2 ;;
        --node-rank) NODE_RANK=$2 ;;
        --rdzv-endpoint) RDZV_ENDPOINT=$2 ;;
        --rdzv-id) RDZV_ID=$2 ;;
        --coordinator) DTRAIN_COORDINATOR=$2 ;;
        --peer-id) DTRAIN_PEER_ID=$2 ;;
        --run-dir) DTRAIN_RUN_DIR=$2 ;;
      esac
      shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    -*) die "unknown option '$1' (see $0 --help; Hydra overrides are key=value)" ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done

NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
TORCHRUN=${TORCHRUN:-torchrun}
DTRAIN_TRAIN=${DTRAIN_TRAIN:-dtrain-train}
DRY_RUN=${DRY_RUN:-0}

is_posint "$NNODES" || die "NNODES='$NNODES' is not allowed: a positive integer (nodes in this peer)"
is_posint "$NPROC_PER_NODE" \
  || die "NPROC_PER_NODE='$NPROC_PER_NODE' is not allowed: a positive integer (ranks on this node)"
if [[ -n ${NODE_RANK:-} ]]; then
  [[ $NODE_RANK =~ ^[0-9]+$ && $NODE_RANK -lt $NNODES ]] \
    || die "NODE_RANK='$NODE_RANK' is not allowed: an integer in 0..$((NNODES - 1))"
fi
[[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN='$DRY_RUN' is not allowed: 0 or 1"

# Until the agent has started, this script runs no command substitution and no other command it waits
# for: a SIGINT sent to this script alone while it waits for such a child that then exits normally is
# dropped by bash (it takes the child to have handled it), trap or no trap, and the agent would then be
# started and never stopped. Hence GIVEN below, not $(given ...).

# the value of an override the user gave (key=value, +key=value, ++key=value) in GIVEN; status 1 if none
given() {
  local a
  GIVEN=
  for a in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
    a=${a#+}; a=${a#+}
    if [[ $a == "$1="* ]]; then GIVEN=${a#*=}; return 0; fi
  done
  return 1
}
ADDED=()
add() { given "$1" || ADDED+=("$1=$2"); }  # ours, unless the user set the key

# ---------------------------------------------------------------- the peer's identity and run dir
COORD=${DTRAIN_COORDINATOR:-}
if [[ -n $COORD ]]; then
  is_hostport "$COORD" || die "DTRAIN_COORDINATOR='$COORD' is not allowed: host:port of the coordinator"
  if ! given outer; then ADDED+=("outer=diloco"); fi
  add control.coordinator "$COORD"
fi
given peer_id || true
PEER_ID=${GIVEN:-${DTRAIN_PEER_ID:-}}
if [[ -z $PEER_ID && -n $COORD ]]; then
  [[ $NNODES == 1 ]] \
    || die "DTRAIN_PEER_ID='' is not allowed for a $NNODES-node peer: give the peer's id (the same on every node)"
  PEER_ID=${HOSTNAME:-$(uname -n)}  # bash sets HOSTNAME: uname only if the environment empties it
  PEER_ID=${PEER_ID%%.*}
  PEER_ID=${PEER_ID//[^A-Za-z0-9._-]/-}
fi
if [[ -n $PEER_ID ]]; then
  [[ $PEER_ID =~ ^[A-Za-z0-9._-]+$ ]] \
    || die "DTRAIN_PEER_ID='$PEER_ID' is not allowed: letters, digits, '-', '_' and '.' only"
  add peer_id "$PEER_ID"
fi
given run_dir || true
RUN_DIR=${GIVEN:-${DTRAIN_RUN_DIR:-}}
if [[ -z $RUN_DIR && -n $COORD ]]; then RUN_DIR=runs/$PEER_ID; fi
if [[ -n $RUN_DIR ]]; then
  add run_dir "$RUN_DIR"
  if [[ -f $RUN_DIR/checkpoints/latest.pt ]] && ! given resume; then
    echo "$PROG: $RUN_DIR/checkpoints/latest.pt exists: resuming (resume=true)" >&2
    ADDED+=("resume=true")
  fi
fi

# ---------------------------------------------------------------- the peer's credentials (per-peer identity)
if [[ -n ${DTRAIN_IDENTITY_DIR:-} ]]; then
  DIR=$DTRAIN_IDENTITY_DIR
  [[ -d $DIR ]] || die "DTRAIN_IDENTITY_DIR='$DIR' is not allowed: not a directory"
  [[ -n $PEER_ID ]] \
    || die "DTRAIN_IDENTITY_DIR='$DIR' is not allowed without a peer id: its files are named after it (DTRAIN_PEER_ID)"
  FOUND=
  if [[ -f $DIR/$PEER_ID.pem ]]; then
    FOUND=1
    DTRAIN_TLS_CERT=${DTRAIN_TLS_CERT:-$DIR/$PEER_ID.pem}
    DTRAIN_TLS_KEY=${DTRAIN_TLS_KEY:-$DIR/$PEER_ID.key}
    if [[ -f $DIR/ca.pem ]]; then
      DTRAIN_TLS_CA=${DTRAIN_TLS_CA:-$DIR/ca.pem}
      DTRAIN_TLS_CLIENT_CA=${DTRAIN_TLS_CLIENT_CA:-$DIR/ca.pem}
    fi
  fi
  if [[ -f $DIR/$PEER_ID.token ]]; then
    FOUND=1
    if [[ -z ${DTRAIN_TOKEN:-} ]]; then DTRAIN_TOKEN_FILE=${DTRAIN_TOKEN_FILE:-$DIR/$PEER_ID.token}; fi
  fi
  [[ -n $FOUND ]] || die "DTRAIN_IDENTITY_DIR='$DIR' is not allowed: it holds neither $PEER_ID.pem nor $PEER_ID.token" \
    "(issue them: dtrain-certs clients=[$PEER_ID], with DTRAIN_SECRET set for the token)"
fi
if [[ -n ${DTRAIN_TOKEN_FILE:-} ]]; then
  [[ -z ${DTRAIN_TOKEN:-} ]] || die "DTRAIN_TOKEN_FILE='$DTRAIN_TOKEN_FILE' is not allowed with DTRAIN_TOKEN set: give one"
  [[ -f $DTRAIN_TOKEN_FILE && -r $DTRAIN_TOKEN_FILE ]] \
    || die "DTRAIN_TOKEN_FILE='$DTRAIN_TOKEN_FILE' is not allowed: not a readable file"
  IFS= read -r DTRAIN_TOKEN < "$DTRAIN_TOKEN_FILE" || true  # a last line without a newline still counts
  DTRAIN_TOKEN=${DTRAIN_TOKEN%$'\r'}
  [[ -n $DTRAIN_TOKEN ]] || die "DTRAIN_TOKEN_FILE='$DTRAIN_TOKEN_FILE' is not allowed: its first line is empty"
  export DTRAIN_TOKEN  # the environment, never the command line
fi

# ---------------------------------------------------------------- data plane and TLS
if [[ -n ${DTRAIN_BIND_HOST:-} ]]; then add control.host "$DTRAIN_BIND_HOST"; fi
if [[ -n ${DTRAIN_DATA_PORT:-} ]]; then
  [[ $DTRAIN_DATA_PORT =~ ^[0-9]+$ && $DTRAIN_DATA_PORT -le 65535 ]] \
    || die "DTRAIN_DATA_PORT='$DTRAIN_DATA_PORT' is not allowed: a port number 0..65535"
  add control.port "$DTRAIN_DATA_PORT"
fi
if [[ -n ${DTRAIN_ADVERTISE:-} ]]; then
  ADV=$DTRAIN_ADVERTISE
  if ! is_hostport "$ADV"; then
    [[ ${DTRAIN_DATA_PORT:-0} != 0 ]] \
      || die "DTRAIN_ADVERTISE='$ADV' is not allowed without a port: give host:port, or a fixed DTRAIN_DATA_PORT"
    ADV=$ADV:$DTRAIN_DATA_PORT
  fi
  add control.advertise "$ADV"
fi
if [[ -n ${DTRAIN_REGION:-} ]]; then add control.region "$DTRAIN_REGION"; fi
for pair in ca:DTRAIN_TLS_CA cert:DTRAIN_TLS_CERT key:DTRAIN_TLS_KEY client_ca:DTRAIN_TLS_CLIENT_CA \
            server_name:DTRAIN_TLS_SERVER_NAME; do
  var=${pair#*:}
  if [[ -n ${!var:-} ]]; then
    if [[ $var != DTRAIN_TLS_SERVER_NAME && ! -r ${!var} ]]; then
      die "$var='${!var}' is not allowed: not a readable file"
    fi
    add "control.tls.${pair%%:*}" "${!var}"
  fi
done

ARGS=(${ADDED[@]+"${ADDED[@]}"} ${OVERRIDES[@]+"${OVERRIDES[@]}"})

# ---------------------------------------------------------------- the command
if [[ $NNODES == 1 && $NPROC_PER_NODE == 1 ]]; then
  CMD=("$DTRAIN_TRAIN" ${ARGS[@]+"${ARGS[@]}"})
elif [[ $NNODES == 1 && -z ${RDZV_ENDPOINT:-} ]]; then
  CMD=("$TORCHRUN" --standalone --nproc-per-node "$NPROC_PER_NODE" -m dtrain.cli.train ${ARGS[@]+"${ARGS[@]}"})
else
  [[ -n ${RDZV_ENDPOINT:-} ]] \
    || die "RDZV_ENDPOINT='' is not allowed for a $NNODES-node peer: host:port on one of its nodes"
  is_hostport "$RDZV_ENDPOINT" || die "RDZV_ENDPOINT='$RDZV_ENDPOINT' is not allowed: host:port"
  CMD=("$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE"
       --rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-dtrain-${PEER_ID:-peer}}")
  if [[ -n ${NODE_RANK:-} ]]; then CMD+=(--node-rank "$NODE_RANK"); fi
  CMD+=(-m dtrain.cli.train ${ARGS[@]+"${ARGS[@]}"})
fi

if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${CMD[@]}" | sed 's/ $//'
  echo
  exit 0
fi

if [[ ${CMD[0]} == "$DTRAIN_TRAIN" ]]; then
  exec "${CMD[@]}"  # one process: signals reach it directly
fi

# a torchrun job: keep the agent out of our process group and pass SIGTERM / SIGINT to its workers
# the PIDs of the torchrun workers among the children of process $1 (torchrun gives each LOCAL_RANK), in
# WORKERS (no command substitution: see GIVEN above)
# shellcheck disable=SC2317  # called from the signal trap
workers_of() {
  local f line rest ppid pid kv
  WORKERS=()
  for f in /proc/[0-9]*/stat; do
    { read -r line < "$f"; } 2>/dev/null || continue
    rest=${line##*) }
    read -r _ ppid _ <<< "$rest"
    [[ $ppid == "$1" ]] || continue
    pid=${f#/proc/}; pid=${pid%/stat}
    { while IFS= read -r -d '' kv; do
        if [[ $kv == LOCAL_RANK=* ]]; then WORKERS+=("$pid"); break; fi
      done < "/proc/$pid/environ"; } 2>/dev/null || true
  done
}
AGENT=
PENDING=  # a signal that came before the agent's PID was known
# shellcheck disable=SC2317  # the signal trap
on_signal() {
  if [[ -n $AGENT ]]; then leave "$1"; else PENDING=$1; fi
}
# The workers leave on SIGTERM and the agent then exits 0, but only once all of them have: asking only
# those already started would leave the agent waiting on the rest. So until the agent has started all
# NPROC_PER_NODE workers, the agent itself is stopped: like torchrun, it stops those it has started.
# shellcheck disable=SC2317  # called from the signal trap
leave() {
  local WORKERS
  workers_of "$AGENT"
  if [[ ${#WORKERS[@]} -ge $NPROC_PER_NODE ]]; then
    echo "$PROG: $1: asking the workers to leave the run (${WORKERS[*]})" >&2
    kill -TERM "${WORKERS[@]}" 2>/dev/null || true
  else
    echo "$PROG: $1: ${#WORKERS[@]} of $NPROC_PER_NODE workers started: stopping the torchrun agent" >&2
    kill -TERM "$AGENT" 2>/dev/null || true
  fi
}
# traps first: a signal that comes while the agent starts must not kill this script and orphan the agent
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT
if command -v setsid >/dev/null; then
  setsid "${CMD[@]}" &
else
  "${CMD[@]}" &
fi
AGENT=$!
if [[ -n $PENDING ]]; then leave "$PENDING"; fi
status=0
while true; do
  wait "$AGENT" && status=0 || status=$?
  # above 128: a trapped signal may have interrupted the wait while the agent still runs
  if [[ $status -le 128 ]]; then break; fi
  if ! kill -0 "$AGENT" 2>/dev/null; then
    if wait "$AGENT"; then status=0; else s=$?; [[ $s == 127 ]] || status=$s; fi  # 127: already collected
    break
  fi
done
exit "$status"

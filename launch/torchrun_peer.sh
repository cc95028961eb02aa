#!/usr/bin/env bash
# Run one dtrain peer as a torchrun job on this machine (the short form of launch/torchrun.sh).
#   launch/torchrun_peer.sh NPROC [hydra overrides...]
#   launch/torchrun_peer.sh 2 run_dir=runs/peer0 steps=600
# Multi-node peers, a coordinator, TLS, resume: see launch/torchrun.sh --help (the same environment
# variables apply: NNODES, RDZV_ENDPOINT, DTRAIN_COORDINATOR, DTRAIN_PEER_ID, ...).
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NPROC [overrides...]  (NPROC: processes on this node, a positive integer)" >&2
  exit 2
fi
NPROC_PER_NODE=$1; shift
export NPROC_PER_NODE
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" "$@"

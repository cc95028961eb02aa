#!/usr/bin/env bash
# Run one dtrain peer as a torchrun job on this machine.
#   launch/torchrun_peer.sh NPROC [hydra overrides...]
#   launch/torchrun_peer.sh 2 run_dir=runs/peer0 steps=600
# Multi-node peers: set NNODES, NODE_RANK and RDZV_ENDPOINT (host:port of node 0).
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NPROC [overrides...]  (NPROC: processes on this node, a positive integer)" >&2
  exit 2
fi
NPROC=$1; shift
NNODES=${NNODES:-1}
if [[ "$NNODES" == 1 ]]; then
  exec torchrun --standalone --nproc-per-node "$NPROC" -m dtrain.cli.train "$@"
fi
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of node 0 for a multi-node peer}"
exec torchrun --nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-dtrain-peer}" \
  -m dtrain.cli.train "$@"

#!/bin/bash
# Multi-host training on a Cloud TPU VM pod slice: the same command on every worker at once
# (`gcloud compute tpus tpu-vm ssh --worker=all`); JAX discovers the slice itself (TPU metadata:
# worker hostnames and ids), via jaxlm.distributed.initialize_distributed().
#
#   tpu_gpu_launch/tpu_vm_pod.sh TPU_NAME ZONE GIN_FILE WORKDIR [--gin.KEY=value ...]
#   e.g. tpu_gpu_launch/tpu_vm_pod.sh my-v5e-256 us-west4-a jaxlm/configs/llama_7b_finetune.gin \
#        /mnt/shared/runs/llama7b --gin.train.mesh_shape="'data=8,fsdp=32'"
#
# Before the first run, sync the repo to every worker (JAXLM_SYNC=1 does it with scp) and install
# the pinned environment there (requirements.lock; jax[tpu]). WORKDIR must be a shared filesystem
# (NFS, or a bucket mounted with gcsfuse; gs:// URLs are refused): every host writes its shards of each checkpoint. Check the plan first:
#   jaxlm plan --gin_file GIN_FILE --mesh data=8,fsdp=32 --platform tpu
set -euo pipefail
TPU_NAME=${1:?usage: tpu_vm_pod.sh TPU_NAME ZONE GIN_FILE WORKDIR [--gin.KEY=value ...]}
ZONE=${2:?zone}
GIN_FILE=${3:?gin file}
WORKDIR=${4:?workdir}
shift 4
REMOTE_REPO=${JAXLM_REMOTE_REPO:-jaxlm}
PYTHON=${JAXLM_PYTHON:-python3}
LOCAL_REPO=$(cd "$(dirname "$0")/.." && pwd)

if [[ "${JAXLM_SYNC:-0}" == "1" ]]; then
  gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$ZONE" "$LOCAL_REPO" "$TPU_NAME:$REMOTE_REPO"
fi

# Quote every extra argument for the remote shell (gin values contain quotes).
EXTRA=""
for arg in "$@"; do EXTRA+=" $(printf '%q' "$arg")"; done

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e; cd $REMOTE_REPO
  export PYTHONPATH=\$PWD\${PYTHONPATH:+:\$PYTHONPATH}
  $PYTHON -m jaxlm.launch train --gin_file $(printf '%q' "$GIN_FILE") --workdir $(printf '%q' "$WORKDIR")$EXTRA
"

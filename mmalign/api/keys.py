"""Names on the trainer pods that the operator writes and the trainer (or the operator's own watch) reads:
labels, annotations and environment variables."""

from __future__ import annotations

# -- labels on every object the operator makes (values cut to 63 characters, like names)
LABEL_JOB = "mmalign.io/job"
LABEL_STAGE = "mmalign.io/stage"
LABEL_ATTEMPT = "mmalign.io/attempt"
LABEL_NODE_RANK = "mmalign.io/node-rank"

# -- Kueue's pod-group integration (a job labelled with a queue gets its gangs admitted whole)
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"  # an annotation

# -- the torchrun conventions (Kubeflow's PET_* and torch.distributed's MASTER_*): `mmalign launch` reads them
ENV_NNODES = "PET_NNODES"
ENV_NPROC_PER_NODE = "PET_NPROC_PER_NODE"
ENV_NODE_RANK = "PET_NODE_RANK"
ENV_MASTER_ADDR = "PET_MASTER_ADDR"
ENV_MASTER_PORT = "PET_MASTER_PORT"
ENV_TORCH_MASTER_ADDR = "MASTER_ADDR"
ENV_TORCH_MASTER_PORT = "MASTER_PORT"

# -- who the pod is (for logs and for people reading `kubectl describe pod`)
ENV_JOB = "MMALIGN_JOB"
ENV_STAGE = "MMALIGN_STAGE"
ENV_ATTEMPT = "MMALIGN_ATTEMPT"

# -- where the trainer writes on the node: downloads (models, data) and node-local scratch (shards,
# exports). The operator points both into the pod's scratch emptyDir.
ENV_CACHE = "MMALIGN_CACHE"
ENV_LOCAL_DIR = "MMALIGN_LOCAL_DIR"

# -- "1": run a GPU-shaped job (GPU requests, or bf16) on CPU anyway; the trainer refuses otherwise
ENV_ALLOW_CPU = "MMALIGN_ALLOW_CPU"

# -- where the trainer writes its one-line failure reason; unset = Kubernetes' /dev/termination-log
# (the dev cluster's process node gives each container start a file of its own).
ENV_TERMINATION_LOG = "MMALIGN_TERMINATION_LOG"

# -- how long torchrun's static rendezvous waits for the whole gang (spec.runPolicy.startupTimeoutSeconds)
ENV_RENDEZVOUS_TIMEOUT = "MMALIGN_RENDEZVOUS_TIMEOUT_SECONDS"

# -- the trainer's Prometheus endpoint (trainer/prom.py): rank 0 serves /metrics on this port when the env
# names it (the operator sets it; a local run serves nothing); the pod's container port of that name.
ENV_METRICS_PORT = "MMALIGN_METRICS_PORT"
TRAINER_METRICS_PORT = 9464
TRAINER_METRICS_PORT_NAME = "metrics"

# The operator owns these: the spec refuses podTemplate.env entries naming them (a wrong PET_NODE_RANK would
# hang the rendezvous).
RESERVED_ENV = (
    ENV_NNODES, ENV_NPROC_PER_NODE, ENV_NODE_RANK, ENV_MASTER_ADDR, ENV_MASTER_PORT,
    ENV_TORCH_MASTER_ADDR, ENV_TORCH_MASTER_PORT, ENV_JOB, ENV_STAGE, ENV_ATTEMPT, ENV_RENDEZVOUS_TIMEOUT,
)

# -- annotations on the job document the operator writes into the ConfigMap (mmalign.api.jobfile)
ANNOTATION_OPERATOR_VERSION = "mmalign.io/operator-version"
ANNOTATION_JOB_FILE_FORMAT = "mmalign.io/job-file-format"

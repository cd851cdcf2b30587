{{/*
The operator's permissions: exactly the API calls `mmalign operator` makes, no more. They mirror
manifests/rbac/ (the operator's own list), and tests/unit/test_chart_render.py fails when the two drift.
Rules on namespaced resources go into a ClusterRole (all namespaces) or into a Role in each watched
namespace; nothing cluster-scoped is needed except the ClusterKopfPeering in cluster-wide mode.
*/}}

{{/* Namespaced resources the operator reads and writes wherever it watches AlignmentJobs. */}}
{{- define "mmalign.rbac.jobRules" -}}
# Watch AlignmentJobs; kopf patches its finalizer and progress annotations onto them; the operator
# deletes a finished job when its ttlSecondsAfterFinished runs out.
- apiGroups: ["mmalign.io"]
  resources: ["alignmentjobs"]
  verbs: ["list", "watch", "patch", "delete"]
# The status the operator computes, written by server-side apply to the status subresource.
- apiGroups: ["mmalign.io"]
  resources: ["alignmentjobs/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion: true; clusters with the
# OwnerReferencesPermissionEnforcement admission plugin require this to set it.
- apiGroups: ["mmalign.io"]
  resources: ["alignmentjobs/finalizers"]
  verbs: ["update"]
# The gang of each stage: watched (by label), server-side applied (create + patch), confirmed with
# a GET when the watch misses one, deleted as a whole on restart, suspend and cleanup.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Rank 0's progress lines travel through its log.
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# The headless Service (rendezvous DNS): server-side applied, deleted after the job.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "patch", "delete"]
# The ConfigMap holding the job spec for the trainer: read back to spot a changed spec, applied, deleted.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch", "delete"]
# An Event for every transition (and kopf's warnings).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# runPolicy.gangScheduling: the gang's PodGroup (Volcano, scheduler-plugins), applied before its pods
# and deleted with them.
- apiGroups: ["scheduling.volcano.sh", "scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["create", "patch", "delete"]
{{- end }}

{{/*
kopf peering: read the peers' heartbeats, write our own. `create`: `mmalign operator --peering`
creates the object when it is missing (the chart creates it first; the operator then gets a 409).
*/}}
{{- define "mmalign.rbac.clusterPeeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch", "create", "patch"]
{{- end }}

{{- define "mmalign.rbac.namespacedPeeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "create", "patch"]
{{- end }}

{{/*
The operator's permissions: exactly the API calls `mmalign operator` makes, no more. They mirror
manifests/rbac/ (the operator's own list), and tests/unit/test_chart_rbac.py fails when the two drift.
Rules on namespaced resources go into a ClusterRole (all namespaces) or into a Role in each watched
namespace; nothing cluster-scoped is needed except the ClusterKopfPeering in cluster-wide mode.
*/}}

{{/* Namespaced resources the operator reads and writes wherever it watches AlignmentJobs. */}}
{{- define "mmalign.rbac.jobRules" -}}
# Watch AlignmentJobs; kopf patches its finalizer and progress annotations on the object.
- apiGroups: ["mmalign.io"]
  resources: ["alignmentjobs"]
  verbs: ["get", "list", "watch", "patch"]
# The status the operator computes, written through the status subresource.
- apiGroups: ["mmalign.io"]
  resources: ["alignmentjobs/status"]
  verbs: ["get", "patch"]
# The gang of each stage: one pod per node, applied server-side, deleted as a whole on restart.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete", "deletecollection"]
# Rank 0's progress lines travel through its log.
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# The headless Service (rendezvous DNS) and the ConfigMap holding the job spec for the trainer.
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# An Event for every transition (kopf posts its handler events here too).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
kopf peering: read the peers' heartbeats, write our own. `create`: `mmalign operator --peering`
creates the object when it is missing (the chart creates it first; the operator then gets a 409).
*/}}
{{- define "mmalign.rbac.clusterPeeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- end }}

{{- define "mmalign.rbac.namespacedPeeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- end }}

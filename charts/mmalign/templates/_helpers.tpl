{{/*
Names. Kubernetes object names (and label values) are at most 63 characters: a DNS-1123 label,
the limit of Service names and of label values. Every name below is cut to 63 and a trailing "-" is
removed, because a name may not end with one. Names built from these by appending a suffix
(e.g. "<fullname>-metrics") cut the base first, to 63 minus the suffix, for the same reason.
*/}}

{{/* The chart name, or .Values.nameOverride. */}}
{{- define "mmalign.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: "<release>-<chart>", or just the release name when it already
contains the chart name (`helm install mmalign ...` gives "mmalign", not "mmalign-mmalign").
*/}}
{{- define "mmalign.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", with the fullname cut so that the whole stays within 63 characters. */}}
{{- define "mmalign.suffixed" -}}
{{- $base := include "mmalign.fullname" .root }}
{{- printf "%s-%s" ($base | trunc (int (sub 62 (len .suffix))) | trimSuffix "-") .suffix }}
{{- end }}

{{/* "mmalign-0.1.0": the chart label (a "+" in a SemVer build suffix is not allowed in labels). */}}
{{- define "mmalign.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the operator's pods. They never change after install: a Deployment's selector
is immutable, so nothing version-dependent goes here.
*/}}
{{- define "mmalign.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mmalign.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object the chart makes. */}}
{{- define "mmalign.labels" -}}
helm.sh/chart: {{ include "mmalign.chart" . }}
{{ include "mmalign.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mmalign
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator's ServiceAccount: the one the chart creates, or one the user names. */}}
{{- define "mmalign.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mmalign.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The one image, for the operator and (by default) the trainer: digest wins over tag. */}}
{{- define "mmalign.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The operator's image: operator.image, each empty field taken from `image`. A repository of its own
   does not inherit the tag or digest of `image` (they name another image): its tag defaults to appVersion. */}}
{{- define "mmalign.operatorImage" -}}
{{- $own := .Values.operator.image | default dict }}
{{- if not $own.repository }}
{{- if $own.digest }}
{{- printf "%s@%s" .Values.image.repository $own.digest }}
{{- else if $own.tag }}
{{- printf "%s:%s" .Values.image.repository $own.tag }}
{{- else }}
{{- include "mmalign.image" . }}
{{- end }}
{{- else if $own.digest }}
{{- printf "%s@%s" $own.repository $own.digest }}
{{- else }}
{{- printf "%s:%s" $own.repository (default .Chart.AppVersion $own.tag) }}
{{- end }}
{{- end }}

{{/* The image AlignmentJobs get when their spec.image is empty. */}}
{{- define "mmalign.trainerImage" -}}
{{- default (include "mmalign.image" .) .Values.trainer.image }}
{{- end }}

{{/* The kopf peering object's name. */}}
{{- define "mmalign.peeringName" -}}
{{- default (include "mmalign.fullname" .) .Values.operator.peering.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* True ("true") when the operator watches every namespace (no list given). */}}
{{- define "mmalign.clusterWide" -}}
{{- if not .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
trainer.podDefaults as compact JSON for MMALIGN_POD_DEFAULTS, without the empty fields (nothing at
all when every field is empty), so the operator's environment shows only what was set.
*/}}
{{- define "mmalign.podDefaults" -}}
{{- $set := dict }}
{{- range $key, $value := .Values.trainer.podDefaults }}
{{- if $value }}
{{- $_ := set $set $key $value }}
{{- end }}
{{- end }}
{{- if $set }}
{{- toJson $set }}
{{- end }}
{{- end }}

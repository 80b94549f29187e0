{{/*
The CSI driver's name. kubelet finds the plugin by it, pods name it in their
volumes, and the plugin's socket directory is named after it. strata-csi's
--driver-name defaults to the same value.
*/}}
{{- define "strata.driverName" -}}
strata.csi.dev
{{- end }}

{{/*
The prefix of every object's name: the release name when it already says
"strata", else "<release>-strata". Kept within the 63 characters of a label.
*/}}
{{- define "strata.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 58 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 58 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The node plugin's DaemonSet, ServiceAccount and RBAC objects. */}}
{{- define "strata.nodeName" -}}
{{ include "strata.fullname" . }}-node
{{- end }}

{{/* Labels on every object. */}}
{{- define "strata.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: strata
{{- end }}

{{/* The node plugin's pod selector: fixed for the life of a release. */}}
{{- define "strata.nodeSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end }}

{{/* The node plugin's image reference. */}}
{{- define "strata.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The plugin's socket directory on the node, as kubelet sees it. */}}
{{- define "strata.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ include "strata.driverName" . }}
{{- end }}

{{/*
The name of the chart's own pull-secrets ServiceAccount, in
registries.pullSecretsServiceAccount.namespace.
*/}}
{{- define "strata.pullSecretsName" -}}
{{ include "strata.fullname" . }}-pull-secrets
{{- end }}

{{/*
NAMESPACE/NAME of the ServiceAccount whose imagePullSecrets the plugin reads
(registries.pullSecretsServiceAccount): by default the chart's own, in the
dedicated namespace; a NAME of yours is in that namespace too.
*/}}
{{- define "strata.pullSecretsServiceAccount" -}}
{{- $pull := .Values.registries.pullSecretsServiceAccount -}}
{{- $name := $pull.name | default (include "strata.pullSecretsName" .) -}}
{{- if contains "/" $name }}{{ $name }}{{ else }}{{ $pull.namespace }}/{{ $name }}{{ end -}}
{{- end }}

{{/* Whether credential provider plugins are configured. */}}
{{- define "strata.credentialProviders" -}}
{{- with .Values.registries.credentialProviders.config.providers }}true{{ end -}}
{{- end }}

{{/*
storageCapacity.enabled and .pollInterval, with the chart's defaults when a
release made before they existed is upgraded with --reuse-values (which
keeps that release's values and none of the chart's new defaults).
*/}}
{{- define "strata.storageCapacity.enabled" -}}
{{- dig "storageCapacity" "enabled" true .Values.AsMap -}}
{{- end }}
{{- define "strata.storageCapacity.pollInterval" -}}
{{- dig "storageCapacity" "pollInterval" "1m" .Values.AsMap -}}
{{- end }}

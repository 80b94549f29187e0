{{/* The controller's Deployment, ServiceAccount and RBAC objects. */}}
{{- define "strata.controllerName" -}}
{{ include "strata.fullname" . }}-controller
{{- end }}

{{/* The controller's pod selector: fixed for the life of a release. */}}
{{- define "strata.controllerSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

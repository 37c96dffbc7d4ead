{{- define "redline.name" -}}redline-operator{{- end -}}
{{- define "redline.labels" -}}
app.kubernetes.io/name: redline-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "redline.selector" -}}
app.kubernetes.io/name: redline-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

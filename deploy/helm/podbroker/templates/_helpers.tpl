{{/* Names and labels shared by every template. */}}

{{- define "podbroker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "podbroker.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "podbroker.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "podbroker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "podbroker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end -}}

{{- define "podbroker.labels" -}}
{{ include "podbroker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of objects that are not the broker itself (the helm test pod). */}}
{{- define "podbroker.testLabels" -}}
app.kubernetes.io/name: {{ include "podbroker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "podbroker.testServiceAccount" -}}
{{- printf "%s-test" (include "podbroker.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "podbroker.scheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end -}}
{{- end -}}

{{/* The broker's ServiceAccount username as the API server sees it. */}}
{{- define "podbroker.username" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ .Values.serviceAccount.name }}
{{- end -}}

{{- define "podbroker.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "podbroker.port" -}}
{{- if .Values.tls.enabled }}8443{{ else }}8080{{ end -}}
{{- end -}}

{{/* Cross-field checks the JSON schema cannot express; fail closed with a clear reason. */}}
{{- define "podbroker.validate" -}}
{{- if and (eq .Values.audit.store "sqlite") (gt (int .Values.replicaCount) 1) -}}
{{- fail "audit.store=sqlite keeps the audit database on one ReadWriteOnce volume: set replicaCount=1, or use audit.store=postgresql for several replicas" -}}
{{- end -}}
{{- range .Values.taskNamespaces -}}
{{- if eq . $.Release.Namespace -}}
{{- fail (printf "taskNamespaces must not contain the release namespace %q: the broker can read every Secret in a task namespace, so keep them dedicated" .) -}}
{{- end -}}
{{- if eq . $.Values.airflow.namespace -}}
{{- fail (printf "taskNamespaces must not contain the Airflow namespace %q: task pods would share it with the workers (and the broker could read Airflow's Secrets)" .) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.vault.auth.method "approle") (or (not .Values.vault.auth.approle.roleId) (not .Values.vault.auth.approle.secretIdSecret.name)) -}}
{{- fail "vault.auth.method=approle needs vault.auth.approle.roleId and vault.auth.approle.secretIdSecret.name" -}}
{{- end -}}
{{- if and (eq .Values.vault.auth.method "token") (not .Values.vault.auth.token.secret.name) -}}
{{- fail "vault.auth.method=token needs vault.auth.token.secret.name" -}}
{{- end -}}
{{- if and .Values.metrics.authProxy.enabled (not .Values.tls.enabled) -}}
{{- fail "metrics.authProxy serves HTTPS with the broker's certificate: it needs tls.enabled=true" -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name" -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled .Values.networkPolicy.egress.enabled (not .Values.networkPolicy.egress.apiServer.cidrs) -}}
{{- fail "networkPolicy.egress.enabled needs networkPolicy.egress.apiServer.cidrs (the addresses of `kubectl get endpoints kubernetes`): the broker cannot work without the API server" -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled .Values.networkPolicy.egress.enabled (not .Values.networkPolicy.egress.vault.to) -}}
{{- fail "networkPolicy.egress.enabled needs networkPolicy.egress.vault.to (where Vault runs)" -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled .Values.networkPolicy.egress.enabled (eq .Values.audit.store "postgresql") (not .Values.networkPolicy.egress.auditDatabase.to) -}}
{{- fail "networkPolicy.egress.enabled with audit.store=postgresql needs networkPolicy.egress.auditDatabase.to" -}}
{{- end -}}
{{- if eq (int .Values.metrics.port) (int (include "podbroker.port" .)) -}}
{{- fail "metrics.port must differ from the API port (8443 with TLS, 8080 without)" -}}
{{- end -}}
{{- end -}}

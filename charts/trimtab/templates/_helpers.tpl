{{/*
The name of the chart, or nameOverride.
*/}}
{{- define "trimtab.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, else the release name when it
already contains the chart name, else "<release>-<chart>". Release "trimtab" gives
"trimtab", so the operator's Service is "trimtab-operator".
*/}}
{{- define "trimtab.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The operator's name: Deployment, Service, ServiceAccount, roles.
*/}}
{{- define "trimtab.operator.fullname" -}}
{{- printf "%s-operator" (include "trimtab.fullname" .) }}
{{- end }}

{{- define "trimtab.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trimtab.operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "trimtab.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "trimtab.operator.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{- define "trimtab.loadtestKeySecretName" -}}
{{- printf "%s-loadtest-key" (include "trimtab.operator.fullname" .) }}
{{- end }}

{{- define "trimtab.webhookName" -}}
{{- printf "%s-sidecar-injector" (include "trimtab.fullname" .) }}
{{- end }}

{{- define "trimtab.certificateName" -}}
{{- printf "%s-serving" (include "trimtab.operator.fullname" .) }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "trimtab.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "trimtab.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trimtab
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The operator's labels, and the subset its selectors use (never change these: a
Deployment's selector is immutable).
*/}}
{{- define "trimtab.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trimtab.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "trimtab.operator.labels" -}}
{{ include "trimtab.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
An image reference from {repository, tag, digest}; the tag defaults to appVersion.
*/}}
{{- define "trimtab.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
What both sidecar-injector webhooks share.
*/}}
{{- define "trimtab.webhook.common" -}}
admissionReviewVersions: ["v1"]
sideEffects: None
failurePolicy: {{ .Values.injection.failurePolicy }}
timeoutSeconds: {{ .Values.injection.timeoutSeconds }}
matchPolicy: Equivalent
# Sidecars are added once, on creation; later webhooks' changes do not need us again.
reinvocationPolicy: Never
clientConfig:
  service:
    name: {{ include "trimtab.operator.fullname" . }}
    namespace: {{ .Release.Namespace }}
    path: /mutate-pods
    port: {{ .Values.operator.configPort }}
  # caBundle: written by the operator (or cert-manager's cainjector), never by the
  # chart, so `helm upgrade` and GitOps leave it alone.
rules:
  - operations: ["CREATE"]
    apiGroups: [""]
    apiVersions: ["v1"]
    resources: ["pods"]
    scope: Namespaced
{{- end }}

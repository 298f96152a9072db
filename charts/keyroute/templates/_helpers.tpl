{{/* Names, labels and the few values computed in more than one template. */}}

{{- define "keyroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name: <release>-keyroute, or the release name alone when it already contains the
chart name. Truncated to 63 characters less room for the longest suffix used ("-webhook-tls").
*/}}
{{- define "keyroute.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "keyroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keyroute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "keyroute.labels" -}}
helm.sh/chart: {{ include "keyroute.chart" . }}
{{ include "keyroute.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keyroute
{{- end }}

{{/* The operator pod's selector: the component label keeps it apart from anything else in the release. */}}
{{- define "keyroute.operatorSelectorLabels" -}}
{{ include "keyroute.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "keyroute.serviceAccountName" -}}
{{- default (include "keyroute.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "keyroute.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{- define "keyroute.webhookServiceName" -}}
{{- printf "%s-webhook" (include "keyroute.fullname" .) }}
{{- end }}

{{- define "keyroute.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "keyroute.fullname" .) }}
{{- end }}

{{/* The content of the injection ConfigMap's injection.yaml (also hashed into the pod template). */}}
{{- define "keyroute.injectionConfig" -}}
{{- $inj := .Values.injection -}}
image: {{ $inj.image | default (include "keyroute.image" .) | quote }}
imagePullPolicy: {{ $inj.imagePullPolicy | default .Values.image.pullPolicy | quote }}
mode: {{ $inj.mode | quote }}
missingChain: {{ $inj.missingChain | quote }}
resources:
  {{- toYaml $inj.resources | nindent 2 }}
proxyPort: {{ $inj.proxyPort }}
adminPort: {{ $inj.adminPort }}
logLevel: {{ $inj.logLevel | quote }}
{{- /* Half the API server's patience: a slow ProviderChain lookup ends in "inject with a warning"
       before the API server times the webhook out (and failurePolicy Fail refuses the pod). */}}
lookupTimeoutSeconds: {{ divf .Values.webhook.timeoutSeconds 2 }}
{{- end }}

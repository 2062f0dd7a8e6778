{{/* The chart's name, cut to a DNS label. */}}
{{- define "turbofleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name for every object: <release>-turbofleet, or the release name if it has it. */}}
{{- define "turbofleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "turbofleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: turbofleet
{{- end -}}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "proxy"). */}}
{{- define "turbofleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "turbofleet.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The Secret holding TURBOFLEET_ADMIN_TOKEN, TURBOFLEET_API_KEYS and TURBOFLEET_WORKER_API_KEY. */}}
{{- define "turbofleet.secretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-secrets" (include "turbofleet.fullname" .)) -}}
{{- end -}}

{{/* The registry URL the proxies share. */}}
{{- define "turbofleet.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "turbofleet.fullname" .) -}}
{{- else -}}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* The proxy's in-cluster URL, which the worker agents register with. */}}
{{- define "turbofleet.proxyUrl" -}}
{{- printf "http://%s-proxy:%v" (include "turbofleet.fullname" .) .Values.proxy.service.port -}}
{{- end -}}

{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "cinflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the
chart name. Truncated so that "-infer", "-train", "-retrain" still fit 63 chars
(CronJob names are limited to 52).
*/}}
{{- define "cinflow.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 44 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 44 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 44 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cinflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels of every object.
*/}}
{{- define "cinflow.labels" -}}
helm.sh/chart: {{ include "cinflow.chart" . }}
{{ include "cinflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cinflow
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "cinflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cinflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of one component: include "cinflow.componentLabels" (dict "ctx" $ "component" "infer")
*/}}
{{- define "cinflow.componentLabels" -}}
{{ include "cinflow.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cinflow.componentSelectorLabels" -}}
{{ include "cinflow.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cinflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cinflow.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: include "cinflow.image" (dict "ctx" $ "image" .Values.image.cpu)
*/}}
{{- define "cinflow.image" -}}
{{- $repo := .image.repository }}
{{- with .ctx.Values.image.registry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repo .image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/* Names of the chart's own objects. */}}
{{- define "cinflow.commonConfigName" -}}{{ include "cinflow.fullname" . }}-common{{- end }}
{{- define "cinflow.inferName" -}}{{ include "cinflow.fullname" . }}-infer{{- end }}
{{- define "cinflow.trainName" -}}{{ include "cinflow.fullname" . }}-train{{- end }}
{{- define "cinflow.retrainName" -}}{{ include "cinflow.fullname" . }}-retrain{{- end }}
{{- define "cinflow.generatedSecretName" -}}{{ include "cinflow.fullname" . }}-credentials{{- end }}

{{/*
Which Secret and key hold each credential. A value given explicitly goes into the
chart's Secret; otherwise the existing Secret is used; with neither, the chart fails.
*/}}
{{- define "cinflow.amqpUrlSecret" -}}
{{- if .Values.amqp.auth.url -}}
{{ include "cinflow.generatedSecretName" . }}
{{- else if .Values.amqp.auth.existingSecret -}}
{{ .Values.amqp.auth.existingSecret }}
{{- else -}}
{{ fail "amqp.auth: no broker URL. Create a Secret with the amqp[s]:// URL and set amqp.auth.existingSecret (and amqp.auth.urlKey), or pass amqp.auth.url for the chart to create one." }}
{{- end -}}
{{- end }}

{{- define "cinflow.amqpUrlKey" -}}
{{- if .Values.amqp.auth.url }}amqp-url{{ else }}{{ .Values.amqp.auth.urlKey }}{{ end }}
{{- end }}

{{- define "cinflow.s3ExplicitKeys" -}}
{{- $a := .Values.s3.auth }}
{{- if and $a.accessKeyId $a.secretAccessKey }}true
{{- else if or $a.accessKeyId $a.secretAccessKey }}
{{- fail "s3.auth: set both accessKeyId and secretAccessKey, or neither (and use s3.auth.existingSecret)." }}
{{- end }}
{{- end }}

{{- define "cinflow.s3Secret" -}}
{{- if include "cinflow.s3ExplicitKeys" . -}}
{{ include "cinflow.generatedSecretName" . }}
{{- else if .Values.s3.auth.existingSecret -}}
{{ .Values.s3.auth.existingSecret }}
{{- else -}}
{{ fail "s3.auth: no S3 keys. Create a Secret with the access key id and secret access key and set s3.auth.existingSecret (and the key names), pass s3.auth.accessKeyId and s3.auth.secretAccessKey for the chart to create one, or set s3.auth.enabled=false when the pods get credentials another way (IRSA/web identity)." }}
{{- end -}}
{{- end }}

{{- define "cinflow.s3AccessKeyIdKey" -}}
{{- if include "cinflow.s3ExplicitKeys" . }}s3-access-key-id{{ else }}{{ .Values.s3.auth.accessKeyIdKey }}{{ end }}
{{- end }}

{{- define "cinflow.s3SecretAccessKeyKey" -}}
{{- if include "cinflow.s3ExplicitKeys" . }}s3-secret-access-key{{ else }}{{ .Values.s3.auth.secretAccessKeyKey }}{{ end }}
{{- end }}

{{- define "cinflow.managementUrlSecret" -}}
{{- $m := .Values.autoscaling.keda.management }}
{{- if $m.url -}}
{{ include "cinflow.generatedSecretName" . }}
{{- else if $m.existingSecret -}}
{{ $m.existingSecret }}
{{- else -}}
{{ fail "autoscaling.keda.management: no RabbitMQ management URL. Create a Secret with http[s]://user:password@host:15672/<vhost> and set autoscaling.keda.management.existingSecret (and urlKey), or pass autoscaling.keda.management.url." }}
{{- end -}}
{{- end }}

{{- define "cinflow.managementUrlKey" -}}
{{- if .Values.autoscaling.keda.management.url }}rabbitmq-management-url{{ else }}{{ .Values.autoscaling.keda.management.urlKey }}{{ end }}
{{- end }}

{{/*
Credential environment: the broker URL, plus the S3 keys unless "s3" is false.
include "cinflow.secretEnv" (dict "ctx" $ "s3" true)
*/}}
{{- define "cinflow.secretEnv" -}}
- name: CINFLOW_AMQP_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "cinflow.amqpUrlSecret" .ctx }}
      key: {{ include "cinflow.amqpUrlKey" .ctx }}
{{- if and .s3 .ctx.Values.s3.auth.enabled }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "cinflow.s3Secret" .ctx }}
      key: {{ include "cinflow.s3AccessKeyIdKey" .ctx }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "cinflow.s3Secret" .ctx }}
      key: {{ include "cinflow.s3SecretAccessKeyKey" .ctx }}
{{- end }}
{{- end }}

{{/*
CA files: env, mounts and volumes. Each fails if both a Secret and a ConfigMap are named.
*/}}
{{- define "cinflow.caCheck" -}}
{{- range $which, $ca := dict "amqp" .Values.amqp.ca "s3" .Values.s3.ca }}
{{- if and $ca.secretName $ca.configMapName }}
{{- fail (printf "%s.ca: set secretName or configMapName, not both." $which) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cinflow.caEnv" -}}
{{- include "cinflow.caCheck" .ctx }}
{{- with .ctx.Values.amqp.ca }}
{{- if or .secretName .configMapName }}
- name: CINFLOW_AMQP_CA_FILE
  value: {{ printf "/etc/cinflow/ca/amqp/%s" .key | quote }}
{{- end }}
{{- end }}
{{- if .s3 }}
{{- with .ctx.Values.s3.ca }}
{{- if or .secretName .configMapName }}
- name: CINFLOW_S3_CA_FILE
  value: {{ printf "/etc/cinflow/ca/s3/%s" .key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cinflow.caMounts" -}}
{{- if or .ctx.Values.amqp.ca.secretName .ctx.Values.amqp.ca.configMapName }}
- name: amqp-ca
  mountPath: /etc/cinflow/ca/amqp
  readOnly: true
{{- end }}
{{- if and .s3 (or .ctx.Values.s3.ca.secretName .ctx.Values.s3.ca.configMapName) }}
- name: s3-ca
  mountPath: /etc/cinflow/ca/s3
  readOnly: true
{{- end }}
{{- end }}

{{- define "cinflow.caVolumes" -}}
{{- $cas := list (list "amqp-ca" .ctx.Values.amqp.ca) }}
{{- if .s3 }}{{ $cas = append $cas (list "s3-ca" .ctx.Values.s3.ca) }}{{ end }}
{{- range $cas }}
{{- $name := index . 0 }}
{{- $ca := index . 1 }}
{{- if $ca.secretName }}
- name: {{ $name }}
  secret:
    secretName: {{ $ca.secretName }}
    items:
      - key: {{ $ca.key }}
        path: {{ $ca.key }}
{{- else if $ca.configMapName }}
- name: {{ $name }}
  configMap:
    name: {{ $ca.configMapName }}
    items:
      - key: {{ $ca.key }}
        path: {{ $ca.key }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Drain limit and grace period of a worker: include "cinflow.drain" (dict "ctx" $ "w" .Values.inference)
*/}}
{{- define "cinflow.drain" -}}
{{- if kindIs "invalid" .w.drainTimeoutSeconds }}{{ .ctx.Values.worker.drainTimeoutSeconds | int }}{{ else }}{{ .w.drainTimeoutSeconds | int }}{{ end }}
{{- end }}

{{- define "cinflow.terminationGrace" -}}
{{- $drain := include "cinflow.drain" . | int }}
{{- if kindIs "invalid" .w.terminationGracePeriodSeconds }}
{{- add $drain (.ctx.Values.worker.terminationGraceMarginSeconds | int) }}
{{- else if le (.w.terminationGracePeriodSeconds | int) $drain }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be larger than the drain limit CINFLOW_DRAIN_TIMEOUT_S (%d): Kubernetes would kill the worker before jobs in flight are finished or returned to the queue." .name (.w.terminationGracePeriodSeconds | int) $drain) }}
{{- else }}
{{- .w.terminationGracePeriodSeconds | int }}
{{- end }}
{{- end }}

{{/*
Device of a worker: the explicit value, else cuda with a GPU and cpu without.
include "cinflow.device" (dict "value" .Values.inference.device "gpu" .Values.inference.gpu.enabled)
*/}}
{{- define "cinflow.device" -}}
{{- if .value }}{{ .value }}{{ else if .gpu }}cuda{{ else }}cpu{{ end }}
{{- end }}

{{/*
Annotations for annotation-based Prometheus discovery (metrics.podAnnotations), or nothing.
*/}}
{{- define "cinflow.scrapeAnnotations" -}}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.worker.httpPort | quote }}
prometheus.io/path: {{ .Values.metrics.path | quote }}
{{- end }}
{{- end }}

{{/*
Pod annotations shared by the workers: config checksums, Prometheus annotations.
*/}}
{{- define "cinflow.workerPodAnnotations" -}}
checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
checksum/secret: {{ include (print .ctx.Template.BasePath "/secret.yaml") .ctx | sha256sum }}
{{- with include "cinflow.scrapeAnnotations" .ctx | trim }}
{{ . }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Probes of a worker container.
*/}}
{{- define "cinflow.probes" -}}
{{- with .Values.probes.startup }}
{{- if .enabled }}
startupProbe:
  httpGet:
    path: {{ .path }}
    port: http
  periodSeconds: {{ .periodSeconds }}
  timeoutSeconds: {{ .timeoutSeconds }}
  failureThreshold: {{ .failureThreshold }}
{{- end }}
{{- end }}
{{- with .Values.probes.liveness }}
{{- if .enabled }}
livenessProbe:
  httpGet:
    path: {{ .path }}
    port: http
  periodSeconds: {{ .periodSeconds }}
  timeoutSeconds: {{ .timeoutSeconds }}
  failureThreshold: {{ .failureThreshold }}
{{- end }}
{{- end }}
{{- with .Values.probes.readiness }}
{{- if .enabled }}
readinessProbe:
  httpGet:
    path: {{ .path }}
    port: http
  periodSeconds: {{ .periodSeconds }}
  timeoutSeconds: {{ .timeoutSeconds }}
  failureThreshold: {{ .failureThreshold }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The /tmp volume: include "cinflow.tmpVolume" .Values.inference.tmpVolume
*/}}
{{- define "cinflow.tmpVolume" -}}
- name: tmp
  emptyDir:
    {{- with .medium }}
    medium: {{ . }}
    {{- end }}
    {{- with .sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}

{{/*
GPU scheduling fields of a pod spec: include "cinflow.podScheduling" (dict "w" .Values.inference)
*/}}
{{- define "cinflow.podScheduling" -}}
{{- $w := .w }}
{{- $nodeSelector := $w.nodeSelector | default dict }}
{{- $tolerations := $w.tolerations | default list }}
{{- if $w.gpu.enabled }}
{{- $nodeSelector = merge (deepCopy $nodeSelector) ($w.gpu.nodeSelector | default dict) }}
{{- $tolerations = concat ($w.gpu.tolerations | default list) $tolerations }}
{{- with $w.gpu.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $w.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $w.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $w.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/*
Container resources, with the GPU limit added when the worker has a GPU.
*/}}
{{- define "cinflow.resources" -}}
{{- $r := deepCopy (.w.resources | default dict) }}
{{- if .w.gpu.enabled }}
{{- $limits := get $r "limits" | default dict }}
{{- $_ := set $limits .w.gpu.resourceName (.w.gpu.count | int) }}
{{- $_ := set $r "limits" $limits }}
{{- end }}
{{- toYaml $r }}
{{- end }}

{{/*
Environment that keeps a GPU-less container away from the node's GPUs (the NVIDIA
runtime would otherwise expose every GPU of the node to an image that sets
NVIDIA_VISIBLE_DEVICES=all, outside the scheduler's accounting).
*/}}
{{- define "cinflow.noGpuEnv" -}}
{{- if not .gpu.enabled }}
- name: NVIDIA_VISIBLE_DEVICES
  value: void
{{- end }}
{{- end }}

{{/*
Indents a block, or renders nothing (not even a blank line) when it is empty:
include "cinflow.indent" (list 12 (include "..." ...))
*/}}
{{- define "cinflow.indent" -}}
{{- $t := trim (index . 1) -}}
{{- if $t }}{{ nindent (index . 0) $t }}{{ end -}}
{{- end }}

{{/*
Settings of both workers (`cinflow worker infer|train`), in their ConfigMaps.
*/}}
{{- define "cinflow.workerConfig" -}}
CINFLOW_RETRY_FOR_S: {{ .Values.worker.retryForSeconds | int | quote }}
CINFLOW_RETRY_BACKOFF_MS: {{ .Values.worker.retryBackoffMs | int | quote }}
CINFLOW_RETRY_BACKOFF_MAX_MS: {{ .Values.worker.retryBackoffMaxMs | int | quote }}
CINFLOW_RETRY_DELAY_S: {{ .Values.worker.retryDelaySeconds | int | quote }}
CINFLOW_RETRY_ROUNDS: {{ .Values.worker.retryRounds | int | quote }}
CINFLOW_STALL_LIMIT_S: {{ .Values.worker.stallLimitSeconds | int | quote }}
CINFLOW_ALLOWED_BUCKETS: {{ join "," .Values.worker.allowedBuckets | quote }}
CINFLOW_MAX_MESSAGE_BYTES: {{ .Values.worker.maxMessageBytes | int | quote }}
CINFLOW_CONFIRM_TIMEOUT_S: {{ .Values.worker.confirmTimeoutSeconds | int | quote }}
CINFLOW_RESULTS_PREFIX: {{ .Values.worker.resultsPrefix | quote }}
CINFLOW_MAX_IMAGE_BYTES: {{ .Values.worker.maxImageBytes | int64 | quote }}
CINFLOW_METRICS_ADDR: {{ printf "0.0.0.0:%d" (.Values.worker.httpPort | int) | quote }}
CINFLOW_MODEL_ALIAS: {{ .Values.model.alias | quote }}
{{- end }}

{{/*
Labels of an alert: include "cinflow.alertLabels" (dict "pr" .Values.metrics.prometheusRule "severity" "warning")
*/}}
{{- define "cinflow.alertLabels" -}}
labels:
  severity: {{ .severity }}
  {{- with .pr.alertLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/*
An alert's runbook_url annotation (its section of docs/metrics.md), when
metrics.prometheusRule.runbookUrl is set, on a line of its own indented by
`indent`: include "cinflow.runbook" (dict "pr" ... "alert" "Name" "indent" 12)
*/}}
{{- define "cinflow.runbook" -}}
{{- with .pr.runbookUrl }}
{{- printf "runbook_url: %q" (printf "%s#%s" (trimSuffix "/" .) (lower $.alert)) | nindent $.indent }}
{{- end }}
{{- end }}

{{/*
Signed model versions: env, mounts and volumes. `train` adds the signing key.
*/}}
{{- define "cinflow.signingEnv" -}}
{{- with .ctx.Values.model.trustedKeys }}
{{- if .configMapName }}
- name: CINFLOW_TRUSTED_KEYS
  value: {{ printf "/etc/cinflow/trusted-keys/%s" .key | quote }}
{{- end }}
{{- end }}
{{- if .train }}
{{- with .ctx.Values.model.signingKey }}
{{- if .secretName }}
- name: CINFLOW_SIGNING_KEY_FILE
  value: {{ printf "/etc/cinflow/signing-key/%s" .key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cinflow.signingMounts" -}}
{{- if .ctx.Values.model.trustedKeys.configMapName }}
- name: trusted-keys
  mountPath: /etc/cinflow/trusted-keys
  readOnly: true
{{- end }}
{{- if and .train .ctx.Values.model.signingKey.secretName }}
- name: signing-key
  mountPath: /etc/cinflow/signing-key
  readOnly: true
{{- end }}
{{- end }}

{{- define "cinflow.signingVolumes" -}}
{{- with .ctx.Values.model.trustedKeys }}
{{- if .configMapName }}
- name: trusted-keys
  configMap:
    name: {{ .configMapName }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- if .train }}
{{- with .ctx.Values.model.signingKey }}
{{- if .secretName }}
- name: signing-key
  secret:
    secretName: {{ .secretName }}
    defaultMode: 0400
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

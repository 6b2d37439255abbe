{{/*
Expand the name of the chart.
*/}}
{{- define "portal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "portal.fullname" -}}
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

{{/*
Name of one component's resources: <fullname>-<component>, kept within 63 characters.
Usage: include "portal.componentName" (dict "root" $ "component" "web")
*/}}
{{- define "portal.componentName" -}}
{{- $suffix := printf "-%s" .component }}
{{- printf "%s%s" (include "portal.fullname" .root | trunc (int (sub 63 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "portal.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "portal.labels" -}}
helm.sh/chart: {{ include "portal.chart" . }}
{{ include "portal.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "portal.name" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "portal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels and selector labels of one component (web, celery, beat, rq, llm, migrate).
Usage: include "portal.componentLabels" (dict "root" $ "component" "web")
*/}}
{{- define "portal.componentLabels" -}}
{{ include "portal.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "portal.componentSelectorLabels" -}}
{{ include "portal.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "portal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "portal.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The portal image: repository@digest when a digest is given, else repository:tag (tag defaults to appVersion).
*/}}
{{- define "portal.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
Writable directories. The image's root filesystem is mounted read-only; var/ (PORTAL_VAR_DIR) is an
emptyDir, and the media directory inside it is the shared uploads volume.
*/}}
{{- define "portal.varDir" -}}
{{- printf "%s/var" (.Values.workingDir | trimSuffix "/") }}
{{- end }}

{{- define "portal.mediaDir" -}}
{{- printf "%s/media" (include "portal.varDir" .) }}
{{- end }}

{{/*
Name of the Secret holding SECRET_KEY, DATABASE_URL, ... (chart-created or existing).
*/}}
{{- define "portal.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- include "portal.componentName" (dict "root" . "component" "secrets") }}
{{- end }}
{{- end }}

{{/*
Keys of that Secret, comma-separated and sorted. Each key is the name of an environment variable
the portal reads; it is mounted as a file and passed as <KEY>_FILE (see config/env.py).
Chart-created Secret: the non-empty entries of secrets.values. Existing Secret: secrets.existingSecretKeys.
*/}}
{{- define "portal.secretKeys" -}}
{{- $keys := list }}
{{- if .Values.secrets.existingSecret }}
{{- $keys = .Values.secrets.existingSecretKeys | default list }}
{{- else }}
{{- range $key, $value := .Values.secrets.values }}
{{- if $value }}
{{- $keys = append $keys $key }}
{{- end }}
{{- end }}
{{- end }}
{{- $keys | sortAlpha | uniq | join "," }}
{{- end }}

{{/*
data: of the chart-created Secret (also used by the migration hook's copy of it).
*/}}
{{- define "portal.secretData" -}}
{{- range $key, $value := .Values.secrets.values }}
{{- if $value }}
{{ $key }}: {{ $value | toString | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Non-secret environment, as YAML key: "value" lines. Rendered into the ConfigMap, and inline into
the migration hook Job (which runs before the ConfigMap exists).
*/}}
{{- define "portal.configData" -}}
{{- $c := .Values.config -}}
PORTAL_ENV: "production"
DJANGO_SETTINGS_MODULE: "config.settings"
PUBLIC_HOST: {{ $c.publicHost | lower | quote }}
BASE_DOMAIN: {{ $c.baseDomain | lower | quote }}
PUBLIC_PORT: {{ $c.publicPort | toString | quote }}
{{- with $c.redisUrl }}
REDIS_URL: {{ . | quote }}
{{- end }}
CACHE_KEY_PREFIX: {{ $c.cacheKeyPrefix | quote }}
LOG_LEVEL: {{ $c.logLevel | upper | quote }}
LOG_FORMAT: {{ $c.logFormat | quote }}
LITELLM_LOCAL_MODEL_COST_MAP: "True"
BEHIND_TLS_PROXY: {{ $c.behindTlsProxy | toString | quote }}
HTTP_PROTOCOL: {{ $c.httpProtocol | quote }}
STAFF_REQUIRE_2FA: {{ $c.staffRequire2fa | toString | quote }}
ACCOUNT_EMAIL_VERIFICATION: {{ $c.accountEmailVerification | quote }}
OTP_TOTP_ISSUER: {{ $c.otpTotpIssuer | quote }}
SESSION_COOKIE_AGE: {{ $c.sessionCookieAge | int64 | toString | quote }}
API_MAX_BODY_BYTES: {{ $c.apiMaxBodyBytes | int64 | toString | quote }}
KB_MAX_UPLOAD_MB: {{ $c.kbMaxUploadMb | int64 | toString | quote }}
DATABASE_POOL: {{ $c.databasePool | toString | quote }}
DATABASE_CONN_MAX_AGE: {{ $c.databaseConnMaxAge | int64 | toString | quote }}
{{- with $c.tenantRegions }}
TENANT_REGIONS: {{ join "," . | quote }}
{{- end }}
{{- with $c.extraAllowedHosts }}
EXTRA_ALLOWED_HOSTS: {{ join "," . | quote }}
{{- end }}
{{- with $c.csrfTrustedOrigins }}
CSRF_TRUSTED_ORIGINS: {{ join "," . | quote }}
{{- end }}
EMAIL_BACKEND: {{ $c.email.backend | quote }}
EMAIL_HOST: {{ $c.email.host | quote }}
EMAIL_PORT: {{ $c.email.port | int64 | toString | quote }}
DEFAULT_FROM_EMAIL: {{ $c.email.defaultFrom | quote }}
SENTRY_TRACES_SAMPLE_RATE: {{ $c.sentryTracesSampleRate | toString | quote }}
PORTAL_VAR_DIR: {{ include "portal.varDir" . | quote }}
MEDIA_ROOT: {{ include "portal.mediaDir" . | quote }}
STATIC_ROOT: {{ printf "%s/staticfiles" (.Values.workingDir | trimSuffix "/") | quote }}
PYTHONUNBUFFERED: "1"
PYTHONDONTWRITEBYTECODE: "1"
{{- if .Values.otel.enabled }}
OTEL_TRACES_EXPORTER: "otlp"
OTEL_EXPORTER_OTLP_ENDPOINT: {{ .Values.otel.endpoint | quote }}
OTEL_EXPORTER_OTLP_PROTOCOL: {{ .Values.otel.protocol | quote }}
OTEL_SERVICE_NAME: {{ .Values.otel.serviceName | quote }}
OTEL_TRACES_SAMPLER: {{ .Values.otel.sampler | quote }}
{{- with .Values.otel.samplerArg }}
OTEL_TRACES_SAMPLER_ARG: {{ . | toString | quote }}
{{- end }}
{{- with .Values.otel.resourceAttributes }}
{{- $attributes := list }}
{{- range $key, $value := . }}
{{- $attributes = append $attributes (printf "%s=%v" $key $value) }}
{{- end }}
OTEL_RESOURCE_ATTRIBUTES: {{ join "," $attributes | quote }}
{{- end }}
{{- end }}
XDG_CACHE_HOME: "/tmp/.cache"
{{- range $key, $value := $c.extra }}
{{- if and (kindIs "float64" $value) (eq $value (floor $value)) }}
{{ $key }}: {{ $value | int64 | toString | quote }}
{{- else }}
{{ $key }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Pod annotations that roll the pods when the configuration or the Secret changes.
*/}}
{{- define "portal.checksumAnnotations" -}}
checksum/config: {{ include "portal.configData" . | sha256sum }}
{{- if .Values.secrets.existingSecret }}
checksum/secret: {{ printf "%s/%s" .Values.secrets.existingSecret (include "portal.secretKeys" .) | sha256sum }}
{{- else }}
checksum/secret: {{ include "portal.secretData" . | sha256sum }}
{{- end }}
{{- end }}

{{/*
Pod annotations: global podAnnotations, overridden by the component's own.
Usage: include "portal.podAnnotations" (dict "root" $ "values" .Values.web)
*/}}
{{- define "portal.podAnnotations" -}}
{{- $annotations := merge (dict) (.values.podAnnotations | default dict) (.root.Values.podAnnotations | default dict) }}
{{- include "portal.checksumAnnotations" .root }}
{{- with $annotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod labels: component labels plus global podLabels.
*/}}
{{- define "portal.podLabels" -}}
{{ include "portal.componentLabels" . }}
{{- with .root.Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
envFrom and env of every portal container (web, celery, beat, rq).
Secrets are files: each key K of the Secret is mounted at <secrets.mountPath>/K and passed as K_FILE.
*/}}
{{- define "portal.envFrom" -}}
- configMapRef:
    name: {{ include "portal.componentName" (dict "root" . "component" "config") }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "portal.secretFileEnv" -}}
{{- $root := . }}
{{- range $key := include "portal.secretKeys" . | splitList "," | compact }}
- name: {{ printf "%s_FILE" $key }}
  value: {{ printf "%s/%s" ($root.Values.secrets.mountPath | trimSuffix "/") $key | quote }}
{{- end }}
{{- end }}

{{/*
One component's database pool as EnvVars (config/settings.py: DATABASE_POOL_*).
Usage: include "portal.databasePoolEnv" .Values.web.databasePool
*/}}
{{- define "portal.databasePoolEnv" -}}
- name: DATABASE_POOL_MIN_SIZE
  value: {{ .minSize | int64 | toString | quote }}
- name: DATABASE_POOL_MAX_SIZE
  value: {{ .maxSize | int64 | toString | quote }}
- name: DATABASE_POOL_TIMEOUT_SECONDS
  value: {{ .timeoutSeconds | toString | quote }}
{{- end }}

{{/*
A worker container's own metrics port (metrics.workerPort), if any: METRICS_PORT makes
django-prometheus serve the process's registry there (config/settings.py). Set on the workers only:
in the ConfigMap it would also move web's metrics off /metrics.
Usage: include "portal.workerMetricsEnv" $ / include "portal.workerMetricsPorts" $
*/}}
{{- define "portal.workerMetricsEnv" -}}
{{- with .Values.metrics.workerPort }}
- name: METRICS_PORT
  value: {{ . | int64 | toString | quote }}
{{- end }}
{{- end }}

{{- define "portal.workerMetricsPorts" -}}
{{- with .Values.metrics.workerPort }}
ports:
  - name: metrics
    containerPort: {{ . | int64 }}
    protocol: TCP
{{- end }}
{{- end }}

{{/*
Web's PROMETHEUS_MULTIPROC_DIR when a pod runs several uvicorn processes (web.workers > 1): each
process writes its counters and histograms there and /metrics sums them (config/metrics.py). An
in-memory emptyDir, new with each pod. Nothing clears it when the container restarts inside the
pod, and nothing needs to: the files hold counters and histograms only (the portal's gauges are
computed at scrape time, django-prometheus' migration gauges are off), so a dead process's totals
stay in the sums and the pod's counters keep rising instead of resetting.
*/}}
{{- define "portal.webMultiproc" -}}
{{- if gt (.Values.web.workers | int64) 1 }}true{{ end }}
{{- end }}

{{- define "portal.webMultiprocDir" -}}
/run/prometheus
{{- end }}

{{- define "portal.env" -}}
{{- include "portal.secretFileEnv" . }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volumes of a portal pod.
Usage: include "portal.volumes" (dict "root" $ "secretName" "..." "media" true)
*/}}
{{- define "portal.volumes" -}}
{{- $root := .root -}}
- name: tmp
  emptyDir:
    {{- with $root.Values.tmpVolume.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
- name: var
  emptyDir:
    {{- with $root.Values.varVolume.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
- name: secrets
  secret:
    secretName: {{ .secretName }}
    defaultMode: 288 # 0440: readable by the pod's fsGroup
    items:
      {{- range $key := include "portal.secretKeys" $root | splitList "," | compact }}
      - key: {{ $key }}
        path: {{ $key }}
      {{- end }}
{{- if .media }}
- name: media
  {{- if $root.Values.persistence.media.enabled }}
  persistentVolumeClaim:
    claimName: {{ $root.Values.persistence.media.existingClaim | default (include "portal.componentName" (dict "root" $root "component" "media")) }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end }}
{{- with $root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volume mounts of a portal container.
Usage: include "portal.volumeMounts" (dict "root" $ "media" true)
*/}}
{{- define "portal.volumeMounts" -}}
{{- $root := .root -}}
- name: tmp
  mountPath: /tmp
- name: var
  mountPath: {{ include "portal.varDir" $root }}
- name: secrets
  mountPath: {{ $root.Values.secrets.mountPath }}
  readOnly: true
{{- if .media }}
- name: media
  mountPath: {{ include "portal.mediaDir" $root }}
{{- end }}
{{- with $root.Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod-level settings shared by the portal's pods: pull secrets, service account, security context,
scheduling. The component's nodeSelector/affinity/tolerations/topologySpreadConstraints/
priorityClassName win over the global ones.
Usage: include "portal.podSpec" (dict "root" $ "values" .Values.web)
*/}}
{{- define "portal.podSpec" -}}
{{- $root := .root -}}
{{- $v := .values -}}
serviceAccountName: {{ include "portal.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automount }}
enableServiceLinks: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "portal.scheduling" . }}
{{- end }}

{{- define "portal.scheduling" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- with ($v.priorityClassName | default $root.Values.priorityClassName) }}
priorityClassName: {{ . }}
{{- end }}
{{- with ($v.nodeSelector | default $root.Values.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ($v.affinity | default $root.Values.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ($v.tolerations | default $root.Values.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ($v.topologySpreadConstraints | default $root.Values.topologySpreadConstraints) }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
A PersistentVolumeClaim.
Usage: include "portal.pvc" (dict "root" $ "component" "media" "values" .Values.persistence.media)
*/}}
{{- define "portal.pvc" -}}
{{- $v := .values -}}
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ include "portal.componentName" (dict "root" .root "component" .component) }}
  labels:
    {{- include "portal.componentLabels" (dict "root" .root "component" .component) | nindent 4 }}
  {{- if or $v.keep $v.annotations }}
  annotations:
    {{- if $v.keep }}
    helm.sh/resource-policy: keep
    {{- end }}
    {{- with $v.annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
spec:
  accessModes:
    {{- toYaml $v.accessModes | nindent 4 }}
  {{- if $v.storageClass }}
  {{- if eq "-" $v.storageClass }}
  storageClassName: ""
  {{- else }}
  storageClassName: {{ $v.storageClass | quote }}
  {{- end }}
  {{- end }}
  resources:
    requests:
      storage: {{ $v.size | quote }}
{{- end }}

{{/*
One step of the migration hook Job (python manage.py ...), as a container body without its name.
Usage: include "portal.migrateContainer" (dict "root" $ "step" (dict "args" (list ...)) "env" $configEnv)
*/}}
{{- define "portal.migrateContainer" -}}
{{- $root := .root -}}
image: {{ include "portal.image" $root }}
imagePullPolicy: {{ $root.Values.image.pullPolicy }}
workingDir: {{ $root.Values.workingDir }}
command:
  - python
args:
  {{- range .step.args }}
  - {{ . | quote }}
  {{- end }}
env:
  {{- range $key, $value := .env }}
  - name: {{ $key }}
    value: {{ $value | quote }}
  {{- end }}
  {{- include "portal.env" $root | trim | nindent 2 }}
{{- with $root.Values.extraEnvFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.migrations.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  {{- include "portal.volumeMounts" (dict "root" $root "media" false) | nindent 2 }}
{{- end }}

{{/*
Refuse configurations that would start a broken or unsafe portal. Rendered (as nothing) by configmap.yaml.
*/}}
{{- define "portal.validate" -}}
{{- $c := .Values.config -}}
{{- if hasKey .Values.celery "queues" }}
{{- fail "celery.queues is gone: each entry of celery.tiers is a Deployment with its own queues (celery.tiers.<tier>.queues)" }}
{{- end }}
{{- if hasKey .Values.celery "replicaCount" }}
{{- fail "celery.replicaCount is gone: set celery.tiers.<tier>.replicaCount per tier" }}
{{- end }}
{{- if not .Values.celery.tiers }}
{{- fail "celery.tiers must hold at least one tier (a celery worker Deployment)" }}
{{- end }}
{{- $consumed := list }}
{{- range $tier := keys .Values.celery.tiers | sortAlpha }}
{{- if not (regexMatch "^[a-z]([a-z0-9-]{0,18}[a-z0-9])?$" $tier) }}
{{- fail (printf "celery.tiers.%s: a tier name is 1-20 lower-case letters, digits and hyphens (it names the Deployment celery-<tier>)" $tier) }}
{{- end }}
{{- $v := include "portal.celeryTier" (dict "root" $ "tier" $tier) | fromYaml }}
{{- if not $v.queues }}
{{- fail (printf "celery.tiers.%s.queues is required: the queues this tier's workers consume" $tier) }}
{{- end }}
{{- if and $v.autoscaling.enabled (not (or $v.autoscaling.queueDepth.enabled $v.autoscaling.targetCPUUtilizationPercentage $v.autoscaling.targetMemoryUtilizationPercentage)) }}
{{- fail (printf "celery.tiers.%s.autoscaling is enabled without a metric: enable queueDepth or set a CPU/memory target" $tier) }}
{{- end }}
{{- if and $.Values.metrics.workerPort (eq $v.pool "prefork") }}
{{- fail (printf "celery.tiers.%s.pool prefork with metrics.workerPort: the forked children record the model calls, and the exporter in the parent process would never see them. Use the threads pool (the default) or set metrics.workerPort to 0" $tier) }}
{{- end }}
{{- $consumed = concat $consumed $v.queues }}
{{- end }}
{{- range $queue := .Values.celery.requiredQueues }}
{{- if not (has $queue $consumed) }}
{{- fail (printf "No celery tier consumes the queue %s: its tasks would wait forever. Add it to the queues of a tier in celery.tiers" $queue) }}
{{- end }}
{{- end }}
{{- $port := .Values.metrics.workerPort | default 0 | int64 }}
{{- if or (lt $port 0) (gt $port 65535) }}
{{- fail "metrics.workerPort must be a TCP port (1-65535), or 0 for none" }}
{{- end }}
{{- if not (has .Values.migrations.executor (list "multiprocessing" "standard")) }}
{{- fail "migrations.executor must be multiprocessing (django-tenants' parallel executor; it has none named parallel) or standard" }}
{{- end }}
{{- if and $c.databasePool .Values.databaseConnectionLimit }}
{{- $web := ternary .Values.web.autoscaling.maxReplicas .Values.web.replicaCount .Values.web.autoscaling.enabled | int64 }}
{{- $webTotal := mul (add1 $web) (.Values.web.workers | int64) (.Values.web.databasePool.maxSize | int64) }}
{{- $celeryTotal := 0 }}
{{- $celeryParts := list }}
{{- range $tier := keys .Values.celery.tiers | sortAlpha }}
{{- $v := include "portal.celeryTier" (dict "root" $ "tier" $tier) | fromYaml }}
{{- $pods := ternary $v.autoscaling.maxReplicas $v.replicaCount $v.autoscaling.enabled | int64 }}
{{- $celeryTotal = add $celeryTotal (mul (add1 $pods) ($v.databasePool.maxSize | int64)) }}
{{- $celeryParts = append $celeryParts (printf "%s %d+1 x %d" $tier $pods ($v.databasePool.maxSize | int64)) }}
{{- end }}
{{- $migrate := ternary (.Values.migrations.parallelProcesses | int64) 1 (eq .Values.migrations.executor "multiprocessing") }}
{{- $total := add $webTotal $celeryTotal .Values.beat.databasePool.maxSize (mul .Values.rq.replicaCount .Values.rq.databasePool.maxSize) $migrate }}
{{- if gt (int64 $total) (int64 .Values.databaseConnectionLimit) }}
{{- fail (printf "The database pools can open %d connections (web %d+1 pods x %d workers x %d, celery %s, beat %d, rq %d x %d, migrations %d), more than databaseConnectionLimit %d: lower the databasePool.maxSize values or the replicas, or raise PostgreSQL's max_connections and the limit" (int64 $total) $web (int64 .Values.web.workers) (int64 .Values.web.databasePool.maxSize) (join ", " $celeryParts) (int64 .Values.beat.databasePool.maxSize) (int64 .Values.rq.replicaCount) (int64 .Values.rq.databasePool.maxSize) (int64 $migrate) (int64 .Values.databaseConnectionLimit)) }}
{{- end }}
{{- end }}
{{- $keys := include "portal.secretKeys" . | splitList "," | compact -}}
{{- if not $c.publicHost }}
{{- fail "config.publicHost is required: the host of the staff pages (public schema), e.g. portal.example.com" }}
{{- end }}
{{- if not $c.baseDomain }}
{{- fail "config.baseDomain is required: tenants are served at <slug>.<baseDomain>" }}
{{- end }}
{{- range $required := list "SECRET_KEY" "DATABASE_URL" "FIELD_ENCRYPTION_KEYS" "AUDIT_SIGNING_KEYS" "METRICS_TOKEN" }}
{{- if not (has $required $keys) }}
{{- if $.Values.secrets.existingSecret }}
{{- fail (printf "secrets.existingSecretKeys must list %s (and the Secret %s must hold it)" $required $.Values.secrets.existingSecret) }}
{{- else }}
{{- fail (printf "secrets.values.%s is required (or set secrets.existingSecret)" $required) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not .Values.secrets.existingSecret }}
{{- if lt (len (.Values.secrets.values.SECRET_KEY | toString)) 50 }}
{{- fail "secrets.values.SECRET_KEY must be at least 50 characters (portal.E004 wants 40, Django's security.W009 50)" }}
{{- end }}
{{- if not (regexMatch "^postgres(ql)?://" (.Values.secrets.values.DATABASE_URL | toString)) }}
{{- fail "secrets.values.DATABASE_URL must be a postgresql:// URL" }}
{{- end }}
{{- end }}
{{- if and $c.redisUrl (has "REDIS_URL" $keys) }}
{{- fail "REDIS_URL is set both in config.redisUrl and in the Secret: keep one (the Secret when the URL holds a password)" }}
{{- end }}
{{- if not (or $c.redisUrl (has "REDIS_URL" $keys)) }}
{{- fail "Set config.redisUrl, or put REDIS_URL in the Secret (secrets.values.REDIS_URL or secrets.existingSecretKeys)" }}
{{- end }}
{{- $config := include "portal.configData" . | fromYaml }}
{{- range $key := $keys }}
{{- if hasKey $config $key }}
{{- fail (printf "%s is both in the ConfigMap (config.*) and in the Secret; the plain variable would win over %s_FILE. Keep one." $key $key) }}
{{- end }}
{{- end }}
{{- if and (contains "smtp" $c.email.backend) (not $c.email.host) }}
{{- fail "config.email.host is required with the SMTP e-mail backend (invitations and password resets)" }}
{{- end }}
{{- if not (has $c.logFormat (list "json" "console")) }}
{{- fail "config.logFormat must be json or console" }}
{{- end }}
{{- if and .Values.otel.enabled (not (regexMatch "^https?://" (.Values.otel.endpoint | toString))) }}
{{- fail "otel.endpoint is required with otel.enabled: the OTLP collector's http(s):// URL (OTEL_EXPORTER_OTLP_ENDPOINT)" }}
{{- end }}
{{- if and .Values.llm.enabled (not .Values.llm.image.repository) }}
{{- fail "llm.image.repository is required when llm.enabled" }}
{{- end }}
{{- end }}

{{/*
The values of one celery tier: the celery.* defaults with the tier's own keys merged over them
(maps key by key, lists replaced), as YAML.
Usage: include "portal.celeryTier" (dict "root" $ "tier" "light") | fromYaml
*/}}
{{- define "portal.celeryTier" -}}
{{- $defaults := omit .root.Values.celery "tiers" "requiredQueues" | deepCopy }}
{{- $tier := index .root.Values.celery.tiers .tier | default dict | deepCopy }}
{{- toYaml (mergeOverwrite $defaults $tier) }}
{{- end }}

{{/*
Components whose pods are workers (celery tiers and rq): the only ones allowed to reach model
endpoints and the internet. A YAML list.
*/}}
{{- define "portal.workerComponents" -}}
{{- range $tier := keys .Values.celery.tiers | sortAlpha }}
- {{ printf "celery-%s" $tier }}
{{- end }}
- rq
{{- end }}

{{/*
A PodDisruptionBudget for one component.
Usage: include "portal.pdb" (dict "root" $ "component" "web" "values" .Values.web.podDisruptionBudget)
*/}}
{{- define "portal.pdb" -}}
{{- $component := dict "root" .root "component" .component -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "portal.componentName" $component }}
  labels:
    {{- include "portal.componentLabels" $component | nindent 4 }}
spec:
  {{- if .values.maxUnavailable }}
  maxUnavailable: {{ .values.maxUnavailable }}
  {{- else }}
  minAvailable: {{ .values.minAvailable | default 1 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "portal.componentSelectorLabels" $component | nindent 6 }}
{{- end }}

{{/*
Egress rules every portal pod gets from the NetworkPolicy: DNS, PostgreSQL, Redis and, with
otel.enabled, the OTLP collector (a list of NetworkPolicyEgressRule). An empty `to` allows any
address on those ports.
*/}}
{{- define "portal.networkPolicyBaseEgress" -}}
{{- $np := .Values.networkPolicy -}}
- ports:
    {{- range $np.dns.ports }}
    - protocol: UDP
      port: {{ . }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
  {{- with $np.dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- $services := list "postgresql" "redis" }}
{{- if .Values.otel.enabled }}
{{- $services = append $services "otelCollector" }}
{{- end }}
{{- range $name := $services }}
{{- $service := index $np $name }}
- ports:
    {{- range $service.ports }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
  {{- with $service.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
Names, labels and checks, defined once and used by every manifest of the chart.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "shelfmatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects. Truncated to 63 characters (DNS label limit). If the
release name already contains the chart name it is used as is.
*/}}
{{- define "shelfmatch.fullname" -}}
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

{{/* Namespace of the release's objects. */}}
{{- define "shelfmatch.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "shelfmatch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "shelfmatch.labels" -}}
helm.sh/chart: {{ include "shelfmatch.chart" . }}
{{ include "shelfmatch.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shelfmatch
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the pods (immutable in a Deployment: never add to them). */}}
{{- define "shelfmatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shelfmatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Name of the ServiceAccount of the pods. */}}
{{- define "shelfmatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shelfmatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The service image: repository:tag, or repository@digest when a digest is given. */}}
{{- define "shelfmatch.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Path of the catalogue file inside the containers (SHELFMATCH_CATALOG). */}}
{{- define "shelfmatch.catalogFile" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.catalog.mountPath) .Values.catalog.fileName }}
{{- end }}

{{/* PVC holding the catalogue. */}}
{{- define "shelfmatch.catalogClaimName" -}}
{{- default (printf "%s-catalog" (include "shelfmatch.fullname" .)) .Values.catalog.pvc.claimName }}
{{- end }}

{{/* Where the Kafka CA bundle is mounted, and the file SHELFMATCH_SSL_CAFILE names. */}}
{{- define "shelfmatch.caDir" -}}
/etc/shelfmatch/kafka-ca
{{- end }}
{{- define "shelfmatch.caFile" -}}
{{- printf "%s/ca.crt" (include "shelfmatch.caDir" .) }}
{{- end }}

{{/* Where the client certificate and key for mutual TLS are mounted (SHELFMATCH_SSL_CERTFILE, _KEYFILE). */}}
{{- define "shelfmatch.clientCertDir" -}}
/etc/shelfmatch/kafka-client
{{- end }}

{{/* Broker ports the egress policy allows, as a JSON list: the values, else those of bootstrapServers. */}}
{{- define "shelfmatch.brokerPorts" -}}
{{- $ports := list }}
{{- range .Values.networkPolicy.egress.brokerPorts }}{{ $ports = append $ports (int .) }}{{ end }}
{{- if not $ports }}
{{- range splitList "," .Values.kafka.bootstrapServers }}
{{- $port := regexFind "[0-9]+$" (trim .) }}
{{- if not $port }}
{{- fail (printf "kafka.bootstrapServers entry %q has no port; list the broker ports in networkPolicy.egress.brokerPorts" (trim .)) }}
{{- end }}
{{- $ports = append $ports (int $port) }}
{{- end }}
{{- end }}
{{- $ports | uniq | toJson }}
{{- end }}

{{/* true when the Kafka connection uses SASL / TLS. */}}
{{- define "shelfmatch.sasl" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}true{{ end }}
{{- end }}
{{- define "shelfmatch.tls" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{/* SHELFMATCH_DEVICE: explicit, else cuda with a GPU and cpu without. */}}
{{- define "shelfmatch.device" -}}
{{- if .Values.settings.device }}
{{- .Values.settings.device }}
{{- else if .Values.gpu.enabled }}
{{- "cuda" }}
{{- else }}
{{- "cpu" }}
{{- end }}
{{- end }}

{{/* Most replicas an autoscaler may run: its own maximum, else the input partition count. */}}
{{- define "shelfmatch.kedaMaxReplicas" -}}
{{- if kindIs "invalid" .Values.keda.maxReplicaCount }}{{ .Values.kafka.inputPartitions | int }}{{ else }}{{ .Values.keda.maxReplicaCount | int }}{{ end }}
{{- end }}
{{- define "shelfmatch.hpaMaxReplicas" -}}
{{- if kindIs "invalid" .Values.hpa.maxReplicas }}{{ .Values.kafka.inputPartitions | int }}{{ else }}{{ .Values.hpa.maxReplicas | int }}{{ end }}
{{- end }}

{{/*
Seconds from a pod's first failed publish to the kubelet marking it NotReady: the publish timeout,
then failureThreshold failed readiness probes (no readiness probe: the publish timeout alone).
*/}}
{{- define "shelfmatch.notReadyAfterSeconds" -}}
{{- $publish := divf (.Values.kafka.publishTimeoutMs | int) 1000 | ceil | int }}
{{- $probe := 0 }}
{{- with .Values.probes.readiness }}
{{- $probe = mul (default 10 .periodSeconds | int) (default 3 .failureThreshold | int) }}
{{- end }}
{{- add $publish $probe }}
{{- end }}

{{/* minReadySeconds: the value, else notReadyAfterSeconds plus a 10 s margin. */}}
{{- define "shelfmatch.minReadySeconds" -}}
{{- if kindIs "invalid" .Values.minReadySeconds }}
{{- add (include "shelfmatch.notReadyAfterSeconds" . | int) 10 }}
{{- else }}
{{- .Values.minReadySeconds | int }}
{{- end }}
{{- end }}

{{/* Longest a healthy pod may take from start to Ready: the startup probe's budget (0 without one). */}}
{{- define "shelfmatch.startupBudgetSeconds" -}}
{{- with .Values.probes.startup }}
{{- add (mul (default 10 .periodSeconds | int) (default 3 .failureThreshold | int)) (default 0 .initialDelaySeconds | int) }}
{{- else }}0{{ end }}
{{- end }}

{{/*
PromQL selector of this release's series, as the ServiceMonitor scrapes them (the job label is the
Service name).
*/}}
{{- define "shelfmatch.alertSelector" -}}
namespace="{{ include "shelfmatch.namespace" . }}", job="{{ include "shelfmatch.fullname" . }}"
{{- end }}

{{/*
PromQL selector of this release's pods in kube-state-metrics series (their job is kube-state-metrics):
the namespace, and the Deployment's pod names, <fullname>-<replicaset hash>-<pod hash>.
*/}}
{{- define "shelfmatch.podSeriesSelector" -}}
namespace="{{ include "shelfmatch.namespace" . }}", pod=~"{{ include "shelfmatch.fullname" . }}-[a-z0-9]+-[a-z0-9]+"
{{- end }}

{{/* Name of the HorizontalPodAutoscaler that scales the Deployment (KEDA names its own keda-hpa-<ScaledObject>). */}}
{{- define "shelfmatch.hpaName" -}}
{{- if .Values.keda.enabled }}{{ printf "keda-hpa-%s" (include "shelfmatch.fullname" .) }}{{ else }}{{ include "shelfmatch.fullname" . }}{{ end }}
{{- end }}

{{/* runbook_url of an alert: the configured base URL and the alert's section anchor; empty if no base. */}}
{{- define "shelfmatch.runbookUrl" -}}
{{- $ctx := index . 0 }}{{ $anchor := index . 1 }}
{{- with $ctx.Values.prometheusRule.runbookUrl }}
{{- printf "%s#%s" (trimSuffix "/" .) $anchor }}
{{- end }}
{{- end }}

{{/*
Checks of values that no schema can express. Each failure says what to change. Included by the
Deployment, so every render runs them.
*/}}
{{- define "shelfmatch.validate" -}}
{{- $v := .Values }}
{{- $partitions := $v.kafka.inputPartitions }}
{{- if and $v.keda.enabled $v.hpa.enabled }}
{{- fail "keda.enabled and hpa.enabled are mutually exclusive: two autoscalers would fight over the Deployment's replicas" }}
{{- end }}
{{- if not (kindIs "invalid" $partitions) }}
{{- if lt ($partitions | int) 1 }}
{{- fail (printf "kafka.inputPartitions must be a positive number, got %v" $partitions) }}
{{- end }}
{{- end }}
{{- if or $v.keda.enabled $v.hpa.enabled }}
{{- if kindIs "invalid" $partitions }}
{{- fail "kafka.inputPartitions is required with keda or hpa: replicas beyond the input topic's partition count get no partition" }}
{{- end }}
{{- end }}
{{- if $v.keda.enabled }}
{{- $max := include "shelfmatch.kedaMaxReplicas" . | int }}
{{- if gt $max ($partitions | int) }}
{{- fail (printf "keda.maxReplicaCount (%d) must not exceed kafka.inputPartitions (%d): extra consumers would sit idle" $max ($partitions | int)) }}
{{- end }}
{{- if gt ($v.keda.minReplicaCount | int) $max }}
{{- fail (printf "keda.minReplicaCount (%d) must not exceed keda.maxReplicaCount (%d)" ($v.keda.minReplicaCount | int) $max) }}
{{- end }}
{{- end }}
{{- if $v.hpa.enabled }}
{{- $max := include "shelfmatch.hpaMaxReplicas" . | int }}
{{- if gt $max ($partitions | int) }}
{{- fail (printf "hpa.maxReplicas (%d) must not exceed kafka.inputPartitions (%d): extra consumers would sit idle" $max ($partitions | int)) }}
{{- end }}
{{- if or (lt ($v.hpa.minReplicas | int) 1) (gt ($v.hpa.minReplicas | int) $max) }}
{{- fail (printf "hpa.minReplicas (%d) must be between 1 and hpa.maxReplicas (%d)" ($v.hpa.minReplicas | int) $max) }}
{{- end }}
{{- end }}
{{- if and (not $v.keda.enabled) (not $v.hpa.enabled) (not (kindIs "invalid" $partitions)) }}
{{- if gt ($v.replicaCount | int) ($partitions | int) }}
{{- fail (printf "replicaCount (%d) must not exceed kafka.inputPartitions (%d): extra consumers would sit idle" ($v.replicaCount | int) ($partitions | int)) }}
{{- end }}
{{- end }}
{{- if not $v.kafka.bootstrapServers }}
{{- fail "kafka.bootstrapServers is required" }}
{{- end }}
{{- if not (has $v.kafka.securityProtocol (list "PLAINTEXT" "SSL" "SASL_PLAINTEXT" "SASL_SSL")) }}
{{- fail (printf "kafka.securityProtocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, got %q" $v.kafka.securityProtocol) }}
{{- end }}
{{- if and (include "shelfmatch.sasl" .) (not $v.kafka.sasl.existingSecret) }}
{{- fail (printf "kafka.securityProtocol %s needs kafka.sasl.existingSecret: the name of an existing Secret with the SASL user and password (never the password itself)" $v.kafka.securityProtocol) }}
{{- end }}
{{- if and $v.kafka.tls.caSecret (not (include "shelfmatch.tls" .)) }}
{{- fail (printf "kafka.tls.caSecret is set but kafka.securityProtocol is %s; the CA is only used with SSL or SASL_SSL" $v.kafka.securityProtocol) }}
{{- end }}
{{- if and $v.kafka.tls.clientCertSecret (not (include "shelfmatch.tls" .)) }}
{{- fail (printf "kafka.tls.clientCertSecret is set but kafka.securityProtocol is %s; a client certificate is only sent over SSL or SASL_SSL" $v.kafka.securityProtocol) }}
{{- end }}
{{- if and $v.networkPolicy.enabled $v.networkPolicy.egress.enabled (not (or $v.networkPolicy.egress.brokerCIDRs $v.networkPolicy.egress.brokerPeers)) }}
{{- fail "networkPolicy.egress.enabled needs networkPolicy.egress.brokerCIDRs or brokerPeers: without them the pods could reach no broker" }}
{{- end }}
{{- if not (has $v.catalog.source (list "pvc" "initContainer")) }}
{{- fail (printf "catalog.source must be pvc or initContainer, got %q" $v.catalog.source) }}
{{- end }}
{{- if eq $v.catalog.source "initContainer" }}
{{- if or (not $v.catalog.initContainer.image.repository) (not $v.catalog.initContainer.command) }}
{{- fail "catalog.source initContainer needs catalog.initContainer.image.repository and catalog.initContainer.command" }}
{{- end }}
{{- end }}
{{- if le ($v.terminationGracePeriodSeconds | int) ($v.settings.shutdownTimeoutS | int) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than settings.shutdownTimeoutS (%d), or pods are killed mid-drain" ($v.terminationGracePeriodSeconds | int) ($v.settings.shutdownTimeoutS | int)) }}
{{- end }}
{{- $notReady := include "shelfmatch.notReadyAfterSeconds" . | int }}
{{- $minReady := include "shelfmatch.minReadySeconds" . | int }}
{{- if le $minReady $notReady }}
{{- fail (printf "minReadySeconds (%d) must be above %d s (kafka.publishTimeoutMs, then the readiness probe's periodSeconds x failureThreshold): a release that cannot publish would count as available and the rollout would move on" $minReady $notReady) }}
{{- end }}
{{- $startup := include "shelfmatch.startupBudgetSeconds" . | int }}
{{- if le ($v.progressDeadlineSeconds | int) (add $startup $minReady) }}
{{- fail (printf "progressDeadlineSeconds (%d) must exceed the startup probe's budget (%d s) plus minReadySeconds (%d s), or a healthy slow start is reported as a failed rollout" ($v.progressDeadlineSeconds | int) $startup $minReady) }}
{{- end }}
{{- if and (eq (include "shelfmatch.device" .) "cuda") (not $v.gpu.enabled) }}
{{- fail "settings.device is cuda but gpu.enabled is false: the pod would get no GPU" }}
{{- end }}
{{- end }}

{{/* Names. */}}
{{- define "orchestrator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orchestrator.fullname" -}}
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

{{- define "orchestrator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orchestrator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orchestrator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "orchestrator.labels" -}}
helm.sh/chart: {{ include "orchestrator.chart" . }}
app.kubernetes.io/name: {{ include "orchestrator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: orchestrator
{{- end }}

{{- define "orchestrator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "orchestrator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespace served when watch.namespaces is empty. */}}
{{- define "orchestrator.watchNamespace" -}}
{{- default .Release.Namespace .Values.watch.namespace }}
{{- end }}

{{/* Every namespace the operator serves, as a JSON list (use with fromJsonArray). Each gets
a Role, a RoleBinding, the runner NetworkPolicies and the sample Adapters. */}}
{{- define "orchestrator.servedNamespaces" -}}
{{- if .Values.watch.namespaces }}
{{- .Values.watch.namespaces | uniq | toJson }}
{{- else }}
{{- list (include "orchestrator.watchNamespace" .) | toJson }}
{{- end }}
{{- end }}

{{- define "orchestrator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "orchestrator.runnerImage" -}}
{{- default (include "orchestrator.image" .) .Values.runner.image }}
{{- end }}

{{/* The Lease of leader election (in the release namespace). */}}
{{- define "orchestrator.leaseName" -}}
{{- default (include "orchestrator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
Every Lease the operator reads and renews (a JSON list): the one Lease, and with
operator.shards=S also the S shard Leases <lease>-shard-<i> and the S member Leases
<lease>-member-<k> (core/kube/shards.py shard_lease / member_lease; a unit test holds the
names to the ones the operator's ShardSet creates). Member slots are numbered, not named after
the pod, so the Role can list every name: k < S, a replica that finds no free slot stands by.
*/}}
{{- define "orchestrator.leaseNames" -}}
{{- $lease := include "orchestrator.leaseName" . }}
{{- $names := list $lease }}
{{- $shards := int .Values.operator.shards }}
{{- if gt $shards 0 }}
{{- range $i := until $shards }}
{{- $names = append $names (printf "%s-shard-%d" $lease $i) }}
{{- end }}
{{- range $k := until $shards }}
{{- $names = append $names (printf "%s-member-%d" $lease $k) }}
{{- end }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* Migrations run in a hook Job (PostgreSQL) or by the operator at start (SQLite). */}}
{{- define "orchestrator.hookMigrations" -}}
{{- if and (eq .Values.database.type "postgresql") .Values.migrations.hook }}true{{ end }}
{{- end }}

{{/* The database URL env entry (PostgreSQL only; SQLite is the operator's default). */}}
{{- define "orchestrator.databaseEnv" -}}
{{- if eq .Values.database.type "postgresql" }}
- name: ORCHESTRATOR_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.postgresql.urlSecret.name: the Secret holding the PostgreSQL URL" .Values.database.postgresql.urlSecret.name }}
      key: {{ required "database.postgresql.urlSecret.key" .Values.database.postgresql.urlSecret.key }}
{{- end }}
{{- end }}

{{/* Cross-field checks that values.schema.json cannot express. */}}
{{- define "orchestrator.validate" -}}
{{- $ha := gt (int .Values.replicaCount) 1 }}
{{- if and $ha (eq .Values.database.type "sqlite") }}
{{- fail "replicaCount >= 2 needs database.type=postgresql (SQLite on a ReadWriteOnce volume serves one replica)" }}
{{- end }}
{{- if and $ha (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount >= 2 needs leaderElection.enabled=true (only the Lease holder may work)" }}
{{- end }}
{{- if and $ha (not .Values.persistence.enabled) }}
{{- fail "replicaCount >= 2 needs a work dir the replicas share (ledger, logs, evidence store; a new leader continues the same ledger): persistence.enabled=true with persistence.accessModes=[ReadWriteMany]" }}
{{- end }}
{{- if and $ha .Values.persistence.enabled (has "ReadWriteOnce" .Values.persistence.accessModes) }}
{{- fail "replicaCount >= 2 shares the work dir (ledger, logs, evidence store): set persistence.accessModes to [ReadWriteMany]" }}
{{- end }}
{{- if and (gt (int .Values.operator.shards) 0) (not .Values.leaderElection.enabled) }}
{{- fail "operator.shards needs leaderElection.enabled=true (each shard is a Lease: only its holder works it)" }}
{{- end }}
{{- with .Values.leaderElection }}
{{- if not (and (lt (float64 .retryPeriodSeconds) (float64 .renewDeadlineSeconds)) (lt (float64 .renewDeadlineSeconds) (float64 .leaseDurationSeconds))) }}
{{- fail "leaderElection: needs retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds" }}
{{- end }}
{{- end }}
{{- if .Values.watch.allNamespaces }}
{{- fail "watch.allNamespaces was removed: it granted cluster-wide Job creation, NetworkPolicy writes and read access to every ConfigMap and pod log, and left namespaces without the default-deny runner policy. List the namespaces to serve in watch.namespaces (each gets a Role and the runner NetworkPolicy)" }}
{{- end }}
{{- if and .Values.watch.namespaces .Values.watch.namespace }}
{{- fail "watch.namespace and watch.namespaces exclude each other (put the namespace in the list)" }}
{{- end }}
{{- end }}

{{/*
The evidence store's settings of the operator container (core/kube/runtime.py).
*/}}
{{- define "orchestrator.evidenceEnv" -}}
- name: ORCHESTRATOR_EVIDENCE_BACKEND
  value: {{ .Values.evidence.backend | quote }}
# the rules of the runner policy reaching the store, for the Adapters' own policies too
- name: ORCHESTRATOR_EVIDENCE_EGRESS
  value: {{ include "orchestrator.evidenceEgress" . | fromYamlArray | toJson | quote }}
{{- if eq .Values.evidence.backend "local" }}
- name: ORCHESTRATOR_EVIDENCE_LISTEN
  value: {{ printf "0.0.0.0:%d" (int .Values.evidence.port) | quote }}
{{- if .Values.evidence.url }}
- name: ORCHESTRATOR_EVIDENCE_URL
  value: {{ .Values.evidence.url | quote }}
{{- else }}
- name: ORCHESTRATOR_EVIDENCE_SERVICE
  value: {{ include "orchestrator.fullname" . | quote }}
{{- end }}
{{- else }}
{{- $s3 := .Values.evidence.s3 }}
{{- if not $s3.bucket }}{{ fail "evidence.backend=s3 needs evidence.s3.bucket" }}{{ end }}
- name: ORCHESTRATOR_S3_BUCKET
  value: {{ $s3.bucket | quote }}
- name: ORCHESTRATOR_S3_PREFIX
  value: {{ $s3.prefix | quote }}
- name: ORCHESTRATOR_S3_REGION
  value: {{ $s3.region | quote }}
{{- with $s3.endpoint }}
- name: ORCHESTRATOR_S3_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with $s3.publicEndpoint }}
- name: ORCHESTRATOR_S3_PUBLIC_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: ORCHESTRATOR_S3_TEMPORARY_DAYS
  value: {{ $s3.temporaryDays | int | quote }}
{{- if $s3.patchDays }}
- name: ORCHESTRATOR_S3_PATCH_DAYS
  value: {{ $s3.patchDays | int | quote }}
{{- end }}
{{- with $s3.credentialsSecret.name }}
- name: ORCHESTRATOR_S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: access-key-id}
- name: ORCHESTRATOR_S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: secret-access-key}
{{- end }}
{{- end }}
{{- end }}

{{/*
Egress rules letting runner pods reach the evidence store (a YAML list).
*/}}
{{- define "orchestrator.evidenceEgress" -}}
{{- if eq .Values.evidence.backend "local" }}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ .Release.Namespace }}
      podSelector:
        matchLabels:
          {{- include "orchestrator.selectorLabels" . | nindent 10 }}
  ports:
    - {protocol: TCP, port: {{ .Values.evidence.port }}}
{{- else }}
{{- range .Values.evidence.s3.egress }}
- to:
    - ipBlock:
        cidr: {{ .cidr }}
  {{- with .ports }}
  ports:
    {{- range . }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
  {{- end }}
{{- end }}
{{- end }}
{{- end }}

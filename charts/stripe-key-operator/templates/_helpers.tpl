{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "sko.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the prefix of every object. */}}
{{- define "sko.fullname" -}}
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

{{/* Selector labels: stable across upgrades. */}}
{{- define "sko.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sko.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "sko.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "sko.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stripe-key-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* "annotations:" of every object (common plus extra), or nothing. Argument: dict "root", "extra".
Call it right after the labels as {{- include "sko.annotations" (dict "root" .) }}. */}}
{{- define "sko.annotations" -}}
{{- $all := merge (deepCopy (default (dict) .extra)) (deepCopy (default (dict) .root.Values.commonAnnotations)) -}}
{{- with $all -}}
{{ printf "annotations:\n%s" (toYaml . | indent 2) | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* ServiceAccount name. */}}
{{- define "sko.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sko.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image reference: repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "sko.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Lease name. */}}
{{- define "sko.leaseName" -}}
{{- default (printf "%s-leader" (include "sko.fullname" .)) .Values.leaderElection.leaseName -}}
{{- end -}}

{{/* Shards (the operator's --shards): sharding.shards when set; otherwise replicaCount from
three replicas up (they share the work), else 1 (one leader acts, the others stand by). */}}
{{- define "sko.shards" -}}
{{- if .Values.sharding.shards -}}
{{- .Values.sharding.shards | int -}}
{{- else if ge (int .Values.replicaCount) 3 -}}
{{- .Values.replicaCount | int -}}
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/* Name of the ValidatingWebhookConfiguration (cluster-scoped, so it carries the namespace). */}}
{{- define "sko.webhookName" -}}
{{- printf "%s-%s" (include "sko.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of the webhook's Service (the operator's --webhook-service). */}}
{{- define "sko.webhookService" -}}
{{- printf "%s-webhook" (include "sko.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of the webhook's cert-manager Certificate. */}}
{{- define "sko.webhookCertificate" -}}
{{- printf "%s-webhook" (include "sko.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of the webhook's TLS Secret in the release namespace: `<service>-tls`, the name the
operator derives from --webhook-service in self-signed mode. */}}
{{- define "sko.webhookTlsSecret" -}}
{{- printf "%s-tls" (include "sko.webhookService" .) -}}
{{- end -}}

{{/* Tenant namespaces in namespaced mode: watchNamespaces without the release namespace. */}}
{{- define "sko.tenantNamespaces" -}}
{{- $out := list -}}
{{- range .Values.watchNamespaces -}}
{{- if ne . $.Release.Namespace -}}{{- $out = append $out . -}}{{- end -}}
{{- end -}}
{{- toJson (uniq $out) -}}
{{- end -}}

{{/* Checks of value combinations the schema cannot express well. */}}
{{- define "sko.validate" -}}
{{- if and (eq .Values.store "memory") (not .Values.sandbox) -}}
{{- fail "store: memory keeps credentials only in the operator's memory and loses them on every restart; set sandbox: true to acknowledge a throwaway installation, or use store: vault or kubernetes" -}}
{{- end -}}
{{- if and .Values.rbac.namespaced (empty .Values.watchNamespaces) -}}
{{- fail "rbac.namespaced: true needs watchNamespaces: the operator must be told which namespaces its Roles cover" -}}
{{- end -}}
{{- if and (not .Values.leaderElection.enabled) (gt (int .Values.replicaCount) 1) -}}
{{- fail "leaderElection.enabled: false with more than one replica would let several operators mint and rotate keys at once; set replicaCount: 1 or enable leader election" -}}
{{- end -}}
{{- if and (not .Values.leaderElection.enabled) (gt (int (include "sko.shards" .)) 1) -}}
{{- fail "sharding needs Leases: leaderElection.enabled: false cannot be combined with more than one shard; set sharding.shards: 1 or enable leader election" -}}
{{- end -}}
{{- if and .Values.vault.caCert.configMap.name .Values.vault.caCert.secret.name -}}
{{- fail "vault.caCert: set configMap.name or secret.name, not both" -}}
{{- end -}}
{{- if eq .Values.store "vault" -}}
{{- if and (eq .Values.vault.auth.method "approle") (not .Values.vault.auth.approle.secretIdSecret.name) -}}
{{- fail "vault.auth.method: approle needs vault.auth.approle.secretIdSecret.name (the Secret holding the secret id)" -}}
{{- end -}}
{{- if and (eq .Values.vault.auth.method "token") (not .Values.vault.auth.token.secret.name) -}}
{{- fail "vault.auth.method: token needs vault.auth.token.secret.name (the Secret holding the token)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A host address as a CIDR: /32 for IPv4, /128 for IPv6. */}}
{{- define "sko.hostCidr" -}}
{{- if contains ":" . -}}{{ printf "%s/128" . }}{{- else -}}{{ printf "%s/32" . }}{{- end -}}
{{- end -}}

{{/* The API server's addresses as a JSON list of CIDRs: networkPolicy.egress.kubernetesApi.cidrs,
or (when empty) the ClusterIP of the `kubernetes` Service and the addresses of its EndpointSlice,
looked up at install and upgrade (empty under `helm template`). */}}
{{- define "sko.apiServerCidrs" -}}
{{- $cidrs := list -}}
{{- range .Values.networkPolicy.egress.kubernetesApi.cidrs -}}
{{- $cidrs = append $cidrs . -}}
{{- end -}}
{{- if not $cidrs -}}
{{- $svc := lookup "v1" "Service" "default" "kubernetes" -}}
{{- if and $svc $svc.spec $svc.spec.clusterIP -}}
{{- $cidrs = append $cidrs (include "sko.hostCidr" $svc.spec.clusterIP) -}}
{{- end -}}
{{- $slice := lookup "discovery.k8s.io/v1" "EndpointSlice" "default" "kubernetes" -}}
{{- range (($slice | default dict).endpoints | default list) -}}
{{- range (.addresses | default list) -}}
{{- $cidrs = append $cidrs (include "sko.hostCidr" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson (uniq $cidrs) -}}
{{- end -}}

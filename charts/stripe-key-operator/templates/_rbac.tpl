{{/* RBAC rule blocks shared by the ClusterRoles and Roles of rbac.yaml. Each rule names the code
path that needs it; tests/rbac_coverage.rs runs the operator against a recording API server and
fails on a request no rule allows and on a rule (verb) no request uses. */}}

{{/* True (non-empty) when the operator keeps its webhook TLS Secret itself. */}}
{{- define "sko.selfSignedWebhook" -}}
{{- if and .Values.webhook.enabled (eq .Values.webhook.certificate.mode "self-signed") -}}true{{- end -}}
{{- end -}}

{{/* StripeKeyPolicies and StripeWebhookEndpoints, in the namespaces the operator watches. */}}
{{- define "sko.rules.namespacedKinds" -}}
# The controllers list and watch them, read each one fresh before reconciling, and add or
# remove their finalizer with a JSON patch.
- apiGroups: ["stripekeys.io"]
  resources: ["stripekeypolicies", "stripewebhookendpoints"]
  verbs: ["get", "list", "watch", "patch"]
# Status is written by server-side apply only. (No finalizers subresource: the synced Secret's
# controller reference does not set blockOwnerDeletion, so the OwnerReferencesPermissionEnforcement
# admission plugin asks for nothing on the owner.)
- apiGroups: ["stripekeys.io"]
  resources: ["stripekeypolicies/status", "stripewebhookendpoints/status"]
  verbs: ["patch"]
{{- end }}

{{/* The cluster-scoped kinds and Namespace labels. */}}
{{- define "sko.rules.clusterKinds" -}}
# Accounts: watched (their changes requeue policies and endpoints; the account controller
# reconciles them) and read at each reconcile and admission review; the account controller adds
# and removes its finalizer (stripekeys.io/account-protection) with a JSON patch.
- apiGroups: ["stripekeys.io"]
  resources: ["stripeaccounts"]
  verbs: ["get", "list", "watch", "patch"]
# The account controller's status (Ready, lastCheckedTime, keysUnderManagement): server-side apply.
- apiGroups: ["stripekeys.io"]
  resources: ["stripeaccounts/status"]
  verbs: ["patch"]
# Guardrails: watched, and listed at each reconcile and admission review.
- apiGroups: ["stripekeys.io"]
  resources: ["stripeguardrails"]
  verbs: ["list", "watch"]
# The CRDs this binary writes: compared with the installed schema at start.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  resourceNames:
    - stripeaccounts.stripekeys.io
    - stripeguardrails.stripekeys.io
    - stripekeypolicies.stripekeys.io
    - stripewebhookendpoints.stripekeys.io
  verbs: ["get"]
# Namespace labels (an account's namespaceSelector): read one namespace at a time, and watched
# (metadata only) so that a relabelled namespace is re-judged at once.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* Secrets next to the workloads: the synced Secrets. */}}
{{- define "sko.rules.tenantSecrets" -}}
# Synced Secrets: watched through a label selector (RBAC cannot narrow by label), read before
# each write and written by server-side apply (which needs create when the Secret is new).
# Never updated or deleted: the garbage collector removes them with their owner.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- end }}

{{/* The operator's own Secrets in the release namespace, beyond what tenantSecrets grants
there (cluster mode) or from nothing (namespaced mode). */}}
{{- define "sko.rules.selfSecrets" -}}
{{- $kube := eq .Values.store "kubernetes" -}}
{{- $tls := include "sko.selfSignedWebhook" . -}}
{{- if .Values.rbac.namespaced }}
# Read: the app keys of StripeAccounts (credentials.secretRef), the kubernetes store's
# bundles, the webhook TLS Secret. Created: bundles and the webhook TLS Secret (when used).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"{{ if or $kube $tls }}, "create"{{ end }}]
{{- end }}
{{- if $kube }}
# The kubernetes store: a bundle is replaced (compare-and-set on resourceVersion) and deleted
# with its resource{{ if $tls }}; the webhook TLS Secret is replaced when it is renewed{{ end }}.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["update", "delete"]
{{- else if $tls }}
# The webhook TLS Secret is replaced when it is renewed.
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: [{{ include "sko.webhookTlsSecret" . | quote }}]
  verbs: ["update"]
{{- end }}
{{- end }}

{{/* Workloads rolled after a rotation. */}}
{{- define "sko.rules.workloads" -}}
# rolloutTargets: read by name or listed by selector, then patched (a pod-template annotation).
# Nothing watches them: a rollout in progress is polled.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["get", "list", "patch"]
{{- end }}

{{/* Events (kube-runtime's recorder writes events.k8s.io/v1 and patches a repeated one). */}}
{{- define "sko.rules.events" -}}
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* Events about cluster-scoped objects (a StripeAccount's DeletionBlocked): kube-runtime's
recorder writes them to the `default` namespace. Needed as a Role of its own only in namespaced
mode when `default` is not a watched namespace. */}}
{{- define "sko.needsDefaultEventsRole" -}}
{{- if and .Values.rbac.namespaced (not (has "default" .Values.watchNamespaces)) -}}true{{- end -}}
{{- end -}}

{{/* Leader election on the operator's own Lease. */}}
{{- define "sko.rules.lease" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: [{{ include "sko.leaseName" . | quote }}]
  verbs: ["get", "update"]
{{- if gt (int (include "sko.shards" .)) 1 }}
{{- /* Sharding: the shard Leases and one membership Lease per replica (named after its pod,
so not known here), listed by label; a membership Lease expired for long is deleted. Only in
the release namespace, which holds nothing but the operator's own objects. */}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "update", "delete"]
{{- end }}
{{- end }}

{{/* The admission webhook's caBundle (self-signed mode only), on its own configuration. */}}
{{- define "sko.rules.webhook" -}}
- apiGroups: ["admissionregistration.k8s.io"]
  resources: ["validatingwebhookconfigurations"]
  resourceNames: [{{ include "sko.webhookName" . | quote }}]
  verbs: ["get", "patch"]
{{- end }}

{{/* RBAC rule blocks shared by the ClusterRoles and Roles of rbac.yaml. */}}
{{- define "sko.rules.namespacedKinds" -}}
- apiGroups: ["stripekeys.io"]
  resources: ["stripekeypolicies", "stripewebhookendpoints"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["stripekeys.io"]
  resources: ["stripekeypolicies/status", "stripewebhookendpoints/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["stripekeys.io"]
  resources: ["stripekeypolicies/finalizers", "stripewebhookendpoints/finalizers"]
  verbs: ["update"]
{{- end }}
{{- define "sko.rules.clusterKinds" -}}
- apiGroups: ["stripekeys.io"]
  resources: ["stripeaccounts", "stripeguardrails"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["stripekeys.io"]
  resources: ["stripeaccounts/status", "stripeguardrails/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
{{- end }}
{{- define "sko.rules.secrets" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
{{- end }}
{{- define "sko.rules.workloads" -}}
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- define "sko.rules.events" -}}
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
{{- define "sko.rules.lease" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: [{{ include "sko.leaseName" . | quote }}]
  verbs: ["get", "update"]
{{- end }}
{{- define "sko.rules.webhook" -}}
- apiGroups: ["admissionregistration.k8s.io"]
  resources: ["validatingwebhookconfigurations"]
  resourceNames: [{{ include "sko.webhookName" . | quote }}]
  verbs: ["get", "patch", "update"]
{{- end }}

{{/* Names: <release>-pdserve unless overridden, cut to 52 so suffixes fit in 63. */}}
{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: pass (dict "ctx" $ "component" "router"). */}}
{{- define "pdserve.selector" -}}
app.kubernetes.io/name: {{ include "pdserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "pdserve.rayClusterName" -}}
{{- include "pdserve.fullname" . -}}
{{- end -}}

{{- define "pdserve.redisHost" -}}
{{- printf "%s-redis" (include "pdserve.fullname" .) -}}
{{- end -}}

{{/* PDSERVE_REDIS_URL (and what it is built from): a Secret's URL, or the internal Redis. */}}
{{- define "pdserve.redisEnv" -}}
{{- if eq .Values.redis.mode "external" }}
- name: PDSERVE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.key }}
{{- else if .Values.redis.auth.existingSecret }}
- name: PDSERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.auth.existingSecret }}
      key: {{ .Values.redis.auth.key }}
- name: PDSERVE_REDIS_URL
  value: {{ printf "redis://:$(PDSERVE_REDIS_PASSWORD)@%s:6379/0" (include "pdserve.redisHost" .) | quote }}
{{- else }}
- name: PDSERVE_REDIS_URL
  value: {{ printf "redis://%s:6379/0" (include "pdserve.redisHost" .) | quote }}
{{- end }}
{{- end -}}

{{/* values.extraEnv, for every pdserve container (may be empty). */}}
{{- define "pdserve.extraEnv" -}}
{{- with .Values.extraEnv }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/* The router's keys, from Secrets only. */}}
{{- define "pdserve.keyEnv" -}}
{{- with .Values.secrets.apiKeys.existingSecret }}
- name: PDSERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.secrets.apiKeys.key }}
{{- end }}
{{- with .Values.secrets.adminApiKeys.existingSecret }}
- name: PDSERVE_ADMIN_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.secrets.adminApiKeys.key }}
{{- end }}
{{- end -}}

{{/* Container securityContext; pass (dict "ctx" $ "readOnly" bool). */}}
{{- define "pdserve.securityContext" -}}
{{- toYaml (merge (dict "readOnlyRootFilesystem" .readOnly) .ctx.Values.securityContext) }}
{{- end -}}

{{/* Volumes every pdserve container gets: the config, a writable /tmp and a writable home (Ray
     writes ~/.ray, e.g. its auth token, which a read-only root filesystem refuses). */}}
{{- define "pdserve.volumes" -}}
- name: config
  configMap:
    name: {{ include "pdserve.fullname" . }}-config
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "pdserve.volumeMounts" -}}
- name: config
  mountPath: /etc/pdserve
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/pdserve
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* `pdserve launch` argv. The RayJob's entrypoint cannot carry the Redis URL (the submitter pod's
     shell would expand it, and Ray stores the entrypoint): it comes from cluster.yaml (the internal
     Redis without a password) or from $PDSERVE_REDIS_URL, which the head container has from a Secret. */}}
{{- define "pdserve.launchArgs" -}}
{{- concat (list "pdserve" "launch" "--config" "/etc/pdserve/cluster.yaml") .Values.launcher.extraArgs | join " " -}}
{{- end -}}

{{/* cluster.yaml: values.cluster, plus the Redis URL when it is no secret (the internal Redis), plus
     each role's placement (`pdserve launch` asks for the Ray resource pdserve_<role> that the pools
     hosting the role advertise, and for a GPU where those pools have GPUs) unless values set it. */}}
{{- define "pdserve.clusterConfig" -}}
{{- $cfg := deepCopy .Values.cluster -}}
{{- if and (eq .Values.redis.mode "internal") (not .Values.redis.auth.existingSecret) -}}
{{- $_ := set $cfg "redis_url" (printf "redis://%s:6379/0" (include "pdserve.redisHost" .)) -}}
{{- end -}}
{{- $placement := deepCopy (default dict $cfg.placement) -}}
{{- range $role := list "prefill" "decode" "mixed" -}}
{{- $hosting := list -}}
{{- range $.Values.ray.pools -}}{{- if has $role .roles -}}{{- $hosting = append $hosting . -}}{{- end -}}{{- end -}}
{{- if $hosting -}}
{{- $pool := deepCopy (default dict (get $placement $role)) -}}
{{- if not (hasKey $pool "resources") -}}
{{- $_ := set $pool "resources" (dict (printf "pdserve_%s" $role) 1) -}}
{{- end -}}
{{- $gpus := true -}}
{{- range $hosting -}}{{- if not .gpus -}}{{- $gpus = false -}}{{- end -}}{{- end -}}
{{- if and $gpus (not (hasKey $pool "num_gpus")) -}}
{{- $_ := set $pool "num_gpus" 1 -}}
{{- end -}}
{{- $_ := set $placement $role $pool -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "placement" $placement -}}
{{- toYaml $cfg -}}
{{- end -}}

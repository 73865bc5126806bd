#!/bin/bash
# Triton's entrypoint (ConfigMap triton-launcher): tritonserver with explicit model control,
# loading the release the pointer names (ConfigMap model-release: $RELEASE, $PREVIOUS_RELEASE)
# and nothing else, so a training run's new export, or anything else on the volume
# (lost+found), is never served by itself. Arguments are passed on to tritonserver.
#
# Required: the $REQUIRED_ENSEMBLES of $RELEASE (<name>_r<N>, each loading its tokenizer and
# encoder versions). Not on the volume: this exits 1 (Triton itself would skip an unknown
# model and report ready), the container restarts with back-off until the release is
# exported, and a rollout to it stops at its first pod. On the volume but failing to load:
# the pod stays NotReady (strict readiness).
# Where the release has them: the $OPTIONAL_ENSEMBLES (<name>_r<N>) and the
# $OPTIONAL_MODELS (loaded under their version_policy). The same for $PREVIOUS_RELEASE, all
# optional, so gateways still pinned to it keep answering while they roll. A version folder
# exists only once complete: the exporter renames it into place.
set -euo pipefail
repository=""
for arg in "$@"; do
  case "$arg" in
    --model-repository=*) repository=${arg#*=} ;;
    --model-control-mode=* | --load-model=*)
      echo "load-release.sh sets $arg itself (explicit, from the release pointer)" >&2
      exit 2
      ;;
  esac
done
: "${repository:?pass --model-repository=<path>}"
release=${RELEASE:?RELEASE (the release pointer) is not set}
previous=${PREVIOUS_RELEASE:-$release}

loads=()
for ensemble in ${REQUIRED_ENSEMBLES:?}; do
  # Triton would skip a model that is not in the repository and still report ready.
  if [[ ! -d "$repository/${ensemble}_r${release}/${release}" ]]; then
    echo "release $release is not in $repository (no ${ensemble}_r${release}/${release}):" \
      "export it, or point model-release at a release that is there" >&2
    exit 1
  fi
  loads+=("--load-model=${ensemble}_r${release}")
done
for ensemble in ${OPTIONAL_ENSEMBLES:-}; do
  if [[ -d "$repository/${ensemble}_r${release}/${release}" ]]; then
    loads+=("--load-model=${ensemble}_r${release}")
  fi
done
if [[ "$previous" != "$release" ]]; then
  for ensemble in ${REQUIRED_ENSEMBLES} ${OPTIONAL_ENSEMBLES:-}; do
    if [[ -d "$repository/${ensemble}_r${previous}/${previous}" ]]; then
      loads+=("--load-model=${ensemble}_r${previous}")
    fi
  done
fi
for model in ${OPTIONAL_MODELS:-}; do
  if [[ -d "$repository/$model/$release" || -d "$repository/$model/$previous" ]]; then
    loads+=("--load-model=$model")
  fi
done

echo "release $release (previous $previous): ${loads[*]}" >&2
exec tritonserver --model-control-mode=explicit "${loads[@]}" "$@"

#!/usr/bin/env bash
# The base image of docker/*.Dockerfile on a machine that reaches no container registry:
# a Debian bookworm root filesystem made with debootstrap (from the apt mirror this host uses)
# and `docker import`ed under TAG, with Debian's Python 3.11 (venv, pip) as `python`. It
# stands in for python:3.11-slim-bookworm, the base elsewhere (PYTHON_IMAGE build argument).
# The host's CA bundle replaces Debian's, so a build with --network host reaches the package
# index through this host's TLS trust. Cached: nothing happens when TAG already exists.
#   docker/base.sh [TAG]        (DOCKER_HOST names the engine; needs root and debootstrap)
set -euo pipefail
TAG="${1:-recsys/base:bookworm-python3.11}"
if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo ">> base image $TAG exists"
  exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
# The mirror this host's apt uses (deb822 sources first, then the one-line format).
MIRROR="$(sed -nE 's/^URIs:[[:space:]]*(\S+\/debian)\/?$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)"
[ -n "$MIRROR" ] || MIRROR="$(sed -nE 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?(\S+\/debian)\/?[[:space:]]+bookworm[[:space:]].*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n1 || true)"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
ROOT="$(mktemp -d "${TMPDIR:-/tmp}/recsys-base.XXXXXX")"
trap 'rm -rf "$ROOT"' EXIT
echo ">> debootstrap bookworm (minbase, python3.11) from $MIRROR"
debootstrap --variant=minbase \
  --include=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,python-is-python3,ca-certificates,passwd \
  bookworm "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || { tail -n 30 "$ROOT.log" >&2; exit 1; }
rm -f "$ROOT.log"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
# what a slim image does not carry: apt lists and caches, documentation, locales
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb \
  "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/locale/* "$ROOT"/dev/*
echo ">> docker import -> $TAG"
tar -C "$ROOT" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3.11"]' - "$TAG"

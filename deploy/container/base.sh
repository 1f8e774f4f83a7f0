#!/usr/bin/env bash
# Builds a local Debian bookworm base image for Containerfile, for machines
# that reach a Debian mirror but no image registry:
#
#   deploy/container/base.sh                 # makes kasparro-base:bookworm
#   podman build --format docker --build-arg BASE_IMAGE=localhost/kasparro-base:bookworm \
#       -t kasparro:local -f Containerfile .
#
# Needs root, debootstrap and podman (or docker: set ENGINE=docker). The base
# holds what the image needs from the system: Python 3.11 with venv, tini
# (PID 1) and the CA certificates for the HTTPS sources. The certificates this
# machine added to its own trust store (LOCAL_CA_DIR: a proxy that inspects
# TLS, a private package index) are trusted in the base too, so that pip can
# reach the index from the build as it does from here.
set -euo pipefail

TAG=${1:-kasparro-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ENGINE=${ENGINE:-podman}
LOCAL_CA_DIR=${LOCAL_CA_DIR:-/usr/local/share/ca-certificates}

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase \
    --include=python3,python3-venv,tini,ca-certificates \
    bookworm "$root" "$MIRROR"
if compgen -G "$LOCAL_CA_DIR/*.crt" >/dev/null; then
    cp "$LOCAL_CA_DIR"/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates
fi
# Keep the image small: no package lists, caches or documentation.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/locale/*
tar -C "$root" -c . | "$ENGINE" import \
    --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$TAG"
echo "built $TAG"

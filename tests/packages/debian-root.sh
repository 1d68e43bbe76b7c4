#!/bin/sh
# Prepare a Debian 12 root for tests/packages/test_installed_deb.py (make test-packages).
#
#   debian-root.sh CACHE DEB SCRATCH
#
# CACHE/bookworm is a pristine `debootstrap --variant=minbase bookworm` root, made once
# (about 40 s) and kept between runs; CACHE/bookworm/.debootstrap-complete marks it finished,
# so an interrupted debootstrap is never taken for a root. The .deb's dependencies and
# bsd-mailx are downloaded into the cached root's apt archive (only what is missing, so a
# cached run needs no network unless DEB's dependencies changed), and procmail, because the test
# itself installs them with the network namespace cut off.
# SCRATCH (must not exist) becomes a copy of the cached root with DEB at /tmp/elemta.deb.
# Nothing is mounted here: the test mounts /proc and /dev/shm inside its own private
# mount namespace, so no mount of this script can outlive it or be removed through.
set -eu

cache=$1 deb=$2 scratch=$3
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$cache/bookworm

if [ "$(id -u)" != 0 ]; then
    echo "debian-root.sh: debootstrap and chroot need root" >&2
    exit 77
fi
mkdir -p "$cache"
# One run at a time prepares the cache (a second waits instead of racing debootstrap).
exec 9>"$cache/.lock"
flock 9
if [ ! -e "$root/.debootstrap-complete" ]; then
    rm -rf "$root" "$root.new"
    echo "debian-root.sh: debootstrap bookworm into $root (first run only)"
    debootstrap --variant=minbase bookworm "$root.new" "$mirror" >"$cache/debootstrap.log" 2>&1 \
        || { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
    mv "$root.new" "$root"
    chroot "$root" apt-get clean     # debootstrap's own downloads: not worth copying each run
    chroot "$root" apt-get update -q >/dev/null
    touch "$root/.debootstrap-complete"
fi

# What the test will install, downloaded into the cached root's apt archive. A Debian
# point release retires old package versions: then refresh the lists and try again.
cp "$deb" "$root/tmp/elemta.deb"
download() {
    chroot "$root" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -q -y --download-only /tmp/elemta.deb bsd-mailx procmail >/dev/null
}
download || { chroot "$root" apt-get update -q >/dev/null && download; }
rm -f "$root/tmp/elemta.deb"

cp -a "$root" "$scratch"
flock -u 9
cp "$deb" "$scratch/tmp/elemta.deb"

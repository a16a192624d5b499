#!/usr/bin/env bash
# corpus.sh NAME DIR — lay out a benchmark corpus under DIR/NAME and print its path.
#
#   stdlib  this Python's standard library sources (~40 MB, ~2.4k files); nothing is downloaded
#   linux   Linux 6.1 from Debian's linux-source-6.1 package (~1.3 GB, ~78k files); installs
#           the package (apt, as root or through sudo) when its tarball is not already there
#
# The tree is complete once DIR/NAME/.complete exists; a second call only prints the path.
# `kotadb bench search --corpus stdlib|linux` and tests/engine/test_differential.py call this.
set -euo pipefail

name=${1:?usage: corpus.sh stdlib|linux DIR}
root=${2:?usage: corpus.sh stdlib|linux DIR}
dest="$root/$name"
if [ -e "$dest/.complete" ]; then
  echo "$dest"
  exit 0
fi
rm -rf "$dest"
mkdir -p "$dest"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

case "$name" in
  stdlib)
    python=${PYTHON:-python3}
    src=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    # Sources only: no installed packages, caches or compiled objects.
    (cd "$src" && tar -cf - --exclude=./site-packages --exclude=__pycache__ \
        --exclude='*.pyc' --exclude='*.so' --exclude='*.a' --exclude='*.o' .) | tar -C "$dest" -xf -
    ;;
  linux)
    tarball=$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -n1 || true)
    if [ -z "$tarball" ]; then
      as_root apt-get update -qq
      as_root apt-get install -y -qq linux-source-6.1 >/dev/null
      tarball=$(ls /usr/src/linux-source-6.1.tar.* | head -n1)
    fi
    tar -C "$dest" --strip-components=1 -xf "$tarball"
    ;;
  *)
    echo "corpus.sh: unknown corpus '$name' (stdlib or linux)" >&2
    exit 2
    ;;
esac
touch "$dest/.complete"
echo "$dest"

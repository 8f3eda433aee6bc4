#!/bin/sh
# Best effort: give MLX's Linux CPU backend a fast BLAS (OpenBLAS). Never fails the install.
[ "$(uname -s)" = "Linux" ] || exit 0
for f in /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 /usr/lib/*-linux-gnu/libopenblas.so.0; do
  [ -e "$f" ] && exit 0
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1; }) \
    && echo "installed OpenBLAS for MLX's CPU backend" && exit 0
fi
echo "hint: install OpenBLAS (Debian/Ubuntu: sudo apt-get install libopenblas0-pthread) for ~17x faster fp32 training on Linux"
exit 0

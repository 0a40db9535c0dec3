#!/usr/bin/env bash
# Apply (or check) megatron_dsv3's patches to a Megatron-LM checkout.
#
#   patches/apply.sh /path/to/Megatron-LM [RELEASE] [--check]
#
# RELEASE is a directory under patches/ named after the Megatron-LM tag the patches were made against
# (default core_v0.16.1). Each patch file's header names the tag, the commit and why it exists.
# Idempotent: a patch that is already applied is skipped. --check only reports what would happen.
# After applying, the script checks that the patched files still parse and carry the megatron_dsv3 marker.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mlm="${1:?usage: patches/apply.sh /path/to/Megatron-LM [RELEASE] [--check]}"
release="core_v0.16.1"
check=0
for a in "${@:2}"; do
  case "$a" in
    --check) check=1 ;;
    *) release="$a" ;;
  esac
done
dir="$here/$release"
[ -d "$dir" ] || { echo "no patches for release $release (have: $(ls -d "$here"/*/ | xargs -n1 basename | tr '\n' ' '))"; exit 2; }
[ -f "$mlm/pretrain_gpt.py" ] || { echo "$mlm does not look like a Megatron-LM checkout (no pretrain_gpt.py)"; exit 2; }

if git -C "$mlm" rev-parse HEAD >/dev/null 2>&1; then
  want="$(grep -ho 'commit [0-9a-f]\{40\}' "$dir"/*.patch | head -1 | cut -d' ' -f2)"
  have="$(git -C "$mlm" rev-parse HEAD)"
  if [ -n "$want" ] && [ "$have" != "$want" ]; then
    echo "note: $mlm is at $have, the patches were made against $release ($want); trying anyway"
  fi
fi

status=0
for p in "$dir"/*.patch; do
  name="$(basename "$p")"
  if patch -d "$mlm" -p1 -R --dry-run --silent < "$p" >/dev/null 2>&1; then
    echo "already applied: $name"
  elif patch -d "$mlm" -p1 --dry-run --silent < "$p" >/dev/null 2>&1; then
    if [ "$check" = 1 ]; then
      echo "would apply: $name"
    else
      patch -d "$mlm" -p1 --silent --no-backup-if-mismatch < "$p"
      echo "applied: $name"
    fi
  else
    echo "DOES NOT APPLY: $name (Megatron-LM differs from $release)"; status=1
  fi
done

if [ "$check" = 0 ] && [ "$status" = 0 ]; then
  for f in $(grep -h '^+++ ' "$dir"/*.patch | awk '{print $2}' | sed 's#^b/##' | sort -u); do
    python -c "import ast,sys; ast.parse(open(sys.argv[1]).read())" "$mlm/$f" || { echo "$f no longer parses"; exit 1; }
    grep -q megatron_dsv3 "$mlm/$f" || { echo "$f lacks the megatron_dsv3 marker"; exit 1; }
  done
  echo "checked: patched files parse and carry the megatron_dsv3 marker"
fi
exit $status

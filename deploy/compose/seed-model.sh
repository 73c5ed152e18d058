#!/bin/sh
# Entrypoint of the compose `seed` service (CPU image, as the cinflow user). Its
# arguments are a cinflow command line without the bundle folder, in compose.yaml:
#   publish-model --model-name cin-demo --model-alias current
# This script appends the model bundle that `make demo` wrote on the host
# (./demo-out, mounted read-only at /demo) and runs it, which uploads the bundle to
# the S3 registry in Garage and points the alias at it (re-running it with the
# same bundle changes nothing: no upload, and the alias stays where it is).
#
# The bundle: the newest version folder in demo-out/models (the demo built with
# the `train` feature, as `make demo` builds it, names versions by UTC time stamp,
# so the folder is only known at run time), else demo-out/models/tiny-demo (a
# build without the feature).
set -eu

models=/demo/models
bundle="$(ls -d "$models"/[0-9]*/ 2>/dev/null | sort | tail -n 1 || true)"
if [ -z "$bundle" ] && [ -d "$models/tiny-demo" ]; then
  bundle="$models/tiny-demo"
fi
if [ -z "$bundle" ] || [ ! -f "${bundle%/}/manifest.json" ]; then
  echo "seed: no model bundle in ./demo-out/models: run \`make demo\` on the host first" >&2
  exit 1
fi
bundle="${bundle%/}"

echo "seed: cinflow $* $bundle" >&2
exec cinflow "$@" "$bundle"

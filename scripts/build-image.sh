#!/usr/bin/env bash
# Build the pipeline's container images without a Docker engine (buildah), and run a command in one
# the way the Kubernetes manifests run their pods (scripts/run-image.py).
#
#   scripts/build-image.sh build                        # both images on python:3.11-slim-bookworm
#   scripts/build-image.sh build --base debootstrap     # on a local Debian bookworm base (no registry)
#   scripts/build-image.sh run --variant cpu -- configs
#
# Run `scripts/build-image.sh --help` for every option.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml" | head -n1)"

# Defaults; keep them equal to ClusterConfig.image / cpu_image (tests/test_dockerfile.py checks).
image_repo="${RLM_IMAGE_REPO:-ghcr.io/rlm-pipeline/rlm-pipeline}"
tag="${RLM_IMAGE_TAG:-$version}"
base="${RLM_BASE_IMAGE:-python:3.11-slim-bookworm}"
cache="${RLM_IMAGE_CACHE:-/var/tmp/rlm-image-build}"
driver="${STORAGE_DRIVER:-vfs}"
debian_mirror="${RLM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
local_base="localhost/rlm-base:bookworm-python3.11"
torch_cpu_index="https://download.pytorch.org/whl/cpu"
torch_wheels=""
ca_bundle=""
[[ -f /etc/ssl/certs/ca-certificates.crt ]] && ca_bundle=/etc/ssl/certs/ca-certificates.crt
variant="all"
reuse=0
rebuild_base=0

usage() {
  cat <<EOF
Usage: scripts/build-image.sh build [options]   build the image(s)
       scripts/build-image.sh base  [options]   only build the local Debian base (for --base debootstrap)
       scripts/build-image.sh refs  [options]   print the image names 'build' makes
       scripts/build-image.sh run   [--variant gpu|cpu | --image REF] [run options] [--] ARGS...
                                                run ARGS through the image's ENTRYPOINT as its user, with a
                                                read-only root filesystem and writable /tmp and /work, like
                                                the pods (scripts/run-image.py --help lists the run options)

Two images from the one Dockerfile (build arg TORCH):
  gpu  $image_repo:$tag       torch from PyPI (CUDA build, nvidia-* wheels): train and evaluate pods
  cpu  $image_repo:$tag-cpu   CPU-only torch: driver, prepare, MLflow and bucket pods (no CUDA, far smaller)

Options:
  --variant gpu|cpu|all   which image(s) to build (default all)
  --base IMAGE:TAG        base image of both stages (build args BASE_IMAGE, BASE_TAG; default \$RLM_BASE_IMAGE or
                          python:3.11-slim-bookworm). 'debootstrap': a Debian bookworm + python3.11 base made
                          here with debootstrap ($local_base), for hosts that reach
                          package registries but not a container registry
  --repo NAME             image repository (default \$RLM_IMAGE_REPO or ghcr.io/rlm-pipeline/rlm-pipeline)
  --tag TAG               image tag (default \$RLM_IMAGE_TAG or the project version, $version); cpu appends -cpu
  --torch-cpu-index URL   where the cpu image gets torch (default $torch_cpu_index)
  --torch-wheels DIR      take the cpu image's torch from a folder of wheels instead of an index (e.g. a
                          local torch-*+cpu wheel where download.pytorch.org is not reachable)
  --ca-bundle FILE        CA bundle pip uses during the build (default the host's
                          /etc/ssl/certs/ca-certificates.crt; 'none': pip's own). A build secret, never
                          stored in the image; so is a pip.conf made from the host's PIP_INDEX_URL /
                          PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST (a registry mirror)
  --reuse                 keep an existing image whose build inputs (Dockerfile, sources, build args, git
                          commit) are unchanged (label org.rlm-pipeline.inputs) instead of rebuilding it
  --rebuild-base          rebuild the debootstrap base even if it exists
  --cache DIR             debootstrap root and build scratch (default \$RLM_IMAGE_CACHE or /var/tmp/rlm-image-build)
  --storage-driver NAME   buildah storage driver (default \$STORAGE_DRIVER or vfs: works on any filesystem)
  -h, --help              this help

Needs root and buildah; debootstrap for --base debootstrap, runc (or crun) for run:
apt-get install buildah debootstrap runc
Push with: buildah --storage-driver $driver push $image_repo:$tag docker://$image_repo:$tag
EOF
}

die() { echo "build-image.sh: $*" >&2; exit 2; }
bh() { buildah --storage-driver "$driver" "$@"; }
now() { date +%s; }

command="${1:-}"
case "$command" in
  -h|--help|help) usage; exit 0 ;;
  build|base|refs) shift ;;
  run)
    shift
    exec python3 "$repo/scripts/run-image.py" --storage-driver "$driver" \
      --default-image "$image_repo:$tag" --default-cpu-image "$image_repo:$tag-cpu" "$@" ;;
  "") usage >&2; exit 2 ;;
  *) die "unknown command '$command'; expected build, base, refs or run (see --help)" ;;
esac

while [[ $# -gt 0 ]]; do
  case "$1" in
    --variant) variant="${2:?--variant needs gpu, cpu or all}"; shift 2 ;;
    --base) base="${2:?--base needs an image or 'debootstrap'}"; shift 2 ;;
    --repo) image_repo="${2:?--repo needs a name}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a tag}"; shift 2 ;;
    --torch-cpu-index) torch_cpu_index="${2:?--torch-cpu-index needs a URL}"; shift 2 ;;
    --torch-wheels) torch_wheels="${2:?--torch-wheels needs a folder}"; shift 2 ;;
    --ca-bundle) ca_bundle="${2:?--ca-bundle needs a file or 'none'}"; shift 2 ;;
    --reuse) reuse=1; shift ;;
    --rebuild-base) rebuild_base=1; shift ;;
    --cache) cache="${2:?--cache needs a folder}"; shift 2 ;;
    --storage-driver) driver="${2:?--storage-driver needs a name}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

case "$variant" in
  gpu|cpu) variants=("$variant") ;;
  all) variants=(gpu cpu) ;;
  *) die "--variant must be gpu, cpu or all, not '$variant'" ;;
esac
[[ "$tag" != "latest" ]] || die "--tag latest: the manifests refuse unpinned images; give a version tag"

# The Dockerfile takes the base as BASE_IMAGE:BASE_TAG (a tag is never left out; a digest may follow it).
split_base() {
  local ref="$1" digest=""
  if [[ "$ref" == *@* ]]; then digest="@${ref#*@}"; ref="${ref%%@*}"; fi
  base_tag="${ref##*:}"
  if [[ "$ref" != *:* || "$base_tag" == */* ]]; then
    die "--base $1 has no tag: give IMAGE:TAG (or IMAGE:TAG@sha256:...), e.g. python:3.11-slim-bookworm"
  fi
  [[ "$base_tag" != latest ]] || die "--base $1: use a version tag, not latest"
  base_name="${ref%:*}"
  base_tag="$base_tag$digest"
}
[[ "$base" == debootstrap ]] || split_base "$base"

ref_of() { if [[ "$1" == cpu ]]; then echo "$image_repo:$tag-cpu"; else echo "$image_repo:$tag"; fi; }

if [[ "$command" == refs ]]; then
  for v in "${variants[@]}"; do echo "$v $(ref_of "$v")"; done
  exit 0
fi

[[ $EUID -eq 0 ]] || die "needs root (buildah with --isolation chroot and vfs storage); run it with sudo"
command -v buildah >/dev/null || die "buildah is not installed: apt-get install buildah"

# ---------------------------------------------------------------------------------------------
# The local base: what python:3.11-slim-bookworm provides (Debian bookworm, CPython 3.11 with venv
# and pip, CA certificates, python/python3 in /usr/local/bin), from Debian's own packages.

# debootstrap mounts /proc and /sys inside the root; a failed run can leave them mounted.
unmount_under() {
  local mount
  findmnt -rn -o TARGET | { grep -F "$1/" || true; } | sort -r | while read -r mount; do umount -l "$mount"; done
}

remove_rootfs() {
  [[ -e "$1" ]] || return 0
  unmount_under "$1"
  rm -rf --one-file-system "$1"
}

build_base() {
  if [[ $rebuild_base -eq 0 ]] && bh inspect --type image "$local_base" >/dev/null 2>&1; then
    echo "base: $local_base exists (--rebuild-base to make it again)"
    return
  fi
  command -v debootstrap >/dev/null || die "debootstrap is not installed: apt-get install debootstrap"
  local start rootfs ctr mnt
  start=$(now)
  rootfs="$cache/rootfs-bookworm"
  remove_rootfs "$rootfs"
  mkdir -p "$cache"
  echo "base: debootstrap bookworm from $debian_mirror into $rootfs"
  # python3-distutils provides python3.11-distutils, which python3.11-venv needs: debootstrap does not
  # resolve virtual packages, so it is named here (as are the wheels ensurepip installs).
  if ! debootstrap --variant=minbase \
      --include=python3.11,python3.11-venv,python3-distutils,python3-pip-whl,python3-setuptools-whl,ca-certificates \
      bookworm "$rootfs" "$debian_mirror" >"$cache/debootstrap.log" 2>&1; then
    tail -n 20 "$rootfs/debootstrap/debootstrap.log" "$cache/debootstrap.log" >&2 2>/dev/null || true
    remove_rootfs "$rootfs"
    die "debootstrap failed (log above; the mirror is \$RLM_DEBIAN_MIRROR, now $debian_mirror)"
  fi
  # The official image's layout: the Dockerfile and the manifests call python / python3.
  ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python3"
  ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python"
  unmount_under "$rootfs"
  # No package lists, caches or host-specific files in the image (the runtime provides resolv.conf, hosts, hostname).
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/* "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname "$rootfs"/dev/*
  ctr=$(bh from scratch)
  mnt=$(bh mount "$ctr")
  cp -a "$rootfs/." "$mnt/"
  bh umount "$ctr" >/dev/null
  bh config --env LANG=C.UTF-8 --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd python3 --os linux --arch amd64 \
    --label org.opencontainers.image.description="Debian bookworm minbase + python3.11 (scripts/build-image.sh base)" \
    "$ctr"
  bh commit --quiet --rm "$ctr" "$local_base" >/dev/null
  remove_rootfs "$rootfs"
  echo "base: built $local_base in $(( $(now) - start ))s"
}

if [[ "$command" == base || "$base" == debootstrap ]]; then
  build_base
  [[ "$command" == base ]] && exit 0
  base="$local_base"
  split_base "$base"
fi

# ---------------------------------------------------------------------------------------------
# The images

# What pip in the build's RUN steps needs from this host (a TLS-intercepting proxy's CA, a mirror),
# given as build secrets (the Dockerfile's pip.conf and build-ca.crt): no image layer keeps them.
mkdir -p "$cache"
build_secrets=()
pipconf="$cache/pip.conf"
{
  echo "[global]"
  if [[ -n "$ca_bundle" && "$ca_bundle" != none ]]; then
    [[ -f "$ca_bundle" ]] || die "--ca-bundle $ca_bundle does not exist"
    build_secrets+=(--secret "id=build-ca.crt,src=$(realpath "$ca_bundle")")
    echo "cert = /run/secrets/build-ca.crt"
  fi
  [[ -n "${PIP_INDEX_URL:-}" ]] && echo "index-url = $PIP_INDEX_URL"
  extra=""
  for url in ${PIP_EXTRA_INDEX_URL:-}; do [[ "$url" == file:* ]] || extra+=" $url"; done  # host folders are not in the build
  [[ -n "$extra" ]] && echo "extra-index-url =$extra"
  [[ -n "${PIP_TRUSTED_HOST:-}" ]] && echo "trusted-host = $PIP_TRUSTED_HOST"
  true
} >"$pipconf"
chmod 0600 "$pipconf"  # an index URL may carry credentials
build_secrets+=(--secret "id=pip.conf,src=$pipconf")

commit="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ "$commit" != unknown ]] && [[ -n "$(git -C "$repo" status --porcelain -- Dockerfile pyproject.toml constraints.txt models pipeline mlflow 2>/dev/null)" ]]; then
  commit="$commit-dirty"  # uncommitted changes in what the image holds
fi

# A digest of everything that decides an image's content (and its GIT_COMMIT), for --reuse.
inputs_digest() {  # variant
  {
    printf '%s\n' "$1" "$base" "$commit"
    [[ "$1" == cpu ]] && printf '%s\n' "$torch_cpu_index" "$torch_wheels"
    (cd "$repo" && find Dockerfile .dockerignore pyproject.toml constraints.txt README.md models pipeline mlflow \
        -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum)
    [[ "$1" == cpu && -n "$torch_wheels" ]] && (cd "$torch_wheels" && ls -l -- *.whl 2>/dev/null)
    true
  } | sha256sum | cut -c1-32
}

for v in "${variants[@]}"; do
  ref="$(ref_of "$v")"
  digest="$(inputs_digest "$v")"
  if [[ $reuse -eq 1 ]]; then
    have="$(bh inspect --type image --format '{{index .OCIv1.Config.Labels "org.rlm-pipeline.inputs"}}' "$ref" 2>/dev/null || true)"
    if [[ "$have" == "$digest" ]]; then
      echo "$v: $ref is up to date (inputs $digest); not rebuilt (drop --reuse to force)"
      continue
    fi
  fi
  args=(--build-arg "BASE_IMAGE=$base_name" --build-arg "BASE_TAG=$base_tag"
        --build-arg "TORCH=$( [[ $v == cpu ]] && echo cpu || echo cuda )"
        --build-arg "GIT_COMMIT=$commit" --label "org.rlm-pipeline.inputs=$digest")
  if [[ "$v" == cpu ]]; then
    if [[ -n "$torch_wheels" ]]; then
      [[ -d "$torch_wheels" ]] || die "--torch-wheels $torch_wheels is not a folder"
      compgen -G "$torch_wheels/torch-*.whl" >/dev/null || die "--torch-wheels $torch_wheels holds no torch-*.whl"
      # an empty index: the torch-wheels build context only
      args+=(--build-context "torch-wheels=$(realpath "$torch_wheels")" --build-arg "TORCH_CPU_INDEX=")
    else
      args+=(--build-arg "TORCH_CPU_INDEX=$torch_cpu_index")
    fi
  fi
  if [[ "$base" == localhost/* ]]; then
    args+=(--pull-never)  # made here, never in a registry
  fi
  echo "$v: building $ref on $base"
  before="$(bh containers --quiet --notruncate 2>/dev/null || true)"
  old_id="$(bh inspect --type image --format '{{.FromImageID}}' "$ref" 2>/dev/null || true)"
  start=$(now)
  log="$cache/build-$v.log"
  status=0
  bh bud --isolation chroot --format docker "${build_secrets[@]}" "${args[@]}" -t "$ref" -f "$repo/Dockerfile" "$repo" \
    2>&1 | tee "$log" || status=$?
  # buildah 1.28 leaves the working container of the (empty) torch-wheels stage behind, built or not
  bh containers --notruncate --format '{{.ContainerID}} {{.ImageName}}' 2>/dev/null | while read -r id image; do
    if [[ "$image" == scratch ]] && ! grep -qx "$id" <<<"$before"; then bh rm "$id" >/dev/null || true; fi
  done
  if [[ $status -ne 0 ]]; then
    hint=""
    [[ "$base" == localhost/* ]] || hint="; where $base cannot be pulled, --base debootstrap makes a local base"
    [[ "$v" != cpu || -n "$torch_wheels" ]] || hint+="; where $torch_cpu_index cannot be reached, --torch-wheels DIR"
    die "building the $v image failed (log: $log)$hint"
  fi
  echo "$v: built $ref in $(( $(now) - start ))s"
  # The image this one replaced (gigabytes in vfs storage) and its run container (scripts/run-image.py),
  # once nothing names it any more.
  if [[ -n "$old_id" ]] && bh images --quiet --no-trunc --filter dangling=true | grep -q "$old_id"; then
    bh rm "rlm-run-${old_id:0:12}" >/dev/null 2>&1 || true
    if bh rmi "$old_id" >/dev/null 2>&1; then echo "$v: removed the image it replaced (${old_id:0:12})"; fi
  fi
done

bh images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -F -e "$image_repo" -e "$local_base" || true

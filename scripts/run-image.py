#!/usr/bin/env python3
"""Run a command in a locally built image (buildah storage) the way the Kubernetes manifests run
their containers: as the image's user (10001), a read-only root filesystem, writable volumes only
where the pods mount them (default: emptyDir-like tmpfs on /tmp and /work), no capabilities, no
privilege escalation, its own PID / IPC / UTS / mount (and, by default, network) namespaces.

    scripts/build-image.sh run --variant cpu -- configs
    scripts/build-image.sh run -v /var/tmp/w:/work -- run --config demo --train.max_steps 20
    scripts/build-image.sh run --variant cpu --network host --no-default-tmpfs -v /var/tmp/db:/mlflow \
        -v /var/tmp/t:/tmp --entrypoint /app/mlflow/serve.sh

The OCI runtime is runc (the one under most Kubernetes nodes; or --runtime crun) on a bundle whose
root is a buildah working container of the image (``rlm-run-<image id>``, made once and shared by
every run of that image: the root is mounted read-only, so no run changes it). Needs root; stdlib.
The exit code is the command's; 124 when --timeout ran out.

Not reproduced: the pod's seccomp profile (RuntimeDefault), cgroup limits, GPUs.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("RLM_IMAGE_CACHE", "/var/tmp/rlm-image-build"))
DEFAULT_TMPFS = ("/tmp", "/work")
# runc first: crun 1.8 refuses hosts whose cgroup v2 hierarchy has controllers in hybrid mode.
RUNTIMES = ("runc", "crun")  # the emptyDirs of a stage pod (pipeline/k8s/builders.py)

# Kernel interfaces a container must not read or change (the defaults of Docker / Kubernetes runtimes).
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap"]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def fail(message: str) -> None:
    print(f"run-image.py: {message}", file=sys.stderr)
    sys.exit(2)


def buildah(driver: str, *args: str) -> str:
    result = subprocess.run(["buildah", "--storage-driver", driver, *args], capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"buildah {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def image_config(driver: str, image: str) -> tuple[str, dict]:
    """The image's ID and its OCI config (User, Env, Entrypoint, Cmd, WorkingDir)."""
    result = subprocess.run(["buildah", "--storage-driver", driver, "inspect", "--type", "image", image],
                            capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"no image {image} in buildah's {driver} storage: build it first (scripts/build-image.sh build); "
             f"buildah said: {result.stderr.strip()}")
    info = json.loads(result.stdout)
    return info["FromImageID"], info["OCIv1"].get("config", {})


def read_only_root(driver: str, image: str, image_id: str) -> str:
    """The mounted root of the shared working container of ``image`` (made on first use)."""
    name = f"rlm-run-{image_id[:12]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "run-image.lock", "w") as lock:  # concurrent runs of one image share the container
        fcntl.flock(lock, fcntl.LOCK_EX)
        names = json.loads(buildah(driver, "containers", "--json") or "null") or []  # "null" when there are none
        if not any(c.get("containername") == name for c in names):
            buildah(driver, "from", "--pull-never", "--name", name, image)
        return buildah(driver, "mount", name)


def parse_user(user: str) -> tuple[int, int]:
    uid, _, gid = (user or "0").partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        fail(f"user {user!r} is not numeric UID[:GID] (Kubernetes' runAsNonRoot needs a numeric user)")
    return int(uid), int(gid or uid)


def volume(spec: str) -> dict:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        fail(f"--volume {spec!r}: expected HOST:CONTAINER[:ro|rw]")
    host, dest = os.path.abspath(parts[0]), parts[1]
    if not os.path.exists(host):
        fail(f"--volume {spec!r}: {host} does not exist")
    mode = parts[2] if len(parts) == 3 else "rw"
    return {"destination": dest, "type": "bind", "source": host, "options": ["rbind", "nosuid", "nodev", mode]}


def hosts_file(bundle: Path, hostname: str) -> str:
    # What the kubelet writes: the pod's hostname resolves (torch's gloo looks it up).
    path = bundle / "hosts"
    path.write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n")
    return str(path)


def spec(args: argparse.Namespace, root: str, config: dict, bundle: Path) -> dict:
    uid, gid = parse_user(args.user or config.get("User", ""))
    if uid == 0:
        fail("the image runs as root; the manifests require a non-root user (runAsNonRoot)")
    entrypoint = [args.entrypoint] if args.entrypoint else (config.get("Entrypoint") or [])
    command = args.args if args.args or args.entrypoint else (config.get("Cmd") or [])
    argv = [*entrypoint, *command]
    if not argv:
        fail("nothing to run: the image has no ENTRYPOINT / CMD and no command was given")
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    for item in args.env:
        if "=" not in item:
            fail(f"--env {item!r}: expected NAME=VALUE")
        key, value = item.split("=", 1)
        env[key] = value
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={args.shm_size}"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": hosts_file(bundle, args.hostname), "options": ["rbind", "ro"]},
    ]
    if args.network == "host":
        mounts.append({"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf", "options": ["rbind", "ro"]})
    volumes = [volume(v) for v in args.volume]
    taken = {m["destination"] for m in volumes}
    tmpfs = [*([] if args.no_default_tmpfs else DEFAULT_TMPFS), *args.tmpfs]
    for dest in tmpfs:
        if dest not in taken:  # an emptyDir: owned by root, group-writable by the pod's fsGroup
            mounts.append({"destination": dest, "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777" if dest == "/tmp" else "mode=2775", f"gid={gid}"]})
    mounts += volumes
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if args.network == "none":
        namespaces.append({"type": "network"})  # loopback only
    no_caps: dict[str, list] = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, "additionalGids": [gid]},  # fsGroup
            "args": argv,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": args.workdir or config.get("WorkingDir") or "/",
            "capabilities": no_caps,  # capabilities: drop: [ALL]
            "noNewPrivileges": True,  # allowPrivilegeEscalation: false
        },
        "root": {"path": root, "readonly": True},  # readOnlyRootFilesystem: true
        "hostname": args.hostname,
        "mounts": mounts,
        "linux": {"namespaces": namespaces, "maskedPaths": MASKED, "readonlyPaths": READONLY},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/build-image.sh run", description=__doc__.split("\n\n")[0],
        epilog="Everything after the options (or after --) is passed to the ENTRYPOINT, like `docker run IMAGE ARGS`.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--image", help="image reference in buildah's storage")
    which.add_argument("--variant", choices=("gpu", "cpu"), default="gpu", help="the image build-image.sh built (default gpu)")
    parser.add_argument("--default-image", default="ghcr.io/rlm-pipeline/rlm-pipeline:0.1.0", help=argparse.SUPPRESS)
    parser.add_argument("--default-cpu-image", default="ghcr.io/rlm-pipeline/rlm-pipeline:0.1.0-cpu", help=argparse.SUPPRESS)
    parser.add_argument("--entrypoint", help="run this executable instead of the ENTRYPOINT (a pod's `command`)")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE", help="set an environment variable")
    parser.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CONTAINER[:ro]",
                        help="bind a host folder or file (a volume of the pod)")
    parser.add_argument("--tmpfs", action="append", default=[], metavar="PATH", help="another writable empty folder")
    parser.add_argument("--no-default-tmpfs", action="store_true",
                        help=f"no writable {' and '.join(DEFAULT_TMPFS)} unless given with -v / --tmpfs (pods without them)")
    parser.add_argument("-w", "--workdir", help="working directory (default the image's)")
    parser.add_argument("-u", "--user", help="UID:GID (default the image's USER)")
    parser.add_argument("--network", choices=("none", "host"), default="none",
                        help="none: loopback only (default); host: the host's network (S3, MLflow on this machine)")
    parser.add_argument("--hostname", default="rlm-pod")
    parser.add_argument("--shm-size", default="1g", help="size of /dev/shm (default 1g)")
    parser.add_argument("--timeout", type=float, help="kill the container after this many seconds (exit code 124)")
    parser.add_argument("--runtime", default=next((r for r in RUNTIMES if shutil.which(r)), RUNTIMES[0]),
                        help="OCI runtime: runc (default) or crun")
    parser.add_argument("--storage-driver", default=os.environ.get("STORAGE_DRIVER", "vfs"))
    parser.add_argument("--print-spec", action="store_true", help="print the OCI config.json and run nothing")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the ENTRYPOINT")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.args and args.args[0] == "--":
        args.args = args.args[1:]
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        fail("needs root (buildah storage and an OCI runtime); run it with sudo")
    for tool in ("buildah", args.runtime):
        if not shutil.which(tool):
            fail(f"{tool} is not installed: apt-get install buildah runc")
    image = args.image or (args.default_cpu_image if args.variant == "cpu" else args.default_image)

    image_id, config = image_config(args.storage_driver, image)
    root = read_only_root(args.storage_driver, image, image_id)
    (CACHE / "bundles").mkdir(parents=True, exist_ok=True)
    bundle = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE / "bundles"))
    name = f"rlm-{bundle.name}"
    try:
        (bundle / "config.json").write_text(json.dumps(spec(args, root, config, bundle), indent=1))
        if args.print_spec:
            print((bundle / "config.json").read_text())
            return 0
        runtime = [args.runtime] + (["--cgroup-manager=disabled"] if args.runtime == "crun" else [])
        proc = subprocess.Popen([*runtime, "run", "--bundle", str(bundle), name])

        def forward(signum: int, _frame: object) -> None:  # stop the container, not only the runtime
            subprocess.run([args.runtime, "kill", name, signal.Signals(signum).name[3:]], capture_output=True)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        try:
            return proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            subprocess.run([args.runtime, "kill", name, "KILL"], capture_output=True)
            proc.wait()
            print(f"run-image.py: killed after --timeout {args.timeout:g}s", file=sys.stderr)
            return 124
    finally:
        subprocess.run([args.runtime, "delete", "--force", name], capture_output=True)
        shutil.rmtree(bundle, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

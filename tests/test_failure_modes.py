"""Loud failures, as a user meets them: real ``python -m pipeline train`` processes on real PTB characters.

- Storage that is read-only or full (a real tmpfs mounted read-only or with a few KiB, in a private
  mount namespace; a real S3 API that denies writes: a moto server enforcing an IAM read-only policy)
  stops the run with exit code 5, one clear line, and no checkpoint folders left behind.
- A read-only or full work dir: exit code 5, one line, no ``final_model.tmp``.
- ``--train.device cuda`` without CUDA and a ``train.bptt`` longer than the data: exit code 2, one line.
- A job resumed with another number of ranks: exit code 2 through the Kubernetes launcher.
- ``kill -9`` of the torchrun launcher alone: its workers stop within seconds.
- A second job on the checkpoint location of a live one: refused with exit code 7.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, multiprocess_env, pipeline_env, tiny_ptb_config, torchrun_train_command

WAIT_S = 120


def _config(tmp_path: Path, data_dir: Path, *, work_dir: Path | None = None, checkpoint_url: str | None = None,
            name: str = "run", **train) -> Path:
    raw = tiny_ptb_config(work_dir or tmp_path / name, data_dir)
    raw["train"].update({"max_steps": 12, "eval_every": 4, "eval_tokens": 2000, "device": "cpu", **train})
    raw["checkpoint"] = {"every": 4, "keep_last": 2, "retry_attempts": 3, "retry_base_delay": 0.05,
                         "retry_max_delay": 0.1}
    if checkpoint_url is not None:
        raw["checkpoint"]["url"] = checkpoint_url
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(config: Path, cwd: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "pipeline", "train", "--config", str(config), *extra], cwd=cwd,
                          env=env or pipeline_env(), capture_output=True, text=True, timeout=WAIT_S)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


# --------------------------------------------------------------------------- tmpfs in a mount namespace


def _unshare() -> list[str]:
    return ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--mount", "--map-root-user"]


@pytest.fixture(scope="module")
def mount_namespace(tmp_path_factory) -> list[str]:
    """The command prefix that runs a command in a private mount namespace where it may mount a tmpfs."""
    probe = tmp_path_factory.mktemp("mount-probe")
    proc = subprocess.run([*_unshare(), "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(probe))}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        why = f"cannot mount a tmpfs in a private mount namespace here: {proc.stderr.strip()}"
        if os.environ.get("RLM_REQUIRE_MOUNT_NAMESPACE"):  # set by .ci/run: CI machines can, so this must run
            pytest.fail(why)
        pytest.skip(why)
    return _unshare()


def _on_tmpfs(prefix: list[str], mount_point: Path, options: str, cmd: list[str], listing: Path) -> list[str]:
    """``cmd`` with a tmpfs (``options``) on ``mount_point`` that only it sees; what the tmpfs holds at the end is
    written to ``listing`` (the tmpfs goes away with the namespace)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    at = shlex.quote(str(mount_point))
    script = (f"mount -t tmpfs -o {options} tmpfs {at} || exit 99; \"$@\"; rc=$?; "
              f"(cd {at} && find . -mindepth 1 | sort) > {shlex.quote(str(listing))}; exit $rc")
    return [*prefix, "sh", "-c", script, "sh", *cmd]


def _train_on_tmpfs(prefix: list[str], mount_point: Path, options: str, config: Path
                    ) -> tuple[subprocess.CompletedProcess, str, list[str]]:
    """Train with a tmpfs on ``mount_point``; expects exit code 5 (storage) and one error line. Returns the
    process, that line and what the tmpfs held at the end."""
    listing = config.parent / f"{mount_point.name}-listing.txt"
    cmd = _on_tmpfs(prefix, mount_point, options, [PYTHON, "-m", "pipeline", "train", "--config", str(config)], listing)
    proc = subprocess.run(cmd, cwd=config.parent, env=pipeline_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode != 99, f"mounting the tmpfs failed: {proc.stderr}"
    assert proc.returncode == 5, proc.stderr[-3000:]  # non-retriable: a new pod would meet the same storage
    assert "Traceback" not in proc.stderr
    [error] = _error_lines(proc.stderr)
    return proc, error, listing.read_text().split()


def test_read_only_checkpoint_location_stops_at_once(tmp_path, ptb_char_dir, mount_namespace):
    ckpt = tmp_path / "ckpt"
    config = _config(tmp_path, ptb_char_dir, checkpoint_url=str(ckpt))
    _, error, files = _train_on_tmpfs(mount_namespace, ckpt, "ro,size=1m", config)
    assert f"the checkpoint location {ckpt} is not writable" in error and "Read-only file system" in error
    assert files == []
    assert not (tmp_path / "run" / "train_log.jsonl").exists()  # it stopped before training


def test_full_checkpoint_location_stops_after_max_failed_saves_and_leaves_no_folders(tmp_path, ptb_char_dir,
                                                                                    mount_namespace):
    ckpt = tmp_path / "ckpt"
    config = _config(tmp_path, ptb_char_dir, checkpoint_url=str(ckpt), max_steps=40)
    # 64 KiB: the lease fits, a checkpoint (~1.8 MB) does not.
    proc, error, files = _train_on_tmpfs(mount_namespace, ckpt, "size=64k", config)
    assert "could not save 3 checkpoints in a row (checkpoint.max_failed_saves 3)" in error
    assert "No space left on device" in error and "free space" in error
    # Saves at steps 0 and 4 failed and training went on (with a warning); the third failure (step 8's save, in
    # the background: checkpoint.async_save) is raised on the training thread at the next checkpoint, step 12.
    assert proc.stderr.count("training continues") == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert max(steps) == 12
    # A full device is not retried, and every failed save's folder was removed: nothing piles up.
    assert "retrying in" not in proc.stderr
    assert files == []


def test_read_only_work_dir_is_one_line(tmp_path, ptb_char_dir, mount_namespace):
    work = tmp_path / "work"
    config = _config(tmp_path, ptb_char_dir, work_dir=work, checkpoint_url=str(tmp_path / "ckpt"))
    _, error, files = _train_on_tmpfs(mount_namespace, work, "ro,size=1m", config)
    assert f"cannot write {work}: Read-only file system" in error and "--work_dir" in error
    assert files == []
    assert not (tmp_path / "ckpt").exists()  # checked before anything was written anywhere


def test_full_work_dir_is_one_line_and_leaves_no_temporary_file(tmp_path, ptb_char_dir, mount_namespace):
    work = tmp_path / "work"
    config = _config(tmp_path, ptb_char_dir, work_dir=work, checkpoint_url=str(tmp_path / "ckpt"), max_steps=4)
    # 128 KiB: the resolved config and the train log fit, the final model (~0.4 MB) does not.
    _, error, files = _train_on_tmpfs(mount_namespace, work, "size=128k", config)
    assert f"cannot write {work / 'final_model.pt'}: No space left on device" in error
    assert "./train_log.jsonl" in files and "./resolved_config.yaml" in files
    assert not [f for f in files if f.endswith(".tmp") or "final_model" in f], files


# --------------------------------------------------------------------------- read-only S3


@pytest.fixture(scope="module")
def read_only_s3(tmp_path_factory):
    """A moto S3 server of its own that enforces IAM, and credentials that may read but not write."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The first 4 requests (the set-up below) are not authenticated; every later one is.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("the moto server did not start")
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        admin = dict(endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1")
        boto3.client("s3", **admin).create_bucket(Bucket="readonly")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"], "Resource": "*"}]}
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        yield {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        server.kill()
        server.wait()


def test_read_only_s3_bucket_stops_at_once(tmp_path, ptb_char_dir, read_only_s3):
    url = "s3://readonly/runs/denied"
    config = _config(tmp_path, ptb_char_dir, checkpoint_url=url)
    env = {**pipeline_env(), **read_only_s3}
    proc = _train(config, tmp_path, env=env)
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [error] = _error_lines(proc.stderr)
    assert f"the checkpoint location {url} is not writable" in error and "Access Denied" in error
    import boto3

    listed = boto3.client("s3", endpoint_url=read_only_s3["AWS_ENDPOINT_URL"],
                          aws_access_key_id=read_only_s3["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=read_only_s3["AWS_SECRET_ACCESS_KEY"],
                          region_name="us-east-1").list_objects_v2(Bucket="readonly")
    assert listed.get("KeyCount", 0) == 0


# --------------------------------------------------------------------------- configuration mistakes


def test_cuda_without_cuda_and_a_bptt_longer_than_the_data_are_one_line_each(tmp_path, ptb_char_dir):
    config = _config(tmp_path, ptb_char_dir)
    cuda = _train(config, tmp_path, "--train.device", "cuda")
    assert cuda.returncode == 2, cuda.stderr[-3000:]
    assert "Traceback" not in cuda.stderr
    [error] = _error_lines(cuda.stderr)
    assert "train.device is cuda but this machine has no usable CUDA GPU" in error and "--train.device cpu" in error

    bptt = _train(config, tmp_path, "--train.bptt", "1000000000")
    assert bptt.returncode == 2, bptt.stderr[-3000:]
    assert "Traceback" not in bptt.stderr
    [error] = _error_lines(bptt.stderr)
    assert "train.bptt 1,000,000,000 is longer than a training stripe" in error and "at most" in error
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_with_another_number_of_ranks_is_a_configuration_error(tmp_path, ptb_char_dir, s3_endpoint):
    url = f"s3://checkpoints/ranks-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, ptb_char_dir, checkpoint_url=url, max_steps=4)
    env = multiprocess_env(s3_endpoint)
    first = _train(config, tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    raw = yaml.safe_load(config.read_text())
    raw["train"]["max_steps"] = 8
    config.write_text(yaml.safe_dump(raw))
    argv = torchrun_train_command(config)[3:]  # torchrun's options and the command, for the Kubernetes launcher
    proc = subprocess.run([PYTHON, "-m", "pipeline.k8s.launch", *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=WAIT_S)
    assert proc.returncode == 2, proc.stderr[-3000:]  # FailJob in the train Job's podFailurePolicy
    assert "written by 1 ranks and this job has 2" in proc.stderr
    assert "Traceback (most recent call last)" not in proc.stderr


# --------------------------------------------------------------------------- orphaned workers, two jobs


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int = 1) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        log = run_dir / "train_log.jsonl"
        if log.exists() and any(json.loads(l).get("step", 0) >= step for l in log.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.1)
    pytest.fail("training did not start")


def test_workers_stop_when_their_launcher_is_killed(tmp_path, ptb_char_dir, s3_endpoint):
    url = f"s3://checkpoints/orphans-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, ptb_char_dir, checkpoint_url=url, max_steps=100000)
    launcher = subprocess.Popen(torchrun_train_command(config), cwd=tmp_path, env=multiprocess_env(s3_endpoint),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[int] = []
    try:
        _wait_for_step(tmp_path / "run", launcher)
        workers = _children(launcher.pid)
        assert len(workers) == 2
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone
        launcher.wait()
        killed_at = time.monotonic()
        while any(_alive(w) for w in workers) and time.monotonic() - killed_at < 30:
            time.sleep(0.1)
        gone_after = time.monotonic() - killed_at
        assert not any(_alive(w) for w in workers), "workers kept training without their launcher"
        assert gone_after < 10, f"workers took {gone_after:.1f} s to stop"
    finally:
        for pid in [launcher.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_second_job_cannot_write_into_a_live_jobs_checkpoints(tmp_path, ptb_char_dir):
    ckpt = tmp_path / "ckpt"
    first_config = _config(tmp_path, ptb_char_dir, checkpoint_url=str(ckpt), name="first", max_steps=100000)
    raw = yaml.safe_load(first_config.read_text())
    raw["checkpoint"]["lease_ttl"] = 3.0  # heartbeat every 0.5 s; a second job waits ~4 s for it to go stale
    first_config.write_text(yaml.safe_dump(raw))
    second_config = _config(tmp_path, ptb_char_dir, checkpoint_url=str(ckpt), name="second")
    raw = yaml.safe_load(second_config.read_text())
    raw["checkpoint"]["lease_ttl"] = 3.0
    second_config.write_text(yaml.safe_dump(raw))
    first = subprocess.Popen([PYTHON, "-m", "pipeline", "train", "--config", str(first_config)], cwd=tmp_path,
                             env=pipeline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(tmp_path / "first", first)
        second = _train(second_config, tmp_path)
        assert second.returncode == 7, second.stderr[-3000:]
        [error] = _error_lines(second.stderr)
        assert f"the checkpoint location {ckpt} is in use by job" in error and f"pid {first.pid}" in error
        assert not (tmp_path / "second" / "train_log.jsonl").exists()
        assert first.poll() is None  # the live job was not disturbed
        first.send_signal(signal.SIGTERM)  # stopped cleanly: it releases the lease
        first.communicate(timeout=WAIT_S)  # reads its stderr: a full pipe would block its exit
        assert first.returncode == 128 + signal.SIGTERM
        assert not (ckpt / "LEASE.json").exists()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # With the first job gone, the second one resumes from its checkpoints.
    again = _train(second_config, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr

"""Object storage unreachable during a save: retry with backoff, keep training, log a warning, never
leave the run without its last committed checkpoint.

Real parts only: a single-process ``python -m pipeline train`` on real PTB characters writes its
checkpoints to the real moto S3 server through a TCP proxy that this test controls. The proxy is
taken down (listening socket closed, every open connection dropped, so that pooled keep-alive
connections of s3fs/aiohttp cannot hide the outage) once the run has committed a checkpoint, and
brought back once a save has given up. The test waits on checkpoint folders and log lines, never on
blind sleeps, and bounds every wait.

botocore's own retries are switched off in the training's environment (``AWS_MAX_ATTEMPTS=1``, an
ordinary botocore setting): with its defaults each refused request is retried for ~5-10 s inside
botocore, which only slows the test down; the behaviour under test is the pipeline's own
retry/backoff (``checkpoint.retry_*``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, pipeline_env, tiny_ptb_config
from pipeline.checkpoint import DCPCheckpointer

STEPS = 48
EVERY = 8  # checkpoint interval; a save takes ~0.2 s, 8 steps ~0.35 s on this machine
WAIT_S = 90.0  # upper bound of any single wait (the whole test takes ~20-40 s)


class TcpProxy:
    """A TCP forwarder on 127.0.0.1:<ephemeral> -> ``target`` that can be taken down and up again.

    ``down()`` closes the listening socket (new connections are refused) and drops every open
    connection; ``up()`` listens again on the same port.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self.port = 0
        self.accepted = 0  # connections forwarded
        self.dropped = 0  # open connections cut by down()
        self._listen(0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> None:
        deadline = time.monotonic() + 10
        while True:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind(("127.0.0.1", port))
                break
            except OSError:
                listener.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        listener.listen(128)
        listener.settimeout(0.05)  # the accept loop polls, so down() never waits on a blocked accept()
        self.port = listener.getsockname()[1]
        stop = threading.Event()
        self._stop = stop
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener, stop), daemon=True).start()

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if stop.is_set():  # went down between accept() and here
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._close(s)

    def _close(self, s: socket.socket, *, reset: bool = False) -> None:
        with self._lock:
            self._conns.discard(s)
        try:
            if reset:  # RST instead of FIN: the peer sees "connection reset", like a dropped route
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.shutdown(socket.SHUT_RDWR)  # wakes a pump thread blocked in recv()
        except OSError:
            pass
        s.close()

    def down(self) -> None:
        with self._lock:
            self._stop.set()
            listener, self._listener = self._listener, None
            conns = list(self._conns)
        if listener is not None:
            listener.close()
        for s in conns:
            self._close(s, reset=True)
        with self._lock:
            self.dropped += len(conns) // 2

    def up(self) -> None:
        if self._listener is None:
            self._listen(self.port)

    def close(self) -> None:
        self.down()


class LineWatcher:
    """Collects a subprocess's stderr lines in a thread; ``wait_for`` blocks (bounded) on a substring."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def find(self, needle: str) -> list[str]:
        with self._cond:
            return [line for line in self.lines if needle in line]

    def wait_for(self, needle: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [line for line in self.lines if needle in line]
                if hits:
                    return hits[0]
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def text(self) -> str:
        self._thread.join(timeout=10)
        with self._cond:
            return "".join(self.lines)


# --------------------------------------------------------------------------- helpers


def _config(tmp_path: Path, data_dir: Path, checkpoint_url: str) -> Path:
    config = tiny_ptb_config(tmp_path / "run", data_dir)
    config["train"].update(max_steps=STEPS, eval_every=8, eval_tokens=2000, log_every=8, device="cpu")
    config["checkpoint"] = {
        "url": checkpoint_url, "every": EVERY, "keep_last": 2,
        "retry_attempts": 3, "retry_base_delay": 0.05, "retry_max_delay": 0.2,
        # The outage is timed against the step-8 commit: synchronous saves (tests/test_checkpoint_async.py
        # covers failures of background saves).
        "async_save": False,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _folders(prefix: str) -> dict[str, bool]:
    """Every step-N[.k] folder under ``prefix`` on the moto server itself (not through the proxy) ->
    committed (has ``COMMITTED``, the commit record written last)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(prefix)  # endpoint: the test process's AWS_ENDPOINT_URL = moto
    fs.invalidate_cache()
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return {}
    return {n: fs.exists(f"{root}/{n}/COMMITTED") for n in names if n.startswith("step-")}


def _order(name: str) -> tuple[int, int]:
    step, _, attempt = name.removeprefix("step-").partition(".")
    return int(step), int(attempt or 0)


def _newest_committed(folders: dict[str, bool]) -> str | None:
    committed = [n for n, ok in folders.items() if ok]
    return max(committed, key=_order) if committed else None


def _wait_for_commit(prefix: str, min_step: int, proc: subprocess.Popen, timeout: float) -> str | None:
    """Wait until a checkpoint of step >= ``min_step`` has committed (checked once more after the run exits)."""
    deadline = time.monotonic() + timeout
    while True:
        exited = proc.poll() is not None
        newest = _newest_committed(_folders(prefix))
        if newest is not None and _order(newest)[0] >= min_step:
            return newest
        if exited or time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _train_steps(run_dir: Path) -> list[int]:
    """Steps in ``train_log.jsonl`` so far (a line being written may be incomplete: skipped)."""
    try:
        lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float) -> int | None:
    """Wait until training has logged ``step``; returns the newest logged step (None on timeout/exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        steps = _train_steps(run_dir)
        if steps and max(steps) >= step:
            return max(steps)
        time.sleep(0.01)
    return None


# --------------------------------------------------------------------------- the test


@pytest.fixture
def proxy(s3_endpoint):
    host, port = s3_endpoint["AWS_ENDPOINT_URL"].removeprefix("http://").rsplit(":", 1)
    p = TcpProxy(host, int(port))
    yield p
    p.close()


def test_storage_outage_during_saves_keeps_training_and_last_checkpoint(tmp_path, ptb_char_dir, s3_endpoint, proxy):
    prefix = f"s3://checkpoints/outage-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, ptb_char_dir, prefix)
    run_dir = tmp_path / "run"
    env = pipeline_env()
    env.update(s3_endpoint)
    env.update(AWS_ENDPOINT_URL=proxy.url, AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard", OMP_NUM_THREADS="1")
    cmd = [PYTHON, "-m", "pipeline", "train", "--config", str(config)]

    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watcher = LineWatcher(proc.stderr)
    try:
        # 1. Outage: after the checkpoint of step EVERY has committed (and been pruned), while training
        # runs steps EVERY+1 .. 2*EVERY-1, which touch no storage; so the outage hits the next save.
        # (Starting it right between a commit and its pruning is the separate test below.)
        at = _wait_for_step(run_dir, EVERY + 1, proc, WAIT_S)
        assert at is not None, "training did not get past the first checkpoint:\n" + watcher.text()[-3000:]
        proxy.down()
        at = max(_train_steps(run_dir))
        assert at < 2 * EVERY, f"training was already at step {at} when storage went down; the test reacted too late"
        last_before = _newest_committed(_folders(prefix))  # what had committed when the outage began
        assert last_before is not None and _order(last_before)[0] == EVERY, _folders(prefix)
        gave_up = watcher.wait_for("could not save the checkpoint of step", WAIT_S)
        assert gave_up is not None, "no save gave up during the outage:\n" + watcher.text()[-3000:]
        # During the outage the last committed checkpoint is still there, untouched.
        assert _newest_committed(_folders(prefix)) == last_before
        assert proc.poll() is None, "training stopped during the outage:\n" + watcher.text()[-3000:]

        # 2. Storage comes back: a later checkpoint commits again.
        proxy.up()
        failed_step = int(gave_up.split("checkpoint of step ")[1].split()[0])
        assert failed_step == 2 * EVERY  # the first save after the outage began
        after = _wait_for_commit(prefix, failed_step + 1, proc, WAIT_S)
        assert after is not None, "no checkpoint committed after storage came back:\n" + watcher.text()[-3000:]
        assert proc.wait(timeout=WAIT_S) == 0, watcher.text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = watcher.text()

    # The outage was visible to the run, retried with backoff and logged as a warning.
    assert proxy.accepted > 0
    assert "retrying in" in stderr
    assert " WARNING " in gave_up
    assert f"could not save the checkpoint of step {failed_step}" in stderr
    retries = [line for line in stderr.splitlines() if f"checkpoint of step {failed_step} failed (attempt" in line]
    assert len(retries) == 3 - 1 and all(" WARNING " in line for line in retries)  # retry_attempts=3: two backoffs
    # Training went on through the outage and finished every step.
    steps = _train_steps(run_dir)
    assert steps == list(range(1, STEPS + 1))
    assert (run_dir / "final_model.pt").exists()

    # The newest committed checkpoint is the final step; no uncommitted folder is newer than it.
    folders = _folders(prefix)
    newest = _newest_committed(folders)
    assert newest is not None and _order(newest)[0] == STEPS, folders
    newer_partials = [n for n, ok in folders.items() if not ok and _order(n) > _order(newest)]
    assert not newer_partials, folders
    # The checkpoint whose save gave up is not there as a committed one.
    assert not any(ok and _order(n)[0] == failed_step for n, ok in folders.items()), folders

    # A restarted run resumes from it.
    restarted = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resumed from" in restarted.stderr
    assert f"at step {STEPS}" in restarted.stderr


def test_outage_between_commit_and_pruning_keeps_training(tmp_path, ptb_char_dir, s3_endpoint, proxy, monkeypatch):
    """Deterministic version of a race the subprocess test avoids: storage goes away right after a
    checkpoint has committed, before the housekeeping (pruning) that follows it. Pruning is
    housekeeping; training must go on with the checkpoint it has just committed."""
    from pipeline.config import load_config
    from pipeline.train import Trainer

    prefix = f"s3://checkpoints/prune-outage-{uuid.uuid4().hex[:8]}"
    options = {"client_kwargs": {"endpoint_url": proxy.url}, "config_kwargs": {"retries": {"max_attempts": 1}}}
    config = load_config(_config(tmp_path, ptb_char_dir, prefix), {"checkpoint.storage_options": options})
    trainer = Trainer(config)
    real_save = DCPCheckpointer.save

    def save_then_outage(self, *args, **kwargs):
        committed = real_save(self, *args, **kwargs)
        proxy.down()  # storage goes away after the commit, before save_checkpoint prunes
        return committed

    monkeypatch.setattr(DCPCheckpointer, "save", save_then_outage)
    try:
        trainer.save_checkpoint()  # must not raise: the checkpoint has committed, pruning can wait
    finally:
        proxy.up()
    assert _newest_committed(_folders(prefix)) == "step-00000000"

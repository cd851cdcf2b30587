"""The process node's termination message (`state.terminated.message`), computed as the kubelet does.

Pure rules first (devcluster/podspec.py `termination_message`), then real process pods on a PodRun
without an API server: the per-container file named by MMALIGN_TERMINATION_LOG, the path rewriting of
`/dev/termination-log`, the log fallback, a fresh file per restart, and mmalign's own trainer line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mmalign.devcluster import dns, podspec
from mmalign.devcluster.podrunner import NodeContext, PodRun, read_tail

FALLBACK = {"name": "c", "terminationMessagePolicy": "FallbackToLogsOnError"}
FILE = {"name": "c", "terminationMessagePolicy": "File"}


def lines(count: int, width: int = 10) -> bytes:
    return b"".join(f"{i:0{width}d}\n".encode() for i in range(count))


@pytest.mark.parametrize(("container", "code", "file_tail", "log", "expected"), [
    # the file wins whenever it has something, on success too and whatever the policy
    (FILE, 0, b"done\n", b"log\n", "done\n"),
    (FALLBACK, 4, b"mmalign: NAN_LOSS (exit 4): loss is nan at step 3\n", b"noise\n",
     "mmalign: NAN_LOSS (exit 4): loss is nan at step 3\n"),
    # policy File (the API default): an empty or missing file gives no message
    (FILE, 1, b"", b"Traceback ...\nValueError: x\n", ""),
    (FILE, 1, None, b"Traceback ...\n", ""),
    ({"name": "c"}, 1, b"", b"Traceback ...\n", ""),
    # FallbackToLogsOnError: only for a non-zero exit
    (FALLBACK, 0, b"", b"all good\n", ""),
    (FALLBACK, 1, b"", b"Traceback ...\nValueError: x\n", "Traceback ...\nValueError: x\n"),
    (FALLBACK, 137, None, b"step 1\nstep 2", "step 1\nstep 2"),  # a missing file, no final newline
    (FALLBACK, 1, b"", b"", ""),
    # lines end at \n only (a progress bar's \r does not start one)
    (FALLBACK, 1, b"", b"a\rb\n" * 81, "a\rb\n" * 80),
])
def test_termination_message_rules(container, code, file_tail, log, expected):
    assert podspec.termination_message(container, code, file_tail, log) == expected


def test_termination_message_limits():
    # the file: its last 4 KiB
    big = b"x" * 5000 + b"END"
    assert podspec.termination_message(FALLBACK, 4, big, b"") == (b"x" * 4093 + b"END").decode()
    # the log: its last 80 lines ...
    assert podspec.termination_message(FALLBACK, 1, b"", lines(100)) == lines(100)[-80 * 11:].decode()
    # ... cut to their last 2 KiB
    assert podspec.termination_message(FALLBACK, 1, b"", lines(100, 99)) == lines(100, 99)[-2048:].decode()
    # invalid UTF-8 is replaced, not an error
    assert podspec.termination_message(FALLBACK, 1, b"\xff oops", b"") == "\ufffd oops"


@pytest.mark.parametrize("log", [lines(100), lines(100, 99), lines(3), b"a" * 5000, lines(79, 40) + b"tail"])
def test_reading_only_the_end_of_the_log_changes_nothing(tmp_path, log):
    path = tmp_path / "0.log"
    path.write_bytes(log)
    whole = podspec.termination_message(FALLBACK, 1, None, log)
    assert podspec.termination_message(FALLBACK, 1, None, read_tail(path, podspec.MAX_TERMINATION_LOG_BYTES)) == whole
    assert read_tail(path, 10) == log[-10:] and read_tail(path, 10**6) == log


# ------------------------------------------------------------------------------ real process pods


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> NodeContext:
    # no DNS shim (it is compiled by `dev up`); a missing LD_PRELOAD object would write to the log
    monkeypatch.setattr(dns, "pod_dns_env", lambda hostname, *_: {"HOSTNAME": hostname})
    return NodeContext(node_name="process-node-0", api=None, apiserver_url="https://127.0.0.1:1",  # type: ignore[arg-type]
                       ca_file=tmp_path / "ca.crt", pods_dir=tmp_path / "pods", hosts_file=tmp_path / "hosts",
                       dns_shim=tmp_path / "shim.so", path_dirs=[str(Path(sys.executable).parent), "/usr/bin", "/bin"],
                       allocatable={"cpu": "2", "memory": "4Gi"})


def run_pod(node: NodeContext, container: dict, restart_policy: str = "Never",
            done: Callable[[PodRun], bool] = lambda run: run.main[0].terminated is not None) -> PodRun:
    """Step a one-container pod until `done` (by default: it terminated); no API server is involved."""
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
           "spec": {"restartPolicy": restart_policy, "automountServiceAccountToken": False,
                    "containers": [{"name": "c", "image": "img", **container}]}}
    run = PodRun(pod, node, "127.0.0.9", [])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        run.step()
        if done(run):
            return run
        time.sleep(0.02)
    raise AssertionError(f"the pod did not get there: {run.status()}")


def terminated(run: PodRun) -> dict:
    return run.status()["containerStatuses"][0]["state"]["terminated"]


def test_the_trainer_line_reaches_the_status_through_its_own_file(node):
    # mmalign's real report_failure finds the file through MMALIGN_TERMINATION_LOG
    code = ("from mmalign.trainer.failures import report_failure; "
            "report_failure(4, 'NAN_LOSS', FloatingPointError('loss is nan at step 3')); raise SystemExit(4)")
    run = run_pod(node, {"command": [sys.executable, "-c", code], **FALLBACK})
    state = terminated(run)
    assert state["exitCode"] == 4 and state["reason"] == "Error"
    assert state["message"] == "mmalign: NAN_LOSS (exit 4): loss is nan at step 3\n"
    assert run.phase() == "Failed"
    assert run.main[0].termination_file == run.root / "termination" / "c" / "0"


def test_the_termination_path_is_rewritten_like_a_mount(node):
    # a program told the path (args, env) writes the pod's own file; a custom path works the same way
    script = 'echo "written via $1" > "$1"; echo "and $OUT" >> "$OUT"; exit 3'
    run = run_pod(node, {"command": ["sh", "-c", script, "sh", "/tmp/custom-msg"],
                         "env": [{"name": "OUT", "value": "/tmp/custom-msg"}],
                         "terminationMessagePath": "/tmp/custom-msg"})
    local = str(run.root / "termination" / "c" / "0")
    assert terminated(run)["message"] == f"written via {local}\nand {local}\n"


def test_fallback_to_logs_and_success_messages(node):
    crash = run_pod(node, {"command": ["sh", "-c", "echo starting; echo 'boom: no such file' >&2; exit 1"],
                           **FALLBACK})
    assert terminated(crash)["message"] == "starting\nboom: no such file\n"
    quiet = run_pod(node, {"command": ["sh", "-c", "echo starting; exit 1"], **FILE})
    assert "message" not in terminated(quiet)  # policy File and an empty file: no message
    fine = run_pod(node, {"command": ["sh", "-c", "echo ok; exit 0"], **FALLBACK})
    assert "message" not in terminated(fine)


def test_every_restart_gets_a_fresh_empty_file(node):
    # attempt 0 writes a message and fails; attempt 1 writes none: its message is its own log's tail
    script = ('if [ -e "$HOME/once" ]; then echo second attempt; exit 2; fi; '
              'touch "$HOME/once"; echo first > "$MMALIGN_TERMINATION_LOG"; exit 2')
    container = {"command": ["sh", "-c", script], **FALLBACK}
    messages: dict[int, str] = {}

    def record(run: PodRun) -> bool:  # OnFailure: each exit goes straight to CrashLoopBackOff (lastState)
        status = run.status()["containerStatuses"][0]
        if "lastState" in status:
            messages.setdefault(status["restartCount"], status["lastState"]["terminated"]["message"])
        return len(messages) == 2

    run_pod(node, container, restart_policy="OnFailure", done=record)
    assert messages == {1: "first\n", 2: "second attempt\n"}


def test_tmpdir_is_short_enough_for_a_unix_socket(node):
    # multiprocessing's fd sharing (DataLoader workers handing tensors back) binds a socket under TMPDIR;
    # the pod folder's own path is too long for the 108-byte limit, so TMPDIR is a short link to it
    code = ("import os, socket, tempfile; folder = tempfile.mkdtemp(prefix='pymp-'); "
            "socket.socket(socket.AF_UNIX).bind(os.path.join(folder, 'listener-abcdefgh')); print(folder)")
    run = run_pod(node, {"command": [sys.executable, "-c", code], **FALLBACK})
    assert terminated(run)["exitCode"] == 0, run.main[0].log_file().read_text()
    folder = Path(run.main[0].log_file().read_text().strip())
    assert folder.resolve().parent == (run.root / "tmp").resolve() and len(str(folder)) < 60
    run.remove_files()
    assert not run.tmp_link.is_symlink()


def test_killing_a_pod_takes_the_processes_it_started_in_groups_of_their_own(node):
    # torchrun starts each worker in a process group of its own: killing only the pod's group would
    # leave the workers running once torchrun is gone
    code = ("import subprocess, sys, time; child = subprocess.Popen(['sleep', '300'], process_group=0); "
            "print(child.pid, flush=True); time.sleep(300)")
    run = run_pod(node, {"command": [sys.executable, "-c", code]},
                  done=lambda r: r.main[0].log_file().exists() and r.main[0].log_file().read_text().strip())
    child = int(run.main[0].log_file().read_text())
    run.kill_now()

    def gone() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except OSError:
            return True

    deadline = time.monotonic() + 10
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(), f"process {child} outlived its pod"

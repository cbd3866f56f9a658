"""Listening on a non-loopback address (issue 15, section 4): refused unless asked for.

Every aurora-lite server exposes unauthenticated verbs (Truncate, DropVolume,
SetGcHorizon, the control plane's kill); `--host` other than loopback is refused with exit
code 2 and a message naming the flag that allows it (engine/cluster/listen.py), and
allowed with a WARNING under `--insecure-listen`.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

#: A refusal is immediate; a process that starts serving instead is cut off after this.
REFUSAL_TIMEOUT_S = 20


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "engine.cli", *argv], capture_output=True,
                              text=True, timeout=REFUSAL_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`aurora-lite {' '.join(argv)}` was not refused: it kept running "
                    f"(stderr: {(exc.stderr or b'')[-500:]!r})")


@pytest.mark.parametrize("argv", [
    ["storage-node", "--node-id", "sn1", "--az", "az-a", "--port", "0"],
    ["writer", "--cluster", "/nonexistent/cluster.json", "--port", "0"],
    ["block-server", "--name", "bs1", "--az", "az-a", "--port", "0"],
    ["control-plane"],
], ids=["storage-node", "writer", "block-server", "control-plane"])
def test_cli_refuses_a_non_loopback_host(argv, tmp_path):
    if argv[0] in ("storage-node", "block-server", "control-plane"):
        argv = [*argv, "--data-dir", str(tmp_path / "d")]
    result = _run([*argv, "--host", "0.0.0.0"])
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "refusing to listen on '0.0.0.0'" in result.stderr, result.stderr[-2000:]
    assert "--insecure-listen" in result.stderr, result.stderr[-2000:]


def test_insecure_listen_serves_and_warns(tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "storage-node", "--node-id", "sn1", "--az", "az-a",
         "--host", "0.0.0.0", "--insecure-listen", "--port", "0", "--port-file", str(port_file),
         "--data-dir", str(tmp_path / "d")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port_file.exists(), "the storage node did not start with --insecure-listen"
    finally:
        proc.kill()
        out = proc.communicate(timeout=30)[0]
    assert " WARNING " in out and "--insecure-listen" in out and "0.0.0.0" in out, out[-2000:]


def test_loopback_rules():
    from engine.cluster.listen import check_listen_host, is_loopback, listen_argv

    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("db.example")
    assert check_listen_host("127.0.0.1", False, "x") is None
    assert "refusing" in check_listen_host("0.0.0.0", False, "x")
    assert check_listen_host("0.0.0.0", True, "x") is None
    assert listen_argv("127.0.0.1") == ["--host", "127.0.0.1"]
    assert listen_argv("10.1.2.3") == ["--host", "10.1.2.3", "--insecure-listen"]

"""Issue 16, item 1: an auditor checks an export offline with the public key alone."""

from __future__ import annotations

import json
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.cli.test_cli import cli
from tests.helpers import chain_bundle, register_db, run_job, setup_project


def _signed(server, timeout: float = 30) -> dict:
    """Wait until a checkpoint covers the chain as it is now (the sweeper signs every 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        result = server.client.get("/v1/audit/verify").body
        if result["checkpoints"] and result["last_checkpoint"] >= result["events"] - 1:
            return result
        assert time.monotonic() < deadline, result
        time.sleep(0.3)


def test_export_verifies_offline_and_tampering_does_not(prod, new_db, tmp_path):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    assert run_job(c, register_db(c, project, new_db("sqlite")))["state"] == "succeeded"
    result = _signed(prod)
    assert result["ok"] is True and result["signatures"] == "checked", result

    export = tmp_path / "audit.jsonl"
    out = cli(prod, "audit", "export", "-o", str(export))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    events = [r for r in lines if r["type"] == "event"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["action"] == "audit.rekeyed" and all(e["mac"] for e in events)
    assert any(r["type"] == "checkpoint" for r in lines)

    public = prod.log_dir / "audit-signing-key.pub"
    ok = cli(prod, "audit", "verify", "--file", str(export), "--public-key", str(public))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("audit log intact:") and "signed through event" in ok.stdout

    # An edited event: its hash no longer matches.
    edited = tmp_path / "edited.jsonl"
    victim = next(e for e in events if e["action"] == "job.succeeded")
    edited.write_text(
        "".join(json.dumps({**r, "actor": "mallory"} if r is victim else r) + "\n" for r in lines)
    )
    bad = cli(prod, "audit", "verify", "--file", str(edited), "--public-key", str(public))
    assert bad.returncode == 1, bad.stdout
    assert f"BROKEN at event {victim['seq']}" in bad.stdout

    # A truncated export: the signed checkpoint is past its end.
    cut = tmp_path / "cut.jsonl"
    last_cp = max(r["seq"] for r in lines if r["type"] == "checkpoint")
    keep = [r for r in lines if r["type"] == "checkpoint" or r["seq"] < last_cp - 1]
    cut.write_text("".join(json.dumps(r) + "\n" for r in keep))
    bad = cli(prod, "audit", "verify", "--file", str(cut), "--public-key", str(public), "--json")
    assert bad.returncode == 1
    assert "truncated" in json.loads(bad.stdout)["reason"]

    # Another key's public half proves nothing.
    other = tmp_path / "other.pub"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    bad = cli(prod, "audit", "verify", "--file", str(export), "--public-key", str(other))
    assert bad.returncode == 1, bad.stdout

    # The copy outside the database holds the same checkpoints, with 0600.
    outside = prod.log_dir / "audit-checkpoints.jsonl"
    assert outside.stat().st_mode & 0o077 == 0
    assert (prod.log_dir / "audit-signing-key").stat().st_mode & 0o077 == 0


def test_offline_verify_says_what_it_needs(prod, tmp_path):
    out = cli(prod, "audit", "verify", "--file", str(tmp_path / "missing.jsonl"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    export = tmp_path / "a.jsonl"
    export.write_text("")
    out = cli(prod, "audit", "verify", "--file", str(export))
    assert out.returncode == 2 and "--public-key" in out.stderr
    out = cli(prod, "audit", "verify", "--public-key", str(export))
    assert out.returncode == 2 and "--file" in out.stderr
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n")
    out = cli(prod, "audit", "verify", "--file", str(garbage), "--public-key", str(export))
    assert out.returncode == 2 and "no PEM public key" in out.stderr


def test_each_checkpoint_is_posted_signed_to_the_operators_receiver(prod, new_db, tmp_path):
    """A copy outside Retort's machines: RETORT_AUDIT_CHECKPOINT_WEBHOOK_URL."""
    import http.server
    import subprocess
    import sys
    import threading

    from service.audit.chain import checkpoint_valid, load_public_keys
    from service.webhooks.ops import sign

    got: list[tuple[dict, bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_):
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    env = {
        **prod.env,
        "RETORT_AUDIT_CHECKPOINT_WEBHOOK_URL": f"http://127.0.0.1:{receiver.server_port}/cp",
        "RETORT_AUDIT_CHECKPOINT_WEBHOOK_SECRET": "operator-secret",
        "RETORT_AUDIT_CHECKPOINT_INTERVAL_S": "0.2",
    }
    sweeper = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "beat"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        c = prod.client
        project, _ = setup_project(c, chain_bundle(1))
        run_job(c, register_db(c, project, new_db("sqlite")))
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            # The shared server's own sweeper may sign the head first (any sweeper
            # may): keep the chain growing until this one signs a checkpoint.
            setup_project(c)
            time.sleep(0.3)
    finally:
        sweeper.terminate()
        sweeper.wait(timeout=30)
        receiver.shutdown()
        receiver.server_close()
    assert got, "no checkpoint reached the receiver"
    headers, body = got[0]
    assert headers["Retort-Event"] == "audit.checkpoint"
    stamp = int(headers["Retort-Timestamp"])
    assert headers["Retort-Signature"] == sign("operator-secret", stamp, body)
    cp = json.loads(body)["checkpoint"]
    keys = load_public_keys((prod.log_dir / "audit-signing-key.pub").read_bytes())
    assert checkpoint_valid(cp, keys)

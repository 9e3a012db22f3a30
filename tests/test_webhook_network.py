"""Webhooks reach only where they should (issue 16).

By default a webhook URL whose host resolves to a loopback, private, link-local,
unique-local, multicast, unspecified or reserved address is refused, whatever
its spelling; RETORT_WEBHOOK_ALLOW_NETWORKS opens chosen ranges (the shared test
servers open 127.0.0.0/8 and ::1/128 for their local receivers). Every delivery
resolves the host again, checks each address and connects to the checked one;
its log names the class of a failure, never bytes the remote sent.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.webhooks import delivery, network
from tests.conftest import _base_env
from tests.helpers import Retort, chain_bundle, free_port, register_db, run_job, setup_project

LOOPBACK = network.parse_networks("127.0.0.0/8,::1/128")
BANNER = b"R\x00\x00\x00\n5.5.5-10.11.6-MariaDB-BANNER-7f3a\x00mysql_native_password\x00"
SECRET_BODY = b"BODY-FROM-THE-RECEIVER-91c2"

# Every spelling a resolver accepts for an address webhooks may not reach.
REFUSED = {
    "127.0.0.1": ("127.0.0.1", "loopback"),
    "127.1": ("127.0.0.1", "loopback"),
    "2130706433": ("127.0.0.1", "loopback"),
    "0x7f.1": ("127.0.0.1", "loopback"),
    "0x7f000001": ("127.0.0.1", "loopback"),
    "017700000001": ("127.0.0.1", "loopback"),
    "localhost": ("127.0.0.1", "loopback"),
    "0.0.0.0": ("0.0.0.0", "unspecified"),
    "0": ("0.0.0.0", "unspecified"),
    "[::1]": ("::1", "loopback"),
    "[::]": ("::", "unspecified"),
    "[::ffff:127.0.0.1]": ("::ffff:127.0.0.1", "loopback"),
    "[::ffff:7f00:1]": ("::ffff:127.0.0.1", "loopback"),
    "[::ffff:10.0.0.5]": ("::ffff:10.0.0.5", "private"),
    "[::ffff:169.254.169.254]": ("::ffff:169.254.169.254", "link-local"),
    "10.0.0.5": ("10.0.0.5", "private"),
    "172.16.0.1": ("172.16.0.1", "private"),
    "192.168.1.1": ("192.168.1.1", "private"),
    "169.254.169.254": ("169.254.169.254", "link-local"),
    "[fe80::1]": ("fe80::1", "link-local"),
    "[fe80::1%25lo]": ("fe80::1", "link-local"),
    "[fc00::1]": ("fc00::1", "unique-local"),
    "[fd12:3456::1]": ("fd12:3456::1", "unique-local"),
    "224.0.0.1": ("224.0.0.1", "multicast"),
    "[ff02::1]": ("ff02::1", "multicast"),
    "100.64.0.1": ("100.64.0.1", "CGNAT"),
    "240.0.0.1": ("240.0.0.1", "reserved"),
    "255.255.255.255": ("255.255.255.255", "reserved"),
    "[2002:7f00:1::]": ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    "[64:ff9b::a00:5]": ("64:ff9b::a00:5", "private"),  # NAT64 of 10.0.0.5
}


class Receiver:
    """A real HTTP(S) server in this process: records requests, answers `status` with a body."""

    def __init__(self, status: int = 204, tls: ssl.SSLContext | None = None):
        self.requests: list[dict] = []
        self.status = status
        self.sni: list[str | None] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"headers": dict(self.headers), "body": body})
                self.send_response(receiver.status, "REASON-FROM-THE-RECEIVER")
                self.send_header("Content-Length", str(len(SECRET_BODY)))
                self.end_headers()
                self.wfile.write(SECRET_BODY)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Banner:
    """A TCP port that sends a database's greeting and closes: no HTTP at all."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(BANNER)

    def close(self) -> None:
        self.listener.close()


def _serve(data_dir, allow: str | None) -> Retort:
    """`retort serve` on data_dir; allow=None: RETORT_WEBHOOK_ALLOW_NETWORKS unset (default)."""
    env = _base_env(data_dir)
    env.pop("RETORT_ADMIN_TOKEN")
    env.pop("RETORT_WEBHOOK_ALLOW_NETWORKS")
    if allow is not None:
        env["RETORT_WEBHOOK_ALLOW_NETWORKS"] = allow
    port = free_port()
    server = Retort(env, port, "", data_dir)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    server.spawn("serve", [*cmd, "--data-dir", str(data_dir)])
    try:
        server.wait_ready()
    except Exception:
        server.stop()
        raise
    server.token = (data_dir / "admin-token").read_text().strip()
    return server


@pytest.fixture(scope="module")
def strict(backends, tmp_path_factory):
    """The embedded default (public addresses only), on a data directory where a server
    that allowed loopback first registered a webhook to http://localhost:<receiver>/."""
    data_dir = tmp_path_factory.mktemp("webhook-net")
    receiver = Receiver()
    opened = _serve(data_dir, "127.0.0.0/8")
    try:
        c = opened.client
        project, _ = setup_project(c, chain_bundle(1))
        url = f"http://localhost:{receiver.port}/h"
        r = c.post(f"/v1/projects/{project}/webhooks", {"url": url, "events": ["job.succeeded"]})
        assert r.status == 201, r
        db = register_db(c, project, backends.new("sqlite", data_dir.parent))
        earlier = {"project": project, "hook": r.body["id"], "db": db, "receiver": receiver}
    finally:
        opened.stop()
    server = _serve(data_dir, None)
    server.earlier = earlier  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()
        receiver.close()


def _create(c, project: str, url: str):
    return c.post(f"/v1/projects/{project}/webhooks", {"url": url, "events": ["job.failed"]})


def _deliveries(c, project: str, hook: int, attempts: int = 1, timeout: float = 30) -> list:
    path = f"/v1/projects/{project}/webhooks/{hook}/deliveries"
    deadline = time.monotonic() + timeout
    while True:
        found = c.get(path).body["deliveries"]
        if found and all(d["attempts"] >= attempts and d["attempt_log"] for d in found):
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.1)


def test_every_spelling_of_a_private_address_is_refused_at_creation(strict):
    c = strict.client
    project, _ = setup_project(c)
    for host, (address, why) in REFUSED.items():
        for url in (f"http://{host}/h", f"https://{host}:8443/h"):
            r = _create(c, project, url)
            assert r.status == 422, (url, r)
            error = r.body["error"]
            assert set(error) == {"code", "message", "details"}
            assert error["code"] == "webhook_url_not_allowed", (url, r)
            assert error["details"]["field"] == "url" and error["details"]["address"] == address
            assert address in error["message"] and why in error["message"], (url, r)
            assert "RETORT_WEBHOOK_ALLOW_NETWORKS" in error["message"]
    # Public addresses pass (nothing is sent at creation), and so does a host that
    # does not resolve yet: every delivery resolves and checks again.
    for url in ("http://8.8.8.8/h", "https://[2606:4700:4700::1111]/h", "https://x.invalid/h"):
        assert _create(c, project, url).status == 201, url
    assert c.get(f"/v1/projects/{project}/webhooks").status == 200
    for url in ("gopher://127.0.0.1/", "http://u:p@8.8.8.8/", "http://8.8.8.8:99999/"):
        assert _create(c, project, url).status == 422, url


def test_the_allow_list_opens_only_its_ranges(retort):
    """The shared servers open 127.0.0.0/8 and ::1/128, nothing else."""
    c = retort.client
    project, _ = setup_project(c)
    for host in ("127.0.0.1", "127.1", "0x7f.1", "2130706433", "localhost", "[::1]"):
        assert _create(c, project, f"http://{host}:9/h").status == 201, host
    assert _create(c, project, "http://[::ffff:127.0.0.1]:9/h").status == 201
    for host in ("10.0.0.5", "169.254.169.254", "[fd12::1]", "0.0.0.0", "[::ffff:10.0.0.5]"):
        r = _create(c, project, f"http://{host}/h")
        assert r.status == 422 and r.body["error"]["code"] == "webhook_url_not_allowed", host


def test_a_bad_cidr_is_a_clear_error():
    for bad, word in (("10.0.0.1/8", "host bits"), ("10.0.0.0/33", "10.0.0.0/33"), ("x", "'x'")):
        with pytest.raises(ValueError, match="RETORT_WEBHOOK_ALLOW_NETWORKS") as caught:
            network.parse_networks(f"127.0.0.0/8, {bad}")
        assert word in str(caught.value)
    assert network.parse_networks(" 10.0.0.0/8,, fd00::/8 ") == network.parse_networks(
        "10.0.0.0/8,fd00::/8"
    )
    assert network.parse_networks("") == ()


def test_a_webhook_that_passed_at_creation_is_refused_at_delivery(strict):
    """Its host now resolves to an address the server refuses: nothing is sent."""
    c, earlier = strict.client, strict.earlier
    receiver = earlier["receiver"]
    assert run_job(c, earlier["db"])["state"] == "succeeded"
    (d,) = _deliveries(c, earlier["project"], earlier["hook"])
    assert d["state"] == "pending" and d["status_code"] is None
    assert d["error"] == "refused: address 127.0.0.1 is loopback", d
    assert d["attempt_log"][0]["error"] == d["error"]
    assert receiver.requests == []


def _post(url: str, resolver, allow=LOOPBACK, context=None):
    request = urllib.request.Request(url, data=b"{}", method="POST")
    return delivery._post(request, 2.0, allow, resolver, context)


def test_the_connection_goes_to_the_address_that_was_checked():
    """One lookup per attempt; the checked address is dialled, the URL's host is named."""
    receiver = Receiver()
    answers = [[("127.0.0.1", "ok")], [("127.0.0.1", "ok"), ("10.0.0.5", "rebound")]]
    asked: list[tuple[str, int]] = []

    def resolver(host, port):
        asked.append((host, port))
        return [(socket.AF_INET, (ip, port)) for ip, _ in answers[len(asked) - 1]]

    try:
        url = f"http://receiver.test:{receiver.port}/h"
        assert _post(url, resolver) == (204, None)
        assert asked == [("receiver.test", receiver.port)]
        assert receiver.requests[0]["headers"]["Host"] == f"receiver.test:{receiver.port}"
        # The next lookup answers a private address too: refused before any connection.
        assert _post(url, resolver) == (None, "refused: address 10.0.0.5 is private")
        assert len(asked) == 2 and len(receiver.requests) == 1
        # The default allows no loopback either.
        status, error = _post(url, lambda h, p: [(socket.AF_INET, ("127.0.0.1", p))], allow=())
        assert (status, error) == (None, "refused: address 127.0.0.1 is loopback")
        assert len(receiver.requests) == 1
    finally:
        receiver.close()


def _certificates(tmp_path, host: str):
    """A CA and a certificate for `host` it signed: (client context, server context)."""
    now = dt.datetime.now(dt.UTC)

    def cert(subject, issuer, key, signer, ca: bool, san: str | None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("test ca", "test ca", ca_key, ca_key, True, None)
    leaf = cert(host, "test ca", key, ca_key, False, host)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    return ssl.create_default_context(cafile=str(tmp_path / "ca.pem")), server


def test_https_names_the_host_in_sni_and_verifies_its_certificate(tmp_path):
    client, server = _certificates(tmp_path, "receiver.test")
    receiver = Receiver(tls=server)
    local = lambda host, port: [(socket.AF_INET, ("127.0.0.1", port))]  # noqa: E731
    try:
        url = f"https://receiver.test:{receiver.port}/h"
        assert _post(url, local, context=client) == (204, None)
        assert receiver.sni == ["receiver.test"]
        assert receiver.requests[0]["headers"]["Host"] == f"receiver.test:{receiver.port}"
        # The same address under another name: its certificate does not match.
        status, error = _post(f"https://other.test:{receiver.port}/h", local, context=client)
        assert status is None and error.startswith("tls_error: "), error
        assert "other.test" in error and len(receiver.requests) == 1
        # Plain HTTP to the TLS port, TLS to a plain HTTP port: a class, no bytes.
        status, error = _post(f"http://receiver.test:{receiver.port}/h", local, context=client)
        assert status is None and error.split(":")[0] in ("bad_response", "connection_closed")
    finally:
        receiver.close()
    plain = Receiver()
    try:
        status, error = _post(f"https://receiver.test:{plain.port}/h", local, context=client)
        assert status is None and error.startswith("tls_error"), error
    finally:
        plain.close()


def test_a_failed_attempt_names_its_class_and_never_what_the_remote_sent():
    local = lambda host, port: [(socket.AF_INET, ("127.0.0.1", port))]  # noqa: E731
    banner, failing = Banner(), Receiver(status=500)
    try:
        status, error = _post(f"http://banner.test:{banner.port}/h", local)
        assert status is None and error.split(":")[0] in ("bad_response", "connection_closed")
        assert "MariaDB" not in error and "BANNER" not in error and "\\x" not in error, error
        # The real MariaDB port of the test machine: its handshake does not show either.
        status, error = _post("http://db.test:3306/h", local)
        assert status is None and "MariaDB" not in error and "mysql" not in error.lower(), error
        assert _post(f"http://failing.test:{failing.port}/h", local) == (500, None)
        assert _post(f"http://closed.test:{free_port()}/h", local) == (
            None,
            "connect_failed: connection refused",
        )
    finally:
        banner.close()
        failing.close()


def test_the_delivery_log_shows_classes_and_status_codes_only(retort, new_db):
    """End to end: a banner port, a receiver answering 500 with a body, a closed port."""
    c = retort.client
    banner, failing = Banner(), Receiver(status=500)
    project, _ = setup_project(c, chain_bundle(1))
    hooks: dict[str, int] = {}
    try:
        for name, url in (
            ("banner", f"http://127.0.0.1:{banner.port}/h"),
            ("failing", f"http://localhost:{failing.port}/h"),
            ("mariadb", "http://127.0.0.1:3306/h"),
            ("closed", f"http://127.0.0.1:{free_port()}/h"),
        ):
            body = {"url": url, "events": ["job.succeeded"]}
            r = c.post(f"/v1/projects/{project}/webhooks", body)
            assert r.status == 201, r
            hooks[name] = r.body["id"]
        assert run_job(c, register_db(c, project, new_db("sqlite")))["state"] == "succeeded"
        seen = {name: _deliveries(c, project, hook, attempts=2) for name, hook in hooks.items()}
        (failed,) = seen["failing"]
        assert failed["status_code"] == 500 and failed["error"] == "http_status 500"
        assert {a["status_code"] for a in failed["attempt_log"]} == {500}
        assert {a["error"] for a in failed["attempt_log"]} == {"http_status 500"}
        assert failing.requests  # it was reached, and answered with a body
        (closed,) = seen["closed"]
        assert closed["error"] == "connect_failed: connection refused", closed
        for name in ("banner", "mariadb"):
            (d,) = seen[name]
            assert d["status_code"] is None
            assert d["error"].split(":")[0] in ("bad_response", "connection_closed"), d
        text = json.dumps(seen)
        for remote in ("MariaDB", "BANNER", "mysql_native_password", "REASON-FROM", "BODY-FROM"):
            assert remote not in text, remote
    finally:
        for hook in hooks.values():  # no more attempts at the MariaDB port
            c.request("DELETE", f"/v1/projects/{project}/webhooks/{hook}")
        banner.close()
        failing.close()

"""What deployments meet: TLS with a private CA, a pool sized for a web app, Ctrl-C in a batch job."""

import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading

import pytest
import requests

import codewords_lite as cw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def untrusted_tls(tmp_path_factory):
    """A TLS server on 127.0.0.1 whose certificate (self-signed, for localhost) no CA bundle
    trusts: it counts the handshakes it is offered."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = str(folder / "key.pem"), str(folder / "cert.pem")
    command = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -keyout KEY -out CERT"
    subprocess.run(
        [{"KEY": key, "CERT": cert}.get(word, word) for word in command.split()],
        capture_output=True,
        check=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    handshakes = []

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            handshakes.append(1)
            try:
                context.wrap_socket(connection, server_side=True).close()
            except (OSError, ssl.SSLError):
                connection.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"https://localhost:{listener.getsockname()[1]}", handshakes
    listener.close()


@pytest.mark.parametrize("given_session", [False, True], ids=["own pool", "session"])
def test_a_certificate_that_fails_verification_is_not_retried_and_says_what_to_do(untrusted_tls, given_session):
    """Issue 23: a refused certificate was retried as a dropped connection (4 handshakes, 2-3 s a
    call), and the error named an internal pool class instead of the host."""
    url, handshakes = untrusted_tls
    handshakes.clear()
    session = requests.Session() if given_session else None
    with cw.Client("cwk-test", base_url=url, session=session, max_retries=3) as client:
        with pytest.raises(cw.APIConnectionError) as caught:
            client.provision()
    assert len(handshakes) == 1
    message = str(caught.value)
    assert "certificate of localhost could not be verified" in message
    assert "REQUESTS_CA_BUNDLE" in message and "session.verify" in message
    assert "Pool" not in message


def test_pool_size_is_checked_and_survives_a_pickle():
    import pickle

    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(cw.ConfigurationError, match="pool_size"):
            cw.Client("cwk-test", pool_size=bad)
    assert pickle.loads(pickle.dumps(cw.Client("cwk-test", pool_size=3))).pool_size == 3


POOL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import codewords_lite as cw

    def sockets():
        return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    with cw.Client(sys.argv[2], base_url=sys.argv[3], pool_size=int(sys.argv[4])) as client:
        list(client.map("sleep", [{"seconds": 0.05}] * 16, max_workers=8))
        print(json.dumps(sockets()))
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts sockets in /proc")
@pytest.mark.parametrize("size", [2, 8])
def test_the_pool_keeps_as_many_connections_as_its_size(runtime, size):
    """Issue 23: the pool's size was a module constant; a web app sets it per client."""
    result = subprocess.run(
        [sys.executable, "-c", POOL_SCRIPT, ROOT, runtime.api_key, runtime.url, str(size)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == size  # 8 workers at once: the pool keeps `size` of their connections

"""TLS, mutual TLS and a shared token on every link (client -> stage, stage -> stage, stage -> coordinator): a
cluster made with `layerline certs` serves a client that has the certificate and the token, with transformers'
tokens; a client without the token, with a wrong one, without a client certificate or without TLS gets nowhere;
a stage without the token cannot join the coordinator."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import grpc
import pytest
from cryptography import x509

from layerline.client import Client, ClientConfig, RPCError
from layerline.errors import LayerlineError
from layerline.local_cluster import LocalCluster, LocalCoordinator
from layerline.security import Security
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=2, kv_heads=2)
PROMPT = [17, 101, 5, 250, 33, 42, 7, 199]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("certs")
    out = subprocess.run(
        [sys.executable, "-m", "layerline.cli", "certs", "--out", str(folder), "--hosts", "127.0.0.1,localhost"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return {name: str(folder / name) for name in ("ca.pem", "ca.key", "node.pem", "node.key", "token")}


def flags(certs: dict[str, str], token: bool = True) -> list[str]:
    out = ["--tls-cert", certs["node.pem"], "--tls-key", certs["node.key"], "--tls-ca", certs["ca.pem"]]
    return out + (["--token-file", certs["token"]] if token else [])


def test_certs_are_for_the_given_hosts_and_keys_stay_private(certs):
    node = x509.load_pem_x509_certificate(open(certs["node.pem"], "rb").read())
    sans = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    ca = x509.load_pem_x509_certificate(open(certs["ca.pem"], "rb").read())
    assert node.issuer == ca.subject
    for name in ("ca.key", "node.key", "token"):
        assert stat.S_IMODE(os.stat(certs[name]).st_mode) == 0o600, name
    assert len(open(certs["token"]).read().strip()) >= 40  # 32 random bytes, url-safe


def test_security_files_are_checked(tmp_path, certs):
    with pytest.raises(LayerlineError, match="go together"):
        Security.from_files(cert=certs["node.pem"])
    with pytest.raises(LayerlineError, match="cannot read --tls-ca"):
        Security.from_files(ca=str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(LayerlineError, match="is not a PEM file"):
        Security.from_files(ca=str(tmp_path / "junk.pem"))


def test_mutual_tls_and_token_on_every_link(tiny_checkpoint, certs):
    folder, ref = tiny_checkpoint(SPEC)
    expected = hf_greedy(ref, PROMPT, 8)
    good = Security.from_files(certs["node.pem"], certs["node.key"], certs["ca.pem"], certs["token"])
    with LocalCluster(folder, [(0, 1), (1, 2)], threads=1, extra_args=flags(certs)) as cluster:
        # stage 1 -> stage 2 and the loop back run over mutual TLS with the token too: else no token would come back
        with Client(cluster.route, config=ClientConfig(security=good)) as client:
            got = client.generate(PROMPT, max_new_tokens=8, stop_token_ids=[], stream=False).token_ids
            assert got == expected

        def refused(security: Security) -> RPCError:
            with pytest.raises(RPCError) as err:
                with Client(cluster.route, config=ClientConfig(security=security, connect_timeout=5)) as c:
                    c.generate(PROMPT, max_new_tokens=2, stream=False)
            return err.value

        no_token = Security.from_files(certs["node.pem"], certs["node.key"], certs["ca.pem"])
        e = refused(no_token)
        assert e.code == grpc.StatusCode.UNAUTHENTICATED and "needs a token" in e.details
        e = refused(Security(good.cert, good.key, good.ca, "wrong-token"))
        assert e.code == grpc.StatusCode.UNAUTHENTICATED and "missing or wrong token" in e.details
        e = refused(Security(ca=good.ca, token=good.token))  # no client certificate: the handshake fails
        assert e.code == grpc.StatusCode.UNAVAILABLE
        e = refused(Security(token=good.token))  # plaintext to a TLS port
        assert e.code == grpc.StatusCode.UNAVAILABLE


def test_a_stage_without_the_token_cannot_join(tiny_checkpoint, certs, tmp_path):
    folder, _ = tiny_checkpoint(SPEC)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    with LocalCoordinator(folder, heartbeat=0.5, extra_args=flags(certs)) as coordinator:
        cmd = [sys.executable, "-m", "layerline.cli", "stage", "--model", folder, "--coordinator"]
        cmd += [coordinator.address, "--port", "0", "--threads", "1", *flags(certs, token=False)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "refused this stage" in out.stderr and "needs a token" in out.stderr
        # with the token it joins: the coordinator's status (asked with the token) lists it
        with LocalCluster(
            folder, [None], coordinator=coordinator.address, threads=1, env=env, extra_args=flags(certs)
        ) as stage:
            status = subprocess.run(
                [sys.executable, "-m", "layerline.cli", "status", "--coordinator", coordinator.address, "--json"]
                + flags(certs),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert status.returncode == 0, status.stderr
            assert stage.route[0] in status.stdout

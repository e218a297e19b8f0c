"""TLS, mutual TLS and a shared token on every gRPC link: client -> stage, stage -> stage, stage -> coordinator,
client -> coordinator. One `Security` per process, from PEM files given on the command line (or in the SDK's
`ClientConfig`), used wherever that process listens or dials.

- Server side: with `cert` and `key` it listens with TLS; with `ca` as well it requires a client certificate signed
  by that CA (mutual TLS); with `token` every call must carry `authorization: Bearer <token>` (checked by an
  interceptor, compared in constant time; the health service stays open). A call without it gets UNAUTHENTICATED.
- Client side: with `ca` it dials with TLS and checks the server's certificate against that CA; with `cert` and `key`
  it presents its own (mutual TLS); with `token` it sends it on every call.

A process that is both (a stage) uses the same files for both roles. `make_certificates` writes a private CA and a
certificate for the cluster's hosts (`layerline certs`). Sending a token without TLS sends it in the clear: the
stage and coordinator warn about it. This module imports no torch.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from layerline.errors import LayerlineError
from layerline.grpc_setup import channel_options

logger = logging.getLogger(__name__)

TOKEN_ENV = "LAYERLINE_TOKEN"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # answered without a token


@dataclass(frozen=True)
class Security:
    cert: bytes = b""  # PEM certificate chain of this process
    key: bytes = b""  # its PEM private key
    ca: bytes = b""  # PEM CA certificate(s) to check the other side against
    token: str = ""  # shared secret
    names: tuple[str, ...] = ()  # the files it came from, for messages

    @classmethod
    def from_files(cls, cert: str = "", key: str = "", ca: str = "", token_file: str = "", token: str = "") -> Security:
        """Read the PEM files and the token (a file, or `token`, or the LAYERLINE_TOKEN environment variable)."""
        if bool(cert) != bool(key):
            raise LayerlineError("--tls-cert and --tls-key go together")

        def read(path: str, what: str) -> bytes:
            if not path:
                return b""
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise LayerlineError(f"cannot read {what} {path}: {e.strerror or e}") from None
            if b"-----BEGIN" not in data:
                raise LayerlineError(f"{what} {path} is not a PEM file")
            return data

        secret = token or os.environ.get(TOKEN_ENV, "")
        if token_file:
            try:
                with open(token_file) as f:
                    secret = f.read().strip()
            except OSError as e:
                raise LayerlineError(f"cannot read --token-file {token_file}: {e.strerror or e}") from None
            if not secret:
                raise LayerlineError(f"--token-file {token_file} is empty")
        return cls(
            read(cert, "--tls-cert"),
            read(key, "--tls-key"),
            read(ca, "--tls-ca"),
            secret,
            tuple(p for p in (cert, key, ca) if p),
        )

    @property
    def tls_server(self) -> bool:
        return bool(self.cert)

    @property
    def tls_client(self) -> bool:
        return bool(self.ca)

    # ---- server side ---------------------------------------------------------------------------------------------

    def bind(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on `address` (TLS when there is a certificate); returns the port, 0 if it could not bind."""
        try:
            if not self.tls_server:
                if self.token:
                    logger.warning("a token without TLS travels in the clear: give --tls-cert/--tls-key too")
                return server.add_insecure_port(address)
            creds = grpc.ssl_server_credentials(
                [(self.key, self.cert)], root_certificates=self.ca or None, require_client_auth=bool(self.ca)
            )
            return server.add_secure_port(address, creds)
        except RuntimeError:
            return 0

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenCheck(self.token)] if self.token else []

    # ---- client side ---------------------------------------------------------------------------------------------

    def channel(self, address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
        """An asyncio channel to `address` with this process's TLS and token (options: grpc_setup.channel_options
        unless given)."""
        options = options or channel_options()
        interceptors = token_interceptors(self.token) if self.token else None
        if not self.tls_client:
            return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
        return grpc.aio.secure_channel(address, self._credentials(), options=list(options), interceptors=interceptors)

    def sync_channel(self, address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        """A blocking channel (the CLI's one-off calls); the token goes in `metadata()` of each call."""
        options = options or channel_options()
        if not self.tls_client:
            return grpc.insecure_channel(address, options=list(options))
        return grpc.secure_channel(address, self._credentials(), options=list(options))

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key or None, certificate_chain=self.cert or None
        )


class TokenCheck(grpc.aio.ServerInterceptor):
    """Every call but the health service's must carry `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._want = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        got = next((v for k, v in (details.invocation_metadata or ()) if k == "authorization"), "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._want):
            return handler
        return _refusal(handler, "missing or wrong token" if got else "this server needs a token (--token-file)")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, for the streaming kinds

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse_stream if handler.response_streaming else refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add `authorization: Bearer <token>` to every call (one per kind of call)."""
    pair = ("authorization", f"Bearer {token}")

    def with_token(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()))
        metadata.add(*pair)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return await continuation(with_token(details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            return await continuation(with_token(details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, details, request_iterator):
            return await continuation(with_token(details), request_iterator)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, details, request_iterator):
            return await continuation(with_token(details), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]


def make_certificates(folder: str, hosts: Sequence[str], days: int = 825) -> dict[str, str]:
    """A private CA and one certificate for the cluster's processes (server and client use, valid for `hosts`:
    names and IP addresses), plus a random token. Writes ca.pem, ca.key, node.pem, node.key and token into
    `folder` (keys readable by the owner only); returns their paths by name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise LayerlineError("give at least one host name or IP address the certificate is for")
    os.makedirs(folder, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "layerline private CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital signature, cert sign, CRL sign
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(k) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    files = {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "ca.key": key_pem(ca_key),
        "node.pem": node.public_bytes(serialization.Encoding.PEM),
        "node.key": key_pem(node_key),
        "token": (secrets.token_urlsafe(32) + "\n").encode(),
    }
    out = {}
    for name, data in files.items():
        path = os.path.join(folder, name)
        private = name.endswith(".key") or name == "token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        out[name] = path
    return out

"""Helpers for the operations tests: certificates made on the spot, metrics scraping."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class CertPair:
    cert: Path
    key: Path


@dataclass
class TestPKI:
    ca: Path               # the CA every legitimate party trusts
    server: CertPair       # for 127.0.0.1 / localhost, signed by ca
    client: CertPair       # client certificate signed by ca
    rogue_client: CertPair  # a client certificate signed by another CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))


def _make_ca(directory: Path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(name, _name(name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


def _issue(directory: Path, name: str, ca_cert, ca_key, usage, hosts=()) -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    usages = list(usage) if isinstance(usage, (list, tuple)) else [usage]
    builder = (_builder(name, ca_cert.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if hosts:
        alt = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = CertPair(directory / f"{name}.pem", directory / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pair.key, key)
    return pair


def make_pki(directory: Path) -> TestPKI:
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, ca_path = _make_ca(directory, "splitserve-test-ca")
    rogue_cert, rogue_key, _ = _make_ca(directory, "rogue-ca")
    server = _issue(directory, "server", ca_cert, ca_key, ExtendedKeyUsageOID.SERVER_AUTH,
                    hosts=("127.0.0.1", "localhost"))
    client = _issue(directory, "client", ca_cert, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _issue(directory, "rogue-client", rogue_cert, rogue_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    return TestPKI(ca=ca_path, server=server, client=client, rogue_client=rogue)


def make_compose_certs(directory: Path) -> dict[str, Path]:
    """The ./certs directory deploy/compose.tls.yaml expects: ca.pem, model-service.pem/.key,
    preproc.pem/.key (server and client usage), health-probe.pem/.key; plus client.pem/.key for
    callers. Server names: the compose service name, 127.0.0.1 and localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, ca_path = _make_ca(directory, "ca")
    both = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    for service in ("model-service", "preproc"):
        _issue(directory, service, ca_cert, ca_key, both, hosts=(service, "127.0.0.1", "localhost"))
    for client in ("health-probe", "client"):
        _issue(directory, client, ca_cert, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    return {"ca": ca_path, "client_cert": directory / "client.pem", "client_key": directory / "client.key"}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def sample_sum(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# ---------------------------------------------------------------- tiny models and running stacks

@functools.cache
def tiny_model(kind: str) -> Path:
    """A tiny model directory built once per test process: 'classifier' (text-classification,
    MLflow components layout) or 'gpt2' (text-generation)."""
    from tests import model_factory

    root = Path(tempfile.mkdtemp(prefix=f"splitserve-ops-{kind}-"))
    if kind == "classifier":
        model, tokenizer = model_factory.build_encoder("text-classification")
        return model_factory.save_components(root / "model", model, tokenizer, "text-classification")
    if kind == "gpt2":
        model, tokenizer = model_factory.build_gpt2()
        return model_factory.save_components(root / "model", model, tokenizer, "text-generation")
    raise ValueError(kind)


SHARED_SENTENCES = Path(__file__).resolve().parent.parent.parent / "shared" / "bench" / "sentences.txt"


def read_sentences(path: Path = SHARED_SENTENCES, limit: int | None = None) -> list[str]:
    """Request texts: the lines of `path` (the shared benchmark sentences) when present, else the test corpus."""
    if path.exists():
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if lines:
            return lines[:limit]
    from tests.model_factory import corpus

    return corpus(limit or 256)[:limit]


def sentences(limit: int = 64) -> list[str]:
    return read_sentences(limit=limit)

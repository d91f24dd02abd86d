# -*- test-case-name: tests.test_dkim -*-
"""
DKIM keys: making a pair, reading the private key file, and the DNS TXT
record that publishes the public half (RFC 6376 3.6.1, RFC 8463 for
Ed25519). RSA keys are PKCS#1 PEM, as OpenSSL and OpenDKIM write them;
Ed25519 keys are PKCS#8 PEM.
"""

from __future__ import annotations

import base64
import os
import re


ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048
#: RFC 8301 3.2: verifiers must refuse RSA keys under 1024 bits.
RSA_MIN_BITS = 1024
SELECTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$")


class DKIMKeyError(ValueError):
    """A key file that cannot be used, with the reason."""


def generate(algorithm: str) -> bytes:
    """A new private key, PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
    raise ValueError(algorithm)


def write_key(path: str, pem: bytes) -> None:
    """Write a new key file, mode 600 from its creation; an existing file is never replaced."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())


def load(pem: bytes, algorithm: str) -> tuple[bytes, str]:
    """
    (what dkimpy signs with, the TXT record's p= value) for a PEM private key.

    @raise DKIMKeyError: the file is not a private key of C{algorithm}.
    """
    # Imported here: the config parser imports this module for every
    # server, and only one with DKIM keys needs cryptography's key loaders.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise DKIMKeyError(f"not an unencrypted PEM private key ({e})") from e
    if algorithm == "rsa":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DKIMKeyError("not an RSA private key (algorithm is \"rsa\")")
        if key.key_size < RSA_MIN_BITS:
            raise DKIMKeyError(f"an RSA key of {key.key_size} bits; DKIM needs at least "
                            f"{RSA_MIN_BITS} (RFC 8301), {RSA_BITS} is usual")
        # dkimpy reads PKCS#1, whatever form the file has.
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return private, base64.b64encode(public).decode()
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DKIMKeyError("not an Ed25519 private key (algorithm is \"ed25519\")")
    # dkimpy takes an Ed25519 key as the base64 of its 32 raw bytes.
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw), base64.b64encode(public).decode()


def txt_value(algorithm: str, public: str) -> str:
    return f"v=DKIM1; k={algorithm}; p={public}"


def txt_record(domain: str, selector: str, algorithm: str, public: str) -> str:
    """The zone-file line: the value cut into quoted strings of at most 255 characters (RFC 1035)."""
    value = txt_value(algorithm, public)
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)]
    return f"{selector}._domainkey.{domain}. IN TXT " + " ".join(f'"{c}"' for c in chunks)

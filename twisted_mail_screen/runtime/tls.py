# -*- test-case-name: tests.test_tls_clients -*-
"""
The server's TLS context, loaded once from the configured PEM files and
shared by STARTTLS (SMTP), STLS (POP3), STARTTLS (IMAP) and every C{ssl:}
listener that names the same files.

The profile is Mozilla's "intermediate" one without DHE: TLS 1.2 with
ECDHE key exchange and AEAD ciphers only (forward secrecy, no CBC), and
TLS 1.3 as OpenSSL offers it.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl

#: TLS 1.2 cipher suites: ECDHE with AES-GCM or ChaCha20-Poly1305.
TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                 "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                 "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class TLSFileError(Exception):
    def __init__(self, which: str, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.which = which
        self.path = path
        self.problem = problem


def load_server_context(certificate: str, key: str) -> ssl.CertificateOptions:
    """
    Load the certificate chain (leaf first, then intermediates) and key into
    options for C{startTLS}.

    @raise TLSFileError: naming which file is unusable and why.
    """
    try:
        with open(certificate, "rb") as f:
            cert_pem = f.read()
        with open(key, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise TLSFileError("certificate", e.filename or certificate, e.strerror or str(e)) from e
    try:
        chain = [ssl.Certificate.loadPEM(block) for block in _PEM_CERT.findall(cert_pem)]
        if not chain:
            raise ValueError("no BEGIN CERTIFICATE block")
    except Exception as e:
        raise TLSFileError("certificate", certificate, f"not a PEM certificate ({e})") from e
    try:
        private = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
    except Exception as e:
        raise TLSFileError("key", key, f"not a PEM private key ({e})") from e
    try:
        check = SSL.Context(SSL.TLS_METHOD)
        check.use_certificate(chain[0].original.to_cryptography())
        check.use_privatekey(private.original.to_cryptography_key())
        check.check_privatekey()
    except Exception as e:
        raise TLSFileError("key", key, f"does not match the certificate ({e})") from e
    return ssl.CertificateOptions(
        privateKey=private.original, certificate=chain[0].original,
        extraCertChain=[c.original for c in chain[1:]],
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def key_file_warning(key: str) -> str | None:
    """A warning when the private key can be read by anyone but its owner."""
    try:
        mode = os.stat(key).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"tls.key: {key} is readable by group or others (mode {stat.S_IMODE(mode):o}); "
                f"chmod 600 it")
    return None


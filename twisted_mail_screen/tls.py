# -*- test-case-name: tests.test_smtp -*-
"""
The server's TLS context, loaded once from the configured PEM files and
shared by STARTTLS (SMTP), STLS (POP3) and STARTTLS (IMAP).
"""

from __future__ import annotations

from OpenSSL import crypto
from twisted.internet import ssl


class TLSFileError(Exception):
    def __init__(self, which: str, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.which = which
        self.path = path
        self.problem = problem


def load_server_context(certificate: str, key: str) -> ssl.CertificateOptions:
    """
    Load the certificate chain and key into options for C{startTLS}.

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
        chain = ssl.Certificate.loadPEM(cert_pem)
    except Exception as e:
        raise TLSFileError("certificate", certificate, f"not a PEM certificate ({e})") from e
    try:
        private = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
    except Exception as e:
        raise TLSFileError("key", key, f"not a PEM private key ({e})") from e
    try:
        return ssl.PrivateCertificate.fromCertificateAndKeyPair(chain, private).options()
    except Exception as e:
        raise TLSFileError("key", key, f"does not match the certificate ({e})") from e

# -*- test-case-name: tests.test_dkim -*-
"""
C{mailscreen dkim keygen DOMAIN [--selector S] [--algorithm rsa|ed25519]}
writes a new DKIM private key (mode 600) into C{data_dir/dkim/} and prints
the C{[dkim]} entry to add and the DNS TXT record to publish;
C{mailscreen dkim show DOMAIN} prints the records of the domain's keys
again (those of C{[dkim]}, and the ones made by keygen not yet configured).
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from typing import Any, Callable

from twisted_mail_screen.mailauth.keys import (
    ALGORITHMS, SELECTOR, DKIMKeyError, generate, load, txt_record, write_key)
from twisted_mail_screen.store.addresses import valid_domain


def add_parser(sub: Any, run: Callable[..., None]) -> None:
    dkim = sub.add_parser("dkim", help="DKIM signing keys: keygen DOMAIN, show DOMAIN (docs/mailauth.md)")
    dkim.add_argument("action", choices=("keygen", "show"))
    dkim.add_argument("domain")
    dkim.add_argument("--selector", default=None,
                      help="keygen: the selector (default: s<YYYYMM>, e<YYYYMM> for ed25519)")
    dkim.add_argument("--algorithm", choices=ALGORITHMS, default="rsa",
                      help="keygen: rsa (2048 bits, the default) or ed25519 (a second signature)")
    dkim.set_defaults(run=run)


def key_path(data_dir: str, domain: str, selector: str) -> str:
    return os.path.join(data_dir, "dkim", f"{domain}.{selector}.key")


def _algorithm_of(pem: bytes) -> str:
    return "rsa" if b"RSA PRIVATE KEY" in pem else "ed25519"


def run_dkim(args: argparse.Namespace, config: Any, error: type[Exception]) -> None:
    domain = args.domain.lower().rstrip(".")
    if not valid_domain(domain):
        raise error(f"{args.domain!r} is not a domain name")
    if not config.test_host and domain not in config.domains:
        raise error(f"{domain!r} is not one of the local domains ({', '.join(config.domains)})")
    if args.action == "keygen":
        return _keygen(args, config, domain, error)
    return _show(config, domain, error)


def _keygen(args: argparse.Namespace, config: Any, domain: str, error: type[Exception]) -> None:
    selector = args.selector or f"{'e' if args.algorithm == 'ed25519' else 's'}{time.strftime('%Y%m')}"
    if not SELECTOR.match(selector):
        raise error(f"{selector!r} is not a selector (letters, digits, '-', dotted labels)")
    path = key_path(config.data_dir, domain, selector)
    pem = generate(args.algorithm)
    try:
        write_key(path, pem)
    except FileExistsError:
        raise error(f"{path} exists: choose another --selector (a published key stays "
                    f"until the mail it signed has been read)") from None
    _, public = load(pem, args.algorithm)
    print(f"wrote {path} ({args.algorithm}, mode 600)")
    print("add to [dkim] keys in the configuration, then restart:")
    print(f'  {{ domain = "{domain}", selector = "{selector}", key = "{path}", '
          f'algorithm = "{args.algorithm}" }},')
    print("publish this DNS record before mail is signed with it:")
    print(txt_record(domain, selector, args.algorithm, public))


def _show(config: Any, domain: str, error: type[Exception]) -> None:
    records: dict[str, str] = {}
    for key in config.dkim.keys:
        if key.domain == domain:
            records[os.path.realpath(key.key)] = txt_record(domain, key.selector, key.algorithm,
                                                            key.public)
    for path in sorted(glob.glob(key_path(config.data_dir, domain, "*"))):
        if os.path.realpath(path) in records:
            continue
        selector = os.path.basename(path)[len(domain) + 1:-len(".key")]
        with open(path, "rb") as f:
            pem = f.read()
        algorithm = _algorithm_of(pem)
        try:
            _, public = load(pem, algorithm)
        except DKIMKeyError as e:
            raise error(f"{path}: {e}") from e
        records[path] = txt_record(domain, selector, algorithm, public) + "   ; not in [dkim] yet"
    if not records:
        raise error(f"no DKIM key for {domain}: make one with 'mailscreen dkim keygen {domain}'")
    for record in records.values():
        print(record)

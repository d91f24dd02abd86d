from setuptools import find_packages, setup

setup(
    name="twisted-mail-screen",
    version="0.1.0",
    description="A small mail server on Twisted: SMTP, submission, POP3 and IMAP on "
                "Maildir, with dynamic screening of abusive clients",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["twisted_mail_screen", "twisted_mail_screen.*"])
    + ["twisted.plugins"],
    package_data={"twisted.plugins": ["mailscreen_plugin.py"],
                  # the web page's HTML, CSS and JavaScript modules (web/ui.py)
                  "twisted_mail_screen.web": ["static/*"]},
    install_requires=["twisted", "zope.interface", "service-identity", "pyOpenSSL",
                      "prometheus_client",  # /metrics: its registry and text format
                      # DKIM signing and verifying (RFC 6376; Ed25519 through PyNaCl):
                      # maintained, the verifier of Mailman and of most Python milters.
                      "dkimpy[ed25519]",
                      # inbound SPF (the reference implementation; lookups through
                      # dnspython, pointed at our own resolver), Authentication-Results
                      # (RFC 8601), DMARC's organizational domain (a current Public
                      # Suffix List, shipped in the package)
                      "pyspf", "dnspython", "authres", "publicsuffixlist"],
    # imapclient: its live test suite runs against our IMAP server (tests/test_imapclient_live.py)
    extras_require={"test": ["pytest", "hypothesis", "selenium", "imapclient==4.1.0"]},
    entry_points={"console_scripts": ["mailscreen = twisted_mail_screen.admin.cli:main"],
                  "pytest11": ["mailscreen = twisted_mail_screen.pytest_plugin"]},
)

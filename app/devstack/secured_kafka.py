"""What makes the harness's broker a production-like one: a SASL_SSL listener (SCRAM-SHA-512 users
made at format time, a per-run certificate), the StandardAuthorizer with nothing allowed unless an
ACL says so, and the operator tool that applies ACLs (``kafka-acls``' AclCommand, from the same jars).

The controller listener takes SASL PLAIN with one static user, so no client reaches the controller
without a password either; only ``admin`` (inter-broker, and the ACL tool) and that controller user
are super users.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import subprocess
from base64 import b64encode
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.helpers import create_ssl_context

from app.devstack import ServiceUnavailable
from app.devstack.certificates import TlsFiles

MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 4096
ADMIN = "admin"
CONTROLLER_USER = "controller"
ACL_TOOL = "org.apache.kafka.tools.AclCommand"

SECURED_LISTENERS = """\
listeners=SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=SASL_SSL://127.0.0.1:{port}
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SASL_PLAINTEXT
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms={mechanism}
sasl.mechanism.inter.broker.protocol={mechanism}
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=\
org.apache.kafka.common.security.scram.ScramLoginModule required \
username="{admin}" password="{admin_password}";
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=\
org.apache.kafka.common.security.plain.PlainLoginModule required \
username="{controller_user}" password="{controller_password}" \
user_{controller_user}="{controller_password}";
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={truststore}
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:{admin};User:{controller_user}"""


def _password() -> str:
    return secrets.token_hex(16)


@dataclass
class BrokerSecurity:
    """The secured listener's certificate and its SCRAM users (name -> password), ``admin`` among
    them. Passwords are made per run and live only in this object and the broker's work dir."""

    tls: TlsFiles
    users: dict[str, str] = field(default_factory=dict, repr=False)
    controller_password: str = field(default_factory=_password, repr=False)

    def __post_init__(self) -> None:
        self.users.setdefault(ADMIN, _password())

    def add_user(self, name: str) -> str:
        """Make a SCRAM user (before the broker is formatted); return its password."""
        return self.users.setdefault(name, _password())

    def listeners(self, port: int, controller_port: int) -> str:
        """The server.properties lines of the secured listeners and the authorizer."""
        return SECURED_LISTENERS.format(
            port=port,
            controller_port=controller_port,
            mechanism=MECHANISM,
            admin=ADMIN,
            admin_password=self.users[ADMIN],
            controller_user=CONTROLLER_USER,
            controller_password=self.controller_password,
            keystore=self.tls.server_bundle,
            truststore=self.tls.ca_cert,
        )

    def format_arguments(self) -> list[str]:
        """``kafka-storage format`` arguments that make every SCRAM user in the new cluster: the
        salted form (RFC 5802's SaltedPassword), so no password shows in the command line."""
        arguments: list[str] = []
        for name, password in self.users.items():
            salt = secrets.token_bytes(16)
            salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, SCRAM_ITERATIONS)
            arguments += [
                "--add-scram",
                f"{MECHANISM}=[name={name},iterations={SCRAM_ITERATIONS},"
                f'salt="{b64encode(salt).decode()}",saltedpassword="{b64encode(salted).decode()}"]',
            ]
        return arguments

    def aiokafka_options(self, user: str) -> dict[str, Any]:
        """aiokafka client options for ``user`` over the listener, verifying its certificate."""
        return {
            "security_protocol": "SASL_SSL",
            "ssl_context": create_ssl_context(cafile=str(self.tls.ca_cert)),
            "sasl_mechanism": MECHANISM,
            "sasl_plain_username": user,
            "sasl_plain_password": self.users[user],
        }

    def client_properties(self, user: str) -> str:
        """A Java client's properties (``--command-config``) for ``user`` over the listener."""
        return (
            "security.protocol=SASL_SSL\n"
            f"sasl.mechanism={MECHANISM}\n"
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{user}" password="{self.users[user]}";\n'
            "ssl.truststore.type=PEM\n"
            f"ssl.truststore.location={self.tls.ca_cert}\n"
        )


def apply_acls(
    classpath: str, bootstrap: str, security: BrokerSecurity, workdir: Path,
    commands: Sequence[Sequence[str]],
) -> None:  # fmt: skip
    """Run AclCommand once per command (each an ``--add ...`` argument list) as ``admin``."""
    java = shutil.which("java")
    if java is None:
        raise ServiceUnavailable("Kafka ACLs cannot be applied: `java` is not installed.")
    config = workdir / "admin.properties"
    config.touch(mode=0o600)
    config.write_text(security.client_properties(ADMIN))
    for arguments in commands:
        result = subprocess.run(
            [java, "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", classpath,
             ACL_TOOL, "--bootstrap-server", bootstrap, "--command-config", str(config),
             *arguments],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise ServiceUnavailable(
                f"kafka-acls {' '.join(arguments)} failed:\n{result.stderr[-2000:]}"
            )

"""The workload spec of a reservation: image, SSH public keys, environment, exposed ports.

workload_validate turns client input into the stored form (or raises ValidationFailed naming
the field); workload_public is what the API and the portal show: environment values are
secrets, so only their names go out. ssh_public_key_validate is the one check of an SSH public
key, also used for the organisation's saved keys (services.ssh_keys).
"""

import base64
import binascii
import hashlib
import re
import struct

from django.conf import settings

from config.errors import ValidationFailed
from config.netaddr import is_public_address

__all__ = [
    "workload_validate",
    "workload_public",
    "ssh_public_key_validate",
    "ssh_public_key_fingerprint",
    "MAX_SSH_KEYS",
    "MAX_ENV",
    "MAX_PORTS",
]

MAX_SSH_KEYS = 16
MAX_ENV = 64
MAX_ENV_VALUE_CHARS = 4096
MAX_PORTS = 16
_ALLOWED_KEYS = {"image", "ssh_public_keys", "env", "ports"}

# The distribution reference grammar (registry[:port]/path[:tag][@digest]), written out.
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_IMAGE_RE = re.compile(rf"^(?P<name>{_NAME})(?::{_TAG})?(?:@{_DIGEST})?$")

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Set by the platform for the container; a customer value would be overwritten or confusing.
_RESERVED_ENV = {
    "SSH_PUBLIC_KEYS",
    "SWITCHYARD_PORTS",
    "PUBLIC_KEY",
    "NVIDIA_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
}

# Names the container runtime on the node reads from its own environment (the agent starts it
# with the workload's variables, passed by name): the dynamic loader, the runtime and its
# storage, proxies, the GPU toolkits' device selection. A workload never sets them. The site
# agent refuses them too (it imports nothing of ours: its own copy, agent/switchyard_agent.py).
_HOST_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "TMPDIR",
        "TMP",
        "TEMP",
        "SHELL",
        "IFS",
        "USER",
        "LOGNAME",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "REGISTRY_AUTH_FILE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "CUDA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "GPU_DEVICE_ORDINAL",
        "GODEBUG",
        "GOTRACEBACK",
        "GOMAXPROCS",
        "GOGC",
        "GOMEMLIMIT",
    }  # fmt: skip
)
_HOST_ENV_PREFIXES = ("LD_", "DYLD_", "DOCKER_", "CONTAINER", "PODMAN_", "BUILDAH_", "STORAGE_",
                      "XDG_", "CNI_", "NETAVARK_", "CRUN_", "RUNC_", "SYSTEMD_", "DBUS_",
                      "NVIDIA_")  # fmt: skip

_SSH_KEY_TYPES = {
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
}


def _fail(message: str, field: str, code: str = "invalid") -> ValidationFailed:
    return ValidationFailed(message, code=code, field=f"workload.{field}")


def _image(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail("The image must be a non-empty string.", "image")
    value = value.strip()
    match = _IMAGE_RE.match(value)
    if match is None or len(match.group("name")) > 255:
        raise _fail(
            f"{value[:100]!r} is not a valid image reference (e.g. ghcr.io/org/trainer:1.2).",
            "image",
            "invalid_image",
        )
    host = _registry_host(value)
    if host is not None and not settings.WORKLOAD_PRIVATE_REGISTRIES and _private_host(host):
        raise _fail(
            f"The image's registry {host} is on this machine or a private network; images are "
            "pulled from public registries only.",
            "image",
            "image_registry_not_allowed",
        )
    return value


def _registry_host(image: str) -> str | None:
    """The registry host of an image reference (as the site agent reads it), or None for
    the default registry (docker.io)."""
    first, slash, _rest = image.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        return None
    if first.startswith("["):  # [v6]:port
        return first[1 : first.index("]")]
    return first.rsplit(":", 1)[0] if first.count(":") == 1 else first


def _private_host(host: str) -> bool:
    """localhost, or an IP address a node would reach on itself or its site's network. A name
    is not resolved here: the agent resolves it where it pulls, and refuses it there."""
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return not is_public_address(host)
    except ValueError:
        return False


def _ssh_blob_strings(blob: bytes) -> list[bytes]:
    """The length-prefixed strings of an SSH public key blob (RFC 4253 §6.6)."""
    parts, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise ValueError("truncated length")
        (length,) = struct.unpack(">I", blob[offset : offset + 4])
        offset += 4
        if offset + length > len(blob):
            raise ValueError("truncated field")
        parts.append(blob[offset : offset + length])
        offset += length
    return parts


def ssh_public_key_validate(value, *, field: str) -> str:
    """Check one OpenSSH public key line and return it normalised: "type body [comment]".

    A refusal is a ValidationFailed naming `field` (code invalid_ssh_key for a malformed key).
    """

    def fail(message: str, code: str = "invalid_ssh_key") -> ValidationFailed:
        return ValidationFailed(message, code=code, field=field)

    if not isinstance(value, str):
        raise fail("An SSH public key must be a string.", "invalid")
    value = value.strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        # A line break would end the key's line in authorized_keys, and what follows it (say,
        # another key, with options) would be authorised too, under this key's fingerprint.
        raise fail(
            "An SSH public key is one line: no line breaks or other control characters "
            "(add several keys one by one)."
        )
    fields = value.split(None, 2)
    if len(fields) < 2:
        raise fail("An SSH public key looks like 'ssh-ed25519 AAAA… comment'.")
    key_type, body = fields[0], fields[1]
    if key_type not in _SSH_KEY_TYPES:
        raise fail(
            f"Unsupported key type {key_type[:40]!r}; use ssh-ed25519, ssh-rsa or ecdsa-sha2-*."
        )
    try:
        blob = base64.b64decode(body, validate=True)
        parts = _ssh_blob_strings(blob)
    except (binascii.Error, ValueError):
        raise fail("The key body is not valid base64 key data.") from None
    if not parts or parts[0] != key_type.encode():
        raise fail("The key body does not match its type.")
    if key_type == "ssh-ed25519" and (len(parts) != 2 or len(parts[1]) != 32):
        raise fail("An ssh-ed25519 key holds exactly 32 bytes.")
    if key_type == "ssh-rsa" and (len(parts) != 3 or len(parts[2].lstrip(b"\x00")) * 8 < 2040):
        raise fail("An ssh-rsa key must have at least 2048 bits.")
    if key_type.startswith("ecdsa-") and (len(parts) != 3 or parts[1] != key_type[11:].encode()):
        raise fail("The ECDSA key's curve does not match its type.")
    comment = fields[2].strip() if len(fields) == 3 else ""
    return f"{key_type} {body} {comment}".strip()


def ssh_public_key_fingerprint(key: str) -> str:
    """OpenSSH's fingerprint of a key that passed ssh_public_key_validate: SHA256:<base64>.

    As `ssh-keygen -l` prints it: the SHA-256 of the key blob, base64 without padding.
    """
    digest = hashlib.sha256(base64.b64decode(key.split()[1], validate=True)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _env(value) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _fail("env must be an object of NAME: value.", "env")
    if len(value) > MAX_ENV:
        raise _fail(f"At most {MAX_ENV} environment variables.", "env")
    env = {}
    for name, item in value.items():
        if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
            raise _fail(
                "Variable names are letters, digits and underscores, not starting with a digit.",
                "env",
            )
        if name.upper() in _RESERVED_ENV:
            raise _fail(f"{name} is set by the platform.", f"env.{name}", "reserved")
        if name.upper() in _HOST_ENV_NAMES or name.upper().startswith(_HOST_ENV_PREFIXES):
            raise _fail(
                f"{name} would change how the node runs containers (the runtime reads it); "
                "choose another name.",
                f"env.{name}",
                "reserved",
            )
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise _fail("Values must be strings.", f"env.{name}")
        text = str(item)
        if len(text) > MAX_ENV_VALUE_CHARS or "\x00" in text:
            raise _fail(
                f"Values are at most {MAX_ENV_VALUE_CHARS} characters, without NUL.", f"env.{name}"
            )
        env[name] = text
    return env


def _ports(value) -> list[int]:
    if not isinstance(value, list):
        raise _fail("ports must be a list of port numbers.", "ports")
    if len(value) > MAX_PORTS:
        raise _fail(f"At most {MAX_PORTS} ports.", "ports")
    ports: list[int] = []
    for i, port in enumerate(value):
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise _fail("A port is an integer from 1 to 65535.", f"ports.{i}")
        if port in ports:
            raise _fail(f"Port {port} is listed twice.", f"ports.{i}")
        ports.append(port)
    return ports


def workload_validate(data: dict | None) -> dict:
    """Check a workload spec and return its normalised form; {} when there is none.

    Every part is optional: without an image the platform's default image runs.
    """
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValidationFailed("workload must be an object.", field="workload")
    unknown = sorted(set(data) - _ALLOWED_KEYS)
    if unknown:
        raise _fail(f"Unknown field {unknown[0]!r}.", unknown[0], "unknown_field")
    workload: dict = {}
    if data.get("image") is not None:
        workload["image"] = _image(data["image"])
    keys = data.get("ssh_public_keys")
    if keys is not None:
        if not isinstance(keys, list):
            raise _fail("ssh_public_keys must be a list.", "ssh_public_keys")
        if len(keys) > MAX_SSH_KEYS:
            raise _fail(f"At most {MAX_SSH_KEYS} SSH keys.", "ssh_public_keys")
        workload["ssh_public_keys"] = [
            ssh_public_key_validate(k, field=f"workload.ssh_public_keys.{i}")
            for i, k in enumerate(keys)
        ]
    if data.get("env") is not None:
        workload["env"] = _env(data["env"])
    if data.get("ports") is not None:
        workload["ports"] = _ports(data["ports"])
    return workload


def workload_public(workload: dict | None) -> dict:
    """The workload as shown to the customer: environment names only, never their values."""
    workload = workload or {}
    return {
        "image": workload.get("image"),
        "ssh_public_keys": list(workload.get("ssh_public_keys", [])),
        "env_names": sorted(workload.get("env", {})),
        "ports": list(workload.get("ports", [])),
    }

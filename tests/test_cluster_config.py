"""ray_cluster.yaml, read as `ray up` would read it and checked against the files it depends on
(nothing here boots a node): Ray's own config validation, a pinned image whose Ray and Python match
the project's pins, an instance profile on every node type that can reach the bucket, MLflow stores
outside the cluster, and token auth."""
import copy
import fnmatch
import importlib.metadata
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
TEXT = (REPO / "ray_cluster.yaml").read_text()
CONFIG = yaml.safe_load(TEXT)
NODE_TYPES = CONFIG["available_node_types"]
ALL_COMMANDS = [c for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands",
                              "worker_start_ray_commands") for c in CONFIG[key]]
IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>\d)(?P<minor>\d+)-cu(?P<cuda>\d+)$")


def validate(cfg):
    validate_config(prepare_config(copy.deepcopy(cfg)))


def pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_ray_cluster_yaml_passes_rays_validation():
    validate(CONFIG)
    workers = NODE_TYPES["gpu_worker"]
    assert workers["max_workers"] > workers["min_workers"] == 0, "the GPU group autoscales from zero"


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c["available_node_types"]["gpu_worker"].update(max_workers="eight"), jsonschema.ValidationError),
    (lambda c: c.update(setup_comands=[]), jsonschema.ValidationError),
    (lambda c: c["docker"].update(imagee="x"), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="nonexistent"), ValueError),
])
def test_a_broken_copy_fails_validation(break_it, error):
    broken = copy.deepcopy(CONFIG)
    break_it(broken)
    with pytest.raises(error):
        validate(broken)


def test_the_nodes_run_a_pinned_image_with_the_pinned_ray_and_a_python_the_project_accepts():
    assert "latest_dlami" not in TEXT.lower(), "Ray's fixed DLAMI: Ubuntu 18.04, Python 3.6, CUDA 11.2"
    for name, node_type in NODE_TYPES.items():
        image_id = node_type["node_config"].get("ImageId", "")
        assert image_id.startswith(("ami-", "resolve:ssm:")), f"{name}: ImageId {image_id!r}"
    match = IMAGE.match(CONFIG["docker"]["image"])
    assert match, f"docker image {CONFIG['docker']['image']} is not a pinned rayproject/ray version-python-cuda tag"
    assert match["ray"] == pins()["ray"], "the image's Ray must be the Ray constraints.txt pins"
    python = f"{match['major']}.{match['minor']}"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python in SpecifierSet(requires), f"the image's Python {python} is outside requires-python {requires}"
    # Every pinned package this environment has installed must accept that Python too.
    checked = []
    for name, version in pins().items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        spec = dist.metadata.get("Requires-Python")
        assert not spec or python in SpecifierSet(spec), f"{name}=={version} needs Python {spec}"
        checked.append(name)
    assert len(checked) > 50
    # The project goes into that Python with the pins: no virtualenv made from some other python3.
    install = [c for c in CONFIG["setup_commands"] if "pip install" in c]
    assert install and all("python -m pip install" in c and "-c constraints.txt" in c for c in install)
    assert not any("venv" in c for c in ALL_COMMANDS)


def bucket_paths() -> set[str]:
    return set(re.findall(r"s3://[^\s\"'/]+/[^\s\"']*", "\n".join(ALL_COMMANDS)))


def allowed(policy: dict, action: str, resource: str) -> bool:
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if statement["Effect"] == "Allow" and action in actions and any(fnmatch.fnmatchcase(resource, r)
                                                                       for r in resources):
            return True
    return False


def test_every_node_type_has_an_instance_profile_that_reaches_the_bucket():
    paths = bucket_paths()
    buckets = {p.split("/")[2] for p in paths}
    assert len(buckets) == 1, f"one bucket, named once per use: {paths}"
    (bucket,) = buckets
    assert {p.split("/", 3)[3].split("/")[1] for p in paths} >= {"ray", "mlflow-artifacts"}
    profiles = {}
    for name, node_type in NODE_TYPES.items():
        profile = node_type["node_config"].get("IamInstanceProfile", {}).get("Name")
        assert profile, f"node type {name} has no IamInstanceProfile (Ray gives only the head a default one)"
        policy_file = REPO / "docs" / "cluster" / f"{profile}.json"
        assert policy_file.exists(), f"{name}: no policy for profile {profile} in docs/cluster/"
        policy = json.loads(policy_file.read_text())
        profiles[name] = (profile, policy)
        assert allowed(policy, "s3:ListBucket", f"arn:aws:s3:::{bucket}"), name
        for path in paths:
            key = f"arn:aws:s3:::{path[len('s3://'):].rstrip('/')}/step_00000004/state.pt"
            for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
                assert allowed(policy, action, key), f"{name} ({profile}) may not {action} under {path}"
    head_profile, head_policy = profiles[CONFIG["head_node_type"]]
    assert allowed(head_policy, "ec2:RunInstances", "*") and allowed(head_policy, "ec2:TerminateInstances", "*")
    for name, (profile, _) in profiles.items():
        if name != CONFIG["head_node_type"]:  # the head's autoscaler hands each worker its role
            assert allowed(head_policy, "iam:PassRole", f"arn:aws:iam::123456789012:role/{profile}"), profile
    for node_type in NODE_TYPES.values():
        image_id = node_type["node_config"]["ImageId"]
        if image_id.startswith("resolve:ssm:"):  # EC2 resolves it with the launcher's rights: the head's
            parameter = image_id[len("resolve:ssm:"):]
            assert allowed(head_policy, "ssm:GetParameters", f"arn:aws:ssm:us-west-2::parameter{parameter}")


def mlflow_server_flags() -> dict[str, str]:
    (command,) = [c for c in CONFIG["head_setup_commands"] if "mlflow server" in c]
    words = shlex.split(command[command.index("mlflow server"):].split(">")[0])
    return {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--") and i + 1 < len(words)}


def test_mlflow_keeps_runs_and_artifacts_outside_the_cluster():
    flags = mlflow_server_flags()
    assert flags["--host"] == "0.0.0.0"
    assert flags["--artifacts-destination"].startswith("s3://"), "artifacts on the head's disk die at ray down"
    backend = flags["--backend-store-uri"]
    assert not backend.startswith(("sqlite", "file", "/", "~", "./")), backend
    source = re.fullmatch(r"\$\(cat (\S+)\)", backend)
    assert source, f"the backend store comes from the URI file ray up copies: {backend}"
    assert source[1] in CONFIG["file_mounts"], "the URI file must be copied to the head"
    assert any(f"test -s {source[1]}" in c for c in CONFIG["head_setup_commands"]), "no silent fallback"
    assert CONFIG["provider"]["cache_stopped_nodes"] is False
    assert f"AWS_DEFAULT_REGION={CONFIG['provider']['region']}" in CONFIG["setup_commands"][1]


def test_token_auth_on_every_node_and_in_the_submit_line():
    header = [line for line in TEXT.splitlines() if line.startswith("#")]
    assert any("ray get-auth-token --generate" in line for line in header)
    submit = [line for line in header if "ray job submit" in line]
    assert submit and all("RAY_AUTH_MODE=token" in line for line in submit)
    assert CONFIG["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=token" in CONFIG["setup_commands"][1]
    starts = CONFIG["head_start_ray_commands"] + CONFIG["worker_start_ray_commands"]
    assert all("source ~/energy-lattice-env.sh" in c for c in starts if "ray start" in c)


def test_the_submit_lines_pass_the_submitters_commit_to_the_job():
    header = "\n".join(line.lstrip("# ") for line in TEXT.splitlines() if line.startswith("#"))
    readme = (REPO / "README.md").read_text()
    for text in (header, readme):
        submits = re.findall(r"ray job submit .*?-- \\?\s*python jobs/", text, flags=re.S)
        assert submits
        for submit in submits:
            assert "--runtime-env-json" in submit and "ENERGY_LATTICE_GIT_COMMIT" in submit, submit
            assert "git describe --always --dirty --abbrev=40 --exclude='*'" in submit, submit

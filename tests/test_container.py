"""The container's entrypoint (deploy/docker/entrypoint.sh), run on this host as the
image runs it: no arguments, ELEMTA_CONFIG pointing at the image's config
(deploy/docker/elemta.yaml, with loopback ports and a temporary spool in place of the
volume), elemta found on PATH. Containers cannot run on the build machines, so this is
how the image's start and stop are exercised; `make lint-deploy` lints the rest.
"""

import json
import os
import pathlib
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from ruamel.yaml import YAML

from elemta.util import procs
from tests.harness import REPO, code_for_everyone, free_port, wait_for
from tests.peers.sink import make_test_pki
from tests.test_privileges import interpreter_for_nobody, uid_of

ENTRYPOINT = os.path.join(REPO, "deploy", "docker", "entrypoint.sh")
IMAGE_CONFIG = os.path.join(REPO, "deploy", "docker", "elemta.yaml")


def container_config(tmp_path, delivery_workers=0):
    """The image's config with what the container runtime would change: ports free on
    this host, a temporary spool for the volume, and no delivery unless asked (no
    network here)."""
    yaml = YAML()
    with open(IMAGE_CONFIG) as f:
        config = yaml.load(f)
    smtp_port, api_port = free_port(), free_port()
    config["listeners"][0]["address"] = "127.0.0.1"
    config["listeners"][0]["port"] = smtp_port
    config["api"]["address"] = "127.0.0.1"
    config["api"]["port"] = api_port
    config["queue"]["spool_dir"] = str(tmp_path / "spool")
    config["delivery"]["workers"] = delivery_workers
    config["master"]["stop_grace"] = 5.0
    os.mkdir(str(tmp_path / "spool"), 0o750)
    path = str(tmp_path / "elemta.yaml")
    with open(path, "w") as f:
        yaml.dump(config, f)
    return path, smtp_port, api_port


def entrypoint_env(config_path, spool):
    # The venv's bin first, as the image's PATH puts /opt/elemta/bin first.
    bin_dir = os.path.dirname(sys.executable)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                ELEMTA_CONFIG=config_path, ELEMTA_SPOOL=spool)


def health(api_port):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/api/v1/health" % api_port,
                                    timeout=2) as response:
            return response.status == 200 and json.load(response)["status"] == "ok"
    except OSError:
        return False


def test_entrypoint_starts_answers_health_and_drains_on_sigterm(tmp_path):
    config_path, smtp_port, api_port = container_config(tmp_path)
    spool = str(tmp_path / "spool")
    log_path = str(tmp_path / "elemta.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen([ENTRYPOINT], env=entrypoint_env(config_path, spool),
                                   stdout=log, stderr=subprocess.STDOUT,
                                   cwd=str(tmp_path), start_new_session=True)
    try:
        # The HEALTHCHECK's and the readiness probe's question.
        wait_for(lambda: process.poll() is not None or health(api_port), timeout=30)
        assert process.poll() is None, open(log_path).read()
        # exec: the entrypoint's pid is elemta's master, so the runtime's SIGTERM reaches it.
        with open("/proc/%d/cmdline" % process.pid, "rb") as f:
            assert f.read().startswith(b"elemta: master")

        # A session in the middle of DATA when SIGTERM comes is let finish (drain).
        client = smtplib.SMTP("127.0.0.1", smtp_port, timeout=10)
        client.ehlo("client.test")
        client.mail("sender@client.test")
        client.rcpt("someone@example.net")
        code, _ = client.docmd("DATA")
        assert code == 354
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        client.send(b"Subject: drain\r\n\r\nsent while stopping\r\n.\r\n")
        code, reply = client.getreply()
        assert code == 250, reply
        client.quit()

        assert process.wait(timeout=20) == 0, open(log_path).read()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # The accepted message is on the spool (the volume), for the next start to deliver.
    listing = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "elemtactl"), "--config", config_path,
         "queue", "list", "--json"], capture_output=True, text=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert "someone@example.net" in listing.stdout


def test_entrypoint_without_config_says_so(tmp_path):
    env = entrypoint_env(str(tmp_path / "missing.yaml"), str(tmp_path))
    result = subprocess.run([ENTRYPOINT], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 78
    assert "no readable configuration" in result.stderr


def test_entrypoint_runs_a_command_given_to_it(tmp_path):
    # docker run elemta elemtactl ...: a command, not daemon arguments.
    config_path, _, _ = container_config(tmp_path)
    env = entrypoint_env(config_path, str(tmp_path / "spool"))
    result = subprocess.run([ENTRYPOINT, "elemta", "--check-config"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout + result.stderr


KINDS = {"elemta: smtpd", "elemta: delivery", "elemta: local", "elemta: pickup",
         "elemta: api", "elemta: showq"}


def nobody_tree():
    """A directory user nobody can enter holding our code and the venv's packages, and a
    bin/ with elemta, elemtactl and the entrypoint, as the image's /opt/elemta/bin (a
    clone may sit in a directory nobody cannot traverse)."""
    python = interpreter_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter that user nobody can read")
    workdir = tempfile.mkdtemp()
    os.chmod(workdir, 0o755)
    pythonpath = code_for_everyone(os.path.join(workdir, "python"))
    bin_dir = os.path.join(workdir, "bin")
    os.mkdir(bin_dir, 0o755)
    for name in ("elemta", "elemtactl"):
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\nPYTHONPATH=%s exec %s -m elemta.cli.%s \"$@\"\n"
                    % (pythonpath, python, name))
        os.chmod(path, 0o755)
    shutil.copy(ENTRYPOINT, os.path.join(bin_dir, "entrypoint.sh"))
    os.chmod(os.path.join(bin_dir, "entrypoint.sh"), 0o755)
    return workdir, bin_dir


@pytest.mark.skipif(os.getuid() != 0, reason="switching to user nobody needs root")
def test_entrypoint_runs_whole_as_a_non_root_user():
    """The image's USER: every process, the local agent too, is that user, and the
    spool volume is all it writes; with delivery workers, as the image's config has."""
    workdir, bin_dir = nobody_tree()
    try:
        nobody = pwd.getpwnam("nobody")
        os.makedirs(os.path.join(workdir, "run"), 0o755)
        config_path, smtp_port, api_port = container_config(
            pathlib.Path(workdir, "run"), delivery_workers=2)
        spool = os.path.join(workdir, "run", "spool")
        os.chmod(config_path, 0o644)
        os.chown(spool, nobody.pw_uid, nobody.pw_gid)
        env = dict(os.environ, PATH=bin_dir + ":/usr/bin:/bin",
                   ELEMTA_CONFIG=config_path, ELEMTA_SPOOL=spool)
        as_nobody = ["setpriv", "--reuid", str(nobody.pw_uid), "--regid",
                     str(nobody.pw_gid), "--clear-groups",
                     os.path.join(bin_dir, "entrypoint.sh")]
        log_path = os.path.join(workdir, "log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(as_nobody, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=workdir,
                                       start_new_session=True)
        try:
            wait_for(lambda: process.poll() is not None or health(api_port), timeout=30)
            assert process.poll() is None, open(log_path).read()

            def serving():
                kids = procs.children(process.pid)
                return set(kids.values()) == KINDS and kids
            kids = wait_for(serving, timeout=30)
            assert {uid_of(pid) for pid in list(kids) + [process.pid]} == {nobody.pw_uid}
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as smtp:
                smtp.noop()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, open(log_path).read()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        text = open(log_path).read()
        assert "Traceback" not in text, text
        # The spool volume came up as the user's (the readOnlyRootFilesystem bargain).
        for directory, dirs, files in os.walk(spool):
            for name in dirs + files:
                assert os.lstat(os.path.join(directory, name)).st_uid == nobody.pw_uid

        # A volume the user cannot write is named as the problem, not a traceback.
        os.chown(spool, 0, 0)
        result = subprocess.run(as_nobody, env=env, capture_output=True, text=True,
                                timeout=30, cwd=workdir)
        assert result.returncode == 73, result.stderr
        assert "not writable" in result.stderr
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("source", ["deploy/compose/elemta.yaml",
                                    "deploy/kubernetes/configmap.yaml"])
def test_shipped_container_configs_are_valid(tmp_path, source):
    """The configs compose mounts and the ConfigMap holds pass elemta --check-config,
    with the Secret's token file where the pod would have it."""
    with open(os.path.join(REPO, source)) as f:
        text = f.read()
    if source.endswith("configmap.yaml"):
        text = YAML().load(text)["data"]["elemta.yaml"]
    text = with_test_secrets(text, tmp_path)
    config = tmp_path / "elemta.yaml"
    config.write_text(text)
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "elemta"), "--config", str(config),
         "--check-config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def with_test_secrets(text, directory):
    """text with the Secret's files (as mounted in the pod) replaced by test files."""
    for name, value in (("api-token", "a-test-token-for-the-cluster"), ("valkey-password", "a-password")):
        secret = directory / name
        secret.write_text(value + "\n")
        secret.chmod(0o600)
        text = text.replace("/run/secrets/elemta/" + name, str(secret))
    # The cluster's TLS Secret (cluster-tls.yaml): a test CA and certificate.
    ca, cert, key = make_test_pki(str(directory / "cluster-tls"),
                                  "elemta-0.elemta-headless.default.svc")
    for name, path in (("ca.crt", ca), ("tls.crt", cert), ("tls.key", key)):
        text = text.replace("/run/secrets/elemta-tls/" + name, path)
    return text


def liveness_command(port):
    """The StatefulSet's liveness probe command, aimed at port instead of the pod's 2525."""
    with open(os.path.join(REPO, "deploy/kubernetes/statefulset.yaml")) as f:
        statefulset = YAML().load(f)
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    command = list(container["livenessProbe"]["exec"]["command"])
    assert command[0] == "python"
    command[0] = sys.executable
    command[-1] = command[-1].replace("2525", str(port))
    return command


def test_liveness_probe_needs_a_greeting_not_just_a_listening_socket(elemta_server):
    """The probe passes while a worker greets, and fails on a socket that accepts
    connections (the kernel's listen queue) but never greets, as one whose workers are
    all gone or wedged."""
    server = elemta_server()
    alive = subprocess.run(liveness_command(server.port), capture_output=True, timeout=30)
    assert alive.returncode == 0, alive.stderr
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)       # accepted by the kernel, never answered
    try:
        wedged = subprocess.run(liveness_command(silent.getsockname()[1]),
                                capture_output=True, timeout=30)
    finally:
        silent.close()
    assert wedged.returncode != 0


def test_the_secret_template_holds_no_usable_token():
    with open(os.path.join(REPO, "deploy/kubernetes/secret.yaml")) as f:
        secret = YAML().load(f)
    assert secret["stringData"]["api-token"] == ""
    assert secret["stringData"]["valkey-password"] == ""


def statefulset_pod():
    with open(os.path.join(REPO, "deploy/kubernetes/statefulset.yaml")) as f:
        return YAML(typ="safe").load(f)["spec"]["template"]["spec"]


def test_the_init_container_gives_each_pod_its_name_and_api_url(tmp_path):
    """The init container's command, run as the pod would run it (its mounts in tmp_path,
    elemtactl on PATH): the pod's copy of the ConfigMap's file names the pod, its api
    and its SMTP hand-over address at the pod's stable name under the headless Service
    (not its IP, which a new pod may be given), and still passes elemta
    --check-config."""
    init = statefulset_pod()["initContainers"][0]
    assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in init["env"]} == {
        "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    with open(os.path.join(REPO, "deploy/kubernetes/configmap.yaml")) as f:
        text = YAML(typ="safe").load(f)["data"]["elemta.yaml"]
    (tmp_path / "template").mkdir()
    (tmp_path / "template" / "elemta.yaml").write_text(with_test_secrets(text, tmp_path))
    (tmp_path / "config").mkdir()
    command = init["command"][-1].replace("/etc/elemta-template", str(tmp_path / "template"))
    command = command.replace("/etc/elemta", str(tmp_path / "config"))
    bin_dir = os.path.dirname(sys.executable)
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, POD_NAME="elemta-1",
                                               POD_NAMESPACE="mail",
                                               PATH=bin_dir + ":" + os.environ["PATH"]))
    assert done.returncode == 0, done.stdout + done.stderr
    written = tmp_path / "config" / "elemta.yaml"
    cluster = YAML(typ="safe").load(written.read_text())["cluster"]
    assert (cluster["node_name"], cluster["api_url"], cluster["handover_address"]) == (
        "elemta-1", "https://elemta-1.elemta-headless.mail.svc:8025",
        "elemta-1.elemta-headless.mail.svc:2526")
    # The headless Service those names come from, for every pod, ready or not.
    headless = manifest("service.yaml")[1]
    assert headless["metadata"]["name"] == manifest("statefulset.yaml")[0]["spec"][
        "serviceName"] == "elemta-headless"
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert cluster["store"] == "redis://elemta-valkey:6379/0"
    checked = subprocess.run([os.path.join(bin_dir, "elemta"), "--config", str(written),
                              "--check-config"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_pre_stop_hook_drains_within_the_grace_period():
    """preStop drains the pod (handing its queue to the other pods the cluster store
    names: no --to) before it stops, and the pod's grace period covers the drain's
    timeout, master.stop_grace and the stop."""
    from elemta.cli.elemtactl import build_parser
    pod = statefulset_pod()
    hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1]
    drain, stop = [part.split() for part in hook.split(";")]
    args = build_parser().parse_args(drain[1:])
    assert args.command == "drain" and args.wait and not args.to and not args.here
    assert stop == ["elemtactl", "stop"]
    with open(os.path.join(REPO, "deploy/kubernetes/configmap.yaml")) as f:
        config = YAML(typ="safe").load(YAML(typ="safe").load(f)["data"]["elemta.yaml"])
    from elemta.cli.control import STOP_MARGIN
    assert pod["terminationGracePeriodSeconds"] > (
        args.timeout + config["master"]["stop_grace"] + STOP_MARGIN)


def manifest(name):
    with open(os.path.join(REPO, "deploy/kubernetes", name)) as f:
        return list(YAML(typ="safe").load_all(f))


def test_the_manifests_open_no_relay_and_lock_the_store():
    """The review of issue 19: no pod of the pod network may relay (mynetworks is the
    pod's loopback; the pods hand over mail on a handover listener, with the cluster's
    credential); peer_networks is set, and narrowly; Valkey asks a password from the
    Secret with protected mode on; NetworkPolicies keep the handover listener, the api
    and Valkey to the Elemta pods."""
    import ipaddress
    config = YAML(typ="safe").load(manifest("configmap.yaml")[0]["data"]["elemta.yaml"])
    # The pod's own loopback address alone: a service-mesh sidecar forwards outside
    # clients from 127.0.0.6, which 127.0.0.0/8 would let relay.
    assert sorted(config["relay"]["mynetworks"]) == ["127.0.0.1/32", "::1/128"]
    peers = [ipaddress.ip_network(n) for n in config["cluster"]["peer_networks"]]
    assert peers and all(n.is_private and n.prefixlen >= 8 for n in peers), peers
    modes = {listener["mode"]: listener["port"] for listener in config["listeners"]}
    assert modes == {"smtp": 2525, "handover": 2526}
    pod = statefulset_pod()
    assert 'cluster.handover_address="$POD_NAME.elemta-headless.$POD_NAMESPACE.svc:2526"' \
        in pod["initContainers"][0]["command"][-1]
    # The store's password: a file of the Secret the pod mounts.
    secret_keys = set(manifest("secret.yaml")[0]["stringData"])
    mounted = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    password_file = config["cluster"]["password_file"]
    assert os.path.dirname(password_file) == mounted["secrets"]
    assert os.path.basename(password_file) in secret_keys
    valkey, valkey_service, valkey_policy = manifest("valkey.yaml")
    container = valkey["spec"]["template"]["spec"]["containers"][0]
    start = " ".join(container["command"] + container["args"])
    assert "requirepass" in start and "--protected-mode yes" in start, start
    assert "--protected-mode no" not in start
    assert {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"],
                        e["valueFrom"]["secretKeyRef"]["key"]) for e in container["env"]
            }["VALKEY_PASSWORD"] == ("elemta-secrets", "valkey-password")
    assert valkey_policy["spec"]["ingress"] == [{
        "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "elemta"}}}],
        "ports": [{"port": 6379}]}]
    # The Elemta pods: SMTP (published) from anywhere; hand-over only from Elemta pods;
    # the api from Elemta pods and Prometheus in its namespace.
    [policy] = manifest("networkpolicy.yaml")
    assert policy["spec"]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "elemta"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    open_ports = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert open_ports == [{"ports": [{"port": 2525}]}]
    assert [rule for rule in policy["spec"]["ingress"] if {"port": 8025} in rule["ports"]
            ] == [{"from": [
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "elemta"}}},
                {"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": "monitoring"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
                "ports": [{"port": 8025}]}]
    assert [rule for rule in policy["spec"]["ingress"] if {"port": 2526} in rule["ports"]
            ] == [{"from": [{"podSelector": {"matchLabels": {
                "app.kubernetes.io/name": "elemta"}}}], "ports": [{"port": 2526}]}]
    # The hand-over password and the api token cross the pod network inside TLS only,
    # to pods the cluster CA signed (the review of issue 19).
    mounted["cluster-tls"] = next(m["mountPath"] for m in pod["containers"][0][
        "volumeMounts"] if m["name"] == "cluster-tls")
    tls_secret = next(v["secret"]["secretName"] for v in pod["volumes"]
                      if v["name"] == "cluster-tls")
    assert tls_secret == manifest("cluster-tls.yaml")[-1]["spec"]["secretName"]
    for path in (config["tls"]["cert_file"], config["tls"]["key_file"],
                 config["api"]["cert_file"], config["api"]["key_file"],
                 config["cluster"]["peer_ca_file"]):
        assert os.path.dirname(path) == mounted["cluster-tls"], path
        assert os.path.basename(path) in ("tls.crt", "tls.key", "ca.crt"), path
    assert config["cluster"].get("handover_tls", "required") == "required"
    assert config["cluster"].get("api_plain_http", "loopback") == "loopback"
    assert 'cluster.api_url="https://$POD_NAME.elemta-headless.$POD_NAMESPACE.svc:8025"' \
        in pod["initContainers"][0]["command"][-1]
    readiness = pod["containers"][0]["readinessProbe"]["httpGet"]
    assert readiness["scheme"] == "HTTPS"
    # The public Service publishes SMTP alone: neither the handover port nor the api.
    service = manifest("service.yaml")[0]
    assert service["spec"]["type"] == "LoadBalancer"
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        (25, "smtp")]

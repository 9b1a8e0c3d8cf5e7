"""Checks for deploy/, run by scripts/check-deploy.sh inside target/deploy-venv.

  check-deploy.py manifests native|regular:VERSION[,VERSION...]:BUILT.yaml ...
      Every object in BUILT.yaml (the output of `kubectl kustomize`) against the Kubernetes
      JSON schemas of each VERSION (kubernetes-validate, offline, strict: an unknown field is
      an error); the PodMonitor and the Certificate against the Prometheus Operator's and
      cert-manager's CRD types. Then what bearerd needs of its pod, with bearerd as a native
      sidecar or a regular container: probes, ports, security context, resources, the
      config's admin and proxy addresses, the mounts of its credentials (a client Secret, a
      projected service-account token, a certificate's Secret, as the config's auth wants),
      those of its token cache (a writable emptyDir for the file backend; the key's and the
      password's Secrets, 0400, for Redis), the grace period, the scrape settings; for a
      forward [[listener]], that the app containers' HTTP_PROXY names it and NO_PROXY leaves
      its routes' hosts to it.

  check-deploy.py bearerd-check BEARERD BUILT.yaml
      Runs `BEARERD --check` on the config BUILT.yaml mounts (bearerd.toml and conf.d/ from
      their ConfigMaps, under a temporary root, with made-up credentials where the pod's
      Secrets and tokens would be): it must pass and have merged every conf.d file.

  check-deploy.py dashboard-rules DASHBOARD.json OUT.yml
      Writes every PromQL expression of the Grafana dashboard as a recording rule, with the
      dashboard's variables filled in, so that `promtool check rules OUT.yml` parses them.

  check-deploy.py dockerfile Dockerfile
      Parses it with BuildKit's parser (PyPI dockerfile) and checks its shape: a build stage,
      a distroless runtime stage with a numeric non-root USER and a `--version` smoke test,
      and that Cargo.toml needs no file the build stage does not copy.

Prints one line per check; exits 1 at the end if any failed.
"""

import argparse
import json
import os
import sys
import tomllib

import yaml

failures = 0


def check(ok, what):
    """Prints `ok`/`FAIL` and what was checked; counts failures."""
    global failures
    print(("  ok    " if ok else "  FAIL  ") + what)
    if not ok:
        failures += 1
    return ok


def custom_resource(doc):
    """The pydantic type and the CRD's name for a custom resource kubernetes-validate has no
    schema for, or None."""
    kind = (doc["apiVersion"], doc["kind"])
    if kind == ("monitoring.coreos.com/v1", "PodMonitor"):
        from cloudcoil.models.prometheus_operator.v1 import PodMonitor

        return PodMonitor, "the Prometheus Operator 0.80.1 CRD"
    if kind == ("cert-manager.io/v1", "Certificate"):
        from cloudcoil.models.cert_manager.v1 import Certificate

        return Certificate, "the cert-manager 1.17.1 CRD"
    return None


def validate_schemas(docs, versions):
    import kubernetes_validate.utils as kv

    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        custom = custom_resource(doc)
        if custom:
            validate_custom(doc, name, *custom)
            continue
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
                check(True, f"{name}: valid in Kubernetes {version} (strict)")
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                check(False, f"{name}: invalid in Kubernetes {version}: {path}: {e.message}")
            except kv.SchemaNotFoundError as e:
                check(False, f"{name}: no schema in Kubernetes {version}: {e.message}")


def validate_custom(doc, name, model, crd):
    """The CRD types (pydantic) ignore unknown fields, so a field that does not survive a
    round trip through them is reported as unknown."""
    from pydantic import ValidationError

    try:
        parsed = model.model_validate(doc)
    except ValidationError as e:
        errors = "; ".join(
            ".".join(str(p) for p in error["loc"]) + ": " + error["msg"] for error in e.errors()
        )
        check(False, f"{name}: invalid {doc['kind']}: {errors}")
        return
    back = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    unknown = sorted(unknown_fields(doc, back))
    if unknown:
        check(False, f"{name}: fields unknown to {crd}: {', '.join(unknown)}")
    else:
        check(True, f"{name}: valid {doc['apiVersion']} {doc['kind']} ({crd})")


def unknown_fields(given, kept, path=""):
    if isinstance(given, dict):
        for key, value in given.items():
            here = f"{path}.{key}" if path else key
            if not isinstance(kept, dict) or key not in kept:
                yield here
            else:
                yield from unknown_fields(value, kept[key], here)
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (g, k) in enumerate(zip(given, kept)):
            yield from unknown_fields(g, k, f"{path}[{i}]")


# The methods that take a client secret; the others refuse one.
SECRET_AUTHS = ("basic", "post", "client_secret_jwt")


def credential_files(upstream):
    """The upstream's `auth`, and (key, path, holder) for every credential file its config
    names: holder is "secret" (a mounted Secret's file) or "token" (a projected
    service-account token)."""
    token = upstream.get("token", {})
    auth = token.get("auth", "basic")
    files = []
    if auth in SECRET_AUTHS:
        # The deploy examples keep secrets in files, not in the environment or inline.
        files.append(("client_secret_file", token.get("client_secret_file", ""), "secret"))
    elif auth == "private_key_jwt":
        files.append(("private_key_file", token.get("private_key_file", ""), "secret"))
        if "certificate_file" in token:
            files.append(("certificate_file", token["certificate_file"], "secret"))
    elif auth == "client_assertion_file":
        files.append(("assertion_file", token.get("assertion_file", ""), "token"))
    elif auth == "tls_client_auth":
        files.append(("cert_file", token.get("cert_file", ""), "secret"))
        files.append(("key_file", token.get("key_file", ""), "secret"))
    if "dpop_key_file" in token:
        files.append(("dpop_key_file", token["dpop_key_file"], "secret"))
    for key in ("cert_file", "key_file"):
        if key in upstream.get("tls", {}):
            files.append((f"tls.{key}", upstream["tls"][key], "secret"))
    return auth, files


def check_credential(name, key, path, holder, mounts, docs, who=None):
    """That the file at `path` is in a read-only mount of the right kind of volume. `who`
    names the config's part in messages: `upstream NAME` unless given."""
    who = who or f"upstream {name}"
    directory, _, file = path.rpartition("/")
    mount, volume = mounts.get(directory) or ({}, {})
    if holder == "secret":
        secret = volume.get("secret")
        items = [i["path"] for i in (secret or {}).get("items") or []]
        check(
            secret is not None and (not items or file in items),
            f"config: {who}: {key} {path} is a mounted Secret's file",
        )
        certificates = {
            d["spec"]["secretName"]: d["metadata"]["name"]
            for d in docs
            if d["kind"] == "Certificate"
        }
        if secret and secret.get("secretName") in certificates:
            check(
                True,
                f"config: {who}: {key} comes from Certificate "
                f"{certificates[secret['secretName']]} (Secret {secret['secretName']})",
            )
    else:
        sources = (volume.get("projected") or {}).get("sources") or []
        tokens = [
            s["serviceAccountToken"]
            for s in sources
            if "serviceAccountToken" in s and s["serviceAccountToken"].get("path") == file
        ]
        check(
            len(tokens) == 1,
            f"config: {who}: {key} {path} is a projected service-account token",
        )
        if tokens:
            # Without an audience of its own the token is one for the API server: a key to
            # the cluster, handed to the token endpoint.
            check(
                bool(tokens[0].get("audience")),
                f"config: {who}: the token has its own audience "
                f"({tokens[0].get('audience')}), not the API server's",
            )
            seconds = tokens[0].get("expirationSeconds", 3600)
            check(
                600 <= seconds <= 86400,
                f"config: {who}: the token's expirationSeconds {seconds} is "
                "between 10 min and 24 h",
            )
    check(
        mount.get("readOnly") is True,
        f"config: {who}: {key}'s volume is mounted read-only",
    )


def secret_file_mode(path, mounts):
    """The mode the Secret volume at `path`'s directory gives `path`: its item's mode, else the
    volume's defaultMode (0644 when unset, as the API server defaults it)."""
    directory, _, file = path.rpartition("/")
    secret = (mounts.get(directory) or ({}, {}))[1].get("secret") or {}
    for item in secret.get("items") or []:
        if item.get("path") == file and "mode" in item:
            return item["mode"]
    return secret.get("defaultMode", 0o644)


def check_cache(cache, mounts, docs):
    """`[cache]`: the file backend's directory is a subdirectory of a writable emptyDir in
    memory, of bounded size, mounted by bearerd alone (an emptyDir is 0777, or group-writable
    under fsGroup, which bearerd refuses: it makes the subdirectory itself, 0700); Redis's key and password are Secrets' files, read-only,
    0400 (owner only, before the fsGroup's read), and the URL holds no credentials."""
    backend = cache.get("backend")
    if backend == "file":
        directory = cache.get("dir", "").rstrip("/")
        parent = directory.rpartition("/")[0]
        mount, volume = mounts.get(parent) or ({}, {})
        empty = volume.get("emptyDir")
        check(
            directory not in mounts and empty is not None and mount.get("readOnly") is not True,
            f"config: [cache] dir {directory} is a subdirectory of an emptyDir, mounted writable",
        )
        check(
            (empty or {}).get("medium") == "Memory" and "sizeLimit" in (empty or {}),
            f"config: [cache] dir {directory}: in memory (tokens never on the node's disk), "
            "with a sizeLimit",
        )
    elif backend == "redis":
        url = cache.get("url", "")
        scheme, _, rest = url.partition("://")
        check(
            scheme in ("redis", "rediss") and "@" not in rest.split("/")[0],
            f"config: [cache] url {url} is redis:// or rediss://, without credentials",
        )
        files = [("key_file", cache.get("key_file", ""))]
        if "password_file" in cache:
            files.append(("password_file", cache["password_file"]))
        for key, path in files:
            check_credential(None, key, path, "secret", mounts, docs, who="[cache]")
            mode = secret_file_mode(path, mounts)
            check(mode == 0o400, f"config: [cache] {key} {path} has mode 0400 ({mode:#o})")
    else:
        check(False, f"config: [cache] backend {backend!r} is file or redis")


def no_proxy_excludes(no_proxy, host):
    """Whether a NO_PROXY list (as curl, Python and Go read it) sends `host` direct."""
    host = host.lower().rstrip(".")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        domain = entry.lstrip("*").lstrip(".")
        if host == domain or host.endswith("." + domain):
            return True
    return False


def check_forward_proxy_env(listen, routes, apps, intercepts=False):
    """That the app containers send plain-http requests to the forward listener at `listen`
    (HTTP_PROXY, and http_proxy for curl), keep loopback direct, do not exempt the routes'
    hosts in NO_PROXY, and do not send https through it (bearerd refuses CONNECT) unless the
    listener intercepts TLS (`intercepts`: then check_intercept looks at HTTPS_PROXY)."""
    proxy = f"http://{listen}"
    for app in apps:
        env = {e["name"]: e.get("value") for e in app.get("env") or []}
        name = app["name"]
        check(
            env.get("HTTP_PROXY") == proxy and env.get("http_proxy") == proxy,
            f"{name}: HTTP_PROXY and http_proxy = {proxy} (the forward listener)",
        )
        no_proxy = env.get("NO_PROXY")
        check(
            no_proxy is not None and env.get("no_proxy") == no_proxy,
            f"{name}: NO_PROXY and no_proxy set alike",
        )
        no_proxy = no_proxy or ""
        check(
            all(no_proxy_excludes(no_proxy, h) for h in ("localhost", "127.0.0.1")),
            f"{name}: NO_PROXY keeps localhost and 127.0.0.1 direct",
        )
        for route in routes:
            host = route.get("host", "")
            # For "*.example.com", any one label.
            sample = "a" + host[1:] if host.startswith("*.") else host
            check(
                bool(host) and not no_proxy_excludes(no_proxy, sample),
                f"{name}: route {route.get('name')}'s host {host} is not in NO_PROXY",
            )
        if intercepts:
            continue
        tunnels = [
            v for k, v in env.items() if k.lower() in ("https_proxy", "all_proxy") and v
        ]
        check(
            not tunnels,
            f"{name}: no HTTPS_PROXY or ALL_PROXY (bearerd answers CONNECT 405)",
        )


def check_intercept(settings, listen, mounts, apps):
    """A forward listener with [listener.intercept] (docs/intercept.md): the CA's key in a
    memory-backed emptyDir that bearerd mounts writable and no app container mounts; the CA's
    certificate in a volume of its own, which each app mounts read-only; the app's HTTPS_PROXY
    (and https_proxy) naming the listener, and a CA variable pointing into that mount."""
    proxy = f"http://{listen}"

    def mount_of(path):
        found = [
            (at, entry) for at, entry in mounts.items() if path.startswith(at.rstrip("/") + "/")
        ]
        return max(found, key=lambda f: len(f[0]))[1] if found else (None, {})

    key, cert = settings.get("ca_key_file", ""), settings.get("ca_cert_file", "")
    key_mount, key_volume = mount_of(key)
    cert_mount, _ = mount_of(cert)
    check(
        key_mount is not None and not key_mount.get("readOnly"),
        f"intercept: ca_key_file {key} is in a volume bearerd mounts writable",
    )
    check(
        (key_volume.get("emptyDir") or {}).get("medium") == "Memory",
        "intercept: the CA key's volume is a memory-backed emptyDir (never on the node's disk)",
    )
    check(
        cert_mount is not None and key_mount is not None
        and cert_mount["name"] != key_mount["name"],
        f"intercept: ca_cert_file {cert} is in a volume of its own, apart from the key",
    )
    for bundle in [settings.get("ca_bundle_file")] if settings.get("ca_bundle_file") else []:
        bundle_mount, _ = mount_of(bundle)
        check(
            bundle_mount is not None and cert_mount is not None
            and bundle_mount["name"] == cert_mount["name"],
            f"intercept: ca_bundle_file {bundle} is beside the certificate",
        )
    for app in apps:
        name = app["name"]
        app_mounts = app.get("volumeMounts") or []
        check(
            key_mount is not None and all(m["name"] != key_mount["name"] for m in app_mounts),
            f"{name}: does not mount the CA key's volume",
        )
        ca_mounts = [m for m in app_mounts if cert_mount and m["name"] == cert_mount["name"]]
        check(
            bool(ca_mounts) and all(m.get("readOnly") for m in ca_mounts),
            f"{name}: mounts the CA certificate's volume read-only",
        )
        env = {e["name"]: e.get("value") for e in app.get("env") or []}
        check(
            env.get("HTTPS_PROXY") == proxy and env.get("https_proxy") == proxy,
            f"{name}: HTTPS_PROXY and https_proxy = {proxy} (the intercepting listener)",
        )
        trusted = [
            env[k] for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                             "CURL_CA_BUNDLE") if env.get(k)
        ]
        check(
            bool(trusted) and bool(ca_mounts) and all(
                any(v.startswith(m["mountPath"].rstrip("/") + "/") for m in ca_mounts)
                for v in trusted
            ),
            f"{name}: its CA variables ({len(trusted)}) name files of the CA's mount",
        )


def merge_config(into, extra):
    """conf.d's merge as bearerd does it: tables key by key, arrays of tables appended."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_config(into[key], value)
        elif isinstance(value, list) and isinstance(into.get(key), list):
            into[key] = into[key] + value
        else:
            into[key] = value


def probe(container, kind):
    get = (container.get(kind) or {}).get("httpGet") or {}
    return get.get("path"), get.get("port")


def check_pod(docs, sidecar):
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    if not check(len(deployments) == 1, "one Deployment"):
        return
    deployment = deployments[0]
    template = deployment["spec"]["template"]
    pod = template["spec"]
    init = pod.get("initContainers") or []
    regular = pod.get("containers") or []
    every = init + regular

    # Where bearerd runs.
    in_init = [c for c in init if c["name"] == "bearerd"]
    in_regular = [c for c in regular if c["name"] == "bearerd"]
    if sidecar == "native":
        check(
            len(in_init) == 1 and not in_regular,
            "bearerd is an init container (native sidecar)",
        )
        bearerd = in_init[0] if in_init else None
        if bearerd:
            check(bearerd.get("restartPolicy") == "Always", "bearerd: restartPolicy Always")
    else:
        check(
            len(in_regular) == 1 and not in_init,
            "bearerd is a regular container (clusters without native sidecars)",
        )
        bearerd = in_regular[0] if in_regular else None
        if bearerd:
            check("restartPolicy" not in bearerd, "bearerd: no container restartPolicy")
    check(
        any(c["name"] != "bearerd" for c in regular),
        "an app container beside bearerd",
    )
    if not bearerd:
        return

    # Hardening, for every container.
    security = pod.get("securityContext") or {}
    for c in every:
        sc = c.get("securityContext") or {}
        # Set for the pod, or for the container (the sidecar component sets its own).
        check(
            sc.get("runAsNonRoot", security.get("runAsNonRoot")) is True,
            f"{c['name']}: runAsNonRoot",
        )
        check(
            (sc.get("seccompProfile") or security.get("seccompProfile") or {}).get("type")
            == "RuntimeDefault",
            f"{c['name']}: seccomp RuntimeDefault",
        )
        check(
            sc.get("allowPrivilegeEscalation") is False
            and sc.get("readOnlyRootFilesystem") is True
            and "ALL" in ((sc.get("capabilities") or {}).get("drop") or [])
            and sc.get("privileged") in (None, False),
            f"{c['name']}: no privilege escalation, read-only root, all capabilities dropped",
        )
        resources = c.get("resources") or {}
        check(
            all(
                key in (resources.get(kind) or {})
                for kind in ("requests", "limits")
                for key in ("cpu", "memory")
            ),
            f"{c['name']}: cpu and memory requests and limits",
        )

    # Probes on the admin port.
    ports = {p.get("name"): p.get("containerPort") for p in bearerd.get("ports") or []}
    check(ports.get("admin") == 9464, "bearerd: container port admin = 9464")
    check(probe(bearerd, "livenessProbe") == ("/healthz", "admin"), "bearerd: liveness /healthz")
    check(probe(bearerd, "readinessProbe") == ("/readyz", "admin"), "bearerd: readiness /readyz")
    check(probe(bearerd, "startupProbe") == ("/readyz", "admin"), "bearerd: startup /readyz")

    # The config, from the ConfigMap mounted at /etc/bearerd.
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = {
        m["mountPath"]: (m, volumes.get(m["name"], {})) for m in bearerd.get("volumeMounts") or []
    }
    config_map = mounts.get("/etc/bearerd", ({}, {}))[1].get("configMap", {}).get("name")
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    if not check(config_map in maps, f"bearerd: ConfigMap {config_map} mounted at /etc/bearerd"):
        return
    check(
        bearerd.get("args") == ["--config", "/etc/bearerd/bearerd.toml"],
        "bearerd: --config /etc/bearerd/bearerd.toml",
    )
    config = tomllib.loads(maps[config_map]["data"]["bearerd.toml"])
    # The components' files, which bearerd merges into it (its own loader is run on them by
    # `bearerd-check`; this merge only lets the checks below see every part).
    conf_d = mounts.get("/etc/bearerd/conf.d", ({}, {}))[1].get("configMap", {}).get("name")
    if check(conf_d in maps, f"bearerd: ConfigMap {conf_d} mounted at /etc/bearerd/conf.d"):
        for name in sorted(maps[conf_d].get("data") or {}):
            if name.endswith(".toml") and not name.startswith("."):
                merge_config(config, tomllib.loads(maps[conf_d]["data"][name]))
    check(
        config.get("admin", {}).get("listen") == "0.0.0.0:9464",
        "config: [admin] listen = 0.0.0.0:9464 (probes and scrapes come to the pod IP)",
    )
    grace = config.get("server", {}).get("shutdown_grace", "20s")
    grace_seconds = int(grace.removesuffix("s")) if grace.endswith("s") and grace[:-1].isdigit() else None
    check(
        grace_seconds is not None
        and grace_seconds < pod.get("terminationGracePeriodSeconds", 30),
        f"config: shutdown_grace {grace} < terminationGracePeriodSeconds "
        f"{pod.get('terminationGracePeriodSeconds', 30)}",
    )
    for upstream in config.get("upstream", []):
        name = upstream.get("name")
        check(
            upstream.get("listen", "").startswith("127.0.0.1:"),
            f"config: upstream {name} listens on 127.0.0.1 only",
        )
        auth, files = credential_files(upstream)
        for key, path, holder in files:
            check_credential(name, key, path, holder, mounts, docs)
        if any(holder == "token" for _, _, holder in files):
            # The token's subject names the service account.
            account = pod.get("serviceAccountName")
            accounts = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
            check(
                account in accounts,
                f"pod: serviceAccountName {account} is a ServiceAccount of the build "
                f"(the subject of the {auth} token)",
            )
    if "cache" in config:
        check_cache(config["cache"], mounts, docs)

    for i, listener in enumerate(config.get("listener", [])):
        listen = listener.get("listen", "")
        check(
            listen.startswith("127.0.0.1:"),
            f"config: listener[{i}] listens on 127.0.0.1 only",
        )
        routes = listener.get("route", [])
        for route in routes:
            _, files = credential_files(route)
            for key, path, holder in files:
                check_credential(
                    None, key, path, holder, mounts, docs, who=f"route {route.get('name')}"
                )
        if listener.get("mode") == "forward":
            apps = [c for c in regular if c["name"] != "bearerd"]
            intercept = listener.get("intercept")
            check_forward_proxy_env(listen, routes, apps, intercept is not None)
            if intercept is not None:
                check_intercept(intercept, listen, mounts, apps)

    # Scraping: by the prometheus.io/* annotations or by a PodMonitor, never both (the pod
    # would be scraped twice).
    annotations = template["metadata"].get("annotations") or {}
    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    annotated = any(k.startswith("prometheus.io/") for k in annotations)
    check(
        annotated != bool(monitors),
        f"pod: scraped one way ({'annotations' if annotated else ''}"
        f"{' and ' if annotated and monitors else ''}{'PodMonitor' if monitors else ''})",
    )
    if annotated:
        check(
            annotations.get("prometheus.io/scrape") == "true"
            and annotations.get("prometheus.io/port") == "9464"
            and annotations.get("prometheus.io/path") == "/metrics",
            "pod: prometheus.io/scrape, port 9464, path /metrics annotations",
        )
    if monitors and check(len(monitors) == 1, "one PodMonitor"):
        spec = monitors[0]["spec"]
        labels = template["metadata"].get("labels") or {}
        selector = spec["selector"].get("matchLabels") or {}
        check(
            selector and all(labels.get(k) == v for k, v in selector.items()),
            "PodMonitor: selects the pod's labels",
        )
        endpoints = spec.get("podMetricsEndpoints") or []
        check(
            len(endpoints) == 1
            and endpoints[0].get("port") == "admin"
            and endpoints[0].get("path", "/metrics") == "/metrics",
            "PodMonitor: scrapes port admin, /metrics",
        )
        check(
            any(
                r.get("targetLabel") == "job" and r.get("replacement") == "bearerd"
                for e in endpoints
                for r in e.get("relabelings") or []
            ),
            'PodMonitor: sets job="bearerd", which the alerts and the dashboard select on',
        )


def manifests(args):
    for spec in args.specs:
        sidecar, versions, built = spec.split(":", 2)
        if sidecar not in ("native", "regular"):
            raise SystemExit(f"{spec}: expected native|regular:VERSION[,VERSION...]:FILE")
        with open(built) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        print(f"{built}: {len(docs)} objects: " + ", ".join(d["kind"] for d in docs))
        validate_schemas(docs, versions.split(","))
        check_pod(docs, sidecar)


def credential_kinds(table, in_cache=False):
    """(path, kind) of every file the config names, by its key: what `bearerd --check` reads."""
    for key, value in table.items():
        # [listener.intercept]'s CA is made by bearerd at the pod's start, not mounted: its
        # files are absent, and `--check` says it would create them.
        if key == "intercept":
            continue
        if isinstance(value, dict):
            yield from credential_kinds(value, in_cache or key == "cache")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    yield from credential_kinds(item, in_cache)
        elif isinstance(value, str) and value.startswith("/") and key.endswith("_file"):
            if in_cache and key == "key_file":
                yield value, "cache-key"
            elif key in ("cert_file", "certificate_file"):
                yield value, "certificate"
            elif key in ("key_file", "private_key_file", "dpop_key_file"):
                yield value, "private-key"
            elif key == "assertion_file":
                yield value, "assertion"
            else:
                yield value, "secret"


def bearerd_check(args):
    """Runs `bearerd --check` on the config a build mounts: bearerd.toml and conf.d/ written
    from their ConfigMaps under a temporary root, the paths of the pod's other mounts moved
    under it, and made-up credentials where the pod's Secrets and tokens would be."""
    import base64
    import subprocess
    import tempfile

    with open(args.built) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    bearerd = next(
        c for c in (pod.get("initContainers") or []) + pod["containers"] if c["name"] == "bearerd"
    )
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    with tempfile.TemporaryDirectory() as root:
        texts = {}
        others = []
        for mount in bearerd.get("volumeMounts") or []:
            path = mount["mountPath"]
            volume = volumes[mount["name"]]
            if path in ("/etc/bearerd", "/etc/bearerd/conf.d"):
                data = maps[volume["configMap"]["name"]].get("data") or {}
                for name, text in data.items():
                    texts[f"{path}/{name}"] = text
            else:
                others.append(path)
                os.makedirs(root + path, mode=0o700, exist_ok=True)
        merged = {}
        for name in sorted(texts):
            merge_config(merged, tomllib.loads(texts[name]))
        # Every path of a mount, moved under the root.
        for name, text in texts.items():
            for path in others:
                text = text.replace(f'"{path}/', f'"{root}{path}/')
            os.makedirs(os.path.dirname(root + name), exist_ok=True)
            with open(root + name, "w") as f:
                f.write(text)
        key = os.path.join(root, "made-up.key")
        cert = os.path.join(root, "made-up.crt")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", key, "-out", cert, "-subj", "/CN=check-deploy", "-days", "1"],
            check=True, capture_output=True,
        )
        made_up = {
            "secret": b"made-up-secret\n",
            "cache-key": base64.b64encode(os.urandom(32)) + b"\n",
            "certificate": open(cert, "rb").read(),
            "private-key": open(key, "rb").read(),
            "assertion": b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjaGVjayJ9.c2ln\n",
        }
        for path, kind in credential_kinds(merged):
            if not check(
                any(path.startswith(m + "/") for m in others),
                f"bearerd --check: {path} is under one of bearerd's mounts",
            ):
                continue
            os.makedirs(os.path.dirname(root + path), mode=0o700, exist_ok=True)
            with open(root + path, "wb") as f:
                f.write(made_up[kind])
            os.chmod(root + path, 0o400)
        run = subprocess.run(
            [args.bearerd, "--check", "--config", root + "/etc/bearerd/bearerd.toml"],
            capture_output=True, text=True,
        )
        output = (run.stdout + run.stderr).replace(root, "")
        conf_d = [n for n in texts if n.startswith("/etc/bearerd/conf.d/") and n.endswith(".toml")]
        merged_lines = [l for l in output.splitlines() if l.strip().startswith("merged:")]
        check(run.returncode == 0, f"bearerd --check passes on {args.built}'s config")
        print("    " + output.rstrip().replace("\n", "\n    "))
        check(
            len(merged_lines) == len(conf_d),
            f"bearerd --check merged the {len(conf_d)} conf.d files "
            f"({', '.join(sorted(os.path.basename(n) for n in conf_d))})",
        )


def dockerfile(args):
    import dockerfile as parser

    commands = parser.parse_file(args.dockerfile)
    stages = []
    for c in commands:
        if c.cmd == "FROM":
            stages.append([c])
        elif stages:
            stages[-1].append(c)
    print(f"{args.dockerfile}: {len(commands)} instructions, {len(stages)} stages")
    if not check(len(stages) == 2, "Dockerfile: two stages, build and runtime"):
        return
    build, runtime = stages

    def has(stage, cmd, test):
        return any(c.cmd == cmd and test(c) for c in stage)

    check(
        "build" in build[0].value
        and has(build, "RUN", lambda c: "cargo build --release --locked --bin bearerd" in c.value[0]),
        "Dockerfile: stage build runs cargo build --release --locked --bin bearerd",
    )
    image = runtime[0].value[0]
    check(image.startswith("gcr.io/distroless/"), f"Dockerfile: runtime image {image} is distroless")
    check(
        has(runtime, "COPY", lambda c: "--from=build" in c.flags),
        "Dockerfile: the runtime stage copies the binary from the build stage",
    )
    smoke = ["/usr/local/bin/bearerd", "--version"]
    check(
        has(runtime, "RUN", lambda c: c.json and list(c.value) == smoke),
        f"Dockerfile: smoke test RUN {json.dumps(smoke)} (exec form: no shell)",
    )
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    user = users[-1] if users else "(none)"
    uid = user.split(":")[0]
    check(uid.isdigit() and int(uid) != 0, f"Dockerfile: USER {user} is numeric and not root")
    check(has(runtime, "ENTRYPOINT", lambda c: c.json), "Dockerfile: ENTRYPOINT in exec form")

    # The build stage copies Cargo.toml, Cargo.lock and src only: enough while Cargo.toml
    # declares no target of its own (a [[bench]] whose file is missing fails the build) and
    # there is no build script.
    copied = {v for c in build if c.cmd == "COPY" for v in c.value[:-1]}
    with open("Cargo.toml", "rb") as f:
        manifest = tomllib.load(f)
    declared = [f"[[{t}]]" for t in ("bin", "bench", "example", "test") if t in manifest]
    if "build" in manifest.get("package", {}) or os.path.exists("build.rs"):
        declared.append("a build script")
    check(
        not declared and copied >= {"Cargo.toml", "Cargo.lock", "src"},
        "Dockerfile: copies all the build needs (Cargo.toml, Cargo.lock, src)"
        + (f"; Cargo.toml now has {', '.join(declared)}: copy their files too" if declared else ""),
    )
    rust = next(
        (c.value[0].split("=", 1)[1] for c in commands if c.cmd == "ARG" and c.value[0].startswith("RUST_VERSION=")),
        "0",
    )
    minimum = manifest.get("package", {}).get("rust-version", "0")
    version = lambda text: tuple(int(part) for part in text.split("."))  # noqa: E731
    check(
        version(rust) >= version(minimum),
        f"Dockerfile: Rust {rust} >= rust-version {minimum} of Cargo.toml",
    )


def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels") or [])


def dashboard_rules(args):
    with open(args.dashboard) as f:
        dashboard = json.load(f)
    every = list(panels(dashboard.get("panels") or []))
    ids = [p.get("id") for p in every]
    check(len(ids) == len(set(ids)) and None not in ids, f"dashboard: {len(ids)} panels, ids unique")
    variables = [v["name"] for v in dashboard.get("templating", {}).get("list", [])]
    check("datasource" in variables, "dashboard: a datasource variable")
    rules = []
    for panel in every:
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        check(
            bool(targets)
            and (panel.get("datasource") or {}).get("uid") == "${datasource}"
            and all(t.get("expr") for t in targets),
            f"dashboard: panel {panel['id']} \"{panel.get('title')}\" queries ${{datasource}}",
        )
        for n, target in enumerate(targets):
            expr = target.get("expr", "")
            for name, value in (
                ("$__rate_interval", "2m"),
                ("$__interval", "30s"),
                ("$__range", "1h"),
            ):
                expr = expr.replace(name, value)
            for name in sorted(variables, key=len, reverse=True):
                expr = expr.replace("${" + name + "}", ".*").replace("$" + name, ".*")
            rules.append({"record": f"dashboard:panel_{panel['id']}_{n}", "expr": expr})
    with open(args.out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, sort_keys=False)
    print(f"  {len(rules)} dashboard queries written to {args.out} for promtool")


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifests")
    m.add_argument("specs", nargs="+", metavar="native|regular:VERSION[,VERSION...]:FILE")
    d = sub.add_parser("dashboard-rules")
    d.add_argument("dashboard")
    d.add_argument("out")
    b = sub.add_parser("bearerd-check")
    b.add_argument("bearerd")
    b.add_argument("built")
    f = sub.add_parser("dockerfile")
    f.add_argument("dockerfile")
    args = parser.parse_args()
    commands = {"manifests": manifests, "bearerd-check": bearerd_check, "dashboard-rules": dashboard_rules, "dockerfile": dockerfile}
    commands[args.command](args)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

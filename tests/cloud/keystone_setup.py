"""Keystone for the vmpool cloud test bed.

Runs INSIDE the cloud venv (``.cloud-venv``): configures a sqlite/fernet
Keystone in RUN_DIR, bootstraps it, serves the real Keystone WSGI app on
127.0.0.1 with a threaded wsgiref server, then creates what vmpool needs
(project + user ``vmpool`` with the member role, an application credential
for it) and writes ``RUN_DIR/keystone.json`` when it is ready.

    python keystone_setup.py --run-dir D --port P --public-url URL \
        --compute-url URL --admin-password X --user-password Y \
        [--token-expiration 3600]

The catalog's public identity endpoint is ``--public-url`` and every compute
endpoint is ``--compute-url``: both are the fault-injecting proxy in front of
the real services.  The internal/admin identity endpoints are Keystone itself
(nova's keystonemiddleware validates tokens there, unfaulted and uncounted).
"""

import argparse
import faulthandler
import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
import wsgiref.simple_server

REGION = "RegionOne"

CONF_TEMPLATE = """\
[DEFAULT]
debug = false
log_file = {run_dir}/keystone.log
use_stderr = false

[database]
connection = sqlite:///{run_dir}/keystone.db

[token]
provider = fernet
expiration = {expiration}
allow_expired_window = 60

[fernet_tokens]
key_repository = {run_dir}/fernet-keys

[fernet_receipts]
key_repository = {run_dir}/fernet-receipts

[credential]
key_repository = {run_dir}/credential-keys

[identity]
password_hash_rounds = 4

[cache]
# in-process cache: token validation is many sqlite queries otherwise (slow under a burst)
enabled = true
backend = dogpile.cache.memory
"""


def log(msg):
    print(f"keystone_setup: {msg}", file=sys.stderr, flush=True)


def manage(conf, *args):
    exe = os.path.join(os.path.dirname(sys.executable), "keystone-manage")
    cmd = [exe, "--config-file", conf] + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"keystone-manage {args[0]} failed:\n{r.stdout}{r.stderr}")


class _Handler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, fmt, *args):  # quiet: keystone logs to its file
        pass


class ThreadedWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def limit_concurrency(app, n):
    """At most n requests inside keystone at once: a burst of 30+ threads on one sqlite file
    thrashes (every request slower than nova's validation timeout); queued ones wait instead."""
    sem = threading.BoundedSemaphore(n)

    def wrapped(environ, start_response):
        with sem:
            return list(app(environ, start_response))

    return wrapped


def serve(app, port):
    srv = wsgiref.simple_server.make_server(
        "127.0.0.1", port, limit_concurrency(app, 4), server_class=ThreadedWSGIServer, handler_class=_Handler
    )
    t = threading.Thread(target=srv.serve_forever, daemon=True, name="keystone-wsgi")
    t.start()
    return srv


def _req(method, url, body=None, token=None, ok=(200, 201, 204)):
    data = json.dumps(body).encode() if body is not None else None
    r = urllib.request.Request(url, data=data, method=method)
    r.add_header("Content-Type", "application/json")
    r.add_header("Accept", "application/json")
    if token:
        r.add_header("X-Auth-Token", token)
    try:
        with urllib.request.urlopen(r, timeout=60) as resp:
            raw = resp.read()
            return resp.status, dict(resp.headers), (json.loads(raw) if raw else {})
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url} -> {e.code} {e.read()[:500]!r}") from None


def token_for(base, user, password, project, domain="Default"):
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {"user": {"name": user, "password": password, "domain": {"name": domain}}},
            },
            "scope": {"project": {"name": project, "domain": {"name": domain}}},
        }
    }
    _, headers, data = _req("POST", base + "/v3/auth/tokens", body)
    tok = headers.get("X-Subject-Token") or headers.get("x-subject-token")
    return tok, data["token"]


def setup_identity(base, args):
    """Create the vmpool project/user/app credential and the compute service."""
    admin_tok, admin_info = token_for(base, "admin", args.admin_password, "admin")

    def get_one(path, key, name):
        _, _, d = _req("GET", base + path + "?name=" + name, token=admin_tok)
        return d[key][0] if d[key] else None

    def role_id(name):
        return get_one("/v3/roles", "roles", name)["id"]

    # compute service + endpoints (all interfaces -> proxy in front of nova)
    _, _, d = _req(
        "POST", base + "/v3/services", {"service": {"type": "compute", "name": "nova", "enabled": True}}, admin_tok
    )
    svc_id = d["service"]["id"]
    for iface in ("public", "internal", "admin"):
        _req(
            "POST",
            base + "/v3/endpoints",
            {
                "endpoint": {
                    "service_id": svc_id,
                    "interface": iface,
                    "region_id": REGION,
                    "url": args.compute_url,
                    "enabled": True,
                }
            },
            admin_tok,
        )

    _, _, d = _req(
        "POST",
        base + "/v3/projects",
        {"project": {"name": "vmpool", "domain_id": "default", "description": "vmpool test project", "enabled": True}},
        admin_tok,
    )
    project_id = d["project"]["id"]
    _, _, d = _req(
        "POST",
        base + "/v3/users",
        {
            "user": {
                "name": "vmpool",
                "domain_id": "default",
                "password": args.user_password,
                "default_project_id": project_id,
                "enabled": True,
            }
        },
        admin_tok,
    )
    user_id = d["user"]["id"]
    member = role_id("member")
    _req("PUT", base + f"/v3/projects/{project_id}/users/{user_id}/roles/{member}", None, admin_tok)
    # admin also gets admin on the vmpool project (handy for all_tenants ops)
    _req(
        "PUT",
        base + "/v3/projects/{}/users/{}/roles/{}".format(project_id, admin_info["user"]["id"], role_id("admin")),
        None,
        admin_tok,
    )

    user_tok, _ = token_for(base, "vmpool", args.user_password, "vmpool")
    _, _, d = _req(
        "POST",
        base + f"/v3/users/{user_id}/application_credentials",
        {"application_credential": {"name": "vmpool-bed", "description": "vmpool test bed", "unrestricted": False}},
        user_tok,
    )
    ac = d["application_credential"]
    return {
        "region_name": REGION,
        "project_id": project_id,
        "user_id": user_id,
        "admin_project_id": admin_info["project"]["id"],
        "admin_user_id": admin_info["user"]["id"],
        "application_credential_id": ac["id"],
        "application_credential_secret": ac["secret"],
        "compute_service_id": svc_id,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--public-url", required=True, help="public identity URL in the catalog (proxy)")
    p.add_argument("--internal-url", default=None, help="internal/admin identity URL in the catalog (default: direct)")
    p.add_argument("--compute-url", required=True, help="compute URL in the catalog")
    p.add_argument("--admin-password", required=True)
    p.add_argument("--user-password", required=True)
    p.add_argument("--token-expiration", type=int, default=3600)
    args = p.parse_args()

    t0 = time.time()
    run_dir = os.path.abspath(os.path.join(args.run_dir, "keystone"))
    os.makedirs(run_dir, exist_ok=True)
    for sub in ("fernet-keys", "fernet-receipts", "credential-keys"):
        os.makedirs(os.path.join(run_dir, sub), mode=0o700, exist_ok=True)
    conf = os.path.join(run_dir, "keystone.conf")
    with open(conf, "w") as f:
        f.write(CONF_TEMPLATE.format(run_dir=run_dir, public_url=args.public_url, expiration=args.token_expiration))
    ready_file = os.path.join(args.run_dir, "keystone.json")
    if os.path.exists(ready_file):
        os.unlink(ready_file)

    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: stacks to keystone.out

    manage(conf, "db_sync")
    user = "root"
    manage(conf, "fernet_setup", "--keystone-user", user, "--keystone-group", user)
    manage(conf, "credential_setup", "--keystone-user", user, "--keystone-group", user)
    # public -> the proxy (what vmpool uses); internal/admin -> keystone itself
    # (what nova's keystonemiddleware uses to validate tokens: never faulted)
    internal = args.internal_url or f"http://127.0.0.1:{args.port}/v3"
    manage(
        conf,
        "bootstrap",
        "--bootstrap-password",
        args.admin_password,
        "--bootstrap-admin-url",
        internal,
        "--bootstrap-public-url",
        args.public_url,
        "--bootstrap-internal-url",
        internal,
        "--bootstrap-region-id",
        REGION,
    )
    log("bootstrapped in %.1fs" % (time.time() - t0))

    os.environ["OS_KEYSTONE_CONFIG_FILES"] = conf
    sys.argv = sys.argv[:1]  # keystone's oslo.config parses sys.argv
    from keystone.server import wsgi as ks_wsgi

    app = ks_wsgi.initialize_public_application()
    serve(app, args.port)
    base = f"http://127.0.0.1:{args.port}"
    info = setup_identity(base, args)
    info.update({"port": args.port, "url": base + "/v3", "public_url": args.public_url})
    tmp = ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.rename(tmp, ready_file)
    log(f"ready on {base} in {time.time() - t0:.1f}s")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()

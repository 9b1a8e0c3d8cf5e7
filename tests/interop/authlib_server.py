#!/usr/bin/env python
"""An Authlib authorization server for tests/interop/authlib.rs: the JWT bearer grant
(RFC 7523 §2.1, Authlib's JWTBearerGrant, verifying the assertion with the client's public
key) and the refresh-token grant with rotation (Authlib's RefreshTokenGrant with
INCLUDE_NEW_REFRESH_TOKEN; a spent refresh token is revoked), on a minimal WSGI app served by
waitress; tokens are kept in memory. It also answers introspection (RFC 7662, no client
authentication: the test's upstream is trusted) and /stats (token requests by status).

Environment:
    BEARERD_INTEROP_JWT_CLIENT      the client id (the assertion's iss) of the JWT client
    BEARERD_INTEROP_JWT_KEY         its private key (PEM); the server keeps the public half
    BEARERD_INTEROP_RT_CLIENT       id:secret of the refresh-token client (client_secret_basic)
    BEARERD_INTEROP_RT_FIRST        the refresh token a user gave that client once

Prints "listening on 127.0.0.1:PORT" once it accepts connections; exits when its standard
input closes.
"""

import json
import os
import sys
import threading
import time
from urllib.parse import parse_qsl

os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")  # loopback http

from authlib.oauth2.rfc6749 import AuthorizationServer, ClientMixin, OAuth2Request, TokenMixin
from authlib.oauth2.rfc6749.grants import RefreshTokenGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7523 import JWTBearerGrant
from cryptography.hazmat.primitives import serialization
from waitress.server import create_server

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


class Client(ClientMixin):
    def __init__(self, client_id, secret, grant, method):
        self.client_id, self.secret, self.grant, self.method = client_id, secret, grant, method

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return None

    def get_allowed_scope(self, scope):
        return scope

    def check_redirect_uri(self, redirect_uri):
        return False

    def check_client_secret(self, client_secret):
        return self.secret is not None and client_secret == self.secret

    def check_endpoint_auth_method(self, method, endpoint):
        return method == self.method

    def check_response_type(self, response_type):
        return False

    def check_grant_type(self, grant_type):
        return grant_type == self.grant


class Refresh(TokenMixin):
    def __init__(self, token, client_id, user, scope):
        self.token, self.client_id, self.user, self.scope = token, client_id, user, scope
        self.revoked = False

    def check_client(self, client):
        return client.client_id == self.client_id

    def get_scope(self):
        return self.scope

    def get_expires_in(self):
        return 0

    def is_expired(self):
        return False

    def is_revoked(self):
        return self.revoked


class Request(OAuth2Request):
    def __init__(self, environ, form):
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")}
        if "CONTENT_TYPE" in environ:
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        super().__init__(environ["REQUEST_METHOD"], f"http://{environ['HTTP_HOST']}{environ['PATH_INFO']}", headers=headers)
        self.payload = BasicOAuth2Payload(form)
        self._form = form

    @property
    def form(self):
        return self._form

    @property
    def args(self):
        return {}


STATE = {"access": {}, "refresh": {}, "stats": {}}
LOCK = threading.Lock()


class Server(AuthorizationServer):
    def __init__(self, clients):
        super().__init__()
        self.clients = clients
        self.register_token_generator("default", BearerTokenGenerator(lambda *a, **k: os.urandom(24).hex(), lambda *a, **k: os.urandom(24).hex()))

    def query_client(self, client_id):
        return self.clients.get(client_id)

    def save_token(self, token, request):
        user = request.user or (request.refresh_token.user if request.refresh_token else None)
        STATE["access"][token["access_token"]] = {
            "client_id": request.client.client_id,
            "sub": user,
            "scope": token.get("scope"),
            "exp": int(time.time()) + token["expires_in"],
        }
        if "refresh_token" in token:
            STATE["refresh"][token["refresh_token"]] = Refresh(
                token["refresh_token"], request.client.client_id, user, token.get("scope")
            )

    def send_signal(self, name, *args, **kwargs):
        pass

    def create_oauth2_request(self, request):
        return request

    def create_json_request(self, request):
        raise NotImplementedError()

    def handle_response(self, status, body, headers):
        return status, body, headers


class JwtGrant(JWTBearerGrant):
    def resolve_issuer_client(self, issuer):
        return self.server.query_client(issuer)

    def resolve_client_public_key(self, client):
        return self.server.public_key

    def get_audiences(self):
        return [self.server.token_url]

    def authenticate_user(self, subject):
        return subject

    def has_granted_permission(self, client, user):
        return True


class RotatingRefreshGrant(RefreshTokenGrant):
    INCLUDE_NEW_REFRESH_TOKEN = True
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic"]

    def authenticate_refresh_token(self, refresh_token):
        record = STATE["refresh"].get(refresh_token)
        if record and not record.is_revoked():
            return record
        return None

    def authenticate_user(self, refresh_token):
        return refresh_token.user

    def revoke_old_credential(self, refresh_token):
        refresh_token.revoked = True


def main():
    jwt_client = os.environ["BEARERD_INTEROP_JWT_CLIENT"]
    rt_id, rt_secret = os.environ["BEARERD_INTEROP_RT_CLIENT"].split(":", 1)
    with open(os.environ["BEARERD_INTEROP_JWT_KEY"], "rb") as f:
        private = serialization.load_pem_private_key(f.read(), password=None)
    server = Server({
        jwt_client: Client(jwt_client, None, JWT_BEARER, "none"),
        rt_id: Client(rt_id, rt_secret, "refresh_token", "client_secret_basic"),
    })
    server.public_key = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    JwtGrant.TOKEN_ENDPOINT_AUTH_METHODS = ["none"]
    server.register_grant(JwtGrant)
    server.register_grant(RotatingRefreshGrant)
    first = os.environ["BEARERD_INTEROP_RT_FIRST"]
    STATE["refresh"][first] = Refresh(first, rt_id, "interop-user", "read")

    def app(environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        form = dict(parse_qsl(environ["wsgi.input"].read(length).decode()))
        path = environ["PATH_INFO"]
        with LOCK:
            if path == "/token":
                status, body, headers = server.create_token_response(Request(environ, form))
                STATE["stats"][str(status)] = STATE["stats"].get(str(status), 0) + 1
            elif path == "/introspect":
                found = STATE["access"].get(form.get("token", ""))
                status, headers = 200, [("Content-Type", "application/json")]
                body = dict(found, active=True) if found and found["exp"] > time.time() else {"active": False}
            elif path == "/stats":
                status, body, headers = 200, {"token_requests": STATE["stats"]}, [("Content-Type", "application/json")]
            else:
                status, body, headers = 404, {"error": "not_found"}, [("Content-Type", "application/json")]
        payload = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
        start_response(f"{status} X", list(headers))
        return [payload]

    httpd = create_server(app, host="127.0.0.1", port=0, threads=2, ident="authlib-interop")
    server.token_url = f"http://127.0.0.1:{httpd.effective_port}/token"
    print(f"listening on 127.0.0.1:{httpd.effective_port}", flush=True)

    def exit_when_stdin_closes():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    httpd.run()


if __name__ == "__main__":
    main()

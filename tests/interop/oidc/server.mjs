// An oidc-provider authorization server (with a registered RFC 8693 token-exchange grant) and
// a resource server, for tests/interop/oidc.rs.
//
//     node server.mjs OUT.json        (or BEARERD_INTEROP_OIDC_OUT=OUT.json node server.mjs)
//
// At start it makes every key it needs with node's crypto (RSA 2048, EC P-256, Ed25519, as
// PKCS#8 PEM files beside OUT.json; the RSA keys also as PKCS#1), a throwaway CA with a server
// certificate for 127.0.0.1/localhost and a client certificate, registers one client per
// client-authentication method, and listens on four loopback ports the kernel picks:
//
//   issuer          http://127.0.0.1:P    oidc-provider: /token, /token/introspection, ...
//   issuer (TLS)    https://127.0.0.1:Q   the same provider; asks for a client certificate,
//                                         which tls_client_auth and certificate-bound tokens use
//   resource        http://127.0.0.1:R    the upstream bearerd proxies to: /resource/...
//   resource (TLS)  https://127.0.0.1:S   the same, asking for a client certificate
//
// It then writes OUT.json (every URL, file, client and key a test needs; see `description`
// below) and prints one line on stdout:
//
//     ready OUT.json
//
// It runs until it is killed, or until its standard input closes when that is not a terminal
// (the test that started it is gone).
//
// The resource server (any path under /resource/) introspects each access token at the
// issuer, as the client `resource-server`, and answers 200 with what it checked, or 401 with
// the reason:
//   Authorization: Bearer T   T must be active, for https://api.test/, and not sender-
//                             constrained by DPoP; a certificate-bound T (cnf x5t#S256) must
//                             come over the TLS port with that client certificate.
//   Authorization: DPoP T     the DPoP proof is verified as RFC 9449 §4.3 says (one DPoP
//                             header, typ dpop+jwt, an asymmetric alg, the signature by the
//                             embedded public jwk, htm, htu = this server's origin and the
//                             request path, iat within 60 s, a jti not seen before, ath = the
//                             SHA-256 of T), a DPoP nonce is required (a proof without the
//                             current one is answered 401 `WWW-Authenticate: DPoP
//                             error="use_dpop_nonce"` with a DPoP-Nonce header), and T's
//                             cnf.jkt must be the proof key's JWK SHA-256 thumbprint.
// Other paths on the resource ports:
//   GET /stats                          what both servers saw (token requests, resource
//                                       requests, DPoP proofs verified, tokens seen)
//   GET /assertion/CLIENT?aud=URL&lifetime=SECONDS
//                                       a fresh private_key_jwt client assertion (RFC 7523)
//                                       for CLIENT, signed with its key (aud defaults to the
//                                       plain-HTTP token endpoint), as text
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import * as path from 'node:path';

import { calculateJwkThumbprint, decodeProtectedHeader, EmbeddedJWK, jwtVerify, SignJWT } from 'jose';
import Provider, { errors } from 'oidc-provider';

const out = process.argv[2] || process.env.BEARERD_INTEROP_OIDC_OUT;
if (!out) {
  console.error('usage: node server.mjs OUT.json (or BEARERD_INTEROP_OIDC_OUT=OUT.json)');
  process.exit(2);
}
const dir = path.dirname(path.resolve(out));
fs.mkdirSync(dir, { recursive: true });

/** The one resource server tokens are issued for, and its scopes. */
const RESOURCE = 'https://api.test/';
const RESOURCE_SCOPES = 'api:read api:write';
const TOKEN_TTL = 3600;
/** How far a DPoP proof's iat may be from now at the resource server, in seconds. */
const DPOP_IAT_WINDOW = 60;
const DPOP_ALGS = ['ES256', 'ES384', 'EdDSA', 'RS256', 'PS256'];

// ---------------------------------------------------------------------------------------
// Keys and files.

const b64url = (buf) => Buffer.from(buf).toString('base64url');
const randomSecret = () => b64url(crypto.randomBytes(32));

function writeFile(name, text, mode = 0o600) {
  const file = path.join(dir, name);
  fs.writeFileSync(file, text, { mode });
  return file;
}

function generate(kind) {
  switch (kind) {
    case 'rsa':
      return crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
    case 'ec':
      return crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
    case 'ed25519':
      return crypto.generateKeyPairSync('ed25519');
    default:
      throw new Error(kind);
  }
}

/** A key pair written as `NAME.pem` (PKCS#8; RSA also as `NAME.pkcs1.pem`). */
function keyPair(name, kind, alg) {
  const { privateKey, publicKey } = generate(kind);
  const kid = `${name}-${b64url(crypto.randomBytes(6))}`;
  const pem = privateKey.export({ type: 'pkcs8', format: 'pem' });
  const key = {
    name,
    kind,
    alg,
    kid,
    privateKey,
    publicKey,
    private_key_file: writeFile(`${name}.pem`, pem),
    public_jwk: { ...publicKey.export({ format: 'jwk' }), kid, alg, use: 'sig' },
  };
  if (kind === 'rsa') {
    key.private_key_pkcs1_file = writeFile(
      `${name}.pkcs1.pem`,
      privateKey.export({ type: 'pkcs1', format: 'pem' }),
    );
  }
  return key;
}

// ---------------------------------------------------------------------------------------
// A throwaway CA. Node's crypto signs but does not make certificates, so this writes the few
// DER structures an X.509 v3 certificate needs (RFC 5280), signed ecdsa-with-SHA256.

function derLength(n) {
  if (n < 0x80) return Buffer.from([n]);
  const bytes = [];
  for (let v = n; v > 0; v >>>= 8) bytes.unshift(v & 0xff);
  return Buffer.from([0x80 | bytes.length, ...bytes]);
}
const der = (tag, ...parts) => {
  const body = Buffer.concat(parts);
  return Buffer.concat([Buffer.from([tag]), derLength(body.length), body]);
};
const seq = (...parts) => der(0x30, ...parts);
const set = (...parts) => der(0x31, ...parts);
const bool = (value) => der(0x01, Buffer.from([value ? 0xff : 0]));
const octets = (buf) => der(0x04, buf);
const bits = (buf, unused = 0) => der(0x03, Buffer.from([unused]), buf);
const utf8 = (text) => der(0x0c, Buffer.from(text, 'utf8'));
const explicit = (n, ...parts) => der(0xa0 | n, ...parts);
const implicit = (n, buf) => der(0x80 | n, buf);
function integer(buf) {
  let b = Buffer.from(buf);
  while (b.length > 1 && b[0] === 0 && !(b[1] & 0x80)) b = b.subarray(1);
  if (b[0] & 0x80) b = Buffer.concat([Buffer.from([0]), b]);
  return der(0x02, b);
}
function oid(dotted) {
  const [a, b, ...rest] = dotted.split('.').map(Number);
  const bytes = [40 * a + b];
  for (const n of rest) {
    const enc = [n & 0x7f];
    for (let v = Math.floor(n / 128); v > 0; v = Math.floor(v / 128)) enc.unshift((v & 0x7f) | 0x80);
    bytes.push(...enc);
  }
  return der(0x06, Buffer.from(bytes));
}
const utcTime = (date) => der(0x17, Buffer.from(`${date.toISOString().replace(/[-:T]/g, '').slice(2, 14)}Z`));
/** A distinguished name from [[type, value]] in certificate order (most significant first). */
const NAME_OIDS = { C: '2.5.4.6', O: '2.5.4.10', CN: '2.5.4.3' };
const name = (rdns) => seq(...rdns.map(([type, value]) => set(seq(oid(NAME_OIDS[type]), utf8(value)))));
const extension = (id, critical, value) => seq(oid(id), ...(critical ? [bool(true)] : []), octets(value));
const ECDSA_SHA256 = seq(oid('1.2.840.10045.4.3.2'));

function certificate({ subject, issuer, publicKey, signingKey, ca = false, serverNames, clientAuth = false }) {
  const now = Date.now();
  const serial = crypto.randomBytes(16);
  serial[0] &= 0x7f;
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  const skid = crypto.createHash('sha1').update(spki).digest();
  const extensions = [
    extension('2.5.29.19', true, ca ? seq(bool(true)) : seq()),
    // keyUsage: keyCertSign + cRLSign for the CA, digitalSignature otherwise.
    extension('2.5.29.15', true, ca ? bits(Buffer.from([0x06]), 1) : bits(Buffer.from([0x80]), 7)),
    extension('2.5.29.14', false, octets(skid)),
  ];
  if (issuer.skid) {
    extensions.push(extension('2.5.29.35', false, seq(implicit(0, issuer.skid))));
  }
  if (serverNames) {
    const altNames = serverNames.map((n) => (/^[\d.]+$/.test(n)
      ? implicit(7, Buffer.from(n.split('.').map(Number)))
      : implicit(2, Buffer.from(n, 'ascii'))));
    extensions.push(extension('2.5.29.17', false, seq(...altNames)));
    extensions.push(extension('2.5.29.37', false, seq(oid('1.3.6.1.5.5.7.3.1'))));
  }
  if (clientAuth) {
    extensions.push(extension('2.5.29.37', false, seq(oid('1.3.6.1.5.5.7.3.2'))));
  }
  const tbs = seq(
    explicit(0, integer([2])),
    integer(serial),
    ECDSA_SHA256,
    name(issuer.name),
    seq(utcTime(new Date(now - 3600_000)), utcTime(new Date(now + 2 * 86400_000))),
    name(subject),
    spki,
    explicit(3, seq(...extensions)),
  );
  const signature = crypto.sign('sha256', tbs, signingKey);
  const cert = seq(tbs, ECDSA_SHA256, bits(signature));
  const pem = `-----BEGIN CERTIFICATE-----\n${cert.toString('base64').match(/.{1,64}/g).join('\n')}\n-----END CERTIFICATE-----\n`;
  return { pem, skid, name: subject, x509: new crypto.X509Certificate(pem) };
}

const caKeys = generate('ec');
const ca = certificate({
  subject: [['O', 'bearerd interop'], ['CN', 'bearerd interop CA']],
  issuer: { name: [['O', 'bearerd interop'], ['CN', 'bearerd interop CA']] },
  publicKey: caKeys.publicKey,
  signingKey: caKeys.privateKey,
  ca: true,
});
const serverKeys = generate('ec');
const serverCert = certificate({
  subject: [['CN', '127.0.0.1']],
  issuer: ca,
  publicKey: serverKeys.publicKey,
  signingKey: caKeys.privateKey,
  serverNames: ['127.0.0.1', 'localhost'],
});
/** tls_client_auth matches the certificate by this subject (RFC 4514 order). */
const TLS_CLIENT_SUBJECT_DN = 'CN=bearerd-interop-tls-client,O=bearerd interop';
const clientKeys = generate('ec');
const clientCert = certificate({
  subject: [['O', 'bearerd interop'], ['CN', 'bearerd-interop-tls-client']],
  issuer: ca,
  publicKey: clientKeys.publicKey,
  signingKey: caKeys.privateKey,
  clientAuth: true,
});
if (!serverCert.x509.verify(caKeys.publicKey) || !clientCert.x509.verify(caKeys.publicKey)) {
  throw new Error('the throwaway CA made a certificate that does not verify');
}
const caFile = writeFile('ca.pem', ca.pem, 0o644);
const tlsClientCertFile = writeFile('tls-client.pem', clientCert.pem, 0o644);
const tlsClientKeyFile = writeFile('tls-client-key.pem', clientKeys.privateKey.export({ type: 'pkcs8', format: 'pem' }));
const serverTls = {
  key: serverKeys.privateKey.export({ type: 'pkcs8', format: 'pem' }),
  cert: serverCert.pem,
  ca: [ca.pem],
  // Ask for a client certificate, verify it against the CA, but let requests without one in:
  // the application decides (socket.authorized, getPeerX509Certificate).
  requestCert: true,
  rejectUnauthorized: false,
};

/** RFC 4514 form of a node X509Certificate subject ("O=x\nCN=y" in certificate order). */
const subjectDn = (x509) => x509.subject.split('\n').reverse().join(',');
/** base64url SHA-256 of the DER certificate: cnf x5t#S256 (RFC 8705 §3.1). */
const x5tS256 = (x509) => b64url(crypto.createHash('sha256').update(x509.raw).digest());
const peerCertificate = (socket) => (socket.encrypted && socket.getPeerX509Certificate?.()) || undefined;

// ---------------------------------------------------------------------------------------
// Clients, one per client-authentication method.

const keys = {
  rs256: keyPair('rs256', 'rsa', 'RS256'),
  ps256: keyPair('ps256', 'rsa', 'PS256'),
  es256: keyPair('es256', 'ec', 'ES256'),
  eddsa: keyPair('eddsa', 'ed25519', 'EdDSA'),
  assertion: keyPair('assertion', 'ec', 'ES256'),
};
const dpopKeys = {
  ES256: keyPair('dpop-es256', 'ec', 'ES256'),
  EdDSA: keyPair('dpop-eddsa', 'ed25519', 'EdDSA'),
};

const clientCredentialsOnly = { grant_types: ['client_credentials'], response_types: [], redirect_uris: [] };

/** What OUT.json says of each client, by client_id. */
const described = {};
const clients = [];

function register(metadata, description) {
  clients.push({ ...clientCredentialsOnly, ...metadata });
  described[metadata.client_id] = {
    client_id: metadata.client_id,
    method: metadata.token_endpoint_auth_method,
    ...description,
  };
}

function privateKeyJwt(clientId, key) {
  register(
    {
      client_id: clientId,
      token_endpoint_auth_method: 'private_key_jwt',
      token_endpoint_auth_signing_alg: key.alg,
      jwks: { keys: [key.public_jwk] },
    },
    {
      alg: key.alg,
      key_id: key.kid,
      private_key_file: key.private_key_file,
      ...(key.private_key_pkcs1_file ? { private_key_pkcs1_file: key.private_key_pkcs1_file } : {}),
      public_jwk: key.public_jwk,
    },
  );
}

function secretClient(clientId, method, extra = {}) {
  const secret = randomSecret();
  register({ client_id: clientId, client_secret: secret, token_endpoint_auth_method: method, ...extra }, { client_secret: secret });
}

privateKeyJwt('pkjwt-rs256', keys.rs256);
privateKeyJwt('pkjwt-ps256', keys.ps256);
privateKeyJwt('pkjwt-es256', keys.es256);
privateKeyJwt('pkjwt-eddsa', keys.eddsa);
privateKeyJwt('assertion', keys.assertion);
secretClient('secret-jwt', 'client_secret_jwt', { token_endpoint_auth_signing_alg: 'HS256' });
described['secret-jwt'].alg = 'HS256';
for (const [clientId, bound] of [['tls', false], ['tls-bound', true]]) {
  register(
    {
      client_id: clientId,
      token_endpoint_auth_method: 'tls_client_auth',
      tls_client_auth_subject_dn: TLS_CLIENT_SUBJECT_DN,
      tls_client_certificate_bound_access_tokens: bound,
    },
    {
      subject_dn: TLS_CLIENT_SUBJECT_DN,
      cert_file: tlsClientCertFile,
      key_file: tlsClientKeyFile,
      certificate_bound: bound,
      x5t_s256: x5tS256(clientCert.x509),
    },
  );
}
secretClient('dpop', 'client_secret_basic', { dpop_bound_access_tokens: true });

// Token exchange (RFC 8693): a client that trades JWTs of another issuer (a workload
// platform, whose key this server trusts) for tokens of the resource.
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const JWT_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:jwt';
const WORKLOAD_ISSUER = 'https://workloads.interop.test';
const workloadKey = keyPair('workloads', 'ec', 'ES256');
secretClient('exchange', 'client_secret_basic', { grant_types: [TOKEN_EXCHANGE] });
secretClient('basic', 'client_secret_basic');
secretClient('post', 'client_secret_post');
secretClient('resource-server', 'client_secret_basic');
const introspector = described['resource-server'];

// ---------------------------------------------------------------------------------------
// What the servers saw, for GET /stats.

const stats = {
  /** Every request to the token endpoint, in order. */
  token_requests: [],
  /** Every request to /resource/..., in order. */
  resource_requests: [],
  dpop: { proofs_verified: 0, nonce_challenges: 0, rejected: 0 },
  /** Every access token the resource server was sent, in order. */
  tokens_seen: [],
};

// ---------------------------------------------------------------------------------------
// The authorization server.

const issuerServer = http.createServer();
const issuerTlsServer = https.createServer(serverTls);
const resourceServer = http.createServer();
const resourceTlsServer = https.createServer(serverTls);
const listen = (server) => new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(0, '127.0.0.1', () => resolve(server.address().port));
});
const [issuerPort, issuerTlsPort, resourcePort, resourceTlsPort] = await Promise.all(
  [issuerServer, issuerTlsServer, resourceServer, resourceTlsServer].map(listen),
);
const issuer = `http://127.0.0.1:${issuerPort}`;
const issuerTls = `https://127.0.0.1:${issuerTlsPort}`;
const resourceOrigin = `http://127.0.0.1:${resourcePort}`;
const resourceTlsOrigin = `https://127.0.0.1:${resourceTlsPort}`;

// The provider's own signing key (id tokens, JWT introspection: unused here, but required).
const signingKey = generate('rsa').privateKey;
const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [{ ...signingKey.export({ format: 'jwk' }), kid: 'issuer', alg: 'RS256', use: 'sig' }] },
  cookies: { keys: [randomSecret()] },
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt', 'tls_client_auth'],
  enabledJWA: {
    clientAuthSigningAlgValues: ['HS256', 'RS256', 'PS256', 'ES256', 'EdDSA'],
    dPoPSigningAlgValues: ['ES256', 'EdDSA'],
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    dPoP: {
      enabled: true,
      nonceSecret: crypto.randomBytes(32),
      requireNonce: () => true,
    },
    mTLS: {
      enabled: true,
      certificateBoundAccessTokens: true,
      tlsClientAuth: true,
      getCertificate: (ctx) => peerCertificate(ctx.socket),
      certificateAuthorized: (ctx) => ctx.socket.authorized === true,
      certificateSubjectMatches: (ctx, property, expected) => {
        const cert = peerCertificate(ctx.socket);
        return property === 'tls_client_auth_subject_dn' && !!cert && subjectDn(cert) === expected;
      },
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: (ctx, client, oneOf) => oneOf ?? RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, indicator) => {
        if (indicator !== RESOURCE) throw new errors.InvalidTarget(`unknown resource ${indicator}`);
        return {
          scope: RESOURCE_SCOPES,
          audience: RESOURCE,
          accessTokenTTL: TOKEN_TTL,
          accessTokenFormat: 'opaque',
        };
      },
    },
  },
  ttl: { ClientCredentials: TOKEN_TTL },
  // The claims of an exchanged token (the token-exchange grant below); none for the others.
  extraTokenClaims: (ctx, token) => token.exchangeClaims,
});

/**
 * The token-exchange grant: the subject token (and an actor token, if any) must be JWTs the
 * workload issuer signed for this server, verified with jose; the token issued is for the
 * resource, names the subject in `sub` and the actor in `act` (RFC 8693 §4.1), and both
 * appear in introspection.
 */
provider.registerGrantType(TOKEN_EXCHANGE, async (ctx, next) => {
  const { params, client } = ctx.oidc;
  const verify = async (token, type, what) => {
    if (type !== JWT_TOKEN_TYPE) throw new errors.InvalidRequest(`${what}_token_type must be ${JWT_TOKEN_TYPE}`);
    try {
      const { payload } = await jwtVerify(token, workloadKey.publicKey, { issuer: WORKLOAD_ISSUER, audience: issuer });
      return payload;
    } catch (error) {
      throw new errors.InvalidGrant(`${what}_token: ${error.code ?? error.message}`);
    }
  };
  const subject = await verify(params.subject_token, params.subject_token_type, 'subject');
  const actor = params.actor_token ? await verify(params.actor_token, params.actor_token_type, 'actor') : undefined;
  if (params.requested_token_type && params.requested_token_type !== 'urn:ietf:params:oauth:token-type:access_token') {
    throw new errors.InvalidRequest('only access tokens are issued');
  }
  const { ClientCredentials, ResourceServer } = ctx.oidc.provider;
  const token = new ClientCredentials({ client, scope: params.scope || undefined });
  token.resourceServer = new ResourceServer(RESOURCE, {
    scope: RESOURCE_SCOPES, audience: RESOURCE, accessTokenTTL: TOKEN_TTL, accessTokenFormat: 'opaque',
  });
  // Read by extraTokenClaims when the token is saved (an opaque token's `extra` is set there).
  token.exchangeClaims = { sub: subject.sub, ...(actor ? { act: { sub: actor.sub } } : {}) };
  ctx.body = {
    access_token: await token.save(),
    issued_token_type: 'urn:ietf:params:oauth:token-type:access_token',
    token_type: 'Bearer',
    expires_in: token.expiration,
    scope: token.scope || undefined,
  };
  await next();
}, ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type', 'requested_token_type', 'scope', 'audience', 'resource']);

/** A JWT of the workload issuer for `sub`, written to `name`: a subject or actor token. */
async function workloadToken(name, sub) {
  const jwt = await new SignJWT({})
    .setProtectedHeader({ alg: 'ES256', typ: 'JWT' })
    .setIssuer(WORKLOAD_ISSUER)
    .setSubject(sub)
    .setAudience(issuer)
    .setIssuedAt()
    .setExpirationTime('1h')
    .sign(workloadKey.privateKey);
  return writeFile(name, jwt);
}

/** Records each token request: who, how it authenticated, and how it was answered. */
provider.use(async (ctx, next) => {
  await next();
  if (ctx.oidc?.route !== 'token') return;
  const params = ctx.oidc.params ?? {};
  const record = {
    listener: ctx.socket.encrypted ? 'https' : 'http',
    status: ctx.status,
    client_id: ctx.oidc.client?.clientId ?? params.client_id ?? null,
    grant_type: params.grant_type ?? null,
    resource: params.resource ?? null,
    scope: params.scope ?? null,
    error: ctx.status >= 400 ? ctx.body?.error ?? null : null,
    error_description: ctx.status >= 400 ? ctx.body?.error_description ?? null : null,
    basic: /^basic /i.test(ctx.get('authorization')),
    client_secret: params.client_secret !== undefined,
    client_certificate: !!peerCertificate(ctx.socket),
    dpop: !!ctx.get('DPoP'),
    token_type: ctx.status === 200 ? ctx.body?.token_type ?? null : null,
  };
  if (typeof params.client_assertion === 'string') {
    try {
      const header = decodeProtectedHeader(params.client_assertion);
      const [, payload] = params.client_assertion.split('.');
      const claims = JSON.parse(Buffer.from(payload, 'base64url').toString());
      record.client_assertion = {
        alg: header.alg, kid: header.kid ?? null, typ: header.typ ?? null, x5t: header['x5t#S256'] ?? null, ...claims,
      };
    } catch {
      record.client_assertion = 'malformed';
    }
  }
  stats.token_requests.push(record);
});

// oidc-provider reads the certificate from the TLS socket here: no proxy in front of it.
const callback = provider.callback();
issuerServer.on('request', callback);
issuerTlsServer.on('request', callback);

// ---------------------------------------------------------------------------------------
// The resource server.

const introspectionEndpoint = `${issuer}/token/introspection`;

async function introspect(token) {
  const basic = Buffer.from(`${encodeURIComponent(introspector.client_id)}:${encodeURIComponent(introspector.client_secret)}`).toString('base64');
  const response = await fetch(introspectionEndpoint, {
    method: 'POST',
    headers: { authorization: `Basic ${basic}`, 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ token }).toString(),
  });
  if (response.status !== 200) {
    throw new Error(`introspection answered ${response.status}: ${await response.text()}`);
  }
  return response.json();
}

/** The resource server's own DPoP nonce (RFC 9449 §9), one for the server's life. */
const resourceNonce = randomSecret();
const seenJtis = new Set();

class Rejection extends Error {
  constructor(error, description, { scheme = 'Bearer', nonce = false } = {}) {
    super(description);
    this.error = error;
    this.scheme = scheme;
    this.nonce = nonce;
  }
}

/**
 * RFC 9449 §4.3 and §7.1: checks the DPoP proof sent with `token`, returning what it found.
 * `htu` is what the request's URL is here: this server's origin and the request path.
 */
async function verifyDpopProof(req, token, htu) {
  const fail = (error, description) => new Rejection(error, description, { scheme: 'DPoP' });
  // 1. Exactly one DPoP header.
  const headers = [];
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    if (req.rawHeaders[i].toLowerCase() === 'dpop') headers.push(req.rawHeaders[i + 1]);
  }
  if (headers.length !== 1) throw fail('invalid_dpop_proof', `${headers.length} DPoP headers`);
  const proof = headers[0];
  // 2.-6. A JWT, typ dpop+jwt, an asymmetric alg, signed by the public key in its jwk header.
  let header;
  let payload;
  try {
    ({ protectedHeader: header, payload } = await jwtVerify(proof, EmbeddedJWK, {
      typ: 'dpop+jwt',
      algorithms: DPOP_ALGS,
    }));
  } catch (err) {
    throw fail('invalid_dpop_proof', `proof does not verify: ${err.message}`);
  }
  if ('d' in header.jwk || 'k' in header.jwk) throw fail('invalid_dpop_proof', 'jwk is not a public key');
  // 7. htm.
  if (payload.htm !== req.method) throw fail('invalid_dpop_proof', `htm ${payload.htm} is not ${req.method}`);
  // 8. htu, ignoring query and fragment.
  let proofHtu;
  try {
    proofHtu = new URL(payload.htu);
  } catch {
    throw fail('invalid_dpop_proof', `htu ${JSON.stringify(payload.htu)} is not a URL`);
  }
  const htuHadQuery = proofHtu.search !== '' || proofHtu.hash !== '';
  proofHtu.search = '';
  proofHtu.hash = '';
  if (proofHtu.href !== new URL(htu).href) throw fail('invalid_dpop_proof', `htu ${payload.htu} is not ${htu}`);
  // 11. iat within the window.
  const now = Math.floor(Date.now() / 1000);
  if (typeof payload.iat !== 'number' || Math.abs(now - payload.iat) > DPOP_IAT_WINDOW) {
    throw fail('invalid_dpop_proof', `iat ${payload.iat} is not within ${DPOP_IAT_WINDOW}s of ${now}`);
  }
  // 12. ath.
  const ath = b64url(crypto.createHash('sha256').update(token).digest());
  if (payload.ath !== ath) throw fail('invalid_dpop_proof', `ath ${payload.ath} is not the token's hash ${ath}`);
  // §11.1: jti not seen before.
  if (typeof payload.jti !== 'string' || !payload.jti) throw fail('invalid_dpop_proof', 'no jti');
  // 9. The nonce this server gave out.
  if (payload.nonce !== resourceNonce) {
    throw new Rejection(
      'use_dpop_nonce',
      payload.nonce === undefined ? 'a DPoP nonce is required' : 'stale DPoP nonce',
      { scheme: 'DPoP', nonce: true },
    );
  }
  if (seenJtis.has(payload.jti)) throw fail('invalid_dpop_proof', `jti ${payload.jti} replayed`);
  seenJtis.add(payload.jti);
  const jkt = await calculateJwkThumbprint(header.jwk, 'sha256');
  return {
    alg: header.alg, jkt, htm: payload.htm, htu: payload.htu, htu_had_query: htuHadQuery, nonce: payload.nonce, jti: payload.jti,
  };
}

function send(res, status, body, headers = {}) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store', ...headers });
  res.end(JSON.stringify(body));
}

async function resource(req, res, origin) {
  const url = new URL(req.url, origin);
  const htu = `${origin}${url.pathname}`;
  const record = { method: req.method, path: url.pathname, listener: origin.startsWith('https') ? 'https' : 'http' };
  stats.resource_requests.push(record);
  const authorization = req.headers.authorization ?? '';
  const match = /^(\S+) +(\S+)$/.exec(authorization);
  const scheme = match?.[1].toLowerCase();
  record.scheme = match?.[1] ?? null;
  record.dpop_header = req.headers.dpop !== undefined;
  const checked = [];
  try {
    if (scheme !== 'bearer' && scheme !== 'dpop') {
      throw new Rejection('invalid_request', `no Bearer or DPoP access token (${authorization ? 'other scheme' : 'no Authorization'})`);
    }
    const token = match[2];
    stats.tokens_seen.push(token);
    let dpop;
    if (scheme === 'dpop') {
      try {
        dpop = await verifyDpopProof(req, token, htu);
      } catch (err) {
        if (err instanceof Rejection) {
          if (err.nonce) stats.dpop.nonce_challenges += 1;
          else stats.dpop.rejected += 1;
        }
        throw err;
      }
      checked.push('dpop_proof');
    } else if (req.headers.dpop !== undefined) {
      checked.push('dpop_header_ignored');
    }
    const introspection = await introspect(token);
    checked.push('introspection');
    if (introspection.active !== true) throw new Rejection('invalid_token', 'the token is not active', { scheme: match[1] });
    const audiences = [introspection.aud].flat();
    if (!audiences.includes(RESOURCE)) throw new Rejection('invalid_token', `aud ${JSON.stringify(introspection.aud)} is not ${RESOURCE}`);
    checked.push('audience');
    const cnf = introspection.cnf ?? {};
    if (scheme === 'bearer' && cnf.jkt) {
      throw new Rejection('invalid_token', 'a DPoP-bound token sent as a Bearer token');
    }
    if (scheme === 'dpop') {
      if (cnf.jkt !== dpop.jkt) {
        stats.dpop.rejected += 1;
        throw new Rejection('invalid_token', `cnf.jkt ${cnf.jkt} is not the proof key's thumbprint ${dpop.jkt}`, { scheme: 'DPoP' });
      }
      checked.push('cnf.jkt');
      stats.dpop.proofs_verified += 1;
    }
    let certificate;
    if (cnf['x5t#S256']) {
      const cert = peerCertificate(req.socket);
      if (!cert || !req.socket.authorized) {
        throw new Rejection('invalid_token', 'a certificate-bound token without a verified client certificate');
      }
      certificate = { x5t_s256: x5tS256(cert), subject_dn: subjectDn(cert) };
      if (certificate.x5t_s256 !== cnf['x5t#S256']) {
        throw new Rejection('invalid_token', `cnf x5t#S256 ${cnf['x5t#S256']} is not the client certificate's ${certificate.x5t_s256}`);
      }
      checked.push('cnf.x5t#S256');
    }
    record.status = 200;
    send(res, 200, {
      active: true,
      client_id: introspection.client_id,
      scope: introspection.scope ?? null,
      aud: introspection.aud,
      token_type: introspection.token_type ?? null,
      cnf: introspection.cnf ?? null,
      scheme: match[1],
      method: req.method,
      path: url.pathname,
      query: url.search,
      checked,
      dpop: dpop ?? null,
      certificate: certificate ?? null,
    });
  } catch (err) {
    if (!(err instanceof Rejection)) {
      record.status = 502;
      record.error = String(err?.message ?? err);
      send(res, 502, { error: 'resource_server_error', error_description: record.error });
      return;
    }
    record.status = 401;
    record.error = err.error;
    record.error_description = err.message;
    const headers = {
      'www-authenticate': `${err.scheme} error="${err.error}", error_description="${err.message.replace(/["\\]/g, "'")}"${err.scheme === 'DPoP' ? `, algs="${DPOP_ALGS.join(' ')}"` : ''}`,
    };
    if (err.nonce) headers['dpop-nonce'] = resourceNonce;
    send(res, 401, { error: err.error, error_description: err.message, checked }, headers);
  }
}

/** GET /assertion/CLIENT?aud=URL&lifetime=SECONDS: a fresh RFC 7523 client assertion. */
async function assertion(req, res, url) {
  const clientId = decodeURIComponent(url.pathname.slice('/assertion/'.length));
  const client = described[clientId];
  if (client?.method !== 'private_key_jwt') {
    send(res, 404, { error: `no private_key_jwt client ${clientId}` });
    return;
  }
  const key = crypto.createPrivateKey(fs.readFileSync(client.private_key_file));
  const lifetime = Number(url.searchParams.get('lifetime') ?? 300);
  const jwt = await new SignJWT({})
    .setProtectedHeader({ alg: client.alg, kid: client.key_id, typ: 'JWT' })
    .setIssuer(clientId)
    .setSubject(clientId)
    .setAudience(url.searchParams.get('aud') ?? `${issuer}/token`)
    .setJti(b64url(crypto.randomBytes(16)))
    .setIssuedAt()
    .setExpirationTime(Math.floor(Date.now() / 1000) + lifetime)
    .sign(key);
  res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'no-store' });
  res.end(jwt);
}

function resourceHandler(origin) {
  return (req, res) => {
    const url = new URL(req.url, origin);
    let work;
    if (url.pathname === '/resource' || url.pathname.startsWith('/resource/')) {
      work = resource(req, res, origin);
    } else if (req.method === 'GET' && url.pathname === '/stats') {
      work = Promise.resolve(send(res, 200, stats));
    } else if (req.method === 'GET' && url.pathname.startsWith('/assertion/')) {
      work = assertion(req, res, url);
    } else {
      work = Promise.resolve(send(res, 404, { error: 'not_found', path: url.pathname }));
    }
    work.catch((err) => {
      console.error(err);
      if (!res.headersSent) send(res, 500, { error: String(err?.message ?? err) });
    });
    // The body, if any, is not looked at.
    req.resume();
  };
}
resourceServer.on('request', resourceHandler(resourceOrigin));
resourceTlsServer.on('request', resourceHandler(resourceTlsOrigin));

// ---------------------------------------------------------------------------------------
// OUT.json, then the ready line.

const description = {
  issuer,
  token_endpoint: `${issuer}/token`,
  token_endpoint_https: `${issuerTls}/token`,
  introspection_endpoint: introspectionEndpoint,
  introspection_endpoint_https: `${issuerTls}/token/introspection`,
  resource_server: resourceOrigin,
  resource_server_https: resourceTlsOrigin,
  resource: RESOURCE,
  resource_scopes: RESOURCE_SCOPES,
  token_ttl: TOKEN_TTL,
  ca_file: caFile,
  tls_client: { cert_file: tlsClientCertFile, key_file: tlsClientKeyFile, subject_dn: TLS_CLIENT_SUBJECT_DN },
  dpop_resource_nonce_required: true,
  dpop_keys: Object.fromEntries(await Promise.all(Object.entries(dpopKeys).map(async ([alg, key]) => [alg, {
    alg,
    private_key_file: key.private_key_file,
    jkt: await calculateJwkThumbprint(key.public_jwk, 'sha256'),
  }]))),
  introspector: { client_id: introspector.client_id, client_secret: introspector.client_secret },
  token_exchange: {
    subject_token_file: await workloadToken('subject.jwt', 'workload:payments'),
    actor_token_file: await workloadToken('actor.jwt', 'agent:ledger'),
    forged_subject_token_file: writeFile('forged.jwt', await new SignJWT({}).setProtectedHeader({ alg: 'ES256' }).setIssuer(WORKLOAD_ISSUER).setSubject('workload:payments').setAudience(issuer).setExpirationTime('1h').sign(keys.es256.privateKey)),
  },
  clients: described,
};
const tmp = `${out}.tmp`;
fs.writeFileSync(tmp, `${JSON.stringify(description, null, 2)}\n`, { mode: 0o600 });
fs.renameSync(tmp, out);
console.log(`ready ${out}`);

if (!process.stdin.isTTY) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}

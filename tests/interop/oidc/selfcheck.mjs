// Checks server.mjs without bearerd: starts it, gets a token with every client as a client of
// its own would (assertions and DPoP proofs made here with jose), introspects each token, and
// sends the resource server right and wrong requests (DPoP proofs with a wrong htu, ath, key,
// nonce or a replayed jti; a certificate-bound token without its certificate).
//
//     cd tests/interop/oidc && npm ci && node selfcheck.mjs
//
// Prints one line per check and ends with "N passed, N failed"; exits 1 if any failed.
import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import * as os from 'node:os';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { fileURLToPath } from 'node:url';

import { SignJWT, calculateJwkThumbprint } from 'jose';

const here = path.dirname(fileURLToPath(import.meta.url));
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bearerd-oidc-selfcheck-'));
const out = path.join(dir, 'oidc.json');

// ---------------------------------------------------------------------------------------
// The server, until this script ends.

const server = spawn(process.execPath, [path.join(here, 'server.mjs'), out], {
  stdio: ['pipe', 'pipe', 'inherit'],
});
const stop = () => {
  if (server.exitCode === null) server.kill();
  fs.rmSync(dir, { recursive: true, force: true });
};
process.on('exit', stop);
await new Promise((resolve, reject) => {
  const lines = readline.createInterface({ input: server.stdout });
  lines.on('line', (line) => {
    if (line.startsWith('ready ')) resolve();
  });
  server.once('exit', (code) => reject(new Error(`server.mjs exited (${code}) before it was ready`)));
});
const conf = JSON.parse(fs.readFileSync(out, 'utf8'));
const ca = fs.readFileSync(conf.ca_file);
const tlsIdentity = { cert: fs.readFileSync(conf.tls_client.cert_file), key: fs.readFileSync(conf.tls_client.key_file) };

// ---------------------------------------------------------------------------------------
// Helpers.

let passed = 0;
let failed = 0;
async function check(name, fn) {
  try {
    await fn();
    passed += 1;
    console.log(`ok - ${name}`);
  } catch (err) {
    failed += 1;
    console.log(`FAILED - ${name}: ${err.stack ?? err}`);
  }
}
function expect(condition, what, detail) {
  if (!condition) throw new Error(`${what}${detail === undefined ? '' : `: ${JSON.stringify(detail)}`}`);
}

/** One HTTP(S) request; `tls` adds a client certificate. Resolves { status, headers, body, json }. */
function request(url, { method = 'GET', headers = {}, form, tls } = {}) {
  const target = new URL(url);
  const body = form ? new URLSearchParams(form).toString() : undefined;
  const allHeaders = { ...headers };
  if (body !== undefined) allHeaders['content-type'] = 'application/x-www-form-urlencoded';
  const options = { method, headers: allHeaders, agent: false };
  const module = target.protocol === 'https:' ? https : http;
  if (target.protocol === 'https:') Object.assign(options, { ca }, tls ?? {});
  return new Promise((resolve, reject) => {
    const req = module.request(target, options, (res) => {
      const chunks = [];
      res.on('data', (chunk) => chunks.push(chunk));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString();
        let json;
        try {
          json = JSON.parse(text);
        } catch {}
        resolve({ status: res.statusCode, headers: res.headers, body: text, json });
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

const basic = (id, secret) => `Basic ${Buffer.from(`${encodeURIComponent(id)}:${encodeURIComponent(secret)}`).toString('base64')}`;
const jti = () => crypto.randomBytes(16).toString('base64url');
const sha256 = (text) => crypto.createHash('sha256').update(text).digest('base64url');
const client = (id) => conf.clients[id];
const privateKey = (file) => crypto.createPrivateKey(fs.readFileSync(file));

/** An RFC 7523 client assertion for `id`: HS256 with its secret, or its private key. */
async function clientAssertion(id, { aud = conf.token_endpoint, alg, kid, key } = {}) {
  const c = client(id);
  const signingKey = key ?? (c.method === 'client_secret_jwt' ? new TextEncoder().encode(c.client_secret) : privateKey(c.private_key_file));
  return new SignJWT({})
    .setProtectedHeader({ alg: alg ?? c.alg, ...(kid ?? c.key_id ? { kid: kid ?? c.key_id } : {}) })
    .setIssuer(id)
    .setSubject(id)
    .setAudience(aud)
    .setJti(jti())
    .setIssuedAt()
    .setExpirationTime('60s')
    .sign(signingKey);
}

const tokenForm = (extra = {}) => ({
  grant_type: 'client_credentials', scope: 'api:read', resource: conf.resource, ...extra,
});

async function assertionToken(id, options = {}) {
  return request(options.url ?? conf.token_endpoint, {
    method: 'POST',
    form: tokenForm({
      client_id: id,
      client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
      client_assertion: options.assertion ?? await clientAssertion(id, options),
    }),
  });
}

async function introspect(token, url = conf.introspection_endpoint) {
  const answer = await request(url, {
    method: 'POST',
    headers: { authorization: basic(conf.introspector.client_id, conf.introspector.client_secret) },
    form: { token },
  });
  expect(answer.status === 200, 'introspection status', answer.body);
  return answer.json;
}

/** A granted token: 200, token_type, and introspection says active for `id` and the resource. */
async function expectToken(answer, id, tokenType = 'Bearer') {
  expect(answer.status === 200, 'token status', answer.body);
  expect(answer.json.token_type === tokenType, 'token_type', answer.json);
  expect(answer.json.expires_in === conf.token_ttl, 'expires_in', answer.json);
  expect(answer.json.scope === 'api:read', 'scope', answer.json);
  const info = await introspect(answer.json.access_token);
  expect(info.active === true && info.client_id === id && info.aud === conf.resource, 'introspection', info);
  return { token: answer.json.access_token, info };
}

function expectError(answer, status, error) {
  expect(answer.status === status && answer.json?.error === error, `expected ${status} ${error}`, { status: answer.status, body: answer.body });
}

const dpopKey = (alg) => privateKey(conf.dpop_keys[alg].private_key_file);
/** An RFC 9449 proof; `claims` overrides or adds (undefined removes). */
async function dpopProof(key, alg, claims, { typ = 'dpop+jwt' } = {}) {
  const jwk = crypto.createPublicKey(key).export({ format: 'jwk' });
  const payload = { jti: jti(), iat: Math.floor(Date.now() / 1000), ...claims };
  for (const [k, v] of Object.entries(payload)) if (v === undefined) delete payload[k];
  return new SignJWT(payload).setProtectedHeader({ alg, typ, jwk }).sign(key);
}

const stats = async () => (await request(`${conf.resource_server}/stats`)).json;
const resourceUrl = (p, origin = conf.resource_server) => `${origin}/resource${p}`;

// ---------------------------------------------------------------------------------------
// The token endpoint, one client-authentication method at a time.

const tokens = {};

for (const id of ['pkjwt-rs256', 'pkjwt-ps256', 'pkjwt-es256', 'pkjwt-eddsa']) {
  await check(`private_key_jwt ${client(id).alg}: token, active by introspection`, async () => {
    tokens[id] = await expectToken(await assertionToken(id), id);
  });
}
await check('private_key_jwt: assertion signed with the PKCS#1 RSA key file', async () => {
  const c = client('pkjwt-rs256');
  await expectToken(await assertionToken('pkjwt-rs256', { key: privateKey(c.private_key_pkcs1_file) }), 'pkjwt-rs256');
});
await check('private_key_jwt: no kid is fine (the key is found by alg)', async () => {
  const c = client('pkjwt-es256');
  const assertion = await new SignJWT({})
    .setProtectedHeader({ alg: 'ES256' })
    .setIssuer(c.client_id).setSubject(c.client_id).setAudience(conf.token_endpoint)
    .setJti(jti()).setIssuedAt().setExpirationTime('60s')
    .sign(privateKey(c.private_key_file));
  await expectToken(await assertionToken('pkjwt-es256', { assertion }), 'pkjwt-es256');
});
await check('private_key_jwt: aud = the issuer is accepted too', async () => {
  await expectToken(await assertionToken('pkjwt-es256', { aud: conf.issuer }), 'pkjwt-es256');
});
await check('private_key_jwt: the registered alg is enforced (RS256 for the PS256 client)', async () => {
  expectError(await assertionToken('pkjwt-ps256', { alg: 'RS256' }), 401, 'invalid_client');
});
await check('private_key_jwt: a wrong kid is invalid_client', async () => {
  expectError(await assertionToken('pkjwt-rs256', { kid: 'not-the-kid' }), 401, 'invalid_client');
});
await check('private_key_jwt: another client\'s key is invalid_client', async () => {
  expectError(await assertionToken('pkjwt-es256', { key: privateKey(client('assertion').private_key_file), kid: null }), 401, 'invalid_client');
});
await check('private_key_jwt: a wrong aud is invalid_client', async () => {
  expectError(await assertionToken('pkjwt-es256', { aud: 'https://elsewhere.test/token' }), 401, 'invalid_client');
});
await check('private_key_jwt: a replayed assertion is invalid_client', async () => {
  const assertion = await clientAssertion('pkjwt-es256');
  await expectToken(await assertionToken('pkjwt-es256', { assertion }), 'pkjwt-es256');
  expectError(await assertionToken('pkjwt-es256', { assertion }), 401, 'invalid_client');
});
await check('private_key_jwt over the HTTPS listener (aud = its token URL)', async () => {
  await expectToken(await assertionToken('pkjwt-rs256', { url: conf.token_endpoint_https, aud: conf.token_endpoint_https }), 'pkjwt-rs256');
});

await check('client_secret_jwt HS256: token, active by introspection', async () => {
  expect(Buffer.byteLength(client('secret-jwt').client_secret) >= 32, 'secret length');
  tokens['secret-jwt'] = await expectToken(await assertionToken('secret-jwt'), 'secret-jwt');
});
await check('client_secret_jwt: a wrong secret is invalid_client', async () => {
  expectError(await assertionToken('secret-jwt', { key: new TextEncoder().encode('x'.repeat(32)) }), 401, 'invalid_client');
});

await check('client_assertion_file: the /assertion helper\'s JWT gets a token', async () => {
  const answer = await request(`${conf.resource_server}/assertion/assertion`);
  expect(answer.status === 200 && answer.body.split('.').length === 3, 'assertion', answer.body);
  tokens.assertion = await expectToken(await assertionToken('assertion', { assertion: answer.body }), 'assertion');
});
await check('client_assertion_file: without client_id in the form (sub names the client)', async () => {
  const assertion = (await request(`${conf.resource_server}/assertion/assertion`)).body;
  const answer = await request(conf.token_endpoint, {
    method: 'POST',
    form: tokenForm({ client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer', client_assertion: assertion }),
  });
  await expectToken(answer, 'assertion');
});

await check('tls_client_auth over HTTPS with the client certificate: token, active', async () => {
  const answer = await request(conf.token_endpoint_https, { method: 'POST', form: tokenForm({ client_id: 'tls' }), tls: tlsIdentity });
  tokens.tls = await expectToken(answer, 'tls');
  expect(tokens.tls.info.cnf === undefined, 'not certificate-bound', tokens.tls.info);
});
await check('tls_client_auth without a certificate is invalid_client', async () => {
  expectError(await request(conf.token_endpoint_https, { method: 'POST', form: tokenForm({ client_id: 'tls' }) }), 401, 'invalid_client');
});
await check('tls_client_auth over plain HTTP is invalid_client', async () => {
  expectError(await request(conf.token_endpoint, { method: 'POST', form: tokenForm({ client_id: 'tls' }) }), 401, 'invalid_client');
});
await check('tls_client_auth, certificate-bound: cnf x5t#S256 is the certificate\'s', async () => {
  const answer = await request(conf.token_endpoint_https, { method: 'POST', form: tokenForm({ client_id: 'tls-bound' }), tls: tlsIdentity });
  tokens['tls-bound'] = await expectToken(answer, 'tls-bound');
  expect(tokens['tls-bound'].info.cnf?.['x5t#S256'] === client('tls-bound').x5t_s256, 'cnf', tokens['tls-bound'].info);
});

for (const id of ['basic', 'post']) {
  await check(`client_secret_${id}: token, active`, async () => {
    const c = client(id);
    const answer = await request(conf.token_endpoint, {
      method: 'POST',
      headers: id === 'basic' ? { authorization: basic(id, c.client_secret) } : {},
      form: tokenForm(id === 'post' ? { client_id: id, client_secret: c.client_secret } : {}),
    });
    tokens[id] = await expectToken(answer, id);
  });
}
await check('no resource parameter: the default resource is used', async () => {
  const answer = await request(conf.token_endpoint, {
    method: 'POST',
    headers: { authorization: basic('basic', client('basic').client_secret) },
    form: { grant_type: 'client_credentials', scope: 'api:read' },
  });
  await expectToken(answer, 'basic');
});

// DPoP at the token endpoint: a nonce is required.
let dpopToken;
for (const alg of ['ES256', 'EdDSA']) {
  await check(`DPoP ${alg} at the token endpoint: use_dpop_nonce, then a DPoP token bound to the key`, async () => {
    const key = dpopKey(alg);
    const c = client('dpop');
    const send = async (nonce) => request(conf.token_endpoint, {
      method: 'POST',
      headers: {
        authorization: basic('dpop', c.client_secret),
        dpop: await dpopProof(key, alg, { htm: 'POST', htu: conf.token_endpoint, nonce }),
      },
      form: tokenForm(),
    });
    const first = await send(undefined);
    expectError(first, 400, 'use_dpop_nonce');
    const nonce = first.headers['dpop-nonce'];
    expect(typeof nonce === 'string' && nonce.length > 0, 'DPoP-Nonce header', first.headers);
    const granted = await expectToken(await send(nonce), 'dpop', 'DPoP');
    expect(granted.info.cnf?.jkt === conf.dpop_keys[alg].jkt, 'cnf.jkt', granted.info);
    expect(granted.info.token_type === 'DPoP', 'introspected token_type', granted.info);
    if (alg === 'ES256') dpopToken = granted.token;
  });
}
await check('DPoP client without a proof is invalid_grant', async () => {
  const answer = await request(conf.token_endpoint, {
    method: 'POST', headers: { authorization: basic('dpop', client('dpop').client_secret) }, form: tokenForm(),
  });
  expectError(answer, 400, 'invalid_grant');
});

// ---------------------------------------------------------------------------------------
// The resource server.

for (const id of ['pkjwt-rs256', 'secret-jwt', 'basic']) {
  await check(`resource: Bearer token of ${id} is accepted`, async () => {
    const answer = await request(resourceUrl('/items?x=1'), { headers: { authorization: `Bearer ${tokens[id].token}` } });
    expect(answer.status === 200 && answer.json.client_id === id && answer.json.path === '/resource/items', 'answer', answer.json);
  });
}
await check('resource: no token is 401', async () => {
  expectError(await request(resourceUrl('/items')), 401, 'invalid_request');
});
await check('resource: an unknown token is 401 invalid_token', async () => {
  expectError(await request(resourceUrl('/items'), { headers: { authorization: 'Bearer nope' } }), 401, 'invalid_token');
});
await check('resource: certificate-bound token over plain HTTP is 401', async () => {
  expectError(await request(resourceUrl('/items'), { headers: { authorization: `Bearer ${tokens['tls-bound'].token}` } }), 401, 'invalid_token');
});
await check('resource: certificate-bound token over HTTPS without its certificate is 401', async () => {
  expectError(await request(resourceUrl('/items', conf.resource_server_https), { headers: { authorization: `Bearer ${tokens['tls-bound'].token}` } }), 401, 'invalid_token');
});
await check('resource: certificate-bound token over HTTPS with its certificate is accepted', async () => {
  const answer = await request(resourceUrl('/items', conf.resource_server_https), {
    headers: { authorization: `Bearer ${tokens['tls-bound'].token}` }, tls: tlsIdentity,
  });
  expect(answer.status === 200 && answer.json.checked.includes('cnf.x5t#S256'), 'answer', answer.json);
});

const dpopRequest = async (p, claims, { token = dpopToken, alg = 'ES256', key = dpopKey(alg), method = 'GET', scheme = 'DPoP', typ } = {}) => {
  const url = resourceUrl(p);
  const htu = url.split('?')[0];
  const proof = await dpopProof(key, alg, { htm: method, htu, ath: sha256(token), ...claims }, { typ });
  return request(url, { method, headers: { authorization: `${scheme} ${token}`, dpop: proof } });
};

let resourceNonce;
await check('resource: a DPoP proof without the nonce is 401 use_dpop_nonce with a DPoP-Nonce', async () => {
  const answer = await dpopRequest('/items', {});
  expectError(answer, 401, 'use_dpop_nonce');
  expect(/^DPoP error="use_dpop_nonce"/.test(answer.headers['www-authenticate']), 'WWW-Authenticate', answer.headers);
  resourceNonce = answer.headers['dpop-nonce'];
  expect(typeof resourceNonce === 'string', 'DPoP-Nonce', answer.headers);
});
await check('resource: a correct DPoP proof with the nonce is accepted, cnf.jkt matched', async () => {
  const before = (await stats()).dpop.proofs_verified;
  const answer = await dpopRequest('/items?page=2', { nonce: resourceNonce });
  expect(answer.status === 200, 'status', answer.body);
  expect(answer.json.checked.join() === 'dpop_proof,introspection,audience,cnf.jkt', 'checked', answer.json.checked);
  expect(answer.json.dpop.jkt === conf.dpop_keys.ES256.jkt, 'jkt', answer.json.dpop);
  expect((await stats()).dpop.proofs_verified === before + 1, 'proofs_verified counted');
});
await check('resource: POST with htm POST is accepted', async () => {
  const answer = await dpopRequest('/items', { nonce: resourceNonce }, { method: 'POST' });
  expect(answer.status === 200, 'status', answer.body);
});
const rejects = [
  ['a wrong htu (other path)', { htu: resourceUrl('/other') }],
  ['a wrong htu (other port)', { htu: 'http://127.0.0.1:1/resource/items' }],
  ['a wrong ath', { ath: sha256('another token') }],
  ['no ath', { ath: undefined }],
  ['a wrong htm', { htm: 'POST' }],
  ['an old iat', { iat: Math.floor(Date.now() / 1000) - 600 }],
];
for (const [what, claims] of rejects) {
  await check(`resource: a DPoP proof with ${what} is 401 invalid_dpop_proof`, async () => {
    expectError(await dpopRequest('/items', { nonce: resourceNonce, ...claims }), 401, 'invalid_dpop_proof');
  });
}
await check('resource: a DPoP proof with a stale nonce is 401 use_dpop_nonce', async () => {
  expectError(await dpopRequest('/items', { nonce: 'stale' }), 401, 'use_dpop_nonce');
});
await check('resource: a replayed jti is 401 invalid_dpop_proof', async () => {
  const claims = { nonce: resourceNonce, jti: jti() };
  expect((await dpopRequest('/items', claims)).status === 200, 'first use');
  expectError(await dpopRequest('/items', claims), 401, 'invalid_dpop_proof');
});
await check('resource: typ JWT instead of dpop+jwt is 401 invalid_dpop_proof', async () => {
  expectError(await dpopRequest('/items', { nonce: resourceNonce }, { typ: 'JWT' }), 401, 'invalid_dpop_proof');
});
await check('resource: a proof by another key is 401 invalid_token (cnf.jkt)', async () => {
  expectError(await dpopRequest('/items', { nonce: resourceNonce }, { alg: 'EdDSA' }), 401, 'invalid_token');
});
await check('resource: the DPoP token sent as Bearer is 401', async () => {
  expectError(await request(resourceUrl('/items'), { headers: { authorization: `Bearer ${dpopToken}` } }), 401, 'invalid_token');
});
await check('resource: /stats counts proofs, challenges and rejections', async () => {
  const s = await stats();
  expect(s.dpop.proofs_verified === 3, 'proofs_verified', s.dpop);
  expect(s.dpop.nonce_challenges === 2, 'nonce_challenges', s.dpop);
  expect(s.dpop.rejected === rejects.length + 3, 'rejected', s.dpop);
  const nonceAtToken = s.token_requests.filter((r) => r.error === 'use_dpop_nonce').length;
  expect(nonceAtToken === 2, 'token endpoint use_dpop_nonce count', s.token_requests);
  const thumb = await calculateJwkThumbprint(crypto.createPublicKey(dpopKey('EdDSA')).export({ format: 'jwk' }));
  expect(thumb === conf.dpop_keys.EdDSA.jkt, 'EdDSA jkt in OUT.json');
});

console.log(`${passed} passed, ${failed} failed`);
stop();
process.exit(failed ? 1 : 0);

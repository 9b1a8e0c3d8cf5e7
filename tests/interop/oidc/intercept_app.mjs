// A Node app behind bearerd's TLS interception (tests/interop/intercept.rs): undici's
// EnvHttpProxyAgent sends https:// requests through HTTPS_PROXY (Node 18 and 20 have no
// NODE_USE_ENV_PROXY), and NODE_EXTRA_CA_CERTS adds bearerd's CA to Node's roots. Prints what
// the upstream saw of one request, and whether a host without a route was refused.
import { EnvHttpProxyAgent, fetch, setGlobalDispatcher } from "undici";

setGlobalDispatcher(new EnvHttpProxyAgent());
const base = process.argv[2];
const response = await fetch(`${base}/v1/node?x=1`);
const seen = await response.json();
let refused = false;
try {
  await fetch("https://unrouted.example/");
} catch {
  refused = true;
}
console.log(JSON.stringify({ status: response.status, seen, refused }));

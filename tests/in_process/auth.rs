//! Client authentication without shared secrets, end to end through a sidecar: JWT assertions
//! checked by an in-process token endpoint with ring's verification, an assertion file, and
//! DPoP with nonces at the token endpoint and at the upstream, each proof checked as RFC 9449
//! §4.3 says. (The same against a real authorization server is in `interop_oidc.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::StatusCode;
use ring::signature::{self, KeyPair, UnparsedPublicKey};
use serde_json::{json, Value};
use support::config::{string, ConfigBuilder, Token, Upstream};
use support::{echo, get, json as answer, metric, serve, token_endpoint, token_ok, Sidecar};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

/// A compact JWS's header, claims, signed part and signature.
fn jws(text: &str) -> (Value, Value, String, Vec<u8>) {
    let parts: Vec<&str> = text.split('.').collect();
    assert_eq!(parts.len(), 3, "not a compact JWS: {text}");
    let decode = |s: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap();
    (
        decode(parts[0]),
        decode(parts[1]),
        format!("{}.{}", parts[0], parts[1]),
        URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
    )
}

/// The public key of a PKCS#8 EC P-256 fixture, as ring verifies with it.
fn ec_public_key(file: &str) -> Vec<u8> {
    let pem = std::fs::read_to_string(fixture(file)).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let rng = ring::rand::SystemRandom::new();
    signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec()
}

/// A sidecar in front of an echo upstream with the `[upstream.token]` of `token`.
async fn sidecar(token: Token, dir: tempfile::TempDir) -> (Sidecar, support::Server) {
    let upstream = serve(echo).await;
    let config = ConfigBuilder::new()
        .upstream(Upstream::new("api", &upstream.url("/v1")).token(token))
        .render();
    (Sidecar::start_in(dir, &config).await, upstream)
}

#[tokio::test]
async fn private_key_jwt_assertions_verify_with_the_clients_public_key() {
    let public = ec_public_key("ec-p256.pem");
    let endpoint = token_endpoint(move |_, request| {
        let public = public.clone();
        async move {
            let assertion = &request.form["client_assertion"];
            let (header, claims, signed, sig) = jws(assertion);
            assert_eq!(header["alg"], "ES256");
            assert_eq!(header["kid"], "key-2026");
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &public)
                .verify(signed.as_bytes(), &sig)
                .expect("the assertion verifies with the client's public key");
            assert_eq!(claims["iss"], "app");
            assert_eq!(claims["sub"], "app");
            let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
            token_ok(
                &format!("token-for-{}-{lifetime}", claims["aud"].as_str().unwrap()),
                3600,
            )
        }
    })
    .await;
    let token_url = endpoint.url("/oauth/token");
    let token = Token::new(&token_url, "app")
        .auth("private_key_jwt")
        .set(
            "private_key_file",
            string(fixture("ec-p256.pem").to_str().unwrap()),
        )
        .set("key_id", string("key-2026"))
        .set("assertion_lifetime", string("2m"));
    let (sidecar, _upstream) = sidecar(token, tempfile::tempdir().unwrap()).await;

    let answer = get(&sidecar.url("api", "/things")).await;
    assert_eq!(answer.status, StatusCode::OK);
    // aud defaults to the token endpoint's URL; the lifetime was set to 2 minutes.
    assert_eq!(
        answer.echo().header("authorization"),
        Some(format!("Bearer token-for-{token_url}-120").as_str())
    );
    let request = &endpoint.requests()[0];
    assert_eq!(request.form["client_id"], "app");
    assert_eq!(
        request.form["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    assert!(request.headers.get("authorization").is_none());
    assert!(!request.form.contains_key("client_secret"));
}

#[tokio::test]
async fn client_secret_jwt_is_an_hmac_of_the_secret_with_the_configured_audience() {
    const SECRET: &str = "a-client-secret-of-at-least-32-bytes";
    let endpoint = token_endpoint(|_, request| async move {
        let (header, claims, signed, sig) = jws(&request.form["client_assertion"]);
        assert_eq!(header["alg"], "HS256");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
        ring::hmac::verify(&key, signed.as_bytes(), &sig).expect("HMAC of the secret");
        assert_eq!(claims["aud"], "https://issuer.example/");
        token_ok("hmac-token", 3600)
    })
    .await;
    let token = Token::new(&endpoint.url("/token"), "app")
        .auth("client_secret_jwt")
        .secret(SECRET)
        .set("assertion_audience", string("https://issuer.example/"));
    let (sidecar, _upstream) = sidecar(token, tempfile::tempdir().unwrap()).await;
    let answer = get(&sidecar.url("api", "/x")).await;
    assert_eq!(
        answer.echo().header("authorization"),
        Some("Bearer hmac-token")
    );
    let request = &endpoint.requests()[0];
    assert!(!request.body.contains(SECRET), "{}", request.body);
}

#[tokio::test]
async fn an_assertion_file_is_sent_as_is_and_without_a_client_id_when_none_is_set() {
    let endpoint = token_endpoint(|_, _| async { token_ok("federated", 3600) }).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sa-token"),
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzYSJ9.c2ln\n",
    )
    .unwrap();
    let token = Token::empty()
        .url(&endpoint.url("/token"))
        .auth("client_assertion_file")
        .set("assertion_file", string("sa-token"))
        .scope("api://app/.default");
    let (sidecar, _upstream) = sidecar(token, dir).await;
    let answer = get(&sidecar.url("api", "/x")).await;
    assert_eq!(
        answer.echo().header("authorization"),
        Some("Bearer federated")
    );
    let request = &endpoint.requests()[0];
    assert_eq!(
        request.form["client_assertion"],
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzYSJ9.c2ln"
    );
    assert!(!request.form.contains_key("client_id"));
    assert_eq!(request.form["scope"], "api://app/.default");
}

/// What an upstream checking DPoP proofs (RFC 9449 §4.3, §7.1) saw.
#[derive(Default)]
struct Proofs {
    verified: usize,
    jtis: Vec<String>,
    thumbprints: Vec<String>,
}

/// Checks a proof as a resource server does; returns the JWK thumbprint, or why it fails.
fn check_proof(
    proof: &str,
    method: &str,
    htu: &str,
    token: &str,
    nonce: Option<&str>,
) -> Result<String, String> {
    let (header, claims, signed, sig) = jws(proof);
    if header["typ"] != "dpop+jwt" || header["alg"] != "ES256" {
        return Err(format!("header {header}"));
    }
    let jwk = &header["jwk"];
    if jwk.get("d").is_some() {
        return Err("the proof carries the private key".into());
    }
    let coordinate = |name: &str| URL_SAFE_NO_PAD.decode(jwk[name].as_str().unwrap()).unwrap();
    let point = [vec![4], coordinate("x"), coordinate("y")].concat();
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| "signature".to_owned())?;
    let ath = URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if claims["htm"] != method
        || claims["htu"] != htu
        || claims["ath"] != ath.as_str()
        || claims["iat"].as_u64().unwrap().abs_diff(now) > 60
    {
        return Err(format!("claims {claims}"));
    }
    if nonce.is_some_and(|n| claims["nonce"] != n) {
        return Err("use_dpop_nonce".into());
    }
    // RFC 7638 thumbprint: the required members in lexical order.
    let canonical = format!(
        r#"{{"crv":{},"kty":{},"x":{},"y":{}}}"#,
        jwk["crv"], jwk["kty"], jwk["x"], jwk["y"]
    );
    Ok(URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    )))
}

#[tokio::test]
async fn dpop_binds_tokens_and_proves_each_request_with_nonces_on_both_sides() {
    // The token endpoint wants a nonce first, then issues a DPoP token.
    let endpoint = token_endpoint(|n, request| async move {
        let proof = request.headers["dpop"].to_str().unwrap().to_owned();
        let (_, claims, _, _) = jws(&proof);
        assert_eq!(claims["htm"], "POST");
        assert!(claims.get("ath").is_none(), "no token yet");
        if n == 0 {
            assert!(claims.get("nonce").is_none());
            let mut response = answer(
                StatusCode::BAD_REQUEST,
                json!({"error": "use_dpop_nonce", "error_description": "nonce required"}),
            );
            response
                .headers_mut()
                .insert("dpop-nonce", "token-nonce-1".parse().unwrap());
            return response;
        }
        assert_eq!(claims["nonce"], "token-nonce-1");
        answer(
            StatusCode::OK,
            json!({"access_token": "bound-token", "token_type": "DPoP", "expires_in": 3600}),
        )
    })
    .await;
    // The upstream checks every proof and wants its own nonce.
    let proofs = Arc::new(Mutex::new(Proofs::default()));
    let seen = Arc::clone(&proofs);
    let upstream = serve(move |request: http::Request<hyper::body::Incoming>| {
        let seen = Arc::clone(&seen);
        async move {
            let addr = request.headers()["host"].to_str().unwrap().to_owned();
            let htu = format!("http://{addr}{}", request.uri().path());
            let authorization = request.headers()["authorization"].to_str().unwrap();
            let token = authorization.strip_prefix("DPoP ").expect("DPoP scheme");
            let proof = request.headers()["dpop"].to_str().unwrap();
            let checked = check_proof(
                proof,
                request.method().as_str(),
                &htu,
                token,
                Some("rs-nonce-7"),
            );
            let mut seen = seen.lock().unwrap();
            let (_, claims, _, _) = jws(proof);
            seen.jtis.push(claims["jti"].as_str().unwrap().to_owned());
            match checked {
                Ok(thumbprint) => {
                    seen.verified += 1;
                    seen.thumbprints.push(thumbprint);
                    answer(StatusCode::OK, json!({"ok": true}))
                }
                Err(why) if why == "use_dpop_nonce" => {
                    let mut response = answer(StatusCode::UNAUTHORIZED, json!({}));
                    response.headers_mut().insert(
                        "www-authenticate",
                        r#"DPoP error="use_dpop_nonce", error_description="nonce""#
                            .parse()
                            .unwrap(),
                    );
                    response
                        .headers_mut()
                        .insert("dpop-nonce", "rs-nonce-7".parse().unwrap());
                    response
                }
                Err(why) => panic!("bad proof: {why}"),
            }
        }
    })
    .await;
    let token = Token::new(&endpoint.url("/token"), "app")
        .secret("s3cret")
        .set("dpop", true);
    let config = ConfigBuilder::new()
        .upstream(Upstream::new("api", &upstream.url("/v1")).token(token))
        .render();
    let sidecar = Sidecar::start(&config).await;

    for path in ["/items?page=2", "/items/7"] {
        let answer = get(&sidecar.url("api", path)).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
    }
    let post = support::send(
        http::Request::post(sidecar.url("api", "/items"))
            .body(http_body_util::Full::new(bytes::Bytes::from("{}")))
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, StatusCode::OK);

    let proofs = proofs.lock().unwrap();
    // The first request was answered use_dpop_nonce and replayed; the rest carried it.
    assert_eq!(proofs.verified, 3);
    assert_eq!(proofs.jtis.len(), 4);
    let mut unique = proofs.jtis.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "every proof has its own jti");
    assert!(proofs
        .thumbprints
        .iter()
        .all(|t| *t == proofs.thumbprints[0]));
    assert_eq!(endpoint.count(), 2);

    let scrape = sidecar.running().metrics().render().unwrap();
    for (at, count) in [("token_endpoint", 1.0), ("upstream", 1.0)] {
        assert_eq!(
            metric(
                &scrape,
                &format!(r#"bearerd_dpop_nonce_retries_total{{at="{at}",upstream="api"}}"#)
            ),
            Some(count),
            "{scrape}"
        );
    }
    assert_eq!(
        metric(
            &scrape,
            r#"bearerd_token_source_info{auth="basic",dpop="true",upstream="api"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_bearer_token_where_dpop_was_asked_for_is_reported_not_sent() {
    let endpoint = token_endpoint(|_, _| async { token_ok("unbound", 3600) }).await;
    let token = Token::new(&endpoint.url("/token"), "app")
        .secret("s3cret")
        .set("dpop", true);
    let (sidecar, _upstream) = sidecar(token, tempfile::tempdir().unwrap()).await;
    let answer = get(&sidecar.url("api", "/x")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let detail = answer.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains("token_type is Bearer, not DPoP"),
        "{detail}"
    );
}

#[test]
fn each_method_asks_for_its_own_keys_only() {
    let check = |token: Token| {
        let text = ConfigBuilder::new()
            .upstream(Upstream::new("api", "https://api.example.com").token(token))
            .render();
        match bearerd::config::Config::parse(Path::new("/etc/bearerd.toml"), &text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let url = "https://auth.example.com/token";
    let cases = [
        (
            Token::new(url, "app").secret("s").set("private_key_file", string("k.pem")),
            "upstream[0].token.private_key_file: is not used by auth = \"basic\", only by private_key_jwt",
        ),
        (
            Token::new(url, "app").auth("private_key_jwt"),
            "upstream[0].token.private_key_file: missing: auth = \"private_key_jwt\" needs private_key_file",
        ),
        (
            Token::new(url, "app")
                .auth("private_key_jwt")
                .set("private_key_file", string("k.pem"))
                .secret("s"),
            "upstream[0].token.client_secret: is not used by auth = \"private_key_jwt\", only by basic, post, client_secret_jwt",
        ),
        (
            Token::new(url, "app")
                .auth("private_key_jwt")
                .set("private_key_file", string("k.pem"))
                .set("assertion_alg", string("HS256")),
            "upstream[0].token.assertion_alg: \"HS256\" is not one of RS256, PS256, ES256, EdDSA",
        ),
        (
            Token::empty().url(url).secret("s"),
            "upstream[0].token.client_id: missing: every method but client_assertion_file and none needs the client_id",
        ),
        (
            Token::new(url, "app").auth("tls_client_auth").set("cert_file", string("c.pem")),
            "upstream[0].token.key_file: missing: auth = \"tls_client_auth\" needs key_file",
        ),
        (
            Token::new(url, "app").secret("s").set("dpop_key_file", string("d.pem")),
            "upstream[0].token.dpop_key_file: is set but dpop is not true",
        ),
        (
            Token::new(url, "app").secret("s").set("dpop", true).set("dpop_alg", string("RS256")),
            "upstream[0].token.dpop_alg: \"RS256\" is not one of ES256, EdDSA",
        ),
    ];
    for (token, expected) in cases {
        let message = check(token);
        assert!(
            message.contains(expected),
            "expected {expected:?} in:\n{message}"
        );
    }
    // A method with all it needs is valid.
    assert_eq!(
        check(
            Token::new(url, "app")
                .auth("client_assertion_file")
                .set("assertion_file", string("/var/run/secrets/tokens/t"))
        ),
        ""
    );
}

#[test]
fn check_shows_key_kinds_and_fingerprints_never_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bearerd.toml");
    let token = Token::new("https://auth.example.com/token", "app")
        .auth("private_key_jwt")
        .set(
            "private_key_file",
            string(fixture("rsa-2048.pem").to_str().unwrap()),
        )
        .set("assertion_alg", string("PS256"))
        .set(
            "certificate_file",
            string(fixture("rsa-2048-cert.pem").to_str().unwrap()),
        )
        .set("dpop", true)
        .set(
            "dpop_key_file",
            string(fixture("ed25519.pem").to_str().unwrap()),
        );
    let text = ConfigBuilder::new()
        .upstream(Upstream::new("api", "https://api.example.com").token(token))
        .render();
    let config = bearerd::config::Config::parse(&path, &text).unwrap();
    let out = bearerd::check::check(&config).unwrap();
    assert!(
        out.contains("credentials: RSA 2048-bit key (PS256), public key SHA-256 "),
        "{out}"
    );
    assert!(out.contains("certificate x5t#S256 "), "{out}");
    assert!(
        out.contains(
            "dpop: Ed25519 key (EdDSA), JWK thumbprint (RFC 7638, the jkt of its tokens) "
        ),
        "{out}"
    );
    for key in ["rsa-2048.pem", "ed25519.pem"] {
        let pem = std::fs::read_to_string(fixture(key)).unwrap();
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!out.contains(line), "key material of {key} in:\n{out}");
        }
    }
}

/// A throwaway PKI: a CA, and leaf certificates it signs, written as PEM files.
struct Pki {
    ca_pem: String,
    ca_cert: rustls::pki_types::CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "bearerd auth test CA");
        let cert = params.self_signed(&key).unwrap();
        Self {
            ca_pem: cert.pem(),
            ca_cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names`, its certificate and PKCS#8 key written into `dir` as
    /// `<file>.pem` and `<file>-key.pem`; returns the certificate's SHA-256 (base64url).
    fn leaf(&self, names: &[&str], dir: &Path, file: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}-key.pem")), key.serialize_pem()).unwrap();
        URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, cert.der()))
    }
}

/// An HTTPS server on 127.0.0.1:0 that requires a client certificate signed by `pki`'s CA and
/// answers every request with `respond(client certificate's SHA-256, request)`.
async fn mtls_server<F>(pki: &Pki, dir: &Path, respond: F) -> std::net::SocketAddr
where
    F: Fn(String, &http::Request<hyper::body::Incoming>) -> http::Response<support::Body>
        + Send
        + Sync
        + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::pem::PemObject;
    pki.leaf(&["127.0.0.1"], dir, "server");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_cert.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from_pem_file(dir.join("server.pem")).unwrap()],
            rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("server-key.pem")).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, respond) = (acceptor.clone(), Arc::clone(&respond));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let client = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                let fingerprint =
                    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &client));
                let service = hyper::service::service_fn(move |request| {
                    let response = respond(fingerprint.clone(), &request);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn tls_client_auth_and_mtls_to_the_upstream_present_the_same_certificate() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let client = pki.leaf(&["bearerd-client"], dir.path(), "client");
    let token_endpoint = mtls_server(&pki, dir.path(), |presented, request| {
        assert_eq!(request.uri().path(), "/token");
        // RFC 8705 §2.1: the certificate is the credential; the token is bound to it.
        answer(
            StatusCode::OK,
            json!({"access_token": format!("bound-to-{presented}"), "token_type": "Bearer", "expires_in": 3600}),
        )
    })
    .await;
    let upstream = mtls_server(&pki, dir.path(), |presented, request| {
        let authorization = request.headers()["authorization"]
            .to_str()
            .unwrap()
            .to_owned();
        answer(
            StatusCode::OK,
            json!({"presented": presented, "authorization": authorization}),
        )
    })
    .await;
    let token = Token::new(&format!("https://{token_endpoint}/token"), "mtls-client")
        .auth("tls_client_auth")
        .set("cert_file", string("client.pem"))
        .set("key_file", string("client-key.pem"));
    let tls = support::config::Tls::new()
        .roots("none")
        .ca_file("ca.pem")
        .set("cert_file", string("client.pem"))
        .set("key_file", string("client-key.pem"));
    let config = ConfigBuilder::new()
        .upstream(
            Upstream::new("api", &format!("https://{upstream}"))
                .token(token)
                .tls(tls),
        )
        .render();
    let sidecar = Sidecar::start_in(dir, &config).await;
    let answer = get(&sidecar.url("api", "/x")).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let body = answer.json();
    assert_eq!(body["presented"], client.as_str());
    assert_eq!(body["authorization"], format!("Bearer bound-to-{client}"));
}

#[tokio::test]
async fn fetch_token_uses_the_configured_method_and_dpop() {
    let endpoint = token_endpoint(|_, request| async move {
        assert!(request.form.contains_key("client_assertion"));
        assert!(request.headers.contains_key("dpop"));
        answer(
            StatusCode::OK,
            json!({"access_token": "checked-token", "token_type": "DPoP", "expires_in": 600}),
        )
    })
    .await;
    let token = Token::new(&endpoint.url("/token"), "app")
        .auth("private_key_jwt")
        .set(
            "private_key_file",
            string(fixture("ed25519.pem").to_str().unwrap()),
        )
        .set("dpop", true);
    let text = ConfigBuilder::new()
        .upstream(Upstream::new("api", "https://api.example.com").token(token))
        .render();
    let config = bearerd::config::Config::parse(Path::new("/etc/bearerd.toml"), &text).unwrap();
    let out = bearerd::check::fetch_token(&config, "api", true)
        .await
        .unwrap();
    assert!(out.contains("token type: DPoP"), "{out}");
    assert!(out.contains("access token: checked-token"), "{out}");
    assert_eq!(endpoint.count(), 1);
}

//! The pure parts of on-behalf-of: taking the subject out of a request, its JWT expiry, the
//! bound it puts on a token, and which refusals are the subject's.

use super::*;
use http::HeaderValue;

fn settings(header: &'static str) -> OnBehalfOf {
    OnBehalfOf {
        header: HeaderName::from_static(header),
        max_subjects: 10,
    }
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, HeaderValue::from_static(value));
    }
    map
}

#[test]
fn the_subject_header_is_taken_out_and_bearer_stripped_in_any_case() {
    let mut map = headers(&[("x-subject", " abc.def "), ("accept", "*/*")]);
    let subject = take_subject(&mut map, &settings("x-subject")).unwrap();
    assert_eq!(subject.expose(), "abc.def");
    assert!(map.get("x-subject").is_none());
    assert!(map.get("accept").is_some());

    for value in ["Bearer tok", "bearer tok", "BEARER  tok"] {
        let mut map = HeaderMap::new();
        map.insert("authorization", HeaderValue::from_str(value).unwrap());
        let subject = take_subject(&mut map, &settings("authorization")).unwrap();
        assert_eq!(subject.expose(), "tok", "{value}");
        assert!(map.get("authorization").is_none());
    }
}

#[test]
fn a_missing_empty_repeated_or_non_bearer_subject_is_refused_and_still_removed() {
    let missing = |mut map: HeaderMap, header: &'static str| {
        let refused = take_subject(&mut map, &settings(header));
        assert!(map.get(header).is_none(), "the header is removed");
        match refused {
            Err(Refusal::Missing(reason)) => reason,
            other => panic!("{other:?}"),
        }
    };
    assert!(missing(headers(&[]), "x-subject").contains("no subject token"));
    assert!(missing(headers(&[("x-subject", "  ")]), "x-subject").contains("empty"));
    assert!(missing(
        headers(&[("x-subject", "a"), ("x-subject", "b")]),
        "x-subject"
    )
    .contains("more than once"));
    let basic = missing(
        headers(&[("authorization", "Basic dXNlcjpwYXNz")]),
        "authorization",
    );
    assert!(basic.contains("Bearer"), "{basic}");
    assert!(missing(headers(&[("authorization", "Bearer")]), "authorization").contains("Bearer"));
}

fn jwt(claims: &serde_json::Value) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.sig",
        b64(br#"{"alg":"RS256"}"#),
        b64(claims.to_string().as_bytes())
    )
}

#[test]
fn a_jwt_subject_gives_its_exp_and_anything_else_none() {
    assert_eq!(
        jwt_expiry(&jwt(&serde_json::json!({"exp": 2_000_000_000u64}))),
        Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000))
    );
    assert_eq!(jwt_expiry(&jwt(&serde_json::json!({"sub": "a"}))), None);
    assert_eq!(jwt_expiry(&jwt(&serde_json::json!({"exp": -5}))), None);
    assert_eq!(jwt_expiry(&jwt(&serde_json::json!({"exp": "soon"}))), None);
    assert_eq!(jwt_expiry("opaque-token"), None);
    assert_eq!(jwt_expiry("a.b.c.d.e"), None);
    assert_eq!(jwt_expiry("a.!!!.c"), None);
    // Beyond any clock: no bound, and no panic.
    assert_eq!(jwt_expiry(&jwt(&serde_json::json!({"exp": 1e300}))), None);
}

#[tokio::test]
async fn a_token_is_never_usable_past_the_subjects_expiry() {
    let mut token = Token::issue(
        "t",
        super::super::response::TokenType::Bearer,
        Duration::from_secs(3600),
        super::super::LifetimeSource::ExpiresIn,
        None,
    )
    .unwrap();
    let expires = SystemTime::now() + Duration::from_secs(60);
    bound(&mut token, expires);
    assert_eq!(token.expires_at, expires);
    assert_eq!(
        token.lifetime_source,
        super::super::LifetimeSource::SubjectExpiry
    );
    assert!(
        token.lifetime <= Duration::from_secs(61),
        "{:?}",
        token.lifetime
    );
    assert!(token.usable_until <= Instant::now() + Duration::from_secs(60));
    assert!(token.is_usable_at(Instant::now()));
    // A later expiry leaves the token's own.
    let mut long = Token::issue(
        "t",
        super::super::response::TokenType::Bearer,
        Duration::from_secs(60),
        super::super::LifetimeSource::ExpiresIn,
        None,
    )
    .unwrap();
    let (until, at) = (long.usable_until, long.expires_at);
    bound(&mut long, SystemTime::now() + Duration::from_secs(3600));
    assert_eq!((long.usable_until, long.expires_at), (until, at));
}

#[test]
fn refusals_about_the_client_are_not_blamed_on_the_subject() {
    use super::super::response::EndpointError;
    let rejected = |status: u16, code: Option<&str>| FetchError::Rejected {
        endpoint: "auth.example".into(),
        error: EndpointError {
            status: http::StatusCode::from_u16(status).unwrap(),
            error: code.map(str::to_owned),
            description: None,
        },
        retry_after: None,
    };
    assert!(is_about_the_subject(&rejected(400, Some("invalid_grant"))));
    assert!(is_about_the_subject(&rejected(
        400,
        Some("invalid_request")
    )));
    assert!(is_about_the_subject(&rejected(403, None)));
    assert!(!is_about_the_subject(&rejected(
        401,
        Some("invalid_client")
    )));
    assert!(!is_about_the_subject(&rejected(
        400,
        Some("invalid_client")
    )));
    assert!(!is_about_the_subject(&rejected(
        400,
        Some("unauthorized_client")
    )));
    assert!(!is_about_the_subject(&rejected(429, None)));
}

#[test]
fn a_subject_key_shows_its_fingerprint_only() {
    let subject = Secret::new("the-subject-token");
    let key = SubjectKey::of(&subject);
    assert_eq!(key.fingerprint(), audit::fingerprint("the-subject-token"));
    assert_eq!(key.fingerprint().len(), 16);
    assert_eq!(key.text().len(), 43);
    let debug = format!("{key:?}");
    assert!(!debug.contains("the-subject-token"));
    assert!(debug.contains(&key.fingerprint()));
}

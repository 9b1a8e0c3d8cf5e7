//! Tests of the token endpoint's answers: success, the vendors' error shapes, redaction.

use super::*;

fn none() -> Redactor {
    Redactor::new()
}

fn redacting(secret: &str) -> Redactor {
    let mut redactor = Redactor::new();
    redactor.add_client_secret("app", secret);
    redactor
}

fn jwt(claims: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("{}.{}.sig", b64(r#"{"alg":"RS256"}"#), b64(claims))
}

#[test]
fn success_per_rfc() {
    let grant = parse_success(
        br#"{"access_token":"abc","token_type":"Bearer","expires_in":3600,"scope":"read write"}"#,
        &none(),
    )
    .unwrap();
    assert_eq!(grant.access_token.expose(), "abc");
    assert_eq!(grant.expires_in, Some(Duration::from_secs(3600)));
    assert_eq!(grant.scope.as_deref(), Some("read write"));
}

#[test]
fn token_type_any_case_or_absent() {
    for body in [
        r#"{"access_token":"a","token_type":"bearer","expires_in":899}"#,
        r#"{"access_token":"a","token_type":"BEARER","expires_in":899}"#,
        r#"{"access_token":"a","expires_in":899}"#,
    ] {
        assert!(parse_success(body.as_bytes(), &none()).is_ok(), "{body}");
    }
    let err = parse_success(br#"{"access_token":"a","token_type":"mac"}"#, &none()).unwrap_err();
    assert!(err.reason.contains("\"mac\""), "{err}");
}

#[test]
fn expires_in_number_or_string() {
    let parse = |v: &str| {
        parse_success(
            format!(r#"{{"access_token":"a","expires_in":{v}}}"#).as_bytes(),
            &none(),
        )
        .map(|g| g.expires_in)
    };
    assert_eq!(parse("86400"), Ok(Some(Duration::from_secs(86400))));
    assert_eq!(parse(r#""3600""#), Ok(Some(Duration::from_secs(3600))));
    assert_eq!(parse("59.9"), Ok(Some(Duration::from_secs(59))));
    assert_eq!(parse("null"), Ok(None));
    assert!(parse("0").is_err());
    assert!(parse("-5").is_err());
    assert!(parse(r#""soon""#).is_err());
}

#[test]
fn missing_token_quotes_the_error_not_the_body() {
    let err = parse_success(
        br#"{"error":"invalid_scope","error_description":"bad"}"#,
        &none(),
    )
    .unwrap_err();
    assert_eq!(err.reason, "no access_token");
    assert_eq!(
        err.to_string(),
        r#"no access_token; the body says "invalid_scope": bad"#
    );
    let err = parse_success(b"access_token=s3cr3t&token_type=bearer", &none()).unwrap_err();
    assert!(!err.to_string().contains("s3cr3t"), "{err}");
}

#[test]
fn jwt_exp_gives_the_lifetime() {
    let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
    let token = jwt(r#"{"sub":"app","exp":1003600}"#);
    assert_eq!(
        jwt_lifetime(&token, now),
        Some(Ok(Duration::from_secs(3600)))
    );
    assert!(matches!(
        jwt_lifetime(&jwt(r#"{"exp":999999}"#), now),
        Some(Err(_))
    ));
    assert_eq!(jwt_lifetime(&jwt(r#"{"sub":"no exp"}"#), now), None);
    assert_eq!(jwt_lifetime("opaque-token", now), None);
    assert_eq!(jwt_lifetime("a.%%%.c", now), None);
}

#[test]
fn rfc_error_shape() {
    let e = parse_error(
        StatusCode::UNAUTHORIZED,
        br#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
        &none(),
    );
    assert_eq!(e.error.as_deref(), Some("invalid_client"));
    assert_eq!(
        e.to_string(),
        r#"status 401 Unauthorized, error "invalid_client": Client authentication failed"#
    );
}

#[test]
fn vendor_error_shapes() {
    // USM Anywhere
    let e = parse_error(
        StatusCode::UNAUTHORIZED,
        br#"{"result":"Unauthorized","location":"/api/2.0/oauth/token","error":"Bad credentials"}"#,
        &none(),
    );
    assert_eq!(e.error.as_deref(), Some("Bad credentials"));
    assert_eq!(
        e.description.as_deref(),
        Some("Unauthorized; at /api/2.0/oauth/token")
    );
    // Alternative Payments 403: a flat string map.
    let e = parse_error(
        StatusCode::FORBIDDEN,
        br#"{"code":"forbidden","detail":"Invalid credentials"}"#,
        &none(),
    );
    assert_eq!(e.error, None);
    assert_eq!(
        e.description.as_deref(),
        Some("code: forbidden; detail: Invalid credentials")
    );
    // IBM Watson Work
    let e = parse_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        br#"{"error":"server_error","message":"Try later","status":"500","path":"/oauth/token"}"#,
        &none(),
    );
    assert_eq!(e.error.as_deref(), Some("server_error"));
    assert_eq!(e.description.as_deref(), Some("Try later"));
}

#[test]
fn non_json_error_is_excerpted_and_scrubbed() {
    let body = format!(
        "<html>\n<body>Bad gateway for pw=hunter2 or h%40ck {}</body>",
        "x".repeat(500)
    );
    let e = parse_error(
        StatusCode::BAD_GATEWAY,
        body.as_bytes(),
        &redacting("hunter2"),
    );
    let description = e.description.unwrap();
    assert!(
        description.starts_with("body: <html> <body>Bad gateway"),
        "{description}"
    );
    assert!(description.contains("[redacted]"));
    assert!(!description.contains("hunter2"));
    let e = parse_error(StatusCode::BAD_GATEWAY, body.as_bytes(), &redacting("h@ck"));
    assert!(!e.description.unwrap().contains("h%40ck"));
    assert!(description.chars().count() <= EXCERPT_CHARS + 1);
    assert_eq!(
        parse_error(StatusCode::BAD_GATEWAY, b"", &none())
            .description
            .as_deref(),
        Some("(empty body)")
    );
}

#[test]
fn an_echoed_request_leaves_no_secret_in_what_is_quoted() {
    let redactor = redacting("s3cr3t pw");
    let basic = base64::engine::general_purpose::STANDARD.encode("app:s3cr3t+pw");
    // A 200 without a token, echoing the request: form body and Basic header.
    let body = format!(
        r#"{{"error":"invalid_request","error_description":"got client_secret=s3cr3t+pw and Basic {basic}"}}"#
    );
    let err = parse_success(body.as_bytes(), &redactor).unwrap_err();
    let shown = err.to_string();
    assert!(!redactor.finds_in(&shown), "{shown}");
    assert!(shown.contains("[redacted]"), "{shown}");
    // The same as an error body, and as a `Location`-style percent-encoded echo.
    let escaped = basic.replace('=', "%3D").replace('+', "%2B");
    let e = parse_error(
        StatusCode::BAD_REQUEST,
        format!("echo: Basic {basic} /x?a={escaped}").as_bytes(),
        &redactor,
    );
    assert!(!redactor.finds_in(&e.to_string()), "{e}");
}

#[test]
fn only_a_well_formed_error_code_is_offered_to_the_app() {
    let code = |error: &str| {
        let body = serde_json::json!({ "error": error }).to_string();
        parse_error(
            StatusCode::BAD_REQUEST,
            body.as_bytes(),
            &redacting("s3cr3t"),
        )
        .code()
        .map(str::to_owned)
    };
    assert_eq!(code("invalid_client").as_deref(), Some("invalid_client"));
    assert_eq!(code("Bad credentials").as_deref(), Some("Bad credentials"));
    assert_eq!(code("leaked s3cr3t"), None);
    assert_eq!(code("line\nbreak"), None);
    assert_eq!(code(&"x".repeat(65)), None);
    assert_eq!(code("<script>\"</script>"), None);
}

#[test]
fn absurd_lifetimes_parse_without_overflow() {
    for v in ["1e300", "10000000000000000000", "\"18446744073709551615\""] {
        let body = format!(r#"{{"access_token":"a","expires_in":{v}}}"#);
        let grant = parse_success(body.as_bytes(), &none()).unwrap();
        assert!(
            grant.expires_in.unwrap() > Duration::from_secs(1 << 40),
            "{v}"
        );
    }
    let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
    for exp in ["1e300", "18446744073709551615"] {
        let token = jwt(&format!(r#"{{"exp":{exp}}}"#));
        assert!(matches!(jwt_lifetime(&token, now), Some(Ok(_))), "{exp}");
    }
}

//! Tests of each grant's form fields: what a request carries, that what it sends is taught to
//! the redactor, and what audit events and `--check` say of it.

use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::config::{ActorToken, ClientAuth, RefreshToken, TokenExchange};

fn run<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

fn settings(grant: Grant) -> TokenSettings {
    TokenSettings {
        grant,
        ..TokenSettings::for_tests(ClientAuth::None)
    }
}

fn fields_of(
    settings: &TokenSettings,
    redactor: &mut Redactor,
    refresh: Option<&Secret>,
) -> Result<Vec<(&'static str, String)>, CredentialError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let fields = run(fields(settings, redactor, deadline, refresh, None))?;
    Ok(fields
        .into_iter()
        .map(|(name, value)| (name, value.expose().to_owned()))
        .collect())
}

fn exchange(dir: &tempfile::TempDir) -> TokenSettings {
    std::fs::write(dir.path().join("subject"), "subject.jwt.token\n").unwrap();
    std::fs::write(dir.path().join("actor"), "actor-token").unwrap();
    settings(Grant::TokenExchange(TokenExchange {
        subject: crate::config::SubjectFrom::File(dir.path().join("subject")),
        subject_token_type: DEFAULT_SUBJECT.into(),
        actor: Some(ActorToken {
            file: dir.path().join("actor"),
            token_type: "urn:ietf:params:oauth:token-type:access_token".into(),
        }),
        requested_token_type: None,
    }))
}

const DEFAULT_SUBJECT: &str = "urn:ietf:params:oauth:token-type:jwt";

#[test]
fn token_exchange_fields_are_sent_and_redacted_in_any_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let settings = exchange(&dir);
    let mut redactor = Redactor::new();
    let fields = fields_of(&settings, &mut redactor, None).unwrap();
    assert_eq!(
        fields,
        vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange".into()
            ),
            ("subject_token", "subject.jwt.token".into()),
            ("subject_token_type", DEFAULT_SUBJECT.into()),
            ("actor_token", "actor-token".into()),
            (
                "actor_token_type",
                "urn:ietf:params:oauth:token-type:access_token".into()
            ),
        ]
    );
    // An endpoint echoing the request, form-encoded or quoted in JSON, leaks nothing.
    let echoed = "subject_token=subject.jwt.token&actor_token=actor-token";
    let redacted = redactor.redact(echoed);
    assert!(!redacted.contains("subject.jwt.token"), "{redacted}");
    assert!(!redacted.contains("actor-token"), "{redacted}");
}

#[test]
fn an_empty_subject_token_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let settings = exchange(&dir);
    std::fs::write(dir.path().join("subject"), "\n").unwrap();
    let error = fields_of(&settings, &mut Redactor::new(), None).unwrap_err();
    assert!(error.to_string().contains("is empty"), "{error}");
    assert!(error.to_string().contains("subject"), "{error}");
}

#[test]
fn refresh_token_fields_spend_the_token_held() {
    let settings = settings(Grant::RefreshToken(RefreshToken {
        file: PathBuf::from("/nonexistent"),
    }));
    let mut redactor = Redactor::new();
    let held = Secret::new("rt-held");
    let fields = fields_of(&settings, &mut redactor, Some(&held)).unwrap();
    assert_eq!(
        fields,
        vec![
            ("grant_type", "refresh_token".into()),
            ("refresh_token", "rt-held".into())
        ]
    );
    assert!(!redactor.redact("rt-held").contains("rt-held"));
}

#[test]
fn a_service_account_key_is_never_shown() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/google/service-account.json");
    let key = ServiceAccountKey::read(&path).unwrap();
    let shown = format!("{key:?}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(shown.contains("bearerd-test@bearerd-tests.iam.gserviceaccount.com"));
    // A file that is not a key is described, not quoted.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("sa.json");
    std::fs::write(
        &broken,
        r#"{"private_key": "-----BEGIN PRIVATE KEY-----secret"}"#,
    )
    .unwrap();
    let error = ServiceAccountKey::read(&broken).unwrap_err();
    assert!(!error.contains("secret"), "{error}");
    assert!(error.contains("a field is missing"), "{error}");
}

#[test]
fn audit_events_and_check_name_the_grant() {
    let dir = tempfile::tempdir().unwrap();
    let settings = exchange(&dir);
    assert_eq!(
        crate::token::audit::Describe::of(&settings).grant,
        "token_exchange"
    );
    assert_eq!(
        check(&settings),
        Some(Ok("subject token readable".to_owned()))
    );
    assert!(describe(&settings).starts_with("grant token_exchange"));
    assert!(!describe(&settings).contains("subject.jwt.token"));
}

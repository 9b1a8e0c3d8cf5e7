//! The recipes of `docs/vendors.md`, each run against its vendor's fixture: the recipe's token
//! path, client authentication and parameters must be what the vendor documents, or the
//! fixture refuses the token request and the test fails.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::collections::BTreeMap;
use std::path::Path;

use support::vendors::{self, ID, SECRET};
use support::{echo, get, serve, token_endpoint, Sidecar};

/// The TOML blocks of `docs/vendors.md`, each after a `<!-- recipe: NAME -->` line.
fn recipes() -> BTreeMap<String, String> {
    blocks("<!-- recipe: ")
}

/// The same for `<!-- recipe-unchecked: NAME -->`: recipes no fixture runs, for vendors whose
/// servers cannot be played here; they must at least load as written.
fn unchecked_recipes() -> BTreeMap<String, String> {
    blocks("<!-- recipe-unchecked: ")
}

fn blocks(marker: &str) -> BTreeMap<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/vendors.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut recipes = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .strip_prefix(marker)
            .and_then(|rest| rest.strip_suffix(" -->"))
        else {
            continue;
        };
        assert_eq!(
            lines.next(),
            Some("```toml"),
            "recipe {name} must be a toml block"
        );
        let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        recipes.insert(name.to_owned(), block.join("\n") + "\n");
    }
    recipes
}

#[test]
fn recipes_without_a_client_secret_load_as_written() {
    let recipes = unchecked_recipes();
    assert_eq!(
        recipes.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "auth0-private-key-jwt",
            "entra-workload-identity",
            "keycloak-signed-jwt",
            "keycloak-signed-jwt-client-secret",
            "okta-private-key-jwt",
        ]
    );
    for (name, recipe) in &recipes {
        bearerd::config::Config::parse(Path::new("recipe.toml"), recipe)
            .unwrap_or_else(|e| panic!("recipe {name}: {e}"));
    }
}

#[test]
fn every_vendor_has_a_recipe_that_loads_as_written() {
    let recipes = recipes();
    assert_eq!(
        recipes.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "alternative-payments",
            "auth0",
            "ibm-watson-work",
            "standard-metrics",
            "usm-anywhere"
        ]
    );
    for (name, recipe) in &recipes {
        bearerd::config::Config::parse(Path::new("recipe.toml"), recipe)
            .unwrap_or_else(|e| panic!("recipe {name}: {e}"));
    }
}

/// Runs `recipe` with its token URL's host pointed at `endpoint` (the path kept), its secret
/// and client id swapped for the fixture's, and an echo upstream; returns the
/// `Authorization` the upstream saw.
async fn run(recipe: &str, endpoint: &support::TokenEndpoint) -> String {
    let mut config: toml::Table = recipe.parse().unwrap();
    let upstream = serve(echo).await;
    {
        let entry = config["upstream"].as_array_mut().unwrap()[0]
            .as_table_mut()
            .unwrap();
        entry.insert("listen".into(), "127.0.0.1:0".into());
        entry.insert("url".into(), upstream.url("/api").into());
        let token = entry["token"].as_table_mut().unwrap();
        let original: http::Uri = token["url"].as_str().unwrap().parse().unwrap();
        token.insert("url".into(), endpoint.url(original.path()).into());
        token.insert("client_id".into(), ID.into());
        token.insert("client_secret_file".into(), "secret".into());
    }
    let mut admin = toml::Table::new();
    admin.insert("listen".into(), "127.0.0.1:0".into());
    config.insert("admin".into(), admin.into());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).unwrap();
    let name = config["upstream"][0]["name"].as_str().unwrap().to_owned();
    let sidecar = Sidecar::start_in(dir, &toml::to_string(&config).unwrap()).await;
    let echoed = get(&sidecar.url(&name, "/x")).await.echo();
    sidecar.stop().await;
    echoed.header("authorization").unwrap().to_owned()
}

#[tokio::test]
async fn usm_anywhere_recipe() {
    let endpoint = token_endpoint(vendors::usm_anywhere).await;
    assert_eq!(
        run(&recipes()["usm-anywhere"], &endpoint).await,
        "Bearer xxx.yyy.zzz"
    );
}

#[tokio::test]
async fn auth0_recipe() {
    let endpoint = token_endpoint(vendors::auth0).await;
    assert_eq!(
        run(&recipes()["auth0"], &endpoint).await,
        "Bearer eyJz93a.k4laUWw."
    );
}

#[tokio::test]
async fn alternative_payments_recipe() {
    let endpoint = token_endpoint(vendors::alternative_payments).await;
    assert_eq!(
        run(&recipes()["alternative-payments"], &endpoint).await,
        "Bearer 580defdbe1d21e0001c67e5c2a0a6c98ba8b4a059dc5825388501574"
    );
}

#[tokio::test]
async fn ibm_watson_work_recipe() {
    let endpoint = token_endpoint(vendors::ibm_watson_work(false)).await;
    assert!(run(&recipes()["ibm-watson-work"], &endpoint)
        .await
        .starts_with("Bearer eyJ"));
}

#[tokio::test]
async fn standard_metrics_recipe() {
    let endpoint = token_endpoint(vendors::standard_metrics).await;
    assert_eq!(
        run(&recipes()["standard-metrics"], &endpoint).await,
        "Bearer ACCESS_TOKEN"
    );
}

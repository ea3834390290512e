//! The crates keep to the hexagon: the core (domain and pipeline logic) depends on no AWS,
//! Lambda or HTTP-client crate, and the fuzz crate builds without the AWS SDK. Read from
//! `cargo metadata`'s resolved graph, so a dependency arriving indirectly counts too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

/// Crates the core must not reach: the AWS SDK and its runtime, Lambda, an HTTP client.
fn forbidden_in_core(name: &str) -> bool {
    name.starts_with("aws-")
        || name.starts_with("aws_")
        || name.starts_with("lambda_")
        || name.starts_with("lambda-")
        || name == "reqwest"
        || name == "hyper"
}

/// The resolved graph of the workspace at `manifest`: package id → (name, normal
/// dependencies' ids), and the id of each package by name.
struct Graph {
    nodes: BTreeMap<String, (String, Vec<String>)>,
    ids: BTreeMap<String, String>,
}

impl Graph {
    fn load(manifest: &Path) -> anyhow::Result<Self> {
        let output = std::process::Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1", "--manifest-path"])
            .arg(manifest)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let metadata: Value = serde_json::from_slice(&output.stdout)?;
        let mut names = BTreeMap::new();
        for package in metadata["packages"].as_array().into_iter().flatten() {
            if let (Some(id), Some(name)) = (package["id"].as_str(), package["name"].as_str()) {
                names.insert(id.to_owned(), name.to_owned());
            }
        }
        let mut nodes = BTreeMap::new();
        let mut ids = BTreeMap::new();
        for node in metadata["resolve"]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(id) = node["id"].as_str() else {
                continue;
            };
            // Normal (and build-script) dependencies only: dev-dependencies are not linked
            // into the crate, and tests may use anything.
            let deps = node["deps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|dep| {
                    dep["dep_kinds"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|kind| kind["kind"].as_str() != Some("dev"))
                })
                .filter_map(|dep| dep["pkg"].as_str().map(str::to_owned))
                .collect();
            let name = names.get(id).cloned().unwrap_or_default();
            ids.insert(name.clone(), id.to_owned());
            nodes.insert(id.to_owned(), (name, deps));
        }
        Ok(Self { nodes, ids })
    }

    /// Every package `name` depends on, directly or not, by name.
    fn reachable_from(&self, name: &str) -> anyhow::Result<BTreeSet<String>> {
        let start = self
            .ids
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("{name} is not in the graph"))?;
        let mut seen = BTreeSet::new();
        let mut stack = vec![start.clone()];
        let mut names = BTreeSet::new();
        while let Some(id) = stack.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some((dep_name, deps)) = self.nodes.get(&id) {
                if id != *start {
                    names.insert(dep_name.clone());
                }
                stack.extend(deps.iter().cloned());
            }
        }
        Ok(names)
    }
}

fn workspace() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn the_core_depends_on_no_aws_lambda_or_http_client_crate() -> anyhow::Result<()> {
    let graph = Graph::load(&workspace().join("Cargo.toml"))?;
    let reached = graph.reachable_from("shotlabel-core")?;
    let bad: Vec<&String> = reached.iter().filter(|n| forbidden_in_core(n)).collect();
    assert!(bad.is_empty(), "shotlabel-core reaches {bad:?}");
    // The check can fail: the adapters do reach what the core must not.
    let aws = graph.reachable_from("shotlabel-aws")?;
    assert!(aws.contains("aws-sdk-s3"), "the graph is read correctly");
    let client = graph.reachable_from("shotlabel-batch-client")?;
    assert!(client.contains("reqwest"));
    Ok(())
}

#[test]
fn the_fuzz_crate_builds_without_the_aws_sdk() -> anyhow::Result<()> {
    let graph = Graph::load(&workspace().join("fuzz/Cargo.toml"))?;
    let reached = graph.reachable_from("shotlabel-fuzz")?;
    let sdk: Vec<&String> = reached
        .iter()
        .filter(|n| n.starts_with("aws-sdk-") || n.starts_with("aws-smithy") || *n == "aws-config")
        .collect();
    assert!(sdk.is_empty(), "the fuzz crate reaches {sdk:?}");
    assert!(reached.contains("shotlabel-core"));
    Ok(())
}

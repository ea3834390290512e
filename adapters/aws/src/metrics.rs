//! Metrics in CloudWatch Embedded Metric Format: one JSON line on stdout per invocation,
//! which CloudWatch Logs turns into metrics without an API call or an agent.

use serde_json::{Map, Value, json};
use shotlabel_core::metrics::Counts;

/// The CloudWatch namespace every shotlabel metric is published in.
pub const NAMESPACE: &str = "shotlabel";

/// The EMF document for one invocation of `function`, at `timestamp_ms`.
pub fn emf_document(function: &str, counts: &Counts, timestamp_ms: u64) -> Value {
    let named = counts.named();
    let definitions: Vec<Value> = named
        .iter()
        .map(|(name, _)| json!({"Name": name, "Unit": if *name == "TokensUsed" { "None" } else { "Count" }}))
        .collect();
    let mut document = Map::new();
    document.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [["Function"]],
                "Metrics": definitions,
            }],
        }),
    );
    document.insert("Function".into(), json!(function));
    for (name, value) in named {
        document.insert(name.into(), json!(value));
    }
    Value::Object(document)
}

/// Prints the invocation's metrics as one EMF line on stdout (the Lambda log stream).
/// Outside Lambda (the local pipeline, tests) there is no log stream to turn them into
/// metrics, so nothing is printed.
pub fn emit(function: &str, counts: &Counts) {
    if std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_none() {
        return;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    println!("{}", emf_document(function, counts, now_ms));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_declares_every_metric_it_carries() {
        let counts = Counts {
            images_labelled: 7,
            tokens_used: 1234,
            ..Counts::default()
        };
        let doc = emf_document("webhook", &counts, 1_700_000_000_000);
        let spec = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(spec["Namespace"], NAMESPACE);
        assert_eq!(spec["Dimensions"], json!([["Function"]]));
        assert_eq!(doc["_aws"]["Timestamp"], 1_700_000_000_000u64);
        assert_eq!(doc["Function"], "webhook");
        let declared: Vec<&str> = spec["Metrics"]
            .as_array()
            .map(|m| m.iter().filter_map(|d| d["Name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(declared.len(), 8);
        for name in declared {
            assert!(doc[name].is_u64(), "{name} has a value");
        }
        assert_eq!(doc["ImagesLabelled"], 7);
        assert_eq!(doc["TokensUsed"], 1234);
        assert_eq!(doc["ImagesFailed"], 0);
    }
}

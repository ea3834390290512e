//! AWS SDK clients built from standard configuration.
//!
//! The endpoint comes from the SDK's own settings (`AWS_ENDPOINT_URL`,
//! `AWS_ENDPOINT_URL_S3`, profiles), so the same binary talks to AWS or to moto server.
//! This is an adapter module: the domain modules never import it.

use aws_config::{BehaviorVersion, SdkConfig};

/// Loads the SDK configuration the standard way (environment, profile, instance role).
pub async fn load_sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}

/// Whether S3 must be addressed path-style (`http://host/bucket/key`): always for a custom
/// endpoint such as moto, which serves no bucket subdomains, or when
/// `SHOTLABEL_S3_PATH_STYLE` says so.
pub fn wants_path_style(custom_endpoint: bool, setting: Option<&str>) -> bool {
    match setting.map(|s| s.trim().to_ascii_lowercase()) {
        Some(s) if matches!(s.as_str(), "1" | "true" | "yes") => true,
        Some(s) if matches!(s.as_str(), "0" | "false" | "no") => false,
        _ => custom_endpoint,
    }
}

/// An S3 client for `config`, path-style where [`wants_path_style`] says so.
pub fn s3_client(config: &SdkConfig) -> aws_sdk_s3::Client {
    let custom_endpoint = config.endpoint_url().is_some()
        || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some_and(|v| !v.is_empty());
    let setting = std::env::var("SHOTLABEL_S3_PATH_STYLE").ok();
    let s3_config = aws_sdk_s3::config::Builder::from(config)
        .force_path_style(wants_path_style(custom_endpoint, setting.as_deref()))
        .build();
    aws_sdk_s3::Client::from_conf(s3_config)
}

pub fn sqs_client(config: &SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(config)
}

#[cfg(test)]
mod tests {
    use super::wants_path_style;

    #[test]
    fn path_style_follows_the_endpoint_unless_told_otherwise() {
        assert!(!wants_path_style(false, None));
        assert!(wants_path_style(true, None));
        assert!(wants_path_style(false, Some("true")));
        assert!(!wants_path_style(true, Some("0")));
        assert!(wants_path_style(true, Some("maybe")));
    }
}

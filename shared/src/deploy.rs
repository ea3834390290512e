//! What each Lambda function needs from its deployment, as plain data: the environment
//! variables its start-up code reads, which of them a deployment must set, and the AWS
//! access its code uses.
//!
//! Each function crate declares its own (`ENV_VARS`, `DEPLOYMENTS`) next to the code that
//! reads and accesses; the shared flows several functions run (a harvest, the provider's
//! client) are declared here. `tests/tests/template.rs` holds `template.yaml` to these
//! declarations: every variable a function is given is one its code reads, every required
//! one is given, and each function's IAM statements grant exactly the access listed for
//! it, nothing more. The crates' unit tests hold `ENV_VARS` to their source text
//! ([`variables_read_by`]), so a new setting cannot be forgotten here.
//!
//! This is a description, not an adapter: nothing here talks to AWS.

use std::collections::BTreeSet;

/// Where in the bucket an object grant applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Prefix {
    /// The configurable input prefix (`SHOTLABEL_INPUT_PREFIX`, the template's
    /// `InputPrefix` parameter).
    Input,
    /// A fixed prefix of the output layout or of the pipeline's state.
    Fixed(&'static str),
}

/// One label per image: `labels/<key below the input prefix>.json` ([`crate::records::Layout`]).
pub const LABELS: Prefix = Prefix::Fixed("labels/");
/// Failed records: `failed/<key below the input prefix>.json`.
pub const FAILED: Prefix = Prefix::Fixed("failed/");
/// One JSONL of outcomes per harvested batch ([`crate::records::state_keys::results`]).
pub const RESULTS: Prefix = Prefix::Fixed("results/");
/// Manifests, written before their batch exists ([`crate::records::state_keys::manifest`]).
pub const MANIFESTS: Prefix = Prefix::Fixed("state/manifests/");
/// Manifest name → batch id ([`crate::records::state_keys::manifest_batch`]).
pub const MANIFEST_BATCH: Prefix = Prefix::Fixed("state/manifest-batch/");
/// Batch state records ([`crate::records::state_keys::batch`]).
pub const BATCHES: Prefix = Prefix::Fixed("state/batches/");
/// Open-batch markers, listed by reconciliation ([`crate::records::state_keys::OPEN_PREFIX`]).
pub const OPEN: Prefix = Prefix::Fixed(crate::records::state_keys::OPEN_PREFIX);
/// Retry plans, written before retries are sent ([`crate::records::state_keys::retries`]).
pub const RETRIES: Prefix = Prefix::Fixed("state/retries/");
/// Webhook delivery markers ([`crate::records::state_keys::delivery`]).
pub const DELIVERIES: Prefix = Prefix::Fixed("state/deliveries/");

/// Every prefix the pipeline writes to. The input prefix may not lie under any of them,
/// or the pipeline's own writes would trigger it.
pub const OUTPUT_PREFIXES: [&str; 4] = ["labels/", "failed/", "results/", "state/"];

/// What a grant applies to. Queues and secrets are named by their logical id in
/// `template.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// The objects under a prefix of the stack's bucket (`arn:…:s3:::<bucket>/<prefix>*`).
    Objects(Prefix),
    /// The bucket itself (`arn:…:s3:::<bucket>`).
    Bucket,
    /// An SQS queue of the template.
    Queue(&'static str),
    /// A Secrets Manager secret of the template.
    Secret(&'static str),
    /// The function's own log group (its `LoggingConfig.LogGroup`).
    OwnLogGroup,
}

/// Some actions on some resources, optionally only when a template condition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub actions: &'static [&'static str],
    pub resources: &'static [Resource],
    /// A condition of the template (`Fn::If`) the grant exists under, if any.
    pub condition: Option<&'static str>,
}

impl Grant {
    pub const fn new(actions: &'static [&'static str], resources: &'static [Resource]) -> Self {
        Self {
            actions,
            resources,
            condition: None,
        }
    }

    /// The same grant, only when `condition` holds.
    pub const fn only_if(self, condition: &'static str) -> Self {
        Self {
            condition: Some(condition),
            ..self
        }
    }

    /// The grant as (condition, action, resource) triples, the unit the template test
    /// compares: how statements are grouped does not matter.
    pub fn triples(&self) -> impl Iterator<Item = (Option<&'static str>, &'static str, Resource)> {
        let condition = self.condition;
        self.actions.iter().flat_map(move |action| {
            self.resources
                .iter()
                .map(move |resource| (condition, *action, *resource))
        })
    }
}

/// How a deployment treats one variable. Variables a crate reads that no rule names are
/// optional: the code has a default, and a deployment may set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Env {
    /// Must be set: the function cannot start without it, or its value must agree with
    /// something else in the template (the input prefix with the S3 trigger's filter, the
    /// visibility timeout with the function's timeout).
    Required(&'static str),
    /// Must be set exactly when the template condition holds.
    RequiredIf(&'static str, &'static str),
    /// Must not be set in this deployment (it would ask for access the deployment lacks).
    Unset(&'static str),
}

/// One function of `template.yaml`: which binary it runs, what it must be given, and the
/// access it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deployment {
    /// The function's logical id in `template.yaml`.
    pub function: &'static str,
    /// The binary (= the crate's folder name under `functions/`, = SAM's `Binary`).
    pub binary: &'static str,
    pub env: &'static [Env],
    /// Everything the function's role allows, in groups; the union is the exact grant.
    pub grants: &'static [&'static [Grant]],
}

impl Deployment {
    /// Every (condition, action, resource) the function's role must allow, and nothing else.
    pub fn triples(&self) -> BTreeSet<(Option<&'static str>, &'static str, Resource)> {
        self.grants
            .iter()
            .flat_map(|group| group.iter())
            .flat_map(Grant::triples)
            .collect()
    }
}

// Logical ids and conditions of `template.yaml` the declarations name.
pub const PENDING_QUEUE: &str = "PendingQueue";
pub const HARVEST_QUEUE: &str = "HarvestQueue";
pub const PROVIDER_API_KEY_SECRET: &str = "ProviderApiKeySecret";
pub const WEBHOOK_SECRET: &str = "WebhookSecret";
/// The template condition for `WebhookMode = per-batch`.
pub const PER_BATCH_WEBHOOKS: &str = "PerBatchWebhooks";
/// The template condition for a task file other than the built-in one.
pub const HAS_TASK: &str = "HasTask";

// IAM actions. `s3:GetObject` also covers HEAD; `s3:PutObject` covers conditional writes.
pub const S3_GET: &str = "s3:GetObject";
pub const S3_PUT: &str = "s3:PutObject";
pub const S3_DELETE: &str = "s3:DeleteObject";
pub const S3_LIST: &str = "s3:ListBucket";
pub const SQS_SEND: &str = "sqs:SendMessage";
pub const SQS_RECEIVE: &str = "sqs:ReceiveMessage";
pub const SQS_DELETE: &str = "sqs:DeleteMessage";
pub const SQS_ATTRIBUTES: &str = "sqs:GetQueueAttributes";
pub const GET_SECRET: &str = "secretsmanager:GetSecretValue";

/// Writing the function's logs to its own log group (declared in the template with a
/// retention). Every function has this.
pub const LOGGING: &[Grant] = &[Grant::new(
    &["logs:CreateLogStream", "logs:PutLogEvents"],
    &[Resource::OwnLogGroup],
)];

/// Telling a missing key from a refused one. S3 answers 404 for a missing key only to a
/// caller allowed to list the bucket, 403 to anyone else, and the code decides "absent"
/// on the 404 (no label yet, a replaced image, no state record). It also lets
/// reconciliation list `state/open/`. It reveals key names, never contents.
pub const SEE_MISSING_KEYS: &[Grant] = &[Grant::new(&[S3_LIST], &[Resource::Bucket])];

/// The provider's client ([`crate::aws::batch_client_from_env`]): the API key from Secrets
/// Manager.
pub const PROVIDER: &[Grant] = &[Grant::new(
    &[GET_SECRET],
    &[Resource::Secret(PROVIDER_API_KEY_SECRET)],
)];

/// [`crate::harvest::harvest`] of a request that names its batch (every reconciliation,
/// and Standard Webhooks deliveries): the state record, manifest and retry plan; labels
/// (checked, written); the source object (HEAD, before replacing another version's label);
/// results, failed records, retry plans and the state record written; the open marker
/// removed, and a failed record a label supersedes (read, removed); retries sent to the
/// pending queue.
pub const HARVEST: &[Grant] = &[
    Grant::new(
        &[S3_GET],
        &[
            Resource::Objects(Prefix::Input),
            Resource::Objects(LABELS),
            Resource::Objects(FAILED),
            Resource::Objects(BATCHES),
            Resource::Objects(MANIFESTS),
            Resource::Objects(RETRIES),
        ],
    ),
    Grant::new(
        &[S3_PUT],
        &[
            Resource::Objects(LABELS),
            Resource::Objects(FAILED),
            Resource::Objects(RESULTS),
            Resource::Objects(BATCHES),
            Resource::Objects(RETRIES),
        ],
    ),
    Grant::new(
        &[S3_DELETE],
        &[Resource::Objects(FAILED), Resource::Objects(OPEN)],
    ),
    Grant::new(&[SQS_SEND], &[Resource::Queue(PENDING_QUEUE)]),
];

/// A harvest request that names only its manifest (a per-batch webhook whose body gave no
/// batch id) finds the batch through `state/manifest-batch/`.
pub const HARVEST_BY_MANIFEST: &[Grant] =
    &[Grant::new(&[S3_GET], &[Resource::Objects(MANIFEST_BATCH)])];

// Variables the shared start-up code reads, by the call that reads them.

/// [`crate::settings::task`].
pub const TASK_SETTINGS: &[&str] = &["SHOTLABEL_TASK"];
/// [`crate::settings::input_prefix`].
pub const INPUT_PREFIX_SETTINGS: &[&str] = &["SHOTLABEL_INPUT_PREFIX"];
/// [`crate::settings::harvest_config`].
pub const HARVEST_SETTINGS: &[&str] = &[
    "SHOTLABEL_BUCKET",
    "SHOTLABEL_PENDING_QUEUE_URL",
    "SHOTLABEL_MAX_RETRIES",
    "SHOTLABEL_TASK",
    "SHOTLABEL_INPUT_PREFIX",
];
/// [`crate::aws::s3_client`].
pub const S3_CLIENT_SETTINGS: &[&str] = &["SHOTLABEL_S3_PATH_STYLE"];
/// [`crate::aws::batch_client_from_env`]: the URL, and the key either as a value (local
/// runs) or as a Secrets Manager ARN (on AWS).
pub const PROVIDER_SETTINGS: &[&str] = &[
    "SHOTLABEL_PROVIDER_URL",
    "SHOTLABEL_API_KEY",
    "SHOTLABEL_API_KEY_SECRET_ARN",
];

/// Shared calls that read settings, as they appear in a function's source, and what each
/// reads. [`variables_read_by`] goes by this table.
pub const SHARED_READERS: &[(&str, &[&str])] = &[
    ("settings::task()", TASK_SETTINGS),
    ("settings::input_prefix()", INPUT_PREFIX_SETTINGS),
    ("settings::harvest_config()", HARVEST_SETTINGS),
    ("s3_client(", S3_CLIENT_SETTINGS),
    ("batch_client_from_env(", PROVIDER_SETTINGS),
];

/// The variable that names a secret setting's Secrets Manager secret
/// ([`crate::aws::secret_setting`]).
pub fn secret_arn_variable(name: &str) -> String {
    format!("{name}_SECRET_ARN")
}

/// A function crate's source is scanned up to this line; what follows it (the crate's own
/// deployment description and its tests) is not code that reads settings.
pub const SCAN_END: &str = "// ---- deployment description ----";

/// The `SHOTLABEL_*` variables a function's source reads: every `"SHOTLABEL_…"` literal,
/// `<NAME>_SECRET_ARN` for each `secret_setting(…, "<NAME>", …)`, and what the shared calls
/// of [`SHARED_READERS`] read. Only the text before [`SCAN_END`] is scanned.
///
/// Deliberately simple: a literal naming a variable in an error message counts as a read,
/// which is what it always is in practice.
pub fn variables_read_by(source: &str) -> BTreeSet<String> {
    let code = source.split(SCAN_END).next().unwrap_or_default();
    let mut read: BTreeSet<String> = setting_literals(code).into_iter().collect();
    let mut rest = code;
    while let Some(at) = rest.find("secret_setting(") {
        rest = &rest[at + "secret_setting(".len()..];
        if let Some(name) = setting_literals(rest).into_iter().next() {
            read.insert(secret_arn_variable(&name));
        }
    }
    for (call, names) in SHARED_READERS {
        if code.contains(call) {
            read.extend(names.iter().map(|n| (*n).to_owned()));
        }
    }
    read
}

/// Every `"SHOTLABEL_…"` literal in `text`, in order, as the variable name it starts with.
pub fn setting_literals(text: &str) -> Vec<String> {
    text.match_indices("\"SHOTLABEL_")
        .map(|(at, _)| {
            text[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Layout, state_keys};

    fn under(prefix: Prefix, key: &str) -> bool {
        match prefix {
            Prefix::Fixed(p) => key.starts_with(p),
            Prefix::Input => false,
        }
    }

    #[test]
    fn the_prefixes_are_where_the_code_writes() {
        let layout = Layout::new("incoming/");
        assert!(under(LABELS, &layout.label_key("a/b.png")));
        assert!(under(FAILED, &layout.failed_key("a/b.png")));
        assert!(under(RESULTS, &state_keys::results("batch_1")));
        assert!(under(MANIFESTS, &state_keys::manifest("m")));
        assert!(under(MANIFEST_BATCH, &state_keys::manifest_batch("m")));
        assert!(under(BATCHES, &state_keys::batch("batch_1")));
        assert!(under(OPEN, &state_keys::open_marker("batch_1")));
        assert!(under(RETRIES, &state_keys::retries("batch_1")));
        assert!(under(DELIVERIES, &state_keys::delivery("abc")));
        for prefix in [
            LABELS,
            FAILED,
            RESULTS,
            MANIFESTS,
            MANIFEST_BATCH,
            BATCHES,
            OPEN,
            RETRIES,
            DELIVERIES,
        ] {
            let Prefix::Fixed(p) = prefix else {
                unreachable!()
            };
            assert!(
                OUTPUT_PREFIXES.iter().any(|o| p.starts_with(o)),
                "{p} is under no output prefix"
            );
        }
    }

    /// The shared lists say what `settings.rs` and `aws.rs` read, and no other shared
    /// module reads a setting.
    #[test]
    fn the_shared_readers_are_complete() -> anyhow::Result<()> {
        let listed: BTreeSet<String> = SHARED_READERS
            .iter()
            .flat_map(|(_, names)| names.iter().map(|n| (*n).to_owned()))
            .collect();
        let settings = include_str!("settings.rs");
        let aws = include_str!("aws.rs");
        let mut read: BTreeSet<String> = setting_literals(settings).into_iter().collect();
        read.extend(setting_literals(aws));
        // The secret setting's ARN variable is built, not written out.
        assert!(aws.contains(r#"format!("{name}_SECRET_ARN")"#));
        read.insert(secret_arn_variable("SHOTLABEL_API_KEY"));
        assert_eq!(read, listed);

        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                if ["settings.rs", "aws.rs", "deploy.rs"].contains(&name) {
                    continue;
                }
                let text = std::fs::read_to_string(&path)?;
                assert!(
                    setting_literals(&text).is_empty(),
                    "{} reads a setting; list it in deploy.rs",
                    path.display()
                );
            }
        }
        Ok(())
    }

    #[test]
    fn variables_are_found_in_source_text() {
        let source = r#"
            let a = settings::required("SHOTLABEL_BUCKET", "the bucket")?;
            let s = secret_setting(&sdk, "SHOTLABEL_WEBHOOK_SECRET", process_env).await?;
            let t = settings::task()?;
            // ---- deployment description ----
            pub const ENV_VARS: &[&str] = &["SHOTLABEL_NOT_READ"];
        "#;
        let read = variables_read_by(source);
        let expected: BTreeSet<String> = [
            "SHOTLABEL_BUCKET",
            "SHOTLABEL_WEBHOOK_SECRET",
            "SHOTLABEL_WEBHOOK_SECRET_SECRET_ARN",
            "SHOTLABEL_TASK",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(read, expected);
    }

    #[test]
    fn grants_expand_to_triples() {
        let grant = Grant::new(
            &[S3_GET, S3_PUT],
            &[Resource::Objects(LABELS), Resource::Bucket],
        )
        .only_if("C");
        assert_eq!(grant.triples().count(), 4);
        assert!(
            grant
                .triples()
                .all(|(condition, _, _)| condition == Some("C"))
        );
    }
}

//! What each Lambda function needs from its deployment, as plain data: the environment
//! variables its start-up code reads, which of them a deployment must set, and the AWS
//! access its code uses.
//!
//! The variables a function reads come from its settings type
//! (`shotlabel_core::settings`, [`Deployment::variables`]); which of them a deployment must
//! set, and the access each function's code uses, are declared in `functions.rs`, beside
//! the shared flows several functions run (a harvest, the provider's client) declared here.
//! `tests/tests/integration/template.rs` holds `template.yaml` to these declarations: every variable a
//! function is given is one its code reads, every required one is given, and each
//! function's IAM statements grant exactly the access listed for it, nothing more.
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

/// One label per image: `labels/<key below the input prefix>.json` ([`shotlabel_core::records::Layout`]).
pub const LABELS: Prefix = Prefix::Fixed("labels/");
/// Failed records: `failed/<key below the input prefix>.json`.
pub const FAILED: Prefix = Prefix::Fixed("failed/");
/// The labels as Parquet parts, one per harvest or shard:
/// `dataset/task=<name>/version=<version>/batch=<id>/part-<n>.parquet` ([`shotlabel_core::dataset::part_key`]).
pub const DATASET: Prefix = Prefix::Fixed(shotlabel_core::dataset::DATASET_PREFIX);
/// Athena's query results from the template's workgroup (no function touches them).
pub const ATHENA_RESULTS: &str = "athena-results/";
/// One JSONL of outcomes per harvested batch ([`shotlabel_core::records::state_keys::results`]).
pub const RESULTS: Prefix = Prefix::Fixed("results/");
/// Manifests, written before their batch exists ([`shotlabel_core::records::state_keys::manifest`]).
pub const MANIFESTS: Prefix = Prefix::Fixed("state/manifests/");
/// Manifest name → batch id ([`shotlabel_core::records::state_keys::manifest_batch`]).
pub const MANIFEST_BATCH: Prefix = Prefix::Fixed("state/manifest-batch/");
/// Batch state records ([`shotlabel_core::records::state_keys::batch`]).
pub const BATCHES: Prefix = Prefix::Fixed("state/batches/");
/// Open-batch markers, listed by reconciliation ([`shotlabel_core::records::state_keys::OPEN_PREFIX`]).
pub const OPEN: Prefix = Prefix::Fixed(shotlabel_core::records::state_keys::OPEN_PREFIX);
/// Retry plans, written before retries are sent ([`shotlabel_core::records::state_keys::retries`]).
pub const RETRIES: Prefix = Prefix::Fixed("state/retries/");
/// Webhook delivery markers ([`shotlabel_core::records::state_keys::delivery`]).
pub const DELIVERIES: Prefix = Prefix::Fixed("state/deliveries/");
/// Open-batch slots, held from submit to harvest ([`shotlabel_core::records::state_keys::slot`]).
pub const SLOTS: Prefix = Prefix::Fixed(shotlabel_core::records::state_keys::SLOTS_PREFIX);
/// Sharded harvests' plans and done markers ([`shotlabel_core::records::state_keys::shard_plan`]).
pub const SHARDS: Prefix = Prefix::Fixed("state/shards/");
/// Provider files of sharded batches, copied once ([`shotlabel_core::records::state_keys::batch_file_copy`]).
pub const OUTPUTS: Prefix = Prefix::Fixed("state/outputs/");
/// The provider's shared pacing state: the upload clock ([`shotlabel_core::records::state_keys::UPLOAD_CLOCK`]).
pub const PROVIDER_STATE: Prefix = Prefix::Fixed("state/provider/");

/// Every prefix the pipeline (or Athena, for its workgroup) writes to. The input prefix
/// may not lie under any of them, or the pipeline's own writes would trigger it.
pub const OUTPUT_PREFIXES: [&str; 6] = [
    "labels/",
    "failed/",
    "results/",
    "state/",
    shotlabel_core::dataset::DATASET_PREFIX,
    ATHENA_RESULTS,
];

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
}

/// One function of `template.yaml`: which binary it runs, what it must be given, and the
/// access it gets.
#[derive(Debug, Clone, Copy)]
pub struct Deployment {
    /// The function's logical id in `template.yaml`.
    pub function: &'static str,
    /// The binary (= the crate's folder name under `functions/`, = SAM's `Binary`).
    pub binary: &'static str,
    pub env: &'static [Env],
    /// Everything the function's role allows, in groups; the union is the exact grant.
    pub grants: &'static [&'static [Grant]],
    /// Every variable the binary reads: its settings type's
    /// ([`shotlabel_core::settings::FunctionSettings::variables`]).
    pub variables: fn() -> BTreeSet<String>,
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
pub const SUBMIT_WORK_QUEUE: &str = "SubmitWorkQueue";
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

/// The provider's client (`shotlabel_aws::batch_client`): the API key from Secrets Manager.
pub const PROVIDER: &[Grant] = &[Grant::new(
    &[GET_SECRET],
    &[Resource::Secret(PROVIDER_API_KEY_SECRET)],
)];

/// [`shotlabel_core::harvest::harvest`] of a request that names its batch (every reconciliation,
/// and Standard Webhooks deliveries): the state record, manifest and retry plan; labels
/// (checked, written); the source object (HEAD, before replacing another version's label);
/// results, failed records, retry plans, the dataset part (one PUT, overwritten when the
/// harvest is repeated; never read back) and the state record written; the open marker
/// removed, and a failed record a label supersedes (read, removed); the batch's open-batch
/// slot given back (read, removed); retries sent to the pending queue. A batch over the
/// shard size is planned (its files copied, the plan written and read) and its shards
/// queued on the harvest queue; a shard reads its range and writes its done marker.
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
            Resource::Objects(SLOTS),
            Resource::Objects(SHARDS),
            Resource::Objects(OUTPUTS),
        ],
    ),
    Grant::new(
        &[S3_PUT],
        &[
            Resource::Objects(LABELS),
            Resource::Objects(FAILED),
            Resource::Objects(RESULTS),
            Resource::Objects(DATASET),
            Resource::Objects(BATCHES),
            Resource::Objects(RETRIES),
            Resource::Objects(SHARDS),
            Resource::Objects(OUTPUTS),
        ],
    ),
    Grant::new(
        &[S3_DELETE],
        &[
            Resource::Objects(FAILED),
            Resource::Objects(OPEN),
            Resource::Objects(SLOTS),
        ],
    ),
    Grant::new(
        &[SQS_SEND],
        &[
            Resource::Queue(PENDING_QUEUE),
            Resource::Queue(HARVEST_QUEUE),
        ],
    ),
];

/// A harvest request that names only its manifest (a per-batch webhook whose body gave no
/// batch id) finds the batch through `state/manifest-batch/`.
pub const HARVEST_BY_MANIFEST: &[Grant] =
    &[Grant::new(&[S3_GET], &[Resource::Objects(MANIFEST_BATCH)])];

mod functions;

/// The variable that names a secret setting's Secrets Manager secret: a deployment gives
/// `<NAME>_SECRET_ARN`, never `<NAME>` itself.
pub fn secret_arn_variable(name: &str) -> String {
    format!("{name}_SECRET_ARN")
}

pub use functions::{DEPLOYMENTS, ENQUEUE, HARVEST_FUNCTION, RECEIVER, SUBMIT};

#[cfg(test)]
mod tests {
    use super::*;
    use shotlabel_core::records::{Layout, state_keys};

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
        assert!(under(SLOTS, &state_keys::slot(3)));
        assert!(under(SHARDS, &state_keys::shard_plan("batch_1")));
        assert!(under(SHARDS, &state_keys::shard_done("batch_1", 2)));
        assert!(under(OUTPUTS, &state_keys::batch_file_copy("batch_1", 0)));
        assert!(under(RETRIES, &state_keys::shard_retries("batch_1", 2)));
        assert!(under(RESULTS, &state_keys::shard_results("batch_1", 2)));
        assert!(under(PROVIDER_STATE, state_keys::UPLOAD_CLOCK));
        assert!(under(
            DATASET,
            &shotlabel_core::dataset::part_key(
                "website-judgement",
                "0123456789abcdef",
                "batch_1",
                0
            )
        ));
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
            SLOTS,
            PROVIDER_STATE,
            SHARDS,
            OUTPUTS,
            DATASET,
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

//! Each function of `template.yaml`: its binary, the variables it must be given, and the
//! access its code uses. The variables it may be given are its settings type's.

use shotlabel_core::settings::{
    EnqueueSettings, FunctionSettings, HarvestSettings, ReceiverSettings, SubmitSettings,
};

use crate::{
    BATCHES, DELIVERIES, Deployment, Env, FAILED, GET_SECRET, Grant, HARVEST, HARVEST_BY_MANIFEST,
    HARVEST_QUEUE, HAS_TASK, LABELS, LOGGING, MANIFEST_BATCH, MANIFESTS, OPEN, PENDING_QUEUE,
    PER_BATCH_WEBHOOKS, PROVIDER, PROVIDER_STATE, Prefix, Resource, S3_DELETE, S3_GET, S3_PUT,
    SEE_MISSING_KEYS, SLOTS, SQS_ATTRIBUTES, SQS_DELETE, SQS_RECEIVE, SQS_SEND, SUBMIT_WORK_QUEUE,
    WEBHOOK_SECRET,
};

/// What enqueue does on AWS: looks for a current label (GET, or HEAD when relabelling),
/// writes failed records for refused objects, and sends the pending messages.
const ENQUEUE_GRANTS: &[Grant] = &[
    Grant::new(&[S3_GET], &[Resource::Objects(LABELS)]),
    Grant::new(&[S3_PUT], &[Resource::Objects(FAILED)]),
    Grant::new(&[SQS_SEND], &[Resource::Queue(PENDING_QUEUE)]),
];

/// Triggered by objects created under the input prefix.
pub const ENQUEUE: Deployment = Deployment {
    function: "EnqueueFunction",
    binary: "enqueue",
    env: &[
        Env::Required("SHOTLABEL_PENDING_QUEUE_URL"),
        // Must be the S3 trigger's prefix filter, or events would be ignored.
        Env::Required("SHOTLABEL_INPUT_PREFIX"),
        Env::RequiredIf("SHOTLABEL_TASK", HAS_TASK),
    ],
    grants: &[LOGGING, SEE_MISSING_KEYS, ENQUEUE_GRANTS],
    variables: EnqueueSettings::variables,
};

/// What a submit run does on AWS: takes pending messages (and deletes them once their batch
/// exists), reads each image, writes failed records, manifests, manifest → batch links,
/// state records and open markers; in per-batch webhook mode it signs each batch's webhook
/// URL with the webhook secret. Reconciliation, which runs first, is a harvest
/// ([`HARVEST`]) and lists the open markers. The scheduled run reads the pending and work
/// queues' depths and sends work tickets; the work queue's event source mapping receives
/// and deletes them with the function's role. Workers claim, re-point and give back
/// open-batch slots (reading a claim's manifest → batch link and batch record to tell a
/// stale one) and take upload turns on the upload clock.
const SUBMIT_GRANTS: &[Grant] = &[
    Grant::new(
        &[SQS_RECEIVE, SQS_DELETE, SQS_ATTRIBUTES],
        &[
            Resource::Queue(PENDING_QUEUE),
            Resource::Queue(SUBMIT_WORK_QUEUE),
        ],
    ),
    Grant::new(&[SQS_SEND], &[Resource::Queue(SUBMIT_WORK_QUEUE)]),
    Grant::new(
        &[S3_GET],
        &[
            Resource::Objects(Prefix::Input),
            Resource::Objects(MANIFEST_BATCH),
            Resource::Objects(PROVIDER_STATE),
        ],
    ),
    Grant::new(
        &[S3_PUT],
        &[
            Resource::Objects(FAILED),
            Resource::Objects(MANIFESTS),
            Resource::Objects(MANIFEST_BATCH),
            Resource::Objects(BATCHES),
            Resource::Objects(OPEN),
            Resource::Objects(SLOTS),
            Resource::Objects(PROVIDER_STATE),
        ],
    ),
    Grant::new(&[GET_SECRET], &[Resource::Secret(WEBHOOK_SECRET)]).only_if(PER_BATCH_WEBHOOKS),
];

/// Run on a schedule.
pub const SUBMIT: Deployment = Deployment {
    function: "SubmitFunction",
    binary: "submit",
    env: &[
        Env::Required("SHOTLABEL_BUCKET"),
        Env::Required("SHOTLABEL_PENDING_QUEUE_URL"),
        Env::Required("SHOTLABEL_PROVIDER_URL"),
        // Its documented limits are the defaults; must agree with the harvest's.
        Env::Required("SHOTLABEL_PROVIDER"),
        Env::Required("SHOTLABEL_API_KEY_SECRET_ARN"),
        // Must agree with the other functions' (labels are laid out below it).
        Env::Required("SHOTLABEL_INPUT_PREFIX"),
        // Must agree with the webhook receiver's.
        Env::Required("SHOTLABEL_WEBHOOK_MODE"),
        // Must agree with the harvest's.
        Env::Required("SHOTLABEL_MAX_RETRIES"),
        // Must outlast the function's timeout (checked by the template test).
        Env::Required("SHOTLABEL_SUBMIT_VISIBILITY_SECONDS"),
        Env::Required("SHOTLABEL_SUBMIT_BUDGET_SECONDS"),
        Env::RequiredIf("SHOTLABEL_WEBHOOK_URL", PER_BATCH_WEBHOOKS),
        Env::RequiredIf("SHOTLABEL_WEBHOOK_SECRET_SECRET_ARN", PER_BATCH_WEBHOOKS),
        Env::RequiredIf("SHOTLABEL_TASK", HAS_TASK),
        // The fan-out: the scheduled run starts workers through the work queue.
        Env::Required("SHOTLABEL_SUBMIT_WORK_QUEUE_URL"),
        Env::Required("SHOTLABEL_MAX_SUBMIT_WORKERS"),
        // Must agree with the harvest's.
        Env::Required("SHOTLABEL_MAX_REQUEUES"),
        // Must agree with the pending queue's redrive policy (checked by the template test).
        Env::Required("SHOTLABEL_PENDING_MAX_RECEIVES"),
        // Reconciliation shards large batches onto the harvest queue.
        Env::Required("SHOTLABEL_HARVEST_QUEUE_URL"),
    ],
    grants: &[LOGGING, SEE_MISSING_KEYS, PROVIDER, HARVEST, SUBMIT_GRANTS],
    variables: SubmitSettings::variables,
};

/// What the receiver does: claims and, when sending fails, releases a delivery marker;
/// queues one harvest request; authenticates with the webhook secret. Nothing else: no
/// provider key, no pending queue, no labels.
const RECEIVER_GRANTS: &[Grant] = &[
    Grant::new(&[S3_PUT, S3_DELETE], &[Resource::Objects(DELIVERIES)]),
    Grant::new(&[SQS_SEND], &[Resource::Queue(HARVEST_QUEUE)]),
    Grant::new(&[GET_SECRET], &[Resource::Secret(WEBHOOK_SECRET)]),
];

/// Behind the Function URL, facing the internet: fast, never harvests.
pub const RECEIVER: Deployment = Deployment {
    function: "WebhookFunction",
    binary: "webhook",
    env: &[
        Env::Required("SHOTLABEL_BUCKET"),
        Env::Required("SHOTLABEL_HARVEST_QUEUE_URL"),
        Env::Required("SHOTLABEL_WEBHOOK_MODE"),
        Env::Required("SHOTLABEL_WEBHOOK_SECRET_SECRET_ARN"),
    ],
    grants: &[LOGGING, RECEIVER_GRANTS],
    variables: ReceiverSettings::variables,
};

/// A harvest that finds a webhook's batch not finished yet releases the delivery's
/// marker, so that the provider's next delivery is acted on.
const RELEASE_DELIVERIES: &[Grant] = &[Grant::new(&[S3_DELETE], &[Resource::Objects(DELIVERIES)])];

/// The harvest queue's event source mapping polls with the function's role and deletes
/// what the harvest did not report as failed.
const HARVEST_QUEUE_GRANTS: &[Grant] = &[Grant::new(
    &[SQS_RECEIVE, SQS_DELETE, SQS_ATTRIBUTES],
    &[Resource::Queue(HARVEST_QUEUE)],
)];

/// On the harvest queue: one finished batch per message.
pub const HARVEST_FUNCTION: Deployment = Deployment {
    function: "HarvestFunction",
    binary: "harvest",
    env: &[
        Env::Required("SHOTLABEL_BUCKET"),
        Env::Required("SHOTLABEL_PENDING_QUEUE_URL"),
        Env::Required("SHOTLABEL_PROVIDER_URL"),
        // Its documented limits are the defaults; must agree with the harvest's.
        Env::Required("SHOTLABEL_PROVIDER"),
        Env::Required("SHOTLABEL_API_KEY_SECRET_ARN"),
        // Must agree with the other functions'.
        Env::Required("SHOTLABEL_INPUT_PREFIX"),
        Env::Required("SHOTLABEL_MAX_RETRIES"),
        Env::Required("SHOTLABEL_MAX_REQUEUES"),
        // Large batches are harvested in shards through its own queue.
        Env::Required("SHOTLABEL_HARVEST_QUEUE_URL"),
        Env::RequiredIf("SHOTLABEL_TASK", HAS_TASK),
    ],
    grants: &[
        LOGGING,
        SEE_MISSING_KEYS,
        PROVIDER,
        HARVEST,
        HARVEST_BY_MANIFEST,
        HARVEST_QUEUE_GRANTS,
        RELEASE_DELIVERIES,
    ],
    variables: HarvestSettings::variables,
};

/// Every function of the template.
pub const DEPLOYMENTS: &[Deployment] = &[ENQUEUE, SUBMIT, RECEIVER, HARVEST_FUNCTION];

#[cfg(test)]
mod tests {
    use super::*;

    /// A required variable that the binary does not read would be a typo in this file.
    #[test]
    fn every_required_variable_is_one_the_binary_reads() {
        for deployment in DEPLOYMENTS {
            let read = (deployment.variables)();
            for rule in deployment.env {
                let (Env::Required(name) | Env::RequiredIf(name, _)) = rule;
                assert!(
                    read.contains(*name),
                    "{} requires {name}, which its settings do not read",
                    deployment.function
                );
            }
        }
    }

    /// The receiver faces the internet: it must not be able to read the provider's key or
    /// touch the pending queue.
    #[test]
    fn the_receiver_holds_neither_the_provider_key_nor_the_pending_queue() {
        let read = (RECEIVER.variables)();
        for name in [
            "SHOTLABEL_API_KEY",
            "SHOTLABEL_API_KEY_SECRET_ARN",
            "SHOTLABEL_PROVIDER_URL",
            "SHOTLABEL_PENDING_QUEUE_URL",
        ] {
            assert!(!read.contains(name), "the receiver reads {name}");
        }
        for (_, _, resource) in RECEIVER.triples() {
            assert_ne!(resource, Resource::Secret(crate::PROVIDER_API_KEY_SECRET));
            assert_ne!(resource, Resource::Queue(PENDING_QUEUE));
        }
    }
}

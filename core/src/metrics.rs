//! The counts an invocation reports. How they are published (CloudWatch Embedded Metric
//! Format) is the AWS adapter's business (`shotlabel_aws::metrics`).

/// The counts one invocation reports. Zero counts are published too, so that alarms and
/// graphs see an explicit 0 rather than missing data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub images_queued: u64,
    pub images_prepared: u64,
    pub images_submitted: u64,
    pub images_labelled: u64,
    pub images_retried: u64,
    pub images_failed: u64,
    pub batches_submitted: u64,
    pub tokens_used: u64,
}

impl Counts {
    /// Each count with its CloudWatch metric name.
    pub fn named(&self) -> [(&'static str, u64); 8] {
        [
            ("ImagesQueued", self.images_queued),
            ("ImagesPrepared", self.images_prepared),
            ("ImagesSubmitted", self.images_submitted),
            ("ImagesLabelled", self.images_labelled),
            ("ImagesRetried", self.images_retried),
            ("ImagesFailed", self.images_failed),
            ("BatchesSubmitted", self.batches_submitted),
            ("TokensUsed", self.tokens_used),
        ]
    }
}

//! The local stack the benchmarks run against: moto (S3, SQS), the resources the SAM
//! template declares, the batch emulator, and uploads of many distinct screenshots.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use batch_emulator::{EmulatorConfig, RunningEmulator};
use futures_util::StreamExt;
use shotlabel_aws::{S3Store, SqsQueue};
use shotlabel_core::enqueue::NewObject;
use shotlabel_core::ports::{ObjectStore, WriteCondition};
use shotlabel_localstack::{LocalResources, MotoServer, create_resources, s3_client, sqs_client};

use crate::common::{png_variant, screenshot_bytes};

/// The API key the benchmarks' emulator accepts.
pub const EMULATOR_KEY: &str = "bench-local-key";
/// Where the benchmarks put images.
pub const INPUT: &str = "incoming/";

pub struct Stack {
    pub moto: MotoServer,
    pub store: S3Store,
    pub queue: SqsQueue,
    pub resources: LocalResources,
}

impl Stack {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let moto = MotoServer::start().await?;
        let sdk = moto.sdk_config().await;
        let resources = create_resources(&sdk, name).await?;
        Ok(Self {
            store: S3Store::new(s3_client(&sdk)),
            queue: SqsQueue::new(sqs_client(&sdk)),
            resources,
            moto,
        })
    }
}

/// An emulator on a free loopback port with these status delays (ms).
pub async fn emulator(delays_ms: (u64, u64, u64)) -> anyhow::Result<RunningEmulator> {
    let mut config =
        EmulatorConfig::new(EMULATOR_KEY).with_delays(delays_ms.0, delays_ms.1, delays_ms.2);
    config.listen = "127.0.0.1:0".parse()?;
    Ok(batch_emulator::spawn(config).await?)
}

/// Puts `count` distinct variants of the fixture screenshots under `prefix`, `parallel`
/// at a time; returns them as S3 events would report them, in key order.
pub async fn upload_variants<S: ObjectStore>(
    store: &S,
    bucket: &str,
    prefix: &str,
    count: usize,
    parallel: usize,
) -> anyhow::Result<Vec<NewObject>> {
    let fixtures = Arc::new(screenshot_bytes()?);
    let started = Instant::now();
    let mut uploads = futures_util::stream::iter(0..count)
        .map(|i| {
            let fixtures = fixtures.clone();
            async move {
                let (name, png) = &fixtures[i % fixtures.len()];
                let body = png_variant(png, i as u64)?;
                let key = format!("{prefix}{i:06}-{name}");
                let size = body.len() as u64;
                let etag = store
                    .put(bucket, &key, body, "image/png", WriteCondition::Overwrite)
                    .await
                    .with_context(|| format!("uploading {key}"))?;
                anyhow::Ok(NewObject {
                    bucket: bucket.to_owned(),
                    key,
                    size,
                    etag,
                    version_id: None,
                })
            }
        })
        .buffer_unordered(parallel.max(1));
    let mut objects = Vec::with_capacity(count);
    while let Some(object) = uploads.next().await {
        objects.push(object?);
    }
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let bytes: u64 = objects.iter().map(|o| o.size).sum();
    println!(
        "uploaded {count} images ({:.1} MB) in {:.1} s",
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(objects)
}

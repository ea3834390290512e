//! Sharded harvest throughput: one batch of N answers harvested whole, then by 2 and 4
//! shards running at once, interleaved over several rounds. Every run checks that each
//! answer became exactly one label and that one shard finished the batch.
//!
//! Two stores: moto (`--store moto`), one Python process on this machine's two cores, so
//! the shards share its throughput; and the in-memory store with a fixed latency per
//! request (`--store memory --latency-ms 20`), standing in for S3, whose throughput grows
//! with the requests in flight, as it does for shards on separate Lambdas.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use shotlabel_core::harvest::{HarvestConfig, HarvestOutcome, ShardConfig, harvest};
use shotlabel_core::memory::{MemoryQueue, MemoryStore};
use shotlabel_core::ports::{
    ObjectInfo, ObjectStore, Queue, StoreError, StoredObject, WriteCondition,
};
use shotlabel_core::records::{HarvestRequest, Layout, state_keys};
use shotlabel_core::task::Task;

use crate::common::{header, load, median};
use crate::harvest::{BATCH_ID, LocalFileProvider, synthesize};
use crate::stack::{INPUT, Stack};

#[derive(Debug, clap::Args)]
pub struct ScaleHarvestArgs {
    /// Answers in the batch's output file.
    #[arg(long, default_value_t = 10_000)]
    lines: usize,
    /// Shard counts to compare (1: the whole batch in one run).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    shards: Vec<usize>,
    /// Rounds; each runs every shard count once, in turn.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// `moto` (S3 and SQS on moto server) or `memory` (in memory, with `--latency-ms`).
    #[arg(long, default_value = "moto")]
    store: String,
    /// The latency of each in-memory store request.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
}

/// A store whose every request takes `latency` first, as S3's do.
struct Latent<S> {
    inner: S,
    latency: Duration,
}

impl<S: ObjectStore> ObjectStore for Latent<S> {
    async fn get(&self, bucket: &str, key: &str) -> Result<StoredObject, StoreError> {
        tokio::time::sleep(self.latency).await;
        self.inner.get(bucket, key).await
    }

    async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        tokio::time::sleep(self.latency).await;
        self.inner.head(bucket, key).await
    }

    async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        condition: WriteCondition,
    ) -> Result<String, StoreError> {
        tokio::time::sleep(self.latency).await;
        self.inner
            .put(bucket, key, body, content_type, condition)
            .await
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        tokio::time::sleep(self.latency).await;
        self.inner.delete(bucket, key).await
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        tokio::time::sleep(self.latency).await;
        self.inner.list(bucket, prefix).await
    }

    async fn get_range(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, StoreError> {
        tokio::time::sleep(self.latency).await;
        self.inner.get_range(bucket, key, start, end).await
    }
}

/// Where one run's batch lives.
struct Place<'a, S, Q> {
    store: &'a S,
    queue: &'a Q,
    bucket: String,
    pending_queue_url: String,
    harvest_queue_url: String,
}

/// One harvest of the batch by `shards` runs at once, on a fresh store; returns (seconds,
/// planning seconds).
async fn run_once(
    args: &ScaleHarvestArgs,
    task: &Arc<Task>,
    shards: usize,
    round: usize,
) -> anyhow::Result<(Duration, Duration)> {
    if args.store == "memory" {
        let store = Latent {
            inner: MemoryStore::default(),
            latency: Duration::from_millis(args.latency_ms),
        };
        let queue = MemoryQueue::default();
        let place = Place {
            store: &store,
            queue: &queue,
            bucket: "bench-bucket".into(),
            pending_queue_url: "pending".into(),
            harvest_queue_url: "harvest".into(),
        };
        return run_on(&place, task, args.lines, shards).await;
    }
    anyhow::ensure!(
        args.store == "moto",
        "--store is moto or memory, not {:?}",
        args.store
    );
    let stack = Stack::start(&format!("bench-shards-{shards}-{round}")).await?;
    let place = Place {
        store: &stack.store,
        queue: &stack.queue,
        bucket: stack.resources.bucket.clone(),
        pending_queue_url: stack.resources.pending_queue_url.clone(),
        harvest_queue_url: stack.resources.harvest_queue_url.clone(),
    };
    run_on(&place, task, args.lines, shards).await
}

async fn run_on<S: ObjectStore, Q: Queue>(
    place: &Place<'_, S, Q>,
    task: &Arc<Task>,
    lines: usize,
    shards: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let (store, queue, bucket) = (place.store, place.queue, place.bucket.clone());
    let (mut manifest, output) = synthesize(lines, &bucket, task);
    for item in manifest.items.values_mut() {
        item.bucket = bucket.clone();
    }
    store
        .put(
            &bucket,
            &state_keys::manifest(&manifest.name),
            serde_json::to_vec(&manifest)?,
            "application/json",
            WriteCondition::Overwrite,
        )
        .await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("output.jsonl");
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for line in &output {
            file.write_all(line.as_bytes())?;
            file.write_all(b"\n")?;
        }
        file.flush()?;
    }
    let provider = LocalFileProvider {
        manifest: manifest.name.clone(),
        output: path,
    };
    let config = HarvestConfig {
        bucket: bucket.clone(),
        layout: Layout::new(INPUT),
        pending_queue_url: place.pending_queue_url.clone(),
        task: task.clone(),
        max_retries: 3,
        max_requeues: 10,
        shards: (shards > 1).then(|| ShardConfig {
            queue_url: place.harvest_queue_url.clone(),
            requests_per_shard: lines.div_ceil(shards),
            resend_after: Duration::from_secs(7_200),
        }),
        delete_provider_files: false,
    };
    let request = HarvestRequest {
        batch_id: Some(BATCH_ID.to_owned()),
        manifest: None,
        origin: "bench".into(),
        shard: None,
        delivery: None,
    };
    let started = Instant::now();
    let outcome = harvest(store, queue, &provider, &config, &request).await?;
    let planned = started.elapsed();
    match outcome {
        HarvestOutcome::Harvested { .. } => ensure!(shards == 1, "{outcome:?}"),
        HarvestOutcome::Sharded { shards: n, .. } => {
            ensure!(n == shards, "{n} shards planned, {shards} asked");
            // The shard requests, as the harvest queue holds them; all run at once, as
            // that many harvest Lambdas would.
            let mut requests: Vec<HarvestRequest> = Vec::new();
            while requests.len() < shards {
                let received = queue
                    .receive(
                        &place.harvest_queue_url,
                        10,
                        Duration::from_secs(600),
                        Duration::from_secs(1),
                    )
                    .await?;
                for message in received {
                    requests.push(serde_json::from_str(&message.body)?);
                }
            }
            let runs = requests
                .iter()
                .map(|r| harvest(store, queue, &provider, &config, r));
            let outcomes = futures_util::future::join_all(runs).await;
            let finished = outcomes
                .into_iter()
                .map(|o| {
                    o.map(|o| matches!(o, HarvestOutcome::ShardHarvested { finished: true, .. }))
                })
                .collect::<Result<Vec<bool>, _>>()?;
            ensure!(
                finished.iter().filter(|f| **f).count() == 1,
                "exactly one shard marks the batch harvested: {finished:?}"
            );
        }
        other => anyhow::bail!("not harvested: {other:?}"),
    }
    let elapsed = started.elapsed();
    // Exactly one label per answer that was one.
    let labels: HashSet<String> = store.list(&bucket, "labels/").await?.into_iter().collect();
    let record: shotlabel_core::records::BatchRecord =
        serde_json::from_slice(&store.get(&bucket, &state_keys::batch(BATCH_ID)).await?.body)?;
    let counts = record.harvest.context("no counts on the batch record")?;
    ensure!(
        labels.len() as u64 == counts.labelled && counts.duplicates == 0,
        "{} labels, {counts:?}",
        labels.len()
    );
    Ok((elapsed, if shards > 1 { planned } else { Duration::ZERO }))
}

pub async fn scale_harvest(args: &ScaleHarvestArgs) -> anyhow::Result<()> {
    let store = if args.store == "memory" {
        format!("in memory, {} ms per store request", args.latency_ms)
    } else {
        "moto".to_owned()
    };
    header(&format!(
        "sharded harvest: {} answers, shards {:?}, {} rounds ({store})",
        args.lines, args.shards, args.rounds
    ));
    let task = Arc::new(Task::default_task()?);
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); args.shards.len()];
    let mut plans: Vec<Vec<Duration>> = vec![Vec::new(); args.shards.len()];
    for round in 0..args.rounds.max(1) {
        for (i, shards) in args.shards.iter().enumerate() {
            let (elapsed, planned) = run_once(args, &task, (*shards).max(1), round).await?;
            eprintln!(
                "round {round}: {shards} shard(s) {:.1} s (plan {:.1} s)",
                elapsed.as_secs_f64(),
                planned.as_secs_f64()
            );
            times[i].push(elapsed);
            plans[i].push(planned);
        }
    }
    let base = median(&times[0]).as_secs_f64();
    println!();
    println!(
        "| shards | answers | seconds (median) | of which planning | answers/s | vs {} shard(s) | load |",
        args.shards[0]
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for (i, shards) in args.shards.iter().enumerate() {
        let seconds = median(&times[i]).as_secs_f64();
        println!(
            "| {shards} | {} | {seconds:.1} | {:.1} | {:.0} | {:.2}× | {} |",
            args.lines,
            median(&plans[i]).as_secs_f64(),
            args.lines as f64 / seconds,
            base / seconds,
            load()
        );
    }
    Ok(())
}

//! The local stack: moto server as S3 and SQS, with the resources `template.yaml` declares.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_sqs::types::QueueAttributeName;
use serde_norway::Value;
use shotlabel_localstack::{
    BUCKET_LOGICAL_ID, MotoServer, QUEUES, create_resources, s3_client, sqs_client,
};

#[tokio::test]
async fn moto_serves_s3_and_sqs_with_the_templates_resources() -> anyhow::Result<()> {
    let moto = MotoServer::start().await?;
    assert!(moto.endpoint().starts_with("http://127.0.0.1:"));
    let config = moto.sdk_config().await;
    let resources = create_resources(&config, "shotlabel-test").await?;
    // Creating them again (a second `shotlabel local` on the same server) is harmless.
    assert_eq!(
        create_resources(&config, "shotlabel-test").await?,
        resources
    );

    let s3 = s3_client(&config);
    let key = "incoming/a b+c/ünïcode.png";
    s3.put_object()
        .bucket(&resources.bucket)
        .key(key)
        .body(ByteStream::from_static(b"not really a png"))
        .send()
        .await?;
    let got = s3
        .get_object()
        .bucket(&resources.bucket)
        .key(key)
        .send()
        .await?;
    assert_eq!(
        got.body.collect().await?.into_bytes().as_ref(),
        b"not really a png"
    );

    // Conditional writes are what later issues rely on for idempotence: moto honours them.
    let second = s3
        .put_object()
        .bucket(&resources.bucket)
        .key(key)
        .if_none_match("*")
        .body(ByteStream::from_static(b"again"))
        .send()
        .await;
    assert!(second.is_err(), "If-None-Match: * must refuse to overwrite");

    let sqs = sqs_client(&config);
    for (url, dlq_url, logical_id) in [
        (
            &resources.pending_queue_url,
            &resources.pending_dead_letter_queue_url,
            "PendingQueue",
        ),
        (
            &resources.harvest_queue_url,
            &resources.harvest_dead_letter_queue_url,
            "HarvestQueue",
        ),
    ] {
        let spec = QUEUES
            .iter()
            .find(|q| q.logical_id == logical_id)
            .ok_or_else(|| anyhow::anyhow!("no queue spec {logical_id}"))?;
        let attributes = sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await?
            .attributes
            .unwrap_or_default();
        assert_eq!(
            attributes
                .get(&QueueAttributeName::VisibilityTimeout)
                .map(String::as_str),
            Some(spec.visibility_timeout.to_string().as_str()),
            "{}",
            spec.logical_id
        );
        let redrive: serde_json::Value = serde_json::from_str(
            attributes
                .get(&QueueAttributeName::RedrivePolicy)
                .map(String::as_str)
                .unwrap_or("{}"),
        )?;
        let dlq_arn = sqs
            .get_queue_attributes()
            .queue_url(dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await?
            .attributes
            .unwrap_or_default()
            .remove(&QueueAttributeName::QueueArn)
            .unwrap_or_default();
        assert_eq!(redrive["deadLetterTargetArn"], dlq_arn.as_str());
        assert_eq!(
            redrive["maxReceiveCount"].as_u64(),
            Some(u64::from(spec.max_receive_count))
        );

        sqs.send_message()
            .queue_url(url)
            .message_body("{\"hello\":1}")
            .send()
            .await?;
        let received = sqs
            .receive_message()
            .queue_url(url)
            .wait_time_seconds(1)
            .send()
            .await?
            .messages
            .unwrap_or_default();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].body.as_deref(), Some("{\"hello\":1}"));
    }
    Ok(())
}

fn template() -> anyhow::Result<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../template.yaml");
    Ok(serde_norway::from_str(&std::fs::read_to_string(path)?)?)
}

/// Strips a CloudFormation short-form tag (`!GetAtt X.Arn`) down to its value.
fn untag(value: &Value) -> &Value {
    match value {
        Value::Tagged(tagged) => &tagged.value,
        other => other,
    }
}

#[test]
fn the_local_stack_creates_what_the_template_declares() -> anyhow::Result<()> {
    let template = template()?;
    let resources = template["Resources"]
        .as_mapping()
        .ok_or_else(|| anyhow::anyhow!("template has no Resources"))?;
    let of_type = |t: &str| -> Vec<String> {
        resources
            .iter()
            .filter(|(_, r)| r["Type"].as_str() == Some(t))
            .filter_map(|(k, _)| k.as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(
        of_type("AWS::S3::Bucket"),
        vec![BUCKET_LOGICAL_ID.to_owned()]
    );

    let mut declared_queues = of_type("AWS::SQS::Queue");
    declared_queues.sort();
    let mut harness_queues: Vec<String> = QUEUES
        .iter()
        .flat_map(|q| [q.logical_id.to_owned(), q.dead_letter_logical_id.to_owned()])
        .collect();
    harness_queues.sort();
    assert_eq!(declared_queues, harness_queues);

    for spec in QUEUES {
        let props = &template["Resources"][spec.logical_id]["Properties"];
        assert_eq!(
            props["VisibilityTimeout"].as_u64(),
            Some(u64::from(spec.visibility_timeout)),
            "{}",
            spec.logical_id
        );
        let redrive = &props["RedrivePolicy"];
        assert_eq!(
            redrive["maxReceiveCount"].as_u64(),
            Some(u64::from(spec.max_receive_count))
        );
        let target = untag(&redrive["deadLetterTargetArn"])
            .as_str()
            .unwrap_or_default();
        assert_eq!(target, format!("{}.Arn", spec.dead_letter_logical_id));
    }
    Ok(())
}

#[test]
fn each_function_is_built_from_its_folder() -> anyhow::Result<()> {
    let template = template()?;
    for (logical_id, binary) in [
        ("EnqueueFunction", "enqueue"),
        ("SubmitFunction", "submit"),
        ("WebhookFunction", "webhook"),
    ] {
        let function = &template["Resources"][logical_id];
        assert_eq!(function["Type"].as_str(), Some("AWS::Serverless::Function"));
        assert_eq!(
            function["Metadata"]["BuildMethod"].as_str(),
            Some("rust-cargolambda")
        );
        assert_eq!(
            function["Metadata"]["BuildProperties"]["Binary"].as_str(),
            Some(binary)
        );
        assert_eq!(function["Properties"]["CodeUri"].as_str(), Some("."));
        let folder = format!(
            "{}/../functions/{binary}/src/main.rs",
            env!("CARGO_MANIFEST_DIR")
        );
        assert!(std::path::Path::new(&folder).is_file(), "{folder}");
    }
    Ok(())
}

#[tokio::test]
async fn object_events_under_the_input_prefix_reach_the_events_queue() -> anyhow::Result<()> {
    let moto = shotlabel_localstack::MotoServer::start().await?;
    let config = moto.sdk_config().await;
    let resources = shotlabel_localstack::create_resources(&config, "events-test").await?;
    let url =
        shotlabel_localstack::route_object_events(&config, &resources, "events-test", "incoming/")
            .await?;
    let s3 = shotlabel_localstack::s3_client(&config);
    for key in ["incoming/a b.png", "labels/a b.png.json"] {
        s3.put_object()
            .bucket(&resources.bucket)
            .key(key)
            .body(aws_sdk_s3::primitives::ByteStream::from_static(b"x"))
            .send()
            .await?;
    }
    let sqs = shotlabel_localstack::sqs_client(&config);
    let messages = sqs
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .send()
        .await?
        .messages
        .unwrap_or_default();
    let events: Vec<aws_lambda_events::event::s3::S3Event> = messages
        .iter()
        .filter_map(|m| {
            shotlabel_localstack::lambda_s3_event(m.body.as_deref().unwrap_or_default())
        })
        .filter_map(|v| serde_json::from_value(v).ok())
        .filter(|e: &aws_lambda_events::event::s3::S3Event| !e.records.is_empty())
        .collect();
    assert_eq!(
        events.len(),
        1,
        "only the input prefix notifies: {messages:?}"
    );
    let record = &events[0].records[0];
    let key = shotlabel_core::s3_key::decode_event_key(
        record.s3.object.key.as_deref().unwrap_or_default(),
    )?;
    assert_eq!(key, "incoming/a b.png");
    assert!(
        record
            .event_name
            .as_deref()
            .is_some_and(|n| n.starts_with("ObjectCreated:"))
    );
    Ok(())
}

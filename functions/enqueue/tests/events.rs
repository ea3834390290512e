//! The enqueue handler's reading of real S3 event JSON.

use aws_lambda_events::event::s3::S3Event;
use enqueue::new_objects;

fn load(name: &str) -> anyhow::Result<S3Event> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

#[test]
fn created_objects_are_read_with_decoded_keys() -> anyhow::Result<()> {
    let objects = new_objects(&load("s3-put.json")?);
    let keys: Vec<&str> = objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "incoming/my screenshot (1).png",
            "incoming/café/日本 ✓.png",
            "incoming/a+b.png",
        ],
        "the ObjectRemoved record is left out"
    );
    let first = &objects[0];
    assert_eq!(first.bucket, "shotlabel-bucket");
    assert_eq!(first.size, 153092);
    assert_eq!(first.etag, "0123456789abcdef0123456789abcdef");
    assert_eq!(
        first.version_id.as_deref(),
        Some("3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY")
    );
    assert_eq!(objects[1].version_id, None);
    assert_eq!(objects[2].etag, "quoted-etag", "quotes are stripped");
    Ok(())
}

#[test]
fn moto_encoded_slashes_are_decoded() -> anyhow::Result<()> {
    let objects = new_objects(&load("s3-put-moto.json")?);
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].key, "incoming/nested/deep name.png");
    Ok(())
}

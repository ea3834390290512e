//! Task loading, validation and hashing.

use std::path::PathBuf;

use serde_json::json;
use shotlabel_core::task::{Task, TaskError};

fn tasks_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tasks")
}

fn default_toml() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(
        tasks_dir().join("website-judgement.toml"),
    )?)
}

#[test]
fn default_task_is_the_notebooks_website_judgement() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let spec = task.spec();
    assert_eq!(task.name(), "website-judgement");
    assert_eq!(task.model(), "google/gemma-3-27b-instruct/bf-16");
    assert_eq!(spec.user_text, "Classify this screenshot.");
    assert_eq!(spec.temperature, 0.1);
    assert_eq!(spec.max_tokens, 300);
    assert_eq!(spec.image.max_side, 896);
    assert_eq!(spec.image.jpeg_quality, 85);
    // The rubric, not a one-liner: both questions and every score are explained.
    for needle in [
        "landing_page",
        "aesthetic",
        "1 =",
        "2 =",
        "3 =",
        "4 =",
        "5 =",
    ] {
        assert!(
            spec.system_prompt.contains(needle),
            "system prompt lacks {needle:?}"
        );
    }
    assert_eq!(task.version().len(), 16);
    Ok(())
}

#[test]
fn default_task_accepts_good_answers_and_rejects_bad_ones() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    assert!(
        task.validate_answer(&json!({"landing_page": true, "aesthetic": 4}))
            .is_ok()
    );
    assert!(
        task.validate_answer(&json!({"landing_page": false, "aesthetic": 1}))
            .is_ok()
    );
    for bad in [
        json!({"landing_page": true, "aesthetic": 6}),
        json!({"landing_page": true, "aesthetic": 0}),
        json!({"landing_page": true, "aesthetic": 3.5}),
        json!({"landing_page": "yes", "aesthetic": 3}),
        json!({"landing_page": true}),
        json!({"landing_page": true, "aesthetic": 3, "extra": 1}),
        json!([true, 3]),
    ] {
        let problems = task
            .validate_answer(&bad)
            .expect_err(&format!("{bad} should be rejected"));
        assert!(!problems.is_empty());
    }
    let problems = task
        .validate_answer(&json!({"landing_page": true, "aesthetic": 9}))
        .expect_err("out of range");
    assert!(
        problems.iter().any(|p| p.starts_with("/aesthetic")),
        "{problems:?}"
    );
    Ok(())
}

#[test]
fn caption_task_is_configuration_only() -> anyhow::Result<()> {
    let task = Task::from_path(&tasks_dir().join("caption.toml"))?;
    assert_eq!(task.name(), "caption");
    assert!(
        task.validate_answer(&json!({"caption": "A pricing page.", "tags": ["pricing", "web"]}))
            .is_ok()
    );
    assert!(
        task.validate_answer(&json!({"caption": "", "tags": ["x"]}))
            .is_err()
    );
    assert!(
        task.validate_answer(&json!({"caption": "x", "tags": []}))
            .is_err()
    );
    assert_ne!(task.version(), Task::default_task()?.version());
    Ok(())
}

#[test]
fn the_same_task_in_json_has_the_same_version() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let as_json = serde_json::to_string_pretty(task.spec())?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("task.json");
    std::fs::write(&path, as_json)?;
    let reloaded = Task::from_path(&path)?;
    assert_eq!(reloaded.version(), task.version());
    assert_eq!(reloaded, task);
    Ok(())
}

#[test]
fn version_ignores_key_order_and_description_but_not_content() -> anyhow::Result<()> {
    let base = Task::default_task()?;
    let mut spec = base.spec().clone();

    // Reordering schema keys changes nothing.
    let mut reordered = serde_json::Map::new();
    let schema = spec
        .response_schema
        .schema
        .as_object()
        .cloned()
        .unwrap_or_default();
    for (k, v) in schema.into_iter().rev() {
        reordered.insert(k, v);
    }
    spec.response_schema.schema = serde_json::Value::Object(reordered);
    spec.description = Some("another description".into());
    spec.name = "renamed".into();
    assert_eq!(Task::new(spec.clone())?.version(), base.version());

    let changed = |f: &dyn Fn(&mut shotlabel_core::task::TaskSpec)| -> anyhow::Result<String> {
        let mut s = base.spec().clone();
        f(&mut s);
        Ok(Task::new(s)?.version().to_owned())
    };
    let versions = [
        changed(&|s| s.model = "other/model".into())?,
        changed(&|s| s.system_prompt.push('.'))?,
        changed(&|s| s.user_text = "Judge this.".into())?,
        changed(&|s| s.temperature = 0.2)?,
        changed(&|s| s.max_tokens = 301)?,
        changed(&|s| s.image.max_side = 768)?,
        changed(&|s| s.image.jpeg_quality = 90)?,
        changed(&|s| s.response_schema.name = "other".into())?,
    ];
    for v in &versions {
        assert_ne!(v, base.version());
    }
    let unique: std::collections::HashSet<_> = versions.iter().collect();
    assert_eq!(unique.len(), versions.len());
    Ok(())
}

#[test]
fn version_is_stable_across_releases() -> anyhow::Result<()> {
    // Labels already in buckets carry this value: changing the hash function or the
    // default task must be deliberate, and this test says so.
    assert_eq!(Task::default_task()?.version(), EXPECTED_DEFAULT_VERSION);
    Ok(())
}

const EXPECTED_DEFAULT_VERSION: &str = "c738c52b78a7dd0a";

fn load_toml(text: &str) -> Result<Task, TaskError> {
    Task::from_toml_str(text, "test task")
}

#[test]
fn an_invalid_json_schema_is_refused_with_a_clear_error() -> anyhow::Result<()> {
    let text = default_toml()?.replace("type = \"boolean\"", "type = \"yes-or-no\"");
    let err = load_toml(&text).expect_err("bad schema type");
    let msg = err.to_string();
    assert!(msg.contains("response_schema.schema"), "{msg}");
    assert!(msg.contains("not a valid JSON Schema"), "{msg}");
    Ok(())
}

#[test]
fn a_schema_that_strict_mode_rejects_is_refused() -> anyhow::Result<()> {
    let text = default_toml()?.replace(
        "required = [\"landing_page\", \"aesthetic\"]",
        "required = [\"landing_page\"]",
    );
    let msg = load_toml(&text).expect_err("missing required").to_string();
    assert!(msg.contains("strict mode"), "{msg}");
    assert!(msg.contains("aesthetic"), "{msg}");

    let text = default_toml()?.replace("additionalProperties = false\n", "");
    let msg = load_toml(&text).expect_err("open object").to_string();
    assert!(msg.contains("additionalProperties"), "{msg}");
    Ok(())
}

#[test]
fn bad_fields_are_named() -> anyhow::Result<()> {
    let cases = [
        ("temperature = 0.1", "temperature = 7.0", "temperature"),
        ("max_tokens = 300", "max_tokens = 0", "max_tokens"),
        ("max_side = 896", "max_side = 4", "image.max_side"),
        (
            "jpeg_quality = 85",
            "jpeg_quality = 0",
            "image.jpeg_quality",
        ),
        (
            "name = \"website-judgement\"",
            "name = \"no spaces allowed\"",
            "name",
        ),
        (
            "model = \"google/gemma-3-27b-instruct/bf-16\"",
            "model = \" \"",
            "model",
        ),
    ];
    for (from, to, field) in cases {
        let text = default_toml()?.replace(from, to);
        assert_ne!(text, default_toml()?, "{from} not found in the task file");
        let msg = load_toml(&text).expect_err(to).to_string();
        assert!(msg.contains(field), "{to}: {msg}");
    }
    Ok(())
}

#[test]
fn unreadable_and_malformed_files_say_what_and_where() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.toml");
    let msg = Task::from_path(&missing).expect_err("missing").to_string();
    assert!(msg.contains("missing.toml"), "{msg}");

    let yaml = dir.path().join("task.yaml");
    std::fs::write(&yaml, "name: x")?;
    let msg = Task::from_path(&yaml).expect_err("yaml").to_string();
    assert!(msg.contains(".toml or .json"), "{msg}");

    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "name = \"x\"\nmodel = ")?;
    let msg = Task::from_path(&broken).expect_err("broken").to_string();
    assert!(msg.contains("broken.toml") && msg.contains("TOML"), "{msg}");

    let unknown =
        default_toml()?.replace("temperature = 0.1", "temperature = 0.1\ntemprature = 0.3");
    let msg = load_toml(&unknown).expect_err("typo").to_string();
    assert!(msg.contains("temprature"), "{msg}");
    Ok(())
}

#[test]
fn request_body_carries_prompt_image_and_strict_schema() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let body = task.chat_completion_body("data:image/jpeg;base64,AAAA");
    assert_eq!(body["model"], "google/gemma-3-27b-instruct/bf-16");
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][0]["content"], task.spec().system_prompt);
    assert_eq!(
        body["messages"][1]["content"][0]["text"],
        "Classify this screenshot."
    );
    assert_eq!(
        body["messages"][1]["content"][1]["image_url"]["url"],
        "data:image/jpeg;base64,AAAA"
    );
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(body["response_format"]["json_schema"]["strict"], true);
    assert_eq!(
        body["response_format"]["json_schema"]["name"],
        "website_judgement"
    );
    assert_eq!(
        body["response_format"]["json_schema"]["schema"],
        task.spec().response_schema.schema
    );
    assert_eq!(body["temperature"], 0.1);
    assert_eq!(body["max_tokens"], 300);
    Ok(())
}

//! Reading output and error lines into labels or retries, with lines written the way
//! providers write them.

use std::path::PathBuf;

use serde_json::{Value, json};
use shotlabel_core::answer::{
    Answer, LineOutcome, MAX_EXCERPT_CHARS, MAX_REASON_CHARS, RetryReason, Usage, extract_json,
    interpret_line,
};
use shotlabel_core::batch_api::OutputLine;
use shotlabel_core::records::Stage;
use shotlabel_core::task::Task;

/// A successful output line exactly as the provider writes it (the seed's format).
const OK_LINE: &str = r#"{"id":"batch_req_1","custom_id":"x-0","response":{"status_code":200,"request_id":"req_1","body":{"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"{\"landing_page\":true,\"aesthetic\":4}"},"finish_reason":"stop"}],"usage":{"prompt_tokens":300,"completion_tokens":12,"total_tokens":312}}},"error":null}"#;

fn parse(text: &str) -> anyhow::Result<OutputLine> {
    Ok(serde_json::from_str(text)?)
}

/// The JSON text of a 200 output line whose first choice has this message content and
/// finish reason, serialised and parsed back as the harvester would read it.
fn line_text(content: Value, finish_reason: &str) -> String {
    json!({
        "id": "batch_req_7",
        "custom_id": "x-7",
        "response": {
            "status_code": 200,
            "request_id": "req_7",
            "body": {
                "id": "chatcmpl-7",
                "object": "chat.completion",
                "created": 1_753_904_469,
                "model": "google/gemma-3-27b-instruct/bf-16",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason,
                }],
                "usage": {"prompt_tokens": 290, "completion_tokens": 20, "total_tokens": 310},
            },
        },
        "error": null,
    })
    .to_string()
}

fn content_line(content: &str) -> anyhow::Result<OutputLine> {
    parse(&line_text(json!(content), "stop"))
}

fn website() -> anyhow::Result<Task> {
    Ok(Task::default_task()?)
}

fn caption() -> anyhow::Result<Task> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tasks/caption.toml");
    Ok(Task::from_path(&path)?)
}

fn expect_answer(outcome: LineOutcome) -> Answer {
    match outcome {
        LineOutcome::Answer(answer) => answer,
        LineOutcome::Retry(retry) => panic!("expected an answer, got a retry: {retry}"),
    }
}

fn expect_retry(outcome: LineOutcome) -> RetryReason {
    match outcome {
        LineOutcome::Retry(retry) => retry,
        LineOutcome::Answer(answer) => panic!("expected a retry, got an answer: {answer:?}"),
    }
}

fn usage(prompt: u64, completion: u64, total: u64) -> Option<Usage> {
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: total,
    })
}

#[test]
fn valid_answer_keeps_label_and_provenance() -> anyhow::Result<()> {
    let answer = expect_answer(interpret_line(&parse(OK_LINE)?, &website()?));
    assert_eq!(answer.label, json!({"landing_page": true, "aesthetic": 4}));
    assert_eq!(answer.request_id.as_deref(), Some("req_1"));
    assert_eq!(answer.model.as_deref(), Some("m"));
    assert_eq!(answer.finish_reason.as_deref(), Some("stop"));
    assert_eq!(answer.usage, usage(300, 12, 312));
    Ok(())
}

#[test]
fn fenced_json_block_is_accepted() -> anyhow::Result<()> {
    let line = content_line("```json\n{\"landing_page\": false, \"aesthetic\": 2}\n```\n")?;
    let answer = expect_answer(interpret_line(&line, &website()?));
    assert_eq!(answer.label, json!({"landing_page": false, "aesthetic": 2}));
    assert_eq!(answer.usage, usage(290, 20, 310));
    Ok(())
}

#[test]
fn fenced_block_with_prose_around_is_accepted() -> anyhow::Result<()> {
    let line = content_line(
        "Here is my judgement of the screenshot:\n\n```\n{\"landing_page\": true, \"aesthetic\": 5}\n```\n\nThe page is polished and clearly a home page.",
    )?;
    let answer = expect_answer(interpret_line(&line, &website()?));
    assert_eq!(answer.label, json!({"landing_page": true, "aesthetic": 5}));
    Ok(())
}

#[test]
fn aesthetic_out_of_range_is_a_validate_retry_naming_the_field() -> anyhow::Result<()> {
    let line = content_line(r#"{"landing_page": true, "aesthetic": 7}"#)?;
    let retry = expect_retry(interpret_line(&line, &website()?));
    assert_eq!(retry.stage, Stage::Validate);
    assert!(retry.reason.contains("/aesthetic"), "{}", retry.reason);
    assert!(retry.reason.contains("schema"), "{}", retry.reason);
    assert!(!retry.reason.contains("/landing_page"), "{}", retry.reason);
    // The attempt still cost tokens.
    assert_eq!(retry.usage, usage(290, 20, 310));
    Ok(())
}

#[test]
fn extra_property_is_a_validate_retry() -> anyhow::Result<()> {
    let line = content_line(
        r#"{"landing_page": true, "aesthetic": 3, "comment": "a clean hero section"}"#,
    )?;
    let retry = expect_retry(interpret_line(&line, &website()?));
    assert_eq!(retry.stage, Stage::Validate);
    assert!(retry.reason.contains("comment"), "{}", retry.reason);
    Ok(())
}

#[test]
fn string_true_instead_of_boolean_is_a_validate_retry() -> anyhow::Result<()> {
    let line = content_line(r#"{"landing_page": "true", "aesthetic": 4}"#)?;
    let retry = expect_retry(interpret_line(&line, &website()?));
    assert_eq!(retry.stage, Stage::Validate);
    assert!(retry.reason.contains("/landing_page"), "{}", retry.reason);
    assert!(!retry.reason.contains("/aesthetic"), "{}", retry.reason);
    Ok(())
}

#[test]
fn every_violation_is_listed() -> anyhow::Result<()> {
    let line = content_line(r#"{"landing_page": "yes", "aesthetic": 0}"#)?;
    let retry = expect_retry(interpret_line(&line, &website()?));
    assert!(retry.reason.contains("/landing_page"), "{}", retry.reason);
    assert!(retry.reason.contains("/aesthetic"), "{}", retry.reason);
    Ok(())
}

#[test]
fn finish_reason_length_is_retried_even_when_the_text_parses() -> anyhow::Result<()> {
    let line = parse(&line_text(
        json!(r#"{"landing_page": true, "aesthetic": 4}"#),
        "length",
    ))?;
    let retry = expect_retry(interpret_line(&line, &website()?));
    assert_eq!(retry.stage, Stage::Validate);
    assert!(
        retry.reason.contains("cut off at max_tokens"),
        "{}",
        retry.reason
    );
    assert_eq!(retry.usage, usage(290, 20, 310));
    Ok(())
}

#[test]
fn non_json_content_is_retried_with_an_excerpt() -> anyhow::Result<()> {
    let line = content_line("Sorry, I cannot tell what this page is.")?;
    let retry = expect_retry(interpret_line(&line, &website()?));
    assert_eq!(retry.stage, Stage::Validate);
    assert!(
        retry.reason.contains("cannot be read as JSON"),
        "{}",
        retry.reason
    );
    assert!(
        retry
            .reason
            .contains("Sorry, I cannot tell what this page is."),
        "{}",
        retry.reason
    );
    Ok(())
}

#[test]
fn very_long_garbage_gives_a_bounded_reason() -> anyhow::Result<()> {
    let garbage = "lorem ipsum dolor sit amet ".repeat(10_000);
    let line = content_line(&garbage)?;
    let retry = expect_retry(interpret_line(&line, &website()?));
    assert_eq!(retry.stage, Stage::Validate);
    assert!(
        retry.reason.contains("cannot be read as JSON"),
        "{}",
        retry.reason
    );
    assert!(retry.reason.contains("lorem ipsum"), "{}", retry.reason);
    let chars = retry.reason.chars().count();
    assert!(chars <= MAX_REASON_CHARS + 1, "{chars} characters");
    // Only an excerpt of the model's text is quoted.
    assert!(
        retry.reason.matches("lorem").count()
            <= MAX_EXCERPT_CHARS / "lorem ipsum dolor sit amet ".len() + 1,
        "{}",
        retry.reason
    );
    Ok(())
}

#[test]
fn long_values_in_schema_violations_are_bounded() -> anyhow::Result<()> {
    let long = "x".repeat(50_000);
    let answer = json!({"landing_page": long, "aesthetic": long, "a": long, "b": long,
        "c": long, "d": long, "e": long});
    let line = content_line(&answer.to_string())?;
    let retry = expect_retry(interpret_line(&line, &website()?));
    assert_eq!(retry.stage, Stage::Validate);
    assert!(retry.reason.chars().count() <= MAX_REASON_CHARS + 1);
    assert!(!retry.reason.contains(&"x".repeat(MAX_EXCERPT_CHARS + 1)));
    Ok(())
}

#[test]
fn multibyte_text_is_cut_on_character_boundaries() -> anyhow::Result<()> {
    let line = content_line(&"é🙂".repeat(5_000))?;
    let retry = expect_retry(interpret_line(&line, &website()?));
    assert!(retry.reason.contains("é🙂é🙂"), "{}", retry.reason);
    assert!(retry.reason.chars().count() <= MAX_REASON_CHARS + 1);
    Ok(())
}

#[test]
fn error_file_line_is_a_provider_retry() -> anyhow::Result<()> {
    let line = parse(
        r#"{"id":"batch_req_2","custom_id":"x-1","response":null,"error":{"code":"inference_failed","message":"Maximum retries reached"}}"#,
    )?;
    let retry = expect_retry(interpret_line(&line, &website()?));
    assert_eq!(retry.stage, Stage::Provider);
    assert!(
        retry.reason.contains("inference_failed"),
        "{}",
        retry.reason
    );
    assert!(
        retry.reason.contains("Maximum retries reached"),
        "{}",
        retry.reason
    );
    assert_eq!(retry.usage, None);
    Ok(())
}

#[test]
fn error_object_wins_over_a_response() -> anyhow::Result<()> {
    let mut value: Value = serde_json::from_str(OK_LINE)?;
    value["error"] = json!({"code": "batch_expired", "message": "This request could not be executed before the completion window expired."});
    let retry = expect_retry(interpret_line(&parse(&value.to_string())?, &website()?));
    assert_eq!(retry.stage, Stage::Provider);
    assert!(retry.reason.contains("batch_expired"), "{}", retry.reason);
    Ok(())
}

#[test]
fn empty_error_object_next_to_a_good_response_is_ignored() -> anyhow::Result<()> {
    let mut value: Value = serde_json::from_str(OK_LINE)?;
    value["error"] = json!({"code": null, "message": ""});
    let answer = expect_answer(interpret_line(&parse(&value.to_string())?, &website()?));
    assert_eq!(answer.label, json!({"landing_page": true, "aesthetic": 4}));
    // Without a response it is still a failure.
    let bare = parse(r#"{"custom_id":"x-1","response":null,"error":{}}"#)?;
    assert_eq!(
        expect_retry(interpret_line(&bare, &website()?)).stage,
        Stage::Provider
    );
    Ok(())
}

#[test]
fn status_500_is_a_provider_retry_with_the_body_message() -> anyhow::Result<()> {
    let line = parse(
        r#"{"id":"batch_req_3","custom_id":"x-2","response":{"status_code":500,"request_id":"req_3","body":{"error":{"message":"The server had an error while processing your request.","type":"server_error","code":null}}},"error":null}"#,
    )?;
    let retry = expect_retry(interpret_line(&line, &website()?));
    assert_eq!(retry.stage, Stage::Provider);
    assert!(retry.reason.contains("HTTP 500"), "{}", retry.reason);
    assert!(
        retry
            .reason
            .contains("The server had an error while processing your request."),
        "{}",
        retry.reason
    );
    Ok(())
}

#[test]
fn status_400_with_a_valid_looking_body_is_still_a_retry() -> anyhow::Result<()> {
    let mut value: Value = serde_json::from_str(OK_LINE)?;
    value["response"]["status_code"] = json!(400);
    let retry = expect_retry(interpret_line(&parse(&value.to_string())?, &website()?));
    assert_eq!(retry.stage, Stage::Provider);
    assert!(retry.reason.contains("HTTP 400"), "{}", retry.reason);
    Ok(())
}

#[test]
fn missing_or_empty_choices_are_retried() -> anyhow::Result<()> {
    for body in [
        json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "m"}),
        json!({"id": "chatcmpl-1", "model": "m", "choices": []}),
        json!({"id": "chatcmpl-1", "model": "m", "choices": "nope"}),
    ] {
        let text = json!({"id": "batch_req_4", "custom_id": "x-3",
            "response": {"status_code": 200, "request_id": "req_4", "body": body},
            "error": null})
        .to_string();
        let retry = expect_retry(interpret_line(&parse(&text)?, &website()?));
        assert_eq!(retry.stage, Stage::Provider, "{body}");
        assert!(retry.reason.contains("no choices"), "{}", retry.reason);
    }
    Ok(())
}

#[test]
fn missing_body_is_a_provider_retry() -> anyhow::Result<()> {
    let line = parse(r#"{"custom_id":"x-4","response":{"status_code":200,"request_id":"req_5"}}"#)?;
    let retry = expect_retry(interpret_line(&line, &website()?));
    assert_eq!(retry.stage, Stage::Provider);
    assert!(retry.reason.contains("no body"), "{}", retry.reason);

    let neither = parse(r#"{"custom_id":"x-4"}"#)?;
    let retry = expect_retry(interpret_line(&neither, &website()?));
    assert_eq!(retry.stage, Stage::Provider);
    assert!(retry.reason.contains("neither"), "{}", retry.reason);
    Ok(())
}

#[test]
fn content_as_parts_is_joined() -> anyhow::Result<()> {
    let line = parse(&line_text(
        json!([
            {"type": "text", "text": "{\"landing_page\": false,"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": " \"aesthetic\": 1}"},
        ]),
        "stop",
    ))?;
    let answer = expect_answer(interpret_line(&line, &website()?));
    assert_eq!(answer.label, json!({"landing_page": false, "aesthetic": 1}));
    Ok(())
}

#[test]
fn refusal_is_quoted_when_there_is_no_content() -> anyhow::Result<()> {
    let mut value: Value = serde_json::from_str(OK_LINE)?;
    value["response"]["body"]["choices"][0]["message"] = json!({
        "role": "assistant", "content": null, "refusal": "I'm sorry, I can't help with that."
    });
    let retry = expect_retry(interpret_line(&parse(&value.to_string())?, &website()?));
    assert_eq!(retry.stage, Stage::Validate);
    assert!(retry.reason.contains("refused"), "{}", retry.reason);
    assert!(
        retry.reason.contains("I can't help with that."),
        "{}",
        retry.reason
    );
    assert_eq!(retry.usage, usage(300, 12, 312));
    Ok(())
}

#[test]
fn empty_or_missing_content_is_a_validate_retry() -> anyhow::Result<()> {
    for content in [json!(""), json!("  \n "), json!(null), json!([])] {
        let line = parse(&line_text(content.clone(), "stop"))?;
        let retry = expect_retry(interpret_line(&line, &website()?));
        assert_eq!(retry.stage, Stage::Validate, "{content}");
        assert!(retry.reason.contains("empty"), "{}", retry.reason);
    }
    Ok(())
}

#[test]
fn caption_task_accepts_a_caption_and_rejects_a_broken_one() -> anyhow::Result<()> {
    let task = caption()?;
    let good = content_line(
        r#"{"caption": "A pricing page with three plans side by side.", "tags": ["pricing", "web page", "saas"]}"#,
    )?;
    let answer = expect_answer(interpret_line(&good, &task));
    assert_eq!(answer.label["tags"], json!(["pricing", "web page", "saas"]));

    let no_tags = content_line(r#"{"caption": "A login form.", "tags": []}"#)?;
    let retry = expect_retry(interpret_line(&no_tags, &task));
    assert_eq!(retry.stage, Stage::Validate);
    assert!(retry.reason.contains("/tags"), "{}", retry.reason);
    assert!(retry.reason.contains("caption"), "{}", retry.reason);

    // A website-judgement answer is not a caption.
    let retry = expect_retry(interpret_line(&parse(OK_LINE)?, &task));
    assert_eq!(retry.stage, Stage::Validate);
    Ok(())
}

#[test]
fn tolerant_of_odd_fields() -> anyhow::Result<()> {
    // No status code, counts as strings, no total, body double-encoded as a string.
    let body = json!({
        "model": "m",
        "choices": [{"message": {"content": "{\"landing_page\":true,\"aesthetic\":2}"}}],
        "usage": {"prompt_tokens": "100", "completion_tokens": 5.0},
    });
    let text = json!({"custom_id": 17, "response": {"body": body.to_string()}}).to_string();
    let answer = expect_answer(interpret_line(&parse(&text)?, &website()?));
    assert_eq!(answer.label, json!({"landing_page": true, "aesthetic": 2}));
    assert_eq!(answer.usage, usage(100, 5, 105));
    assert_eq!(answer.request_id, None);
    assert_eq!(answer.finish_reason, None);

    // Usage that is not an object, or has no counts, is absent.
    let mut value: Value = serde_json::from_str(OK_LINE)?;
    value["response"]["body"]["usage"] = json!({"cached": true});
    let answer = expect_answer(interpret_line(&parse(&value.to_string())?, &website()?));
    assert_eq!(answer.usage, None);
    Ok(())
}

#[test]
fn never_panics_on_strange_lines() -> anyhow::Result<()> {
    let task = website()?;
    let bodies = [
        json!(null),
        json!(42),
        json!("not json at all"),
        json!([1, 2, 3]),
        json!({"choices": [null]}),
        json!({"choices": [{"message": "hello"}]}),
        json!({"choices": [{"message": {"content": 12}}]}),
        json!({"choices": [{"message": {"content": [null, 3, {"text": 5}]}}]}),
        json!({"choices": [{"message": {"content": "```"}}]}),
        json!({"choices": [{"message": {"content": "```json"}}]}),
        json!({"choices": [{"message": {"content": "}{"}}]}),
        json!({"choices": [{"finish_reason": 3, "message": {"content": "{"}}]}),
        json!({"error": "overloaded"}),
        json!({"usage": {"prompt_tokens": -1, "total_tokens": 1e300}}),
    ];
    for body in bodies {
        for status in [json!(200), json!(0), json!("503"), json!(null)] {
            let text = json!({"custom_id": "x", "response": {"status_code": status, "body": body}})
                .to_string();
            let outcome = interpret_line(&parse(&text)?, &task);
            let retry = expect_retry(outcome);
            assert!(retry.stage == Stage::Provider || retry.stage == Stage::Validate);
            assert!(!retry.reason.is_empty());
        }
    }
    Ok(())
}

#[test]
fn retry_reason_displays_stage_and_reason() -> anyhow::Result<()> {
    let line = parse(
        r#"{"custom_id":"x-1","response":null,"error":{"code":"batch_expired","message":"expired"}}"#,
    )?;
    let outcome = interpret_line(&line, &website()?);
    assert_eq!(outcome.usage(), None);
    let retry = expect_retry(outcome);
    assert_eq!(
        retry.to_string(),
        "provider: the provider reported an error (batch_expired): expired"
    );
    Ok(())
}

#[test]
fn extract_json_accepts_what_models_write() -> anyhow::Result<()> {
    let expected = json!({"landing_page": true, "aesthetic": 4});
    for content in [
        r#"{"landing_page": true, "aesthetic": 4}"#,
        "  \n\t{\"landing_page\": true, \"aesthetic\": 4}\n\n",
        "\u{feff}{\"landing_page\": true, \"aesthetic\": 4}",
        "```json\n{\"landing_page\": true, \"aesthetic\": 4}\n```",
        "```JSON\n{\"landing_page\": true, \"aesthetic\": 4}\n```",
        "```\n{\"landing_page\": true, \"aesthetic\": 4}\n```",
        "```json {\"landing_page\": true, \"aesthetic\": 4} ```",
        "```json{\"landing_page\": true, \"aesthetic\": 4}```",
        "Sure! Here it is:\n```json\n{\"landing_page\": true, \"aesthetic\": 4}\n```\nLet me know.",
        // An unclosed fence still holds the whole answer.
        "```json\n{\"landing_page\": true, \"aesthetic\": 4}\n",
        // Prose around a bare object.
        "My answer: {\"landing_page\": true, \"aesthetic\": 4}. Thanks!",
    ] {
        assert_eq!(
            extract_json(content).map_err(anyhow::Error::msg)?,
            expected,
            "{content:?}"
        );
    }
    // Values that are not objects come back as they are; the schema rejects them later.
    assert_eq!(
        extract_json("```\ntrue\n```").map_err(anyhow::Error::msg)?,
        json!(true)
    );
    assert_eq!(
        extract_json("[1, 2]").map_err(anyhow::Error::msg)?,
        json!([1, 2])
    );
    // A fence inside a JSON string is part of the value, not a fence.
    assert_eq!(
        extract_json(r#"{"caption": "code: ```x```", "tags": ["code"]}"#)
            .map_err(anyhow::Error::msg)?,
        json!({"caption": "code: ```x```", "tags": ["code"]})
    );
    Ok(())
}

#[test]
fn extract_json_rejects_what_is_not_one_json_value() {
    for (content, says) in [
        ("", "empty"),
        ("   \n ", "empty"),
        (
            "The page is a landing page with a score of 4.",
            "not valid JSON",
        ),
        ("{\"landing_page\": true, \"aesthetic\": ", "not valid JSON"),
        ("```json\n```", "fenced block is empty"),
        (
            "```json\nlanding_page: true\n```",
            "fenced block is not valid JSON",
        ),
        (
            "```json\n{\"a\": 1}\n```\nor\n```json\n{\"a\": 2}\n```",
            "more than one fenced block",
        ),
        ("first {\"a\": 1} then {\"a\": 2}", "not valid JSON"),
    ] {
        match extract_json(content) {
            Ok(value) => panic!("{content:?} gave {value}"),
            Err(problem) => assert!(problem.contains(says), "{content:?}: {problem}"),
        }
    }
}

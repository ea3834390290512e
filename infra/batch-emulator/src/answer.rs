//! Synthetic answers: decode the request's images, then generate JSON that
//! satisfies the request's own schema, seeded from the image bytes.
//!
//! Nothing here looks at what an image shows. The values are noise shaped
//! like an answer, so a pipeline can be exercised without a model.

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::config::{EMULATOR_MODEL, FaultSettings};
use crate::prng::{Prng, draw};

/// Request-level faults, in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFault {
    ErrorLine,
    NonJson,
    SchemaBreak,
    Length,
}

impl RequestFault {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ErrorLine => "error_line",
            Self::NonJson => "non_json",
            Self::SchemaBreak => "schema_break",
            Self::Length => "length",
        }
    }
}

/// What the emulator decided for one request: the full output or error line.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub custom_id: String,
    /// True for a line in the output file, false for the error file.
    pub success: bool,
    pub line: Value,
    pub fault: Option<RequestFault>,
}

/// Per-batch inputs to answering.
#[derive(Debug)]
pub struct AnswerContext<'a> {
    pub seed: u64,
    pub batch_seq: u64,
    pub faults: &'a FaultSettings,
    /// Unix seconds for the completion's `created`.
    pub created: i64,
}

impl AnswerContext<'_> {
    fn prng(&self, custom_id: &str, purpose: &str) -> Prng {
        Prng::from_parts(&[
            purpose.as_bytes(),
            &self.seed.to_le_bytes(),
            &self.batch_seq.to_le_bytes(),
            custom_id.as_bytes(),
        ])
    }

    /// Keyed by batch and custom_id so a resubmitted request can land
    /// differently, yet one run with one seed is reproducible.
    fn fault_hits(&self, custom_id: &str, fault: RequestFault, rate: f64) -> bool {
        rate > 0.0
            && draw(&[
                b"fault",
                fault.as_str().as_bytes(),
                &self.seed.to_le_bytes(),
                &self.batch_seq.to_le_bytes(),
                custom_id.as_bytes(),
            ]) < rate
    }
}

/// Builds an error line.
pub fn error_line(id: &str, custom_id: &str, code: &str, message: &str) -> Value {
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": null,
        "error": { "code": code, "message": message },
    })
}

/// Answers one request line's `body`.
pub fn answer_request(custom_id: &str, body: &Value, ctx: &AnswerContext<'_>) -> Outcome {
    let mut ids = ctx.prng(custom_id, "ids");
    let line_id = format!("batch_req_{}", ids.hex(32));
    let fail = |code: &str, message: &str, fault| Outcome {
        custom_id: custom_id.to_owned(),
        success: false,
        line: error_line(&line_id, custom_id, code, message),
        fault,
    };

    let inputs = match read_inputs(body) {
        Ok(inputs) => inputs,
        Err(message) => return fail("invalid_image", &message, None),
    };

    if ctx.fault_hits(custom_id, RequestFault::ErrorLine, ctx.faults.error_line) {
        return fail(
            "inference_failed",
            "Maximum retries reached",
            Some(RequestFault::ErrorLine),
        );
    }

    // The answer depends on the seed and the image bytes only, so the same
    // image gets the same answer in any batch, under any custom_id.
    let mut parts: Vec<&[u8]> = vec![b"answer"];
    let seed_bytes = ctx.seed.to_le_bytes();
    parts.push(&seed_bytes);
    if inputs.images.is_empty() {
        parts.push(inputs.text.as_bytes());
    }
    for image in &inputs.images {
        parts.push(image);
    }
    let mut rng = Prng::from_parts(&parts);

    let schema = body
        .pointer("/response_format/json_schema/schema")
        .filter(|s| s.is_object() || s.is_boolean());
    let value = match schema {
        Some(schema) => SchemaGen::new(schema).generate(&mut rng),
        None => json!({
            "note": "synthetic answer from shotlabel-batch-emulator",
            "seed": rng.hex(8),
        }),
    };
    let valid_text = value.to_string();

    let mut content = valid_text.clone();
    let mut finish_reason = "stop";
    let mut fault = None;
    if ctx.fault_hits(custom_id, RequestFault::NonJson, ctx.faults.non_json) {
        content = "Sure! This looks like a web page with a header, some text and a few buttons. \
                   (synthetic answer, not JSON)"
            .to_owned();
        fault = Some(RequestFault::NonJson);
    } else if ctx.fault_hits(
        custom_id,
        RequestFault::SchemaBreak,
        ctx.faults.schema_break,
    ) {
        let broken = match schema {
            Some(schema) => break_schema(schema, value),
            None => json!(["not", "an", "object"]),
        };
        content = broken.to_string();
        fault = Some(RequestFault::SchemaBreak);
    } else if ctx.fault_hits(custom_id, RequestFault::Length, ctx.faults.length) {
        content = truncate(&valid_text, valid_text.chars().count() / 2);
        finish_reason = "length";
        fault = Some(RequestFault::Length);
    }

    // Honour the request's own token cap the way a model would: cut off.
    let max_tokens = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64);
    let mut completion_tokens = tokens_for(&content);
    if let Some(max) = max_tokens
        && completion_tokens > max
    {
        content = truncate(
            &content,
            usize::try_from(max.saturating_mul(4)).unwrap_or(usize::MAX),
        );
        completion_tokens = max;
        finish_reason = "length";
    }

    let prompt_tokens = tokens_for(&inputs.text) + 256 * inputs.images.len() as u64;
    let response_body = json!({
        "id": format!("chatcmpl-{}", ids.alnum(29)),
        "object": "chat.completion",
        "created": ctx.created,
        "model": EMULATOR_MODEL,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": content, "refusal": null },
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": "fp_batch_emulator",
    });
    Outcome {
        custom_id: custom_id.to_owned(),
        success: true,
        line: json!({
            "id": line_id,
            "custom_id": custom_id,
            "response": {
                "status_code": 200,
                "request_id": format!("req_{}", ids.hex(32)),
                "body": response_body,
            },
            "error": null,
        }),
        fault,
    }
}

/// Roughly four characters a token, at least one.
fn tokens_for(text: &str) -> u64 {
    (text.chars().count() as u64 / 4).max(1)
}

/// At least one character shorter than `text` (so cut JSON never parses).
fn truncate(text: &str, keep: usize) -> String {
    let len = text.chars().count();
    let keep = keep.min(len.saturating_sub(1)).max(1.min(len));
    text.chars().take(keep).collect()
}

struct Inputs {
    text: String,
    images: Vec<Vec<u8>>,
}

/// Collects the prompt text and decodes every image, failing like an
/// endpoint would on anything it cannot read.
fn read_inputs(body: &Value) -> Result<Inputs, String> {
    let mut text = String::new();
    let mut images = Vec::new();
    let messages = body.get("messages").and_then(Value::as_array);
    for message in messages.into_iter().flatten() {
        match message.get("content") {
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(items)) => {
                for item in items {
                    match item.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            if let Some(s) = item.get("text").and_then(Value::as_str) {
                                text.push_str(s);
                            }
                        }
                        Some("image_url") => {
                            let url = item
                                .get("image_url")
                                .and_then(|u| u.get("url").or(Some(u)))
                                .and_then(Value::as_str)
                                .ok_or("image_url content item has no url")?;
                            let n = images.len() + 1;
                            images
                                .push(decode_data_uri(url).map_err(|e| format!("image {n}: {e}"))?);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Inputs { text, images })
}

/// Decodes a `data:image/...;base64,...` URI and checks the bytes are an
/// image the `image` crate can fully decode.
pub fn decode_data_uri(url: &str) -> Result<Vec<u8>, String> {
    let rest = url
        .strip_prefix("data:")
        .ok_or("only base64 data URIs are supported, not remote URLs")?;
    let (meta, data) = rest
        .split_once(',')
        .ok_or("malformed data URI (no comma)")?;
    let mut meta_parts = meta.split(';');
    let mime = meta_parts.next().unwrap_or_default().to_ascii_lowercase();
    if !meta_parts.any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err("data URI is not base64-encoded".into());
    }
    if !matches!(
        mime.as_str(),
        "image/png" | "image/jpeg" | "image/jpg" | "image/gif" | "image/webp"
    ) {
        return Err(format!(
            "unsupported image type {mime:?}; use png, jpeg, gif or webp"
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("image data is not valid base64: {e}"))?;
    if bytes.is_empty() {
        return Err("image data is empty".into());
    }
    let decoded =
        image::load_from_memory(&bytes).map_err(|e| format!("image could not be decoded: {e}"))?;
    if decoded.width() == 0 || decoded.height() == 0 {
        return Err("image has no pixels".into());
    }
    Ok(bytes)
}

const WORDS: &[&str] = &[
    "synthetic",
    "page",
    "layout",
    "hero",
    "banner",
    "button",
    "pricing",
    "navigation",
    "footer",
    "gallery",
    "form",
    "article",
    "dashboard",
    "product",
    "landing",
    "grid",
    "modal",
    "sidebar",
    "header",
    "card",
    "chart",
    "table",
    "menu",
    "signup",
    "testimonial",
    "dark",
    "minimal",
    "retro",
    "clean",
    "colorful",
];

const MAX_DEPTH: usize = 32;

/// Generates a value satisfying a JSON Schema (the subset structured outputs
/// use). `pattern`, `multipleOf` on numbers and `not` are ignored.
struct SchemaGen<'a> {
    root: &'a Value,
}

impl<'a> SchemaGen<'a> {
    fn new(root: &'a Value) -> Self {
        Self { root }
    }

    fn generate(&self, rng: &mut Prng) -> Value {
        self.value(self.root, rng, 0)
    }

    fn resolve(&self, reference: &str) -> Option<&'a Value> {
        let pointer = reference.strip_prefix('#')?;
        if pointer.is_empty() {
            return Some(self.root);
        }
        self.root.pointer(pointer)
    }

    /// Follows `$ref` chains (bounded).
    fn deref(&self, mut schema: &'a Value) -> &'a Value {
        for _ in 0..MAX_DEPTH {
            match schema
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| self.resolve(r))
            {
                Some(target) => schema = target,
                None => break,
            }
        }
        schema
    }

    fn value(&self, schema: &'a Value, rng: &mut Prng, depth: usize) -> Value {
        let schema = self.deref(schema);
        let Some(obj) = schema.as_object() else {
            // `true` accepts anything; `false` accepts nothing, null is as good as any.
            return if schema.as_bool() == Some(true) {
                json!("synthetic")
            } else {
                Value::Null
            };
        };
        if depth > MAX_DEPTH {
            return Value::Null;
        }
        if let Some(constant) = obj.get("const") {
            return constant.clone();
        }
        if let Some(options) = obj.get("enum").and_then(Value::as_array)
            && !options.is_empty()
        {
            return options[rng.index(options.len())].clone();
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(first) = obj
                .get(key)
                .and_then(Value::as_array)
                .and_then(|a| a.first())
            {
                return self.value(first, rng, depth + 1);
            }
        }
        match schema_type(obj) {
            "null" => Value::Null,
            "boolean" => Value::Bool(rng.chance(0.5)),
            "integer" => json!(gen_integer(obj, rng)),
            "number" => gen_number(obj, rng),
            "array" => self.array(obj, rng, depth),
            "object" => self.object(obj, rng, depth),
            _ => Value::String(gen_string(obj, rng)),
        }
    }

    fn array(&self, obj: &'a Map<String, Value>, rng: &mut Prng, depth: usize) -> Value {
        let min = obj.get("minItems").and_then(Value::as_u64).unwrap_or(0);
        let max = obj
            .get("maxItems")
            .and_then(Value::as_u64)
            .unwrap_or(min + 4);
        let lo = min.max(1).min(max);
        let hi = max.min(lo + 4);
        let count = rng.range_i64(lo as i64, hi as i64).max(0) as usize;
        let prefix = obj.get("prefixItems").and_then(Value::as_array);
        let unique = obj.get("uniqueItems").and_then(Value::as_bool) == Some(true);
        let default_item = json!({"type": "string"});
        let mut items: Vec<Value> = Vec::with_capacity(count);
        while items.len() < count {
            let idx = items.len();
            let item_schema = prefix
                .and_then(|p| p.get(idx))
                .or_else(|| obj.get("items"))
                .unwrap_or(&default_item);
            let mut item = self.value(item_schema, rng, depth + 1);
            // A few tries for a fresh value; constants can't be made unique.
            let mut tries = 0;
            while unique && items.contains(&item) && tries < 16 {
                item = self.value(item_schema, rng, depth + 1);
                tries += 1;
            }
            if unique && items.contains(&item) {
                break;
            }
            items.push(item);
        }
        Value::Array(items)
    }

    fn object(&self, obj: &'a Map<String, Value>, rng: &mut Prng, depth: usize) -> Value {
        let mut out = Map::new();
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (name, prop) in props {
                out.insert(name.clone(), self.value(prop, rng, depth + 1));
            }
        }
        // Required names without a property schema still need a value.
        for name in obj
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !out.contains_key(name) {
                out.insert(name.to_owned(), json!("synthetic"));
            }
        }
        Value::Object(out)
    }
}

/// The schema's type, taking the first non-null entry of a type list and
/// inferring from keywords when `type` is absent.
fn schema_type(obj: &Map<String, Value>) -> &str {
    match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(types)) => {
            let names: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
            names
                .iter()
                .copied()
                .find(|t| *t != "null")
                .or_else(|| names.first().copied())
                .unwrap_or("string")
        }
        _ if obj.contains_key("properties") || obj.contains_key("required") => "object",
        _ if obj.contains_key("items") || obj.contains_key("prefixItems") => "array",
        _ => "string",
    }
}

fn gen_integer(obj: &Map<String, Value>, rng: &mut Prng) -> i64 {
    let lo = obj
        .get("minimum")
        .and_then(Value::as_f64)
        .map(|v| v.ceil() as i64)
        .or_else(|| {
            obj.get("exclusiveMinimum")
                .and_then(Value::as_f64)
                .map(|v| v.floor() as i64 + 1)
        });
    let hi = obj
        .get("maximum")
        .and_then(Value::as_f64)
        .map(|v| v.floor() as i64)
        .or_else(|| {
            obj.get("exclusiveMaximum")
                .and_then(Value::as_f64)
                .map(|v| v.ceil() as i64 - 1)
        });
    let (lo, hi) = match (lo, hi) {
        (Some(lo), Some(hi)) => (lo, hi),
        (Some(lo), None) => (lo, lo.saturating_add(100)),
        (None, Some(hi)) => (hi.saturating_sub(100), hi),
        (None, None) => (0, 100),
    };
    let mut value = rng.range_i64(lo, hi);
    if let Some(step) = obj
        .get("multipleOf")
        .and_then(Value::as_i64)
        .filter(|s| *s > 0)
    {
        value -= value.rem_euclid(step);
        if value < lo {
            value = value.saturating_add(step);
        }
    }
    value
}

fn gen_number(obj: &Map<String, Value>, rng: &mut Prng) -> Value {
    let lo = obj
        .get("minimum")
        .or_else(|| obj.get("exclusiveMinimum"))
        .and_then(Value::as_f64);
    let hi = obj
        .get("maximum")
        .or_else(|| obj.get("exclusiveMaximum"))
        .and_then(Value::as_f64);
    let (lo, hi) = match (lo, hi) {
        (Some(lo), Some(hi)) => (lo, hi),
        (Some(lo), None) => (lo, lo + 100.0),
        (None, Some(hi)) => (hi - 100.0, hi),
        (None, None) => (0.0, 1.0),
    };
    let mut value = lo + rng.unit() * (hi - lo);
    value = (value * 100.0).round() / 100.0;
    // Rounding can step onto or past a bound; the midpoint is always inside.
    let outside = value < lo
        || value > hi
        || (obj.contains_key("exclusiveMinimum") && value <= lo)
        || (obj.contains_key("exclusiveMaximum") && value >= hi);
    if outside {
        value = lo + (hi - lo) / 2.0;
    }
    serde_json::Number::from_f64(value).map_or(json!(0), Value::Number)
}

fn gen_string(obj: &Map<String, Value>, rng: &mut Prng) -> String {
    let min = obj.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
    let max = obj
        .get("maxLength")
        .and_then(Value::as_u64)
        .map(|m| m as usize);
    let mut s = match obj.get("format").and_then(Value::as_str) {
        Some("date-time") => format!(
            "2024-{:02}-{:02}T{:02}:{:02}:00Z",
            rng.range_i64(1, 12),
            rng.range_i64(1, 28),
            rng.range_i64(0, 23),
            rng.range_i64(0, 59)
        ),
        Some("date") => format!(
            "2024-{:02}-{:02}",
            rng.range_i64(1, 12),
            rng.range_i64(1, 28)
        ),
        Some("email") => format!("synthetic.{}@example.com", rng.alnum(6)),
        Some("uri" | "url") => format!("https://example.com/synthetic/{}", rng.alnum(8)),
        Some("uuid") => rng.uuid(),
        _ => {
            let words = rng.range_i64(1, 4);
            (0..words)
                .map(|_| WORDS[rng.index(WORDS.len())])
                .collect::<Vec<_>>()
                .join(" ")
        }
    };
    while s.chars().count() < min {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[rng.index(WORDS.len())]);
    }
    if let Some(max) = max
        && s.chars().count() > max
    {
        s = s.chars().take(max).collect::<String>();
        let trimmed = s.trim_end();
        if trimmed.chars().count() >= min {
            s = trimmed.to_owned();
        }
    }
    s
}

/// Turns a valid answer into valid JSON that breaks the schema: the first
/// required property gets a value of a type the schema does not allow (or
/// goes missing when no wrong type can be chosen).
pub fn break_schema(schema: &Value, valid: Value) -> Value {
    let generator = SchemaGen::new(schema);
    let root = generator.deref(schema);
    let first_required = root
        .get("required")
        .and_then(Value::as_array)
        .and_then(|r| r.first())
        .and_then(Value::as_str);
    match (valid, first_required) {
        (Value::Object(mut map), Some(name)) => {
            let prop = root
                .get("properties")
                .and_then(|p| p.get(name))
                .map(|p| generator.deref(p));
            match prop.and_then(wrong_type_value) {
                Some(wrong) => {
                    map.insert(name.to_owned(), wrong);
                }
                None => {
                    map.remove(name);
                }
            }
            Value::Object(map)
        }
        (valid, _) => wrong_type_value(root).unwrap_or(valid),
    }
}

/// A value whose JSON type the schema does not allow, if the schema names
/// its types (or an enum to step outside of).
fn wrong_type_value(schema: &Value) -> Option<Value> {
    let allowed: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => {
            let options = schema.get("enum").and_then(Value::as_array)?;
            let outside = json!("schema_break_value");
            return (!options.contains(&outside)).then_some(outside);
        }
    };
    let candidates = [
        ("string", json!("schema_break")),
        ("number", json!(12345.5)),
        ("object", json!({"schema_break": true})),
        ("array", json!(["schema_break"])),
        ("boolean", json!(true)),
    ];
    candidates
        .into_iter()
        .find(|(ty, _)| !allowed.contains(ty))
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated(schema: &Value, seed: u64) -> Value {
        SchemaGen::new(schema).generate(&mut Prng::new(seed))
    }

    #[test]
    fn honours_integer_enum_and_bounds() {
        let schema = json!({"type":"object","properties":{
            "a":{"type":"integer","enum":[1,2,3,4,5]},
            "b":{"type":"integer","minimum":10,"maximum":12},
            "c":{"type":"number","exclusiveMinimum":0,"exclusiveMaximum":1}}});
        for seed in 0..200 {
            let v = generated(&schema, seed);
            let a = v["a"].as_i64().expect("a");
            let b = v["b"].as_i64().expect("b");
            let c = v["c"].as_f64().expect("c");
            assert!((1..=5).contains(&a));
            assert!((10..=12).contains(&b));
            assert!(c > 0.0 && c < 1.0, "{c}");
        }
    }

    #[test]
    fn honours_string_and_array_lengths() {
        let schema = json!({"type":"array","minItems":2,"maxItems":3,
            "items":{"type":"string","minLength":20,"maxLength":25}});
        for seed in 0..200 {
            let v = generated(&schema, seed);
            let items = v.as_array().expect("array");
            assert!((2..=3).contains(&items.len()));
            for item in items {
                let n = item.as_str().expect("string").chars().count();
                assert!((20..=25).contains(&n), "{item}");
            }
        }
    }

    #[test]
    fn follows_refs_and_nullable_types() {
        let schema = json!({"$defs":{"x":{"type":["integer","null"],"minimum":3,"maximum":3}},
            "type":"object","properties":{"x":{"$ref":"#/$defs/x"}}});
        assert_eq!(generated(&schema, 1), json!({"x": 3}));
    }

    #[test]
    fn truncation_never_keeps_the_whole_text() {
        assert_eq!(truncate("{}", 5), "{");
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("", 3), "");
    }
}

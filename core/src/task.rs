//! Tasks: what to ask the model about each image, and what shape the answer must have.
//!
//! A task is configuration, not code: a TOML or JSON file with the model, the prompts,
//! the JSON Schema of the answer, sampling settings and how to prepare images. Loading
//! validates it fully, so a bad task fails at start-up with a clear message instead of
//! at the provider or half-way through a harvest.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// The default task file, compiled in so that every binary has it without a file system.
const DEFAULT_TASK_TOML: &str = include_str!("../../tasks/website-judgement.toml");

/// How images are prepared before they are sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSettings {
    /// The longest side after downscaling, in pixels. Images are never upscaled.
    pub max_side: u32,
    /// JPEG quality of the re-encoded image, 1-100.
    #[serde(default = "default_jpeg_quality")]
    pub jpeg_quality: u8,
}

fn default_jpeg_quality() -> u8 {
    85
}

/// The answer's JSON Schema, sent as an OpenAI strict `json_schema` response format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseSchema {
    /// The schema's name as the provider sees it (`[A-Za-z0-9_-]`, at most 64 characters).
    pub name: String,
    pub schema: Value,
}

/// A task exactly as written in its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub model: String,
    pub system_prompt: String,
    pub user_text: String,
    pub temperature: f64,
    pub max_tokens: u32,
    /// The request field `max_tokens` is sent in. Unset: the provider profile's
    /// (OpenAI deprecates `max_tokens`, and its o-series and newer models refuse it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens_field: Option<TokenLimitField>,
    pub image: ImageSettings,
    pub response_schema: ResponseSchema,
}

/// Which request field carries the completion-token limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenLimitField {
    /// `max_tokens`: what OpenAI-compatible servers (vLLM, Inference.net) read.
    #[default]
    MaxTokens,
    /// `max_completion_tokens`: OpenAI's current field.
    MaxCompletionTokens,
}

impl TokenLimitField {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxTokens => "max_tokens",
            Self::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

/// Why a task could not be loaded. Each variant names the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("cannot read task file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("task file {path} must end in .toml or .json")]
    UnknownFormat { path: String },
    #[error("task file {origin} is not valid {format}: {detail}")]
    Parse {
        origin: String,
        format: &'static str,
        detail: String,
    },
    #[error("task {task:?}: {field}: {problem}")]
    Invalid {
        task: String,
        field: &'static str,
        problem: String,
    },
}

/// A loaded, validated task with its version hash and compiled answer validator.
#[derive(Clone)]
pub struct Task {
    spec: TaskSpec,
    version: String,
    validator: Arc<jsonschema::Validator>,
    /// The request line as text with holes, made on first use
    /// ([`crate::request::LineTemplate`]).
    line_template: OnceLock<Option<Arc<crate::request::LineTemplate>>>,
    /// The task's `max_tokens_field`, or the provider's when the task names none.
    token_field: TokenLimitField,
}

impl fmt::Debug for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("name", &self.spec.name)
            .field("version", &self.version)
            .field("model", &self.spec.model)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Task {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

impl Task {
    /// The built-in default task: the original notebook's website judgement.
    pub fn default_task() -> Result<Self, TaskError> {
        Self::from_toml_str(DEFAULT_TASK_TOML, "built-in website-judgement task")
    }

    /// Loads a task from a `.toml` or `.json` file.
    pub fn from_path(path: &Path) -> Result<Self, TaskError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TaskError::Read {
            path: shown.clone(),
            source,
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("toml") => Self::from_toml_str(&text, &shown),
            Some(ext) if ext.eq_ignore_ascii_case("json") => Self::from_json_str(&text, &shown),
            _ => Err(TaskError::UnknownFormat { path: shown }),
        }
    }

    /// Parses a task written in TOML; `origin` names it in error messages.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, TaskError> {
        let spec: TaskSpec = toml::from_str(text).map_err(|e| TaskError::Parse {
            origin: origin.to_owned(),
            format: "TOML",
            detail: e.message().to_owned(),
        })?;
        Self::new(spec)
    }

    /// Parses a task written in JSON; `origin` names it in error messages.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, TaskError> {
        let spec: TaskSpec = serde_json::from_str(text).map_err(|e| TaskError::Parse {
            origin: origin.to_owned(),
            format: "JSON",
            detail: e.to_string(),
        })?;
        Self::new(spec)
    }

    /// Validates a spec and computes its version.
    pub fn new(spec: TaskSpec) -> Result<Self, TaskError> {
        validate_spec(&spec)?;
        let validator = compile_schema(&spec)?;
        let version = version_hash(&spec);
        Ok(Self {
            token_field: spec.max_tokens_field.unwrap_or_default(),
            spec,
            version,
            validator: Arc::new(validator),
            line_template: OnceLock::new(),
        })
    }

    /// Sends the token limit in the provider's field, unless the task names its own. The
    /// version does not change: the limit is the same, only its name in the request.
    pub fn with_provider_token_field(mut self, field: TokenLimitField) -> Self {
        if self.spec.max_tokens_field.is_none() {
            self.token_field = field;
            self.line_template = OnceLock::new();
        }
        self
    }

    /// The request field the token limit goes in.
    pub fn token_field(&self) -> TokenLimitField {
        self.token_field
    }

    pub fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn model(&self) -> &str {
        &self.spec.model
    }

    pub fn image(&self) -> &ImageSettings {
        &self.spec.image
    }

    /// A stable hash of everything that changes what the model is asked (model, prompts,
    /// schema, sampling, image preparation). It goes into every manifest and label, so
    /// labels made under an older task are recognisable.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// This task's request line with holes for the custom id and the image; `None` when
    /// the task's own text gets in the way (lines are then built as JSON trees).
    pub(crate) fn line_template(&self) -> Option<&crate::request::LineTemplate> {
        self.line_template
            .get_or_init(|| crate::request::LineTemplate::new(self).map(Arc::new))
            .as_deref()
    }

    /// The OpenAI `response_format` for this task's schema, in strict mode.
    pub fn response_format(&self) -> Value {
        json!({
            "type": "json_schema",
            "json_schema": {
                "name": self.spec.response_schema.name,
                "strict": true,
                "schema": self.spec.response_schema.schema,
            }
        })
    }

    /// The `/v1/chat/completions` request body for one image, given as a data URI.
    pub fn chat_completion_body(&self, image_data_uri: &str) -> Value {
        let mut body = json!({
            "model": self.spec.model,
            "messages": [
                {"role": "system", "content": self.spec.system_prompt},
                {"role": "user", "content": [
                    {"type": "text", "text": self.spec.user_text},
                    {"type": "image_url", "image_url": {"url": image_data_uri}},
                ]},
            ],
            "response_format": self.response_format(),
            "temperature": self.spec.temperature,
        });
        body[self.token_field.as_str()] = json!(self.spec.max_tokens);
        body
    }

    /// Checks an answer against the task's schema; on failure, every violation as
    /// `"<json pointer>: <message>"`.
    pub fn validate_answer(&self, answer: &Value) -> Result<(), Vec<String>> {
        let problems: Vec<String> = self
            .validator
            .iter_errors(answer)
            .map(|e| {
                let at = e.instance_path().to_string();
                let at = if at.is_empty() { "/".to_owned() } else { at };
                format!("{at}: {e}")
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

fn invalid(spec: &TaskSpec, field: &'static str, problem: impl Into<String>) -> TaskError {
    TaskError::Invalid {
        task: spec.name.clone(),
        field,
        problem: problem.into(),
    }
}

fn validate_spec(spec: &TaskSpec) -> Result<(), TaskError> {
    let name_ok = !spec.name.is_empty()
        && spec.name.len() <= 64
        && spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        return Err(invalid(
            spec,
            "name",
            "must be 1-64 characters of letters, digits, '-' or '_'",
        ));
    }
    if spec.model.trim().is_empty() {
        return Err(invalid(spec, "model", "must not be empty"));
    }
    if spec.system_prompt.trim().is_empty() {
        return Err(invalid(spec, "system_prompt", "must not be empty"));
    }
    if spec.user_text.trim().is_empty() {
        return Err(invalid(spec, "user_text", "must not be empty"));
    }
    if !(0.0..=2.0).contains(&spec.temperature) {
        return Err(invalid(spec, "temperature", "must be between 0 and 2"));
    }
    if spec.max_tokens == 0 {
        return Err(invalid(spec, "max_tokens", "must be at least 1"));
    }
    if !(16..=8192).contains(&spec.image.max_side) {
        return Err(invalid(
            spec,
            "image.max_side",
            "must be between 16 and 8192 pixels",
        ));
    }
    if !(1..=100).contains(&spec.image.jpeg_quality) {
        return Err(invalid(
            spec,
            "image.jpeg_quality",
            "must be between 1 and 100",
        ));
    }
    let schema_name = &spec.response_schema.name;
    let schema_name_ok = !schema_name.is_empty()
        && schema_name.len() <= 64
        && schema_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !schema_name_ok {
        return Err(invalid(
            spec,
            "response_schema.name",
            "must be 1-64 characters of letters, digits, '-' or '_'",
        ));
    }
    Ok(())
}

fn compile_schema(spec: &TaskSpec) -> Result<jsonschema::Validator, TaskError> {
    let schema = &spec.response_schema.schema;
    if let Err(e) = jsonschema::meta::validate(schema) {
        return Err(invalid(
            spec,
            "response_schema.schema",
            format!("is not a valid JSON Schema: {e}"),
        ));
    }
    let validator = jsonschema::validator_for(schema).map_err(|e| {
        invalid(
            spec,
            "response_schema.schema",
            format!("is not a valid JSON Schema: {e}"),
        )
    })?;
    check_strict_mode(schema, "").map_err(|problem| {
        invalid(
            spec,
            "response_schema.schema",
            format!("cannot be sent in strict mode: {problem}"),
        )
    })?;
    Ok(validator)
}

/// Keywords OpenAI's strict structured outputs refuse (its documented list of unsupported
/// composition and object keywords): a schema using one is rejected by the provider for
/// every request of the batch.
const STRICT_UNSUPPORTED_KEYWORDS: [&str; 13] = [
    "allOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "patternProperties",
    "unevaluatedProperties",
    "propertyNames",
    "minProperties",
    "maxProperties",
];

/// OpenAI's strict structured outputs need an object at the root, every object to list
/// all its properties as required and forbid others, and no keyword it does not support.
/// Providers reject a batch whose schema breaks this, so refuse it at load time.
fn check_strict_mode(schema: &Value, at: &str) -> Result<(), String> {
    let Some(obj) = schema.as_object() else {
        return Ok(());
    };
    let here = if at.is_empty() { "/" } else { at };
    if at.is_empty() && obj.get("type") != Some(&Value::String("object".into())) {
        return Err("the root must have \"type\": \"object\"".into());
    }
    if let Some(keyword) = STRICT_UNSUPPORTED_KEYWORDS
        .iter()
        .find(|k| obj.contains_key(**k))
    {
        return Err(format!(
            "the schema at {here} uses {keyword:?}, which strict mode does not support"
        ));
    }
    let is_object = obj.contains_key("properties")
        || match obj.get("type") {
            Some(Value::String(t)) => t == "object",
            Some(Value::Array(types)) => types.iter().any(|t| t == "object"),
            _ => false,
        };
    if is_object && obj.get("additionalProperties") != Some(&Value::Bool(false)) {
        return Err(format!(
            "the object at {here} must set \"additionalProperties\": false"
        ));
    }
    if let Some(Value::Object(properties)) = obj.get("properties") {
        let required: Vec<&str> = obj
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(missing) = properties.keys().find(|k| !required.contains(&k.as_str())) {
            return Err(format!(
                "the object at {here} must list every property in \"required\" (missing {missing:?})"
            ));
        }
        for (key, sub) in properties {
            check_strict_mode(sub, &format!("{at}/properties/{key}"))?;
        }
    }
    for keyword in ["items", "additionalProperties", "not"] {
        if let Some(sub @ Value::Object(_)) = obj.get(keyword) {
            check_strict_mode(sub, &format!("{at}/{keyword}"))?;
        }
    }
    for keyword in ["anyOf", "allOf", "oneOf", "prefixItems"] {
        if let Some(Value::Array(subs)) = obj.get(keyword) {
            for (i, sub) in subs.iter().enumerate() {
                check_strict_mode(sub, &format!("{at}/{keyword}/{i}"))?;
            }
        }
    }
    for keyword in ["$defs", "definitions"] {
        if let Some(Value::Object(defs)) = obj.get(keyword) {
            for (key, sub) in defs {
                check_strict_mode(sub, &format!("{at}/{keyword}/{key}"))?;
            }
        }
    }
    Ok(())
}

/// Serialises JSON with object keys sorted at every level, so that the hash does not
/// depend on key order in the file or on serde_json's map implementation.
fn canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(key) {
                    canonical_json(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The first 16 hex digits of SHA-256 over the canonical JSON of what the model is asked.
/// `name` and `description` are left out: renaming a task does not change its answers.
fn version_hash(spec: &TaskSpec) -> String {
    let mut hashed = Map::new();
    hashed.insert("model".into(), json!(spec.model));
    hashed.insert("system_prompt".into(), json!(spec.system_prompt));
    hashed.insert("user_text".into(), json!(spec.user_text));
    hashed.insert("temperature".into(), json!(spec.temperature));
    hashed.insert("max_tokens".into(), json!(spec.max_tokens));
    hashed.insert("image".into(), json!(spec.image));
    hashed.insert("response_schema".into(), json!(spec.response_schema));
    let mut canonical = String::new();
    canonical_json(&Value::Object(hashed), &mut canonical);
    let digest = Sha256::digest(canonical.as_bytes());
    hex::encode(&digest[..8])
}

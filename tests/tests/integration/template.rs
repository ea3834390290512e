//! `template.yaml` held against the code.
//!
//! `shotlabel_deploy` declares what each function's deployment needs (`DEPLOYMENTS`), and
//! the variables each binary reads come from its settings type
//! (`shotlabel_core::settings`). Here the template is held to those declarations. The rules:
//!
//! - **Functions.** The template's functions are exactly the declared deployments, each
//!   built with `rust-cargolambda` from the workspace root with `Binary` = its crate's
//!   folder, on `provided.al2023`.
//! - **Environment.** Every variable a function is given is one its code reads. Every
//!   `Env::Required` variable is given unconditionally, every `Env::RequiredIf` one exactly
//!   under its condition. Optional variables (code defaults)
//!   need not be given. A secret's value is never given, only `<NAME>_SECRET_ARN`, which
//!   must name a secret of the template that the function may read. A variable given to
//!   several functions has the same value in each (the task version, the input prefix and
//!   the retry limit must agree across the pipeline).
//! - **IAM.** Each function has its own role, with inline statements only (no managed
//!   policies, so no `*` resources from them). Expanded into (condition, action, resource)
//!   triples, the statements are exactly the deployment's grants: nothing missing, nothing
//!   more. Every resource is named: a prefix of the bucket, the bucket, a queue, a secret,
//!   or the function's own log group; anything else (such as `*`) fails.
//! - **Wiring.** The S3 trigger is on the input prefix only, and the input prefix cannot be
//!   one the pipeline writes to; visibility timeouts outlast the functions that hold the
//!   messages; every dead-letter queue and every function has an alarm; every output the
//!   CLI reads exists; logs are JSON into a log group with a retention.
//! - **Dataset.** The Glue table over the built-in task's parts has exactly the columns
//!   `shotlabel_core::dataset::glue_columns` gives that task, in order, and projects the
//!   task's current version; the Athena workgroup's results go under `athena-results/`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde_norway::{Mapping, Value};
use shotlabel_core::dataset;
use shotlabel_core::task::Task;
use shotlabel_deploy::{self as deploy, Deployment, Env, Prefix, Resource};

fn template() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../template.yaml");
    let text = std::fs::read_to_string(path).expect("template.yaml is readable");
    serde_norway::from_str(&text).expect("template.yaml is YAML")
}

/// Every declared deployment, with the variables its binary reads (its settings type's).
fn deployments() -> Vec<(&'static Deployment, BTreeSet<String>)> {
    deploy::DEPLOYMENTS
        .iter()
        .map(|d| (d, (d.variables)()))
        .collect()
}

// ------------------------------------------------------------------ reading CloudFormation

/// An intrinsic function call in either form (`!Sub x` or `{"Fn::Sub": x}`): its full name
/// (`Ref`, `Fn::Sub`, …) and argument.
fn intrinsic(value: &Value) -> Option<(String, &Value)> {
    match value {
        Value::Tagged(tagged) => {
            let tag = tagged.tag.to_string();
            let name = tag.trim_start_matches('!');
            let full = if name == "Ref" || name == "Condition" {
                name.to_owned()
            } else {
                format!("Fn::{name}")
            };
            Some((full, &tagged.value))
        }
        Value::Mapping(map) if map.len() == 1 => {
            let (key, argument) = map.iter().next()?;
            let key = key.as_str()?;
            (key == "Ref" || key.starts_with("Fn::")).then(|| (key.to_owned(), argument))
        }
        _ => None,
    }
}

fn call<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
    intrinsic(value).and_then(|(n, argument)| (n == name).then_some(argument))
}

/// `X` of `!Ref X`.
fn ref_of(value: &Value) -> Option<&str> {
    call(value, "Ref")?.as_str()
}

/// `(X, Attribute)` of `!GetAtt X.Attribute` or `{"Fn::GetAtt": [X, Attribute]}`.
fn get_att(value: &Value) -> Option<(String, String)> {
    let argument = call(value, "Fn::GetAtt")?;
    if let Some(text) = argument.as_str() {
        let (id, attribute) = text.split_once('.')?;
        return Some((id.to_owned(), attribute.to_owned()));
    }
    let parts = argument.as_sequence()?;
    Some((
        parts.first()?.as_str()?.to_owned(),
        parts.get(1)?.as_str()?.to_owned(),
    ))
}

/// The string of `!Sub "…"` (the one-argument form).
fn sub_of(value: &Value) -> Option<&str> {
    call(value, "Fn::Sub")?.as_str()
}

/// A value that exists only under a condition, `!If [C, value, !Ref AWS::NoValue]`, as
/// `(Some(C), value)`; any other value as `(None, value)`.
fn conditional(value: &Value) -> (Option<String>, &Value) {
    if let Some(arguments) = call(value, "Fn::If").and_then(Value::as_sequence)
        && let [condition, then, otherwise] = arguments.as_slice()
        && ref_of(otherwise) == Some("AWS::NoValue")
        && let Some(condition) = condition.as_str()
    {
        return (Some(condition.to_owned()), then);
    }
    (None, value)
}

/// A string or a list of them (IAM's `Action`).
fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Sequence(items) => items
            .iter()
            .map(|i| i.as_str().expect("a list of strings").to_owned())
            .collect(),
        other => panic!("expected a string or a list of strings, found {other:?}"),
    }
}

/// A value or a list of them (IAM's `Resource`).
fn items(value: &Value) -> Vec<&Value> {
    match value {
        Value::Sequence(items) => items.iter().collect(),
        other => vec![other],
    }
}

fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

struct Template {
    root: Value,
}

impl Template {
    fn load() -> Self {
        Self { root: template() }
    }

    fn resources(&self) -> &Mapping {
        self.root["Resources"]
            .as_mapping()
            .expect("template has Resources")
    }

    fn resource(&self, id: &str) -> &Value {
        let resource = &self.root["Resources"][id];
        assert!(!resource.is_null(), "template has no resource {id}");
        resource
    }

    fn type_of(&self, id: &str) -> Option<&str> {
        self.root["Resources"][id]["Type"].as_str()
    }

    fn of_type(&self, kind: &str) -> Vec<String> {
        self.resources()
            .iter()
            .filter(|(_, r)| r["Type"].as_str() == Some(kind))
            .filter_map(|(id, _)| id.as_str().map(str::to_owned))
            .collect()
    }

    fn properties(&self, id: &str) -> &Value {
        &self.resource(id)["Properties"]
    }

    /// A function property, falling back to `Globals.Function`.
    fn function_property(&self, id: &str, name: &str) -> &Value {
        let own = &self.properties(id)[name];
        if own.is_null() {
            &self.root["Globals"]["Function"][name]
        } else {
            own
        }
    }

    /// The variables a function is given (its own over the globals'), each with the
    /// condition it is given under.
    fn environment(&self, id: &str) -> BTreeMap<String, (Option<String>, Value)> {
        let mut env = BTreeMap::new();
        for source in [
            &self.root["Globals"]["Function"]["Environment"]["Variables"],
            &self.properties(id)["Environment"]["Variables"],
        ] {
            for (name, value) in source.as_mapping().into_iter().flatten() {
                let name = name
                    .as_str()
                    .expect("variable names are strings")
                    .to_owned();
                let (condition, value) = conditional(value);
                env.insert(name, (condition, value.clone()));
            }
        }
        env
    }

    /// `arn:…:s3:::<bucket>` as the roles write it, from the bucket's own name.
    fn bucket_arn(&self) -> String {
        let name = sub_of(&self.properties(deploy_bucket())["BucketName"])
            .expect("the bucket's name is a !Sub of the stack, account and region");
        format!("arn:${{AWS::Partition}}:s3:::{name}")
    }
}

fn deploy_bucket() -> &'static str {
    shotlabel_localstack::BUCKET_LOGICAL_ID
}

// ------------------------------------------------------------------ grants as triples

/// What a grant or statement applies to, in one comparable form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    /// Objects under a prefix; the input prefix is `${InputPrefix}`.
    Objects(String),
    Bucket,
    Queue(String),
    Secret(String),
    LogGroup(String),
    /// Anything else: always a failure.
    Unnamed(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Objects(p) => write!(f, "objects {p}*"),
            Target::Bucket => write!(f, "the bucket"),
            Target::Queue(q) => write!(f, "queue {q}"),
            Target::Secret(s) => write!(f, "secret {s}"),
            Target::LogGroup(g) => write!(f, "log group {g}"),
            Target::Unnamed(v) => write!(f, "UNNAMED {v}"),
        }
    }
}

type Triple = (Option<String>, String, Target);

fn show(triples: &BTreeSet<Triple>) -> String {
    triples
        .iter()
        .map(|(condition, action, target)| match condition {
            Some(c) => format!("  [{c}] {action} on {target}"),
            None => format!("  {action} on {target}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn declared_target(resource: Resource, own_log_group: &str) -> Target {
    match resource {
        Resource::Objects(Prefix::Input) => Target::Objects("${InputPrefix}".into()),
        Resource::Objects(Prefix::Fixed(prefix)) => Target::Objects(prefix.into()),
        Resource::Bucket => Target::Bucket,
        Resource::Queue(id) => Target::Queue(id.into()),
        Resource::Secret(id) => Target::Secret(id.into()),
        Resource::OwnLogGroup => Target::LogGroup(own_log_group.into()),
    }
}

fn template_target(template: &Template, value: &Value) -> Target {
    let bucket_arn = template.bucket_arn();
    if let Some(arn) = sub_of(value) {
        if arn == bucket_arn {
            return Target::Bucket;
        }
        if let Some(prefix) = arn
            .strip_prefix(&format!("{bucket_arn}/"))
            .and_then(|rest| rest.strip_suffix('*'))
            && !prefix.is_empty()
            && !prefix.contains('*')
            && (prefix.ends_with('/') || prefix == "${InputPrefix}")
        {
            return Target::Objects(prefix.into());
        }
    }
    if let Some((id, attribute)) = get_att(value)
        && attribute == "Arn"
    {
        match template.type_of(&id) {
            Some("AWS::SQS::Queue") => return Target::Queue(id),
            Some("AWS::Logs::LogGroup") => return Target::LogGroup(id),
            _ => {}
        }
    }
    if let Some(id) = ref_of(value)
        && template.type_of(id) == Some("AWS::SecretsManager::Secret")
    {
        return Target::Secret(id.to_owned());
    }
    Target::Unnamed(format!("{value:?}"))
}

/// The function's role's statements as triples.
fn role_triples(template: &Template, function: &str) -> BTreeSet<Triple> {
    let (role, attribute) = get_att(&template.properties(function)["Role"])
        .unwrap_or_else(|| panic!("{function} has no Role: !GetAtt <its role>.Arn"));
    assert_eq!(attribute, "Arn");
    assert_eq!(template.type_of(&role), Some("AWS::IAM::Role"), "{role}");
    assert!(
        template.properties(function)["Policies"].is_null(),
        "{function}: with its own role, SAM Policies would be ignored"
    );
    let properties = template.properties(&role);
    assert!(
        properties["ManagedPolicyArns"].is_null(),
        "{role}: managed policies are not least privilege"
    );
    let trust = &properties["AssumeRolePolicyDocument"]["Statement"];
    let trusted: Vec<&Value> = trust
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|s| &s["Principal"]["Service"])
        .collect();
    assert_eq!(
        trusted,
        vec![&Value::String("lambda.amazonaws.com".into())],
        "{role} is assumed by Lambda only"
    );

    let mut triples = BTreeSet::new();
    let policies = properties["Policies"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{role} has no inline policies"));
    for policy in policies {
        for statement in policy["PolicyDocument"]["Statement"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{role}: a policy without statements"))
        {
            let (condition, statement) = conditional(statement);
            assert_eq!(statement["Effect"].as_str(), Some("Allow"), "{role}");
            for forbidden in ["NotAction", "NotResource", "Condition", "Principal"] {
                assert!(
                    statement[forbidden].is_null(),
                    "{role}: {forbidden} is not used"
                );
            }
            for action in strings(&statement["Action"]) {
                for resource in items(&statement["Resource"]) {
                    triples.insert((
                        condition.clone(),
                        action.clone(),
                        template_target(template, resource),
                    ));
                }
            }
        }
    }
    triples
}

/// The function's own log group (`LoggingConfig.LogGroup`), checked to be JSON with a
/// retention.
fn log_group(template: &Template, function: &str) -> String {
    let logging = &template.properties(function)["LoggingConfig"];
    assert_eq!(
        logging["LogFormat"].as_str(),
        Some("JSON"),
        "{function}: structured JSON logs (lambda_runtime's subscriber honours it)"
    );
    let group = ref_of(&logging["LogGroup"])
        .unwrap_or_else(|| panic!("{function}: LoggingConfig.LogGroup is a !Ref"))
        .to_owned();
    assert_eq!(template.type_of(&group), Some("AWS::Logs::LogGroup"));
    assert!(
        !template.properties(&group)["RetentionInDays"].is_null(),
        "{group} has a retention"
    );
    group
}

// ------------------------------------------------------------------ the tests

#[test]
fn the_functions_are_the_declared_deployments() {
    let template = Template::load();
    let mut declared: Vec<&str> = deployments().iter().map(|(d, _)| d.function).collect();
    declared.sort_unstable();
    let mut in_template = template.of_type("AWS::Serverless::Function");
    in_template.sort();
    assert_eq!(in_template, declared);

    for (deployment, _) in deployments() {
        let id = deployment.function;
        let function = template.resource(id);
        assert_eq!(
            function["Metadata"]["BuildMethod"].as_str(),
            Some("rust-cargolambda"),
            "{id}"
        );
        assert_eq!(
            function["Metadata"]["BuildProperties"]["Binary"].as_str(),
            Some(deployment.binary),
            "{id}"
        );
        assert_eq!(
            function["Properties"]["CodeUri"].as_str(),
            Some("."),
            "{id}"
        );
        let main = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../functions")
            .join(deployment.binary)
            .join("src/main.rs");
        assert!(main.is_file(), "{}", main.display());
        assert_eq!(
            template.function_property(id, "Runtime").as_str(),
            Some("provided.al2023"),
            "{id}"
        );
        assert_eq!(
            template.function_property(id, "Handler").as_str(),
            Some("bootstrap")
        );
        let architectures = template.function_property(id, "Architectures");
        assert_eq!(
            architectures
                .as_sequence()
                .and_then(|a| a.first())
                .and_then(ref_of),
            Some("Architecture"),
            "{id}: the architecture is a parameter"
        );
    }
}

#[test]
fn each_function_is_given_what_its_code_reads_and_nothing_else() {
    let template = Template::load();
    let mut values: BTreeMap<String, Vec<(&str, Value)>> = BTreeMap::new();
    for (deployment, env_vars) in deployments() {
        let id = deployment.function;
        let env = template.environment(id);
        let read: BTreeSet<&str> = env_vars.iter().map(String::as_str).collect();
        let triples = role_triples(&template, id);

        for (name, (condition, value)) in &env {
            assert!(
                read.contains(name.as_str()),
                "{id} is given {name}, which its code never reads"
            );
            assert!(
                !read.contains(deploy::secret_arn_variable(name).as_str()),
                "{id} is given the secret {name} in plain text; give {} instead",
                deploy::secret_arn_variable(name)
            );
            if name.ends_with("_SECRET_ARN") {
                let secret = ref_of(value)
                    .filter(|s| template.type_of(s) == Some("AWS::SecretsManager::Secret"))
                    .unwrap_or_else(|| panic!("{id}: {name} is not a !Ref of a secret"));
                let read_grant = (
                    condition.clone(),
                    deploy::GET_SECRET.to_owned(),
                    Target::Secret(secret.to_owned()),
                );
                assert!(
                    triples.contains(&read_grant),
                    "{id} is told about {secret} but may not read it"
                );
            }
            if name.ends_with("_QUEUE_URL") {
                let queue = ref_of(value).unwrap_or_default();
                assert_eq!(
                    template.type_of(queue),
                    Some("AWS::SQS::Queue"),
                    "{id}: {name} is a !Ref of a queue"
                );
            }
            if name == "SHOTLABEL_BUCKET" {
                assert_eq!(ref_of(value), Some(deploy_bucket()), "{id}: {name}");
            }
            if name == "SHOTLABEL_INPUT_PREFIX" {
                assert_eq!(ref_of(value), Some("InputPrefix"), "{id}: {name}");
            }
            values
                .entry(name.clone())
                .or_default()
                .push((id, value.clone()));
        }

        for rule in deployment.env {
            match *rule {
                Env::Required(name) => assert!(
                    matches!(env.get(name), Some((None, _))),
                    "{id} must be given {name} (unconditionally)"
                ),
                Env::RequiredIf(name, condition) => assert!(
                    matches!(env.get(name), Some((Some(c), _)) if c == condition),
                    "{id} must be given {name} exactly when {condition}"
                ),
            }
        }
    }
    for (name, given) in values {
        let (first_id, first) = &given[0];
        for (id, value) in &given[1..] {
            assert_eq!(
                value, first,
                "{name} differs between {first_id} and {id}: the functions must agree"
            );
        }
    }
}

#[test]
fn each_role_grants_exactly_what_its_function_uses() {
    let template = Template::load();
    let mut failures = Vec::new();
    for (deployment, _) in deployments() {
        let id = deployment.function;
        let own_log_group = log_group(&template, id);
        let declared: BTreeSet<Triple> = deployment
            .triples()
            .into_iter()
            .map(|(condition, action, resource)| {
                (
                    condition.map(str::to_owned),
                    action.to_owned(),
                    declared_target(resource, &own_log_group),
                )
            })
            .collect();
        let granted = role_triples(&template, id);
        let missing: BTreeSet<Triple> = declared.difference(&granted).cloned().collect();
        let extra: BTreeSet<Triple> = granted.difference(&declared).cloned().collect();
        if !missing.is_empty() {
            failures.push(format!(
                "{id}'s role lacks what its code uses:\n{}",
                show(&missing)
            ));
        }
        if !extra.is_empty() {
            failures.push(format!(
                "{id}'s role grants what its code does not use:\n{}",
                show(&extra)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn only_new_inputs_trigger_the_pipeline() {
    let template = Template::load();
    for (deployment, _) in deployments() {
        let events = &template.properties(deployment.function)["Events"];
        for (name, event) in events.as_mapping().into_iter().flatten() {
            if event["Type"].as_str() != Some("S3") {
                continue;
            }
            assert_eq!(
                deployment.function, "EnqueueFunction",
                "only enqueue is triggered by S3 ({name:?})"
            );
            let properties = &event["Properties"];
            assert_eq!(ref_of(&properties["Bucket"]), Some(deploy_bucket()));
            assert_eq!(properties["Events"].as_str(), Some("s3:ObjectCreated:*"));
            let rules = properties["Filter"]["S3Key"]["Rules"]
                .as_sequence()
                .expect("the S3 trigger filters keys");
            assert_eq!(rules.len(), 1);
            assert_eq!(rules[0]["Name"].as_str(), Some("prefix"));
            assert_eq!(ref_of(&rules[0]["Value"]), Some("InputPrefix"));
        }
    }
    let enqueue_events = &template.properties("EnqueueFunction")["Events"];
    assert!(
        enqueue_events
            .as_mapping()
            .is_some_and(|m| m.values().any(|e| e["Type"].as_str() == Some("S3"))),
        "enqueue has its S3 trigger"
    );

    // The input prefix can be none of the pipeline's outputs.
    let parameter = &template.root["Parameters"]["InputPrefix"];
    let default = parameter["Default"].as_str().unwrap_or_default();
    assert!(default.ends_with('/'));
    let pattern = parameter["AllowedPattern"].as_str().unwrap_or_default();
    for output in deploy::OUTPUT_PREFIXES {
        assert!(!default.starts_with(output));
        assert!(
            pattern.contains(output.trim_end_matches('/')),
            "InputPrefix's AllowedPattern refuses {output}"
        );
    }
    assert!(
        pattern.starts_with("^(?!("),
        "a negative lookahead: {pattern}"
    );
}

#[test]
fn each_function_has_its_event_source() {
    let template = Template::load();
    let harvest = &template.properties("HarvestFunction")["Events"];
    let sqs: Vec<&Value> = harvest
        .as_mapping()
        .into_iter()
        .flatten()
        .map(|(_, e)| e)
        .filter(|e| e["Type"].as_str() == Some("SQS"))
        .collect();
    assert_eq!(sqs.len(), 1);
    let properties = &sqs[0]["Properties"];
    assert_eq!(
        get_att(&properties["Queue"]),
        Some((deploy::HARVEST_QUEUE.to_owned(), "Arn".to_owned()))
    );
    assert_eq!(
        properties["FunctionResponseTypes"],
        Value::Sequence(vec![Value::String("ReportBatchItemFailures".into())]),
        "failed harvests are reported one by one"
    );

    let url = &template.properties("WebhookFunction")["FunctionUrlConfig"];
    assert_eq!(url["AuthType"].as_str(), Some("NONE"));

    let submit = &template.properties("SubmitFunction")["Events"];
    assert!(
        submit.as_mapping().into_iter().flatten().any(|(_, e)| {
            e["Type"]
                .as_str()
                .is_some_and(|t| t.starts_with("Schedule"))
                && ref_of(&e["Properties"]["ScheduleExpression"]) == Some("SubmitSchedule")
        }),
        "submit runs on the SubmitSchedule parameter"
    );
}

#[test]
fn messages_stay_hidden_while_their_function_holds_them() {
    let template = Template::load();
    let timeout = |id: &str| {
        number(template.function_property(id, "Timeout"))
            .unwrap_or_else(|| panic!("{id} has a Timeout"))
    };
    let visibility = |id: &str| {
        number(&template.properties(id)["VisibilityTimeout"])
            .unwrap_or_else(|| panic!("{id} has a VisibilityTimeout"))
    };
    // AWS recommends six times the function's timeout for a Lambda event source.
    assert!(visibility(deploy::HARVEST_QUEUE) >= 6 * timeout("HarvestFunction"));
    assert!(visibility(deploy::PENDING_QUEUE) > timeout("SubmitFunction"));

    // The submitter receives with its own visibility timeout: it must outlast the run, and
    // the time budget plus a minute (SubmitConfig::check).
    let env = template.environment("SubmitFunction");
    let submit_visibility = env
        .get("SHOTLABEL_SUBMIT_VISIBILITY_SECONDS")
        .and_then(|(_, v)| number(v))
        .expect("a number");
    assert!(submit_visibility >= timeout("SubmitFunction"));
    let budget = ref_of(&env["SHOTLABEL_SUBMIT_BUDGET_SECONDS"].1)
        .map(|p| &template.root["Parameters"][p])
        .expect("the budget is a parameter");
    let max_budget = number(&budget["MaxValue"]).expect("the budget has a maximum");
    assert!(max_budget + 60 <= submit_visibility);
    assert!(max_budget < timeout("SubmitFunction"));

    // The submitter sends a deferred image round again before the pending queue's redrive
    // policy would dead-letter it: it must know the policy's count.
    let max_receives = env
        .get("SHOTLABEL_PENDING_MAX_RECEIVES")
        .and_then(|(_, v)| number(v))
        .expect("a number");
    assert_eq!(
        number(&template.properties(deploy::PENDING_QUEUE)["RedrivePolicy"]["maxReceiveCount"]),
        Some(max_receives)
    );

    // A provider waits for the webhook's answer.
    assert!(timeout("WebhookFunction") <= 30);

    // The local stack creates the queues the same way.
    for spec in shotlabel_localstack::QUEUES {
        assert_eq!(
            visibility(spec.logical_id),
            u64::from(spec.visibility_timeout)
        );
    }
}

/// An alarm's metric, dimension value and threshold, for matching.
fn alarms(template: &Template) -> Vec<(String, String, Value, String)> {
    template
        .of_type("AWS::CloudWatch::Alarm")
        .into_iter()
        .map(|id| {
            let p = template.properties(&id);
            let dimension = p["Dimensions"]
                .as_sequence()
                .and_then(|d| d.first())
                .map(|d| d["Value"].clone())
                .unwrap_or(Value::Null);
            (
                p["Namespace"].as_str().unwrap_or_default().to_owned(),
                p["MetricName"].as_str().unwrap_or_default().to_owned(),
                dimension,
                p["ComparisonOperator"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

fn has_alarm(template: &Template, namespace: &str, metric: &str, on: &Value) -> bool {
    alarms(template).iter().any(|(n, m, d, op)| {
        n == namespace && m == metric && d == on && op == "GreaterThanThreshold"
    })
}

fn queue_name(id: &str) -> Value {
    serde_norway::from_str(&format!("!GetAtt {id}.QueueName")).expect("YAML")
}

#[test]
fn what_needs_a_person_raises_an_alarm() {
    let template = Template::load();
    for queue in template.of_type("AWS::SQS::Queue") {
        let target = &template.properties(&queue)["RedrivePolicy"]["deadLetterTargetArn"];
        if let Some((dead_letter, _)) = get_att(target) {
            assert!(
                has_alarm(
                    &template,
                    "AWS/SQS",
                    "ApproximateNumberOfMessagesVisible",
                    &queue_name(&dead_letter)
                ),
                "{dead_letter} has a depth alarm"
            );
        }
    }
    for (deployment, _) in deployments() {
        let function: Value =
            serde_norway::from_str(&format!("!Ref {}", deployment.function)).expect("YAML");
        assert!(
            has_alarm(&template, "AWS/Lambda", "Errors", &function),
            "{} has an errors alarm",
            deployment.function
        );
    }
    assert!(has_alarm(
        &template,
        "AWS/SQS",
        "ApproximateAgeOfOldestMessage",
        &queue_name(deploy::PENDING_QUEUE)
    ));
    assert!(has_alarm(
        &template,
        "AWS/SQS",
        "ApproximateNumberOfMessagesVisible",
        &queue_name(deploy::HARVEST_QUEUE)
    ));
}

#[test]
fn the_outputs_the_cli_reads_exist() {
    let template = Template::load();
    let stack_rs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../cli/src/stack.rs"))
            .expect("cli/src/stack.rs");
    let read: Vec<&str> = stack_rs
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const OUTPUT_"))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    assert!(read.len() >= 5, "found the CLI's output names: {read:?}");
    for output in read.iter().chain(&["WebhookUrl"]) {
        assert!(
            !template.root["Outputs"][*output]["Value"].is_null(),
            "the template has no output {output}"
        );
    }
}

#[test]
fn secrets_are_never_parameters_and_the_bucket_is_locked_down() {
    let template = Template::load();
    for (name, parameter) in template.root["Parameters"]
        .as_mapping()
        .into_iter()
        .flatten()
    {
        let name = name.as_str().unwrap_or_default().to_ascii_lowercase();
        let secretive = ["secret", "apikey", "token", "password"]
            .iter()
            .any(|word| name.contains(word));
        assert!(
            !secretive || parameter["NoEcho"].as_bool() == Some(true),
            "{name} looks like a secret: keep it in Secrets Manager"
        );
    }
    for secret in template.of_type("AWS::SecretsManager::Secret") {
        assert!(
            template.properties(&secret)["SecretString"].is_null(),
            "{secret} holds no literal value"
        );
    }

    let bucket = template.properties(deploy_bucket());
    assert!(!bucket["BucketEncryption"].is_null());
    for setting in [
        "BlockPublicAcls",
        "BlockPublicPolicy",
        "IgnorePublicAcls",
        "RestrictPublicBuckets",
    ] {
        assert_eq!(
            bucket["PublicAccessBlockConfiguration"][setting].as_bool(),
            Some(true),
            "{setting}"
        );
    }
    let expired: BTreeSet<&str> = bucket["LifecycleConfiguration"]["Rules"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|r| !r["ExpirationInDays"].is_null())
        .filter_map(|r| r["Prefix"].as_str())
        .collect();
    for temporary in [deploy::DELIVERIES, deploy::RETRIES] {
        let Prefix::Fixed(prefix) = temporary else {
            unreachable!()
        };
        assert!(expired.contains(prefix), "{prefix} expires");
    }

    let tls_only = template
        .of_type("AWS::S3::BucketPolicy")
        .into_iter()
        .any(|policy| {
            let p = template.properties(&policy);
            ref_of(&p["Bucket"]) == Some(deploy_bucket())
                && p["PolicyDocument"]["Statement"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|s| {
                        s["Effect"].as_str() == Some("Deny")
                            && !s["Condition"]["Bool"]["aws:SecureTransport"].is_null()
                    })
        });
    assert!(tls_only, "the bucket policy refuses requests without TLS");
}

/// The receiver behind the public Function URL holds only what authenticating a callback
/// and queueing a harvest need: not the provider's API key, not the pending queue, not the
/// provider's URL; and it runs its own binary, apart from the harvest's.
#[test]
fn the_public_receiver_holds_no_provider_key_and_no_pending_queue() {
    let template = Template::load();
    let env = template.environment("WebhookFunction");
    for name in [
        "SHOTLABEL_API_KEY",
        "SHOTLABEL_API_KEY_SECRET_ARN",
        "SHOTLABEL_PROVIDER_URL",
        "SHOTLABEL_PENDING_QUEUE_URL",
    ] {
        assert!(
            !env.contains_key(name),
            "the public receiver is given {name}"
        );
    }
    for (_, action, target) in role_triples(&template, "WebhookFunction") {
        assert_ne!(
            target,
            Target::Secret(deploy::PROVIDER_API_KEY_SECRET.to_owned()),
            "the public receiver may {action} the provider's key"
        );
        assert_ne!(
            target,
            Target::Queue(deploy::PENDING_QUEUE.to_owned()),
            "the public receiver may {action} the pending queue"
        );
    }
    let binary = |id: &str| {
        template.resource(id)["Metadata"]["BuildProperties"]["Binary"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(binary("WebhookFunction").as_deref(), Some("webhook"));
    assert_eq!(binary("HarvestFunction").as_deref(), Some("harvest"));
}

/// The Glue table over the built-in task's parts is the code's: its columns are
/// `glue_columns` of the default task (names and types, in order), so a change to the
/// task's schema fails here until `shotlabel task columns` regenerates them; it reads that
/// task's prefix, with partition projection on the task version whose default values list
/// the task's current version. The Athena workgroup enforces its configuration and writes
/// its results, encrypted, under `athena-results/`, which expires.
#[test]
fn the_dataset_table_is_the_default_tasks() {
    let template = Template::load();
    let task = Task::default_task().expect("the built-in task loads");
    let expected = dataset::glue_columns(&task).expect("the built-in task has dataset columns");

    let tables = template.of_type("AWS::Glue::Table");
    assert_eq!(
        tables.len(),
        1,
        "one table, over the built-in task: {tables:?}"
    );
    let table = template.properties(&tables[0]);
    let database = ref_of(&table["DatabaseName"]).expect("DatabaseName is a !Ref");
    assert_eq!(template.type_of(database), Some("AWS::Glue::Database"));
    let input = &table["TableInput"];
    let name = input["Name"].as_str().unwrap_or_default();
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "Glue and Athena names are lower case, without hyphens: {name:?}"
    );

    let storage = &input["StorageDescriptor"];
    let declared: Vec<(String, String)> = storage["Columns"]
        .as_sequence()
        .expect("the table has Columns")
        .iter()
        .map(|column| {
            (
                column["Name"].as_str().unwrap_or_default().to_owned(),
                column["Type"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        declared, expected,
        "{}'s Columns are not the built-in task's: regenerate them with `shotlabel task columns`",
        tables[0]
    );
    let partition_keys: Vec<(&str, &str)> = input["PartitionKeys"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|k| {
            (
                k["Name"].as_str().unwrap_or_default(),
                k["Type"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        partition_keys,
        [("version", "string")],
        "batch is no partition"
    );
    assert_eq!(
        storage["SerdeInfo"]["SerializationLibrary"].as_str(),
        Some("org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe")
    );
    assert_eq!(
        storage["InputFormat"].as_str(),
        Some("org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat")
    );
    assert_eq!(
        storage["OutputFormat"].as_str(),
        Some("org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat")
    );

    // Where the parts are: the task's prefix of the bucket, one partition per version.
    let root = format!(
        "s3://${{{}}}/{}",
        deploy_bucket(),
        dataset::task_prefix(task.name())
    );
    let location = sub_of(&storage["Location"]).expect("the location is a !Sub of the bucket");
    assert!(
        location.starts_with(&root),
        "{location} is not under {root}"
    );
    let parameters = &input["Parameters"];
    assert_eq!(parameters["projection.enabled"].as_str(), Some("true"));
    assert_eq!(parameters["projection.version.type"].as_str(), Some("enum"));
    let location_template = sub_of(&parameters["storage.location.template"])
        .expect("storage.location.template is a !Sub of the bucket");
    assert!(
        location_template.starts_with(&root),
        "{location_template} is not under {root}"
    );
    // `${!version}` is how !Sub writes Athena's `${version}`.
    assert!(
        location_template.ends_with("/version=${!version}/"),
        "{location_template} has one folder per version, as the harvest writes them \
         ({})",
        dataset::version_prefix(task.name(), "<version>")
    );
    let versions = ref_of(&parameters["projection.version.values"])
        .expect("the projected versions are a parameter");
    let default_versions = template.root["Parameters"][versions]["Default"]
        .as_str()
        .unwrap_or_default();
    assert!(
        default_versions.split(',').any(|v| v == task.version()),
        "{versions}'s default ({default_versions}) lacks the built-in task's version {}: \
         Athena would not see its labels",
        task.version()
    );

    // The workgroup: its configuration enforced, its results under athena-results/.
    let groups = template.of_type("AWS::Athena::WorkGroup");
    assert_eq!(groups.len(), 1, "{groups:?}");
    let configuration = &template.properties(&groups[0])["WorkGroupConfiguration"];
    assert_eq!(
        configuration["EnforceWorkGroupConfiguration"].as_bool(),
        Some(true)
    );
    assert!(ref_of(&configuration["BytesScannedCutoffPerQuery"]).is_some());
    let results = &configuration["ResultConfiguration"];
    let output = sub_of(&results["OutputLocation"]).expect("a !Sub of the bucket");
    let results_root = format!("s3://${{{}}}/{}", deploy_bucket(), deploy::ATHENA_RESULTS);
    assert!(output.starts_with(&results_root), "{output}");
    assert_eq!(
        results["EncryptionConfiguration"]["EncryptionOption"].as_str(),
        Some("SSE_S3")
    );
    let expired: Vec<&str> =
        template.properties(deploy_bucket())["LifecycleConfiguration"]["Rules"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter(|r| !r["ExpirationInDays"].is_null())
            .filter_map(|r| r["Prefix"].as_str())
            .collect();
    assert!(expired.contains(&deploy::ATHENA_RESULTS), "{expired:?}");
}

/// The policy a data team attaches to query the labels names every resource, and writes
/// only query results.
#[test]
fn the_dataset_query_policy_reads_the_dataset_and_writes_only_results() {
    let template = Template::load();
    let policies = template.of_type("AWS::IAM::ManagedPolicy");
    assert_eq!(policies.len(), 1, "{policies:?}");
    let bucket_arn = "${Bucket.Arn}";
    for statement in template.properties(&policies[0])["PolicyDocument"]["Statement"]
        .as_sequence()
        .expect("statements")
    {
        assert_eq!(statement["Effect"].as_str(), Some("Allow"));
        for resource in items(&statement["Resource"]) {
            assert_ne!(resource.as_str(), Some("*"), "{statement:?}");
            assert!(
                sub_of(resource).is_some() || get_att(resource).is_some(),
                "a named resource: {resource:?}"
            );
        }
        let actions = strings(&statement["Action"]);
        if actions.iter().any(|a| a == "s3:PutObject") {
            for resource in items(&statement["Resource"]) {
                assert_eq!(
                    sub_of(resource),
                    Some(format!("{bucket_arn}/{}*", deploy::ATHENA_RESULTS).as_str())
                );
            }
        }
        if actions.iter().any(|a| a == "s3:GetObject") {
            for resource in items(&statement["Resource"]) {
                let arn = sub_of(resource).unwrap_or_default();
                assert!(
                    arn == format!("{bucket_arn}/{}*", shotlabel_core::dataset::DATASET_PREFIX)
                        || arn == format!("{bucket_arn}/{}*", deploy::ATHENA_RESULTS),
                    "{arn}"
                );
            }
        }
        if actions.iter().any(|a| a == "s3:ListBucket") {
            assert!(
                !statement["Condition"]["StringLike"]["s3:prefix"].is_null(),
                "listing is limited by prefix"
            );
        }
    }
    assert!(
        !template.root["Outputs"]["DatasetQueryPolicyArn"]["Value"].is_null()
            && !template.root["Outputs"]["DatasetWorkGroup"]["Value"].is_null()
            && !template.root["Outputs"]["DatasetTable"]["Value"].is_null()
            && !template.root["Outputs"]["DatasetDatabase"]["Value"].is_null()
    );
}

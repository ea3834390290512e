//! `shotlabel task …`: show and check task files, and the Glue columns of a task's dataset.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_norway::Value;
use shotlabel_core::dataset::{glue_columns, task_prefix};
use shotlabel_core::task::Task;

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Print a task (the built-in default when no file is given) with its version hash.
    Show {
        /// A task file (.toml or .json).
        #[arg(long, env = "SHOTLABEL_TASK")]
        task: Option<PathBuf>,
        /// Print the request body one image would be sent with, instead of a summary.
        #[arg(long)]
        request: bool,
    },
    /// Validate task files; exits non-zero if any is invalid.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the Glue columns of a task's dataset table, as template.yaml's `Columns:`
    /// list; with --check, compare template.yaml's table with them instead.
    #[command(long_about = COLUMNS_HELP)]
    Columns {
        /// A task file (.toml or .json); the built-in website judgement when absent.
        #[arg(long, env = "SHOTLABEL_TASK")]
        task: Option<PathBuf>,
        /// A template (template.yaml) whose Glue table over this task's parts must have
        /// exactly the task's columns: exits non-zero with one line naming each field that
        /// differs, with both types.
        #[arg(long, value_name = "TEMPLATE")]
        check: Option<PathBuf>,
    },
}

const COLUMNS_HELP: &str = "\
Print the Glue columns of a task's dataset table, as template.yaml's `Columns:` list (the
table's TableInput.StorageDescriptor.Columns); with --check, compare a template's table with
them instead.

The harvest writes the labels as Parquet parts under
dataset/task=<task name>/version=<task version>/, typed from the task's answer schema (then
the provenance columns). template.yaml's DatasetTable declares the same columns for the
built-in website judgement. A custom task (the template's `Task` parameter) needs its own
table columns: paste this list into the table and point its location at
dataset/task=<its name>/.

Any change to a task makes a new task version, and so a new value of the table's `version`
partition (add it to the DatasetTaskVersions parameter). A change of a field's type
matters more: Athena cannot read a partition whose Parquet type differs from the table's
column type, so regenerate the columns with this command (older versions of the other
type then need a table of their own). Fields added or removed are fine: Athena reads
Parquet by column name, and a field a part lacks reads as NULL.

`shotlabel task columns --check template.yaml` exits non-zero, naming the field and both
types, when the template's columns differ from the task's.";

/// Loads `path`, or the built-in default task when there is none.
pub fn load_task(path: Option<&Path>) -> anyhow::Result<Task> {
    Ok(match path {
        Some(path) => Task::from_path(path)?,
        None => Task::default_task()?,
    })
}

pub fn run(command: TaskCommand) -> anyhow::Result<ExitCode> {
    match command {
        TaskCommand::Show { task, request } => {
            let task = load_task(task.as_deref())?;
            if request {
                let body = task.chat_completion_body("data:image/jpeg;base64,<image>");
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(ExitCode::SUCCESS);
            }
            let spec = task.spec();
            println!("task:        {}", task.name());
            println!("version:     {}", task.version());
            if let Some(description) = &spec.description {
                println!("description: {description}");
            }
            println!("model:       {}", spec.model);
            println!(
                "sampling:    temperature {}, max_tokens {}",
                spec.temperature, spec.max_tokens
            );
            println!(
                "images:      longest side {} px, JPEG quality {}",
                spec.image.max_side, spec.image.jpeg_quality
            );
            println!("user text:   {}", spec.user_text);
            println!(
                "schema ({}):\n{}",
                spec.response_schema.name,
                serde_json::to_string_pretty(&spec.response_schema.schema)?
            );
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Check { files } => {
            let mut failed = 0;
            for file in &files {
                match Task::from_path(file) {
                    Ok(task) => println!(
                        "ok      {}  {} (version {})",
                        file.display(),
                        task.name(),
                        task.version()
                    ),
                    Err(e) => {
                        failed += 1;
                        println!("invalid {}  {e}", file.display());
                    }
                }
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        TaskCommand::Columns { task, check } => {
            let task_file = task;
            let task = load_task(task_file.as_deref())?;
            let columns = glue_columns(&task)?;
            let Some(template_path) = check else {
                print!("{}", columns_yaml(&task, &columns));
                return Ok(ExitCode::SUCCESS);
            };
            let text = std::fs::read_to_string(&template_path)
                .with_context(|| format!("reading {}", template_path.display()))?;
            let template: Value = serde_norway::from_str(&text)
                .with_context(|| format!("{} is not YAML", template_path.display()))?;
            let regenerate = match &task_file {
                Some(file) => format!("shotlabel task columns --task {}", file.display()),
                None => "shotlabel task columns".to_owned(),
            };
            let tables = check_template(&template, &task, &columns).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e} (`{regenerate}` prints the task's columns)",
                    template_path.display()
                )
            })?;
            for table in tables {
                println!(
                    "ok      {}  {} has the {} columns of task {} (version {})",
                    template_path.display(),
                    table.id,
                    columns.len(),
                    task.name(),
                    task.version()
                );
                if !table.lists_version {
                    let values = table.versions_parameter.as_deref().map_or_else(
                        || "projection.version.values".to_owned(),
                        |p| format!("the {p} parameter"),
                    );
                    eprintln!(
                        "note: {}'s projected versions do not list {}: add it to {values}, \
                         or Athena will not see its parts",
                        table.id,
                        task.version()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The YAML `Columns:` list of a Glue table, with a comment saying what it is for.
fn columns_yaml(task: &Task, columns: &[(String, String)]) -> String {
    let mut out = format!(
        "# The Glue columns of task {} (version {}), for the Glue table over\n\
         # s3://<bucket>/{} (TableInput.StorageDescriptor.Columns).\n\
         # Check a template with: shotlabel task columns --check template.yaml\n\
         Columns:\n",
        task.name(),
        task.version(),
        task_prefix(task.name())
    );
    for (name, kind) in columns {
        out.push_str(&format!(
            "  - Name: {}\n    Type: {}\n",
            yaml_scalar(name),
            yaml_scalar(kind)
        ));
    }
    out
}

/// A string as one YAML scalar, quoted where YAML needs it (`yes`, `on`, `a: b`, …).
fn yaml_scalar(text: &str) -> String {
    serde_norway::to_string(text)
        .map_or_else(|_| format!("{text:?}"), |yaml| yaml.trim_end().to_owned())
}

/// A Glue table of the template that reads the task's parts.
#[derive(Debug)]
struct TemplateTable {
    /// Its logical id.
    id: String,
    /// Whether its `projection.version.values` (or the default of the parameter they come
    /// from) lists the task's version.
    lists_version: bool,
    /// The template parameter the projected versions come from, if any.
    versions_parameter: Option<String>,
}

/// Holds the template's Glue tables over the task's parts (`dataset/task=<name>/`) to the
/// task's columns: there is at least one, each has exactly `columns` in order and the one
/// partition key `version`. The error is one line naming what differs.
fn check_template(
    template: &Value,
    task: &Task,
    columns: &[(String, String)],
) -> anyhow::Result<Vec<TemplateTable>> {
    let prefix = task_prefix(task.name());
    let mut tables = Vec::new();
    for (id, resource) in template["Resources"].as_mapping().into_iter().flatten() {
        if resource["Type"].as_str() != Some("AWS::Glue::Table") {
            continue;
        }
        let id = id.as_str().unwrap_or_default().to_owned();
        let input = &resource["Properties"]["TableInput"];
        let location = sub_text(&input["StorageDescriptor"]["Location"]).unwrap_or_default();
        if !location
            .trim_end_matches('/')
            .ends_with(&format!("/{}", prefix.trim_end_matches('/')))
        {
            continue;
        }
        let declared = name_type_list(&input["StorageDescriptor"]["Columns"])
            .with_context(|| format!("{id}'s Columns are not a list of Name and Type"))?;
        let mut differences = column_differences(&declared, columns);
        let partition_keys = name_type_list(&input["PartitionKeys"]).unwrap_or_default();
        if partition_keys != [("version".to_owned(), "string".to_owned())] {
            differences.push(format!(
                "its partition keys are {}, not version (string)",
                show_columns(&partition_keys)
            ));
        }
        if !differences.is_empty() {
            bail!(
                "table {id} does not match task {} (version {}): {}",
                task.name(),
                task.version(),
                differences.join("; ")
            );
        }
        let values = &input["Parameters"]["projection.version.values"];
        let versions_parameter = ref_name(values).map(str::to_owned);
        let values = match versions_parameter.as_deref() {
            Some(parameter) => &template["Parameters"][parameter]["Default"],
            None => values,
        };
        // A version of digits only is a YAML number unless quoted.
        let values = match values {
            Value::Number(number) => number.to_string(),
            other => other.as_str().unwrap_or_default().to_owned(),
        };
        let lists_version = values.split(',').any(|v| v.trim() == task.version());
        tables.push(TemplateTable {
            id,
            lists_version,
            versions_parameter,
        });
    }
    if tables.is_empty() {
        bail!(
            "no AWS::Glue::Table reads s3://<bucket>/{prefix} (task {}): a custom task needs a \
             table of its own, with its columns",
            task.name()
        );
    }
    Ok(tables)
}

/// What differs between a table's columns and the task's, one phrase per column; the
/// order only when nothing else differs. Empty when they are the same.
fn column_differences(declared: &[(String, String)], expected: &[(String, String)]) -> Vec<String> {
    let mut differences = Vec::new();
    for (i, (name, _)) in declared.iter().enumerate() {
        if declared[..i].iter().any(|(n, _)| n == name) {
            differences.push(format!("column {name} is declared twice"));
        }
    }
    for (name, kind) in expected {
        match declared.iter().find(|(n, _)| n == name) {
            Some((_, declared_kind)) if !declared_kind.eq_ignore_ascii_case(kind) => {
                differences.push(format!(
                    "column {name} has type {declared_kind} in the template but {kind} in the task"
                ));
            }
            Some(_) => {}
            None => differences.push(format!("column {name} ({kind}) is missing")),
        }
    }
    for (name, kind) in declared {
        if !expected.iter().any(|(n, _)| n == name) {
            differences.push(format!("column {name} ({kind}) is not one of the task's"));
        }
    }
    if differences.is_empty()
        && let Some(i) = declared
            .iter()
            .zip(expected)
            .position(|((a, _), (b, _))| a != b)
    {
        differences.push(format!(
            "the columns are in another order: column {} is {} in the template but {} in the task",
            i + 1,
            declared[i].0,
            expected[i].0
        ));
    }
    differences
}

fn show_columns(columns: &[(String, String)]) -> String {
    if columns.is_empty() {
        return "none".to_owned();
    }
    columns
        .iter()
        .map(|(name, kind)| format!("{name} ({kind})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A Glue `Columns` or `PartitionKeys` list as (name, type) pairs.
fn name_type_list(value: &Value) -> Option<Vec<(String, String)>> {
    value
        .as_sequence()?
        .iter()
        .map(|column| {
            Some((
                column["Name"].as_str()?.to_owned(),
                column["Type"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// The text of a plain string, `!Sub "…"`, `!Sub ["…", {…}]` or `{"Fn::Sub": …}`.
fn sub_text(value: &Value) -> Option<&str> {
    match value {
        Value::String(text) => Some(text),
        Value::Tagged(tagged) if tagged.tag == "Sub" => sub_argument(&tagged.value),
        Value::Mapping(map) if map.len() == 1 => sub_argument(map.get("Fn::Sub")?),
        _ => None,
    }
}

fn sub_argument(argument: &Value) -> Option<&str> {
    match argument {
        Value::String(text) => Some(text),
        Value::Sequence(items) => items.first()?.as_str(),
        _ => None,
    }
}

/// `X` of `!Ref X` or `{"Ref": X}`.
fn ref_name(value: &Value) -> Option<&str> {
    match value {
        Value::Tagged(tagged) if tagged.tag == "Ref" => tagged.value.as_str(),
        Value::Mapping(map) if map.len() == 1 => map.get("Ref")?.as_str(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template with one table over the task's parts, with `columns` (the printed list).
    fn template_with(task: &Task, columns: &str, versions: &str) -> anyhow::Result<Value> {
        let columns: String = columns
            .lines()
            .map(|line| format!("          {line}\n"))
            .collect();
        let location = format!("s3://${{Bucket}}/{}", task_prefix(task.name()));
        let text = [
            "Parameters:",
            "  DatasetTaskVersions:",
            "    Type: String",
            &format!("    Default: {versions}"),
            "Resources:",
            "  Table:",
            "    Type: AWS::Glue::Table",
            "    Properties:",
            "      TableInput:",
            "        Parameters:",
            "          projection.version.values: !Ref DatasetTaskVersions",
            "        PartitionKeys:",
            "          - Name: version",
            "            Type: string",
            "        StorageDescriptor:",
            &format!("          Location: !Sub \"{location}\""),
            &columns,
        ]
        .join("\n");
        Ok(serde_norway::from_str(&text)?)
    }

    fn default_columns() -> anyhow::Result<(Task, Vec<(String, String)>)> {
        let task = Task::default_task()?;
        let columns = glue_columns(&task)?;
        Ok((task, columns))
    }

    #[test]
    fn the_printed_columns_pass_the_check() -> anyhow::Result<()> {
        let (task, columns) = default_columns()?;
        let template = template_with(&task, &columns_yaml(&task, &columns), task.version())?;
        let tables = check_template(&template, &task, &columns)?;
        assert_eq!(tables.len(), 1);
        assert_eq!(tables[0].id, "Table");
        assert!(tables[0].lists_version);

        let older = template_with(&task, &columns_yaml(&task, &columns), "0123456789abcdef")?;
        assert!(!check_template(&older, &task, &columns)?[0].lists_version);
        Ok(())
    }

    #[test]
    fn a_changed_type_is_reported_with_the_field_and_both_types() -> anyhow::Result<()> {
        let (task, columns) = default_columns()?;
        let printed = columns_yaml(&task, &columns);
        let edited = printed.replace(
            "- Name: aesthetic\n    Type: bigint",
            "- Name: aesthetic\n    Type: string",
        );
        assert_ne!(edited, printed, "the default task has aesthetic as bigint");
        let template = template_with(&task, &edited, task.version())?;
        let error = check_template(&template, &task, &columns)
            .expect_err("a changed type is a mismatch")
            .to_string();
        assert!(!error.contains('\n'), "one line: {error}");
        assert!(
            error.contains(
                "column aesthetic has type string in the template but bigint in the task"
            ),
            "{error}"
        );
        Ok(())
    }

    #[test]
    fn missing_extra_and_reordered_columns_are_reported() -> anyhow::Result<()> {
        let (task, columns) = default_columns()?;
        let mut fewer = columns.clone();
        let removed = fewer.remove(0);
        fewer.push(("caption".to_owned(), "string".to_owned()));
        let template = template_with(&task, &columns_yaml(&task, &fewer), task.version())?;
        let error = check_template(&template, &task, &columns)
            .expect_err("a missing column is a mismatch")
            .to_string();
        assert!(
            error.contains(&format!("column {} ({}) is missing", removed.0, removed.1)),
            "{error}"
        );
        assert!(
            error.contains("column caption (string) is not one of the task's"),
            "{error}"
        );

        let mut reordered = columns.clone();
        reordered.swap(0, 1);
        let template = template_with(&task, &columns_yaml(&task, &reordered), task.version())?;
        let error = check_template(&template, &task, &columns)
            .expect_err("another order is a mismatch")
            .to_string();
        assert!(error.contains("another order"), "{error}");
        Ok(())
    }

    #[test]
    fn a_task_without_a_table_is_reported() -> anyhow::Result<()> {
        let (task, columns) = default_columns()?;
        let caption = Task::from_path(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tasks/caption.toml"
        )))?;
        let template = template_with(&task, &columns_yaml(&task, &columns), task.version())?;
        let error = check_template(&template, &caption, &glue_columns(&caption)?)
            .expect_err("no table reads the caption task's parts")
            .to_string();
        assert!(error.contains("no AWS::Glue::Table"), "{error}");
        Ok(())
    }

    /// The repository's own template.yaml, as `make lint-infra`'s neighbour: its table has
    /// the built-in task's columns (tests/tests/integration/template.rs holds the rest).
    #[test]
    fn the_repository_template_passes_the_check() -> anyhow::Result<()> {
        let (task, columns) = default_columns()?;
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../template.yaml"))?;
        let tables = check_template(&serde_norway::from_str(&text)?, &task, &columns)?;
        assert_eq!(tables.len(), 1);
        assert!(tables[0].lists_version);
        Ok(())
    }
}

//! The report as plain text.

use std::fmt::Write as _;

use serde_json::Value;

use super::*;

/// Longest value shown in the text's disagreement list; `--json` has them whole.
const SHOWN_VALUE_CHARS: usize = 60;

impl EvalReport {
    /// The report as plain text: counts, a table of metrics per field, each field's
    /// confusion matrix, what could not be compared, and the disagreements.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let c = &self.counts;
        let _ = writeln!(out, "task {} (version {})", self.task, self.task_version);
        out.push('\n');
        let counts = [
            ("gold images", c.gold_images),
            ("labels", c.labels),
            ("matched", c.matched),
            ("gold without a label", c.gold_without_label),
            ("ambiguous (left out)", c.ambiguous),
            ("labels without gold", c.labels_without_gold),
        ];
        out.push_str(&table(
            &counts
                .iter()
                .map(|(name, n)| vec![(*name).to_owned(), n.to_string()])
                .collect::<Vec<_>>(),
        ));
        let all = &self.all_fields;
        let _ = writeln!(
            out,
            "\nall fields agree: {} of {} images ({})",
            all.agreed,
            all.compared,
            number(all.accuracy)
        );

        if !self.fields.is_empty() {
            let mut rows = vec![
                [
                    "field", "kind", "compared", "agreed", "accuracy", "kappa", "MAE", "QWK",
                ]
                .map(str::to_owned)
                .to_vec(),
            ];
            for f in &self.fields {
                let (kappa, mae, qwk) = match &f.metrics {
                    FieldMetrics::Categorical { kappa, .. } => {
                        (number(*kappa), "-".into(), "-".into())
                    }
                    FieldMetrics::Ordinal {
                        mean_absolute_error,
                        quadratic_weighted_kappa,
                        ..
                    } => (
                        "-".into(),
                        number(*mean_absolute_error),
                        number(*quadratic_weighted_kappa),
                    ),
                    FieldMetrics::Other => ("-".into(), "-".into(), "-".into()),
                };
                rows.push(vec![
                    printable(&f.field),
                    f.kind().as_str().to_owned(),
                    f.compared.to_string(),
                    f.agreed.to_string(),
                    number(f.accuracy),
                    kappa,
                    mae,
                    qwk,
                ]);
            }
            out.push('\n');
            out.push_str(&table(&rows));
            if rows.iter().flatten().any(|c| c == "n/a") {
                out.push_str("(n/a: undefined here, e.g. no pairs, or one answer throughout)\n");
            }
        }

        for f in &self.fields {
            if f.gold_missing > 0 {
                let _ = writeln!(
                    out,
                    "{}: {} matched image(s) have no gold value, not scored",
                    printable(&f.field),
                    f.gold_missing
                );
            }
            let (confusion, unscored) = match &f.metrics {
                FieldMetrics::Categorical { confusion, .. } => (confusion, 0),
                FieldMetrics::Ordinal {
                    confusion,
                    unscored,
                    ..
                } => (confusion, *unscored),
                FieldMetrics::Other => continue,
            };
            if unscored > 0 {
                let _ = writeln!(
                    out,
                    "{}: {unscored} pair(s) with a value that is not an integer, left out of MAE, QWK and the matrix",
                    printable(&f.field)
                );
            }
            if let Some(m) = confusion {
                let _ = writeln!(
                    out,
                    "\n{}: confusion matrix (rows: gold, columns: label)",
                    printable(&f.field)
                );
                let mut rows = vec![
                    std::iter::once("gold \\ label".to_owned())
                        .chain(m.categories.iter().map(category))
                        .collect::<Vec<_>>(),
                ];
                for (value, counts) in m.categories.iter().zip(&m.counts) {
                    rows.push(
                        std::iter::once(category(value))
                            .chain(counts.iter().map(u64::to_string))
                            .collect(),
                    );
                }
                out.push_str(&table(&rows));
            }
        }

        if !self.gold_without_label.is_empty() {
            let _ = writeln!(
                out,
                "\ngold without a label ({})",
                self.gold_without_label.len()
            );
            for key in &self.gold_without_label {
                let _ = writeln!(out, "  {}", printable(key));
            }
        }
        if !self.ambiguous.is_empty() {
            let _ = writeln!(out, "\nambiguous, left out ({})", self.ambiguous.len());
            for a in &self.ambiguous {
                let labels: Vec<String> = a.label_keys.iter().map(|k| printable(k)).collect();
                let _ = write!(
                    out,
                    "  {} matches {}",
                    printable(&a.gold_key),
                    labels.join(", ")
                );
                if !a.shared_with.is_empty() {
                    let others: Vec<String> = a.shared_with.iter().map(|k| printable(k)).collect();
                    let _ = write!(out, "; also matched by gold {}", others.join(", "));
                }
                out.push('\n');
            }
        }
        if !self.unknown_gold_fields.is_empty() {
            let names: Vec<String> = self
                .unknown_gold_fields
                .iter()
                .map(|k| printable(k))
                .collect();
            let _ = writeln!(
                out,
                "\ngold fields the task does not have (ignored): {}",
                names.join(", ")
            );
        }
        if !self.unexpected_gold_values.is_empty() {
            let _ = writeln!(
                out,
                "\ngold values the task's schema does not allow ({})",
                self.unexpected_gold_values.len()
            );
            let mut rows = vec![["image", "field", "value"].map(str::to_owned).to_vec()];
            for g in &self.unexpected_gold_values {
                rows.push(vec![
                    printable(&g.key),
                    printable(&g.field),
                    shown(&g.value),
                ]);
            }
            out.push_str(&table(&rows));
        }

        let _ = writeln!(out, "\ndisagreements ({})", self.disagreements.len());
        if !self.disagreements.is_empty() {
            let mut rows = vec![
                ["image", "field", "gold", "label"]
                    .map(str::to_owned)
                    .to_vec(),
            ];
            for d in &self.disagreements {
                rows.push(vec![
                    printable(&d.key),
                    printable(&d.field),
                    shown(&d.gold),
                    shown(&d.label),
                ]);
            }
            out.push_str(&table(&rows));
        }
        out
    }
}

/// Columns padded to their widest cell: the first and text columns left-aligned, columns
/// of numbers (below the header row) right-aligned.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let cell = |row: &Vec<String>, j: usize| row.get(j).map_or("", String::as_str).to_owned();
    let widths: Vec<usize> = (0..columns)
        .map(|j| {
            rows.iter()
                .map(|row| cell(row, j).chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let numeric: Vec<bool> = (0..columns)
        .map(|j| {
            j > 0
                && rows.iter().skip(1).all(|row| {
                    let c = cell(row, j);
                    c == "-" || c == "n/a" || c.parse::<f64>().is_ok()
                })
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (j, width) in widths.iter().enumerate() {
            let text = cell(row, j);
            let pad = " ".repeat(width.saturating_sub(text.chars().count()));
            if j > 0 {
                line.push_str("  ");
            }
            if numeric[j] {
                line.push_str(&pad);
                line.push_str(&text);
            } else {
                line.push_str(&text);
                line.push_str(&pad);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn number(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.3}"))
}

/// A category as a header: strings bare, everything else as JSON.
fn category(value: &Value) -> String {
    match value {
        Value::String(s) => printable(s),
        other => other.to_string(),
    }
}

/// A value as JSON text (so `"5"` and `5` differ), cut to a line's worth.
fn shown(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > SHOWN_VALUE_CHARS {
        let cut: String = text.chars().take(SHOWN_VALUE_CHARS - 1).collect();
        format!("{cut}…")
    } else {
        text
    }
}

/// Keys and names come from files; control characters would break the table.
fn printable(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.escape_debug().to_string()
    } else {
        text.to_owned()
    }
}

//! `evaluate` on the default task (`landing_page`: boolean; `aesthetic`: integer 1..5)
//! with gold and labels whose every count and metric is worked out by hand below.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use shotlabel_core::eval::{
    AmbiguousMatch, ConfusionMatrix, Disagreement, EvalError, EvalReport, FieldKind, FieldMetrics,
    FieldReport, GoldValue, evaluate, parse_gold, parse_labels_jsonl,
};
use shotlabel_core::task::Task;

fn map(value: Value) -> BTreeMap<String, Value> {
    match value {
        Value::Object(m) => m.into_iter().collect(),
        _ => BTreeMap::new(),
    }
}

fn field<'r>(report: &'r EvalReport, name: &str) -> &'r FieldReport {
    report
        .fields
        .iter()
        .find(|f| f.field == name)
        .unwrap_or_else(|| panic!("no field {name}"))
}

fn close(actual: Option<f64>, expected: f64) -> bool {
    actual.is_some_and(|a| (a - expected).abs() < 1e-12)
}

/// Nine gold images, eleven labels:
///
/// | gold key              | label key(s)                                    | landing_page | aesthetic |
/// |-----------------------|-------------------------------------------------|--------------|-----------|
/// | saas-landing.png      | incoming/saas-landing.png                       | T / T        | 5 / 4     |
/// | geocities-home.png    | incoming/geocities-home.png                     | T / T        | 1 / 1     |
/// | blog-article.png      | incoming/blog-article.png                       | F / T        | 3 / 3     |
/// | pricing-table.png     | incoming/pricing-table.png                      | F / F        | 4 / 4     |
/// | corporate-2008.png    | incoming/corporate-2008.png                     | T / T        | 2 / 3     |
/// | minimal-portfolio.png | incoming/minimal-portfolio.png                  | T / T        | 5 / 5     |
/// | docs-page.png         | docs-page.png (equal keys)                      | F / F        | 4 / 2     |
/// | login-modal.png       | none                                            |              |           |
/// | broken-page.png       | incoming/broken-page.png, archive/broken-page.png: ambiguous |  |         |
///
/// plus `incoming/unrelated.png` and `incoming/xdocs-page.png` (no "/" before
/// `docs-page.png`), which match no gold key.
fn website_case() -> (BTreeMap<String, Value>, BTreeMap<String, Value>) {
    let gold = map(json!({
        "saas-landing.png": {"landing_page": true, "aesthetic": 5},
        "geocities-home.png": {"landing_page": true, "aesthetic": 1},
        "blog-article.png": {"landing_page": false, "aesthetic": 3},
        "pricing-table.png": {"landing_page": false, "aesthetic": 4},
        "corporate-2008.png": {"landing_page": true, "aesthetic": 2},
        "minimal-portfolio.png": {"landing_page": true, "aesthetic": 5},
        "docs-page.png": {"landing_page": false, "aesthetic": 4},
        "login-modal.png": {"landing_page": false, "aesthetic": 4},
        "broken-page.png": {"landing_page": true, "aesthetic": 1},
    }));
    let labels = map(json!({
        "incoming/saas-landing.png": {"landing_page": true, "aesthetic": 4},
        "incoming/geocities-home.png": {"landing_page": true, "aesthetic": 1},
        "incoming/blog-article.png": {"landing_page": true, "aesthetic": 3},
        "incoming/pricing-table.png": {"landing_page": false, "aesthetic": 4},
        "incoming/corporate-2008.png": {"landing_page": true, "aesthetic": 3},
        "incoming/minimal-portfolio.png": {"landing_page": true, "aesthetic": 5},
        "docs-page.png": {"landing_page": false, "aesthetic": 2},
        "incoming/broken-page.png": {"landing_page": true, "aesthetic": 1},
        "archive/broken-page.png": {"landing_page": true, "aesthetic": 2},
        "incoming/unrelated.png": {"landing_page": false, "aesthetic": 3},
        "incoming/xdocs-page.png": {"landing_page": false, "aesthetic": 3},
    }));
    (gold, labels)
}

#[test]
fn counts_and_matching() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let (gold, labels) = website_case();
    let report = evaluate(&task, &gold, &labels);
    let c = report.counts;
    assert_eq!(c.gold_images, 9);
    assert_eq!(c.labels, 11);
    assert_eq!(c.matched, 7);
    assert_eq!(c.gold_without_label, 1);
    assert_eq!(c.ambiguous, 1);
    assert_eq!(c.labels_without_gold, 2);
    assert_eq!(report.gold_without_label, ["login-modal.png"]);
    assert_eq!(
        report.ambiguous,
        [AmbiguousMatch {
            gold_key: "broken-page.png".into(),
            label_keys: vec![
                "archive/broken-page.png".into(),
                "incoming/broken-page.png".into()
            ],
            shared_with: vec![],
        }]
    );
    assert_eq!(report.task, "website-judgement");
    assert_eq!(report.task_version, task.version());
    assert!(report.unknown_gold_fields.is_empty());
    assert!(report.unexpected_gold_values.is_empty());
    Ok(())
}

#[test]
fn landing_page_accuracy_kappa_and_matrix() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let (gold, labels) = website_case();
    let report = evaluate(&task, &gold, &labels);
    let lp = field(&report, "landing_page");
    assert_eq!(lp.kind(), FieldKind::Categorical);
    assert_eq!((lp.compared, lp.agreed, lp.gold_missing), (7, 6, 0));
    assert!(close(lp.accuracy, 6.0 / 7.0));
    // Rows gold (false, true), columns label:
    //   gold false: blog → true, pricing → false, docs → false   = [2, 1]
    //   gold true:  saas, geocities, corporate, minimal → true    = [0, 4]
    // n = 7, rows (3, 4), columns (2, 5).
    // p_o = 6/7 = 42/49; p_e = (3·2 + 4·5) / 49 = 26/49
    // kappa = (42/49 - 26/49) / (1 - 26/49) = (16/49) / (23/49) = 16/23
    let FieldMetrics::Categorical { kappa, confusion } = &lp.metrics else {
        panic!("landing_page is not categorical: {:?}", lp.metrics);
    };
    assert!(close(*kappa, 16.0 / 23.0), "{kappa:?}");
    assert_eq!(
        confusion.as_ref(),
        Some(&ConfusionMatrix {
            categories: vec![json!(false), json!(true)],
            counts: vec![vec![2, 1], vec![0, 4]],
        })
    );
    Ok(())
}

#[test]
fn aesthetic_accuracy_mae_qwk_and_matrix() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let (gold, labels) = website_case();
    let report = evaluate(&task, &gold, &labels);
    let aesthetic = field(&report, "aesthetic");
    assert_eq!(aesthetic.kind(), FieldKind::Ordinal);
    // Agree: geocities, blog, pricing, minimal.
    assert_eq!((aesthetic.compared, aesthetic.agreed), (7, 4));
    assert!(close(aesthetic.accuracy, 4.0 / 7.0));
    let FieldMetrics::Ordinal {
        mean_absolute_error,
        quadratic_weighted_kappa,
        confusion,
        unscored,
    } = &aesthetic.metrics
    else {
        panic!("aesthetic is not ordinal: {:?}", aesthetic.metrics);
    };
    assert_eq!(*unscored, 0);
    // |5-4| + 0 + 0 + 0 + |2-3| + 0 + |4-2| = 4; 4/7.
    assert!(close(*mean_absolute_error, 4.0 / 7.0));
    // Matrix over 1..5 (index i = value - 1), rows gold:
    //   gold 1: → 1               [1,0,0,0,0]
    //   gold 2: → 3               [0,0,1,0,0]
    //   gold 3: → 3               [0,0,1,0,0]
    //   gold 4: → 4 (pricing), 2  [0,1,0,1,0]
    //   gold 5: → 4, 5            [0,0,0,1,1]
    // rows r = (1,1,1,2,2), columns c = (1,1,2,2,1), n = 7.
    // sum (i-j)² O_ij = 1 (2→3) + 4 (4→2) + 1 (5→4) = 6
    // sum (i-j)² r_i c_j = (Σ r_i i²)(Σ c) - 2 (Σ r_i i)(Σ c_j j) + (Σ r)(Σ c_j j²)
    //                    = 55·7 - 2·17·15 + 7·43 = 385 - 510 + 301 = 176
    // The weights' 1/(k-1)² = 1/16 cancels; E_ij = r_i c_j / 7, so
    // kappa_w = 1 - 6 / (176/7) = 1 - 42/176 = 67/88.
    assert!(
        close(*quadratic_weighted_kappa, 67.0 / 88.0),
        "{quadratic_weighted_kappa:?}"
    );
    assert_eq!(
        confusion.as_ref(),
        Some(&ConfusionMatrix {
            categories: (1..=5).map(Value::from).collect(),
            counts: vec![
                vec![1, 0, 0, 0, 0],
                vec![0, 0, 1, 0, 0],
                vec![0, 0, 1, 0, 0],
                vec![0, 1, 0, 1, 0],
                vec![0, 0, 0, 1, 1],
            ],
        })
    );
    Ok(())
}

#[test]
fn exact_match_and_disagreements() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let (gold, labels) = website_case();
    let report = evaluate(&task, &gold, &labels);
    // Both fields agree for geocities, pricing and minimal: 3 of 7.
    assert_eq!(
        (report.all_fields.compared, report.all_fields.agreed),
        (7, 3)
    );
    assert!(close(report.all_fields.accuracy, 3.0 / 7.0));
    let d = |key: &str, label_key: &str, field: &str, gold: Value, label: Value| Disagreement {
        key: key.into(),
        label_key: label_key.into(),
        field: field.into(),
        gold,
        label,
    };
    assert_eq!(
        report.disagreements,
        [
            d(
                "blog-article.png",
                "incoming/blog-article.png",
                "landing_page",
                json!(false),
                json!(true)
            ),
            d(
                "corporate-2008.png",
                "incoming/corporate-2008.png",
                "aesthetic",
                json!(2),
                json!(3)
            ),
            d(
                "docs-page.png",
                "docs-page.png",
                "aesthetic",
                json!(4),
                json!(2)
            ),
            d(
                "saas-landing.png",
                "incoming/saas-landing.png",
                "aesthetic",
                json!(5),
                json!(4)
            ),
        ]
    );
    Ok(())
}

#[test]
fn the_text_and_json_renderings_carry_the_numbers() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let (gold, labels) = website_case();
    let report = evaluate(&task, &gold, &labels);
    let text = report.to_text();
    // 6/7 = 0.857, 16/23 = 0.696, 4/7 = 0.571, 67/88 = 0.761.
    let line = |start: &str| {
        text.lines()
            .find(|l| l.starts_with(start))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(
        line("landing_page "),
        [
            "landing_page",
            "categorical",
            "7",
            "6",
            "0.857",
            "0.696",
            "-",
            "-"
        ],
        "{text}"
    );
    assert_eq!(
        line("aesthetic "),
        [
            "aesthetic",
            "ordinal",
            "7",
            "4",
            "0.571",
            "-",
            "0.571",
            "0.761"
        ],
        "{text}"
    );
    assert!(
        text.contains("all fields agree: 3 of 7 images (0.429)"),
        "{text}"
    );
    assert!(text.contains("disagreements (4)"), "{text}");
    assert!(
        text.contains("gold without a label (1)\n  login-modal.png"),
        "{text}"
    );
    assert!(
        text.contains("broken-page.png matches archive/broken-page.png, incoming/broken-page.png"),
        "{text}"
    );
    // The matrix's header row and gold row 4.
    assert_eq!(
        line("gold \\ label  1"),
        ["gold", "\\", "label", "1", "2", "3", "4", "5"]
    );
    assert!(text.contains("\n4             0  1  0  1  0\n"), "{text}");

    let json = serde_json::to_value(&report)?;
    assert_eq!(json["counts"]["matched"], 7);
    let fields = json["fields"].as_array().cloned().unwrap_or_default();
    let lp = fields
        .iter()
        .find(|f| f["field"] == "landing_page")
        .cloned()
        .unwrap_or_default();
    assert_eq!(lp["kind"], "categorical");
    assert_eq!(lp["confusion"]["counts"], json!([[2, 1], [0, 4]]));
    assert!(lp.get("mean_absolute_error").is_none());
    Ok(())
}

#[test]
fn partial_gold_odd_values_and_number_forms() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let gold = map(json!({
        // 5.0 equals 5; landing_page left out, so not scored for this image.
        "a.png": {"aesthetic": 5.0},
        // "yes" and 7 are outside the schema; "colour" is not a field of the task.
        "b.png": {"landing_page": "yes", "aesthetic": 7, "colour": "red"},
    }));
    let labels = map(json!({
        "x/a.png": {"landing_page": true, "aesthetic": 5},
        "x/b.png": {"landing_page": false, "aesthetic": 4},
    }));
    let report = evaluate(&task, &gold, &labels);
    assert_eq!(report.counts.matched, 2);
    assert_eq!(report.unknown_gold_fields, ["colour"]);
    assert_eq!(
        report.unexpected_gold_values,
        [
            GoldValue {
                key: "b.png".into(),
                field: "aesthetic".into(),
                value: json!(7)
            },
            GoldValue {
                key: "b.png".into(),
                field: "landing_page".into(),
                value: json!("yes")
            },
        ]
    );

    let aesthetic = field(&report, "aesthetic");
    assert_eq!((aesthetic.compared, aesthetic.agreed), (2, 1));
    let FieldMetrics::Ordinal {
        mean_absolute_error,
        quadratic_weighted_kappa,
        confusion,
        ..
    } = &aesthetic.metrics
    else {
        panic!("not ordinal");
    };
    // |5-5| + |7-4| = 3; 3/2.
    assert_eq!(*mean_absolute_error, Some(1.5));
    // Categories 1,2,3,4,5,7 (7 added in its place: index 5). Pairs (5→5) at (4,4) and
    // (7→4) at (5,3). Σ(i-j)²O = 4; rows r4 = r5 = 1, columns c3 = c4 = 1;
    // Σ(i-j)² r_i c_j = (4-3)² + (4-4)² + (5-3)² + (5-4)² = 1 + 0 + 4 + 1 = 6;
    // kappa_w = 1 - n·4/6 = 1 - 8/6 = -1/3.
    assert!(close(*quadratic_weighted_kappa, -1.0 / 3.0));
    assert_eq!(
        confusion.as_ref().map(|m| m.categories.clone()),
        Some([1, 2, 3, 4, 5, 7].map(Value::from).to_vec())
    );

    let lp = field(&report, "landing_page");
    assert_eq!((lp.compared, lp.agreed, lp.gold_missing), (1, 0, 1));
    let FieldMetrics::Categorical { kappa, confusion } = &lp.metrics else {
        panic!("not categorical");
    };
    // One pair ("yes", false): p_o = 0, p_e = 0, kappa = 0.
    assert_eq!(*kappa, Some(0.0));
    assert_eq!(
        confusion.as_ref(),
        Some(&ConfusionMatrix {
            categories: vec![json!(false), json!(true), json!("yes")],
            counts: vec![vec![0, 0, 0], vec![0, 0, 0], vec![1, 0, 0]],
        })
    );
    // a.png agrees on all it has; b.png does not.
    assert_eq!(
        (report.all_fields.compared, report.all_fields.agreed),
        (2, 1)
    );
    Ok(())
}

#[test]
fn a_label_matched_by_two_gold_keys_is_ambiguous_for_both() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let answer = json!({"landing_page": true, "aesthetic": 3});
    let gold = map(json!({"a/b.png": answer, "b.png": answer}));
    let labels = map(json!({"x/a/b.png": answer}));
    let report = evaluate(&task, &gold, &labels);
    assert_eq!(report.counts.matched, 0);
    assert_eq!(report.counts.ambiguous, 2);
    assert_eq!(report.counts.labels_without_gold, 0);
    assert_eq!(report.ambiguous[0].gold_key, "a/b.png");
    assert_eq!(report.ambiguous[0].shared_with, ["b.png"]);
    assert_eq!(report.ambiguous[1].shared_with, ["a/b.png"]);
    // Nothing compared: every metric undefined.
    assert_eq!(report.all_fields.accuracy, None);
    assert!(report.fields.iter().all(|f| f.accuracy.is_none()));
    assert!(report.to_text().contains("n/a"));
    Ok(())
}

#[test]
fn gold_files_as_an_object_or_json_lines() -> anyhow::Result<()> {
    let object = parse_gold(r#"{"a.png": {"landing_page": true}, "b.png": {"aesthetic": 2}}"#)?;
    assert_eq!(object.len(), 2);
    assert_eq!(object["a.png"], json!({"landing_page": true}));

    let lines = parse_gold(
        "{\"key\": \"incoming/a.png\", \"landing_page\": true, \"etag\": \"e\"}\n\n\
         {\"file_name\": \"b.png\", \"aesthetic\": 2}\n",
    )?;
    assert_eq!(lines["incoming/a.png"], json!({"landing_page": true}));
    assert_eq!(lines["b.png"], json!({"aesthetic": 2}));
    // One line of JSON Lines is one record, not a map of names.
    let one = parse_gold(r#"{"key": "a.png", "aesthetic": 4}"#)?;
    assert_eq!(one["a.png"], json!({"aesthetic": 4}));

    // The fixture gold set parses.
    let fixture = parse_gold(include_str!("../../tests/data/screenshots/labels.json"))?;
    assert_eq!(fixture.len(), 12);

    assert_eq!(parse_gold(" \n"), Err(EvalError::EmptyGold));
    assert_eq!(parse_gold("{}"), Err(EvalError::EmptyGold));
    assert_eq!(
        parse_gold(r#"{"a.png": 5}"#),
        Err(EvalError::NotAnObject {
            key: "a.png".into()
        })
    );
    assert_eq!(parse_gold("[1]"), Err(EvalError::UnknownShape));
    assert_eq!(
        parse_gold("{\"key\": \"a\"}\n{\"aesthetic\": 1}"),
        Err(EvalError::NoKey {
            line: 2,
            wanted: "\"key\" or \"file_name\""
        })
    );
    Ok(())
}

#[test]
fn labels_jsonl_as_export_writes_it() -> anyhow::Result<()> {
    let text = concat!(
        r#"{"landing_page": true, "aesthetic": 4, "key": "incoming/a.png", "etag": "e1", "task_version": "v1", "model": "m", "batch_id": "b"}"#,
        "\n",
        // An answer field named like an export column comes back under its own name.
        r#"{"aesthetic": 2, "label_model": "mine", "key": "incoming/b.png", "etag": "e2", "task_version": "v2", "model": "m", "batch_id": "b"}"#,
        "\n"
    );
    let file = parse_labels_jsonl(text)?;
    assert_eq!(
        file.labels["incoming/a.png"],
        json!({"landing_page": true, "aesthetic": 4})
    );
    assert_eq!(
        file.labels["incoming/b.png"],
        json!({"aesthetic": 2, "model": "mine"})
    );
    assert_eq!(
        file.task_versions.into_iter().collect::<Vec<_>>(),
        ["v1", "v2"]
    );

    let twice = "{\"key\": \"k\"}\n{\"key\": \"j\"}\n{\"key\": \"k\"}\n";
    assert_eq!(
        parse_labels_jsonl(twice),
        Err(EvalError::Duplicate {
            line: 3,
            first: 1,
            key: "k".into()
        })
    );
    assert!(matches!(
        parse_labels_jsonl("{\"key\": \"k\"}\nnot json\n"),
        Err(EvalError::Line { line: 2, .. })
    ));
    // A labels file needs `key`; `file_name` is for gold sets.
    assert_eq!(
        parse_labels_jsonl("{\"file_name\": \"k\"}"),
        Err(EvalError::NoKey {
            line: 1,
            wanted: "\"key\""
        })
    );
    assert_eq!(parse_labels_jsonl("")?.labels.len(), 0);
    Ok(())
}

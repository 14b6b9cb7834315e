//! Reading user inputs (JSONL, Parquet or CSV, any field names) into `InputRow`s through
//! the `[data]` field mapping. Errors name the file, the line or row, and the field.

use crate::config::DataConfig;
use crate::records::InputRow;
use anyhow::{bail, Context, Result};
use polars::prelude::*;
use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

/// All rows of all input files, in file order, cut to `limit`.
pub fn read_inputs(cfg: &DataConfig) -> Result<Vec<InputRow>> {
    let mut rows = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for path in &cfg.inputs {
        let file_rows = read_file(path, cfg)?;
        for (row, place) in file_rows {
            if let Some(first) = seen.insert(row.id.clone(), place.clone()) {
                bail!("duplicate id {:?} at {place} (first at {first})\nhint: ids must be unique; fix the data or set [data] id_field to a unique field", row.id);
            }
            rows.push(row);
            if cfg.limit.is_some_and(|l| rows.len() >= l) {
                return Ok(rows);
            }
        }
    }
    if rows.is_empty() {
        bail!(
            "no input rows in {:?}\nhint: check [data] inputs",
            cfg.inputs
        );
    }
    Ok(rows)
}

fn read_file(path: &Path, cfg: &DataConfig) -> Result<Vec<(InputRow, String)>> {
    if !path.exists() {
        bail!(
            "input file {} does not exist\nhint: check [data] inputs in the config",
            path.display()
        );
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "jsonl" | "json" | "ndjson" => read_jsonl(path, cfg),
        "parquet" | "csv" => read_table(path, cfg, &ext),
        _ => bail!(
            "input file {} has an unknown extension; use .jsonl, .parquet or .csv",
            path.display()
        ),
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A JSON value as answer or id text: strings as they are, numbers and bools printed.
fn value_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn read_jsonl(path: &Path, cfg: &DataConfig) -> Result<Vec<(InputRow, String)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let lineno = i + 1;
        let place = format!("{}:{lineno}", path.display());
        let line =
            line.with_context(|| format!("{place}: cannot read line (is the file UTF-8?)"))?;
        if line.trim().is_empty() {
            continue;
        }
        let obj: serde_json::Value = serde_json::from_str(&line).with_context(|| {
            format!("{place}: malformed JSON line\nhint: each line must be one JSON object")
        })?;
        if !obj.is_object() {
            bail!("{place}: the line is not a JSON object\nhint: each line must be one JSON object with the [data] fields");
        }
        let get = |field: &str| -> Result<Option<String>> {
            match obj.get(field) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => value_text(v).map(Some).with_context(|| {
                    format!("{place}: field {field:?} must be a string or a number")
                }),
            }
        };
        let input = get(&cfg.input_field)?.with_context(|| {
            format!("{place}: missing field {:?}\nhint: set [data] input_field to the field holding the input text", cfg.input_field)
        })?;
        let id = match &cfg.id_field {
            Some(f) => get(f)?.with_context(|| format!("{place}: missing id field {f:?}"))?,
            None => format!("{}-{lineno}", stem(path)),
        };
        // An absent gold field is an error (a misspelt name would drop every gold
        // answer); an explicit null says this row has none.
        let gold = match &cfg.gold_field {
            Some(f) if obj.get(f).is_none() => bail!(
                "{place}: missing gold field {f:?}\nhint: remove [data] gold_field if the data has no gold answers, or write null for a row without one"
            ),
            Some(f) => get(f)?,
            None => None,
        };
        check_input(&input, &place, cfg)?;
        out.push((InputRow { id, input, gold }, place));
    }
    Ok(out)
}

/// An input must hold text, and not more than the configured bound: one runaway row would
/// otherwise fail late, at the teacher, after hours of work on the others.
fn check_input(input: &str, place: &str, cfg: &DataConfig) -> Result<()> {
    if input.trim().is_empty() {
        bail!(
            "{place}: field {:?} is empty\nhint: remove the row, or point [data] input_field at the field with the text",
            cfg.input_field
        );
    }
    let chars = input.chars().count();
    if chars > cfg.max_input_chars {
        bail!(
            "{place}: field {:?} holds {chars} characters, more than [data] max_input_chars = {}\nhint: shorten or drop the row, or raise max_input_chars if the teacher's context can hold it",
            cfg.input_field,
            cfg.max_input_chars
        );
    }
    Ok(())
}

fn read_table(path: &Path, cfg: &DataConfig, ext: &str) -> Result<Vec<(InputRow, String)>> {
    let read = if ext == "csv" {
        CsvReadOptions::default()
            .with_has_header(true)
            .try_into_reader_with_file_path(Some(path.to_path_buf()))
            .and_then(|r| r.finish())
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        ParquetReader::new(file).finish()
    };
    let df =
        anyhow::Context::with_context(read, || format!("cannot read {} as {ext}", path.display()))?;
    let text_col = |field: &str| -> Result<Column> {
        let col = anyhow::Context::with_context(df.column(field), || {
            format!(
                "{}: missing column {field:?} (columns: {:?})",
                path.display(),
                df.get_column_names()
            )
        })?;
        anyhow::Context::with_context(col.cast(&DataType::String), || {
            format!(
                "{}: column {field:?} cannot be read as text",
                path.display()
            )
        })
    };
    let inputs = text_col(&cfg.input_field)?;
    let ids = cfg.id_field.as_deref().map(text_col).transpose()?;
    let golds = cfg.gold_field.as_deref().map(text_col).transpose()?;
    let mut out = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let place = format!("{} row {}", path.display(), i + 1);
        let input = inputs
            .str()?
            .get(i)
            .map(str::to_string)
            .with_context(|| format!("{place}: field {:?} is null", cfg.input_field))?;
        let id = match &ids {
            Some(c) => c
                .str()?
                .get(i)
                .map(str::to_string)
                .with_context(|| format!("{place}: id is null"))?,
            None => format!("{}-{}", stem(path), i + 1),
        };
        // A null gold cell: this row has no gold answer.
        let gold = match &golds {
            Some(c) => c.str()?.get(i).map(str::to_string),
            None => None,
        };
        check_input(&input, &place, cfg)?;
        out.push((InputRow { id, input, gold }, place));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(path: &Path, limit: Option<usize>) -> DataConfig {
        DataConfig {
            inputs: vec![path.to_path_buf()],
            id_field: Some("key".into()),
            input_field: "question".into(),
            gold_field: Some("answer".into()),
            limit,
            max_input_chars: 1000,
        }
    }

    #[test]
    fn null_gold_means_none_and_an_absent_gold_field_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(
            &p,
            "{\"key\": \"a\", \"question\": \"1+1?\", \"answer\": null}\n",
        )
        .unwrap();
        let rows = read_inputs(&cfg(&p, None)).unwrap();
        assert_eq!(rows[0].gold, None);
        std::fs::write(&p, "{\"key\": \"a\", \"question\": \"1+1?\"}\n").unwrap();
        let err = format!("{:#}", read_inputs(&cfg(&p, None)).unwrap_err());
        assert!(
            err.contains("in.jsonl:1") && err.contains("missing gold field"),
            "{err}"
        );
    }

    #[test]
    fn parquet_and_csv_inputs_map_fields_and_stringify_gold() {
        let dir = tempfile::tempdir().unwrap();
        let mut df =
            df!("key" => ["a", "b"], "question" => ["1+1?", "2+3?"], "answer" => [2i64, 5])
                .unwrap();
        let pq = dir.path().join("in.parquet");
        crate::io::parquet::write_frame(&pq, &mut df).unwrap();
        let csv = dir.path().join("in.csv");
        std::fs::write(&csv, "key,question,answer\na,1+1?,2\nb,2+3?,5\n").unwrap();
        for path in [pq, csv] {
            let rows = read_inputs(&cfg(&path, None)).unwrap();
            assert_eq!(rows.len(), 2, "{}", path.display());
            assert_eq!(
                rows[1],
                InputRow {
                    id: "b".into(),
                    input: "2+3?".into(),
                    gold: Some("5".into())
                }
            );
        }
    }

    #[test]
    fn duplicate_ids_and_missing_columns_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, "{\"key\": \"a\", \"question\": \"x\", \"answer\": 1}\n{\"key\": \"a\", \"question\": \"y\", \"answer\": 2}\n").unwrap();
        let err = format!("{:#}", read_inputs(&cfg(&path, None)).unwrap_err());
        assert!(
            err.contains("duplicate id \"a\"")
                && err.contains("in.jsonl:2")
                && err.contains("in.jsonl:1"),
            "{err}"
        );
        assert_eq!(read_inputs(&cfg(&path, Some(1))).unwrap().len(), 1);

        let csv = dir.path().join("in.csv");
        std::fs::write(&csv, "key,text\na,x\n").unwrap();
        let err = format!("{:#}", read_inputs(&cfg(&csv, None)).unwrap_err());
        assert!(
            err.contains("in.csv") && err.contains("missing column \"question\""),
            "{err}"
        );
    }
}

//! What curate did, for people: report.json (every count), report.md (the funnel, label
//! distribution, agreement histogram, rationale lengths) and funnel.svg.

use super::rules::Counts;
use anyhow::Result;
use polars::prelude::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

/// The figures of the kept rows the report shows, gathered batch by batch as the split
/// files are written.
#[derive(Debug, Default)]
pub struct KeptStats {
    rows: usize,
    labels: HashMap<Option<String>, usize>,
    rationale_chars: Histogram,
    completion_tokens: Histogram,
    /// Rows that agree with gold, disagree, have no verdict.
    gold: [usize; 3],
}

impl KeptStats {
    /// Count a batch of kept rows (`answer`, `rationale`, `completion_tokens`,
    /// `agrees_with_gold`).
    pub fn add(&mut self, kept: &DataFrame) -> Result<()> {
        self.rows += kept.height();
        for a in kept.column("answer")?.str()?.iter() {
            *self.labels.entry(a.map(str::to_string)).or_default() += 1;
        }
        self.rationale_chars.add_all(
            kept.column("rationale")?
                .str()?
                .iter()
                .map(|r| r.map_or(0, |r| r.chars().count() as u32)),
        );
        self.completion_tokens.add_all(
            kept.column("completion_tokens")?
                .cast(&DataType::UInt32)?
                .u32()?
                .iter()
                .map(|t| t.unwrap_or(0)),
        );
        for g in kept.column("agrees_with_gold")?.bool()?.iter() {
            self.gold[match g {
                Some(true) => 0,
                Some(false) => 1,
                None => 2,
            }] += 1;
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Everything the report shows, as JSON.
pub fn summary(
    counts: &Counts,
    kept: &KeptStats,
    splits: &serde_json::Map<String, Value>,
) -> Result<Value> {
    let funnel: Vec<Value> = {
        let mut rows = counts.rows_in;
        counts
            .funnel
            .iter()
            .map(|(rule, removed)| {
                rows -= removed;
                json!({"rule": rule, "removed": removed, "rows_after": rows})
            })
            .collect()
    };
    let removed: serde_json::Map<String, Value> = counts
        .funnel
        .iter()
        .map(|(r, n)| (r.to_string(), (*n).into()))
        .collect();
    Ok(json!({
        "rows_in": counts.rows_in,
        "funnel": funnel,
        "removed": removed,
        "removed_parse_by_reason": counts.parse_reasons,
        "rows_out": kept.rows,
        "splits": splits,
        "labels": label_counts(kept),
        "agreement_histogram": counts.agreement_histogram,
        "rationale_chars": kept.rationale_chars.stats(),
        "completion_tokens": kept.completion_tokens.stats(),
        "agrees_with_gold": json!({"agree": kept.gold[0], "disagree": kept.gold[1], "unknown": kept.gold[2]}),
        "teachers": counts.teachers,
    }))
}

/// Answer counts of the kept rows, most frequent first (top 20).
fn label_counts(kept: &KeptStats) -> Vec<Value> {
    let mut counts: Vec<(&Option<String>, &usize)> = kept.labels.iter().collect();
    counts.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    counts
        .into_iter()
        .take(20)
        .map(|(a, n)| json!({"answer": a, "rows": n}))
        .collect()
}

/// Counts of each value: the distribution of a per-row figure in memory that follows
/// its distinct values, not the rows (100M kept rows would need 400 MB a figure as a list).
#[derive(Debug, Default)]
struct Histogram(BTreeMap<u32, u64>);

impl Histogram {
    fn add_all(&mut self, values: impl IntoIterator<Item = u32>) {
        for v in values {
            *self.0.entry(v).or_default() += 1;
        }
    }

    /// The value at 0-based rank `rank` of the sorted values.
    fn at_rank(&self, rank: u64) -> Option<u32> {
        let mut below = 0;
        for (&v, &n) in &self.0 {
            below += n;
            if rank < below {
                return Some(v);
            }
        }
        None
    }

    /// min, mean, median (the two middle values' mean for an even count), p90 (the value
    /// at rank round(0.9 (n − 1)), Polars' "nearest" quantile) and max; null when empty.
    fn stats(&self) -> Value {
        let n: u64 = self.0.values().sum();
        let (Some((&min, _)), Some((&max, _))) =
            (self.0.first_key_value(), self.0.last_key_value())
        else {
            return Value::Null;
        };
        let sum: u128 = self.0.iter().map(|(&v, &c)| v as u128 * c as u128).sum();
        let middle = |rank| self.at_rank(rank).map_or(f64::NAN, f64::from);
        let median = if n % 2 == 1 {
            middle(n / 2)
        } else {
            (middle(n / 2 - 1) + middle(n / 2)) / 2.0
        };
        let p90 = middle(((n - 1) as f64 * 0.9).round() as u64);
        json!({"min": min as f64, "mean": sum as f64 / n as f64, "median": median, "p90": p90, "max": max as f64})
    }
}

/// report.md: the same facts, readable.
pub fn markdown(r: &Value) -> String {
    let mut md = String::from(
        "# Curation report\n\n## Funnel\n\n| rule | removed | rows after |\n|---|---:|---:|\n",
    );
    md.push_str(&format!("| rows in | | {} |\n", r["rows_in"]));
    for step in r["funnel"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} |\n",
            step["rule"].as_str().unwrap_or(""),
            step["removed"],
            step["rows_after"]
        ));
    }
    md.push_str(&format!("| **rows out** | | **{}** |\n", r["rows_out"]));
    if let Some(reasons) = r["removed_parse_by_reason"]
        .as_object()
        .filter(|m| !m.is_empty())
    {
        let list: Vec<String> = reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
        md.push_str(&format!(
            "\nParse failures by reason: {}.\n",
            list.join(", ")
        ));
    }
    md.push_str(&format!("\nSplits: {}.\n", r["splits"]));
    if let Some(bytes) = r["topk_bytes_per_token"].as_f64() {
        md.push_str(&format!(
            "\nToken top-k soft labels: {} tokens, {bytes:.1} bytes a token on disk.\n",
            r["topk_tokens"]
        ));
    }
    if let Some(teachers) = r["teachers"].as_array().filter(|t| !t.is_empty()) {
        md.push_str("\n## Teachers\n\n| teacher | rows | usable | agrees with the vote | agrees with gold |\n|---|---:|---:|---:|---:|\n");
        let pct = |v: &Value| {
            v.as_f64()
                .map(|x| format!("{:.1} %", 100.0 * x))
                .unwrap_or_else(|| "—".into())
        };
        for t in teachers {
            md.push_str(&format!(
                "| `{}` | {} | {} | {} | {} |\n",
                t["teacher"].as_str().unwrap_or(""),
                t["rows"],
                t["usable"],
                pct(&t["agrees_with_vote"]),
                pct(&t["agrees_with_gold"])
            ));
        }
    }
    md.push_str("\n## Labels (kept rows)\n\n| answer | rows |\n|---|---:|\n");
    for l in r["labels"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} |\n",
            l["answer"].as_str().unwrap_or("∅"),
            l["rows"]
        ));
    }
    let g = &r["agrees_with_gold"];
    md.push_str(&format!(
        "\nAgreement with gold (kept rows): {} agree, {} disagree, {} without gold.\n",
        g["agree"], g["disagree"], g["unknown"]
    ));
    if let Some(h) = r["agreement_histogram"].as_array() {
        md.push_str(
            "\n## Self-consistency (inputs by majority share)\n\n| share | inputs |\n|---|---:|\n",
        );
        for (i, n) in h.iter().enumerate() {
            md.push_str(&format!("| {}–{} % | {} |\n", i * 10, (i + 1) * 10, n));
        }
    }
    md.push_str("\n## Rationale length (kept rows)\n\n| measure | min | mean | median | p90 | max |\n|---|---:|---:|---:|---:|---:|\n");
    for (name, key) in [
        ("characters", "rationale_chars"),
        ("completion tokens", "completion_tokens"),
    ] {
        let s = &r[key];
        let f = |k: &str| s[k].as_f64().map(|v| format!("{v:.0}")).unwrap_or_default();
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            f("min"),
            f("mean"),
            f("median"),
            f("p90"),
            f("max")
        ));
    }
    md.push_str("\n![funnel](funnel.svg)\n");
    md
}

/// The funnel as horizontal bars drawn with plotters: the rows left after each rule (blue)
/// and the rows it removed (red), with the counts written beside each bar and the rows
/// on a ticked axis.
pub fn funnel_svg(r: &Value) -> anyhow::Result<String> {
    use plotters::prelude::*;
    let rows_in = r["rows_in"].as_f64().unwrap_or(0.0);
    let mut bars = vec![("rows in".to_string(), rows_in, 0.0)];
    for step in r["funnel"].as_array().into_iter().flatten() {
        bars.push((
            step["rule"].as_str().unwrap_or("").replace('_', " "),
            step["rows_after"].as_f64().unwrap_or(0.0),
            step["removed"].as_f64().unwrap_or(0.0),
        ));
    }
    let n = bars.len();
    let drawing = |e: DrawingAreaErrorKind<std::io::Error>| {
        anyhow::anyhow!("cannot draw the curation funnel: {e}")
    };
    let mut svg = String::new();
    {
        let height = 90 + 26 * n as u32;
        let root = SVGBackend::with_string(&mut svg, (820, height)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        // Room on the right for the longest label ("answer not in rationale: 1234 (−56)").
        let x_max = rows_in.max(1.0) * 1.7;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Curation funnel: rows left after each rule",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(10)
            .build_cartesian_2d(0f64..x_max, 0f64..n as f64)
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_desc("rows")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(drawing)?;
        let top = |i: usize| (n - i) as f64 - 0.15;
        let bottom = |i: usize| (n - i) as f64 - 0.85;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, rows, _))| {
                Rectangle::new([(0.0, bottom(i)), (*rows, top(i))], BLUE.mix(0.6).filled())
            }))
            .map_err(drawing)?
            .label("rows left")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], BLUE.mix(0.6).filled()));
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, rows, removed))| {
                Rectangle::new(
                    [(*rows, bottom(i)), (rows + removed, top(i))],
                    RED.mix(0.6).filled(),
                )
            }))
            .map_err(drawing)?
            .label("removed by the rule")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], RED.mix(0.6).filled()));
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (label, rows, removed))| {
                let text = if *removed > 0.0 {
                    format!("{label}: {rows} (−{removed})")
                } else {
                    format!("{label}: {rows}")
                };
                Text::new(
                    text,
                    (rows + removed + x_max * 0.01, (n - i) as f64 - 0.5),
                    ("sans-serif", 13).into_font(),
                )
            }))
            .map_err(drawing)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(drawing)?;
        root.present().map_err(drawing)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polars' own figures of a list of values: what report.json showed before the
    /// histogram, and what it must still show.
    fn polars_stats(values: &[u32]) -> Value {
        let e = col("v").cast(DataType::Float64);
        let s = DataFrame::new(values.len(), vec![Column::new("v".into(), values)])
            .unwrap()
            .lazy()
            .select([
                e.clone().min().alias("min"),
                e.clone().mean().alias("mean"),
                e.clone().median().alias("median"),
                e.clone()
                    .quantile(lit(0.9), QuantileMethod::Nearest)
                    .alias("p90"),
                e.max().alias("max"),
            ])
            .collect()
            .unwrap();
        let get = |c: &str| s.column(c).unwrap().f64().unwrap().get(0);
        json!({"min": get("min"), "mean": get("mean"), "median": get("median"), "p90": get("p90"), "max": get("max")})
    }

    #[test]
    fn the_histogram_gives_polars_figures_for_odd_even_and_skewed_counts() {
        let mut seed = 7u64;
        let mut next = move |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % m) as u32
        };
        for (n, spread) in [
            (1, 10),
            (2, 10),
            (9, 3),
            (10, 3),
            (11, 1000),
            (1000, 50),
            (1001, 5000),
        ] {
            let mut values: Vec<u32> = (0..n).map(|_| next(spread)).collect();
            // A long tail, so p90 and the mean sit away from the median.
            values.extend((0..n / 10).map(|_| 10_000 + next(100_000)));
            let mut h = Histogram::default();
            h.add_all(values.iter().copied());
            let (ours, theirs) = (h.stats(), polars_stats(&values));
            for k in ["min", "median", "p90", "max"] {
                assert_eq!(ours[k], theirs[k], "{k} of {n} values");
            }
            let (a, b) = (
                ours["mean"].as_f64().unwrap(),
                theirs["mean"].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-9 * b.abs(),
                "mean of {n} values: {a} vs {b}"
            );
        }
        assert_eq!(Histogram::default().stats(), Value::Null);
    }

    #[test]
    fn the_funnel_draws_every_rule_with_its_counts_on_a_rows_axis() {
        let report = serde_json::json!({
            "rows_in": 24,
            "funnel": [
                {"rule": "parse_failure", "removed": 3, "rows_after": 21},
                {"rule": "near_duplicate", "removed": 0, "rows_after": 21},
                {"rule": "contaminated", "removed": 5, "rows_after": 16},
            ]
        });
        let svg = funnel_svg(&report).unwrap();
        assert!(svg.starts_with("<svg"));
        for text in [
            "rows in: 24",
            "parse failure: 21 (−3)",
            "near duplicate: 21",
            "contaminated: 16 (−5)",
            "\nrows\n",
            "removed by the rule",
        ] {
            assert!(svg.contains(text), "{text} missing:\n{svg}");
        }
    }
}

//! Samples → min/median/max, and the rows of the results table.

use serde_json::{Value, json};

/// min/median/max of one figure over its repeats.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(samples: &[f64]) -> Spread {
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        Spread {
            min: s[0],
            median: median_sorted(&s),
            max: s[s.len() - 1],
            n: s.len(),
        }
    }
    pub fn json(&self) -> Value {
        json!({"min": self.min, "median": self.median, "max": self.max, "repeats": self.n})
    }
}

pub fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    median_sorted(&s)
}

/// Nearest-rank percentile of `samples` (`p` in 0..=1; 1 is the largest).
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn median_sorted(s: &[f64]) -> f64 {
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// One line of the results: a figure, its spread, and (optionally) its ratio to a comparison.
pub struct Row {
    pub section: &'static str,
    pub name: String,
    pub unit: &'static str,
    pub spread: Spread,
    /// (comparison's name, ratio of the medians), in the order the comparisons were added.
    pub ratios: Vec<(String, f64)>,
    pub note: String,
}

impl Row {
    pub fn new(
        section: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        s: Spread,
    ) -> Row {
        Row {
            section,
            name: name.into(),
            unit,
            spread: s,
            ratios: Vec::new(),
            note: String::new(),
        }
    }
    pub fn vs(mut self, name: &str, base: &Spread) -> Row {
        self.ratios
            .push((name.to_string(), self.spread.median / base.median));
        self
    }
    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }
    pub fn json(&self) -> Value {
        json!({
            "section": self.section,
            "name": self.name,
            "unit": self.unit,
            "value": self.spread.json(),
            "ratio": self.ratios.first().map(|(c, r)| json!({"to": c, "median_ratio": r})),
            "ratios": self.ratios.iter().map(|(c, r)| json!({"to": c, "median_ratio": r})).collect::<Vec<_>>(),
            "note": self.note,
        })
    }
}

fn num(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The markdown table of `rows`, one table per section.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    let mut section = "";
    for r in rows {
        if r.section != section {
            section = r.section;
            out.push_str(&format!(
                "\n### {section}\n\n| figure | unit | min | median | max | ratio (median) | note |\n|---|---|---:|---:|---:|---|---|\n"
            ));
        }
        let ratio = r
            .ratios
            .iter()
            .map(|(c, x)| format!("{x:.2}× {c}"))
            .collect::<Vec<_>>()
            .join("; ");
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.unit,
            num(r.spread.min),
            num(r.spread.median),
            num(r.spread.max),
            ratio,
            r.note
        ));
    }
    out
}

//! Output: a readable table, or one JSON object per scenario, and an
//! optional SVG latency CDF.

use std::fmt::Write as _;
use std::path::PathBuf;

use hdrhistogram::Histogram;
use serde_json::{Map, Value};

/// Where results go.
#[derive(Debug)]
pub struct Output {
    json: bool,
    plot: Option<PathBuf>,
}

/// The result of one scenario.
#[derive(Debug)]
pub struct Report {
    fields: Map<String, Value>,
    notes: Vec<String>,
}

impl Report {
    /// A report for `scenario`.
    pub fn new(scenario: &str) -> Self {
        let mut fields = Map::new();
        fields.insert("scenario".into(), Value::from(scenario));
        Self {
            fields,
            notes: Vec::new(),
        }
    }

    /// Adds a field (numbers are rounded to 3 decimals).
    pub fn set(&mut self, key: &str, v: impl Into<Value>) -> &mut Self {
        let mut v = v.into();
        if let Some(f) = v.as_f64().filter(|_| v.is_f64()) {
            v = Value::from((f * 1000.0).round() / 1000.0);
        }
        self.fields.insert(key.into(), v);
        self
    }

    /// Adds an optional field.
    pub fn set_opt(&mut self, key: &str, v: Option<f64>) -> &mut Self {
        if let Some(v) = v {
            self.set(key, v);
        }
        self
    }

    /// Adds latency percentiles (milliseconds) from a histogram of
    /// microseconds.
    pub fn latency(&mut self, prefix: &str, h: &Histogram<u64>) -> &mut Self {
        if h.is_empty() {
            return self;
        }
        for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999)] {
            self.set(
                &format!("{prefix}{name}_ms"),
                h.value_at_quantile(q) as f64 / 1000.0,
            );
        }
        self.set(&format!("{prefix}max_ms"), h.max() as f64 / 1000.0)
    }

    /// A line of explanation printed under the table.
    pub fn note(&mut self, s: impl Into<String>) -> &mut Self {
        self.notes.push(s.into());
        self
    }
}

impl Output {
    /// Output settings.
    pub fn new(json: bool, plot: Option<PathBuf>) -> Self {
        Self { json, plot }
    }

    /// Prints a report.
    pub fn emit(&self, r: &Report) {
        if self.json {
            println!("{}", Value::Object(r.fields.clone()));
            return;
        }
        let width = r.fields.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in &r.fields {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("{k:<width$}  {v}");
        }
        for n in &r.notes {
            println!("  note: {n}");
        }
        println!();
    }

    /// Progress messages (stderr, suppressed with --json).
    pub fn say(&self, s: &str) {
        if !self.json {
            eprintln!("{s}");
        }
    }

    /// Draws the CDF of `h` (microseconds) if a plot was asked for.
    pub fn plot(&self, title: &str, h: &Histogram<u64>) -> anyhow::Result<()> {
        let Some(path) = &self.plot else {
            return Ok(());
        };
        if h.is_empty() {
            return Ok(());
        }
        std::fs::write(path, cdf_svg(title, h))?;
        self.say(&format!("latency CDF written to {}", path.display()));
        Ok(())
    }
}

/// An SVG line chart of the cumulative distribution, log-scaled latency.
pub fn cdf_svg(title: &str, h: &Histogram<u64>) -> String {
    let (w, ht, left, bottom, top, right) = (720.0, 420.0, 70.0, 50.0, 40.0, 20.0);
    let min = (h.min().max(1) as f64 / 1000.0).max(0.001);
    let max = (h.max() as f64 / 1000.0).max(min * 10.0);
    let (lmin, lmax) = (min.log10().floor(), max.log10().ceil());
    let x = |ms: f64| left + (ms.max(min).log10() - lmin) / (lmax - lmin) * (w - left - right);
    let y = |q: f64| top + (1.0 - q) * (ht - top - bottom);
    let mut pts = String::new();
    for v in h.iter_quantiles(2) {
        let ms = v.value_iterated_to() as f64 / 1000.0;
        let _ = write!(pts, "{:.1},{:.1} ", x(ms), y(v.quantile_iterated_to()));
    }
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{ht}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"24\" font-size=\"15\">{title}</text>\n"
    );
    for d in (lmin as i32)..=(lmax as i32) {
        let v = 10f64.powi(d);
        let xv = x(v);
        let _ = writeln!(
            s,
            "<line x1=\"{xv:.1}\" y1=\"{top}\" x2=\"{xv:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{xv:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v} ms</text>",
            ht - bottom,
            ht - bottom + 18.0
        );
    }
    for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
        let yv = y(q);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{yv:.1}\" x2=\"{:.1}\" y2=\"{yv:.1}\" stroke=\"#eee\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{q}</text>",
            w - right,
            left - 6.0,
            yv + 4.0
        );
    }
    let _ = writeln!(
        s,
        "<polyline points=\"{pts}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">latency, send to receipt (log scale)</text>\n\
         <text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">fraction of deliveries</text>\n</svg>",
        (w + left) / 2.0,
        ht - 10.0,
        ht / 2.0,
        ht / 2.0
    );
    s
}

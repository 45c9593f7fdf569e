//! The result table: one line per workload and peer, each value the median of the repeated
//! runs, with the ratio Agora/peer. Printed as Markdown, so docs/PERFORMANCE.md can hold it
//! as printed.

/// Which way is better for a row's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Throughput: more is better.
    Higher,
    /// Latency, memory: less is better.
    Lower,
}

/// One workload: Agora's median and each peer's.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured, for example `acked append, 100 in flight`.
    pub workload: String,
    /// The unit of every value in the row, for example `msgs/s` or `µs`.
    pub unit: &'static str,
    /// Which way is better.
    pub better: Better,
    /// Agora's value (`None`: not measured in this run).
    pub agora: Option<f64>,
    /// Each peer's label (with its durability setting) and value; `None` when the peer has
    /// no equivalent or failed (the reason is printed under the table).
    pub peers: Vec<(&'static str, Option<f64>)>,
}

/// The median of `values` (the mean of the middle two for an even count); `None` if empty.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

fn number(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(v) if v.abs() >= 100.0 => thousands(v.round() as i64),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn thousands(v: i64) -> String {
    let digits = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0 {
        out.insert(0, '-');
    }
    out
}

/// `agora / peer`, as `1.23×`; `—` when either is missing or the peer is 0.
pub fn ratio(agora: Option<f64>, peer: Option<f64>) -> String {
    match (agora, peer) {
        (Some(a), Some(p)) if p != 0.0 => format!("{:.2}×", a / p),
        _ => "—".into(),
    }
}

/// The table as Markdown lines: workload, unit (↑ higher is better, ↓ lower), Agora, peer,
/// peer's value, Agora/peer. A row with several peers takes several lines; the workload and
/// Agora cells are printed on its first.
pub fn markdown(rows: &[Row]) -> Vec<String> {
    let mut out = vec![
        "| workload | unit | Agora | peer | peer value | Agora/peer |".to_owned(),
        "|---|---|---:|---|---:|---:|".to_owned(),
    ];
    for row in rows {
        let arrow = match row.better {
            Better::Higher => "↑",
            Better::Lower => "↓",
        };
        let head = format!(
            "| {} | {} {} | {} ",
            row.workload,
            row.unit,
            arrow,
            number(row.agora)
        );
        if row.peers.is_empty() {
            out.push(format!("{head}| — | — | — |"));
        }
        for (i, (peer, value)) in row.peers.iter().enumerate() {
            let left = if i == 0 {
                head.clone()
            } else {
                "| | | ".to_owned()
            };
            out.push(format!(
                "{left}| {peer} | {} | {} |",
                number(*value),
                ratio(row.agora, *value)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn numbers_and_ratios() {
        assert_eq!(number(Some(1_234_567.4)), "1,234,567");
        assert_eq!(number(Some(12.34)), "12.3");
        assert_eq!(number(None), "—");
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50×");
        assert_eq!(ratio(Some(3.0), Some(0.0)), "—");
    }

    #[test]
    fn a_row_with_two_peers_takes_two_lines() {
        let rows = [Row {
            workload: "w".into(),
            unit: "msgs/s",
            better: Better::Higher,
            agora: Some(200.0),
            peers: vec![("a", Some(100.0)), ("b", None)],
        }];
        let lines = markdown(&rows);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[2], "| w | msgs/s ↑ | 200 | a | 100 | 2.00× |");
        assert_eq!(lines[3], "| | | | b | — | — |");
    }
}

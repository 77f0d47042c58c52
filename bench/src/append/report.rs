//! The report: the results table, the breakdown table, and the machine they were measured
//! on.

use std::fmt::Write as _;

use crate::measure::Measurement;
use crate::workload::Workload;
use crate::Engine;

/// One line of the results table.
pub(crate) struct Row {
    pub(crate) engine: Engine,
    pub(crate) writers: u32,
    pub(crate) baseline: Measurement,
    pub(crate) event_store: Measurement,
}

/// One line of the breakdown table.
pub(crate) struct BreakdownRow {
    pub(crate) engine: Engine,
    pub(crate) writers: u32,
    pub(crate) workload: Workload,
    pub(crate) measurement: Measurement,
    pub(crate) baseline_per_second: f64,
}

/// Everything measured in this run.
#[derive(Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) breakdown: Vec<BreakdownRow>,
}

impl Report {
    pub(crate) fn table(&self) -> String {
        let header = [
            "engine",
            "writers",
            "baseline ops/s",
            "baseline p50 ms",
            "baseline p99 ms",
            "event store ops/s",
            "event store p50 ms",
            "event store p99 ms",
            "ratio",
        ];
        let rows = self.rows.iter().map(|row| {
            vec![
                row.engine.name().to_owned(),
                row.writers.to_string(),
                format!("{:.0}", row.baseline.per_second()),
                format!("{:.2}", row.baseline.quantile_ms(0.5)),
                format!("{:.2}", row.baseline.quantile_ms(0.99)),
                format!("{:.0}", row.event_store.per_second()),
                format!("{:.2}", row.event_store.quantile_ms(0.5)),
                format!("{:.2}", row.event_store.quantile_ms(0.99)),
                format!(
                    "{:.2}",
                    row.event_store.per_second() / row.baseline.per_second()
                ),
            ]
        });
        markdown_table(&header, rows.collect())
    }

    pub(crate) fn breakdown_table(&self) -> String {
        let header = [
            "engine",
            "writers",
            "workload",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "/ baseline",
        ];
        let rows = self.breakdown.iter().map(|row| {
            vec![
                row.engine.name().to_owned(),
                row.writers.to_string(),
                row.workload.name(),
                format!("{:.0}", row.measurement.per_second()),
                format!("{:.2}", row.measurement.quantile_ms(0.5)),
                format!("{:.2}", row.measurement.quantile_ms(0.99)),
                format!(
                    "{:.2}",
                    row.measurement.per_second() / row.baseline_per_second
                ),
            ]
        });
        markdown_table(&header, rows.collect())
    }
}

/// A markdown table whose columns also line up as plain text; numbers are right-aligned.
fn markdown_table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let is_text_column = |column: usize| rows.iter().any(|row| row[column].parse::<f64>().is_err());
    let widths: Vec<usize> = (0..header.len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].len())
                .chain([header[column].len(), 3])
                .max()
                .unwrap_or(3)
        })
        .collect();
    let mut table = String::new();
    let mut line = |cells: Vec<String>| {
        table.push('|');
        for cell in cells {
            let _ = write!(table, " {cell} |");
        }
        table.push('\n');
    };
    line(
        header
            .iter()
            .zip(&widths)
            .map(|(name, width)| format!("{name:<width$}"))
            .collect(),
    );
    line(
        widths
            .iter()
            .enumerate()
            .map(|(column, width)| {
                if is_text_column(column) {
                    "-".repeat(*width)
                } else {
                    format!("{}:", "-".repeat(width - 1))
                }
            })
            .collect(),
    );
    for row in &rows {
        line(
            row.iter()
                .zip(&widths)
                .enumerate()
                .map(|(column, (cell, width))| {
                    if is_text_column(column) {
                        format!("{cell:<width$}")
                    } else {
                        format!("{cell:>width$}")
                    }
                })
                .collect(),
        );
    }
    table
}

/// This machine, for the report: logical CPUs and their model.
pub(crate) fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|cpuinfo| {
            cpuinfo
                .lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cpus} cores (nproc), {model}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lines_up() {
        let table = markdown_table(
            &["engine", "ops/s"],
            vec![
                vec!["postgres".to_owned(), "12".to_owned()],
                vec!["sqlite".to_owned(), "3456".to_owned()],
            ],
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[1], "| -------- | ----: |");
        assert_eq!(lines[3], "| sqlite   |  3456 |");
        assert!(lines.iter().all(|line| line.len() == lines[0].len()));
    }
}

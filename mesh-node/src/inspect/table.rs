//! Aligned plain-text tables for `mesh-node bpf`: a header row, then rows, columns separated by
//! two spaces and padded to the widest cell. Columns marked numeric are right-aligned.
use std::fmt::{self, Write as _};

pub struct Table {
    headers: Vec<&'static str>,
    numeric: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Headers ending in `#` are right-aligned (numbers); the `#` is not printed.
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.trim_end_matches('#')).collect(),
            numeric: headers.iter().map(|h| h.ends_with('#')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        widths
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let widths = self.widths();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - cell.chars().count();
                let last = i + 1 == row.len();
                if self.numeric[i] {
                    let _ = write!(line, "{}{cell}", " ".repeat(pad));
                } else if last {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell}{}", " ".repeat(pad));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// `key: value` lines with the keys aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(key, value)| {
            format!(
                "{key:<width$}  {value}\n",
                width = width + 1,
                key = format!("{key}:")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_padded_to_the_widest_cell_and_numbers_align_right() {
        let mut table = Table::new(&["NAME", "ENTRIES#", "NOTE"]);
        table.row(vec!["MESH_ENROLLED".into(), "3".into(), "pods".into()]);
        table.row(vec!["X".into(), "65536".into(), String::new()]);
        assert_eq!(
            table.to_string(),
            "NAME           ENTRIES  NOTE\n\
             MESH_ENROLLED        3  pods\n\
             X                65536\n"
        );
    }

    #[test]
    fn field_lists_align_their_values() {
        assert_eq!(
            fields(&[("kernel", "6.18".into()), ("fail mode", "open".into())]),
            "kernel:     6.18\nfail mode:  open\n"
        );
    }
}

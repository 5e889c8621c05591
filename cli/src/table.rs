//! Aligned plain-text tables for human output.

/// Prints rows under a header, each column as wide as its widest cell; the header in bold on a terminal only.
pub fn print(header: &[&str], rows: &[Vec<String>]) {
    use std::io::IsTerminal;
    let text = render(header, rows);
    match text.split_once('\n') {
        Some((head, body)) if std::io::stdout().is_terminal() => print!("\x1b[1m{head}\x1b[0m\n{body}"),
        _ => print!("{text}"),
    }
}

pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_align() {
        let out = super::render(&["ID", "STATE"], &[vec!["a-long-id".into(), "RUNNING".into()], vec!["b".into(), "X".into()]]);
        assert_eq!(out, "ID         STATE\na-long-id  RUNNING\nb          X\n");
    }
}

//! Text from outside (a configuration file, a path, an upstream's name)
//! made safe to print on one line of a log or an error: [`Escaped`]. For
//! the configuration's errors and for the TLS files' and the upstream's,
//! which quote what the configuration says.

/// Shows text with its control characters escaped (`\n`, `\u{1b}`), and
/// the invisible ones that break or reorder a line (U+2028, U+2029, the
/// bidirectional overrides): what a configuration file says is printed on
/// one line, as written, and non-ASCII text stays readable.
pub struct Escaped<T>(pub T);

impl<T: std::fmt::Display> std::fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.to_string().chars() {
            if needs_escape(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

//! Minimal logging to stderr. The gateway logs at `info` by default; libraries stay quiet unless
//! `KNIT_LOG` is set (`error`, `warn`, `info`, `debug`).

use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);

/// Severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

fn level() -> u8 {
    // Relaxed: the level is a lone setting that publishes no other data; a thread that reads a
    // stale MAX only computes the same value from the environment again.
    let l = LEVEL.load(Ordering::Relaxed);
    if l != u8::MAX {
        return l;
    }
    let l = match std::env::var("KNIT_LOG").as_deref() {
        Ok("error") => 0,
        Ok("warn") => 1,
        Ok("info") => 2,
        Ok("debug") => 3,
        _ => 0,
    };
    // Relaxed: as above, a lone setting; nothing else is read through it.
    LEVEL.store(l, Ordering::Relaxed);
    l
}

/// Sets the level unless `KNIT_LOG` chose one.
pub fn set_default_level(l: Level) {
    if std::env::var_os("KNIT_LOG").is_none() {
        // Relaxed: a lone setting, made at start-up; nothing else is read through it.
        LEVEL.store(l as u8, Ordering::Relaxed);
    }
}

/// Logs at `l`.
pub fn log(l: Level, args: std::fmt::Arguments<'_>) {
    if (l as u8) <= level() {
        let tag = match l {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        };
        line(format_args!("knit {tag}: {args}"));
    }
}

/// Writes one line to stderr. A stderr that cannot be written (a closed pipe: `knit gateway
/// 2>&1 | head`) loses the line; it never panics, least of all in an application's thread.
pub fn line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut e = std::io::stderr().lock();
    let _ = e.write_fmt(args).and_then(|()| e.write_all(b"\n"));
}

pub(crate) fn warn(args: std::fmt::Arguments<'_>) {
    log(Level::Warn, args)
}

pub(crate) fn info(args: std::fmt::Arguments<'_>) {
    log(Level::Info, args)
}

pub(crate) fn debug(args: std::fmt::Arguments<'_>) {
    log(Level::Debug, args)
}

/// A string a peer supplied (an application name, a method, a topic, a reason), as a log line
/// shows it: control characters and Unicode line and paragraph separators escaped (`\n`,
/// `\u{1b}`…), so no peer can end a line and forge the next one, or send a terminal escape
/// sequence to whoever reads the log; everything else as it is. Every log line that prints
/// what a peer sent prints it through this, or quoted with `{:?}`, which escapes the same.
#[derive(Debug)]
pub struct Escaped<'a>(pub &'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Escaped;

    #[test]
    fn escaped_strings_cannot_break_a_log_line() {
        let forged = "admin\nknit warn: FORGED\r\u{1b}[2J\u{2028}x\ty";
        let shown = Escaped(forged).to_string();
        assert!(
            !shown.chars().any(|c| c.is_control() || c == '\u{2028}'),
            "{shown}"
        );
        assert_eq!(
            shown,
            "admin\\nknit warn: FORGED\\r\\u{1b}[2J\\u{2028}x\\ty"
        );
        assert_eq!(Escaped("plain é \"name\"").to_string(), "plain é \"name\"");
    }
}

//! Markdown: a title with the domain and the date range, one table per section with its
//! items, and a summary table (rows per section, as written) at the end.
//!
//! User text renders as literal text ([`Cell`], [`cell`]): every character Markdown or
//! HTML gives a meaning inline (`\`, `` ` ``, `*`, `_`, `[`, `]`, `(`, `)`, `<`, `>`, `!`,
//! `|`, `~`, `&`, `#`) is escaped with a backslash (CommonMark escapes any ASCII
//! punctuation), so no HTML tag, entity, link, image, emphasis, code span or heading comes
//! out of a value. GFM's extended autolinks (`https://x.y`, `www.x.y`, `a@b.c`, which a
//! GFM renderer turns into links without any markup) are broken the same way: every `:`
//! and `@` is escaped, and the `.` after `www`. Line breaks (LF, CR, CRLF) become `<br>`,
//! so a row stays one line. A non-finite number (`NaN`, `Infinity`) is an empty cell.
//! Cells are escaped straight into the buffered writer: a huge value is not copied again.

#[cfg(test)]
use std::borrow::Cow;
use std::fmt;
use std::io::{self, BufWriter, Write};

use chrono::{DateTime, SecondsFormat, Utc};

use super::csv::columns;
use super::file::Output;
use super::sections::Batch;
use super::{Feed, Header};

const BUFFER: usize = 128 * 1024;

/// The characters [`Cell`] escapes with a backslash wherever they are.
#[cfg(test)]
const SPECIAL: [char; 17] = [
    '\\', '`', '*', '_', '[', ']', '(', ')', '<', '>', '!', '|', '~', '&', '#', ':', '@',
];

/// A value shown as literal text in one Markdown table cell (and the title), escaped as
/// it is written (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cell<'a>(pub(crate) &'a str);

impl fmt::Display for Cell<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = self.0;
        let bytes = value.as_bytes();
        // Runs of plain text are written whole; only what needs escaping is split out.
        let mut plain = 0;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            let escaped: Option<&str> = match b {
                b'\\' | b'`' | b'*' | b'_' | b'[' | b']' | b'(' | b')' | b'<' | b'>' | b'!'
                | b'|' | b'~' | b'&' | b'#' | b':' | b'@' => None,
                // The `.` of `www.` (any case): a GFM www autolink starts there.
                b'.' if i >= 3 && bytes[i - 3..i].eq_ignore_ascii_case(b"www") => None,
                b'\r' | b'\n' => Some("<br>"),
                _ => {
                    i += 1;
                    continue;
                }
            };
            f.write_str(&value[plain..i])?;
            match escaped {
                None => {
                    f.write_str("\\")?;
                    f.write_str(&value[i..=i])?;
                    i += 1;
                }
                Some(br) => {
                    f.write_str(br)?;
                    i += if b == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                        2
                    } else {
                        1
                    };
                }
            }
            plain = i;
        }
        f.write_str(&value[plain..])
    }
}

/// `value` made safe for one Markdown table cell: [`Cell`], as a string.
#[cfg(test)]
pub(crate) fn cell(value: &str) -> Cow<'_, str> {
    if !value.contains(SPECIAL) && !value.contains(['\n', '\r', '.']) {
        return Cow::Borrowed(value);
    }
    Cow::Owned(Cell(value).to_string())
}

/// A float as a cell: empty when not finite.
fn num(value: f64) -> String {
    if value.is_finite() {
        value.to_string()
    } else {
        String::new()
    }
}

fn time(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The date range as the summary shows it.
pub(crate) fn range(header: &Header) -> String {
    let side = |at: &Option<DateTime<Utc>>, open: &str| at.as_ref().map_or(open.to_owned(), time);
    format!(
        "{} to {} (end exclusive)",
        side(&header.date_from, "the beginning"),
        side(&header.date_to, "now")
    )
}

pub(crate) fn write(feed: &mut Feed, out: Output, header: &Header) -> io::Result<Output> {
    let mut w = BufWriter::with_capacity(BUFFER, out);
    writeln!(w, "# Export of {}\n", Cell(&header.domain.name))?;
    writeln!(w, "- Domain: `{}`", header.domain.id)?;
    writeln!(w, "- Export: `{}`", header.export_id)?;
    writeln!(w, "- Date range: {}", range(header))?;
    while let Some(section) = feed.next_section()? {
        let names = columns(section);
        writeln!(w, "\n## {}\n", section.name())?;
        writeln!(w, "| {} |", names.join(" | "))?;
        writeln!(w, "|{}", "---|".repeat(names.len()))?;
        while let Some(batch) = feed.next_batch()? {
            match batch {
                Batch::Content(rows) => {
                    for r in rows {
                        let published = r.published_at.as_ref().map(time).unwrap_or_default();
                        writeln!(
                            w,
                            "| {} | {} | {} | {} | {} | {} | {} | {} |",
                            r.id,
                            Cell(&r.title),
                            Cell(&r.slug),
                            Cell(&r.body),
                            r.status,
                            published,
                            time(&r.created_at),
                            time(&r.updated_at)
                        )?;
                    }
                }
                Batch::Keywords(rows) => {
                    for r in rows {
                        writeln!(
                            w,
                            "| {} | {} | {} | {} | {} | {} | {} | {} |",
                            r.id,
                            Cell(&r.keyword),
                            r.search_volume,
                            num(r.position),
                            r.clicks,
                            r.impressions,
                            num(r.ctr),
                            time(&r.recorded_at)
                        )?;
                    }
                }
                Batch::Analytics(rows) => {
                    for r in rows {
                        writeln!(
                            w,
                            "| {} | {} | {} | {} | {} | {} | {} |",
                            r.content_id,
                            Cell(&r.title),
                            r.page_views,
                            r.unique_visitors,
                            num(r.avg_bounce_rate),
                            r.conversions,
                            r.revenue_cents
                        )?;
                    }
                }
                Batch::Settings(rows) => {
                    for r in rows {
                        let value = r.value.0.to_string();
                        writeln!(w, "| {} | {} |", Cell(&r.key), Cell(&value))?;
                    }
                }
            }
        }
    }
    writeln!(w, "\n## Summary\n")?;
    writeln!(w, "| section | rows |")?;
    writeln!(w, "|---|---|")?;
    for (section, count) in feed.counts() {
        writeln!(w, "| {} | {count} |", section.name())?;
    }
    writeln!(w, "\nDate range: {}", range(header))?;
    w.into_inner().map_err(|err| err.into_error())
}

//! Markdown: a title with the domain and the date range, one table per section with its
//! items, and a summary table (rows per section, as written) at the end.
//!
//! User text renders as literal text ([`cell`]): every character Markdown or HTML gives a
//! meaning inline (`\`, `` ` ``, `*`, `_`, `[`, `]`, `(`, `)`, `<`, `>`, `!`, `|`, `~`, `&`,
//! `#`) is escaped with a backslash (CommonMark escapes any ASCII punctuation), so no HTML
//! tag, entity, link, image, emphasis, code span or heading comes out of a value; line
//! breaks (LF, CR, CRLF) become `<br>`, so a row stays one line. A non-finite number
//! (`NaN`, `Infinity`) is an empty cell.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, BufWriter, Write};

use chrono::{DateTime, SecondsFormat, Utc};

use super::csv::columns;
use super::file::Output;
use super::sections::Batch;
use super::{Feed, Header};

const BUFFER: usize = 128 * 1024;

/// The characters [`cell`] escapes with a backslash.
const SPECIAL: [char; 15] = [
    '\\', '`', '*', '_', '[', ']', '(', ')', '<', '>', '!', '|', '~', '&', '#',
];

/// `value` made safe for one Markdown table cell (and the title): literal text.
pub(crate) fn cell(value: &str) -> Cow<'_, str> {
    if !value.contains(SPECIAL) && !value.contains(['\n', '\r']) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if SPECIAL.contains(&c) => {
                out.push('\\');
                out.push(c);
            }
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push_str("<br>");
            }
            '\n' => out.push_str("<br>"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
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
    writeln!(w, "# Export of {}\n", cell(&header.domain.name))?;
    writeln!(w, "- Domain: `{}`", header.domain.id)?;
    writeln!(w, "- Export: `{}`", header.export_id)?;
    writeln!(w, "- Date range: {}", range(header))?;
    let mut line = String::with_capacity(1024);
    while let Some(section) = feed.next_section()? {
        let names = columns(section);
        writeln!(w, "\n## {}\n", section.name())?;
        writeln!(w, "| {} |", names.join(" | "))?;
        writeln!(w, "|{}", "---|".repeat(names.len()))?;
        while let Some(batch) = feed.next_batch()? {
            match batch {
                Batch::Content(rows) => {
                    for r in rows {
                        line.clear();
                        let published = r.published_at.as_ref().map(time).unwrap_or_default();
                        let _ = writeln!(
                            line,
                            "| {} | {} | {} | {} | {} | {} | {} | {} |",
                            r.id,
                            cell(&r.title),
                            cell(&r.slug),
                            cell(&r.body),
                            r.status,
                            published,
                            time(&r.created_at),
                            time(&r.updated_at)
                        );
                        w.write_all(line.as_bytes())?;
                    }
                }
                Batch::Keywords(rows) => {
                    for r in rows {
                        line.clear();
                        let _ = writeln!(
                            line,
                            "| {} | {} | {} | {} | {} | {} | {} | {} |",
                            r.id,
                            cell(&r.keyword),
                            r.search_volume,
                            num(r.position),
                            r.clicks,
                            r.impressions,
                            num(r.ctr),
                            time(&r.recorded_at)
                        );
                        w.write_all(line.as_bytes())?;
                    }
                }
                Batch::Analytics(rows) => {
                    for r in rows {
                        line.clear();
                        let _ = writeln!(
                            line,
                            "| {} | {} | {} | {} | {} | {} | {} |",
                            r.content_id,
                            cell(&r.title),
                            r.page_views,
                            r.unique_visitors,
                            num(r.avg_bounce_rate),
                            r.conversions,
                            r.revenue_cents
                        );
                        w.write_all(line.as_bytes())?;
                    }
                }
                Batch::Settings(rows) => {
                    for r in rows {
                        line.clear();
                        let value = r.value.0.to_string();
                        let _ = writeln!(line, "| {} | {} |", cell(&r.key), cell(&value));
                        w.write_all(line.as_bytes())?;
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

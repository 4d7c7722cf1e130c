//! CSV (RFC 4180, the `csv` crate): one file per section; a bare CSV when the export has
//! one section, else a ZIP (streamed, deflate) of `content.csv`, `keywords.csv`,
//! `analytics.csv` and `settings.csv` (the included ones).
//!
//! Formula-injection guard: in every column holding user text, a value starting with `=`,
//! `+`, `-`, `@`, tab, CR or `|` is written with a `'` in front ([`guard`]).
//! Timestamps are RFC 3339 in UTC with microseconds, an absent one an empty field.
//!
//! The content section, the big one, is PostgreSQL's own CSV writer (`COPY (SELECT ...) TO
//! STDOUT`, the guard in the SELECT: see `sections`), so every file ends its lines with LF
//! (RFC 4180 readers accept either).

use std::borrow::Cow;
use std::io::{self, BufWriter, Write};

use chrono::{DateTime, SecondsFormat, Utc};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use super::file::Output;
use super::sections::{Batch, Section};
use super::{Feed, Header};

/// The prefixes the guard neutralises.
const FORMULA_PREFIXES: [char; 7] = ['=', '+', '-', '@', '\t', '\r', '|'];

/// `value`, with a `'` in front when a spreadsheet could read it as a formula.
pub(crate) fn guard(value: &str) -> Cow<'_, str> {
    if value.starts_with(FORMULA_PREFIXES) {
        Cow::Owned(format!("'{value}"))
    } else {
        Cow::Borrowed(value)
    }
}

/// The column names of a section's CSV.
pub(crate) fn columns(section: Section) -> &'static [&'static str] {
    match section {
        Section::Content => &[
            "id",
            "title",
            "slug",
            "body",
            "status",
            "published_at",
            "created_at",
            "updated_at",
        ],
        Section::Keywords => &[
            "id",
            "keyword",
            "search_volume",
            "position",
            "clicks",
            "impressions",
            "ctr",
            "recorded_at",
        ],
        Section::Analytics => &[
            "content_id",
            "title",
            "page_views",
            "unique_visitors",
            "avg_bounce_rate",
            "conversions",
            "revenue_cents",
        ],
        Section::Settings => &["key", "value"],
    }
}

const BUFFER: usize = 128 * 1024;

pub(crate) fn write(feed: &mut Feed, out: Output, header: &Header) -> io::Result<Output> {
    if header.sections.len() == 1 {
        let mut out = BufWriter::with_capacity(BUFFER, out);
        if let Some(section) = feed.next_section()? {
            write_section(feed, &mut out, section)?;
        }
        return out.into_inner().map_err(|err| err.into_error());
    }
    let mut zip = ZipWriter::new_stream(BufWriter::with_capacity(BUFFER, out));
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .compression_level(Some(1))
        .large_file(true);
    while let Some(section) = feed.next_section()? {
        zip.start_file(format!("{}.csv", section.name()), options)
            .map_err(io::Error::from)?;
        write_section(feed, &mut zip, section)?;
    }
    let stream = zip.finish().map_err(io::Error::from)?;
    stream
        .into_inner()
        .into_inner()
        .map_err(|err| err.into_error())
}

fn builder() -> ::csv::WriterBuilder {
    let mut builder = ::csv::WriterBuilder::new();
    builder
        .buffer_capacity(BUFFER)
        // LF like PostgreSQL's CSV writer, which writes the content section.
        .terminator(::csv::Terminator::Any(b'\n'));
    builder
}

fn time(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn write_section<W: Write>(feed: &mut Feed, out: W, section: Section) -> io::Result<()> {
    let mut writer = builder().from_writer(out);
    writer.write_record(columns(section))?;
    while let Some(batch) = feed.next_batch()? {
        match batch {
            Batch::ContentCsv { csv, .. } => {
                // PostgreSQL's CSV writer already guarded and quoted these rows.
                let mut raw = writer.into_inner().map_err(|err| err.into_error())?;
                raw.write_all(&csv)?;
                writer = builder().from_writer(raw);
            }
            Batch::Content(rows) => {
                for r in rows {
                    writer.write_field(r.id.hyphenated().to_string())?;
                    writer.write_field(guard(&r.title).as_bytes())?;
                    writer.write_field(guard(&r.slug).as_bytes())?;
                    writer.write_field(guard(&r.body).as_bytes())?;
                    writer.write_field(guard(&r.status).as_bytes())?;
                    writer.write_field(r.published_at.as_ref().map(time).unwrap_or_default())?;
                    writer.write_field(time(&r.created_at))?;
                    writer.write_field(time(&r.updated_at))?;
                    writer.write_record(None::<&[u8]>)?;
                }
            }
            Batch::Keywords(rows) => {
                for r in rows {
                    writer.write_field(r.id.to_string())?;
                    writer.write_field(guard(&r.keyword).as_bytes())?;
                    writer.write_field(r.search_volume.to_string())?;
                    writer.write_field(r.position.to_string())?;
                    writer.write_field(r.clicks.to_string())?;
                    writer.write_field(r.impressions.to_string())?;
                    writer.write_field(r.ctr.to_string())?;
                    writer.write_field(time(&r.recorded_at))?;
                    writer.write_record(None::<&[u8]>)?;
                }
            }
            Batch::Analytics(rows) => {
                for r in rows {
                    writer.write_field(r.content_id.hyphenated().to_string())?;
                    writer.write_field(guard(&r.title).as_bytes())?;
                    writer.write_field(r.page_views.to_string())?;
                    writer.write_field(r.unique_visitors.to_string())?;
                    writer.write_field(r.avg_bounce_rate.to_string())?;
                    writer.write_field(r.conversions.to_string())?;
                    writer.write_field(r.revenue_cents.to_string())?;
                    writer.write_record(None::<&[u8]>)?;
                }
            }
            Batch::Settings(rows) => {
                for r in rows {
                    writer.write_field(guard(&r.key).as_bytes())?;
                    writer.write_field(guard(&r.value.0.to_string()).as_bytes())?;
                    writer.write_record(None::<&[u8]>)?;
                }
            }
        }
    }
    writer.flush()
}

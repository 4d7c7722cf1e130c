//! CSV (RFC 4180, PostgreSQL's own CSV writer): one file per section, each the output of
//! one `COPY (SELECT ...) TO STDOUT (FORMAT csv, HEADER)` (`sections::copy_sql`) copied
//! through as it arrives; a bare CSV when the export has one section, else a ZIP (streamed)
//! of `content.csv`, `keywords.csv`, `analytics.csv` and `settings.csv` (the included
//! ones). Lines end with LF (RFC 4180 readers accept either).
//!
//! Formula-injection guard: in every column holding user text (titles, slugs, bodies,
//! keywords, settings keys and values; not ids, numbers, timestamps or the status enum), a
//! value starting with `=`, `+`, `-`, `@`, tab, CR or `|` is written with a `'` in front,
//! applied in the SELECT (`sections::copy_sql`). Timestamps are RFC 3339 in UTC with
//! microseconds, an absent one an empty field; a non-finite number is an empty field;
//! settings values are PostgreSQL's `jsonb` text.

use std::io::{self, BufWriter, Write};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use super::MAX_ZIP_LEVEL;
use super::file::Output;
use super::sections::Section;
use super::{Feed, Header};

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

/// The ZIP entries' options: stored at `level` 0, else deflated at `level` (1 fastest, at
/// most [`MAX_ZIP_LEVEL`]); see `EXPORT_ZIP_LEVEL` and docs/bench/HISTORY.md "Domain export".
fn zip_options(level: u8) -> SimpleFileOptions {
    let options = SimpleFileOptions::default().large_file(true);
    if level == 0 {
        options.compression_method(CompressionMethod::Stored)
    } else {
        options
            .compression_method(CompressionMethod::Deflated)
            .compression_level(Some(i64::from(level.min(MAX_ZIP_LEVEL))))
    }
}

pub(crate) fn write(
    feed: &mut Feed,
    out: Output,
    header: &Header,
    zip_level: u8,
) -> io::Result<Output> {
    if header.sections.len() == 1 {
        let mut out = BufWriter::with_capacity(BUFFER, out);
        if feed.next_section()?.is_some() {
            copy_section(feed, &mut out)?;
        }
        return out.into_inner().map_err(|err| err.into_error());
    }
    let mut zip = ZipWriter::new_stream(BufWriter::with_capacity(BUFFER, out));
    let options = zip_options(zip_level);
    while let Some(section) = feed.next_section()? {
        zip.start_file(format!("{}.csv", section.name()), options)
            .map_err(io::Error::from)?;
        copy_section(feed, &mut zip)?;
    }
    let stream = zip.finish().map_err(io::Error::from)?;
    stream
        .into_inner()
        .into_inner()
        .map_err(|err| err.into_error())
}

/// Copies the section's COPY output (header included) as it arrives.
fn copy_section<W: Write>(feed: &mut Feed, out: &mut W) -> io::Result<()> {
    while let Some(frames) = feed.next_csv()? {
        for frame in &frames {
            out.write_all(frame)?;
        }
    }
    Ok(())
}

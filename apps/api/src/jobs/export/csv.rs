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
//! microseconds (`2026-03-01T12:00:00.500000Z`, as the JSON and Markdown writers print
//! them), an absent one an empty field; a non-finite number is an empty field; settings
//! values are PostgreSQL's `jsonb` text.
//!
//! **Timestamps are rewritten here, not in the SELECT.** `to_char` on the three timestamps
//! of a content row doubled the server's time per row (3.0 s against 1.7 s for a million
//! rows), and the server is the export's bottleneck: PostgreSQL prints them instead in its
//! own ISO form, in UTC (the snapshot sets `TimeZone` and `DateStyle`),
//! `2026-03-01 12:00:00.5+00`, and [`copy_section`] rewrites the trailing timestamp
//! columns of each record ([`trailing_times`]) as it copies. They are the last columns of
//! their section, and a timestamp never holds a comma or a quote, so they are found from
//! the end of the record (PostgreSQL sends one record per `COPY` frame) without parsing
//! the user text before them. A value of another shape (`infinity`, a date BC, a year past
//! 9999) is written as PostgreSQL printed it, never dropped.

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
        if let Some(section) = feed.next_section()? {
            copy_section(feed, &mut out, section)?;
        }
        return out.into_inner().map_err(|err| err.into_error());
    }
    let mut zip = ZipWriter::new_stream(BufWriter::with_capacity(BUFFER, out));
    let options = zip_options(zip_level);
    while let Some(section) = feed.next_section()? {
        zip.start_file(format!("{}.csv", section.name()), options)
            .map_err(io::Error::from)?;
        // Buffered above the entry: the compressor and the CRC see large writes, not the
        // two of every record.
        let mut entry = BufWriter::with_capacity(BUFFER, &mut zip);
        copy_section(feed, &mut entry, section)?;
        entry.flush()?;
    }
    let stream = zip.finish().map_err(io::Error::from)?;
    stream
        .into_inner()
        .into_inner()
        .map_err(|err| err.into_error())
}

/// How many of a section's last columns are timestamps (rewritten by [`copy_section`]): the
/// trailing `..._at` columns of [`columns`] (content: published_at, created_at, updated_at;
/// keywords: recorded_at). [`copy_section`] checks that the COPY's header is [`columns`],
/// so the SELECT cannot put other columns there unnoticed.
fn trailing_times(section: Section) -> usize {
    columns(section)
        .iter()
        .rev()
        .take_while(|name| name.ends_with("_at"))
        .count()
}

/// Copies the section's COPY output as it arrives: the header (which must be
/// [`columns`], else the export fails), then the records with their trailing timestamps in
/// RFC 3339 ([`write_record`]).
fn copy_section<W: Write>(feed: &mut Feed, out: &mut W, section: Section) -> io::Result<()> {
    let times = trailing_times(section);
    let mut header = true;
    let mut tail = Vec::with_capacity(128);
    while let Some(frames) = feed.next_csv()? {
        for frame in &frames {
            if std::mem::take(&mut header) {
                check_header(frame, section)?;
                out.write_all(frame)?;
            } else if times == 0 {
                out.write_all(frame)?;
            } else {
                write_record(frame, times, &mut tail, out)?;
            }
        }
    }
    Ok(())
}

/// The COPY's header frame must name [`columns`] in order (the writer relies on where the
/// timestamps are).
fn check_header(frame: &[u8], section: Section) -> io::Result<()> {
    let expected = columns(section).join(",");
    if frame.strip_suffix(b"\n") == Some(expected.as_bytes()) {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "the {} section's COPY header is {:?}, not {expected:?}",
            section.name(),
            String::from_utf8_lossy(frame)
        )))
    }
}

/// Writes one record (one `COPY` frame, ending in `\n`) whose last `times` fields are
/// timestamps, each rewritten by [`push_time`]; `tail` is scratch space.
fn write_record<W: Write>(
    record: &[u8],
    times: usize,
    tail: &mut Vec<u8>,
    out: &mut W,
) -> io::Result<()> {
    let malformed = || io::Error::other("a COPY record without its timestamp columns");
    let line = record.strip_suffix(b"\n").ok_or_else(malformed)?;
    // The start of the trailing fields: `times` commas from the end (a timestamp holds none).
    let mut start = line.len();
    for _ in 0..times {
        start = line[..start]
            .iter()
            .rposition(|&b| b == b',')
            .ok_or_else(malformed)?;
    }
    tail.clear();
    for field in line[start + 1..].split(|&b| b == b',') {
        tail.push(b',');
        push_time(field, tail);
    }
    tail.push(b'\n');
    out.write_all(&line[..start])?;
    out.write_all(tail)
}

/// Appends `field`, PostgreSQL's ISO text of a timestamp in UTC
/// (`YYYY-MM-DD HH:MM:SS[.F]+00`, 1 to 6 fraction digits), as RFC 3339 with microseconds
/// (`YYYY-MM-DDTHH:MM:SS.FFFFFFZ`). An empty field (NULL) stays empty; any other shape is
/// appended as it is.
fn push_time(field: &[u8], out: &mut Vec<u8>) {
    let Some((date_time, fraction)) = split_iso_utc(field) else {
        out.extend_from_slice(field);
        return;
    };
    out.extend_from_slice(&date_time[..10]);
    out.push(b'T');
    out.extend_from_slice(&date_time[11..]);
    out.push(b'.');
    out.extend_from_slice(fraction);
    out.extend_from_slice(&b"000000"[fraction.len()..]);
    out.push(b'Z');
}

/// `YYYY-MM-DD HH:MM:SS` and the fraction's digits (maybe none) of PostgreSQL's ISO text of
/// a timestamp in UTC, or `None` for any other shape.
fn split_iso_utc(field: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = field.strip_suffix(b"+00")?;
    let (date_time, fraction) = rest.split_at_checked(19)?;
    let fraction = match fraction {
        [] => fraction,
        [b'.', digits @ ..] if (1..=6).contains(&digits.len()) => digits,
        _ => return None,
    };
    let shape_ok = date_time.iter().enumerate().all(|(i, &b)| match i {
        4 | 7 => b == b'-',
        10 => b == b' ',
        13 | 16 => b == b':',
        _ => b.is_ascii_digit(),
    });
    (shape_ok && fraction.iter().all(u8::is_ascii_digit)).then_some((date_time, fraction))
}

#[cfg(test)]
mod time_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rewritten(field: &str) -> String {
        let mut out = Vec::new();
        push_time(field.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn postgres_iso_utc_becomes_rfc3339_with_microseconds() {
        assert_eq!(
            rewritten("2026-03-01 12:00:00+00"),
            "2026-03-01T12:00:00.000000Z"
        );
        assert_eq!(
            rewritten("2026-03-01 12:00:00.5+00"),
            "2026-03-01T12:00:00.500000Z"
        );
        assert_eq!(
            rewritten("1999-12-31 23:59:59.000001+00"),
            "1999-12-31T23:59:59.000001Z"
        );
        assert_eq!(rewritten(""), "");
    }

    #[test]
    fn other_shapes_are_kept_as_postgres_printed_them() {
        for kept in [
            "infinity",
            "-infinity",
            "0044-03-15 12:00:00+00 BC",
            "10000-01-01 00:00:00.123+00",
            "2026-03-01 12:00:00+01",
            "2026-03-01 12:00:00.1234567+00",
            "2026-03-01T12:00:00+00",
        ] {
            assert_eq!(rewritten(kept), kept);
        }
    }

    #[test]
    fn the_trailing_timestamps_are_the_columns_named_at() {
        assert_eq!(trailing_times(Section::Content), 3);
        assert_eq!(trailing_times(Section::Keywords), 1);
        assert_eq!(trailing_times(Section::Analytics), 0);
        assert_eq!(trailing_times(Section::Settings), 0);
        assert!(check_header(b"key,value\n", Section::Settings).is_ok());
        let err = check_header(b"value,key\n", Section::Settings).unwrap_err();
        assert!(
            err.to_string().contains("settings section's COPY header"),
            "{err}"
        );
    }

    #[test]
    fn only_the_trailing_fields_of_a_record_are_rewritten() {
        // User text before them may hold commas, quotes, newlines and timestamp-like text.
        let record = "1,\"a, \"\"b\"\"\n2026-01-01 00:00:00+00\",2026-01-01 00:00:00+00,\
                      ,2026-03-01 12:00:00.25+00,2026-03-02 00:00:00+00\n";
        let mut out = Vec::new();
        write_record(record.as_bytes(), 3, &mut Vec::new(), &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1,\"a, \"\"b\"\"\n2026-01-01 00:00:00+00\",2026-01-01 00:00:00+00,\
             ,2026-03-01T12:00:00.250000Z,2026-03-02T00:00:00.000000Z\n"
        );
        let err = write_record(b"no line end", 1, &mut Vec::new(), &mut Vec::new());
        assert!(err.is_err());
        let err = write_record(b"no comma\n", 1, &mut Vec::new(), &mut Vec::new());
        assert!(err.is_err());
    }
}

//! JSON: one document, streamed element by element with `serde_json` (no `Value` of the
//! whole): `{"export_id":..,"domain":{..},"date_from":..,"date_to":..,"content":[..],
//! "keywords":[..],"analytics":[..],"settings":{..}}`, the excluded sections absent. A
//! non-finite number (`NaN`, `Infinity`) is `null` (what `serde_json` writes for one).

use std::io::{self, BufWriter, Write};

use super::file::Output;
use super::sections::{Batch, Section};
use super::{Feed, Header};

const BUFFER: usize = 128 * 1024;

pub(crate) fn write(feed: &mut Feed, out: Output, header: &Header) -> io::Result<Output> {
    let mut w = BufWriter::with_capacity(BUFFER, out);
    w.write_all(b"{\"export_id\":")?;
    serde_json::to_writer(&mut w, &header.export_id)?;
    w.write_all(b",\"domain\":")?;
    serde_json::to_writer(&mut w, &header.domain)?;
    w.write_all(b",\"date_from\":")?;
    serde_json::to_writer(&mut w, &header.date_from)?;
    w.write_all(b",\"date_to\":")?;
    serde_json::to_writer(&mut w, &header.date_to)?;
    while let Some(section) = feed.next_section()? {
        w.write_all(b",\"")?;
        w.write_all(section.name().as_bytes())?;
        let settings = section == Section::Settings;
        w.write_all(if settings { b"\":{" } else { b"\":[" })?;
        let mut first = true;
        while let Some(batch) = feed.next_batch()? {
            match batch {
                Batch::Content(rows) => elements(&mut w, &mut first, &rows)?,
                Batch::Keywords(rows) => elements(&mut w, &mut first, &rows)?,
                Batch::Analytics(rows) => elements(&mut w, &mut first, &rows)?,
                Batch::Settings(rows) => {
                    for row in rows {
                        separator(&mut w, &mut first)?;
                        serde_json::to_writer(&mut w, &row.key)?;
                        w.write_all(b":")?;
                        serde_json::to_writer(&mut w, &row.value.0)?;
                    }
                }
            }
        }
        w.write_all(if settings { b"}" } else { b"]" })?;
    }
    w.write_all(b"}\n")?;
    w.into_inner().map_err(|err| err.into_error())
}

fn separator(w: &mut impl Write, first: &mut bool) -> io::Result<()> {
    if !std::mem::take(first) {
        w.write_all(b",")?;
    }
    Ok(())
}

fn elements<T: serde::Serialize>(
    w: &mut impl Write,
    first: &mut bool,
    rows: &[T],
) -> io::Result<()> {
    for row in rows {
        separator(w, first)?;
        serde_json::to_writer(&mut *w, row)?;
    }
    Ok(())
}

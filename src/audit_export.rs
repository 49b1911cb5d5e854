//! Audit export files: the events retention drops, written first as gzip-compressed JSON
//! lines, one file per batch, `audit-<first seq>-<last seq>.jsonl.gz` (20 digits each, so
//! that names sort in seq order). A file is written to a temporary name page by page (memory
//! stays bounded whatever the events' size), synced, renamed and its directory synced
//! before any of its events is dropped from the database.

use crate::model::AuditEvent;
use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The digest of each event of a file (its JSON line), by seq.
pub type Digests = HashMap<u64, [u8; 32]>;

/// An event's digest as exported (its JSON line): what the database holds is compared with
/// what a file holds before the database's copy is dropped on the file's word.
pub fn digest(e: &AuditEvent) -> [u8; 32] {
    Sha256::digest(line(e).unwrap_or_default()).into()
}

/// An event as one line of a file (without its newline).
fn line(e: &AuditEvent) -> std::io::Result<Vec<u8>> {
    serde_json::to_vec(e).map_err(std::io::Error::other)
}

/// The directory the files go to.
#[derive(Clone, Debug)]
pub struct AuditExport {
    pub dir: PathBuf,
}

/// A file being written (see `AuditExport::begin`).
pub struct ExportFile {
    dir: PathBuf,
    tmp: PathBuf,
    gz: Option<GzEncoder<BufWriter<std::fs::File>>>,
    first: u64,
    last: u64,
}

impl AuditExport {
    /// Creates the directory when missing, checks it can be written, and removes the
    /// temporary files of exports that were interrupted (their events are still in the
    /// database).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let probe = dir.join(".lockstep-write-probe");
        std::fs::write(&probe, b"")?;
        std::fs::remove_file(&probe)?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// Removes the temporary files of interrupted exports (their events are still in the
    /// database). Only while holding the retention lock: its holder is the one writer here.
    pub fn remove_interrupted(&self) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".audit-") && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// The name of the finished file whose seq range holds `seq`, if any: a run cut off
    /// while dropping a file's events leaves the rest in the database, already exported.
    pub fn covering(&self, seq: u64) -> std::io::Result<Option<String>> {
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let Some(range) = name.strip_prefix("audit-").and_then(|n| n.strip_suffix(".jsonl.gz")) else {
                continue;
            };
            let Some((first, last)) = range.split_once('-') else { continue };
            if let (Ok(first), Ok(last)) = (first.parse::<u64>(), last.parse::<u64>())
                && (first..=last).contains(&seq)
            {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// The digest of each event of file `name` (`digest`) by seq; None when it cannot be
    /// read whole.
    pub fn digests(&self, name: &str) -> std::io::Result<Option<Digests>> {
        #[derive(serde::Deserialize)]
        struct Seq {
            seq: u64,
        }
        let file = std::fs::File::open(self.dir.join(name))?;
        let mut digests = HashMap::new();
        for line in BufReader::new(MultiGzDecoder::new(file)).lines() {
            let Ok(line) = line else { return Ok(None) };
            let Ok(Seq { seq }) = serde_json::from_str::<Seq>(&line) else { return Ok(None) };
            digests.insert(seq, Sha256::digest(line.as_bytes()).into());
        }
        Ok(Some(digests))
    }

    /// Starts the file whose first event has seq `first`.
    pub fn begin(&self, first: u64) -> std::io::Result<ExportFile> {
        let tmp = self.dir.join(format!(".audit-{first:020}-{}.jsonl.gz.tmp", std::process::id()));
        let file = std::fs::File::create(&tmp)?;
        Ok(ExportFile {
            dir: self.dir.clone(),
            tmp,
            gz: Some(GzEncoder::new(BufWriter::new(file), Compression::fast())),
            first,
            last: first,
        })
    }
}

impl ExportFile {
    /// Appends events (in seq order).
    pub fn append(&mut self, events: &[AuditEvent]) -> std::io::Result<()> {
        let gz = self.gz.as_mut().ok_or_else(|| std::io::Error::other("export file already finished"))?;
        for e in events {
            gz.write_all(&line(e)?)?;
            gz.write_all(b"\n")?;
            self.last = e.seq;
        }
        Ok(())
    }

    /// Makes the file durable under its final name. A file of an earlier attempt from the
    /// same first seq (its events were not dropped: the database decides) is replaced, so
    /// that no event is exported twice in this directory.
    pub fn finish(mut self) -> std::io::Result<PathBuf> {
        let gz = self.gz.take().ok_or_else(|| std::io::Error::other("export file already finished"))?;
        let file = gz.finish()?.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        let prefix = format!("audit-{:020}-", self.first);
        let name = format!("{prefix}{:020}.jsonl.gz", self.last);
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let other = entry.file_name().to_string_lossy().into_owned();
            if other.starts_with(&prefix) && other.ends_with(".jsonl.gz") && other != name {
                std::fs::remove_file(entry.path())?;
            }
        }
        let path = self.dir.join(&name);
        std::fs::rename(&self.tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }
}

impl Drop for ExportFile {
    fn drop(&mut self) {
        // Not finished (an error on the way): the temporary file goes.
        if self.gz.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

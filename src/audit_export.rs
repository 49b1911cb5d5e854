//! Audit export files: the events retention drops, written first as gzip-compressed JSON
//! lines, one file per batch, `audit-<first seq>-<last seq>.jsonl.gz` (20 digits each, so
//! that names sort in seq order). A file is written to a temporary name page by page (memory
//! stays bounded whatever the events' size), synced, renamed and its directory synced
//! before any of its events is dropped from the database.

use crate::model::AuditEvent;
use flate2::Compression;
use flate2::write::GzEncoder;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

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
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".audit-") && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// Starts the file whose first event has seq `first`.
    pub fn begin(&self, first: u64) -> std::io::Result<ExportFile> {
        let tmp = self.dir.join(format!(".audit-{first:020}.jsonl.gz.tmp"));
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
            serde_json::to_writer(&mut *gz, e).map_err(std::io::Error::other)?;
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
